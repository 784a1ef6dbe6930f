//! The CPU kernels, generic over [`Real`](crate::Real) so that the same code runs in `f32` for
//! training and in `f64` for the finite-difference references.

pub mod adamw;
pub mod attention;
mod attention_shape;
pub mod attention_spans;
pub mod elementwise;
pub mod embedding;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod swiglu;
