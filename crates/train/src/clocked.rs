//! The cost model against the simulator's clock: a run timed step by step both ways.

use planner::{Cluster, Planner};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::planning::{batch_lengths, cost_model, plan_of};

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
    let cost = cost_model(cfg, cluster);
    out.steps
        .iter()
        .map(|m| {
            let k = m.step as usize;
            let lens = steps.get(k - 1).cloned().unwrap_or_default();
            // The step's own DGC warm-up fraction, as the run sends it.
            let mut at = cost.clone();
            at.exchange.step = Some(k as u64 - 1);
            let e = Planner::new(at).evaluate(&plan, &lens)?;
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
