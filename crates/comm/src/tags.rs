//! Every tag hotspa's own code sends point-to-point messages with, in one place so that no two
//! uses can collide. Tags stay below [`MAX`], the most every communicator takes (MPI guarantees
//! tags up to 32767 and `MpiComm` reserves three).
//!
//! ```
//! use comm::tags;
//!
//! let first = tags::pipeline(0, false, 0);
//! assert!(first > tags::GATHER_DATA);
//! // Tags repeat after a window of micro-batches; messages of one tag arrive in order.
//! assert_eq!(tags::pipeline(tags::PIPELINE_WINDOW, true, 1), tags::pipeline(0, true, 1));
//! assert!(tags::pipeline(tags::PIPELINE_WINDOW - 1, true, 7) <= tags::MAX);
//! ```

/// The largest tag any communicator accepts.
pub const MAX: u32 = 32764;

/// Headers of the pieces every rank sends to rank 0 (checkpoints, final weights).
pub const GATHER_HEADER: u32 = 0;
/// The values those headers describe.
pub const GATHER_DATA: u32 = 1;
/// Free for tests and tools (never used by the training code).
pub const SCRATCH: u32 = 2;
/// The exchanges of the all-reduce algorithms in [`crate::allreduce`] (reduction phase).
pub const ALLREDUCE: u32 = 3;
/// Their broadcast phase (the double tree's way down).
pub const ALLREDUCE_DOWN: u32 = 4;
/// Sparse and compressed gradient exchanges.
pub const COMPRESSED: u32 = 5;
/// Gradients a worker pushes to a parameter server (and its "done").
pub const PS_PUSH: u32 = 6;
/// Parameters a server sends a worker in reply.
pub const PS_PARAMS: u32 = 7;

/// The first tag of the pipeline's activations and their gradients.
const PIPELINE_BASE: u32 = 16;
/// Inputs (or outputs) a stage may exchange per micro-batch and direction.
pub const PIPELINE_INPUTS: usize = 8;
/// Micro-batches after which the pipeline's tags repeat. Safe because a stage sends its
/// activations (and receives their gradients) in micro-batch order and its neighbour receives
/// them in the same order, and messages with one tag between two ranks arrive in the order they
/// were sent.
pub const PIPELINE_WINDOW: usize = (MAX - PIPELINE_BASE) as usize / (2 * PIPELINE_INPUTS);

/// The tag of input `input` (below [`PIPELINE_INPUTS`]) of micro-batch `micro_batch`, forward
/// (activations) or backward (their gradients), between two neighbouring pipeline stages.
pub fn pipeline(micro_batch: usize, backward: bool, input: usize) -> u32 {
    let slot = ((micro_batch % PIPELINE_WINDOW) * 2 + usize::from(backward)) * PIPELINE_INPUTS
        + input % PIPELINE_INPUTS;
    PIPELINE_BASE + slot as u32
}

/// Whether `tag` is one of [`pipeline`]'s.
pub fn is_pipeline(tag: u32) -> bool {
    tag >= PIPELINE_BASE
}
