//! Errors of the simulator.

use thiserror::Error;

/// What can go wrong in a simulation.
#[derive(Debug, Error)]
pub enum SimError {
    /// An unknown preset name.
    #[error("unknown {what} `{name}`: use {known}, or a file")]
    UnknownPreset {
        /// cluster, dataset or model.
        what: &'static str,
        /// The name given.
        name: String,
        /// The presets.
        known: String,
    },
    /// A cluster or lengths file that cannot be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, with the line where known.
        reason: String,
    },
    /// A scenario that cannot run (devices, lengths).
    #[error("{0}")]
    Invalid(String),
    /// The planner failed.
    #[error(transparent)]
    Plan(#[from] planner::PlanError),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, SimError>;
