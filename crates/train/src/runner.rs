//! The step-runner seam: how a step turns the global batch into gradients for the optimizer's
//! pieces — under one strategy ([`StaticRunner`]), under several with hot switches
//! ([`HotRunner`]), or under whatever the planner chooses for the batch ([`PlannedRunner`]).
//! The rank loop owns the optimizer (in the instantiation strategy's layout) and its groups;
//! a runner only produces gradients in that layout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use comm::Communicator;
use data::Packing;
use graph::{ExecGraph, Schedule, Strategy};
use kernels::Backend;
use planner::{Plan, Planner};
use runtime::{pipeline_step, Optimizer, RankGroups};

use crate::error::Result;
use crate::hot::{HotRank, HotSetup};
use crate::metrics::{HotMetrics, PlanMetrics};

/// What a runner works with during one step.
pub struct StepInput<'a, B: Backend> {
    /// The rank's backend.
    pub backend: &'a B,
    /// The world.
    pub world: &'a dyn Communicator,
    /// The optimizer: its parameters are the instantiation strategy's.
    pub optimizer: &'a Optimizer<B>,
    /// The instantiation strategy's groups.
    pub groups: &'a mut RankGroups,
    /// The global batch (every rank passes the same).
    pub batch: &'a [Vec<u32>],
    /// `1 / predicted tokens of the global batch` (DESIGN §3).
    pub loss_scale: f32,
    /// Under `--comm-schedule priority`, the weights being updated while this step runs (the
    /// optimizer has lent its own): a pass reads each when it is published.
    pub gate: Option<&'a runtime::Gate<B>>,
}

/// A step's gradients and what the runner reports of it.
pub struct StepGradients<B: Backend> {
    /// Loss of the global batch.
    pub loss: f32,
    /// The gradient of every piece the optimizer holds (its layout, reduced over DP; flat chunks
    /// under ZeRO-2/3).
    pub grads: Vec<B::Buffer>,
    /// The most activation and gradient bytes this rank held at once.
    pub peak_bytes: usize,
    /// Hot switching: time per strategy and in switches.
    pub hot: Option<HotMetrics>,
    /// Automatic planning: the plan.
    pub plan: Option<PlanMetrics>,
    /// Under `--comm-schedule priority`: the first piece summed during the backward (the
    /// ones before it wait for the next step).
    pub presummed: Option<usize>,
}

impl<B: Backend> From<crate::hot::HotStep<B>> for StepGradients<B> {
    fn from(r: crate::hot::HotStep<B>) -> Self {
        StepGradients {
            loss: r.loss,
            grads: r.grads,
            peak_bytes: r.peak_bytes,
            hot: Some(r.metrics),
            plan: None,
            presummed: None,
        }
    }
}

impl HotRank {
    /// [`HotRank::step`] on a runner's input.
    fn step_input<B: Backend>(
        &mut self,
        input: StepInput<'_, B>,
        schedule: Schedule,
    ) -> Result<crate::hot::HotStep<B>> {
        self.step(
            input.backend,
            input.world,
            input.optimizer,
            input.groups,
            input.batch,
            input.loss_scale,
            schedule,
        )
    }
}

/// How a step turns batches into gradients (DESIGN §4's step-runner seam).
pub trait StepRunner<B: Backend> {
    /// The gradients of `input.batch` for the optimizer's pieces.
    fn gradients(&mut self, input: StepInput<'_, B>) -> Result<StepGradients<B>>;
}

/// Every sequence under one strategy: the instantiation strategy itself.
pub struct StaticRunner {
    exec: ExecGraph,
    shared: Vec<bool>,
    packing: Packing,
    schedule: Schedule,
}

impl StaticRunner {
    /// Runs `exec` (this rank's exec graph of the optimizer's strategy) with micro-batches of
    /// `packing` under `schedule`; `shared` marks tied weights.
    pub fn new(exec: ExecGraph, shared: Vec<bool>, packing: Packing, schedule: Schedule) -> Self {
        Self {
            exec,
            shared,
            packing,
            schedule,
        }
    }
}

impl<B: Backend> StepRunner<B> for StaticRunner {
    fn gradients(&mut self, input: StepInput<'_, B>) -> Result<StepGradients<B>> {
        let s = &self.exec.strategy;
        let packing = self.packing;
        let me = input.world.rank().0;
        let mbs = runtime::rank_micro_batches(input.batch, &packing, s, me, input.loss_scale)?;
        let params: runtime::ParamView<'_, B> = match input.gate {
            Some(gate) => gate.into(),
            None => input.optimizer.params().into(),
        };
        let out = pipeline_step(
            input.backend,
            &self.exec,
            input.groups,
            params,
            &self.shared,
            &mbs,
            self.schedule,
        )?;
        Ok(StepGradients {
            loss: out.loss,
            grads: out.grads,
            peak_bytes: out.peak_bytes,
            hot: None,
            plan: None,
            presummed: out.presummed,
        })
    }
}

/// A fixed hot-switching schedule.
pub struct HotRunner {
    rank: HotRank,
    schedule: Schedule,
}

impl HotRunner {
    /// Runs `rank`'s schedule with pipelines under `schedule`.
    pub fn new(rank: HotRank, schedule: Schedule) -> Self {
        Self { rank, schedule }
    }
}

impl<B: Backend> StepRunner<B> for HotRunner {
    fn gradients(&mut self, input: StepInput<'_, B>) -> Result<StepGradients<B>> {
        Ok(self.rank.step_input(input, self.schedule)?.into())
    }
}

/// The planner's plan for every batch around a fixed instantiation strategy; the ranks of the
/// last few distinct plans are kept (their exec graphs, groups and switch plans).
pub struct PlannedRunner {
    planner: Arc<Planner>,
    inst: Strategy,
    packing: Packing,
    setup: HotSetup,
    /// Most recently used last.
    cache: VecDeque<(String, HotRank)>,
    capacity: usize,
    /// Whether a step may run as concurrent groups ([`Planner::auto_or_groups`]).
    concurrent: bool,
}

impl PlannedRunner {
    /// Plans every step with `planner` around `inst` (every bucket packed by `packing`); keeps
    /// the ranks of `capacity` plans.
    pub fn new(
        planner: Arc<Planner>,
        inst: Strategy,
        packing: Packing,
        setup: HotSetup,
        capacity: usize,
    ) -> Self {
        Self {
            planner,
            inst,
            packing,
            setup,
            cache: VecDeque::new(),
            capacity: capacity.max(1),
            concurrent: false,
        }
    }

    /// Lets a step run as concurrent groups of devices where the cost model says that is
    /// faster ([`Planner::auto_or_groups`]).
    pub fn with_concurrent(mut self, on: bool) -> Self {
        self.concurrent = on;
        self
    }

    /// The plans whose ranks are kept, least recently used first.
    pub fn cached(&self) -> Vec<&str> {
        self.cache.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The kept rank of `plan`, built (and the least recently used one dropped) if need be.
    /// Every rank plans the same batches the same way, so every rank keeps and drops the same.
    fn rank_for(&mut self, plan: &Plan, world: &dyn Communicator) -> Result<&mut HotRank> {
        let key = plan.to_string();
        let rank = match self.cache.iter().position(|(k, _)| *k == key) {
            Some(i) => self.cache.remove(i).map(|(_, r)| r),
            None => None,
        };
        let rank = match rank {
            Some(r) => r,
            None => HotRank::new(
                plan,
                &vec![self.packing; plan.buckets.len()],
                &self.setup,
                world,
            )?,
        };
        if self.cache.len() >= self.capacity {
            self.cache.pop_front();
        }
        self.cache.push_back((key, rank));
        let last = self.cache.len() - 1;
        Ok(&mut self.cache[last].1)
    }
}

impl<B: Backend> StepRunner<B> for PlannedRunner {
    fn gradients(&mut self, input: StepInput<'_, B>) -> Result<StepGradients<B>> {
        let t = Instant::now();
        let lens: Vec<usize> = input.batch.iter().map(Vec::len).collect();
        let (plan, est) = if self.concurrent {
            self.planner
                .auto_or_groups(&lens, &self.inst, planner::MAX_GROUPS)
        } else {
            self.planner.auto_with(&lens, Some(&self.inst))
        }
        .map_err(crate::planning::plan_error)?;
        let planning_seconds = t.elapsed().as_secs_f64();
        let schedule = self.setup.schedule;
        let rank = self.rank_for(&plan, input.world)?;
        let mut out: StepGradients<B> = rank.step_input(input, schedule)?.into();
        out.plan = Some(PlanMetrics {
            plan: plan.to_string(),
            planning_seconds,
            predicted_seconds: est.seconds,
        });
        Ok(out)
    }
}
