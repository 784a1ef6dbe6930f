//! The one error type of the `comm` crate.

use std::time::Duration;

use thiserror::Error;

use crate::Rank;

/// What can go wrong in a communication call. Every blocking call ends, one way or another, within
/// the communicator's timeout.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CommError {
    /// A peer did not take part in time.
    #[error("rank {rank}: {op} timed out after {waited:?}: {detail}")]
    Timeout {
        /// The rank (world numbering) that gave up.
        rank: Rank,
        /// The operation, e.g. `all_reduce #4 on ranks [0, 1, 2, 3]`.
        op: String,
        /// How long it waited.
        waited: Duration,
        /// Who was missing, e.g. `rank 3 never arrived`.
        detail: String,
    },
    /// Another rank failed first; this one stopped waiting for it.
    #[error("rank {rank}: stopped because rank {failed} failed: {reason}")]
    PeerFailed {
        /// The rank (world numbering) reporting.
        rank: Rank,
        /// The rank (world numbering) that failed first.
        failed: Rank,
        /// Its error.
        reason: String,
    },
    /// A buffer does not match the counts of the call.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Length {
        /// The operation.
        op: &'static str,
        /// Which buffer or count list.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A rank outside the group was named.
    #[error("{op}: rank {rank} is not in a group of {size}")]
    InvalidRank {
        /// The operation.
        op: &'static str,
        /// The rank named (group numbering).
        rank: Rank,
        /// The group size.
        size: usize,
    },
    /// A sub-group request is malformed.
    #[error("invalid sub-group: {0}")]
    InvalidGroup(String),
    /// A rank's closure panicked.
    #[error("rank {rank} panicked: {message}")]
    Panicked {
        /// The rank (world numbering).
        rank: Rank,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// The backend is not available in this build or on this machine.
    #[error("communicator unavailable: {0}")]
    Unavailable(String),
    /// A name of an algorithm or codec (e.g. from a flag) that is not one.
    #[error("{what} `{input}`: {expected}")]
    Parse {
        /// What was being parsed, e.g. `gradient codec`.
        what: &'static str,
        /// The text given.
        input: String,
        /// What is accepted.
        expected: String,
    },
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, CommError>;

pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(CommError::Length {
            op,
            what,
            expected,
            got,
        })
    }
}
