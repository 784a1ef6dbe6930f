//! What this machine can do at best: its f32 peak (by formula and timed) and its memcpy bandwidth.

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
    pub formula_gflops: f64,
    /// Independent FMAs on every core at once, timed (0 without AVX2/AVX-512): what the cores
    /// really do at the clock they hold under vector load (a cloud CPU's /proc/cpuinfo often
    /// gives its base clock, below that). The median of [`Self::rounds`].
    pub measured_gflops: f64,
    /// Every timed round's GFLOP/s (each about 60 ms of FMAs on every core). The median, not
    /// the best, is what counts: on a shared virtual machine the clock the cores hold moves
    /// from second to second (one bench run here timed 101 GFLOP/s, the next 198), and the
    /// benches that set work beside the peak time that work over seconds, not over its
    /// luckiest round; a bench may time more rounds after its work ([`Self::time_fmas`]).
    pub rounds: Vec<f64>,
    /// The larger of the two: what "% of peak" is of.
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
        let formula = cores as f64 * ghz * (fma_units * f32_lanes * 2) as f64;
        let mut machine = Self {
            cpu,
            cores,
            ghz,
            f32_lanes,
            fma_units,
            formula_gflops: formula,
            measured_gflops: 0.0,
            rounds: Vec::new(),
            peak_gflops: formula,
        };
        machine.time_fmas();
        machine
    }

    /// Times 7 more rounds of FMAs and updates the peak to the median of every round so far:
    /// a bench calls it again after its work, so that the peak is the machine's over the same
    /// minutes as the work.
    pub fn time_fmas(&mut self) {
        self.rounds
            .extend((0..7).map(|_| fma_gflops(self.cores, self.f32_lanes)));
        self.measured_gflops = median(&self.rounds);
        self.peak_gflops = self.formula_gflops.max(self.measured_gflops);
    }

    /// How the peak was found, for the benches' headers.
    pub fn peak_text(&self) -> String {
        format!(
            "peak {:.0} GFLOP/s, the larger of {} cores × {:.2} GHz × {} FMA units × {} f32 lanes × 2 = {:.0} and FMAs timed on every core = {:.0} (median of {} rounds, {:.0}–{:.0})",
            self.peak_gflops,
            self.cores,
            self.ghz,
            self.fma_units,
            self.f32_lanes,
            self.formula_gflops,
            self.measured_gflops,
            self.rounds.len(),
            self.rounds.iter().copied().fold(f64::INFINITY, f64::min),
            self.rounds.iter().copied().fold(0.0, f64::max),
        )
    }
}

/// The middle value (the mean of the two middle ones for an even count; 0 for none).
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}

/// GFLOP/s of one round of independent f32 FMAs (`lanes` wide) on `cores` threads at once,
/// about 60 ms at 3 GHz; 0 where this CPU has neither AVX-512 nor AVX2 with FMA.
fn fma_gflops(cores: usize, lanes: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const CHAINS: usize = 12;
        // About 60 ms a round in a release build; debug builds (the CLI's tests) time shorter ones.
        const ITERS: usize = if cfg!(debug_assertions) {
            2_000_000
        } else {
            30_000_000
        };

        #[target_feature(enable = "avx512f")]
        unsafe fn avx512() -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..ITERS {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2() -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS];
            for _ in 0..ITERS {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut out = [0f32; 8];
            let sum = acc
                .iter()
                .fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x));
            _mm256_storeu_ps(out.as_mut_ptr(), sum);
            out.iter().sum()
        }
        let run: fn() -> f32 = if lanes == 16 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked).
            || unsafe { avx512() }
        } else if lanes >= 8
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            || unsafe { avx2() }
        } else {
            return 0.0;
        };
        let width = if lanes == 16 { 16 } else { 8 };
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..cores {
                s.spawn(|| std::hint::black_box(run()));
            }
        });
        (cores * ITERS * CHAINS * width * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cores, lanes);
        0.0
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One round far above the rest or one starved round moves the peak not at all: the
    /// median is of the rounds in the middle.
    #[test]
    fn outlying_rounds_do_not_move_the_peak() {
        let rounds = [196.0, 350.0, 198.0, 101.0, 197.0, 199.0, 195.0];
        assert_eq!(median(&rounds), 197.0);
        assert_eq!(median(&[1.0, 3.0, 2.0, 10.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let mut m = Machine {
            cpu: "test".into(),
            cores: 1,
            ghz: 1.0,
            f32_lanes: 8,
            fma_units: 2,
            formula_gflops: 32.0,
            measured_gflops: 0.0,
            rounds: vec![200.0; 6],
            peak_gflops: 32.0,
        };
        m.time_fmas();
        assert_eq!(m.rounds.len(), 13);
        assert_eq!(m.peak_gflops, m.formula_gflops.max(m.measured_gflops));
    }
}
