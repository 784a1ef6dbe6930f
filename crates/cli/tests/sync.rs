//! `--sync` as a user runs it: local SGD every step is the BSP run (for SGD, on equal shares),
//! averaging less often changes the run and sends fewer bytes, DiLoCo's outer step is an outer
//! step (with lr 1 and no momentum it is plain averaging), checkpoints keep every replica's
//! moments and the outer momentum (resume is bitwise), and what cannot work is refused by name.

use std::path::Path;
use std::process::Command;

use model::{LlamaConfig, Weights};

mod common;

use common::hotspa;

/// 64 documents of 16 tokens (every replica's share has the same token count, so a replica's
/// mean gradient is the global mean's share times the replica count), and initial weights.
fn setup(dir: &Path) {
    common::affine_docs(dir, 64, |_| 16, |i| i);
    common::init_weights(dir);
}

/// AdamW with β1 = 0, ε = 1e6, lr = 1e6 · 0.5 and no decay or clipping is SGD at 0.5 to f32
/// precision (the update `lr·g/(√v + ε)` differs from `0.5·g` by the factor `1/(1 + √v/ε)`).
const SGD: [&str; 10] = [
    "--lr",
    "5e5",
    "--eps",
    "1e6",
    "--beta1",
    "0",
    "--weight-decay",
    "0",
    "--grad-clip",
    "inf",
];

struct Run {
    weights: Weights,
    metrics: Vec<serde_json::Value>,
}

/// `steps` steps of DP4 from the fixed initial weights with `extra` flags.
fn train(dir: &Path, name: &str, steps: usize, extra: &[&str]) -> Run {
    train_on(dir, name, steps, ("4", "dp4"), extra)
}

/// [`train`] on `devices` devices under `strategy`.
fn train_on(
    dir: &Path,
    name: &str,
    steps: usize,
    (devices, strategy): (&str, &str),
    extra: &[&str],
) -> Run {
    let steps = steps.to_string();
    let save = format!("{name}.safetensors");
    let metrics = format!("{name}.jsonl");
    let mut args = common::train_args(&[
        "--devices",
        devices,
        "--strategy",
        strategy,
        "--global-batch",
        "16",
        "--steps",
        &steps,
        "--save",
        &save,
        "--metrics",
        &metrics,
        // Runs of one test may write a name an earlier one wrote.
        "--force",
    ]);
    if !extra.contains(&"--resume") {
        args.extend(["--init", "init.safetensors"]);
    }
    args.extend(extra);
    let o = hotspa(dir, &args);
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Run {
        weights: Weights::load(&LlamaConfig::load(dir).unwrap(), &dir.join(&save)).unwrap(),
        metrics: std::fs::read_to_string(dir.join(&metrics))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    }
}

fn max_diff(a: &Weights, b: &Weights) -> f32 {
    a.tensors()
        .iter()
        .zip(b.tensors())
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn wire(r: &Run) -> u64 {
    r.metrics
        .iter()
        .map(|m| m["wire_intra_node_bytes"].as_u64().unwrap())
        .sum()
}

fn with<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

#[test]
fn local_sgd_every_step_is_bsp_and_less_often_is_not() {
    let d = &common::Scratch::new(setup);
    let init = Weights::load(&LlamaConfig::load(d).unwrap(), &d.join("init.safetensors")).unwrap();
    let bsp = train(d, "bsp", 3, &SGD);
    let local1 = train(d, "local1", 3, &with(&SGD, &["--sync", "local:1"]));
    let moved = max_diff(&bsp.weights, &init);
    assert!(moved > 1e-2, "SGD hardly moved the weights ({moved})");
    let diff = max_diff(&local1.weights, &bsp.weights);
    assert!(diff < 1e-5, "local:1 differs from BSP by {diff}");
    // The reported loss is the global batch's.
    for (a, b) in local1.metrics.iter().zip(&bsp.metrics) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    let local3 = train(d, "local3", 3, &with(&SGD, &["--sync", "local:3"]));
    let diff = max_diff(&local3.weights, &bsp.weights);
    assert!(
        diff > 1e-4,
        "local:3 is BSP ({diff}): the replicas never ran apart"
    );
}

#[test]
fn averaging_every_h_steps_sends_h_times_fewer_bytes() {
    let d = &common::Scratch::new(setup);
    let bsp = train(d, "bsp", 10, &[]);
    let local = train(d, "local", 10, &["--sync", "local:5"]);
    let (b, l) = (wire(&bsp), wire(&local));
    // Two averagings of the weights (one all-reduce each) against ten of the gradients, plus
    // a few bytes per step for the loss and the norms.
    assert!(
        (l as f64) < b as f64 / 4.0,
        "local:5 sent {l} bytes, BSP {b}"
    );
    let synced: Vec<u64> = local
        .metrics
        .iter()
        .map(|m| m["wire_intra_node_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        synced[4] > 100 * synced[3] && synced[9] > 100 * synced[8],
        "the bytes are not at steps 5 and 10: {synced:?}"
    );
}

#[test]
fn diloco_takes_an_outer_step() {
    let d = &common::Scratch::new(setup);
    let local = train(d, "local", 6, &["--sync", "local:3"]);
    let plain = train(
        d,
        "plain",
        6,
        &[
            "--sync",
            "diloco:3",
            "--outer-lr",
            "1",
            "--outer-momentum",
            "0",
        ],
    );
    let diff = max_diff(&plain.weights, &local.weights);
    assert!(
        diff < 1e-6,
        "DiLoCo with outer lr 1 and no momentum is not averaging ({diff})"
    );
    let diloco = train(d, "diloco", 6, &["--sync", "diloco:3"]);
    let lr = train(d, "lr", 6, &["--sync", "diloco:3", "--outer-lr", "0.5"]);
    let mu = train(
        d,
        "mu",
        6,
        &["--sync", "diloco:3", "--outer-momentum", "0.5"],
    );
    for (name, r) in [
        ("diloco", &diloco),
        ("--outer-lr", &lr),
        ("--outer-momentum", &mu),
    ] {
        let diff = max_diff(&r.weights, &local.weights);
        assert!(diff > 1e-5, "{name} changed nothing ({diff})");
    }
    assert!(max_diff(&lr.weights, &diloco.weights) > 1e-5);
    assert!(max_diff(&mu.weights, &diloco.weights) > 1e-5);
}

#[test]
fn resume_keeps_every_replicas_moments_and_the_outer_momentum() {
    let d = &common::Scratch::new(setup);
    for mode in ["local:2", "diloco:2"] {
        let whole = train(d, "whole", 6, &["--sync", mode]);
        train(
            d,
            "first",
            4,
            &[
                "--sync",
                mode,
                "--checkpoint-dir",
                "ck",
                "--checkpoint-every",
                "2",
            ],
        );
        let resumed = train(
            d,
            "resumed",
            6,
            &["--sync", mode, "--resume", "ck/step-00000004"],
        );
        let diff = max_diff(&resumed.weights, &whole.weights);
        assert!(diff == 0.0, "{mode}: resuming differs by {diff}");
        std::fs::remove_dir_all(d.join("ck")).unwrap();
    }
    // A BSP checkpoint continues under DiLoCo (its outer momentum starts at zero); the changed
    // setting is reported.
    train(d, "bsp", 2, &["--checkpoint-dir", "ck"]);
    let line = "--devices 4 --strategy dp4 --global-batch 16 --steps 4 --sync diloco:2 --resume ck";
    let e = common::stderr_ok(&hotspa(d, &common::train_args(&common::words(line))));
    assert!(e.contains("sync"), "{e}");
}

/// Periodic averaging over a context-parallel strategy: each data replica's CP group sums its
/// ranks' gradients every step, and the replicas average every `H` steps, so `dp2cp2` on 4
/// devices ends where `dp2` on 2 does (the same two replicas, their tokens split over CP), under
/// local SGD, DiLoCo and gossip alike, with the same losses; and `cp4` alone has no replicas to
/// average.
/// (Under SGD, as the tests above: AdamW's first steps turn the last-bit differences of
/// near-zero gradient entries, summed in another order over the CP ranks, into ~1e-5.)
#[test]
fn periodic_averaging_over_cp_is_that_of_the_data_replicas() {
    let d = &common::Scratch::new(setup);
    let run = |name: &str, devices: &str, strategy: &str, sync: &str| {
        train_on(
            d,
            name,
            4,
            (devices, strategy),
            &with(&SGD, &["--sync", sync]),
        )
    };
    let init = Weights::load(&LlamaConfig::load(d).unwrap(), &d.join("init.safetensors")).unwrap();
    for sync in ["local:1", "local:3", "diloco:2", "gossip:2"] {
        let dp = run("dp2", "2", "dp2", sync);
        let cp = run("dp2cp2", "4", "dp2cp2", sync);
        assert!(
            max_diff(&dp.weights, &init) > 1e-2,
            "{sync}: nothing trained"
        );
        let diff = max_diff(&cp.weights, &dp.weights);
        assert!(diff < 1e-6, "{sync}: dp2cp2 differs from dp2 by {diff}");
        for (a, b) in cp.metrics.iter().zip(&dp.metrics) {
            let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{sync}: loss {a} vs {b}");
        }
    }
    // And the replicas did run apart: local:3 is not BSP over the same strategy.
    let bsp = run("bsp", "4", "dp2cp2", "bsp");
    let local = run("local", "4", "dp2cp2", "local:3");
    let apart = max_diff(&bsp.weights, &local.weights);
    assert!(apart > 1e-4, "local:3 is BSP ({apart})");
    let o = hotspa(
        d,
        &common::train_args(&["--devices", "4", "--strategy", "cp4", "--sync", "local:2"]),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no DP replicas"), "{e}");
}

#[test]
fn what_periodic_averaging_cannot_do_is_refused_by_name() {
    let d = &common::Scratch::new(setup);
    let base = common::train_args(&["--devices", "4", "--steps", "4"]);
    for (extra, says) in common::cases(
        "
        --sync ring:2 => use bsp, ssp:S, asp, local:H, gossip:H, diloco:H or fedavg
        --sync asp --strategy dp2tp2 => whole replicas
        --ps-servers 1 --sync local:2 => averages
        --ps-servers 0 => at least 1
        --ps-servers 1 --checkpoint-dir ck => checkpointing under the parameter server is not built
        --ps-servers 1 --grad-compression powersgd:2 => PowerSGD's factors need all-reduces
        --ps-placement colocated => no parameter servers
        --slow-rank 9:2 => not a worker
        --slow-rank 1:0.5 => at least 1
        --sync local:0 => at least 1
        --sync local:2 --outer-lr 0.5 => outer_lr
        --sync local:2 --strategy dp4zero1 => zero
        --sync local:2 --strategy tp4 => no DP replicas
        --sync local:2 --strategies dp4:8,dp2tp2:max => one strategy
        --sync local:2 --grad-compression int8 => --grad-compression int8
        --sync local:2 --checkpoint-dir ck --checkpoint-every 3 => multiple of 2
        ",
    ) {
        let o = hotspa(d, &with(&base, &extra));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(e.contains(says), "{extra:?}: {e}");
    }
}

/// `--ps-servers` moves the update to the servers (the same weights under BSP, the bytes of
/// pushes and replies on the wire), `--ps-placement` decides which of them cross nodes, and
/// `--slow-rank` makes a straggler whose pushes land on parameters many updates newer.
#[test]
fn parameter_server_flags_change_what_runs() {
    let d = &common::Scratch::new(setup);
    let nodes = ["--devices-per-node", "2"];
    let all_reduce = train(d, "allreduce", 3, &nodes);
    let dedicated = train(d, "ps", 3, &with(&nodes, &["--ps-servers", "2"]));
    let colocated = train(
        d,
        "ps_colocated",
        3,
        &with(
            &nodes,
            &["--ps-servers", "2", "--ps-placement", "colocated"],
        ),
    );
    assert!(max_diff(&dedicated.weights, &all_reduce.weights) <= 1e-5);
    assert!(max_diff(&colocated.weights, &dedicated.weights) == 0.0);
    let sum =
        |r: &Run, key: &str| -> u64 { r.metrics.iter().map(|m| m[key].as_u64().unwrap()).sum() };
    assert!(all_reduce.metrics[0].get("ps_updates").is_none());
    assert_eq!(dedicated.metrics[0]["ps_updates"], 4);
    // Dedicated servers are on nodes of their own: every byte crosses; co-located ones share
    // a node with half the workers.
    assert_eq!(sum(&dedicated, "wire_intra_node_bytes"), 0);
    let total = sum(&dedicated, "wire_inter_node_bytes");
    assert_eq!(
        total,
        sum(&dedicated, "ps_push_bytes") + sum(&dedicated, "ps_pull_bytes")
    );
    assert_eq!(sum(&colocated, "wire_inter_node_bytes") * 2, total);
    // Pushes through a codec: int8 sends about a quarter of the bytes, and the update changes
    // (error feedback keeps it close).
    let int8 = train(
        d,
        "ps_int8",
        3,
        &with(&nodes, &["--ps-servers", "2", "--grad-compression", "int8"]),
    );
    let pushed = |r: &Run| sum(r, "ps_push_bytes") as f64;
    let ratio = pushed(&int8) / pushed(&dedicated);
    assert!(
        (0.24..0.3).contains(&ratio),
        "int8 pushes {ratio} of the exact bytes"
    );
    assert_eq!(
        sum(&int8, "ps_pull_bytes"),
        sum(&dedicated, "ps_pull_bytes")
    );
    let moved = max_diff(&int8.weights, &dedicated.weights);
    assert!(
        moved > 0.0 && moved < 1e-2,
        "int8 pushes moved the weights by {moved}"
    );
    // A 20× straggler under ASP trains far fewer shares than the others, and its pushes meet
    // parameters that moved on.
    let line = "--devices 4 --steps 8 --global-batch 16 --sync asp --slow-rank 3:20";
    let e = common::stderr_ok(&hotspa(d, &common::train_args(&common::words(line))));
    let (line, shares) = shares_per_worker(&e);
    assert_eq!(shares.iter().sum::<usize>(), 32, "{line}");
    // (Threads on two busy cores do not share the work evenly among the fast workers either:
    // one of them may be starved, so only the busiest is the measure.)
    assert!(
        4 * shares[3] <= shares[..3].iter().copied().max().unwrap(),
        "{line}"
    );
}

/// The parameter server's line "shares trained per worker: [a, b, …]" of a run's output, and
/// its numbers.
fn shares_per_worker(e: &str) -> (&str, Vec<usize>) {
    let line = e
        .lines()
        .find(|l| l.starts_with("parameter server: shares trained per worker"))
        .unwrap_or_else(|| panic!("{e}"));
    let list = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
    (line, list.split(", ").map(|x| x.parse().unwrap()).collect())
}

/// A worker whose step fails (`HOTSPA_FAULT=panic:RANK:STEP`) under ASP leaves: the servers
/// keep the parameters, another worker trains its share, and the run ends well and says so;
/// under BSP on the parameter server the same fault ends the run, naming the rank.
#[test]
fn a_failed_worker_leaves_an_asynchronous_run_and_ends_a_synchronous_one() {
    let d = &common::Scratch::new(setup);
    let run = |sync: &str| {
        Command::new(env!("CARGO_BIN_EXE_hotspa"))
            .args(common::train_args(&[
                "--devices",
                "4",
                "--steps",
                "6",
                "--global-batch",
                "16",
                "--sync",
                sync,
                "--ps-servers",
                "1",
                "--save",
                &format!("{sync}.safetensors"),
            ]))
            .current_dir(d)
            .env("RUST_BACKTRACE", "0")
            // World rank 2: worker 1 (the server is rank 0), at its first step: the only one
            // it is sure to get (under ASP a fast worker may take every later share).
            .env("HOTSPA_FAULT", "panic:2:1")
            .output()
            .unwrap()
    };
    for sync in ["asp", "ssp:1"] {
        let o = run(sync);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{sync}: {e}");
        assert!(
            e.contains("worker 1 (rank 2) left the run at its step 1"),
            "{sync}: {e}"
        );
        // Every share was trained, worker 1's after it left by the others.
        let (line, shares) = shares_per_worker(&e);
        assert_eq!(shares.iter().sum::<usize>(), 24, "{sync}: {line}");
        assert_eq!(shares[1], 0, "{sync}: {line}");
        assert!(d.join(format!("{sync}.safetensors")).exists());
    }
    let o = run("bsp");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "BSP went on without a worker: {e}");
    assert!(e.contains("rank 2 panics at step 1"), "{e}");
}

/// Gossip on a ring: with two replicas a neighbour is everyone, so `gossip:H` is `local:H` to
/// the bit; with four each averages with two of three others, which is not the global average
/// (the run differs) — and the saved model is every replica's average all the same.
#[test]
fn gossip_averages_with_the_ring_neighbours() {
    let d = &common::Scratch::new(setup);
    let two = |sync: &str| -> Weights {
        let save = format!("two_{sync}.safetensors").replace(':', "_");
        let o = hotspa(
            d,
            &common::train_args(&[
                "--init",
                "init.safetensors",
                "--devices",
                "2",
                "--strategy",
                "dp2",
                "--global-batch",
                "8",
                "--steps",
                "6",
                "--sync",
                sync,
                "--save",
                &save,
            ]),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Weights::load(&LlamaConfig::load(d).unwrap(), &d.join(&save)).unwrap()
    };
    assert!(max_diff(&two("gossip:2"), &two("local:2")) == 0.0);
    let local = train(d, "local4", 6, &["--sync", "local:2"]);
    let gossip = train(d, "gossip4", 6, &["--sync", "gossip:2"]);
    let moved = max_diff(&gossip.weights, &local.weights);
    assert!(moved > 1e-6 && moved < 1e-2, "gossip vs local SGD: {moved}");
    // Each gossip round sends every replica's weights to two neighbours: more than a ring
    // all-reduce's 2(W−1)/W of them.
    assert!(
        wire(&gossip) > wire(&local),
        "{} vs {}",
        wire(&gossip),
        wire(&local)
    );
}
