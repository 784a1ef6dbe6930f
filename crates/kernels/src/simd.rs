//! Elementwise loops compiled for the widest vector unit this CPU has (AVX-512, AVX2, or the
//! x86-64 baseline), picked at run time. Every version computes the same values — plain
//! multiplies and adds, no fused multiply-add contraction — so a result does not depend on the
//! machine it ran on.
//!
//! `exp` here is Cephes' `expf` (Cody–Waite reduction, a degree-7 polynomial), written so that
//! it vectorises: within 2 ulp of the correctly rounded value over the whole f32 range, `NaN` in
//! gives `NaN`, below ≈ −103.97 it gives 0 (subnormals on the way), above ≈ 88.72 infinity.

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

/// `eˣ` of one value; see the module docs.
#[inline(always)]
pub fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const HI: f32 = 88.722_84;
    const LO: f32 = -103.972_08;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ in two halves, so that neither overflows nor underflows on its own.
    // n as an integer without a (scalar, saturating) cast: |n| < 2²², so n + 1.5·2²³ holds it
    // exactly in its low mantissa bits. (A NaN makes garbage here, and NaN of `p` below.)
    let n = ((n + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4B40_0000);
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x > HI {
        f32::INFINITY
    } else if x < LO {
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
            c[l] = exp1(c[l] - shift);
            acc[l] += c[l];
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = exp1(*x - shift);
        acc[l] += *x;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// `x ← e^(x − shift)` over a slice, returning the sum of the new values (in [`LANES`] lanes).
pub fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    widest!((xs: &mut [f32], shift: f32) -> f32, exp_sum_body(xs, shift))
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
            assert_eq!(y.to_bits(), exp1(*x - 3.5).to_bits(), "exp({x} - 3.5)");
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
