//! `hotspa bench attention`.

use std::time::Duration;

use anyhow::Result;
use clap::Args as ClapArgs;
use kernels::{AttnShape, Backend, CpuBackend};
use serde::Serialize;

use super::machine::Machine;
use super::{emit, time_median};

#[derive(ClapArgs)]
pub struct Args {
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
    /// Threads (default: every core).
    #[arg(long)]
    pub(super) threads: Option<usize>,
    /// Seconds spent on each measurement (at least one run each).
    #[arg(long, default_value_t = 1.0)]
    pub(super) seconds: f64,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    /// cpu, or cuda (a build with `--features cuda` on a GPU machine).
    #[arg(long, default_value = "cpu")]
    pub(super) backend: String,
    /// With --backend cuda: PyTorch on the same shapes, side by side (runs `python3`).
    #[arg(long)]
    pub(super) vs_torch: bool,
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
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    threads: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rows: Vec<Row>,
}

pub fn run(args: Args) -> Result<()> {
    match args.backend.as_str() {
        "cpu" => {}
        "cuda" => return super::cuda::attention(&args),
        other => anyhow::bail!("--backend {other}: use cpu or cuda"),
    }
    let machine = Machine::detect(None);
    let threads = args.threads.unwrap_or(machine.cores).max(1);
    let cpu = CpuBackend::new(threads)?;
    let (shape, scale) = args.shape();
    let budget = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let qn = t * shape.heads * shape.head_dim;
        let kn = t * shape.kv_heads * shape.head_dim;
        let init = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * s) % 97) as f32 - 48.0) / 48.0)
                .collect()
        };
        let (q, k, v, dout) = (init(qn, 3), init(kn, 5), init(kn, 7), init(qn, 11));
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
        let gflops = causal_flops(t, shape) / total / 1e9;
        rows.push(Row {
            tokens: t,
            forward_ms: fwd.as_secs_f64() * 1e3,
            backward_ms: bwd.as_secs_f64() * 1e3,
            tokens_per_s: t as f64 / total,
            gflops,
            over_peak: gflops / machine.peak_gflops,
        });
    }
    let report = Report {
        bench: "attention",
        machine,
        threads,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        rows,
    };
    emit(args.json, &report, |r| {
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
    })
}
