//! Calibrating the cost model on this machine's CPU backend with `N` thread ranks running at
//! once — GEMM rate against shape (peak, efficiency curve and a measured table), attention
//! rate, memory bandwidth of elementwise kernels, AdamW, the thread communicator's α–β — and,
//! with a model, its real training steps as DP replicas and a TP pass, which scale the model to
//! what the kernel rates leave out (`hotspa profile` writes the result as a cluster file).

use std::time::Instant;

use comm::{CommError, Communicator, Rank, ReduceOp, ThreadComm};
use kernels::{AttnShape, Backend, CpuBackend, GemmSpec};
use planner::{Cluster, Efficiency, Link};

use crate::error::TrainError;

type Result<T, E = TrainError> = std::result::Result<T, E>;
use crate::metrics::Sink;

/// The probe's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Probe {
    /// DP training step seconds with `--probe-tokens` and with one sequence per rank.
    steps: [f64; 2],
    /// The same two sizes' forward and backward with every rank alone ([`Mode::PassAlone`]).
    passes: [f64; 2],
    /// Optimizer seconds.
    update_s: f64,
    /// Parameters of a rank.
    numel: usize,
    /// A pipeline pass over every rank ([`pp_probe`]), where the model has a layer per rank.
    pipeline: Option<f64>,
}

impl Probe {
    /// Each figure the smaller of `self`'s and `other`'s (two rounds of the same probe).
    fn fastest(self, other: Probe) -> Probe {
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
const TP_PROBE: usize = 4;

/// The update the probes time (the default run's settings; the values do not change the time).
const PROBE_ADAMW: kernels::AdamW = kernels::AdamW {
    lr: 1e-4,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
    freeze_variance_after: None,
};

/// Tokens of the small probe step (one sequence): almost all of its time is the kernels'
/// overhead, communication and the update, so it pins the overhead per kernel down.
const SMALL: usize = 16;

/// The probe's sequence length for micro-batches of `tokens`: 512, or the model's longest if
/// shorter, and at most half of `tokens` (so that the smaller probe step is smaller).
fn probe_len(cfg: &model::LlamaConfig, tokens: usize) -> usize {
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
enum Mode {
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
fn dp_steps<B: kernels::Backend<Buffer = Vec<f32>>>(
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
    let slowest = |t: f64| -> Result<f64, CommError> {
        let mut v = [t as f32];
        world.all_reduce(&mut v, ReduceOp::Max)?;
        Ok(f64::from(v[0]))
    };
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
            step_s.push(slowest(total)?);
            opt_s.push(slowest(update)?);
        }
    }
    Ok((step_s, opt_s, numel))
}

/// `cfg`'s forward and backward under TP over every rank (one micro-batch of `tokens`, as
/// [`probe`]'s), each figure the slowest rank's: `[measured seconds (the fastest of 5 passes),
/// the simulator's clock on `cluster`, the messages the clock charges (its clock with every
/// link's latency 1 ms longer, less the clock, in ms), the seconds it spends moving bytes (its
/// clock with every link half as fast, less the clock)]`. What the measured time has beyond the
/// clock is spent on the messages and their bytes ([`under_load`]).
fn tp_probe(
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
    // One pass on `be` over `world`'s TP group.
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
    let slowest = |t: f64| -> Result<f64, CommError> {
        let mut v = [t as f32];
        c.all_reduce(&mut v, ReduceOp::Max)?;
        Ok(f64::from(v[0]))
    };
    pass(be, c, &strategy, &exec, &rp, &mbs).map_err(err)?;
    let mut measured = Vec::new();
    for _ in 0..5 {
        c.barrier()?;
        let t0 = Instant::now();
        pass(be, c, &strategy, &exec, &rp, &mbs).map_err(err)?;
        measured.push(slowest(t0.elapsed().as_secs_f64())?);
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
        clocked[i] = slowest(clock.now())?;
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
fn under_load(passes: &[[f64; 4]; 2]) -> (f64, f64) {
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
fn probe(
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
const PP_PROBE_MICRO_BATCHES: usize = 2;

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
        let mut groups = runtime::RankGroups::new(c, &strategy).map_err(|e| err(e.to_string()))?;
        let schedule = graph::Schedule::OneFOneB;
        runtime::pipeline_step(
            be,
            &exec,
            &mut groups,
            &rp.params,
            &rp.shared,
            &mbs,
            schedule,
        )
        .map_err(|e| err(e.to_string()))?;
        let mut v = [t0.elapsed().as_secs_f64() as f32];
        c.all_reduce(&mut v, ReduceOp::Max)?;
        // The first pass warms up.
        if k > 0 {
            best = best.min(f64::from(v[0]));
        }
    }
    Ok(Some(best))
}

/// The wait for a core per stage-boundary message (µs) with which the cost model on `cluster`
/// gives [`pp_probe`]'s pass its `measured` seconds, and the cost model's seconds without it.
/// The model grows with the wait, nearly linearly: two secant steps from 0 and 1 ms.
fn handoff(
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
fn solve(rows: &[[f64; 3]; 2], measured: &[f64; 2]) -> (f64, f64) {
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

/// The dims of the GEMM grid: every ascending triple of them is timed as a linear layer of
/// (the largest) tokens, (the smallest) width and (the middle) input dim.
const DIMS: [usize; 4] = [16, 64, 256, 1024];
/// The input dim of the points the efficiency curve is fitted to.
const K: usize = 256;

/// Seconds per call of `f`, repeated for at least 60 ms (median of 5 such runs: ranks share
/// the cores, so single runs are noisy).
fn time(mut f: impl FnMut() -> Result<(), kernels::KernelError>) -> Result<f64, CommError> {
    let err = |e: kernels::KernelError| CommError::Unavailable(e.to_string());
    f().map_err(err)?;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let (t0, mut n) = (Instant::now(), 0u32);
        while t0.elapsed().as_secs_f64() < 0.06 {
            f().map_err(err)?;
            n += 1;
        }
        runs.push(t0.elapsed().as_secs_f64() / f64::from(n));
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[2])
}

/// What one rank measures while every rank does the same.
struct Rates {
    /// `([d0, d1, d2] ascending, FLOP/s)`.
    gemm: Vec<([usize; 3], f64)>,
    /// `(sequence length, FLOP/s)`.
    attention: Vec<(usize, f64)>,
    memory_gbps: f64,
    /// AdamW updates per second.
    adamw: f64,
    /// All-reduce seconds of 1 Ki and 1 Mi floats.
    all_reduce: (f64, f64),
    /// How much faster half the ranks compute while the others wait ([`lending`]).
    lending: f64,
}

impl Rates {
    /// Each rate the higher, each time the lower of `self`'s and `other`'s (two rounds of
    /// [`measure`], the same shapes in the same order).
    fn fastest(self, other: Rates) -> Rates {
        let zip_max = |a: Vec<(usize, f64)>, b: Vec<(usize, f64)>| {
            a.into_iter()
                .zip(b)
                .map(|((k, x), (_, y))| (k, x.max(y)))
                .collect()
        };
        Rates {
            gemm: self
                .gemm
                .into_iter()
                .zip(other.gemm)
                .map(|((d, x), (_, y))| (d, x.max(y)))
                .collect(),
            attention: zip_max(self.attention, other.attention),
            memory_gbps: self.memory_gbps.max(other.memory_gbps),
            adamw: self.adamw.max(other.adamw),
            all_reduce: (
                self.all_reduce.0.min(other.all_reduce.0),
                self.all_reduce.1.min(other.all_reduce.1),
            ),
            lending: self.lending.max(other.lending),
        }
    }
}

fn measure(
    c: &dyn Communicator,
    be: &CpuBackend,
    cfg: Option<&model::LlamaConfig>,
) -> Result<Rates, CommError> {
    let mut gemm = Vec::new();
    // A linear layer's three GEMMs in training, as the executor calls them: forward
    // y = x·wᵀ, dx = dy·w, dw = dyᵀ·x (x [m, k], w [n, k]).
    // Each call takes the next of several buffer sets (32 MiB in all per rank), so that, as in
    // training, the operands come from memory rather than a warm cache.
    for (ia, &a) in DIMS.iter().enumerate() {
        for (ib, &b) in DIMS.iter().enumerate().skip(ia) {
            for &cc in &DIMS[ib..] {
                let (m, n, k) = (cc, a, b);
                let per_set = 4 * (2 * m * k + 2 * n * k + 2 * m * n);
                let count = ((32usize << 20) / per_set).clamp(1, 64);
                let mut sets: Vec<[Vec<f32>; 6]> = (0..count)
                    .map(|_| {
                        [
                            vec![0.5f32; m * k],
                            vec![0.25f32; n * k],
                            vec![0.125f32; m * n],
                            vec![0.0f32; m * n],
                            vec![0.0f32; m * k],
                            vec![0.0f32; n * k],
                        ]
                    })
                    .collect();
                let mut next = 0;
                c.barrier()?;
                let t = time(|| {
                    let [x, w, dy, y, dx, dw] = &mut sets[next % count];
                    next += 1;
                    be.gemm(&GemmSpec::new(m, n, k).trans(false, true), x, w, y)?;
                    be.gemm(&GemmSpec::new(m, k, n), dy, w, dx)?;
                    be.gemm(&GemmSpec::new(n, k, m).trans(true, false), dy, x, dw)
                })?;
                gemm.push(([a, b, cc], 3.0 * 2.0 * (m * n * k) as f64 / t));
            }
        }
    }
    // Attention of one sequence, forward and backward, at lengths 64, 256 and 1024 (up to the
    // model's longest): the model's heads (4 of 32 without one).
    let (longest, shape) = match cfg {
        Some(cfg) => (
            cfg.max_position_embeddings.clamp(2, 1024),
            AttnShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.kv_heads(),
                head_dim: cfg.head_dim(),
            },
        ),
        None => (
            1024,
            AttnShape {
                heads: 4,
                kv_heads: 4,
                head_dim: 32,
            },
        ),
    };
    let mut lens: Vec<usize> = [64, 256, 1024]
        .into_iter()
        .filter(|&l| l < longest)
        .collect();
    lens.push(longest);
    let mut attention = Vec::new();
    for len in lens {
        let (heads, hd) = (shape.heads, shape.head_dim);
        let x = vec![0.1f32; len * heads * hd];
        let kv = vec![0.1f32; len * shape.kv_heads * hd];
        let (mut o, mut lse) = (vec![0.0f32; x.len()], vec![0.0f32; len * heads]);
        let (mut dq, mut dk, mut dv) = (x.clone(), kv.clone(), kv.clone());
        let cu = [0, len];
        let scale = 1.0 / (hd as f32).sqrt();
        c.barrier()?;
        let t = time(|| {
            be.attention_forward(&x, &kv, &kv, &cu, shape, scale, &mut o, &mut lse)?;
            be.attention_backward(
                &x, &x, &kv, &kv, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
            )
        })?;
        // Causal: half the square; forward + backward ≈ 3 × forward of 4·L²·(heads·hd).
        attention.push((len, 3.0 * 2.0 * (len * len * heads * hd) as f64 / t));
    }
    // Elementwise: y += a·x over 4 Mi floats reads two and writes one.
    let n = 1 << 22;
    let xs = vec![1.0f32; n];
    let mut ys = vec![0.0f32; n];
    c.barrier()?;
    let t = time(|| be.axpy(0.5, &xs, &mut ys))?;
    let memory_gbps = 3.0 * 4.0 * n as f64 / t / 1e9;
    let cfg = PROBE_ADAMW;
    let (mut p, g, mut m1, mut m2) = (
        vec![0.1f32; n],
        vec![0.01f32; n],
        vec![0.0f32; n],
        vec![0.0f32; n],
    );
    c.barrier()?;
    let mut step = 0;
    let t = time(|| {
        step += 1;
        be.adamw(&cfg, step, &mut p, &g, &mut m1, &mut m2)
    })?;
    let adamw = n as f64 / t;
    let mut ar = [0.0f64; 2];
    for (k, len) in [1usize << 10, 1 << 20].into_iter().enumerate() {
        let mut buf = vec![1.0f32; len];
        c.barrier()?;
        let (t0, reps) = (Instant::now(), if k == 0 { 200 } else { 10 });
        for _ in 0..reps {
            c.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        let mut dt = [(t0.elapsed().as_secs_f64() / f64::from(reps)) as f32];
        c.all_reduce(&mut dt, ReduceOp::Max)?;
        ar[k] = f64::from(dt[0]);
    }
    Ok(Rates {
        gemm,
        attention,
        memory_gbps,
        adamw,
        all_reduce: (ar[0], ar[1]),
        lending: lending(c, be)?,
    })
}

/// How much faster the first half of the ranks compute (the same GEMMs; the slowest rank,
/// the fastest of 3 tries) while the others wait in a receive than while every rank
/// computes; 1 for one rank.
fn lending(c: &dyn Communicator, be: &CpuBackend) -> Result<f64, CommError> {
    let (n, me) = (c.size(), c.rank().0);
    let half = n / 2;
    if half == 0 {
        return Ok(1.0);
    }
    let err = |e: kernels::KernelError| CommError::Unavailable(e.to_string());
    // A linear layer's forward of 1024 tokens, 256 × 256, 32 times: about 50 ms for a rank
    // alone on a core of this machine, long beside the scheduler's time slices (with 8 the
    // first ranks to get a core finished before the others started).
    let (m, w, k) = (1024, 256, 256);
    let (x, wt, mut y) = (
        vec![0.5f32; m * k],
        vec![0.25f32; w * k],
        vec![0.0f32; m * w],
    );
    let spec = GemmSpec::new(m, w, k).trans(false, true);
    let mut work = || -> Result<f64, CommError> {
        let t0 = Instant::now();
        for _ in 0..32 {
            be.gemm(&spec, &x, &wt, &mut y).map_err(err)?;
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let slowest = |t: f64| -> Result<f64, CommError> {
        let mut v = [t as f32];
        c.all_reduce(&mut v, ReduceOp::Max)?;
        Ok(f64::from(v[0]))
    };
    let (mut all, mut lent) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        c.barrier()?;
        all = all.min(slowest(work()?)?);
        c.barrier()?;
        let t = if me < half {
            let t = work()?;
            for waiter in (half..n).filter(|w| w % half == me) {
                c.send(&[0.0], Rank(waiter), comm::tags::SCRATCH)?;
            }
            t
        } else {
            c.recv(&mut [0.0], Rank(me % half), comm::tags::SCRATCH)?;
            0.0
        };
        lent = lent.min(slowest(t)?);
    }
    Ok(all / lent.max(1e-12))
}

/// Least squares in log space of `rate = peak · max · t/(t+ht) · w/(w+hw)` over a grid of
/// half-points; returns `(max, half_tokens, half_width)` for `peak` the best rate seen.
fn fit(gemm: &[(usize, usize, f64)], peak: f64) -> (f64, f64, f64) {
    let grid: Vec<f64> = (0..12).map(|i| 2f64.powi(i)).collect();
    let mut best = (f64::INFINITY, 1.0, 1.0, 1.0);
    for &ht in &grid {
        for &hw in &grid {
            let shape = |t: f64, w: f64| t / (t + ht) * w / (w + hw);
            let logs: Vec<f64> = gemm
                .iter()
                .map(|&(t, w, r)| (r / peak).ln() - shape(t as f64, w as f64).ln())
                .collect();
            let log_max = logs.iter().sum::<f64>() / logs.len() as f64;
            let err: f64 = logs.iter().map(|l| (l - log_max).powi(2)).sum();
            if err < best.0 {
                best = (err, log_max.exp(), ht, hw);
            }
        }
    }
    (best.1, best.2, best.3)
}

/// What [`profile`] found: the cluster file's contents, and every GEMM shape's rate.
#[derive(Debug, Clone)]
pub struct Profile {
    /// This machine as a cluster of `devices` ranks.
    pub cluster: Cluster,
    /// Every timed linear layer: its dims `[width, input dim, tokens]` and FLOP/s per rank.
    pub gemm: Vec<([usize; 3], f64)>,
}

/// The input dim at which the efficiency curve is fitted (for reports beside the table).
pub const CURVE_INPUT_DIM: usize = K;

/// Calibrates the cost model on this machine's CPU backend with `devices` thread ranks running
/// at once; with a model, also times its training steps (micro-batches of `probe_tokens`) and
/// its TP pass, and scales the model to them. Every measurement is taken `rounds` times, one
/// round of all of them after the other, and the fastest of each kept: on a machine whose
/// speed drifts over seconds (a virtual one, or a shared one), a slow spell then spoils one
/// round of a measurement, not the profile. Progress goes to `sink`.
pub fn profile(
    devices: usize,
    cfg: Option<&model::LlamaConfig>,
    probe_tokens: usize,
    rounds: usize,
    sink: &mut dyn Sink,
) -> Result<Profile> {
    let n = devices;
    if n == 0 {
        return Err(TrainError::setting("devices", "must be at least 1"));
    }
    if rounds == 0 {
        return Err(TrainError::setting("rounds", "must be at least 1"));
    }
    sink.notice(&format!(
        "profiling the CPU backend with {n} thread ranks at once…"
    ));
    let cfg = cfg.cloned();
    let tokens = probe_tokens.max(2);
    let cfg2 = cfg.clone();
    let mut rates = ThreadComm::run(
        n,
        move |c| -> Result<(Rates, Option<Probe>, Vec<f64>), CommError> {
            let be = CpuBackend::for_ranks(n).map_err(|e| CommError::Unavailable(e.to_string()))?;
            let (mut best, mut spread): (Option<(Rates, Option<Probe>)>, Vec<f64>) = (None, vec![]);
            for _ in 0..rounds {
                let rates = measure(&c, &be, cfg2.as_ref())?;
                let probed = match &cfg2 {
                    Some(cfg) => Some(probe(&c, &be, cfg, tokens)?),
                    None => None,
                };
                spread.push(probed.map_or(rates.all_reduce.1, |p| p.steps[0]));
                best = Some(match best {
                    None => (rates, probed),
                    Some((r, p)) => (r.fastest(rates), p.zip(probed).map(|(a, b)| a.fastest(b))),
                });
            }
            // `rounds` ≥ 1 (checked above).
            let (r, p) =
                best.ok_or_else(|| CommError::Unavailable("profile: no round ran".into()))?;
            Ok((r, p, spread))
        },
    )?;
    // Rank 0 reports (every rank measured at once; the slowest is in the collective timings).
    let (r, probed, spread) = rates.swap_remove(0);
    if rounds > 1 {
        let what = if probed.is_some() {
            "the DP step"
        } else {
            "the all-reduce of 1 Mi floats"
        };
        sink.notice(&format!(
            "the fastest of {rounds} rounds of every measurement kept ({what} took {} s)",
            spread
                .iter()
                .map(|t| format!("{t:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let r = &r;
    let peak = r.gemm.iter().map(|g| g.1).fold(0.0, f64::max);
    // The curve (tokens × width at input dim K) for reading; the table is what is used.
    let curve: Vec<(usize, usize, f64)> = r
        .gemm
        .iter()
        .filter(|(d, _)| d[1] == K)
        .map(|&(d, rate)| (d[2], d[0], rate))
        .collect();
    let (max, half_tokens, half_width) = fit(&curve, peak);
    // α–β of the ring all-reduce: t = 2(n−1)·α + 2(n−1)/n · bytes/β.
    let (t_small, t_big) = r.all_reduce;
    let k = 2.0 * (n.max(2) - 1) as f64;
    let bytes = |len: f64| k / n.max(2) as f64 * len * 4.0;
    let per_byte =
        ((t_big - t_small) / (bytes((1 << 20) as f64) - bytes((1 << 10) as f64))).max(1e-12);
    let alpha = ((t_small - per_byte * bytes((1 << 10) as f64)) / k).max(0.0);
    let link = Link {
        gbps: 1.0 / per_byte / 1e9,
        latency_us: alpha * 1e6,
    };
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(16.0, |kb| kb / (1u64 << 20) as f64);
    // The asymptotic GEMM rate (large shapes) is the peak; efficiency 1 there.
    let base = Cluster::new(
        format!("this machine as {n} thread ranks"),
        1,
        n,
        peak * max / 1e12,
        mem_total / n as f64,
        link,
        link,
    );
    // With half the ranks waiting the others could compute `ideal` times faster (the rates
    // were measured with every rank busy); the share of that they got is the lending.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let ideal = n as f64 / ((n / 2) as f64).max(cores);
    let lending = if ideal > 1.0 + 1e-9 {
        ((r.lending - 1.0) / (ideal - 1.0)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    if ideal > 1.0 + 1e-9 {
        sink.notice(&format!(
            "with half the ranks waiting in a receive the others computed {:.2}× as fast, of {ideal:.2}× if the waiting ranks freed their cores: lending {lending:.2}",
            r.lending
        ));
    }
    let cluster = Cluster {
        efficiency: Efficiency {
            max: 1.0,
            half_tokens,
            half_width,
            attention: r.attention.last().map_or(0.0, |a| a.1) / (peak * max),
        },
        elem_bytes: 4.0,
        memory_gbps: r.memory_gbps,
        optimizer_gparams: r.adamw / 1e9,
        shared_cores: cores,
        lending,
        gemm_table: r
            .gemm
            .iter()
            .map(|&(d, rate)| [d[0] as f64, d[1] as f64, d[2] as f64, rate / 1e12])
            .collect(),
        attention_table: r
            .attention
            .iter()
            .map(|&(len, rate)| [len as f64, rate / 1e12])
            .collect(),
        ..base
    };
    let mut cluster = cluster;
    if let (Some(cfg), Some(probed)) = (&cfg, probed) {
        let (steps, passes) = (probed.steps, probed.passes);
        cluster.optimizer_gparams = probed.numel as f64 / probed.update_s / 1e9;
        let len = probe_len(cfg, tokens);
        let sizes = [tokens.div_ceil(len) * len, SMALL];
        // The simulator's clock: the same steps clocked at scale 1 and no overhead per kernel;
        // the measured steps beyond their clocked communication and update are
        // `scale × clocked compute + overhead × kernels`, solved over the two sizes. Then the
        // TP probe, with them.
        let (cl, cfg2) = (cluster.clone(), cfg.clone());
        let share = sim::CoreShare::lending(n, cluster.shared_cores, cluster.lending);
        let got = ThreadComm::run(n, move |c| -> Result<_, CommError> {
            let be = CpuBackend::for_ranks(n).map_err(|e| CommError::Unavailable(e.to_string()))?;
            // `[scaled, rest, kernels]` of `mode` at `size` tokens in sequences of `seq` on
            // the clock (the small size is one sequence of SMALL tokens, as [`probe`]
            // measured it).
            let clocked = |mode: Mode, size: usize, seq: usize| -> Result<[f64; 3], CommError> {
                let clock = sim::Clock::new();
                let sb = sim::SimBackend::with_scale(be.clone(), &cl, clock.clone(), 1.0)
                    .sharing(share.clone());
                let sc = sim::SimComm::over(&c, &cl, clock.clone())?.sharing(share.clone());
                let mut at = sim::ClockReading::default();
                dp_steps(&sb, &sc, mode, &cfg2, size, seq, 1, |k| {
                    if k == 1 {
                        at = clock.read();
                    }
                })?;
                let d = clock.read().since(&at);
                let scaled = d.phase(sim::Phase::Compute) + d.phase(sim::Phase::Elementwise);
                let mut v = [scaled as f32, (d.now - scaled) as f32, d.kernels as f32];
                c.all_reduce(&mut v, ReduceOp::Max)?;
                Ok(v.map(f64::from))
            };
            let alone = [
                clocked(Mode::PassAlone, sizes[0], len)?,
                clocked(Mode::PassAlone, SMALL, SMALL)?,
            ];
            // The overhead from the passes alone; the clock's scale then from the DP step of
            // `--probe-tokens` (what runs pay: the exchange overlapped, the update).
            let (_, overhead) = solve(&alone, &passes);
            let [scaled, rest, kernels] = clocked(Mode::Training, sizes[0], len)?;
            let scale = ((steps[0] - rest - overhead * kernels) / scaled.max(1e-12)).max(0.1);
            let mut cl = cl.clone();
            cl.clock_scale = scale;
            cl.kernel_overhead_us = overhead * 1e6;
            let tp = if n >= 2 {
                // Each size's fastest round (the clock's figures of that round with it).
                let mut passes: Option<[[f64; 4]; 2]> = None;
                let mut round = || -> Result<(), CommError> {
                    let got = [
                        tp_probe(&c, &be, &share, &cl, &cfg2, TP_PROBE * tokens)?,
                        tp_probe(&c, &be, &share, &cl, &cfg2, SMALL)?,
                    ];
                    let best = passes.get_or_insert(got);
                    for (b, g) in best.iter_mut().zip(got) {
                        if g[0] < b[0] {
                            *b = g;
                        }
                    }
                    Ok(())
                };
                Some((0..rounds).try_for_each(|_| round()).and_then(|()| {
                    passes.ok_or_else(|| CommError::Unavailable("TP probe: no round ran".into()))
                }))
            } else {
                None
            };
            Ok((cl, tp))
        })?;
        let (cl, tp) = &got[0];
        cluster.clock_scale = cl.clock_scale;
        cluster.kernel_overhead_us = cl.kernel_overhead_us;
        // The cost model: the same overhead per kernel, its own scale on the larger step.
        let cost = planner::CostModel::new(
            Cluster {
                compute_scale: 1.0,
                kernel_overhead_us: 0.0,
                ..cluster.clone()
            },
            cfg.clone(),
        );
        let s = graph::Strategy::parse(&format!("dp{n}"), n)?;
        let b = cost.strategy(&s, &vec![len; n * sizes[0] / len], usize::MAX);
        let overhead = cost.kernels(&s) * cluster.kernel_overhead_us * 1e-6;
        let rest = b.dp_reduce + cost.optimizer(&s) + overhead;
        cluster.compute_scale = ((steps[0] - rest) / (b.compute + b.elementwise)).max(0.1);
        sink.notice(&format!(
            "probe: DP steps of {} and {} tokens per rank {:.4} s and {:.4} s, of which the update {:.4} s for {} parameters; passes alone {:.4} s and {:.4} s: overhead {:.1} µs per kernel, compute scale {:.3} (the simulator's clock {:.3})",
            sizes[0],
            sizes[1],
            steps[0],
            steps[1],
            probed.update_s,
            probed.numel,
            passes[0],
            passes[1],
            cluster.kernel_overhead_us,
            cluster.compute_scale,
            cluster.clock_scale
        ));
        // Messages between ranks that compute cost more than between idle ones (a blocked
        // thread waits for a core; a halted virtual CPU for its host; copies compete with
        // the kernels for memory): what two TP passes measure beyond the clock's estimate is
        // split between the messages' latency and their bytes. One size alone cannot tell
        // them apart, and a per-message charge fitted at one size under-prices the larger
        // messages of larger micro-batches (tp4 on the default model: 8 %, 22 % and 32 % under
        // at micro-batches of 512, 1024 and 4096 tokens, the measured step the same).
        match tp {
            Some(Ok(passes)) => {
                let (x, y) = under_load(passes);
                for link in [&mut cluster.same_node, &mut cluster.cross_node] {
                    link.latency_us += x * 1e6;
                    link.gbps /= 1.0 + y;
                }
                let [[m1, c1, n1, t1], [m2, c2, n2, t2]] = *passes;
                sink.notice(&format!(
                    "TP probes (tp{n}) of {} and {SMALL} tokens: {m1:.4} s and {m2:.4} s measured, {c1:.4} s and {c2:.4} s by the clock with {n1:.0} and {n2:.0} messages on the slowest rank moving bytes for {t1:.4} s and {t2:.4} s: under load each message {:.1} µs later and bytes {:.2}× slower (latency {:.1} µs, {:.2} GB/s)",
                    TP_PROBE * tokens,
                    x * 1e6,
                    1.0 + y,
                    cluster.same_node.latency_us,
                    cluster.same_node.gbps
                ));
            }
            Some(Err(e)) => sink.notice(&format!("TP probe skipped: {e}")),
            None => {}
        }
        if let (Some(measured), true) = (probed.pipeline, n as f64 > cluster.shared_cores) {
            let (h, predicted) = handoff(&cluster, cfg, n, len, measured)?;
            cluster.handoff_us = h;
            sink.notice(&format!(
                "pipeline probe (pp{n}, {} micro-batches of {len} tokens): {measured:.4} s measured, {predicted:.4} s by the cost model without a wait for a core: each stage-boundary message waits {h:.0} µs for one",
                PP_PROBE_MICRO_BATCHES * n
            ));
        }
    }
    Ok(Profile {
        cluster,
        gemm: r.gemm.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::{handoff, under_load, Probe, Rates, PP_PROBE_MICRO_BATCHES};
    use planner::{Cluster, Link};

    #[test]
    fn the_wait_for_a_core_is_the_one_that_gives_the_pipeline_probe_its_time() {
        let link = Link {
            gbps: 1.0,
            latency_us: 20.0,
        };
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

    #[test]
    fn rounds_keep_the_fastest_of_every_measurement() {
        let rates = |g: f64, t: f64| Rates {
            gemm: vec![([16, 16, 16], g), ([16, 16, 64], 2.0 * g)],
            attention: vec![(64, g)],
            memory_gbps: g,
            adamw: g,
            all_reduce: (t, 2.0 * t),
            lending: g,
        };
        let r = rates(1.0, 0.5).fastest(rates(0.5, 0.25));
        assert_eq!(r.gemm, vec![([16, 16, 16], 1.0), ([16, 16, 64], 2.0)]);
        assert_eq!(r.attention, vec![(64, 1.0)]);
        assert_eq!(
            (r.memory_gbps, r.adamw, r.all_reduce),
            (1.0, 1.0, (0.25, 0.5))
        );
        let probe = |a: f64, b: f64| Probe {
            steps: [a, b],
            passes: [b, a],
            update_s: b,
            numel: 7,
            pipeline: Some(a),
        };
        assert_eq!(
            probe(1.0, 0.1).fastest(probe(0.5, 0.2)),
            Probe {
                steps: [0.5, 0.1],
                passes: [0.1, 0.5],
                update_s: 0.1,
                numel: 7,
                pipeline: Some(0.5),
            }
        );
        // A round without the pipeline probe leaves the other's.
        let none = Probe {
            pipeline: None,
            ..probe(0.2, 0.2)
        };
        assert_eq!(none.fastest(probe(0.5, 0.2)).pipeline, Some(0.5));
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
