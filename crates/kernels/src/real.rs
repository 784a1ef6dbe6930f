//! The element types the CPU kernels are generic over: `f32` for training, `f64` for the
//! finite-difference references.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use crate::tile::{Running, ScoreTile};

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
    /// `x ← e^(x − shift)` over a slice, returning the sum of the new values, for a softmax's
    /// shift (at or above the slice's maximum). Vectorised in lanes for `f32`
    /// ([`crate::simd::exp_sum`], which gives 0 where the exponential would be subnormal).
    fn exp_sum(xs: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::zero();
        for x in xs {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
    /// One tile of attention's online softmax: for every row `r` of the tile (at least one
    /// score visible), masks the scores from `visible[r]` on, folds the row into the running
    /// maximum `m[r]` and sum `l[r]`, rescales row `r` of the unnormalised output, and leaves
    /// the row's exponentials in the tile.
    fn online_softmax(tile: ScoreTile<'_, Self>, run: Running<'_, Self>) {
        let Running { m, l, o, d } = run;
        for (r, row, visible) in tile.rows() {
            row[visible..].fill(Self::neg_infinity());
            let m_new = m[r].max(Self::max_of(row));
            let alpha = (m[r] - m_new).exp();
            l[r] = l[r] * alpha + Self::exp_sum(row, m_new);
            m[r] = m_new;
            for x in &mut o[r * d..(r + 1) * d] {
                *x *= alpha;
            }
        }
    }
    /// Attention backward's probabilities: row `r` of `p` (rows of `bc` scores) becomes
    /// `e^(p − lse[r])` for its first `visible[r]` scores and 0 after (all 0 when none is
    /// visible: its `lse` may be −∞ when no key reached it).
    fn softmax_probs(p: &mut [Self], bc: usize, visible: &[usize], lse: &[Self]) {
        for (r, row) in p.chunks_exact_mut(bc).take(visible.len()).enumerate() {
            if visible[r] == 0 {
                row.fill(Self::zero());
                continue;
            }
            row[visible[r]..].fill(Self::neg_infinity());
            Self::exp_sum(row, lse[r]);
        }
    }
    /// The softmax's backward, row by row: `ds ← p ∘ (ds − delta[r])` (rows of `bc`,
    /// `delta.len()` of them).
    fn softmax_grad(ds: &mut [Self], p: &[Self], bc: usize, delta: &[Self]) {
        for ((srow, prow), &dl) in ds.chunks_exact_mut(bc).zip(p.chunks_exact(bc)).zip(delta) {
            for (s, &p) in srow.iter_mut().zip(prow) {
                *s = p * (*s - dl);
            }
        }
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

/// `f32`'s vectorised methods: each `fn NAME(ARGS) [-> RET] = SIMD;` calls
/// `crate::simd::SIMD` with the same arguments.
macro_rules! vectorised {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $simd:ident;)*) => {
        $(
            fn $name($($arg: $ty),*) $(-> $ret)? {
                crate::simd::$simd($($arg),*)
            }
        )*
    };
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn to_f64_(self) -> f64 {
        self as f64
    }
    #[rustfmt::skip]
    vectorised! {
        fn exp_in_place(xs: &mut [Self]) = exp_in_place;
        fn max_of(xs: &[Self]) -> Self = max;
        fn exp_sum(xs: &mut [Self], shift: Self) -> Self = exp_sum;
        fn swiglu(gate: &[Self], up: &[Self], out: &mut [Self]) = swiglu;
        fn online_softmax(tile: ScoreTile<'_, Self>, run: Running<'_, Self>) = online_softmax;
        fn softmax_probs(p: &mut [Self], bc: usize, visible: &[usize], lse: &[Self]) = softmax_probs;
        fn softmax_grad(ds: &mut [Self], p: &[Self], bc: usize, delta: &[Self]) = softmax_grad;
        fn swiglu_grad(dout: &[Self], gate: &[Self], up: &[Self], dgate: &mut [Self], dup: &mut [Self]) = swiglu_grad;
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
