//! The one error type of the `runtime` crate.

use thiserror::Error;

/// What can stop a graph from running.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A kernel refused its arguments.
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    /// The graph is not runnable.
    #[error(transparent)]
    Graph(#[from] graph::GraphError),
    /// A collective failed (a peer timed out or failed).
    #[error(transparent)]
    Comm(#[from] comm::CommError),
    /// A DState computation failed.
    #[error(transparent)]
    DState(#[from] dstate::DStateError),
    /// The micro-batch is malformed.
    #[error("bad micro-batch: {0}")]
    Batch(String),
    /// Parameters bound to the graph do not match it.
    #[error("bad parameter binding: {0}")]
    Binding(String),
    /// Context parallelism cannot split or exchange this (a head count Ulysses cannot divide,
    /// buffers that do not fit the split).
    #[error("context parallelism: {0}")]
    Context(String),
    /// A pipeline or communication schedule cannot run this: an unknown name, a setting it
    /// is not built for, or a step it cannot finish in time.
    #[error("schedule: {0}")]
    Schedule(String),
    /// The gradient agreement's state does not fit the gradients (e.g. an error-feedback
    /// residual restored for another model).
    #[error("gradient agreement: {0}")]
    Agreement(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, RuntimeError>;
