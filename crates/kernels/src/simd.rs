//! Elementwise loops compiled for the widest vector unit this CPU has (AVX-512, AVX2, or the
//! x86-64 baseline), picked at run time. Every version computes the same values: the only
//! fused multiply-adds are explicit `mul_add`s, which round once whether the CPU has FMA
//! units (AVX2 and AVX-512 here) or the baseline calls `fmaf` (exact, but slow); nothing else
//! is contracted. So a result does not depend on the machine it ran on.
//!
//! `exp` here is Cephes' `expf` (Cody–Waite reduction, a degree-7 polynomial, evaluated with
//! fused multiply-adds), written so that it vectorises: within 2 ulp of the correctly rounded
//! value over the whole f32 range, `NaN` in gives `NaN`, below ≈ −103.97 it gives 0
//! (subnormals on the way), above ≈ 88.72 infinity. The softmax's version ([`exp_sum`]) scales
//! by 2ⁿ once instead of twice and gives 0 where `exp` would be subnormal.

use crate::tile::{Running, ScoreTile};

/// Runs `$body` (an `#[inline(always)]` function call) compiled with AVX-512F+FMA, AVX2+FMA or
/// nothing extra, whichever the CPU has.
macro_rules! widest {
    (($($arg:ident: $ty:ty),*), $body:expr) => {
        widest!(($($arg: $ty),*) -> (), $body)
    };
    (($($arg:ident: $ty:ty),*) -> $ret:ty, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512($($arg: $ty),*) -> $ret {
                $body
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                $body
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX-512F and FMA (checked just above).
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { avx2($($arg),*) };
            }
        }
        $body
    }};
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Above this `eˣ` is infinite.
const HI: f32 = 88.722_84;
/// Below this `eˣ` is 0 (in round-to-nearest).
const LO: f32 = -103.972_08;
/// Below this `eˣ` is subnormal (`ln 2⁻¹²⁶`, rounded up); [`exp_softmax1`] gives 0 there.
const NORMAL: f32 = -87.33;

/// `e^r` for the reduced argument `|r| ≤ ln2/2`, and the integer `n` of `x = n·ln2 + r`, for
/// `x` already clamped to a finite range. `n` is found without a (scalar, saturating) cast:
/// |n| < 2²², so n + 1.5·2²³ holds it exactly in its low mantissa bits.
#[inline(always)]
fn reduced(xc: f32) -> (f32, i32) {
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let n = xc.mul_add(LOG2E, 0.5).floor();
    let r = (-n).mul_add(C2, (-n).mul_add(C1, xc));
    let mut p = 1.987_569_2e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    let n = ((n + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4B40_0000);
    (p, n)
}

/// `2ⁿ` for `−126 ≤ n ≤ 127` (a normal number).
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `eˣ` of one value; see the module docs.
#[inline(always)]
pub fn exp1(x: f32) -> f32 {
    let (p, n) = reduced(x.clamp(LO, HI));
    // 2ⁿ in two halves, so that neither overflows nor underflows on its own. (A NaN makes
    // garbage of n, and NaN of `p`.)
    let n1 = n >> 1;
    limits(x, LO, HI, p * pow2(n1) * pow2(n - n1))
}

/// `eˣ` for a softmax's arguments (`x − max ≤ 0`): [`exp1`]'s value wherever that is a normal
/// number, 0 below `NORMAL` (≈ −87.33, where `exp1` is subnormal: below 2⁻¹²⁶, such a term
/// cannot move a sum that holds e⁰ = 1), infinity above ≈ 88.37 (where `exp1` still rounds to
/// finite values up to 88.72). One scaling by 2ⁿ instead of two.
#[inline(always)]
pub fn exp_softmax1(x: f32) -> f32 {
    const TOP: f32 = 88.37;
    let (p, n) = reduced(x.clamp(NORMAL, TOP));
    limits(x, NORMAL, TOP, p * pow2(n))
}

/// `y` (`eˣ` computed for `x` clamped to `[lo, hi]`), or `eˣ`'s limits outside: infinity above
/// `hi`, 0 below `lo` (a NaN `x` keeps `y`, itself NaN).
#[inline(always)]
fn limits(x: f32, lo: f32, hi: f32, y: f32) -> f32 {
    if x > hi {
        f32::INFINITY
    } else if x < lo {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn exp_body(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

/// `x ← eˣ` over a slice.
pub fn exp_in_place(xs: &mut [f32]) {
    widest!((xs: &mut [f32]), exp_body(xs))
}

/// Accumulator lanes of the reductions below: value `i` of a slice goes to lane `i % LANES`,
/// and the lanes are combined in one fixed tree, so the result is the same on every vector
/// width (and for every caller that hands over the same slice).
pub const LANES: usize = 16;

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    // Compare-and-select rather than `f32::max`, so that it vectorises; NaNs are skipped as
    // `f32::max` skips them (a NaN never compares greater).
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] = f(acc[l], acc[l + w]);
        }
    }
    acc[0]
}

#[inline(always)]
fn max_body(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = larger(acc[l], c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = larger(acc[l], x);
    }
    fold_lanes(acc, larger)
}

/// The largest value of a slice (−∞ for an empty one; NaNs skipped, as `f32::max` does).
pub fn max(xs: &[f32]) -> f32 {
    widest!((xs: &[f32]) -> f32, max_body(xs))
}

#[inline(always)]
fn exp_sum_body(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_softmax1(c[l] - shift);
            acc[l] += c[l];
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = exp_softmax1(*x - shift);
        acc[l] += *x;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// `x ← e^(x − shift)` over a slice by [`exp_softmax1`] (for a shift at or above the
/// slice's maximum), returning the sum of the new values (in [`LANES`] lanes).
pub fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    widest!((xs: &mut [f32], shift: f32) -> f32, exp_sum_body(xs, shift))
}

/// The visible prefix of a row of `bc` scores rounded up to whole [`LANES`] (at most `bc`):
/// the part that goes through `exp`. The masked scores past it would give exponentials of 0,
/// which are written directly, and, in whole lanes, add nothing to any lane's sum: the same
/// bits as running the whole row.
#[inline(always)]
fn whole_lanes(visible: usize, bc: usize) -> usize {
    visible.next_multiple_of(LANES).min(bc)
}

#[inline(always)]
fn online_softmax_body(tile: ScoreTile<'_, f32>, run: Running<'_, f32>) {
    let (bc, Running { m, l, o, d }) = (tile.bc, run);
    for (r, row, visible) in tile.rows() {
        let (live, dead) = row.split_at_mut(whole_lanes(visible, bc));
        live[visible..].fill(f32::NEG_INFINITY);
        dead.fill(0.0);
        let m_new = larger(m[r], max_body(live));
        let alpha = if m_new == m[r] {
            1.0
        } else {
            exp_softmax1(m[r] - m_new)
        };
        l[r] = l[r] * alpha + exp_sum_body(live, m_new);
        m[r] = m_new;
        // (Multiplying by 1 changes nothing: skipping it gives the same bits.)
        if alpha != 1.0 {
            for x in &mut o[r * d..(r + 1) * d] {
                *x *= alpha;
            }
        }
    }
}

/// [`crate::Real::online_softmax`] for `f32`: the row's maximum, exponentials and sum as in
/// [`max`] and [`exp_sum`], the rescaling factor by [`exp_softmax1`].
pub fn online_softmax(tile: ScoreTile<'_, f32>, run: Running<'_, f32>) {
    widest!(
        (tile: ScoreTile<'_, f32>, run: Running<'_, f32>),
        online_softmax_body(tile, run)
    )
}

#[inline(always)]
fn softmax_probs_body(p: &mut [f32], bc: usize, visible: &[usize], lse: &[f32]) {
    for (r, row) in p.chunks_exact_mut(bc).take(visible.len()).enumerate() {
        if visible[r] == 0 {
            row.fill(0.0);
            continue;
        }
        let (live, dead) = row.split_at_mut(whole_lanes(visible[r], bc));
        live[visible[r]..].fill(f32::NEG_INFINITY);
        dead.fill(0.0);
        for x in live.iter_mut() {
            *x = exp_softmax1(*x - lse[r]);
        }
    }
}

/// [`crate::Real::softmax_probs`] for `f32`, by [`exp_softmax1`].
pub fn softmax_probs(p: &mut [f32], bc: usize, visible: &[usize], lse: &[f32]) {
    widest!(
        (p: &mut [f32], bc: usize, visible: &[usize], lse: &[f32]),
        softmax_probs_body(p, bc, visible, lse)
    )
}

#[inline(always)]
fn softmax_grad_body(ds: &mut [f32], p: &[f32], bc: usize, delta: &[f32]) {
    for ((srow, prow), &dl) in ds.chunks_exact_mut(bc).zip(p.chunks_exact(bc)).zip(delta) {
        for (s, &p) in srow.iter_mut().zip(prow) {
            *s = p * (*s - dl);
        }
    }
}

/// [`crate::Real::softmax_grad`] for `f32`.
pub fn softmax_grad(ds: &mut [f32], p: &[f32], bc: usize, delta: &[f32]) {
    widest!(
        (ds: &mut [f32], p: &[f32], bc: usize, delta: &[f32]),
        softmax_grad_body(ds, p, bc, delta)
    )
}

#[inline(always)]
fn silu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let s = 1.0 / (1.0 + exp1(-g));
        *o = g * s * u;
    }
}

/// SwiGLU's forward: `out = g·σ(g)·up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    widest!((gate: &[f32], up: &[f32], out: &mut [f32]), silu_body(gate, up, out))
}

#[inline(always)]
fn swiglu_grad_body(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    let (dout, up, dgate, dup) = (&dout[..n], &up[..n], &mut dgate[..n], &mut dup[..n]);
    for i in 0..n {
        let g = gate[i];
        let s = 1.0 / (1.0 + exp1(-g));
        dup[i] = dout[i] * g * s;
        dgate[i] = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
    }
}

/// SwiGLU's backward: `dgate = dout·up·σ(g)(1 + g(1−σ(g)))`, `dup = dout·g·σ(g)`.
pub fn swiglu_grad(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    widest!(
        (dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]),
        swiglu_grad_body(dout, gate, up, dgate, dup)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tile_of<'a, T>(scores: &'a mut [T], bc: usize, visible: &'a [usize]) -> ScoreTile<'a, T> {
        ScoreTile {
            scores,
            bc,
            visible,
        }
    }

    fn running<'a, T>(m: &'a mut [T], l: &'a mut [T], o: &'a mut [T], d: usize) -> Running<'a, T> {
        Running { m, l, o, d }
    }

    /// Distance in units in the last place between two finite f32s of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_correctly_rounded_value() {
        let mut worst = (0, 0.0f32);
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp() as f32;
            let got = exp1(x);
            let e = if want >= f32::MIN_POSITIVE {
                ulps(got, want)
            } else {
                // Subnormal results: absolute error within 2 subnormal steps.
                ((got - want).abs() / f32::from_bits(1)) as u32
            };
            if e > worst.0 {
                worst = (e, x);
            }
            x += 0.000_731;
        }
        assert!(worst.0 <= 2, "{} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn reductions_in_lanes() {
        // Sums within rounding of the f64 sum, for every length around the lane count.
        for n in 0..70 {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let mut v = xs.clone();
            let got = exp_sum(&mut v, 1.0) as f64;
            let want: f64 = xs.iter().map(|&x| (x as f64 - 1.0).exp()).sum();
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "{n}: {got} vs {want}"
            );
            let m = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max(&xs), m, "{n}");
        }
        assert_eq!(max(&[f32::NAN, 1.0, f32::NAN]), 1.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert!(exp_sum(&mut [0.0, f32::NAN], 0.0).is_nan());
    }

    /// Attention's softmax tiles: every version gives the scalar body's bits, and the values
    /// are the generic f64 path's (`Real`'s defaults) within f32 rounding.
    #[test]
    fn softmax_tiles_match_the_f64_path() {
        use crate::Real;
        let (bc, d) = (20, 3);
        let visible = [20, 3, 1, 17, 9];
        let rows = visible.len();
        let tile: Vec<f32> = (0..rows * bc)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) * 0.4)
            .collect();
        let o: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.25 - 1.0).collect();
        let m0: Vec<f32> = vec![f32::NEG_INFINITY, 0.5, 9.0, -1.0, 2.0];
        let l0: Vec<f32> = vec![0.0, 1.5, 2.0, 0.5, 3.0];
        let f64s = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let close = |a: &[f32], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(&x, &y)| (x as f64 - y).abs() <= 1e-6 * y.abs().max(1.0))
        };
        let (mut t, mut m, mut l, mut oo) = (tile.clone(), m0.clone(), l0.clone(), o.clone());
        online_softmax(
            tile_of(&mut t, bc, &visible),
            running(&mut m, &mut l, &mut oo, d),
        );
        let (mut t2, mut m2, mut l2, mut o2) = (tile.clone(), m0.clone(), l0.clone(), o.clone());
        online_softmax_body(
            tile_of(&mut t2, bc, &visible),
            running(&mut m2, &mut l2, &mut o2, d),
        );
        assert_eq!((&t, &m, &l, &oo), (&t2, &m2, &l2, &o2));
        let (mut t3, mut m3, mut l3, mut o3) = (f64s(&tile), f64s(&m0), f64s(&l0), f64s(&o));
        f64::online_softmax(
            tile_of(&mut t3, bc, &visible),
            running(&mut m3, &mut l3, &mut o3, d),
        );
        assert!(close(&t, &t3) && close(&m, &m3) && close(&l, &l3) && close(&oo, &o3));
        // Masked scores' exponentials are 0.
        assert!(t[bc + 3..2 * bc].iter().all(|&x| x == 0.0));

        // Exponentiating only whole lanes of the visible prefix gives what the whole masked
        // row gives, bit for bit.
        let bc = 64;
        let visible = [64, 1, 15, 16, 17, 40];
        let tile: Vec<f32> = (0..visible.len() * bc)
            .map(|i| ((i * 31 % 29) as f32 - 14.0) * 0.3)
            .collect();
        let (mut t, mut m, mut l) = (tile.clone(), [0.5f32; 6], [1.0f32; 6]);
        let mut oo = vec![1.0f32; 6 * d];
        online_softmax(
            tile_of(&mut t, bc, &visible),
            running(&mut m, &mut l, &mut oo, d),
        );
        let mut p = tile.clone();
        softmax_probs(&mut p, bc, &visible, &[2.0; 6]);
        for (r, &v) in visible.iter().enumerate() {
            let mut row = tile[r * bc..(r + 1) * bc].to_vec();
            row[v..].fill(f32::NEG_INFINITY);
            let m_new = max(&row).max(0.5);
            let mut probs = row.clone();
            exp_sum(&mut probs, 2.0);
            assert_eq!(&p[r * bc..(r + 1) * bc], &probs[..], "row {r}");
            let sum = exp_sum(&mut row, m_new);
            assert_eq!(&t[r * bc..(r + 1) * bc], &row[..], "row {r}");
            let alpha = exp_softmax1(0.5 - m_new);
            assert_eq!((m[r], l[r]), (m_new, alpha + sum), "row {r}");
        }

        let bc = 20;
        let tile: Vec<f32> = (0..5 * bc)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) * 0.4)
            .collect();
        let visible = [20, 0, 1, 17, 9];
        let lse = [3.0f32, f32::NEG_INFINITY, 4.0, 2.5, 1.0];
        let mut p = tile.clone();
        softmax_probs(&mut p, bc, &visible, &lse);
        let mut p2 = tile.clone();
        softmax_probs_body(&mut p2, bc, &visible, &lse);
        assert_eq!(p, p2);
        let mut p3 = f64s(&tile);
        f64::softmax_probs(&mut p3, bc, &visible, &f64s(&lse));
        assert!(close(&p, &p3));
        assert!(p[bc..2 * bc].iter().all(|&x| x == 0.0));

        let delta = [0.5f32, -1.0, 2.0, 0.0, 1.5];
        let mut ds = tile.clone();
        softmax_grad(&mut ds, &p, bc, &delta);
        let mut ds2 = tile.clone();
        softmax_grad_body(&mut ds2, &p, bc, &delta);
        assert_eq!(ds, ds2);
        let mut ds3 = f64s(&tile);
        f64::softmax_grad(&mut ds3, &f64s(&p), bc, &f64s(&delta));
        assert!(close(&ds, &ds3));
    }

    /// The softmax's exp is `exp1` where that is normal, and 0 or ∞ where the test says.
    #[test]
    fn softmax_exp_is_exp_where_normal() {
        let mut x = -110.0f32;
        while x < 90.0 {
            let (got, full) = (exp_softmax1(x), exp1(x));
            if (NORMAL..=88.37).contains(&x) {
                assert_eq!(got.to_bits(), full.to_bits(), "{x}");
            } else if x < NORMAL {
                assert!(
                    got == 0.0 && full < f32::MIN_POSITIVE * 1.01,
                    "{x}: {got} {full}"
                );
            } else {
                assert!(got == f32::INFINITY && full > 2.3e38, "{x}: {got} {full}");
            }
            x += 0.000_917;
        }
        assert_eq!(exp_softmax1(f32::NEG_INFINITY), 0.0);
        assert!(exp_softmax1(f32::NAN).is_nan());
        assert_eq!(exp_softmax1(0.0), 1.0);
    }

    #[test]
    fn exp_edges() {
        assert!(exp1(f32::NAN).is_nan());
        assert_eq!(exp1(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp1(-200.0), 0.0);
        assert_eq!(exp1(89.0), f32::INFINITY);
        assert!(exp1(88.7).is_finite());
        assert_eq!(exp1(0.0), 1.0);
    }

    #[test]
    fn every_version_gives_the_scalar_values() {
        let xs: Vec<f32> = (0..1037).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (x, y) in xs.iter().zip(&v) {
            assert_eq!(y.to_bits(), exp1(*x).to_bits(), "exp({x})");
        }
        let mut v = xs.clone();
        let sum = exp_sum(&mut v, 3.5);
        let mut lanes = [0.0f32; LANES];
        for (i, (x, y)) in xs.iter().zip(&v).enumerate() {
            assert_eq!(
                y.to_bits(),
                exp_softmax1(*x - 3.5).to_bits(),
                "exp({x} - 3.5)"
            );
            lanes[i % LANES] += y;
        }
        assert_eq!(sum.to_bits(), fold_lanes(lanes, |a, b| a + b).to_bits());
        assert_eq!(
            max(&xs),
            xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        );
        let up: Vec<f32> = xs.iter().map(|x| 0.5 - x * 0.01).collect();
        let mut out = vec![0.0; xs.len()];
        swiglu(&xs, &up, &mut out);
        for i in 0..xs.len() {
            let s = 1.0 / (1.0 + exp1(-xs[i]));
            assert_eq!(out[i].to_bits(), (xs[i] * s * up[i]).to_bits());
        }
    }
}
