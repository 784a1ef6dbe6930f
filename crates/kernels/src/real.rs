//! The element types the CPU kernels are generic over: `f32` for training, `f64` for the
//! finite-difference references.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point element the CPU kernels (and the `gemm` crate) support. Sealed: `f32`, `f64`.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
    + sealed::Sealed
{
    /// Converts from `f64` (rounding for `f32`).
    fn of(x: f64) -> Self;
    /// Converts to `f64`.
    fn to_f64_(self) -> f64;
    /// `x ← eˣ` over a slice (vectorised for `f32`, [`crate::simd`]; `f64` is the reference).
    fn exp_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    /// The largest value of a slice (−∞ when empty, NaNs skipped).
    fn max_of(xs: &[Self]) -> Self {
        xs.iter().fold(Self::neg_infinity(), |a, &b| a.max(b))
    }
    /// `x ← e^(x − shift)` over a slice, returning the sum of the new values (vectorised in
    /// lanes for `f32`, [`crate::simd::exp_sum`]).
    fn exp_sum(xs: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::zero();
        for x in xs {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
    /// SwiGLU's forward, elementwise: `out = g·σ(g)·up`.
    fn swiglu(gate: &[Self], up: &[Self], out: &mut [Self]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let s = Self::one() / (Self::one() + (-g).exp());
            *o = g * s * u;
        }
    }
    /// SwiGLU's backward, elementwise (lengths checked by the caller).
    fn swiglu_grad(
        dout: &[Self],
        gate: &[Self],
        up: &[Self],
        dgate: &mut [Self],
        dup: &mut [Self],
    ) {
        for i in 0..gate.len() {
            let g = gate[i];
            let s = Self::one() / (Self::one() + (-g).exp());
            dup[i] = dout[i] * g * s;
            dgate[i] = dout[i] * up[i] * s * (Self::one() + g * (Self::one() - s));
        }
    }
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn to_f64_(self) -> f64 {
        self as f64
    }
    fn exp_in_place(xs: &mut [Self]) {
        crate::simd::exp_in_place(xs)
    }
    fn max_of(xs: &[Self]) -> Self {
        crate::simd::max(xs)
    }
    fn exp_sum(xs: &mut [Self], shift: Self) -> Self {
        crate::simd::exp_sum(xs, shift)
    }
    fn swiglu(gate: &[Self], up: &[Self], out: &mut [Self]) {
        crate::simd::swiglu(gate, up, out)
    }
    fn swiglu_grad(
        dout: &[Self],
        gate: &[Self],
        up: &[Self],
        dgate: &mut [Self],
        dup: &mut [Self],
    ) {
        crate::simd::swiglu_grad(dout, gate, up, dgate, dup)
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn to_f64_(self) -> f64 {
        self
    }
}
