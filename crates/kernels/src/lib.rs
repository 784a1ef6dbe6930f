//! The `Backend` trait (DESIGN §4) and its CPU implementation. The CPU kernels are generic over
//! `f32`/`f64` ([`Real`]) so that every backward can be checked against central finite
//! differences of the same forward in `f64`. GEMM comes from the `gemm` crate; attention is
//! blockwise with an online softmax over packed variable-length sequences.
//!
//! ```
//! use kernels::{Backend, CpuBackend, GemmSpec};
//!
//! let cpu = CpuBackend::new(1)?;
//! // C (2×2) = A (2×3) · Bᵀ where B is stored 2×3.
//! let a = cpu.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let b = cpu.upload(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0])?;
//! let mut c = cpu.zeros(4)?;
//! cpu.gemm(&GemmSpec::new(2, 2, 3).trans(false, true), &a, &b, &mut c)?;
//! assert_eq!(cpu.download(&c)?, vec![4.0, 2.0, 10.0, 5.0]);
//! # Ok::<(), kernels::KernelError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![allow(clippy::ptr_arg)]

mod backend;
pub mod conformance;
pub mod cuda;
mod error;
mod layer;
pub mod matmul;
pub mod ops;
mod pool;
mod real;
pub mod simd;
mod tile;

pub use backend::{
    available_cores, AdamW, AttnShape, Backend, CpuBackend, HostSpan, Rope, RopeScaling, Rotation,
};
pub use cuda::{CudaBackend, CudaBuffer, GemmPrecision};
pub use error::{try_zeros, KernelError, Result};
pub use layer::{Kernel, Layer};
pub use matmul::GemmSpec;
pub use real::Real;
pub use tile::{Running, ScoreTile};
