//! Errors of the planner.

use thiserror::Error;

/// What can go wrong when estimating or planning.
#[derive(Debug, Error)]
pub enum PlanError {
    /// A sequence no candidate strategy can hold in memory.
    #[error(
        "a sequence of {len} tokens fits no strategy: the longest any can hold is {longest} tokens{}",
        if *context { "" } else { " (context parallelism and recomputation not searched)" }
    )]
    TooLong {
        /// The sequence length.
        len: usize,
        /// The longest sequence any candidate holds.
        longest: usize,
        /// Whether the candidates included context parallelism and recomputation.
        context: bool,
    },
    /// A plan that does not fit the cluster, the model or its sequences.
    #[error("invalid plan: {0}")]
    Invalid(String),
    /// The switch planner failed.
    #[error("switch plan: {0}")]
    Switch(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, PlanError>;
