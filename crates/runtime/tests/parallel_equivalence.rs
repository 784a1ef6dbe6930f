//! Every implemented strategy on thread ranks against the single-device run of the same global
//! batch (itself checked against an eager f64 reference in `decoder_reference.rs`): same loss and
//! same gradient for every parameter within 1e-5 relative, in f32. Sequences are long-tailed and
//! their lengths, the vocabulary and the MLP width are not multiples of the TP degree.

use std::sync::Arc;

use comm::{Communicator, ThreadComm};
use graph::{lower, Strategy};
use kernels::CpuBackend;
use model::{build_graph, LlamaConfig, Weights};
use runtime::{run, step_gradients, MicroBatch, RankGroups};

mod common;

fn config(tied: bool) -> LlamaConfig {
    config_kv(tied, 2)
}

fn config_kv(tied: bool, kv: usize) -> LlamaConfig {
    common::config(2, kv, tied, Some(1e-5))
}

fn sequences() -> Vec<Vec<u32>> {
    common::sequences(&[37, 5, 2, 70, 9, 3, 13, 21, 2, 6], 0)
}

/// The micro-batches of DP replica `d` of `dp`: sequences dealt round-robin, packed two by two.
fn micro_batches(dp: usize, d: usize, scale: f32) -> Vec<MicroBatch> {
    common::micro_batches(&sequences(), dp, d, scale)
}

/// Checks `spec` against the single device; returns the peak bytes of every rank.
fn check(spec: &str, devices: usize, tied: bool) -> Vec<usize> {
    check_cfg(spec, devices, config(tied))
}

fn check_cfg(spec: &str, devices: usize, cfg: LlamaConfig) -> Vec<usize> {
    let cfg = Arc::new(cfg);
    let weights = Arc::new(Weights::random(&cfg, 11));
    let mut logical = build_graph(&cfg).unwrap();
    graph::backward(&mut logical).unwrap();
    let predicted: usize = sequences().iter().map(|s| s.len() - 1).sum();
    let scale = 1.0 / predicted as f32;

    // The single-device reference: every sequence in one micro-batch.
    let cpu = CpuBackend::new(1).unwrap();
    let all = MicroBatch::pack(&sequences(), scale).unwrap();
    let reference = run(&cpu, &logical, &weights.stored(), &all).unwrap();

    let strategy = Strategy::parse(spec, devices).unwrap();
    let exec = Arc::new(lower(&logical, &strategy).unwrap());
    let (exec2, weights2, strategy2) = (exec.clone(), weights.clone(), strategy.clone());
    let results = ThreadComm::run(devices, move |world| -> Result<_, runtime::RuntimeError> {
        let me = world.rank().0;
        let mut groups = RankGroups::new(&world, &strategy2)?;
        groups.bucket_bytes = 2048; // many buckets, reduced while the backward runs
        let (_, dp_rank, tp_rank) = strategy2.coords(me);
        let cpu = CpuBackend::new(1)?;
        let params: Vec<Vec<f32>> = exec2
            .graph
            .params
            .iter()
            .zip(weights2.stored())
            .map(|(&p, w)| {
                let shape = exec2.graph.info(p).resolve(0);
                dstate::distribute(&w, &shape, &exec2.states[p.0])
                    .map(|mut v| v.swap_remove(tp_rank))
            })
            .collect::<Result<_, _>>()?;
        let mbs = micro_batches(strategy2.dp, dp_rank, scale);
        let out = step_gradients(&cpu, &exec2, &mut groups, &params, &mbs)?;
        Ok((out.loss, out.grads, out.peak_bytes))
    })
    .unwrap_or_else(|e| panic!("{spec}: {e}"));

    for (rank, (loss, _, _)) in results.iter().enumerate() {
        let rel = ((loss - reference.loss) / reference.loss).abs();
        assert!(
            rel <= 1e-5,
            "{spec} rank {rank}: loss {loss} vs single device {}",
            reference.loss
        );
    }
    for (k, &p) in exec.graph.params.iter().enumerate() {
        let shape = exec.graph.info(p).resolve(0);
        let state = &exec.states[p.0];
        // Every DP replica must hold the same gradient; check replicas 0 and the last.
        for dp_rank in [0, strategy.dp - 1] {
            let locals: Vec<Vec<f32>> = (0..strategy.tp)
                .map(|t| results[strategy.rank_of(0, dp_rank, t)].1[k].clone())
                .collect();
            let got = dstate::assemble(&locals, &shape, state).unwrap();
            let (worst, scale) = common::worst(&got, &reference.grads[k]);
            assert!(
                worst <= 1e-5 * scale + 1e-9,
                "{spec}: {} (DState {state}, replica {dp_rank}) differs by {worst:e} (largest |grad| {scale:e})",
                exec.graph.info(p).name
            );
        }
    }
    results.iter().map(|r| r.2).collect()
}

/// `cargo test -p model --test parallel_equivalence -- --ignored --nocapture` prints the peak
/// activation+gradient bytes per rank of every strategy on the test model.
#[test]
#[ignore]
fn print_peak_bytes_per_strategy() {
    let single = {
        let cfg = config(false);
        let mut g = build_graph(&cfg).unwrap();
        graph::backward(&mut g).unwrap();
        let w = Weights::random(&cfg, 11);
        let predicted: usize = sequences().iter().map(|s| s.len() - 1).sum();
        let scale = 1.0 / predicted as f32;
        micro_batches(1, 0, scale)
            .iter()
            .map(|mb| {
                run(&CpuBackend::new(1).unwrap(), &g, &w.stored(), mb)
                    .unwrap()
                    .peak_bytes
            })
            .max()
            .unwrap()
    };
    println!("strategy   peak bytes per rank (micro-batches of 2 sequences)");
    println!("{:<10} {single}", "1 device");
    for (spec, n) in [
        ("dp4", 4),
        ("tp4", 4),
        ("tp4sp", 4),
        ("dp2tp2", 4),
        ("dp2tp2sp", 4),
        ("dp2tp4sp", 8),
        ("tp2", 2),
    ] {
        let peaks = check(spec, n, false);
        println!("{spec:<10} {peaks:?}");
    }
}

#[test]
fn dp4_matches_single_device() {
    check("dp4", 4, false);
}

#[test]
fn tp4_with_replicated_kv_heads_matches_single_device() {
    check("tp4", 4, false);
}

#[test]
fn tp4sp_matches_single_device() {
    check("tp4sp", 4, false);
}

#[test]
fn dp2tp2_matches_single_device() {
    check("dp2tp2", 4, false);
}

#[test]
fn dp2tp2sp_tied_matches_single_device() {
    check("dp2tp2sp", 4, true);
}

#[test]
fn dp2tp4sp_on_8_ranks_matches_single_device() {
    check("dp2tp4sp", 8, false);
}

#[test]
fn mha_under_dp2tp2_and_tp4sp() {
    check_cfg("dp2tp2", 4, config_kv(false, 4));
    check_cfg("tp4sp", 4, config_kv(true, 4));
}

#[test]
fn mqa_single_kv_head_replicated_under_tp2sp_and_tp4() {
    check_cfg("tp2sp", 2, config_kv(false, 1));
    check_cfg("tp4", 4, config_kv(true, 1));
}

#[test]
fn tp2_tied_matches_single_device() {
    check("tp2", 2, true);
}

#[test]
fn unbuilt_strategies_are_refused_clearly() {
    let mut g = build_graph(&config(false)).unwrap();
    graph::backward(&mut g).unwrap();
    let e = lower(&g, &Strategy::parse("tp2pp2", 4).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lower one stage's graph"), "{e}");
    let e = lower(&g, &Strategy::parse("tp8", 8).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be split over 8 TP ranks"), "{e}");
}

/// Runs one micro-batch of a 1-layer model under `spec` on 2 ranks and counts rank 0's
/// collectives by kind.
fn collectives(spec: &str) -> std::collections::BTreeMap<String, usize> {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 23, "hidden_size": 16, "intermediate_size": 22, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        std::path::Path::new("test"),
    )
    .unwrap();
    let weights = Arc::new(Weights::random(&cfg, 2));
    let mut logical = build_graph(&cfg).unwrap();
    graph::backward(&mut logical).unwrap();
    let strategy = Strategy::parse(spec, 2).unwrap();
    let exec = Arc::new(lower(&logical, &strategy).unwrap());
    let logs = ThreadComm::run(2, move |world| -> Result<_, runtime::RuntimeError> {
        let counting = comm::Counting::new(Box::new(world));
        let mut groups = RankGroups::new(&counting, &strategy)?;
        let tp_rank = counting.rank().0;
        let params: Vec<Vec<f32>> = exec
            .graph
            .params
            .iter()
            .zip(weights.stored())
            .map(|(&p, w)| {
                let shape = exec.graph.info(p).resolve(0);
                dstate::distribute(&w, &shape, &exec.states[p.0])
                    .map(|mut v| v.swap_remove(tp_rank))
            })
            .collect::<Result<_, _>>()?;
        let mb = MicroBatch::pack(&sequences()[..3], 0.01)?;
        step_gradients(&CpuBackend::new(1)?, &exec, &mut groups, &params, &[mb])?;
        Ok(counting.records())
    })
    .unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for r in &logs[0] {
        assert_eq!(r.group_size, 2, "{r}");
        *counts.entry(format!("{:?}", r.kind)).or_insert(0) += 1;
    }
    counts
}

#[test]
fn collectives_of_one_layer_under_tp_and_sp() {
    let map = |pairs: &[(&str, usize)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    // TP: all-reduce after the vocab-parallel embedding and each row-parallel linear (3), three
    // inside the vocab-parallel cross-entropy, and one per column-parallel input gradient in the
    // backward (lm_head, MLP, attention).
    assert_eq!(collectives("tp2"), map(&[("AllReduce", 9)]));
    // SP: every forward all-reduce of the stream becomes a reduce-scatter and every use by a
    // column-parallel linear an all-gather (3 + 3 each way); the norm weights' gradients are
    // partial over the token shards (3 all-reduces) besides the cross-entropy's 3.
    assert_eq!(
        collectives("tp2sp"),
        map(&[("AllGather", 6), ("AllReduce", 6), ("ReduceScatter", 6)])
    );
}

#[test]
fn one_logical_graph_holds_every_strategys_comm_with_dummies() {
    let mut g = build_graph(&config(false)).unwrap();
    graph::backward(&mut g).unwrap();
    let execs: Vec<_> = ["tp2", "tp2sp", "dp2"]
        .iter()
        .map(|s| lower(&g, &Strategy::parse(s, 2).unwrap()).unwrap())
        .collect();
    let shared = graph::SharedComm::new(&g, &execs);
    let text = shared.to_string();
    // DP alone needs no TP communication: every point is a dummy for it.
    assert_eq!(shared.dummies(2), shared.points.len());
    // The embedding's partial output is settled before the first norm: all-reduce under TP,
    // reduce-scatter under SP, nothing under DP.
    assert!(
        text.contains("model.embed_tokens → op#1 rms_norm: tp2 all-reduce@0 | tp2sp reduce-scatter@0 | dp2 dummy"),
        "{text}"
    );
    // SP all-gathers before column-parallel linears where TP needs nothing.
    assert!(
        shared.dummies(0) > 0 && shared.dummies(1) < shared.points.len(),
        "{text}"
    );
}
