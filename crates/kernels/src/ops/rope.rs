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

/// The cosines and sines of every rotation pair for positions `0..len` (the sines negated for
/// the inverse): packed sequences repeat positions 0, 1, …, so one table serves every token.
pub struct Angles<T> {
    half: usize,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Real> Angles<T> {
    /// The table for `positions` when they are dense (the largest below their count), so that
    /// it costs no more angles than going token by token; `None` otherwise.
    pub fn dense(positions: &[u32], head_dim: usize, rope: &Rope, inverse: bool) -> Option<Self> {
        let len = positions.iter().max().map_or(0, |&m| m as usize + 1);
        if len > positions.len() {
            return None;
        }
        let half = head_dim / 2;
        let freqs = rope.inv_freq::<T>(head_dim);
        let (mut cos, mut sin) = (vec![T::zero(); len * half], vec![T::zero(); len * half]);
        for (p, (c, s)) in cos
            .chunks_exact_mut(half)
            .zip(sin.chunks_exact_mut(half))
            .enumerate()
        {
            angles(&freqs, p as u32, inverse, c, s);
        }
        Some(Angles { half, cos, sin })
    }
}

/// The angles `p · inv_freq[j]` of position `p`, as `cos` and `sin` (negated for the inverse).
fn angles<T: Real>(freqs: &[T], p: u32, inverse: bool, cos: &mut [T], sin: &mut [T]) {
    for (j, &f) in freqs.iter().enumerate() {
        let angle = T::of(p as f64) * f;
        cos[j] = angle.cos();
        sin[j] = if inverse { -angle.sin() } else { angle.sin() };
    }
}

/// One application of RoPE: a tensor `[tokens, heads, head_dim]` whose token `t` sits at
/// `positions[t]`, rotated by `rope`'s angles, or by their inverse (the backward pass).
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    /// Each token's position.
    pub positions: &'a [u32],
    /// Heads per token.
    pub heads: usize,
    /// Values per head (even).
    pub head_dim: usize,
    /// The frequencies.
    pub rope: &'a Rope,
    /// The transpose (the backward pass).
    pub inverse: bool,
}

impl<'a> Rotation<'a> {
    /// The forward rotation of `heads` heads of `head_dim` values per token at `positions`.
    pub fn new(positions: &'a [u32], heads: usize, head_dim: usize, rope: &'a Rope) -> Self {
        Rotation {
            positions,
            heads,
            head_dim,
            rope,
            inverse: false,
        }
    }

    /// The same rotation run backwards (the transpose), or forwards again.
    pub fn inverted(self, inverse: bool) -> Self {
        Rotation { inverse, ..self }
    }
}

/// Applies the rotation `r` to `x` of shape `[tokens, heads, head_dim]` in place: for
/// `j < half`, `x[j] ← x[j]·cos − x[j+half]·sin` and `x[j+half] ← x[j+half]·cos + x[j]·sin`,
/// with angle `positions[t] · inv_freq[j]`. `inverse` applies the transpose (the backward
/// pass).
pub fn apply<T: Real>(x: &mut [T], r: &Rotation<'_>) -> Result<()> {
    let table = Angles::dense(r.positions, r.head_dim, r.rope, r.inverse);
    apply_with(x, r, table.as_ref())
}

/// [`apply`] with the angles taken from `table` (made by [`Angles::dense`] for the same
/// `head_dim`, `rope` and `inverse`, for positions that include these) where given; the same
/// values either way.
pub fn apply_with<T: Real>(x: &mut [T], r: &Rotation<'_>, table: Option<&Angles<T>>) -> Result<()> {
    let Rotation {
        positions,
        heads,
        head_dim,
        rope,
        inverse,
    } = *r;
    if !head_dim.is_multiple_of(2) {
        return Err(invalid("rope", format!("head_dim {head_dim} must be even")));
    }
    check_len("rope", "x", positions.len() * heads * head_dim, x.len())?;
    let half = head_dim / 2;
    let table = table.filter(|t| {
        t.half == half
            && positions
                .iter()
                .all(|&p| (p as usize + 1) * half <= t.cos.len())
    });
    let freqs = rope.inv_freq::<T>(head_dim);
    let mut cos = vec![T::zero(); half];
    let mut sin = vec![T::zero(); half];
    for (t, &p) in positions.iter().enumerate() {
        let (cos, sin) = match table {
            Some(a) => {
                let r = p as usize * half..(p as usize + 1) * half;
                (&a.cos[r.clone()], &a.sin[r])
            }
            None => {
                angles(&freqs, p, inverse, &mut cos, &mut sin);
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
