//! Rotary position embedding in Hugging Face's rotate-half form, with arbitrary position ids
//! (packed sequences restart at 0; sequence parallelism passes its offsets).

use crate::error::{check_len, invalid, Result};
use crate::real::Real;

/// HF's inverse frequencies `1 / theta^(2i/head_dim)`, `i < head_dim/2`.
pub fn inv_freq<T: Real>(head_dim: usize, theta: f64) -> Vec<T> {
    (0..head_dim / 2)
        .map(|i| T::one() / T::of(theta).powf(T::of((2 * i) as f64) / T::of(head_dim as f64)))
        .collect()
}

/// Applies the rotation to `x` of shape `[tokens, heads, head_dim]` in place: for `j < half`,
/// `x[j] ← x[j]·cos − x[j+half]·sin` and `x[j+half] ← x[j+half]·cos + x[j]·sin`, with angle
/// `positions[t] · inv_freq[j]`. `inverse` applies the transpose (the backward pass).
pub fn apply<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f64,
    inverse: bool,
) -> Result<()> {
    if !head_dim.is_multiple_of(2) {
        return Err(invalid("rope", format!("head_dim {head_dim} must be even")));
    }
    check_len("rope", "x", positions.len() * heads * head_dim, x.len())?;
    let half = head_dim / 2;
    let freqs = inv_freq::<T>(head_dim, theta);
    let mut cos = vec![T::zero(); half];
    let mut sin = vec![T::zero(); half];
    for (t, &p) in positions.iter().enumerate() {
        for j in 0..half {
            let angle = T::of(p as f64) * freqs[j];
            cos[j] = angle.cos();
            sin[j] = if inverse { -angle.sin() } else { angle.sin() };
        }
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            for j in 0..half {
                let (a, b) = (v[j], v[j + half]);
                v[j] = a * cos[j] - b * sin[j];
                v[j + half] = b * cos[j] + a * sin[j];
            }
        }
    }
    Ok(())
}
