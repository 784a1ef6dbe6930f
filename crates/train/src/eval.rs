//! `hotspa eval`: the held-out loss and perplexity of a model under any strategy and device
//! count.

use std::sync::Arc;

use comm::{Communicator, ThreadComm};
use kernels::{Backend, CpuBackend, CudaBackend};
use model::{rank_exec, RankParams};
use runtime::RankGroups;

use crate::config::{Device, TrainConfig};
use crate::error::Result;
use crate::loss::{evaluation, loss_sum, Evaluation};
use crate::metrics::Sink;
use crate::runner::StaticRunner;

/// Evaluates the initial weights of `cfg` (`init`, e.g. a model folder) on `cfg.data` under
/// its strategy (a hot-switching or planned run's instantiation strategy) on thread ranks or,
/// under `mpirun`, one rank per process, `global_batch` sequences at a time.
pub fn evaluate(cfg: &TrainConfig, sink: &mut dyn Sink) -> Result<Evaluation> {
    let p = crate::prepare::prepare(cfg, sink)?;
    let sequences = p.data.sequences().len();
    let p = Arc::new(p);
    let one_rank = {
        let p = p.clone();
        move |world: &dyn Communicator, ranks_here: usize| -> Result<(f64, u64)> {
            match p.cfg.device {
                Device::Cpu => rank_eval(&p, &CpuBackend::for_ranks(ranks_here)?, world),
                Device::Cuda(precision) => {
                    let count = kernels::cuda::device_count()?;
                    let gpu = CudaBackend::new(world.rank().0 % count, precision)?;
                    rank_eval(&p, &gpu, world)
                }
            }
        }
    };
    let (sum, predicted) = match p.mpi.clone() {
        Some(world) => {
            let node = world.nodes()[world.rank().0];
            let here = world.nodes().iter().filter(|&&n| n == node).count();
            one_rank(world.as_ref(), here)?
        }
        None => {
            let n = p.cfg.devices;
            ThreadComm::run(n, move |world| one_rank(&world, n))?.swap_remove(0)
        }
    };
    Ok(evaluation(sum, predicted, sequences))
}

fn rank_eval<B: Backend>(
    p: &crate::prepare::Prepared,
    be: &B,
    world: &dyn Communicator,
) -> Result<(f64, u64)> {
    let cfg = &p.cfg;
    let me = world.rank().0;
    let (_, _, tp_rank) = p.inst.coords(me);
    let exec = rank_exec(&cfg.model, &p.inst, me)?;
    let mut groups = RankGroups::new(world, &p.inst)?;
    let (opt, RankParams { shared, .. }) =
        crate::optim::start(cfg, be, &exec, &groups, &p.weights, tp_rank)?;
    let mut runner = StaticRunner::new(exec, shared, cfg.packing_of(0), cfg.pipeline_schedule);
    loss_sum::<B>(
        &mut runner,
        be,
        world,
        &opt,
        &mut groups,
        &p.data,
        cfg.global_batch,
    )
}
