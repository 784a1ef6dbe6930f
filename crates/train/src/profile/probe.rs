//! The model's own probes for [`super::profile`]: its training steps as DP replicas, passes of
//! each rank alone, a TP pass and a pipeline pass over every rank, and the fits that turn what
//! they measure beyond the kernel rates into the cluster's overhead per kernel, links under load
//! and wait for a core.

use std::time::Instant;

use comm::{CommError, Communicator, ReduceOp};
use kernels::CpuBackend;
use planner::Cluster;

use crate::error::TrainError;

type Result<T, E = TrainError> = std::result::Result<T, E>;

/// The probe's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Probe {
    /// DP training step seconds with `--probe-tokens` and with one sequence per rank.
    pub steps: [f64; 2],
    /// The same two sizes' forward and backward with every rank alone ([`Mode::PassAlone`]).
    pub passes: [f64; 2],
    /// Optimizer seconds.
    pub update_s: f64,
    /// Parameters of a rank.
    pub numel: usize,
    /// A pipeline pass over every rank ([`pp_probe`]), where the model has a layer per rank.
    pub pipeline: Option<f64>,
}

impl Probe {
    /// Each figure the smaller of `self`'s and `other`'s (two rounds of the same probe).
    pub(super) fn fastest(self, other: Probe) -> Probe {
        let min2 = |a: [f64; 2], b: [f64; 2]| [a[0].min(b[0]), a[1].min(b[1])];
        Probe {
            steps: min2(self.steps, other.steps),
            passes: min2(self.passes, other.passes),
            update_s: self.update_s.min(other.update_s),
            numel: self.numel,
            pipeline: match (self.pipeline, other.pipeline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// The larger TP probe's tokens, in micro-batches of the DP probe: moving bytes between ranks
/// that compute slows down with the messages' size (they leave the caches), so the probe
/// measures at the large end of the runs it prices (tp4 on the default model, micro-batches of
/// 4096 tokens: 20 % under when fitted at 1024, 8 % at 4096).
pub(super) const TP_PROBE: usize = 4;

/// The update the probes time (the default run's settings; the values do not change the time).
pub(super) const PROBE_ADAMW: kernels::AdamW = kernels::AdamW {
    lr: 1e-4,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
    freeze_variance_after: None,
};

/// Tokens of the small probe step (one sequence): almost all of its time is the kernels'
/// overhead, communication and the update, so it pins the overhead per kernel down.
pub(super) const SMALL: usize = 16;

/// The probe's sequence length for micro-batches of `tokens`: 512, or the model's longest if
/// shorter, and at most half of `tokens` (so that the smaller probe step is smaller).
pub(super) fn probe_len(cfg: &model::LlamaConfig, tokens: usize) -> usize {
    cfg.max_position_embeddings
        .clamp(2, 512)
        .min(tokens / 2)
        .max(1)
}

/// The probe's inputs for rank `rank` of `n` DP replicas: its graph, parameters and shared
/// parameters, and one micro-batch of `tokens` tokens (sequences of `len`).
type ProbeInputs = (graph::ExecGraph, model::RankParams, runtime::MicroBatch);

fn probe_inputs(
    cfg: &model::LlamaConfig,
    n: usize,
    rank: usize,
    tokens: usize,
    len: usize,
) -> Result<ProbeInputs, CommError> {
    let err = |e: String| CommError::Unavailable(format!("probe: {e}"));
    let strategy = graph::Strategy::parse(&format!("dp{n}"), n).map_err(|e| err(e.to_string()))?;
    let exec = model::rank_exec(cfg, &strategy, rank).map_err(|e| err(e.to_string()))?;
    let weights = model::Weights::random(cfg, 1);
    let rp = model::rank_params(cfg, &exec, &weights, 0).map_err(|e| err(e.to_string()))?;
    let seqs: Vec<Vec<u32>> = (0..tokens.div_ceil(len))
        .map(|k| {
            (0..len)
                .map(|i| ((i * 7 + k * 13) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let mb =
        runtime::MicroBatch::pack(&seqs, 1.0 / tokens as f32).map_err(|e| err(e.to_string()))?;
    Ok((exec, rp, mb))
}

/// What [`dp_steps`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// DP training steps over the world: the pass, the gradient exchange and the update.
    Training,
    /// Every rank's forward and backward alone (a group of one; the ranks still start each
    /// pass together, so that they share the cores as in a run): no message, no update. The
    /// overhead per kernel is solved from these: the small step of [`Mode::Training`] is
    /// mostly its gradient exchange and update, and a few per cent of error in their clocked
    /// time moved the overhead solved from it threefold (25, 78 and 70 µs in three profiles
    /// of one model, 106 µs in a fourth).
    PassAlone,
}

/// `steps` training steps of `cfg` as DP replicas over `world` on `be` (one micro-batch of
/// `tokens` in sequences of `len` each, the gradient all-reduce and the optimizer update), or
/// (`mode`) passes of each rank alone, after one to warm up: the slowest rank's seconds per
/// step, its optimizer seconds, and the rank's parameters.
#[allow(clippy::too_many_arguments)] // the probe's shape and what to run
pub(super) fn dp_steps<B: kernels::Backend<Buffer = Vec<f32>>>(
    be: &B,
    world: &dyn Communicator,
    mode: Mode,
    cfg: &model::LlamaConfig,
    tokens: usize,
    len: usize,
    steps: usize,
    mut each: impl FnMut(usize),
) -> Result<(Vec<f64>, Vec<f64>, usize), CommError> {
    let err = |e: String| CommError::Unavailable(format!("probe: {e}"));
    let alone = match mode {
        Mode::Training => None,
        Mode::PassAlone => Some(world.sub_group(&[world.rank()])?),
    };
    let dp = alone.as_deref().unwrap_or(world);
    let n = dp.size();
    let strategy = graph::Strategy::parse(&format!("dp{n}"), n).map_err(|e| err(e.to_string()))?;
    let (exec, rp, mb) = probe_inputs(cfg, n, dp.rank().0, tokens, len)?;
    let numel: usize = rp.params.iter().map(Vec::len).sum();
    let mut groups = runtime::RankGroups::new(dp, &strategy).map_err(|e| err(e.to_string()))?;
    let adamw = PROBE_ADAMW;
    let mut opt = runtime::Optimizer::new(
        be,
        &exec,
        &groups,
        rp.params.clone(),
        &rp.shared,
        adamw,
        1.0,
    )
    .map_err(|e| err(e.to_string()))?;
    let mbs = [mb];
    let (mut step_s, mut opt_s) = (Vec::new(), Vec::new());
    for k in 0..=steps {
        world.barrier()?;
        each(k);
        let t0 = Instant::now();
        let out = runtime::pipeline_step(
            be,
            &exec,
            &mut groups,
            opt.params(),
            &rp.shared,
            &mbs,
            graph::Schedule::OneFOneB,
        )
        .map_err(|e| err(e.to_string()))?;
        let t1 = Instant::now();
        if mode == Mode::Training {
            opt.update(be, &mut groups, out.grads, 1e-4)
                .map_err(|e| err(e.to_string()))?;
        }
        let (total, update) = (t0.elapsed().as_secs_f64(), t1.elapsed().as_secs_f64());
        if k > 0 {
            step_s.push(slowest(world, total)?);
            opt_s.push(slowest(world, update)?);
        }
    }
    Ok((step_s, opt_s, numel))
}

/// One forward and backward of `mbs` on `be` under `strategy` over `world` (1F1B).
fn pass<B: kernels::Backend<Buffer = Vec<f32>>>(
    be: &B,
    world: &dyn Communicator,
    strategy: &graph::Strategy,
    exec: &graph::ExecGraph,
    rp: &model::RankParams,
    mbs: &[runtime::MicroBatch],
) -> Result<(), String> {
    let mut groups = runtime::RankGroups::new(world, strategy).map_err(|e| e.to_string())?;
    let schedule = graph::Schedule::OneFOneB;
    runtime::pipeline_step(be, exec, &mut groups, &rp.params, &rp.shared, mbs, schedule)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The slowest member's `t` (seconds) over `c`.
pub(super) fn slowest(c: &dyn Communicator, t: f64) -> Result<f64, CommError> {
    let mut v = [t as f32];
    c.all_reduce(&mut v, ReduceOp::Max)?;
    Ok(f64::from(v[0]))
}

/// `cfg`'s forward and backward under TP over every rank (one micro-batch of `tokens`, as
/// [`probe`]'s), each figure the slowest rank's: `[measured seconds (the fastest of 5 passes),
/// the simulator's clock on `cluster`, the messages the clock charges (its clock with every
/// link's latency 1 ms longer, less the clock, in ms), the seconds it spends moving bytes (its
/// clock with every link half as fast, less the clock)]`. What the measured time has beyond the
/// clock is spent on the messages and their bytes ([`under_load`]).
pub(super) fn tp_probe(
    c: &dyn Communicator,
    be: &CpuBackend,
    share: &std::sync::Arc<sim::CoreShare>,
    cluster: &Cluster,
    cfg: &model::LlamaConfig,
    tokens: usize,
) -> Result<[f64; 4], CommError> {
    let err = |e: String| CommError::Unavailable(format!("TP probe: {e}"));
    let n = c.size();
    let strategy = graph::Strategy::parse(&format!("tp{n}"), n).map_err(|e| err(e.to_string()))?;
    let exec = model::rank_exec(cfg, &strategy, c.rank().0).map_err(|e| err(e.to_string()))?;
    let weights = model::Weights::random(cfg, 1);
    let (_, _, tp_rank) = strategy.coords(c.rank().0);
    let rp = model::rank_params(cfg, &exec, &weights, tp_rank).map_err(|e| err(e.to_string()))?;
    let (_, _, mb) = probe_inputs(cfg, n, 0, tokens, probe_len(cfg, tokens))?;
    let mbs = [mb];
    pass(be, c, &strategy, &exec, &rp, &mbs).map_err(err)?;
    let mut measured = Vec::new();
    for _ in 0..5 {
        c.barrier()?;
        let t0 = Instant::now();
        pass(be, c, &strategy, &exec, &rp, &mbs).map_err(err)?;
        measured.push(slowest(c, t0.elapsed().as_secs_f64())?);
    }
    // The fastest pass: this machine's hypervisor deschedules a virtual CPU now and then,
    // invisibly to the guest (no steal time), which only ever adds time; the model predicts
    // the undisturbed machine.
    let fastest = measured.iter().copied().fold(f64::INFINITY, f64::min);
    let mut clocked = [0.0; 3];
    for (i, (extra_us, slower)) in [(0.0, 1.0), (1000.0, 1.0), (0.0, 2.0)]
        .into_iter()
        .enumerate()
    {
        let mut cl = cluster.clone();
        for link in [&mut cl.same_node, &mut cl.cross_node] {
            link.latency_us += extra_us;
            link.gbps /= slower;
        }
        let clock = sim::Clock::new();
        let sb = sim::SimBackend::new(be.clone(), &cl, clock.clone()).sharing(share.clone());
        let sc = sim::SimComm::over(c, &cl, clock.clone())?.sharing(share.clone());
        pass(&sb, &sc, &strategy, &exec, &rp, &mbs).map_err(err)?;
        clocked[i] = slowest(c, clock.now())?;
    }
    Ok([
        fastest,
        clocked[0],
        (clocked[1] - clocked[0]) / 1e-3,
        clocked[2] - clocked[0],
    ])
}

/// What messages between ranks that compute cost beyond the clock's links, from two TP passes
/// `[measured, clocked, messages, transfer seconds]` ([`tp_probe`]) of different sizes:
/// `(seconds added to each message, factor by which moving bytes is slower)` solving
/// `measured − clocked = x·messages + y·transfer` for both passes; a negative part is taken as
/// none and the other fitted to both passes alone.
pub(super) fn under_load(passes: &[[f64; 4]; 2]) -> (f64, f64) {
    let [[m1, c1, n1, t1], [m2, c2, n2, t2]] = *passes;
    let (e1, e2) = (m1 - c1, m2 - c2);
    if let Some((x, y)) = cramer([n1, t1, e1], [n2, t2, e2]) {
        if x >= 0.0 && y >= 0.0 {
            return (x, y);
        }
    }
    // One term alone, least squares over both passes.
    let fit = |a1: f64, a2: f64| {
        let d = a1 * a1 + a2 * a2;
        if d > 0.0 {
            ((a1 * e1 + a2 * e2) / d).max(0.0)
        } else {
            0.0
        }
    };
    let (x, y) = (fit(n1, n2), fit(t1, t2));
    let residual = |x: f64, y: f64| (e1 - x * n1 - y * t1).powi(2) + (e2 - x * n2 - y * t2).powi(2);
    if residual(x, 0.0) <= residual(0.0, y) {
        (x, 0.0)
    } else {
        (0.0, y)
    }
}

/// Times training steps of `cfg` with every rank a DP replica, and passes of every rank alone,
/// with micro-batches of `tokens` and of [`SMALL`] tokens; each the fastest of 5 (of 9 for
/// the small passes; as [`tp_probe`]'s passes: a disturbance only ever adds time).
pub(super) fn probe(
    c: &dyn Communicator,
    be: &CpuBackend,
    cfg: &model::LlamaConfig,
    tokens: usize,
) -> Result<Probe, CommError> {
    let fastest = |v: Vec<f64>| v.into_iter().fold(f64::INFINITY, f64::min);
    let len = probe_len(cfg, tokens);
    let (big, opt_s, numel) = dp_steps(be, c, Mode::Training, cfg, tokens, len, 5, |_| {})?;
    let (small, _, _) = dp_steps(be, c, Mode::Training, cfg, SMALL, SMALL, 5, |_| {})?;
    let (pass_big, _, _) = dp_steps(be, c, Mode::PassAlone, cfg, tokens, len, 5, |_| {})?;
    let (pass_small, _, _) = dp_steps(be, c, Mode::PassAlone, cfg, SMALL, SMALL, 9, |_| {})?;
    Ok(Probe {
        steps: [fastest(big), fastest(small)],
        passes: [fastest(pass_big), fastest(pass_small)],
        update_s: fastest(opt_s),
        numel,
        pipeline: pp_probe(c, be, cfg, len)?,
    })
}

/// Micro-batches of [`pp_probe`] per stage.
pub(super) const PP_PROBE_MICRO_BATCHES: usize = 2;

/// `cfg`'s forward and backward as a pipeline over every rank (`pp{n}`, 1F1B), in
/// `2n` micro-batches of one `len`-token sequence each: the slowest rank's seconds, the
/// fastest of 3 passes; `None` for one rank or fewer layers than ranks.
fn pp_probe(
    c: &dyn Communicator,
    be: &CpuBackend,
    cfg: &model::LlamaConfig,
    len: usize,
) -> Result<Option<f64>, CommError> {
    let n = c.size();
    if n < 2 || cfg.num_hidden_layers < n {
        return Ok(None);
    }
    let err = |e: String| CommError::Unavailable(format!("pipeline probe: {e}"));
    let strategy = graph::Strategy::parse(&format!("pp{n}"), n).map_err(|e| err(e.to_string()))?;
    let exec = model::rank_exec(cfg, &strategy, c.rank().0).map_err(|e| err(e.to_string()))?;
    let weights = model::Weights::random(cfg, 1);
    let rp = model::rank_params(cfg, &exec, &weights, 0).map_err(|e| err(e.to_string()))?;
    let (_, _, mb) = probe_inputs(cfg, n, 0, len, len)?;
    let mbs = vec![mb; PP_PROBE_MICRO_BATCHES * n];
    let mut best = f64::INFINITY;
    for k in 0..4 {
        c.barrier()?;
        let t0 = Instant::now();
        pass(be, c, &strategy, &exec, &rp, &mbs).map_err(err)?;
        let t = slowest(c, t0.elapsed().as_secs_f64())?;
        // The first pass warms up.
        if k > 0 {
            best = best.min(t);
        }
    }
    Ok(Some(best))
}

/// The wait for a core per stage-boundary message (µs) with which the cost model on `cluster`
/// gives [`pp_probe`]'s pass its `measured` seconds, and the cost model's seconds without it.
/// The model grows with the wait, nearly linearly: two secant steps from 0 and 1 ms.
pub(super) fn handoff(
    cluster: &Cluster,
    cfg: &model::LlamaConfig,
    n: usize,
    len: usize,
    measured: f64,
) -> Result<(f64, f64)> {
    let s = graph::Strategy::parse(&format!("pp{n}"), n)?;
    let lens = vec![len; PP_PROBE_MICRO_BATCHES * n];
    let predict = |us: f64| {
        let cl = Cluster {
            handoff_us: us,
            ..cluster.clone()
        };
        planner::CostModel::new(cl, cfg.clone())
            .strategy(&s, &lens, len)
            .total()
    };
    let (mut a, mut pa) = (0.0, predict(0.0));
    let bare = pa;
    let (mut b, mut pb) = (1000.0, predict(1000.0));
    for _ in 0..2 {
        if (pb - pa).abs() < 1e-12 {
            break;
        }
        let next = (b + (measured - pb) * (b - a) / (pb - pa)).max(0.0);
        (a, pa) = (b, pb);
        (b, pb) = (next, predict(next));
    }
    Ok((if measured > bare { b } else { 0.0 }, bare))
}

/// `(scale, overhead per kernel)` with `measured[i] = rest + scale·scaled + overhead·kernels`
/// for both rows `[scaled, rest, kernels]`; without a positive solution, no overhead and the
/// scale of the first row.
pub(super) fn solve(rows: &[[f64; 3]; 2], measured: &[f64; 2]) -> (f64, f64) {
    let [a1, r1, k1] = rows[0];
    let [a2, r2, k2] = rows[1];
    let (y1, y2) = (measured[0] - r1, measured[1] - r2);
    match cramer([a1, k1, y1], [a2, k2, y2]) {
        Some((scale, overhead)) if scale > 0.1 && overhead >= 0.0 => (scale, overhead),
        _ => ((y1 / a1.max(1e-12)).max(0.1), 0.0),
    }
}

/// `(x, y)` with `a·x + b·y = c` for both rows `[a, b, c]`, or `None` where they are (nearly)
/// dependent.
fn cramer([a1, b1, c1]: [f64; 3], [a2, b2, c2]: [f64; 3]) -> Option<(f64, f64)> {
    let det = a1 * b2 - a2 * b1;
    (det.abs() > 1e-12).then(|| ((c1 * b2 - c2 * b1) / det, (a1 * c2 - a2 * c1) / det))
}

#[cfg(test)]
mod tests {
    use super::{handoff, under_load, PP_PROBE_MICRO_BATCHES};
    use planner::{Cluster, Link};

    #[test]
    fn the_wait_for_a_core_is_the_one_that_gives_the_pipeline_probe_its_time() {
        let link = Link::new(1.0, 20.0);
        let cluster = Cluster {
            shared_cores: 2.0,
            ..Cluster::new("t", 1, 4, 0.05, 4.0, link, link)
        };
        let mut cfg = model::LlamaConfig::preset("llama2-7b").unwrap();
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
        ) = (4, 256, 688);
        (cfg.num_attention_heads, cfg.num_key_value_heads) = (8, Some(8));
        let pass = |us: f64| {
            let s = graph::Strategy::parse("pp4", 4).unwrap();
            let cl = Cluster {
                handoff_us: us,
                ..cluster.clone()
            };
            planner::CostModel::new(cl, cfg.clone())
                .strategy(&s, &[256; PP_PROBE_MICRO_BATCHES * 4], 256)
                .total()
        };
        let (h, bare) = handoff(&cluster, &cfg, 4, 256, pass(2500.0)).unwrap();
        assert!((h - 2500.0).abs() < 1.0, "{h}");
        assert_eq!(bare, pass(0.0));
        // A pass the model already reaches: no wait.
        assert_eq!(handoff(&cluster, &cfg, 4, 256, 0.5 * bare).unwrap().0, 0.0);
    }

    /// A pass `[measured, clocked, messages, transfer]` costing `x` more per message and
    /// `1 + y` times its transfer seconds.
    fn pass(clocked: f64, messages: f64, transfer: f64, x: f64, y: f64) -> [f64; 4] {
        [
            clocked + x * messages + y * transfer,
            clocked,
            messages,
            transfer,
        ]
    }

    #[test]
    fn latency_and_bandwidth_under_load_are_told_apart_by_two_sizes() {
        let (x, y) = under_load(&[
            pass(0.60, 140.0, 0.06, 20e-6, 0.5),
            pass(0.01, 126.0, 1e-4, 20e-6, 0.5),
        ]);
        assert!(
            (x - 20e-6).abs() < 1e-9 && (y - 0.5).abs() < 1e-9,
            "{x} {y}"
        );
    }

    #[test]
    fn a_negative_part_is_none_and_the_other_fits_both_passes() {
        // The small pass faster than its clock: no latency added; bytes alone explain the rest.
        let (x, y) = under_load(&[[0.69, 0.60, 140.0, 0.06], [0.009, 0.0100, 126.0, 1e-4]]);
        assert_eq!(x, 0.0);
        assert!(y > 1.0 && y < 2.0, "{y}");
        // Both passes faster than the clock: nothing added.
        assert_eq!(
            under_load(&[[0.5, 0.6, 140.0, 0.06], [0.009, 0.01, 126.0, 1e-4]]),
            (0.0, 0.0)
        );
    }
}
