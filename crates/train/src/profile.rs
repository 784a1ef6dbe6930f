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

mod probe;

use probe::{
    dp_steps, handoff, probe, probe_len, slowest, solve, tp_probe, under_load, Mode, Probe,
};
use probe::{PP_PROBE_MICRO_BATCHES, PROBE_ADAMW, SMALL, TP_PROBE};

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
        ar[k] = slowest(c, t0.elapsed().as_secs_f64() / f64::from(reps))?;
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
    let (mut all, mut lent) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        c.barrier()?;
        all = all.min(slowest(c, work()?)?);
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
        lent = lent.min(slowest(c, t)?);
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
    let link = Link::new(1.0 / per_byte / 1e9, alpha * 1e6);
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
        if let (Some(measured), true) = (probed.pipeline, cluster.oversubscribed()) {
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
    use super::{probe::Probe, Rates};

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
}
