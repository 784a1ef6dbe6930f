//! `hotspa bench step`: one training step in tokens/s and as a share of the device's peak; on
//! the CPU with the time of every op kind beside it (the runtime's profile), on a GPU optionally
//! beside PyTorch eager on the same model and batch.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use serde_json::Value;

use super::cuda::{rand_vec, tempfile_dir, torch};
use super::emit;
use super::machine::Machine;

const TORCH_STEP: &str = include_str!("torch/step.py");

/// `hotspa bench step`.
#[derive(ClapArgs)]
pub struct StepArgs {
    /// cuda, or cpu (this machine's cores, one device).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// An HF config.json. Default on cuda: a 1.1 B LLaMA (TinyLlama's shape: hidden 2048, FFN
    /// 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000); on cpu: a 3.4 M one (hidden 256,
    /// FFN 688, 4 layers, 8 heads, vocab 512).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    sequences: usize,
    /// Tokens per sequence (default 2048 on cuda, 512 on cpu).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per micro-batch, gradient accumulation over the rest (default 4 on cuda, all
    /// of them on cpu).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Steps (the first two are warm-up).
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// The peak the share is of, in TFLOP/s. Default on cuda: 989 (H100/H200 SXM dense bf16);
    /// on cpu: this machine's f32 peak as `hotspa bench gemm` finds it (formula or timed FMAs).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// On cpu, the clock the peak assumes, in GHz (default: /proc/cpuinfo's).
    #[arg(long)]
    ghz: Option<f64>,
    /// The same model and batch in PyTorch eager (Hugging Face transformers), side by side.
    #[arg(long)]
    vs_torch: bool,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// A 1.1 B LLaMA (TinyLlama's shape) for the GPU.
const LLAMA_1B: [usize; 6] = [32000, 2048, 5632, 22, 32, 4];

/// The CPU backend's benchmark model (issue 19's): 3.4 M parameters.
const LLAMA_CPU: [usize; 6] = [512, 256, 688, 4, 8, 8];

pub fn step(args: StepArgs) -> Result<()> {
    let cpu = match args.backend.as_str() {
        "cpu" => true,
        "cuda" => false,
        other => anyhow::bail!("--backend {other}: use cuda or cpu"),
    };
    let seq_len = args.seq_len.unwrap_or(if cpu { 512 } else { 2048 });
    let micro_batch = args
        .micro_batch
        .unwrap_or(if cpu { args.sequences } else { 4 });
    let dir = tempfile_dir()?;
    let cfg_path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let mut v = super::llama_config(if cpu { LLAMA_CPU } else { LLAMA_1B });
            v["max_position_embeddings"] = seq_len.max(2048).into();
            let p = dir.join("config.json");
            std::fs::write(&p, v.to_string())?;
            p
        }
    };
    let cfg = model::LlamaConfig::load(&cfg_path)?;
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(if cfg_path.is_dir() {
        cfg_path.join("config.json")
    } else {
        cfg_path.clone()
    })?)?;
    // Random token sequences.
    let seqs: Vec<Vec<u32>> = (0..args.sequences)
        .map(|s| {
            rand_vec(seq_len, 100 + s as u64)
                .iter()
                .map(|x| ((x + 1.0) * 0.5 * (cfg.vocab_size as f32 - 1.0)) as u32)
                .collect()
        })
        .collect();
    let mut run = train::TrainConfig::new(cfg.clone(), train::DataSource::Sequences(seqs));
    run.device = if cpu {
        train::Device::Cpu
    } else {
        train::Device::Cuda(kernels::GemmPrecision::Bf16)
    };
    run.global_batch = args.sequences;
    run.micro_batch_tokens = vec![micro_batch * seq_len];
    run.steps = args.steps;
    run.max_len = Some(seq_len);
    run.shuffle = false;
    // The peak's FMAs are timed before the steps and again after them (the median of both).
    let mut machine = cpu.then(|| Machine::detect(args.ghz));
    if cpu {
        // Every op's time by kind (the CPU has nothing to wait for, so this costs nothing).
        runtime::profile::enable();
    }
    let out = train::run(&run, &mut crate::output::Notices)?;
    let lines = out.steps;
    let mut secs: Vec<f64> = lines.iter().skip(2).map(|m| m.seconds).collect();
    if secs.is_empty() {
        secs = lines.iter().map(|m| m.seconds).collect();
    }
    secs.sort_by(f64::total_cmp);
    let sec = secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN);
    let all_steps: f64 = lines.iter().map(|m| m.seconds).sum();
    let peak_bytes = lines.last().map_or(0, |m| m.peak_bytes);
    let tokens = (args.sequences * seq_len) as f64;
    // Model FLOPs: 6·N per token for the matrices (embedding lookup excluded) plus causal
    // attention 6·L·hidden·T per token.
    let n: usize = model::param_specs(&cfg)
        .iter()
        .filter(|s| s.name != "model.embed_tokens.weight" || cfg.tie_word_embeddings)
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let flops = tokens
        * (6.0 * n as f64 + 6.0 * (cfg.num_hidden_layers * cfg.hidden_size * seq_len) as f64);
    if let Some(m) = machine.as_mut() {
        m.time_fmas();
    }
    // In GFLOP/s as the machine reports it (so the report's two figures are the same number).
    let peak_gflops = match (args.peak_tflops, &machine) {
        (Some(t), _) => t * 1e3,
        (None, Some(m)) => m.peak_gflops,
        (None, None) => 989e3,
    };
    let peak = peak_gflops * 1e9;
    let ours_mfu = flops / sec / peak;
    // FLOPs per step of the op kinds with a clear count: each of a linear layer's three GEMMs
    // is 2·N·tokens; attention's forward 2·T²·hidden per layer and sequence (the causal half of
    // QKᵀ and AV), its backward 2.5× that (five tile GEMMs to two).
    let lin = 2.0 * n as f64 * tokens;
    let attn = 2.0
        * (seq_len * seq_len) as f64
        * (cfg.hidden_size * cfg.num_hidden_layers * args.sequences) as f64;
    let op_flops = |op: &str| match op {
        "Linear" | "LinearGradInput" | "LinearGradWeight" => Some(lin),
        "Attention" => Some(attn),
        "AttentionGrad" => Some(2.5 * attn),
        _ => None,
    };
    let steps = args.steps.max(1) as f64;
    // The profile's rows: op kind, calls, seconds over every step, share, GFLOP/s.
    let profile: Vec<Value> = runtime::profile::rows()
        .into_iter()
        .map(|(op, calls, s)| {
            let gflops = op_flops(&op).map(|f| f / (s / steps) / 1e9);
            serde_json::json!({"op": op, "calls": calls, "seconds": s,
                "share": s / all_steps.max(1e-12), "gflops": gflops})
        })
        .collect();
    let mut torch_res = None;
    if args.vs_torch {
        let arg = serde_json::json!({"config": raw, "sequences": args.sequences, "seq_len": seq_len,
            "micro_batch": micro_batch, "steps": args.steps});
        torch_res = Some(torch("step.py", TORCH_STEP, &arg)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let torch_sec = torch_res.as_ref().and_then(|t| t["seconds"].as_f64());
    let report = serde_json::json!({
        "bench": "step", "backend": args.backend, "params": model::param_specs(&cfg).iter().map(|s| s.shape.iter().product::<usize>()).sum::<usize>(),
        "tokens": tokens, "seconds": sec, "tokens_per_s": tokens / sec, "gflops": flops / sec / 1e9,
        "mfu": ours_mfu, "peak_gflops": peak_gflops, "machine": machine,
        "peak_bytes_per_rank": peak_bytes, "profile": profile, "all_steps_seconds": all_steps,
        "torch": torch_res, "torch_mfu": torch_sec.map(|s| flops / s / peak),
    });
    emit(args.json, &report, |r| {
        println!(
            "training step, {} parameters, {} sequences × {} tokens ({} per micro-batch), median of steps 3..{}",
            r["params"], args.sequences, seq_len, micro_batch, args.steps
        );
        println!(
            "{:>28} {:>10} {:>12} {:>9} {:>8}",
            "", "s/step", "tokens/s", "GFLOP/s", "of peak"
        );
        println!(
            "{:>28} {:>10.3} {:>12.0} {:>9.1} {:>7.1}%",
            format!("hotspa ({})", args.backend),
            sec,
            tokens / sec,
            flops / sec / 1e9,
            100.0 * ours_mfu
        );
        if let Some(ts) = torch_sec {
            println!(
                "{:>28} {:>10.3} {:>12.0} {:>9.1} {:>7.1}%",
                format!(
                    "PyTorch {} eager",
                    r["torch"]["torch"].as_str().unwrap_or("?")
                ),
                ts,
                tokens / ts,
                flops / ts / 1e9,
                100.0 * flops / ts / peak
            );
            println!("hotspa / PyTorch tokens/s: {:.2}", ts / sec);
        }
        println!(
            "(FLOPs: 6·N·tokens, N every matrix but the embedding lookup, plus causal attention's \
             6·layers·hidden·seq_len per token; {})",
            match &machine {
                Some(m) if args.peak_tflops.is_none() => m.peak_text(),
                _ if cpu => format!("peak {:.0} GFLOP/s (--peak-tflops)", peak / 1e9),
                _ => format!("peak {:.0} GFLOP/s dense bf16", peak / 1e9),
            }
        );
        if cpu {
            println!(
                "time by op kind over all {} steps ({:.2} s; the rest of the step is the \
                 runner's own work between ops):",
                args.steps, all_steps
            );
            println!(
                "{:<24} {:>8} {:>10} {:>8} {:>9} {:>8}",
                "op", "calls", "s/step", "share", "GFLOP/s", "of peak"
            );
            for row in r["profile"].as_array().into_iter().flatten() {
                let g = row["gflops"].as_f64();
                println!(
                    "{:<24} {:>8} {:>10.4} {:>7.1}% {:>9} {:>8}",
                    row["op"].as_str().unwrap_or("?"),
                    row["calls"].as_u64().unwrap_or(0),
                    row["seconds"].as_f64().unwrap_or(0.0) / steps,
                    100.0 * row["share"].as_f64().unwrap_or(0.0),
                    g.map_or(String::new(), |g| format!("{g:.1}")),
                    g.map_or(String::new(), |g| format!("{:.1}%", 100.0 * g * 1e9 / peak))
                );
            }
        }
    })
}
