//! `hotspa bench comm`.

use std::time::Instant;

use anyhow::Result;
use clap::Args as ClapArgs;
use comm::{chunk_counts, CommError, Communicator, P2p, Rank, ReduceOp, ThreadComm};
use serde::Serialize;

use super::emit;
use super::machine::memcpy_gbps;

#[derive(ClapArgs)]
pub struct Args {
    /// Number of ranks (threads; under MPI the world size).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Message sizes in MiB (the whole buffer of the collective).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    sizes_mib: Vec<usize>,
    /// Backend: `thread` (the embedded default, `--devices` ranks in this process) or `mpi` (one
    /// rank per process: `mpirun -np N hotspa bench comm --backend mpi`, needs `--features mpi`).
    #[arg(long, default_value = "thread")]
    backend: String,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone)]
struct Row {
    op: &'static str,
    bytes: usize,
    time_ms: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    busbw_over_memcpy: f64,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    backend: String,
    devices: usize,
    memcpy_gbps: f64,
    rows: Vec<Row>,
}

const OPS: [&str; 5] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "batch_send_recv",
];

/// Runs `op` `iters` times on this rank of `c`; the median over iterations of the slowest rank.
fn measure_on(
    c: &dyn Communicator,
    op: &str,
    elems: usize,
    iters: usize,
) -> Result<f64, CommError> {
    let p = c.size();
    let me = c.rank().0;
    let counts = chunk_counts(elems, p);
    let mut buf = vec![1.0f32; elems];
    let mut part = vec![1.0f32; counts[me]];
    let mut out = vec![0.0f32; elems];
    let mut ring_in = vec![0.0f32; elems];
    // All-to-all: everyone sends chunk j to rank j, so rank `me` receives chunk `me` from all.
    let a2a_recv_counts = vec![counts[me]; p];
    let mut a2a_out = vec![0.0f32; counts[me] * p];
    let mut once = |c: &dyn Communicator| -> Result<(), CommError> {
        match op {
            "all_reduce" => c.all_reduce(&mut buf, ReduceOp::Sum),
            "all_gather" => c.all_gather(&part, &mut out, &counts),
            "reduce_scatter" => c.reduce_scatter(&buf, &mut part, &counts, ReduceOp::Sum),
            "all_to_all" => c.all_to_all(&buf, &counts, &mut a2a_out, &a2a_recv_counts),
            _ => c.batch(&mut [
                P2p::Send {
                    peer: Rank((me + 1) % p),
                    data: &buf,
                },
                P2p::Recv {
                    peer: Rank((me + p - 1) % p),
                    buf: &mut ring_in,
                },
            ]),
        }
    };
    once(c)?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        c.barrier()?;
        let t = Instant::now();
        once(c)?;
        let mut dt = [t.elapsed().as_secs_f32()];
        c.all_reduce(&mut dt, ReduceOp::Max)?;
        samples.push(dt[0] as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

pub fn run(args: Args) -> Result<()> {
    // `thread`: `--devices` thread ranks here; `mpi`: one rank per process under mpirun.
    let mpi = match args.backend.as_str() {
        "thread" => None,
        "mpi" => Some(comm::MpiComm::init()?),
        other => anyhow::bail!("--backend {other}: use thread or mpi (under mpirun)"),
    };
    let devices = mpi.as_ref().map_or(args.devices, |c| c.size());
    anyhow::ensure!(devices >= 1, "--devices must be at least 1");
    let measure = |op: &'static str, elems: usize, iters: usize| -> Result<f64> {
        Ok(match &mpi {
            Some(c) => measure_on(c, op, elems, iters)?,
            None => ThreadComm::run(devices, move |c| measure_on(&c, op, elems, iters))?[0],
        })
    };
    let n = devices as f64;
    let memcpy = memcpy_gbps(64 << 20);
    let mut rows = Vec::new();
    for &mib in &args.sizes_mib {
        let bytes = mib << 20;
        let elems = bytes / 4;
        let iters = ((1usize << 30) / bytes.max(1)).clamp(9, 30);
        for op in OPS {
            let t = measure(op, elems, iters)?;
            let algbw = bytes as f64 / t / 1e9;
            let factor = match op {
                "all_reduce" => 2.0 * (n - 1.0) / n,
                "batch_send_recv" => 1.0,
                _ => (n - 1.0) / n,
            };
            rows.push(Row {
                op,
                bytes,
                time_ms: t * 1e3,
                algbw_gbps: algbw,
                busbw_gbps: algbw * factor,
                busbw_over_memcpy: algbw * factor / memcpy,
            });
        }
    }
    let report = Report {
        bench: "comm",
        backend: args.backend,
        devices,
        memcpy_gbps: memcpy,
        rows,
    };
    if mpi.as_ref().is_some_and(|c| c.rank().0 != 0) {
        return Ok(()); // rank 0 reports
    }
    emit(args.json, &report, |r| {
        println!(
            "{} communicator, {} ranks; single-thread memcpy {:.1} GB/s (bus bandwidth as in nccl-tests)",
            r.backend, r.devices, r.memcpy_gbps
        );
        println!(
            "{:>16} {:>9} {:>10} {:>11} {:>11} {:>12}",
            "op", "MiB", "ms", "algbw GB/s", "busbw GB/s", "busbw/memcpy"
        );
        for x in &r.rows {
            println!(
                "{:>16} {:>9} {:>10.2} {:>11.2} {:>11.2} {:>12.3}",
                x.op,
                x.bytes >> 20,
                x.time_ms,
                x.algbw_gbps,
                x.busbw_gbps,
                x.busbw_over_memcpy
            );
        }
    })
}
