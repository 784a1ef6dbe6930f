//! The one error type of the `graph` crate.

use thiserror::Error;

/// What can be wrong with a graph, a pass over it, or a strategy spec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GraphError {
    /// Operand shapes do not fit the op.
    #[error("{op}: {reason}")]
    Shape {
        /// The op (with its output's name).
        op: String,
        /// What does not fit.
        reason: String,
    },
    /// The graph is malformed (a tensor used before it is produced, produced twice, …).
    #[error("invalid graph: {0}")]
    Invalid(String),
    /// A strategy spec does not parse or does not fit the devices.
    #[error("strategy `{spec}`: {reason}")]
    Strategy {
        /// The spec as written.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature that is not built yet.
    #[error("not implemented yet: {0}")]
    NotImplemented(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, GraphError>;
