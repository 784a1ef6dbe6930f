//! One rank's share of a training step under a strategy: its TP and DP groups, gradient
//! accumulation over its micro-batches, and the DP gradient all-reduce.

use std::sync::Arc;

use comm::{Communicator, Rank};
use graph::{MeshAxis, Strategy, Zero};
use kernels::Backend;

use crate::agreement::{ExactAllReduce, GradientAgreement};
use crate::error::{Result, RuntimeError};
use crate::tp::TpGroup;

/// When the DP gradients are summed (`--comm-schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommSchedule {
    /// In buckets in the order the backward finishes them, overlapping the last backward
    /// (PyTorch DDP's scheme).
    #[default]
    Fifo,
    /// In pieces in the order the next forward needs them, overlapping the next step.
    Priority,
}

impl std::str::FromStr for CommSchedule {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fifo" => Ok(CommSchedule::Fifo),
            "priority" => Ok(CommSchedule::Priority),
            _ => Err(RuntimeError::Schedule(format!(
                "{s:?} is not a comm schedule: use fifo or priority"
            ))),
        }
    }
}

impl std::fmt::Display for CommSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommSchedule::Fifo => "fifo",
            CommSchedule::Priority => "priority",
        })
    }
}

/// A rank's communicators under a strategy.
pub struct RankGroups {
    /// The TP group (with sub-groups for multi-axis DStates).
    pub tp: TpGroup,
    /// The DP group: ranks holding the same pieces for different data (under context
    /// parallelism also for different tokens of the same data: `dp · cp` ranks).
    pub dp: Box<dyn Communicator>,
    /// The pipeline: one rank per stage, group rank = stage index.
    pub pp: Box<dyn Communicator>,
    /// A second handle on the DP group, used by the thread that reduces gradient buckets while
    /// the backward goes on.
    pub dp_grads: Box<dyn Communicator>,
    /// Size of a gradient bucket (default 4 MiB).
    pub bucket_bytes: usize,
    /// How the DP replicas agree on gradients (default [`ExactAllReduce`]).
    pub agreement: Arc<dyn GradientAgreement>,
    /// When the DP gradients are summed: during this step's backward (the default) or, by
    /// priority, the pieces the next forward reads first during the next step and the rest
    /// during this step's last backward.
    pub comm_schedule: CommSchedule,
    /// Under priority: the share of the parameters (by values, in the order the forward reads
    /// them) whose pieces wait for the next step; the others are summed while the last
    /// backward runs, the last layers' first ([`crate::stream::deferred`]). Default 1/3, the
    /// forward's share of a step's compute (a backward costs two forwards).
    pub priority_defer: f64,
}

impl RankGroups {
    /// Splits `world` (whose size must be the strategy's device count) into this rank's TP and
    /// DP groups. Every rank of `world` must call it.
    pub fn new(world: &dyn Communicator, strategy: &Strategy) -> Result<Self> {
        if world.size() != strategy.devices() {
            return Err(RuntimeError::Binding(format!(
                "strategy {strategy} needs {} ranks, the communicator has {}",
                strategy.devices(),
                world.size()
            )));
        }
        let me = world.rank().0;
        let ranks =
            |axis| -> Vec<Rank> { strategy.group(me, axis).into_iter().map(Rank).collect() };
        let mut tp = TpGroup::new(world.sub_group(&ranks(MeshAxis::Tp))?);
        let dp = world.sub_group(&ranks(MeshAxis::Dp))?;
        let pp = world.sub_group(&ranks(MeshAxis::Pp))?;
        let dp_grads = world.sub_group(&ranks(MeshAxis::Dp))?;
        if strategy.zero >= Zero::Parameters {
            tp = tp.with_dp(world.sub_group(&ranks(MeshAxis::Dp))?);
        }
        if strategy.cp > 1 {
            tp = tp.with_cp(world.sub_group(&ranks(MeshAxis::Cp))?, strategy.cp_exchange);
        }
        Ok(Self {
            tp,
            dp,
            pp,
            dp_grads,
            bucket_bytes: 4 << 20,
            agreement: Arc::new(ExactAllReduce),
            comm_schedule: CommSchedule::Fifo,
            priority_defer: 1.0 / 3.0,
        })
    }

    /// The same groups agreeing on gradients by `agreement`.
    pub fn with_agreement(mut self, agreement: Arc<dyn GradientAgreement>) -> Self {
        self.agreement = agreement;
        self
    }
}

/// What a rank holds after its share of a step.
pub struct StepGradients<B: Backend> {
    /// The loss of the whole global batch (summed over DP).
    pub loss: f32,
    /// This rank's gradient pieces, reduced over DP (under ZeRO-2/3 its flat chunk of each).
    pub grads: Vec<B::Buffer>,
    /// The most activation and gradient bytes alive at once on this rank, over every micro-batch
    /// in flight (a pipeline schedule keeps several); accumulated gradients not counted.
    pub peak_bytes: usize,
    /// Under priority: the first piece ([`crate::stream::pieces`] of the forward's order) that
    /// is summed already; the ones before it are this member's alone. `None` otherwise.
    pub presummed: Option<usize>,
}
