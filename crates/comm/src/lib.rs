//! The `Communicator` trait (DESIGN §4) — collectives with uneven counts, point-to-point,
//! batched groups, sub-groups, timeouts that name the missing rank — and its in-process
//! implementation [`ThreadComm`], N ranks as threads. [`Counting`] records what a piece of code
//! communicates; [`conformance`] is the suite every implementation must pass.
//!
//! ```
//! use comm::{Communicator, ReduceOp, ThreadComm, CommError};
//!
//! let sums = ThreadComm::run(4, |c| -> Result<Vec<f32>, CommError> {
//!     let mut buf = vec![c.rank().0 as f32; 3];
//!     c.all_reduce(&mut buf, ReduceOp::Sum)?;
//!     Ok(buf)
//! })?;
//! assert!(sums.iter().all(|b| b == &vec![6.0; 3]));
//! # Ok::<(), CommError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod algorithms;
pub mod allreduce;
pub mod codec;
mod communicator;
pub mod conformance;
mod counting;
pub mod dgc;
mod error;
mod layer;
pub mod mpi;
pub mod nccl;
pub mod sketch;
pub mod sparse;
pub mod tags;
mod thread;
pub mod wire;
pub mod words;

pub use communicator::{chunk_counts, Communicator, Exposed, P2p, Rank, ReduceOp};
pub use counting::{CommKind, CommRecord, Counting};
pub use error::{CommError, Result};
pub use layer::{CollectiveCall, Layer};
pub use mpi::MpiComm;
pub use nccl::NcclComm;
pub use thread::{
    default_timeout, panic_message, timeout_from_env, ThreadComm, AFTER_FAILURE, DEFAULT_TIMEOUT,
};

/// What the unit tests of the codecs share.
#[cfg(test)]
pub(crate) mod testing {
    /// Rank `rank`'s made-up gradient of `len` values in [−0.6, 0.7].
    pub fn grad(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 + rank * 11) % 101) as f32 * 0.013 - 0.6)
            .collect()
    }
}
