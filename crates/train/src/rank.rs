//! What a rank's training loop needs of the job: its step runner, every rank's holdings, a
//! replica's share of the tokens.

use comm::Communicator;
use kernels::Backend;
use model::{rank_exec, Held};

use crate::config::StrategySpec;
use crate::error::Result;
use crate::hot::{HotRank, HotSetup};
use crate::job::Job;
use crate::runner::{HotRunner, PlannedRunner, StaticRunner, StepRunner};

/// How many distinct plans' ranks automatic planning keeps.
pub const PLAN_CACHE: usize = 8;

impl Job {
    /// The tokens this rank's DP replica predicts of `batch` (its share as the runtime deals).
    pub(crate) fn own_predicted(&self, batch: &[Vec<u32>], me: usize) -> usize {
        let (dp_rank, _) = self.inst.data_coords(me);
        let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
        let dealt = self.cfg.packing_of(0).deal(&lens, self.inst.dp);
        dealt
            .get(dp_rank)
            .map(|mine| mine.iter().map(|&k| lens[k].saturating_sub(1)).sum())
            .unwrap_or(0)
    }

    /// What every rank holds (world rank 0 assembles checkpoints and the result from it).
    pub(crate) fn everyones_held(&self, size: usize) -> Result<Vec<Held>> {
        let mut by_stage: Vec<Option<Held>> = vec![None; self.inst.pp];
        (0..size)
            .map(|r| {
                let stage = self.inst.coords(r).0;
                if by_stage[stage].is_none() {
                    let exec = rank_exec(&self.cfg.model, &self.inst, r)?;
                    by_stage[stage] = Some(model::held(&self.cfg.model, &exec)?);
                }
                Ok(by_stage[stage].clone().unwrap_or_default())
            })
            .collect()
    }

    /// The step runner of the run's strategy spec.
    pub(crate) fn runner<B: Backend>(
        &self,
        world: &dyn Communicator,
        exec: graph::ExecGraph,
        shared: Vec<bool>,
    ) -> Result<Box<dyn StepRunner<B>>> {
        let cfg = &self.cfg;
        let schedule = cfg.pipeline_schedule;
        let setup = HotSetup {
            cfg: cfg.model.clone(),
            devices_per_node: self.devices_per_node,
            agreement: self.agreement.clone(),
            schedule,
            buckets: self.buckets.clone(),
        };
        Ok(match (&cfg.strategy, &self.planner) {
            (StrategySpec::Hot(plan), _) => {
                let packings: Vec<_> = (0..plan.buckets.len()).map(|i| cfg.packing_of(i)).collect();
                let rank = HotRank::new(plan, &packings, &setup, world)?;
                Box::new(HotRunner::new(rank, schedule))
            }
            (StrategySpec::Auto(auto), Some(planner)) => Box::new(
                PlannedRunner::new(
                    planner.clone(),
                    self.inst.clone(),
                    cfg.packing_of(0),
                    setup,
                    PLAN_CACHE,
                )
                .with_concurrent(auto.concurrent),
            ),
            _ => Box::new(StaticRunner::new(exec, shared, cfg.packing_of(0), schedule)),
        })
    }
}
