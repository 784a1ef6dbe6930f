//! GPU benchmarks (`--backend cuda`): our CUDA backend, and with `--vs-torch` PyTorch on the same
//! shapes in the same command (the scripts under `torch/` run through `python3`, or
//! `$HOTSPA_PYTHON`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use kernels::{Backend, CudaBackend, GemmPrecision, GemmSpec};
use serde::Serialize;
use serde_json::Value;

use super::emit;

const TORCH_GEMM: &str = include_str!("torch/gemm.py");
const TORCH_ATTENTION: &str = include_str!("torch/attention.py");
const TORCH_STEP: &str = include_str!("torch/step.py");

/// Runs one of the PyTorch scripts with a JSON argument and parses its last stdout line.
fn torch(name: &str, script: &str, arg: &Value) -> Result<Value> {
    let dir = tempfile_dir()?;
    let path = dir.join(name);
    std::fs::write(&path, script)?;
    let python = std::env::var("HOTSPA_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&path)
        .arg(arg.to_string())
        .output()
        .with_context(|| format!("running {python} for the PyTorch side"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "the PyTorch side failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("PyTorch printed {last:?}"))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "hotspa-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Median time of `f` (synchronised) after two warm-ups, at least `min` runs within `budget`.
fn gpu_median(
    gpu: &CudaBackend,
    budget: Duration,
    min: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    gpu.synchronize()?;
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min || (start.elapsed() < budget && times.len() < 200) {
        let t = Instant::now();
        f()?;
        gpu.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[derive(Serialize)]
struct GemmRow {
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    ours_bf16_tflops: f64,
    ours_f32_tflops: f64,
    torch_bf16_tflops: Option<f64>,
    torch_cast_bf16_tflops: Option<f64>,
    torch_f32_tflops: Option<f64>,
}

pub fn gemm(args: &super::gemm::Args) -> Result<()> {
    let bf = CudaBackend::new(0, GemmPrecision::Bf16)?;
    let f32b = CudaBackend::new(0, GemmPrecision::F32)?;
    let mut shapes: Vec<(usize, usize, usize, bool)> = Vec::new();
    if args.shapes.is_empty() {
        for s in [2048, 4096, 8192] {
            shapes.push((s, s, s, false));
        }
        // A 1B model's projections on 16K tokens (x · Wᵀ, weights stored out×in).
        shapes.push((16384, 2048, 2048, true));
        shapes.push((16384, 5632, 2048, true));
        shapes.push((16384, 2048, 5632, true));
    } else {
        for s in &args.shapes {
            let (m, n, k) = super::gemm::parse(s)?;
            shapes.push((m, n, k, false));
        }
    }
    let budget = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for &(m, n, k, tb) in &shapes {
        let spec = GemmSpec::new(m, n, k).trans(false, tb);
        let tf = |s: f64| spec.flops() / s / 1e12;
        let (a, b) = (rand_vec(m * k, 1), rand_vec(k * n, 2));
        let time = |be: &CudaBackend| -> Result<f64> {
            let (da, db) = (be.upload(&a)?, be.upload(&b)?);
            let mut dc = be.zeros(m * n)?;
            gpu_median(be, budget, 5, || Ok(be.gemm(&spec, &da, &db, &mut dc)?))
        };
        let ours_bf16 = tf(time(&bf)?);
        let ours_f32 = tf(time(&f32b)?);
        rows.push(GemmRow {
            m,
            n,
            k,
            trans_b: tb,
            ours_bf16_tflops: ours_bf16,
            ours_f32_tflops: ours_f32,
            torch_bf16_tflops: None,
            torch_cast_bf16_tflops: None,
            torch_f32_tflops: None,
        });
    }
    let mut torch_version = None;
    if args.vs_torch {
        let arg = serde_json::to_value(&shapes)?;
        let t = torch("gemm.py", TORCH_GEMM, &arg)?;
        torch_version = t["torch"].as_str().map(String::from);
        for (row, tr) in rows
            .iter_mut()
            .zip(t["rows"].as_array().into_iter().flatten())
        {
            let f = 2.0 * (row.m * row.n * row.k) as f64;
            let tf = |key: &str| tr[key].as_f64().map(|ms| f / (ms * 1e-3) / 1e12);
            row.torch_bf16_tflops = tf("ms_bf16");
            row.torch_cast_bf16_tflops = tf("ms_cast_bf16");
            row.torch_f32_tflops = tf("ms_f32");
        }
    }
    let report = serde_json::json!({"bench": "gemm", "backend": bf.name(), "torch": torch_version, "rows": rows});
    emit(args.json, &report, |_| {
        println!("GEMM on {}; ours = f32 buffers cast to bf16 + cublasGemmStridedBatchedEx (f32 out), or f32 (no TF32)", bf.name());
        if let Some(v) = &torch_version {
            println!("PyTorch {v}: bf16 = a@b on bf16 tensors; cast = f32 → bf16 casts + matmul + .float() (the same work as ours)");
        }
        println!(
            "{:>24} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}",
            "M×N×K", "ours bf16", "ours f32", "torch bf16", "torch cast", "torch f32", "ours/cast"
        );
        let o = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in &rows {
            let shape = format!(
                "{}×{}×{}{}",
                r.m,
                r.n,
                r.k,
                if r.trans_b { " (Bᵀ)" } else { "" }
            );
            println!(
                "{:>24} {:>10.1} {:>10.1} {:>11} {:>11} {:>11} {:>11}",
                shape,
                r.ours_bf16_tflops,
                r.ours_f32_tflops,
                o(r.torch_bf16_tflops),
                o(r.torch_cast_bf16_tflops),
                o(r.torch_f32_tflops),
                r.torch_cast_bf16_tflops
                    .map_or("-".into(), |t| format!("{:.2}", r.ours_bf16_tflops / t))
            );
        }
        println!("(TFLOP/s, median of repeated synchronised runs)");
    })
}

#[derive(Serialize)]
struct AttnRow {
    tokens: usize,
    fwd_ms: f64,
    fwd_bwd_ms: f64,
    tflops: f64,
    torch_bf16_fwd_bwd_ms: Option<f64>,
    torch_f32_fwd_bwd_ms: Option<f64>,
}

pub fn attention(args: &super::attention::Args) -> Result<()> {
    let gpu = CudaBackend::new(0, GemmPrecision::Bf16)?;
    let (shape, scale) = args.shape();
    let budget = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let qn = t * shape.heads * shape.head_dim;
        let kn = t * shape.kv_heads * shape.head_dim;
        let q = gpu.upload(&rand_vec(qn, 3))?;
        let k = gpu.upload(&rand_vec(kn, 5))?;
        let v = gpu.upload(&rand_vec(kn, 7))?;
        let dout = gpu.upload(&rand_vec(qn, 11))?;
        let cu = [0, t];
        let (mut o, mut lse) = (gpu.zeros(qn)?, gpu.zeros(shape.heads * t)?);
        let (mut dq, mut dk, mut dv) = (gpu.zeros(qn)?, gpu.zeros(kn)?, gpu.zeros(kn)?);
        let fwd = gpu_median(&gpu, budget, 3, || {
            Ok(gpu.attention_forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut lse)?)
        })?;
        let both = gpu_median(&gpu, budget, 3, || {
            gpu.attention_forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut lse)?;
            Ok(gpu.attention_backward(
                &dout, &q, &k, &v, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
            )?)
        })?;

        rows.push(AttnRow {
            tokens: t,
            fwd_ms: fwd * 1e3,
            fwd_bwd_ms: both * 1e3,
            tflops: super::attention::causal_flops(t, shape) / both / 1e12,
            torch_bf16_fwd_bwd_ms: None,
            torch_f32_fwd_bwd_ms: None,
        });
    }
    let mut torch_version = None;
    if args.vs_torch {
        let arg = serde_json::json!({"tokens": args.tokens, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim});
        let t = torch("attention.py", TORCH_ATTENTION, &arg)?;
        torch_version = t["torch"].as_str().map(String::from);
        for (row, tr) in rows
            .iter_mut()
            .zip(t["rows"].as_array().into_iter().flatten())
        {
            row.torch_bf16_fwd_bwd_ms = tr["fwd_bwd_ms_bf16"].as_f64();
            row.torch_f32_fwd_bwd_ms = tr["fwd_bwd_ms_f32"].as_f64();
        }
    }
    let report = serde_json::json!({"bench": "attention", "backend": gpu.name(), "heads": shape.heads,
        "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "torch": torch_version, "rows": rows});
    emit(args.json, &report, |_| {
        println!(
            "causal attention, one sequence, {} heads ({} kv) × {} dims on {}; ours f32 (FA-2 tiles, CUDA cores)",
            shape.heads, shape.kv_heads, shape.head_dim, gpu.name()
        );
        if let Some(v) = &torch_version {
            println!(
                "PyTorch {v} scaled_dot_product_attention(is_causal=True): bf16 (flash) and f32"
            );
        }
        println!(
            "{:>8} {:>9} {:>12} {:>8} {:>13} {:>13} {:>12} {:>12}",
            "tokens",
            "fwd ms",
            "fwd+bwd ms",
            "TFLOP/s",
            "torch bf16 ms",
            "torch f32 ms",
            "vs bf16",
            "vs f32"
        );
        let o = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        for r in &rows {
            println!(
                "{:>8} {:>9.2} {:>12.2} {:>8.1} {:>13} {:>13} {:>12} {:>12}",
                r.tokens,
                r.fwd_ms,
                r.fwd_bwd_ms,
                r.tflops,
                o(r.torch_bf16_fwd_bwd_ms),
                o(r.torch_f32_fwd_bwd_ms),
                r.torch_bf16_fwd_bwd_ms
                    .map_or("-".into(), |t| format!("{:.2}×", r.fwd_bwd_ms / t)),
                r.torch_f32_fwd_bwd_ms
                    .map_or("-".into(), |t| format!("{:.2}×", r.fwd_bwd_ms / t)),
            );
        }
        println!("(vs: our time over PyTorch's; above 1 is slower)");
    })
}

/// `hotspa bench step`.
#[derive(ClapArgs)]
pub struct StepArgs {
    /// cuda (cpu works too, for a small --model).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// An HF config.json; default: a 1.1 B LLaMA (TinyLlama's shape: hidden 2048, FFN 5632,
    /// 22 layers, 32 heads, 4 kv heads, vocab 32000).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Sequences per micro-batch (gradient accumulation over the rest).
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Steps (the first two are warm-up).
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Dense bf16 peak of the GPU for the MFU, in TFLOP/s (default: 989 for H100/H200 SXM).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// The same model and batch in PyTorch eager (Hugging Face transformers), side by side.
    #[arg(long)]
    vs_torch: bool,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

const LLAMA_1B: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
 "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
 "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 2048, "tie_word_embeddings": false}"#;

pub fn step(args: StepArgs) -> Result<()> {
    let dir = tempfile_dir()?;
    let cfg_path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let mut v: Value = serde_json::from_str(LLAMA_1B)?;
            v["max_position_embeddings"] = args.seq_len.max(2048).into();
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
            rand_vec(args.seq_len, 100 + s as u64)
                .iter()
                .map(|x| ((x + 1.0) * 0.5 * (cfg.vocab_size as f32 - 1.0)) as u32)
                .collect()
        })
        .collect();
    let mut run = train::TrainConfig::new(cfg.clone(), train::DataSource::Sequences(seqs));
    run.device = match args.backend.as_str() {
        "cpu" => train::Device::Cpu,
        "cuda" => train::Device::Cuda(kernels::GemmPrecision::Bf16),
        other => anyhow::bail!("--backend {other}: use cuda or cpu"),
    };
    run.global_batch = args.sequences;
    run.micro_batch_tokens = vec![args.micro_batch * args.seq_len];
    run.steps = args.steps;
    run.max_len = Some(args.seq_len);
    run.shuffle = false;
    let out = train::run(&run, &mut crate::output::Notices)?;
    let lines = out.steps;
    let mut secs: Vec<f64> = lines.iter().skip(2).map(|m| m.seconds).collect();
    if secs.is_empty() {
        secs = lines.iter().map(|m| m.seconds).collect();
    }
    secs.sort_by(f64::total_cmp);
    let sec = secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN);
    let peak_bytes = lines.last().map_or(0, |m| m.peak_bytes);
    let tokens = (args.sequences * args.seq_len) as f64;
    // Model FLOPs: 6·N per token for the matrices (embedding lookup excluded) plus causal
    // attention 6·L·hidden·T per token.
    let n: usize = model::param_specs(&cfg)
        .iter()
        .filter(|s| s.name != "model.embed_tokens.weight" || cfg.tie_word_embeddings)
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let flops = tokens
        * (6.0 * n as f64 + 6.0 * (cfg.num_hidden_layers * cfg.hidden_size * args.seq_len) as f64);
    let peak = args.peak_tflops.unwrap_or(989.0) * 1e12;
    let ours_mfu = flops / sec / peak;
    let mut torch_res = None;
    if args.vs_torch {
        let arg = serde_json::json!({"config": raw, "sequences": args.sequences, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "steps": args.steps});
        torch_res = Some(torch("step.py", TORCH_STEP, &arg)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let torch_sec = torch_res.as_ref().and_then(|t| t["seconds"].as_f64());
    let report = serde_json::json!({
        "bench": "step", "backend": args.backend, "params": model::param_specs(&cfg).iter().map(|s| s.shape.iter().product::<usize>()).sum::<usize>(),
        "tokens": tokens, "seconds": sec, "tokens_per_s": tokens / sec, "mfu": ours_mfu,
        "peak_bytes_per_rank": peak_bytes,
        "torch": torch_res, "torch_mfu": torch_sec.map(|s| flops / s / peak),
    });
    emit(args.json, &report, |r| {
        println!(
            "training step, {} parameters, {} sequences × {} tokens ({} per micro-batch), median of steps 3..{}",
            r["params"], args.sequences, args.seq_len, args.micro_batch, args.steps
        );
        println!(
            "{:>28} {:>10} {:>12} {:>8}",
            "", "s/step", "tokens/s", "MFU"
        );
        println!(
            "{:>28} {:>10.3} {:>12.0} {:>7.1}%",
            format!("hotspa ({})", args.backend),
            sec,
            tokens / sec,
            100.0 * ours_mfu
        );
        if let Some(ts) = torch_sec {
            println!(
                "{:>28} {:>10.3} {:>12.0} {:>7.1}%",
                format!(
                    "PyTorch {} eager",
                    r["torch"]["torch"].as_str().unwrap_or("?")
                ),
                ts,
                tokens / ts,
                100.0 * flops / ts / peak
            );
            println!("hotspa / PyTorch tokens/s: {:.2}", ts / sec);
        }
        println!("(MFU against {:.0} TFLOP/s dense bf16)", peak / 1e12);
    })
}
