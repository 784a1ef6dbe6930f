//! A whole replica on one device — the single-device exec graph over a group of the rank
//! alone, its parameters uploaded and an AdamW over them — as a parameter-server worker and a
//! federated client train with it, and what they share: gradients of a share of a batch, flat
//! parameters cut back into pieces, one replica's weights as the run's result.

use comm::{Communicator, Rank};
use data::Packing;
use graph::{ExecGraph, Schedule, Strategy};
use kernels::Backend;
use model::{rank_exec, Held};
use runtime::{pipeline_step, Optimizer, RankGroups, StepGradients};

use crate::error::Result;
use crate::job::{Collected, Job};

/// One device holding the whole model.
pub(crate) struct Replica<B: Backend> {
    pub exec: ExecGraph,
    pub groups: RankGroups,
    pub opt: Optimizer<B>,
    /// Tied copies held by another stage (none on one device, as `rank_params` says).
    pub shared: Vec<bool>,
    /// What the replica holds, for gathering its weights.
    pub held: Held,
}

impl<B: Backend> Replica<B> {
    /// Rank `world.rank()` as a whole replica of `job`'s initial weights on `be`; also returns
    /// those weights on the host, one vector per parameter in the graph's order.
    pub fn new(job: &Job, be: &B, world: &dyn Communicator) -> Result<(Self, Vec<Vec<f32>>)> {
        let cfg = &job.cfg;
        let alone = world.sub_group(&[Rank(world.rank().0)])?;
        let single = Strategy::single();
        let exec = rank_exec(&cfg.model, &single, 0)?;
        let groups = RankGroups::new(alone.as_ref(), &single)?;
        let (opt, rp) = crate::optim::start(cfg, be, &exec, &groups, &job.weights, 0)?;
        let held = model::held(&cfg.model, &exec)?;
        let replica = Replica {
            exec,
            groups,
            opt,
            shared: rp.shared,
            held,
        };
        Ok((replica, rp.params))
    }

    /// The gradients of DP part `part` of `parts` of `batch` (as `packing` deals), the loss
    /// scaled by `scale`.
    #[allow(clippy::too_many_arguments)] // a share of a batch and how to run it
    pub fn gradients(
        &mut self,
        be: &B,
        batch: &[Vec<u32>],
        packing: &Packing,
        parts: usize,
        part: usize,
        scale: f32,
        schedule: Schedule,
    ) -> Result<StepGradients<B>> {
        let mbs = runtime::micro_batches(batch, packing, parts, part, scale)?;
        Ok(pipeline_step(
            be,
            &self.exec,
            &mut self.groups,
            self.opt.params(),
            &self.shared,
            &mbs,
            schedule,
        )?)
    }
}

/// `flat` cut into consecutive pieces of `lens`.
pub(crate) fn split(flat: &[f32], lens: &[usize]) -> Vec<Vec<f32>> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            at += len;
            flat[at - len..at].to_vec()
        })
        .collect()
}

/// The run's result when every one of `replicas` ranks holds the whole model: the first one's
/// `pieces` (gathering reads DP rank 0), the others empty, and every rank's peak bytes.
pub(crate) fn whole_model(
    pieces: Vec<Vec<f32>>,
    held: &Held,
    replicas: usize,
    peaks: Vec<usize>,
) -> Collected {
    let mut per_rank = vec![(pieces, held.clone())];
    per_rank.extend((1..replicas).map(|_| (Vec::new(), held.clone())));
    (per_rank, peaks)
}
