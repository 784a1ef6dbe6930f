//! `hotspa bench …`: figures, not pass/fail. Each prints a readable table, or with `--json` one
//! JSON object on stdout.

mod attention;
mod comm;
mod cuda;
mod gemm;
mod machine;
mod step;
mod switch;

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;

pub use crate::output::emit;

/// What to measure.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Our GEMM path (the CPU backend) vs calling the `gemm` crate directly, vs the f32 peak.
    Gemm(gemm::Args),
    /// Bus bandwidth of the thread communicator's collectives vs this machine's memcpy.
    Comm(comm::Args),
    /// Blockwise causal attention forward+backward, tokens/s at 512…8192 tokens.
    Attention(attention::Args),
    /// One training step in tokens/s and as a share of the peak: a ~1 B LLaMA on cuda
    /// (optionally beside PyTorch eager), a 3.4 M one on cpu with the time of every op kind.
    Step(step::StepArgs),
    /// Parameter switches between strategies on thread ranks vs their lower bound.
    Switch(switch::Args),
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Gemm(a) => match a.measure.on()? {
            On::Cpu => gemm::run(a),
            On::Cuda => cuda::gemm(&a),
        },
        BenchCommand::Comm(a) => comm::run(a),
        BenchCommand::Attention(a) => match a.measure.on()? {
            On::Cpu => attention::run(a),
            On::Cuda => cuda::attention(&a),
        },
        BenchCommand::Step(a) => step::step(a),
        BenchCommand::Switch(a) => switch::run(a),
    }
}

/// Runs `f` once to warm up, then repeatedly until `budget` has passed (at least `min_iters`
/// times); returns the median time of one run.
/// A LLaMA `config.json` of the benchmarks' models: `[vocab, hidden, intermediate, layers,
/// heads, kv_heads]`, SwiGLU, RMSNorm ε 1e-5, RoPE θ 10,000, 2,048 positions, untied.
pub(super) fn llama_config(
    [vocab, hidden, inter, layers, heads, kv]: [usize; 6],
) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": false
    })
}

pub fn time_median(
    budget: Duration,
    min_iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Duration> {
    f()?;
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_iters || start.elapsed() < budget {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
        if times.len() >= 1000 {
            break;
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The flags every kernel bench shares.
#[derive(clap::Args, Debug, Clone)]
pub(super) struct Measure {
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

/// Where a kernel bench runs.
enum On {
    Cpu,
    Cuda,
}

impl Measure {
    /// `--backend`, checked.
    fn on(&self) -> Result<On> {
        match self.backend.as_str() {
            "cpu" => Ok(On::Cpu),
            "cuda" => Ok(On::Cuda),
            other => anyhow::bail!("--backend {other}: use cpu or cuda"),
        }
    }
}
