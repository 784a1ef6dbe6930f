//! RMSNorm: `y = x · rsqrt(mean(x²) + eps) · w` over the last dim.

use crate::error::{check_len, Result};
use crate::real::Real;

/// Forward over `rows` rows of `dim`; writes `y` and the per-row `rstd` kept for backward.
pub fn forward<T: Real>(
    x: &[T],
    weight: &[T],
    eps: f64,
    y: &mut [T],
    rstd: &mut [T],
) -> Result<()> {
    let dim = weight.len();
    let rows = rstd.len();
    check_len("rms_norm", "x", rows * dim, x.len())?;
    check_len("rms_norm", "y", rows * dim, y.len())?;
    let eps = T::of(eps);
    let n = T::of(dim as f64);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let ms = xr.iter().map(|&v| v * v).sum::<T>() / n;
        let s = (ms + eps).sqrt().recip();
        rstd[r] = s;
        for ((o, &v), &w) in y[r * dim..(r + 1) * dim].iter_mut().zip(xr).zip(weight) {
            *o = w * (v * s);
        }
    }
    Ok(())
}

/// Backward: writes `dx` and accumulates `dweight += Σ_rows dy · x̂`.
pub fn backward<T: Real>(
    dy: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[T],
    dx: &mut [T],
    dweight: &mut [T],
) -> Result<()> {
    let dim = weight.len();
    let rows = rstd.len();
    check_len("rms_norm_backward", "dy", rows * dim, dy.len())?;
    check_len("rms_norm_backward", "x", rows * dim, x.len())?;
    check_len("rms_norm_backward", "dx", rows * dim, dx.len())?;
    check_len("rms_norm_backward", "dweight", dim, dweight.len())?;
    let n = T::of(dim as f64);
    for r in 0..rows {
        let s = rstd[r];
        let xr = &x[r * dim..(r + 1) * dim];
        let dyr = &dy[r * dim..(r + 1) * dim];
        // dot = mean(dx̂ · x̂) with dx̂ = dy · w.
        let mut dot = T::zero();
        for j in 0..dim {
            let xhat = xr[j] * s;
            dweight[j] += dyr[j] * xhat;
            dot += dyr[j] * weight[j] * xhat;
        }
        dot = dot / n;
        for j in 0..dim {
            dx[r * dim + j] = s * (dyr[j] * weight[j] - xr[j] * s * dot);
        }
    }
    Ok(())
}
