//! `hotspa bench gemm`.

use std::time::Duration;

use anyhow::Result;
use clap::Args as ClapArgs;
use kernels::{Backend, CpuBackend, GemmSpec};
use serde::Serialize;

use super::machine::Machine;
use super::{emit, time_median};

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub(super) measure: super::Measure,
    /// Shapes as MxNxK, comma-separated (default: square 256…2048 and LLaMA-like projections).
    #[arg(long, value_delimiter = ',')]
    pub(super) shapes: Vec<String>,
    /// Override the clock used for the theoretical peak, in GHz.
    #[arg(long)]
    pub(super) ghz: Option<f64>,
}

#[derive(Serialize)]
struct Row {
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    ours_gflops: f64,
    direct_gflops: f64,
    ours_over_direct: f64,
    ours_over_peak: f64,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    threads: usize,
    rows: Vec<Row>,
}

pub(super) fn parse(shape: &str) -> Result<(usize, usize, usize)> {
    let p: Vec<usize> = shape
        .split('x')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("shape `{shape}` is not MxNxK"))?;
    match p.as_slice() {
        [m, n, k] => Ok((*m, *n, *k)),
        _ => anyhow::bail!("shape `{shape}` is not MxNxK"),
    }
}

/// The `m × n × k` products to time (`trans_b`: B stored n×k): `--shapes`, or by default the
/// squares `squares` and a 1B-class model's projections on `tokens` tokens (x · Wᵀ, weights
/// stored out×in).
pub(super) fn shapes(
    args: &Args,
    squares: &[usize],
    tokens: usize,
) -> Result<Vec<(usize, usize, usize, bool)>> {
    if !args.shapes.is_empty() {
        return args
            .shapes
            .iter()
            .map(|s| parse(s).map(|(m, n, k)| (m, n, k, false)))
            .collect();
    }
    let mut shapes: Vec<_> = squares.iter().map(|&s| (s, s, s, false)).collect();
    shapes.extend([(2048, 2048), (5632, 2048), (2048, 5632)].map(|(n, k)| (tokens, n, k, true)));
    Ok(shapes)
}

pub fn run(args: Args) -> Result<()> {
    let machine = Machine::detect(args.ghz);
    let threads = args.measure.threads.unwrap_or(machine.cores).max(1);
    let cpu = CpuBackend::new(threads)?;
    let shapes = shapes(&args, &[256, 512, 1024, 2048], 2048)?;
    let budget = Duration::from_secs_f64(args.measure.seconds);
    let mut rows = Vec::new();
    for (m, n, k, tb) in shapes {
        let spec = GemmSpec::new(m, n, k).trans(false, tb);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let ours = time_median(budget, 3, || Ok(cpu.gemm(&spec, &a, &b, &mut c)?))?;
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let direct = time_median(budget, 3, || {
            // SAFETY: packed row-major buffers of exactly m×k, k×n and m×n elements.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    if threads > 1 {
                        gemm::Parallelism::Rayon(threads)
                    } else {
                        gemm::Parallelism::None
                    },
                );
            }
            Ok(())
        })?;
        let gf = |t: Duration| spec.flops() / t.as_secs_f64() / 1e9;
        rows.push(Row {
            m,
            n,
            k,
            trans_b: tb,
            ours_gflops: gf(ours),
            direct_gflops: gf(direct),
            ours_over_direct: gf(ours) / gf(direct),
            ours_over_peak: gf(ours) / machine.peak_gflops,
        });
    }
    let report = Report {
        bench: "gemm",
        machine,
        threads,
        rows,
    };
    emit(args.measure.json, &report, |r| {
        let m = &r.machine;
        println!(
            "GEMM f32 on {} ({} threads); {}",
            m.cpu,
            r.threads,
            m.peak_text()
        );
        println!(
            "{:>22} {:>12} {:>12} {:>10} {:>10}",
            "M×N×K", "ours GF/s", "gemm GF/s", "ours/gemm", "ours/peak"
        );
        for row in &r.rows {
            let shape = format!(
                "{}×{}×{}{}",
                row.m,
                row.n,
                row.k,
                if row.trans_b { " (Bᵀ)" } else { "" }
            );
            println!(
                "{:>22} {:>12.1} {:>12.1} {:>10.3} {:>9.1}%",
                shape,
                row.ours_gflops,
                row.direct_gflops,
                row.ours_over_direct,
                100.0 * row.ours_over_peak
            );
        }
    })
}
