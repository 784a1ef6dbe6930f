//! Rotary position embedding in Hugging Face's rotate-half form, with arbitrary position ids
//! (packed sequences restart at 0; sequence parallelism passes its offsets).

use crate::error::{check_len, invalid, Result};
use crate::real::Real;

/// RoPE's frequencies as Hugging Face computes them (`rope_type` `default`, `linear` and
/// `llama3` of `transformers.modeling_rope_utils`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// How the frequencies are scaled for longer contexts.
    pub scaling: RopeScaling,
}

/// The `rope_type`s implemented; their attention factor is 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: `1 / theta^(2i/head_dim)`.
    None,
    /// `linear`: every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// `llama3`: wavelengths above `original_max_position_embeddings / low_freq_factor`
    /// divided by `factor`, below `… / high_freq_factor` kept, smoothly interpolated between.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> Self {
        Rope {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// The inverse frequencies of the `head_dim / 2` rotation pairs.
    pub fn inv_freq<T: Real>(&self, head_dim: usize) -> Vec<T> {
        (0..head_dim / 2)
            .map(|i| T::of(self.scaled(self.theta.powf((2 * i) as f64 / head_dim as f64).recip())))
            .collect()
    }

    /// `inv_freq` after the scaling.
    fn scaled(&self, f: f64) -> f64 {
        match self.scaling {
            RopeScaling::None => f,
            RopeScaling::Linear { factor } => f / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                if wavelen > low_wavelen {
                    f / factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            }
        }
    }
}

/// HF's inverse frequencies `1 / theta^(2i/head_dim)`, `i < head_dim/2` (plain RoPE).
pub fn inv_freq<T: Real>(head_dim: usize, theta: f64) -> Vec<T> {
    Rope::plain(theta).inv_freq(head_dim)
}

/// Applies the rotation to `x` of shape `[tokens, heads, head_dim]` in place: for `j < half`,
/// `x[j] ← x[j]·cos − x[j+half]·sin` and `x[j+half] ← x[j+half]·cos + x[j]·sin`, with angle
/// `positions[t] · inv_freq[j]`. `inverse` applies the transpose (the backward pass).
pub fn apply<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    rope: &Rope,
    inverse: bool,
) -> Result<()> {
    if !head_dim.is_multiple_of(2) {
        return Err(invalid("rope", format!("head_dim {head_dim} must be even")));
    }
    check_len("rope", "x", positions.len() * heads * head_dim, x.len())?;
    let half = head_dim / 2;
    let freqs = rope.inv_freq::<T>(head_dim);
    let angles = |p: u32, cos: &mut [T], sin: &mut [T]| {
        for j in 0..half {
            let angle = T::of(p as f64) * freqs[j];
            cos[j] = angle.cos();
            sin[j] = if inverse { -angle.sin() } else { angle.sin() };
        }
    };
    // Packed sequences repeat positions 0, 1, …: when positions are dense enough, every angle
    // is taken once from a table of positions 0..=max (the same values as one by one).
    let table_len = positions.iter().max().map_or(0, |&m| m as usize + 1);
    let table = (table_len <= positions.len()).then(|| {
        let (mut cos, mut sin) = (
            vec![T::zero(); table_len * half],
            vec![T::zero(); table_len * half],
        );
        for (p, (c, s)) in cos
            .chunks_exact_mut(half)
            .zip(sin.chunks_exact_mut(half))
            .enumerate()
        {
            angles(p as u32, c, s);
        }
        (cos, sin)
    });
    let mut cos = vec![T::zero(); half];
    let mut sin = vec![T::zero(); half];
    for (t, &p) in positions.iter().enumerate() {
        let (cos, sin) = match &table {
            Some((c, s)) => {
                let r = p as usize * half..(p as usize + 1) * half;
                (&c[r.clone()], &s[r])
            }
            None => {
                angles(p, &mut cos, &mut sin);
                (&cos[..], &sin[..])
            }
        };
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            let (lo, hi) = v.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (lo[j], hi[j]);
                lo[j] = a * cos[j] - b * sin[j];
                hi[j] = b * cos[j] + a * sin[j];
            }
        }
    }
    Ok(())
}
