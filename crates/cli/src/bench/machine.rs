//! What this machine can do at best: its theoretical f32 peak and its memcpy bandwidth.

use std::time::Instant;

use serde::Serialize;

/// The machine's description and ceilings.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Cores this process may use.
    pub cores: usize,
    /// Clock used for the peak, in GHz (from /proc/cpuinfo, or `--ghz`).
    pub ghz: f64,
    /// f32 lanes per FMA instruction (16 with AVX-512, 8 with AVX2+FMA, 4 otherwise).
    pub f32_lanes: usize,
    /// FMA units per core assumed (2 on current x86 server cores).
    pub fma_units: usize,
    /// cores × GHz × FMA units × lanes × 2.
    pub peak_gflops: f64,
}

impl Machine {
    /// Reads /proc/cpuinfo; `ghz` overrides the clock it reports.
    pub fn detect(ghz: Option<f64>) -> Self {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown".into());
        let flags = field("flags").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let f32_lanes = if has("avx512f") {
            16
        } else if has("avx2") && has("fma") {
            8
        } else {
            4
        };
        let ghz = ghz
            .or_else(|| {
                field("cpu MHz")
                    .and_then(|m| m.parse::<f64>().ok())
                    .map(|m| m / 1000.0)
            })
            .unwrap_or(2.0);
        let cores = kernels::available_cores();
        let fma_units = 2;
        Self {
            cpu,
            cores,
            ghz,
            f32_lanes,
            fma_units,
            peak_gflops: cores as f64 * ghz * (fma_units * f32_lanes * 2) as f64,
        }
    }
}

/// Single-thread memcpy bandwidth in GB/s (bytes copied per second) over `bytes`-sized buffers.
pub fn memcpy_gbps(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    dst.copy_from_slice(&src);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// The machine's memcpy bandwidth in GB/s with every core copying at once (each its own
/// `bytes / cores` buffers): what all thread devices together can copy, at best.
pub fn memcpy_all_cores_gbps(bytes: usize) -> f64 {
    let cores = kernels::available_cores().max(1);
    let n = bytes / 4 / cores;
    let mut pairs: Vec<(Vec<f32>, Vec<f32>)> = (0..cores)
        .map(|c| ((0..n).map(|i| (i + c) as f32).collect(), vec![0f32; n]))
        .collect();
    let mut best = f64::MAX;
    for round in 0..6 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (src, dst) in pairs.iter_mut() {
                s.spawn(move || {
                    dst.copy_from_slice(src);
                    std::hint::black_box(&dst);
                });
            }
        });
        // The first round faults the destination pages in.
        if round > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    (n * cores * 4) as f64 / best / 1e9
}
