//! The CUDA backend (DESIGN §4: "CUDA behind a feature").
//!
//! With the cargo feature `cuda`, [`CudaBackend`] runs every kernel of the [`Backend`] trait on
//! an NVIDIA GPU through `cudarc` with dynamic loading: the binary builds on a machine without
//! CUDA and loads `libcuda`, `libcublas` and `libnvrtc` (CUDA 13 names) when a backend is opened.
//! GEMMs go through cuBLAS (`cublasGemmStridedBatchedEx`) in bf16 with f32 accumulation, or in
//! f32 ([`GemmPrecision`]); the other kernels are CUDA C (`ops.cu`, `attention.cu`) compiled by
//! NVRTC at first use and cached for the process. Attention is FlashAttention-2's algorithm
//! (tiles, online softmax, `lse` kept for a backward that recomputes the tiles) over packed
//! variable-length sequences with causal masking and grouped-query heads; its backward is
//! deterministic (no atomics).
//!
//! Without the feature the types exist and [`CudaBackend::new`] returns
//! [`KernelError::Unavailable`](crate::KernelError::Unavailable).
//!
//! [`Backend`]: crate::Backend

use std::fmt;
use std::str::FromStr;

/// The CUDA C of the element-wise, norm, embedding, loss and optimizer kernels.
pub const OPS_SRC: &str = include_str!("ops.cu");
/// The CUDA C of the attention kernels (compiled with `-DHEAD_DIM=…`).
pub const ATTENTION_SRC: &str = include_str!("attention.cu");

/// Input precision of the GEMMs (accumulation is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// Operands rounded to bf16 (the fp32 master weights stay f32): the training default.
    #[default]
    Bf16,
    /// Plain f32 operands (no TF32): for exactness checks against the CPU backend.
    F32,
}

impl fmt::Display for GemmPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GemmPrecision::Bf16 => "bf16",
            GemmPrecision::F32 => "f32",
        })
    }
}

impl FromStr for GemmPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(GemmPrecision::Bf16),
            "f32" | "fp32" => Ok(GemmPrecision::F32),
            _ => Err(format!("unknown GEMM precision {s:?} (bf16 or f32)")),
        }
    }
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::{compile, device_count, CudaBackend, CudaBuffer};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{device_count, CudaBackend, CudaBuffer};
