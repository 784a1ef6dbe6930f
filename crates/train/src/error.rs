//! The one error type of the `train` crate.

use std::path::PathBuf;

use thiserror::Error;

/// What can stop a training run.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A setting of the run is out of range or contradicts another; `setting` names it as the
    /// library's field (the CLI's flag has the same name with dashes).
    #[error("{setting}: {reason}")]
    Setting {
        /// The setting, e.g. `global_batch` or `strategies`.
        setting: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The loss of a step is not finite; the weights are those before the step.
    #[error("step {step}: the loss is {loss}; stopping before the update, weights unchanged")]
    NonFiniteLoss {
        /// The 1-based step.
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// A rank thread panicked or stopped without a result.
    #[error("rank {rank}: {reason}")]
    Rank {
        /// The world rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// A signal asked the run to stop, but a rank did not reach the end of its step in time:
    /// its state cannot be collected, so nothing beyond the last checkpoint was saved.
    #[error(
        "stopped by a signal, but {stuck}; the ranks' state cannot be collected, so nothing was \
         saved after {}",
        last_checkpoint.as_ref().map_or("the start (no checkpoint was written)".to_string(), |c| format!("the last checkpoint, {}", c.display()))
    )]
    Interrupted {
        /// Which rank did not get there, for how long, and where it was.
        stuck: String,
        /// The last checkpoint written, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// The checkpoint to resume from cannot be used.
    #[error("resuming from {}: {source}", dir.display())]
    Resume {
        /// The checkpoint directory given.
        dir: PathBuf,
        /// What is wrong with it.
        source: model::ModelError,
    },
    /// The model's config, weights or checkpoint.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The training data.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// A strategy or graph.
    #[error(transparent)]
    Graph(#[from] graph::GraphError),
    /// Running a step.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    /// Communication between ranks.
    #[error(transparent)]
    Comm(#[from] comm::CommError),
    /// A switch plan.
    #[error(transparent)]
    Switch(#[from] switch::SwitchError),
    /// A DState computation.
    #[error(transparent)]
    DState(#[from] dstate::DStateError),
    /// The planner.
    #[error(transparent)]
    Plan(#[from] planner::PlanError),
    /// The simulator's clock.
    #[error(transparent)]
    Sim(#[from] sim::SimError),
    /// A backend.
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

impl TrainError {
    /// A [`TrainError::Setting`].
    pub fn setting(setting: &'static str, reason: impl Into<String>) -> Self {
        TrainError::Setting {
            setting,
            reason: reason.into(),
        }
    }

    /// A closure turning an I/O error on `path` into a [`TrainError::Io`].
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, TrainError>;
