//! GPU benchmarks (`--backend cuda`): our CUDA backend, and with `--vs-torch` PyTorch on the same
//! shapes in the same command (the scripts under `torch/` run through `python3`, or
//! `$HOTSPA_PYTHON`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kernels::{Backend, CudaBackend, GemmPrecision, GemmSpec};
use serde::Serialize;
use serde_json::Value;

use super::emit;

const TORCH_GEMM: &str = include_str!("torch/gemm.py");
const TORCH_ATTENTION: &str = include_str!("torch/attention.py");
/// The timing helper the scripts import (`from timing import timed`).
const TORCH_TIMING: &str = include_str!("torch/timing.py");

/// Runs one of the PyTorch scripts with a JSON argument and parses its last stdout line.
pub(super) fn torch(name: &str, script: &str, arg: &Value) -> Result<Value> {
    let dir = tempfile_dir()?;
    let path = dir.join(name);
    std::fs::write(&path, script)?;
    std::fs::write(dir.join("timing.py"), TORCH_TIMING)?;
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

pub(super) fn tempfile_dir() -> Result<PathBuf> {
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

pub(super) use kernels::conformance::uniform as rand_vec;

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
    let shapes = super::gemm::shapes(args, &[2048, 4096, 8192], 16384)?;
    let budget = Duration::from_secs_f64(args.measure.seconds);
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
    if args.measure.vs_torch {
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
    emit(args.measure.json, &report, |_| {
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
    let budget = Duration::from_secs_f64(args.measure.seconds);
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let [q, k, v, dout] = super::attention::inputs(shape, t);
        let (qn, kn) = (q.len(), k.len());
        let (q, k) = (gpu.upload(&q)?, gpu.upload(&k)?);
        let (v, dout) = (gpu.upload(&v)?, gpu.upload(&dout)?);
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
    if args.measure.vs_torch {
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
    emit(args.measure.json, &report, |_| {
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
