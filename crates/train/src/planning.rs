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
    cost.packing = cfg.packing_of(0);
    cost.exchange = cfg.exchange;
    cost.schedule = cfg.pipeline_schedule;
    cost.priority = cfg.comm_schedule == runtime::CommSchedule::Priority;
    match cfg.buckets {
        crate::config::Buckets::Bytes(b) => cost.bucket_elems = (b / 4).max(1),
        crate::config::Buckets::Auto => cost.auto_buckets = true,
    }
    cost
}

/// A planner over [`cost_model`], searching context parallelism and recomputation when `cfg`'s
/// automatic planning asks for them ([`crate::AutoPlanning::context`]).
pub fn planner(cfg: &TrainConfig, cluster: Cluster) -> Planner {
    let mut planner = Planner::new(cost_model(cfg, cluster));
    planner.context = matches!(&cfg.strategy, StrategySpec::Auto(a) if a.context);
    planner
}

/// The bucket bytes each strategy's DP all-reduce uses.
#[derive(Clone)]
pub enum BucketSizer {
    /// The same for every strategy.
    Fixed(usize),
    /// By the α–β model of each strategy's DP group ([`CostModel::auto_bucket_bytes`]).
    Auto(std::sync::Arc<CostModel>),
}

impl BucketSizer {
    /// `cfg`'s buckets: `--bucket-mb auto` weighs the links of the simulated cluster, else of
    /// automatic planning's, else this machine's nominal ones (`devices_per_node` a node).
    pub fn of(cfg: &TrainConfig, devices_per_node: usize) -> Self {
        match cfg.buckets {
            crate::config::Buckets::Bytes(b) => Self::Fixed(b),
            crate::config::Buckets::Auto => {
                let cluster = cfg
                    .simulate
                    .clone()
                    .or_else(|| match &cfg.strategy {
                        StrategySpec::Auto(a) => Some(a.cluster.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| {
                        crate::exchange::nominal_cluster(cfg.devices, devices_per_node)
                    });
                Self::Auto(std::sync::Arc::new(cost_model(cfg, cluster)))
            }
        }
    }

    /// The bytes of `s`'s buckets.
    pub fn bytes(&self, s: &graph::Strategy) -> usize {
        match self {
            Self::Fixed(b) => *b,
            Self::Auto(cost) => cost.auto_bucket_bytes(s),
        }
    }
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
    let data = crate::inputs::load_data(cfg)?;
    Ok((0..cfg.steps)
        .map(|s| {
            data.batch(s, cfg.global_batch, cfg.shuffle_seed())
                .iter()
                .map(Vec::len)
                .collect()
        })
        .collect())
}
