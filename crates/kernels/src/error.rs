//! The one error type of the `kernels` crate.

use thiserror::Error;

/// A kernel refused its arguments. Kernels never fail on valid arguments.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KernelError {
    /// A buffer's length does not match the shape the call describes.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Length {
        /// The kernel.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// An argument is out of its domain (odd head dim for RoPE, bad cu_seqlens, …).
    #[error("{op}: {reason}")]
    Invalid {
        /// The kernel.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The device or one of its libraries (driver, cuBLAS, NVRTC) refused a call.
    #[error("{op}: device error: {message}")]
    Device {
        /// The kernel or call.
        op: &'static str,
        /// What the device library said.
        message: String,
    },
    /// The backend cannot run here (e.g. the CUDA backend on a machine without a GPU).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A buffer could not be allocated.
    #[error("out of memory: a buffer of {bytes} bytes could not be allocated")]
    OutOfMemory {
        /// Bytes asked for.
        bytes: usize,
    },
}

/// A zero-filled `Vec` of `len` values, or [`KernelError::OutOfMemory`] where the allocator
/// refuses (instead of aborting the process).
pub fn try_zeros<T: Clone + Default>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| KernelError::OutOfMemory {
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })?;
    v.resize(len, T::default());
    Ok(v)
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks a buffer length.
pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length {
            op,
            what,
            expected,
            got,
        })
    }
}

/// Builds an [`KernelError::Invalid`].
pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> KernelError {
    KernelError::Invalid {
        op,
        reason: reason.into(),
    }
}
