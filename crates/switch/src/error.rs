//! The one error type of the `switch` crate.

use thiserror::Error;

/// Why a switch could not be planned or executed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SwitchError {
    /// The DState algebra refused a distribution or a shape.
    #[error("tensor {tensor}: {source}")]
    State {
        /// The tensor's name.
        tensor: String,
        /// What dstate said.
        source: dstate::DStateError,
    },
    /// A source or destination holds Partial values; switching those needs a reduction, which
    /// the planner does not do (reduce first, then switch the Duplicate result).
    #[error("tensor {0}: Partial placements are not switched (reduce them first)")]
    Partial(String),
    /// Some element of the destination has no owner under the source.
    #[error("tensor {tensor}: region {region} has no owner under the source")]
    NoOwner {
        /// The tensor's name.
        tensor: String,
        /// The region, in global indices.
        region: String,
    },
    /// The local pieces handed to `execute` do not match the plan.
    #[error("execute: {0}")]
    Pieces(String),
    /// The communicator failed.
    #[error(transparent)]
    Comm(#[from] comm::CommError),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, SwitchError>;
