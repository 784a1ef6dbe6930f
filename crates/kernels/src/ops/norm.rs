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

/// Rows whose weight gradient is summed on its own before it is added to `dweight` (in row
/// order): the unit the CPU backend spreads over its threads, fixed so that the result does not
/// depend on the thread count.
pub const GROUP_ROWS: usize = 64;

/// Backward: writes `dx` and accumulates `dweight += Σ_rows dy · x̂`, the rows summed in groups
/// of [`GROUP_ROWS`].
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
    if dim == 0 {
        return Ok(());
    }
    let g = GROUP_ROWS * dim;
    for (((dy, x), rstd), dx) in dy
        .chunks(g)
        .zip(x.chunks(g))
        .zip(rstd.chunks(GROUP_ROWS))
        .zip(dx.chunks_mut(g))
    {
        add_part(dweight, &group_backward(dy, x, weight, rstd, dx));
    }
    Ok(())
}

/// `dweight += part`: a group's share of the weight gradient, added in group order.
pub fn add_part<T: Real>(dweight: &mut [T], part: &[T]) {
    for (w, &p) in dweight.iter_mut().zip(part) {
        *w += p;
    }
}

/// [`backward`] of one group of rows (lengths checked by the caller): writes its `dx` and
/// returns its share of the weight gradient.
pub fn group_backward<T: Real>(
    dy: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[T],
    dx: &mut [T],
) -> Vec<T> {
    const LANES: usize = 16;
    let dim = weight.len();
    let n = T::of(dim as f64);
    let mut part = vec![T::zero(); dim];
    for (((xr, dyr), dxr), &s) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
        .zip(rstd)
    {
        // dot = mean(dx̂ · x̂) with dx̂ = dy · w, summed in lanes (so that it vectorises).
        let mut acc = [T::zero(); LANES];
        for (j, ((&d, &w), &xv)) in dyr.iter().zip(weight).zip(xr).enumerate() {
            let xhat = xv * s;
            part[j] += d * xhat;
            acc[j % LANES] += d * w * xhat;
        }
        let dot = acc.iter().fold(T::zero(), |a, &b| a + b) / n;
        for (((o, &d), &w), &xv) in dxr.iter_mut().zip(dyr).zip(weight).zip(xr) {
            *o = s * (d * w - xv * s * dot);
        }
    }
    part
}
