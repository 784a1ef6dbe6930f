//! `hotspa profile`: calibrates the cost model on this machine's CPU backend with `N` thread
//! ranks running at once — GEMM rate against shape (peak and efficiency curve), attention rate,
//! memory bandwidth of elementwise kernels, the thread communicator's α–β — and writes it as a
//! cluster file that `hotspa plan` and `hotspa simulate --cluster` read.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use comm::{CommError, Communicator, ReduceOp, ThreadComm};
use kernels::{AttnShape, Backend, CpuBackend, GemmSpec};
use planner::{Cluster, Efficiency, Link};

#[derive(ClapArgs)]
pub struct Args {
    /// Thread ranks running at once (as `hotspa train --devices N` would).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Where to write the profile (TOML, the fields of a cluster).
    #[arg(long, default_value = "profile.toml")]
    out: PathBuf,
    /// Also time this model's forward and backward (every rank a DP replica, micro-batches of
    /// `--probe-tokens`) and its optimizer update, and scale the model to them.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens of the probe's micro-batch (sequences of 256).
    #[arg(long, default_value_t = 1024)]
    probe_tokens: usize,
}

/// The probe's measurements on one rank: (pass seconds, optimizer seconds, parameters).
type Probe = (f64, f64, usize);

/// Times `cfg`'s forward and backward and its optimizer update on this rank as a DP replica.
fn probe(
    c: &dyn Communicator,
    be: &CpuBackend,
    cfg: &model::LlamaConfig,
    tokens: usize,
) -> Result<Probe, CommError> {
    let err = |e: String| CommError::Unavailable(format!("probe: {e}"));
    let n = c.size();
    let strategy = graph::Strategy::parse(&format!("dp{n}"), n).map_err(|e| err(e.to_string()))?;
    let exec = model::rank_exec(cfg, &strategy, c.rank().0).map_err(|e| err(e.to_string()))?;
    let weights = model::Weights::random(cfg, 1);
    let rp = model::rank_params(cfg, &exec, &weights, 0).map_err(|e| err(e.to_string()))?;
    let params: Vec<Vec<f32>> = rp.params;
    let numel: usize = params.iter().map(Vec::len).sum();
    let seqs: Vec<Vec<u32>> = (0..tokens.div_ceil(256))
        .map(|k| {
            (0..256)
                .map(|i| ((i * 7 + k * 13) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let mb =
        runtime::MicroBatch::pack(&seqs, 1.0 / tokens as f32).map_err(|e| err(e.to_string()))?;
    let mut pass_s = Vec::new();
    let mut grads = None;
    for _ in 0..3 {
        c.barrier()?;
        let t0 = Instant::now();
        let out = runtime::run(be, &exec.graph, &params, &mb).map_err(|e| err(e.to_string()))?;
        pass_s.push(t0.elapsed().as_secs_f64());
        grads = Some(out.grads);
    }
    pass_s.sort_by(f64::total_cmp);
    let mut groups = runtime::RankGroups::new(c, &strategy).map_err(|e| err(e.to_string()))?;
    let adamw = kernels::AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt =
        runtime::Optimizer::new(be, &exec, &groups, params.clone(), &rp.shared, adamw, 1.0)
            .map_err(|e| err(e.to_string()))?;
    let grads = grads.unwrap_or_default();
    let mut opt_s = Vec::new();
    for _ in 0..3 {
        c.barrier()?;
        let t0 = Instant::now();
        opt.update(be, &mut groups, grads.clone(), 1e-4)
            .map_err(|e| err(e.to_string()))?;
        opt_s.push(t0.elapsed().as_secs_f64());
    }
    opt_s.sort_by(f64::total_cmp);
    Ok((pass_s[1], opt_s[1], numel))
}

/// Token counts and weight widths of the linear layers timed (the other dim 256).
const TOKENS: [usize; 4] = [16, 64, 256, 1024];
const WIDTHS: [usize; 3] = [16, 64, 256];
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
    /// `(tokens, width, FLOP/s)`.
    gemm: Vec<(usize, usize, f64)>,
    attention: f64,
    memory_gbps: f64,
    /// AdamW updates per second.
    adamw: f64,
    /// All-reduce seconds of 1 Ki and 1 Mi floats.
    all_reduce: (f64, f64),
}

fn measure(c: &dyn Communicator, be: &CpuBackend) -> Result<Rates, CommError> {
    let mut gemm = Vec::new();
    // A linear layer's three GEMMs in training, as the executor calls them: forward
    // y = x·wᵀ, dx = dy·w, dw = dyᵀ·x (x [m, K], w [n, K]).
    // Each call takes the next of several buffer sets (32 MiB in all per rank), so that, as in
    // training, the operands come from memory rather than a warm cache.
    for &m in &TOKENS {
        for &n in &WIDTHS {
            let per_set = 4 * (2 * m * K + 2 * n * K + 2 * m * n);
            let count = ((32usize << 20) / per_set).clamp(1, 64);
            let sets: Vec<[Vec<f32>; 6]> = (0..count)
                .map(|_| {
                    [
                        vec![0.5f32; m * K],
                        vec![0.25f32; n * K],
                        vec![0.125f32; m * n],
                        vec![0.0f32; m * n],
                        vec![0.0f32; m * K],
                        vec![0.0f32; n * K],
                    ]
                })
                .collect();
            let mut sets = sets;
            let mut next = 0;
            c.barrier()?;
            let t = time(|| {
                let [x, w, dy, y, dx, dw] = &mut sets[next % count];
                next += 1;
                be.gemm(&GemmSpec::new(m, n, K).trans(false, true), x, w, y)?;
                be.gemm(&GemmSpec::new(m, K, n), dy, w, dx)?;
                be.gemm(&GemmSpec::new(n, K, m).trans(true, false), dy, x, dw)
            })?;
            gemm.push((m, n, 3.0 * 2.0 * (m * n * K) as f64 / t));
        }
    }
    // Attention of one 512-token sequence, 4 heads of 32, forward and backward.
    let (len, heads, hd) = (512usize, 4usize, 32usize);
    let shape = AttnShape {
        heads,
        kv_heads: heads,
        head_dim: hd,
    };
    let x = vec![0.1f32; len * heads * hd];
    let (mut o, mut lse) = (vec![0.0f32; x.len()], vec![0.0f32; len * heads]);
    let (mut dq, mut dk, mut dv) = (x.clone(), x.clone(), x.clone());
    let cu = [0, len];
    let scale = 1.0 / (hd as f32).sqrt();
    c.barrier()?;
    let t = time(|| {
        be.attention_forward(&x, &x, &x, &cu, shape, scale, &mut o, &mut lse)?;
        be.attention_backward(
            &x, &x, &x, &x, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
        )
    })?;
    // Causal: half the square; forward + backward ≈ 3 × forward of 4·L²·(heads·hd).
    let attention = 3.0 * 2.0 * (len * len * heads * hd) as f64 / t;
    // Elementwise: y += a·x over 4 Mi floats reads two and writes one.
    let n = 1 << 22;
    let xs = vec![1.0f32; n];
    let mut ys = vec![0.0f32; n];
    c.barrier()?;
    let t = time(|| be.axpy(0.5, &xs, &mut ys))?;
    let memory_gbps = 3.0 * 4.0 * n as f64 / t / 1e9;
    let cfg = kernels::AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
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
    })
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

pub fn run(args: Args) -> Result<()> {
    let n = args.devices;
    anyhow::ensure!(n >= 1, "--devices must be at least 1");
    eprintln!("profiling the CPU backend with {n} thread ranks at once…");
    let cfg = match &args.model {
        Some(p) => Some(model::LlamaConfig::load(p)?),
        None => None,
    };
    let tokens = args.probe_tokens.max(2);
    let cfg2 = cfg.clone();
    let mut rates = ThreadComm::run(n, move |c| -> Result<(Rates, Option<Probe>), CommError> {
        let be = CpuBackend::for_ranks(n).map_err(|e| CommError::Unavailable(e.to_string()))?;
        let rates = measure(&c, &be)?;
        let probed = match &cfg2 {
            Some(cfg) => Some(probe(&c, &be, cfg, tokens)?),
            None => None,
        };
        Ok((rates, probed))
    })?;
    // Rank 0 reports (every rank measured at once; the slowest is in the collective timings).
    let (r, probed) = rates.swap_remove(0);
    let r = &r;
    let peak = r.gemm.iter().map(|g| g.2).fold(0.0, f64::max);
    let (max, half_tokens, half_width) = fit(&r.gemm, peak);
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
    let cluster = Cluster {
        name: format!("this machine as {n} thread ranks"),
        nodes: 1,
        devices_per_node: n,
        // The asymptotic GEMM rate (large shapes) is the peak; efficiency 1 there.
        peak_tflops: peak * max / 1e12,
        efficiency: Efficiency {
            max: 1.0,
            half_tokens,
            half_width,
            attention: r.attention / (peak * max),
        },
        memory_gib: mem_total / n as f64,
        same_node: link,
        cross_node: link,
        elem_bytes: 4.0,
        memory_gbps: r.memory_gbps,
        optimizer_gparams: r.adamw / 1e9,
        shared_cores: std::thread::available_parallelism().map_or(1, |c| c.get()) as f64,
        compute_scale: 1.0,
    };
    let mut cluster = cluster;
    if let (Some(cfg), Some((pass_s, opt_s, numel))) = (&cfg, probed) {
        let cost = planner::CostModel::new(cluster.clone(), cfg.clone());
        let s = graph::Strategy::parse(&format!("dp{n}"), n)?;
        let lens = vec![256usize; tokens.div_ceil(256)];
        let (c, _, e) = cost.micro_batch_unscaled(&s, &lens);
        cluster.compute_scale = pass_s / (c + e);
        cluster.optimizer_gparams = numel as f64 / opt_s / 1e9;
        eprintln!(
            "probe: forward+backward of {} tokens {pass_s:.4} s (kernel rates say {:.4} s: scale {:.3}); optimizer {opt_s:.4} s for {numel} parameters",
            lens.len() * 256,
            c + e,
            cluster.compute_scale
        );
    }
    let text = toml_text(&cluster);
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    println!("# GEMM GFLOP/s per rank measured (tokens × width, k = {K}) and as fitted:");
    for &(t, w, rate) in &r.gemm {
        println!(
            "#   {t:>5} × {w:>4}: {:>7.2} measured, {:>7.2} model",
            rate / 1e9,
            cluster.peak_tflops * 1e3 * cluster.gemm_efficiency(t as f64, w as f64)
        );
    }
    eprintln!("profile written to {}", args.out.display());
    Ok(())
}

/// The cluster as TOML (the format `planner::Cluster` deserialises).
fn toml_text(c: &Cluster) -> String {
    let e = &c.efficiency;
    format!(
        "name = \"{}\"\nnodes = {}\ndevices_per_node = {}\npeak_tflops = {:.6}\nmemory_gib = {:.3}\n\
         elem_bytes = {}\nmemory_gbps = {:.3}\noptimizer_gparams = {:.5}\nshared_cores = {}\ncompute_scale = {:.4}\n\n[efficiency]\nmax = {:.4}\nhalf_tokens = {}\n\
         half_width = {}\nattention = {:.4}\n\n[same_node]\ngbps = {:.4}\nlatency_us = {:.2}\n\n\
         [cross_node]\ngbps = {:.4}\nlatency_us = {:.2}\n",
        c.name,
        c.nodes,
        c.devices_per_node,
        c.peak_tflops,
        c.memory_gib,
        c.elem_bytes,
        c.memory_gbps,
        c.optimizer_gparams,
        c.shared_cores,
        c.compute_scale,
        e.max,
        e.half_tokens,
        e.half_width,
        e.attention,
        c.same_node.gbps,
        c.same_node.latency_us,
        c.cross_node.gbps,
        c.cross_node.latency_us
    )
}
