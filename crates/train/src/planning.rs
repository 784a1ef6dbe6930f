//! What the planner needs of a run: its cost model (packing as the runtime packs), the plan a
//! configuration runs, and the lengths of every step's global batch.

use planner::{Cluster, CostModel, Plan, Planner};

use crate::config::{StrategySpec, TrainConfig};
use crate::error::{Result, TrainError};

/// The cost model of `cfg`'s model on `cluster`, estimating the packing the runtime runs and
/// the gradient exchange the run uses (the planner weighs strategies with it; it never picks a
/// codec the user did not ask for).
pub fn cost_model(cfg: &TrainConfig, cluster: Cluster) -> CostModel {
    let mut cost = CostModel::new(cluster, cfg.model.clone());
    cost.packing = TrainConfig::packing(cfg.budget(0));
    cost.exchange = cfg.exchange;
    cost.schedule = cfg.pipeline_schedule;
    cost
}

/// A planner over [`cost_model`], searching context parallelism and recomputation when `cfg`'s
/// automatic planning asks for them ([`crate::AutoPlanning::context`]).
pub fn planner(cfg: &TrainConfig, cluster: Cluster) -> Planner {
    let mut planner = Planner::new(cost_model(cfg, cluster));
    planner.context = matches!(&cfg.strategy, StrategySpec::Auto(a) if a.context);
    planner
}

/// A planner's error as the run reports it: a sequence no searched strategy holds names the
/// setting that widens the search (on any step, not only the first batch's).
pub(crate) fn plan_error(e: planner::PlanError) -> TrainError {
    match e {
        planner::PlanError::TooLong { context: false, .. } => TrainError::setting(
            "plan_context",
            format!("{e}: add --plan-context to search them, or cut with --max-len"),
        ),
        e => e.into(),
    }
}

/// The plan `cfg` runs every step: its schedule, or one bucket of its strategy; `None` under
/// automatic planning (a plan per step).
pub fn plan_of(cfg: &TrainConfig) -> Option<Plan> {
    match &cfg.strategy {
        StrategySpec::Fixed(s) => Some(Plan::single(s.clone())),
        StrategySpec::Hot(p) => Some(p.clone()),
        StrategySpec::Auto(_) => None,
    }
}

/// The lengths of every step's global batch, as the run draws them.
pub fn batch_lengths(cfg: &TrainConfig) -> Result<Vec<Vec<usize>>> {
    let data = crate::run::load_data(cfg)?;
    Ok((0..cfg.steps)
        .map(|s| {
            data.batch(s, cfg.global_batch, cfg.shuffle_seed())
                .iter()
                .map(Vec::len)
                .collect()
        })
        .collect())
}

/// One step of a run timed two ways on one cluster: the cost model's estimate of its batch and
/// the simulator's clock of the run itself (every kernel and message of the real run, timed by
/// the cluster's rates and links).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClockedStep {
    /// 1-based step.
    pub step: usize,
    /// The cost model's seconds.
    pub predicted_s: f64,
    /// The clock's seconds.
    pub clocked_s: f64,
    /// The cost model's seconds by part.
    pub predicted: planner::Breakdown,
    /// The clock's seconds by phase (compute, elementwise, optimizer, transfer, wait).
    pub clocked: crate::metrics::SimulatedPhases,
    /// Kernels world rank 0 ran (the clock's count).
    pub clocked_kernels: u64,
}

/// Runs `cfg` (a given strategy or schedule) with the simulator's clock on `cluster` and sets
/// each step's clocked time beside the cost model's estimate of the same batch.
pub fn clock_against_model(cfg: &TrainConfig, cluster: &Cluster) -> Result<Vec<ClockedStep>> {
    let plan = plan_of(cfg).ok_or_else(|| {
        TrainError::setting(
            "strategies",
            "the clock is compared with the model for a given strategy or schedule, not auto",
        )
    })?;
    let cluster = cluster.take(cfg.devices);
    let mut run = cfg.clone();
    run.simulate = Some(cluster.clone());
    let out = crate::run::run(&run, &mut crate::metrics::NoSink)?;
    let steps = batch_lengths(cfg)?;
    let planner = Planner::new(cost_model(cfg, cluster));
    out.steps
        .iter()
        .map(|m| {
            let k = m.step as usize;
            let lens = steps.get(k - 1).cloned().unwrap_or_default();
            let e = planner.evaluate(&plan, &lens)?;
            let sim = m.simulated.clone().unwrap_or_default();
            Ok(ClockedStep {
                step: k,
                predicted_s: e.seconds,
                clocked_s: sim.simulated_seconds,
                predicted: e.breakdown,
                clocked: sim.simulated,
                clocked_kernels: sim.simulated_kernels,
            })
        })
        .collect()
}
