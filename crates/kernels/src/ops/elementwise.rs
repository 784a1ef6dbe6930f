//! Elementwise add, scale, axpy, norms and storage casts (`half`).

use half::{bf16, f16};

use crate::error::{check_len, Result};
use crate::real::Real;

/// `out = a + b`.
pub fn add<T: Real>(a: &[T], b: &[T], out: &mut [T]) -> Result<()> {
    check_len("add", "b", a.len(), b.len())?;
    check_len("add", "out", a.len(), out.len())?;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
    Ok(())
}

/// `y += alpha · x` (residual add and gradient accumulation).
pub fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) -> Result<()> {
    check_len("axpy", "y", x.len(), y.len())?;
    for (o, &v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
    Ok(())
}

/// `x *= alpha`.
pub fn scale<T: Real>(alpha: T, x: &mut [T]) {
    for v in x {
        *v *= alpha;
    }
}

/// `Σ x²` accumulated in f64 (for the global gradient norm).
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    x.iter().map(|&v| v.to_f64_() * v.to_f64_()).sum()
}

/// f32 → bf16, round to nearest even.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// bf16 → f32 (exact).
pub fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// f32 → f16, round to nearest even.
pub fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// f16 → f32 (exact).
pub fn from_f16(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Rounds f32 values through bf16 in place (what a bf16 compute copy of fp32 master weights sees).
pub fn round_through_bf16(x: &mut [f32]) {
    for v in x {
        *v = bf16::from_f32(*v).to_f32();
    }
}
