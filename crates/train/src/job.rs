//! What the ranks of a process share — the job — and what they tell the thread that reports
//! and writes. The training loop over a job is in `rank`; the parameter server's workers and
//! federated clients run other loops over the same job.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use data::Dataset;
use graph::Strategy;
use model::{Checkpoint, Held, Weights};
use planner::Planner;
use runtime::GradientAgreement;

use crate::config::TrainConfig;
use crate::error::Result;
use crate::metrics::{StepMetrics, WorkerStep};
use crate::rank_state::RankState;
use crate::watchdog::{Fault, Heartbeats};

/// What the rank threads tell the thread that reports and writes.
pub(crate) enum Msg {
    /// One step's metrics (world rank 0).
    Step(Box<StepMetrics>),
    /// Every rank's pieces of the weights and both moments after `step` steps (rank 0, which
    /// collected them).
    Checkpoint { step: u64, parts: Vec<RankPart> },
    /// A worker's step under the parameter server.
    WorkerStep(WorkerStep),
    /// Something the run should tell the user (world rank 0's process).
    Notice(String),
    /// A worker under ASP or SSP left the run after its step failed.
    WorkerLost {
        worker: usize,
        rank: usize,
        step: usize,
        reason: String,
    },
    /// The ranks agreed to stop early, after `step` steps (world rank 0).
    Stopped { step: usize },
    /// The ranks of this process are done (world rank 0's result, or the first error).
    Finished(Result<Option<Collected>>),
}

/// One rank's pieces of the weights and both moments, with what it holds, and what its
/// gradient agreement keeps between steps.
pub(crate) type RankPart = ([Vec<Vec<f32>>; 3], Held, RankState);

/// On world rank 0 at the end: every rank's final pieces with what it holds, and every rank's
/// peak bytes.
pub(crate) type Collected = (Vec<(Vec<Vec<f32>>, Held)>, Vec<usize>);

/// Everything a rank needs, shared by the ranks of a process.
pub(crate) struct Job {
    pub cfg: Arc<TrainConfig>,
    /// The instantiation strategy: the optimizer's layout.
    pub inst: Strategy,
    pub weights: Arc<Weights>,
    pub data: Arc<Dataset>,
    pub resumed: Option<Arc<Checkpoint>>,
    pub start_step: usize,
    /// With automatic planning.
    pub planner: Option<Arc<Planner>>,
    pub devices_per_node: usize,
    pub agreement: Arc<dyn GradientAgreement>,
    /// Each strategy's gradient bucket bytes.
    pub buckets: crate::planning::BucketSizer,
    pub tx: Sender<Msg>,
    pub heartbeats: Arc<Heartbeats>,
    pub fault: Option<Fault>,
    /// Held-out data to evaluate on.
    pub eval_data: Option<Arc<Dataset>>,
}
