//! `hotspa conformance`: a backend's kernels against the CPU backend, on this machine.

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use comm::Communicator;
use kernels::conformance::{run_all, Check, Tolerance};
use kernels::{CpuBackend, CudaBackend, GemmPrecision};

#[derive(ClapArgs)]
pub struct Args {
    /// cuda (every kernel of the CUDA backend against the CPU backend), nccl (the communicator
    /// suite on NcclComm), mpi (the communicator suite on MpiComm, under `mpirun`), or cpu (the
    /// kernel suite itself).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// GEMM precisions to check on cuda, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string(), "f32".to_string()])]
    precision: Vec<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn report(title: &str, checks: &[Check]) -> usize {
    println!("{title}");
    println!("{:<64} {:>11} {:>9}  ", "check", "rel. error", "bound");
    let mut failed = 0;
    for c in checks {
        let ok = c.passed();
        failed += usize::from(!ok);
        println!(
            "{:<64} {:>11.2e} {:>9.0e}  {}",
            c.name,
            c.rel_err,
            c.tol,
            if ok { "ok" } else { "FAILED" }
        );
    }
    println!("{} checks, {failed} failed\n", checks.len());
    failed
}

pub fn run(args: Args) -> Result<()> {
    let mut failed = 0;
    match args.backend.as_str() {
        "cpu" => {
            let other = CpuBackend::new(1)?;
            failed += report(
                "cpu (1 thread) vs cpu",
                &run_all(&other, Tolerance::F32, args.seed)?,
            );
        }
        "cuda" => {
            for p in &args.precision {
                let precision: GemmPrecision = p.parse().map_err(anyhow::Error::msg)?;
                let dev = CudaBackend::new(0, precision)?;
                let tol = match precision {
                    GemmPrecision::Bf16 => Tolerance::BF16,
                    GemmPrecision::F32 => Tolerance::F32,
                };
                let name = kernels::Backend::name(&dev);
                failed += report(&format!("{name} vs cpu"), &run_all(&dev, tol, args.seed)?);
            }
        }
        "nccl" => {
            // The communicator suite on one NCCL rank per GPU of this process's machine is not
            // possible in one process (NCCL wants one rank per GPU): this runs a world of one;
            // under mpirun, the MPI world (the unique id travels over MPI); or HOTSPA_WORLD_SIZE
            // processes started with HOTSPA_RANK, HOTSPA_NCCL_ADDR and HOTSPA_NCCL_SECRET.
            let mpi = comm::mpi::launch().is_some_and(|(_, size)| size > 1);
            let mut c: Box<dyn comm::Communicator> = if mpi {
                let world = comm::MpiComm::init()?;
                Box::new(comm::NcclComm::from_world(&world)?)
            } else if std::env::var("HOTSPA_WORLD_SIZE").is_ok() {
                Box::new(comm::NcclComm::from_env()?)
            } else {
                Box::new(comm::NcclComm::single(0)?)
            };
            let (rank, size) = (c.rank().0, c.size());
            let checks: Vec<&str> = comm::conformance::CHECKS.iter().map(|c| c.name).collect();
            match comm::conformance::run_all(c.as_mut()) {
                Ok(()) => println!(
                    "nccl rank {rank} of {size}: {} communicator checks passed ({})",
                    checks.len(),
                    checks.join(", ")
                ),
                Err(e) => {
                    println!("nccl rank {rank} of {size}: FAILED: {e}");
                    failed += 1;
                }
            }
        }
        "mpi" => {
            let mut c = comm::MpiComm::init()?;
            let (rank, size) = (c.rank().0, c.size());
            let checks: Vec<&str> = comm::conformance::CHECKS.iter().map(|c| c.name).collect();
            let outcome = comm::conformance::run_all(&mut c);
            // Every rank reports before any leaves (the missing-rank check returns early on the
            // last rank on purpose).
            let mut flag = [f32::from(u8::from(outcome.is_err()))];
            c.all_reduce(&mut flag, comm::ReduceOp::Max)?;
            match outcome {
                Ok(()) => println!(
                    "mpi rank {rank} of {size} (nodes {:?}): {} communicator checks passed ({})",
                    c.nodes(),
                    checks.len(),
                    checks.join(", ")
                ),
                Err(e) => {
                    println!("mpi rank {rank} of {size}: FAILED: {e}");
                    failed += 1;
                }
            }
            if flag[0] > 0.0 && failed == 0 {
                bail!("another MPI rank failed its conformance checks");
            }
        }
        other => bail!("--backend {other}: use cuda, nccl, mpi or cpu"),
    }
    if failed > 0 {
        bail!("{failed} conformance checks failed");
    }
    Ok(())
}
