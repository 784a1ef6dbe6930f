//! Held-out loss and perplexity: the loss over every predicted token of a dataset, under any
//! strategy and device count (`hotspa eval`, and `--eval-data` every `--eval-every` steps of a
//! run, on the weights the optimizer holds).

use std::sync::Arc;

use comm::{Communicator, ThreadComm};
use data::Dataset;
use kernels::{Backend, CpuBackend, CudaBackend};
use model::{rank_exec, RankParams};
use runtime::{Optimizer, RankGroups};
use serde::Serialize;

use crate::config::{Device, TrainConfig};
use crate::error::Result;
use crate::metrics::Sink;
use crate::runner::{StaticRunner, StepInput, StepRunner};

/// The loss of a dataset: the mean next-token cross-entropy over every predicted token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean loss per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens predicted (every position but the last of each sequence).
    pub predicted_tokens: u64,
    /// Sequences (documents cut to `max_len`).
    pub sequences: usize,
}

impl Evaluation {
    fn from_sum(sum: f64, predicted: u64, sequences: usize) -> Self {
        let loss = sum / predicted.max(1) as f64;
        Evaluation {
            loss,
            perplexity: loss.exp(),
            predicted_tokens: predicted,
            sequences,
        }
    }
}

/// Runs every sequence of `data` in order, `batch` at a time, through `runner` on the
/// optimizer's current weights: (loss summed over every predicted token, predicted tokens).
/// Every rank of the strategy calls it with the same data.
pub(crate) fn loss_sum<B: Backend>(
    runner: &mut dyn StepRunner<B>,
    backend: &B,
    world: &dyn Communicator,
    optimizer: &Optimizer<B>,
    groups: &mut RankGroups,
    data: &Dataset,
    batch: usize,
) -> Result<(f64, u64)> {
    let (mut sum, mut predicted) = (0.0f64, 0u64);
    for chunk in data.sequences().chunks(batch.max(1)) {
        // The loss scale 1 makes the step's loss the sum over its predicted tokens.
        let out = runner.gradients(StepInput {
            backend,
            world,
            optimizer,
            groups,
            batch: chunk,
            loss_scale: 1.0,
        })?;
        sum += f64::from(out.loss);
        predicted += chunk.iter().map(|s| s.len() as u64 - 1).sum::<u64>();
    }
    Ok((sum, predicted))
}

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
    Ok(Evaluation::from_sum(sum, predicted, sequences))
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
    let mut runner = StaticRunner::new(exec, shared, cfg.budget(0), cfg.pipeline_schedule);
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

/// [`Evaluation`] from a loss sum over `predicted` tokens of `sequences` sequences.
pub(crate) fn evaluation(sum: f64, predicted: u64, sequences: usize) -> Evaluation {
    Evaluation::from_sum(sum, predicted, sequences)
}
