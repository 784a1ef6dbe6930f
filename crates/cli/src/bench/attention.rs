//! `hotspa bench attention`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm::{Communicator, ThreadComm};
use runtime::context::{CpAttention, CpExchange, CpSplit, Saved};
use runtime::RuntimeError;

use anyhow::Result;
use clap::Args as ClapArgs;
use kernels::{AttnShape, Backend, CpuBackend};
use serde::Serialize;

use super::machine::Machine;
use super::{emit, time_median};

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub(super) measure: super::Measure,
    /// Sequence lengths (one sequence each).
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 1024, 2048, 4096, 8192])]
    pub(super) tokens: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub(super) heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 8)]
    pub(super) kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub(super) head_dim: usize,
    /// Also time context-parallel attention over this many thread ranks (the tokens split
    /// front-and-back over them): ring and Ulysses, forward+backward, beside the single rank.
    #[arg(long)]
    pub(super) cp: Option<usize>,
}

impl Args {
    /// The head layout and the softmax scale `1/√head_dim`.
    pub(super) fn shape(&self) -> (AttnShape, f32) {
        let shape = AttnShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        (shape, 1.0 / (self.head_dim as f32).sqrt())
    }
}

/// FLOPs of causal attention forward + backward over one sequence of `t` tokens: the forward's
/// two GEMMs of T²/2·D per head, the backward 2.5× the forward.
pub(super) fn causal_flops(t: usize, shape: AttnShape) -> f64 {
    3.5 * 4.0 * (t as f64).powi(2) / 2.0 * (shape.head_dim * shape.heads) as f64
}

#[derive(Serialize)]
struct Row {
    tokens: usize,
    forward_ms: f64,
    backward_ms: f64,
    tokens_per_s: f64,
    gflops: f64,
    over_peak: f64,
    /// Forward+backward with `--cp`: ring attention, the slowest rank.
    ring_ms: Option<f64>,
    /// The same with Ulysses (`None` when the heads do not divide).
    ulysses_ms: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    threads: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cp: Option<usize>,
    rows: Vec<Row>,
}

/// One sequence of `t` tokens' queries, keys, values and output gradient (uniform in ±1).
pub(super) fn inputs(shape: AttnShape, t: usize) -> [Vec<f32>; 4] {
    let (qn, kn) = (t * shape.heads, t * shape.kv_heads);
    let u = |rows: usize, seed| kernels::conformance::uniform(rows * shape.head_dim, seed);
    [u(qn, 3), u(kn, 5), u(kn, 7), u(qn, 11)]
}

pub fn run(args: Args) -> Result<()> {
    if let Some(cp) = args.cp {
        anyhow::ensure!(cp >= 1, "--cp {cp}: give at least one rank");
    }
    let machine = Machine::detect(None);
    let threads = args.measure.threads.unwrap_or(machine.cores).max(1);
    let cpu = CpuBackend::new(threads)?;
    let (shape, scale) = args.shape();
    let budget = Duration::from_secs_f64(args.measure.seconds);
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let [q, k, v, dout] = inputs(shape, t);
        let (qn, kn) = (q.len(), k.len());
        let cu = [0, t];
        let (mut o, mut lse) = (vec![0f32; qn], vec![0f32; shape.heads * t]);
        let fwd = time_median(budget, 1, || {
            Ok(cpu.attention_forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut lse)?)
        })?;
        let (mut dq, mut dk, mut dv) = (vec![0f32; qn], vec![0f32; kn], vec![0f32; kn]);
        let bwd = time_median(budget, 1, || {
            Ok(cpu.attention_backward(
                &dout, &q, &k, &v, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
            )?)
        })?;
        let total = fwd.as_secs_f64() + bwd.as_secs_f64();
        let (mut ring_ms, mut ulysses_ms) = (None, None);
        if let Some(cp) = args.cp {
            let data = Arc::new([q.clone(), k.clone(), v.clone(), dout.clone()]);
            let time = |x| cp_seconds(cp, x, t, shape, &data, total, args.measure.seconds);
            ring_ms = Some(time(CpExchange::Ring)? * 1e3);
            if shape.heads.is_multiple_of(cp)
                && (shape.kv_heads.is_multiple_of(cp) || cp.is_multiple_of(shape.kv_heads))
            {
                ulysses_ms = Some(time(CpExchange::Ulysses)? * 1e3);
            }
        }
        let gflops = causal_flops(t, shape) / total / 1e9;
        rows.push(Row {
            tokens: t,
            forward_ms: fwd.as_secs_f64() * 1e3,
            backward_ms: bwd.as_secs_f64() * 1e3,
            tokens_per_s: t as f64 / total,
            gflops,
            over_peak: gflops / machine.peak_gflops,
            ring_ms,
            ulysses_ms,
        });
    }
    let report = Report {
        bench: "attention",
        machine,
        threads,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        cp: args.cp,
        rows,
    };
    emit(args.measure.json, &report, |r| {
        println!(
            "causal attention fwd+bwd, {} heads ({} kv) × {} dims, {} threads on {} (peak {:.0} GFLOP/s)",
            r.heads, r.kv_heads, r.head_dim, r.threads, r.machine.cpu, r.machine.peak_gflops
        );
        println!(
            "{:>8} {:>10} {:>10} {:>12} {:>9} {:>8}",
            "tokens", "fwd ms", "bwd ms", "tokens/s", "GFLOP/s", "of peak"
        );
        for x in &r.rows {
            println!(
                "{:>8} {:>10.1} {:>10.1} {:>12.0} {:>9.1} {:>7.1}%",
                x.tokens,
                x.forward_ms,
                x.backward_ms,
                x.tokens_per_s,
                x.gflops,
                100.0 * x.over_peak
            );
        }
        if let Some(cp) = r.cp {
            println!(
                "context parallelism over {cp} thread ranks (each sequence in 2×{cp} chunks, rank r \
                 holding chunks r and {}−r), fwd+bwd of the slowest rank:",
                2 * cp - 1
            );
            println!(
                "{:>8} {:>12} {:>10} {:>9} {:>12} {:>9}",
                "tokens", "1 rank ms", "ring ms", "vs 1", "ulysses ms", "vs 1"
            );
            let o = |x: Option<f64>, base: f64| {
                x.map_or(("-".into(), "-".into()), |v| {
                    (format!("{v:.1}"), format!("{:.2}×", v / base))
                })
            };
            for x in &r.rows {
                let base = x.forward_ms + x.backward_ms;
                let (rm, rr) = o(x.ring_ms, base);
                let (um, ur) = o(x.ulysses_ms, base);
                println!(
                    "{:>8} {:>12.1} {:>10} {:>9} {:>12} {:>9}",
                    x.tokens, base, rm, rr, um, ur
                );
            }
            println!(
                "(vs 1: time over the single-rank kernel's on the same tokens and cores; the ranks \
                 share this machine's {} cores)",
                r.machine.cores
            );
        }
    })
}

/// Seconds of one forward+backward of context-parallel attention over `cp` thread ranks: the
/// slowest rank's mean over enough repetitions to fill about `seconds` (`single` is the
/// single-rank time, to size the repetitions).
fn cp_seconds(
    cp: usize,
    exchange: CpExchange,
    t: usize,
    shape: AttnShape,
    data: &Arc<[Vec<f32>; 4]>,
    single: f64,
    seconds: f64,
) -> Result<f64> {
    let reps = ((seconds / single.max(1e-6)) as usize).clamp(1, 200);
    let data = data.clone();
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let times = ThreadComm::run(cp, move |c| -> Result<f64, RuntimeError> {
        let me = c.rank().0;
        let split = CpSplit::balanced(&[0, t], cp)?;
        let (qrow, krow) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let [q, k, v, dout] = &*data;
        let (q, k, v, dout) = (
            split.take(me, q, qrow),
            split.take(me, k, krow),
            split.take(me, v, krow),
            split.take(me, dout, qrow),
        );
        let once = || -> Result<(), RuntimeError> {
            let attn = CpAttention::new(&c, exchange, &split, shape, scale);
            let (out, lse) = attn.forward(&q, &k, &v)?;
            attn.backward(&Saved {
                dout: &dout,
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
            })?;
            Ok(())
        };
        once()?;
        c.barrier()?;
        let start = Instant::now();
        for _ in 0..reps {
            once()?;
        }
        Ok(start.elapsed().as_secs_f64() / reps as f64)
    })?;
    Ok(times.into_iter().fold(0.0, f64::max))
}
