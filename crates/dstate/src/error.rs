//! The one error type of the `dstate` crate.

use thiserror::Error;

/// Everything that can be wrong with a device group, a DState or a request made of them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DStateError {
    /// The axis degrees of a DState do not multiply to the size of its device group.
    #[error("degrees {factors} = {product} do not match the device group size {group_size}")]
    DegreeProduct {
        /// The factors as written, e.g. `2 × 3`.
        factors: String,
        /// Their product.
        product: usize,
        /// The number of devices in the group.
        group_size: usize,
    },
    /// An axis was given degree 0.
    #[error("axis {axis} has degree 0; every degree must be at least 1")]
    ZeroDegree {
        /// Index of the offending axis, outermost first.
        axis: usize,
    },
    /// A device group was empty or named a device twice.
    #[error("invalid device group: {reason}")]
    InvalidGroup {
        /// What is wrong with it.
        reason: String,
    },
    /// `Split(dim)` names a dimension the tensor does not have.
    #[error("axis {axis} splits dim {dim} but the tensor has rank {rank} (shape {shape:?})")]
    SplitDimOutOfRange {
        /// Index of the offending axis.
        axis: usize,
        /// The dim it splits.
        dim: usize,
        /// The tensor's rank.
        rank: usize,
        /// The tensor's shape.
        shape: Vec<usize>,
    },
    /// A Partial axis appeared where the context needs materialised values.
    #[error("Partial placement on axis {axis} is not allowed for {context}")]
    PartialNotAllowed {
        /// Index of the Partial axis.
        axis: usize,
        /// What needed materialised values (e.g. "a parameter", "a resharding destination").
        context: String,
    },
    /// A device index outside the group was asked for.
    #[error("device index {index} is outside a group of {size} devices")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The group size.
        size: usize,
    },
    /// Two DStates do not have the same axis degrees, so no one-axis transition joins them.
    #[error("no one-axis transition from {from} to {to}: the axis degrees differ")]
    DegreeMismatch {
        /// Source DState.
        from: String,
        /// Destination DState.
        to: String,
    },
    /// Two DStates differ on more than one axis.
    #[error(
        "no one-axis transition from {from} to {to}: axes {axes:?} change; use a resharding plan"
    )]
    NotOneAxis {
        /// Source DState.
        from: String,
        /// Destination DState.
        to: String,
        /// The axes whose placement changes.
        axes: Vec<usize>,
    },
    /// The placement change has no collective (e.g. `S(0) → P`).
    #[error("no collective turns {from} into {to} on axis {axis}")]
    NoCollective {
        /// Source placement.
        from: String,
        /// Destination placement.
        to: String,
        /// The axis.
        axis: usize,
    },
    /// The changed axis is not the innermost one splitting the dim, so the pieces it exchanges are
    /// not contiguous chunks of each other and a single collective does not suffice.
    #[error(
        "axis {axis} changes the split of dim {dim} but inner axis {inner_axis} also splits it; \
         a single collective cannot do this, use a resharding plan"
    )]
    InnerSplitConflict {
        /// The changed axis.
        axis: usize,
        /// The tensor dim concerned.
        dim: usize,
        /// The inner axis that splits the same dim.
        inner_axis: usize,
    },
    /// A buffer's length does not match the shape or region it stands for.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which buffer.
        what: String,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, DStateError>;
