//! SwiGLU: `out = silu(gate) · up`, `silu(g) = g · σ(g)`.

use crate::error::{check_len, Result};
use crate::real::Real;

/// Forward, elementwise.
pub fn forward<T: Real>(gate: &[T], up: &[T], out: &mut [T]) -> Result<()> {
    check_len("swiglu", "up", gate.len(), up.len())?;
    check_len("swiglu", "out", gate.len(), out.len())?;
    T::swiglu(gate, up, out);
    Ok(())
}

/// Backward: `dgate = dout·up·σ(g)(1 + g(1−σ(g)))`, `dup = dout·silu(g)`.
pub fn backward<T: Real>(
    dout: &[T],
    gate: &[T],
    up: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) -> Result<()> {
    let n = gate.len();
    check_len("swiglu_backward", "dout", n, dout.len())?;
    check_len("swiglu_backward", "up", n, up.len())?;
    check_len("swiglu_backward", "dgate", n, dgate.len())?;
    check_len("swiglu_backward", "dup", n, dup.len())?;
    T::swiglu_grad(dout, gate, up, dgate, dup);
    Ok(())
}
