//! The backend conformance suite: every kernel of a [`Backend`] against the CPU backend on random
//! odd shapes (varlen attention with empty and single-token sequences, GQA, sharded embeddings,
//! masked loss rows, batched and transposed GEMMs). A device backend runs it with
//! `hotspa conformance --backend cuda`; the default test suite runs it CPU against CPU so that
//! the suite itself is exercised on every machine.

use crate::{AdamW, AttnShape, Backend, CpuBackend, GemmSpec, KernelError, Rotation};

/// One comparison.
#[derive(Debug, Clone)]
pub struct Check {
    /// Kernel and case (`attention_backward dq d=64 gqa`).
    pub name: String,
    /// ‖device − cpu‖ / max(‖cpu‖, tiny).
    pub rel_err: f64,
    /// The bound it must stay under.
    pub tol: f64,
}

impl Check {
    /// Whether the error is within the bound (NaN never is).
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// Bounds for a device backend.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// GEMM results (bf16 operands: ~1e-2; f32: ~1e-5).
    pub gemm: f64,
    /// Everything computed in f32 by the device's own kernels.
    pub f32: f64,
}

impl Tolerance {
    /// Bounds for bf16 GEMM operands.
    pub const BF16: Tolerance = Tolerance {
        gemm: 1e-2,
        f32: 1e-5,
    };
    /// Bounds for f32 throughout.
    pub const F32: Tolerance = Tolerance {
        gemm: 1e-5,
        f32: 1e-5,
    };
}

/// SplitMix64: deterministic inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A deterministic stream of 64-bit values from `seed` (xorshift64; any seed, 0 included):
/// test and benchmark inputs that are the same on every machine.
pub fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

/// `n` values in `[-1, 1)` on a grid of 2⁻²³ from [`xorshift`]`(seed)`.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    xorshift(seed)
        .take(n)
        .map(|x| (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
    }
    let r = num.sqrt() / den.sqrt().max(1e-30);
    if r.is_nan() {
        f64::INFINITY
    } else {
        r
    }
}

struct Suite<'a, B: Backend> {
    dev: &'a B,
    cpu: CpuBackend,
    out: Vec<Check>,
}

impl<B: Backend> Suite<'_, B> {
    fn check(
        &mut self,
        name: String,
        dev: &B::Buffer,
        cpu: &[f32],
        tol: f64,
    ) -> Result<(), KernelError> {
        let got = self.dev.download(dev)?;
        self.out.push(Check {
            name,
            rel_err: rel(&got, cpu),
            tol,
        });
        Ok(())
    }
    fn up(&self, x: &[f32]) -> Result<B::Buffer, KernelError> {
        self.dev.upload(x)
    }
}

/// Runs every comparison of `dev` against the CPU backend and returns them all (the caller
/// decides what a failure means). Errors only when a kernel refuses valid arguments.
pub fn run_all<B: Backend>(dev: &B, tol: Tolerance, seed: u64) -> Result<Vec<Check>, KernelError> {
    let mut s = Suite {
        dev,
        cpu: CpuBackend::new(crate::available_cores())?,
        out: Vec::new(),
    };
    let mut rng = Rng(seed);
    gemms(&mut s, &mut rng, tol)?;
    pointwise(&mut s, &mut rng, tol)?;
    norms_and_rope(&mut s, &mut rng, tol)?;
    embeddings(&mut s, &mut rng, tol)?;
    losses(&mut s, &mut rng, tol)?;
    for &(heads, kv, d, ref lens) in &[
        (4usize, 2usize, 64usize, vec![1usize, 70, 0, 130]),
        (3, 1, 24, vec![65, 33]),
        (2, 2, 128, vec![200]),
    ] {
        attention(
            &mut s,
            &mut rng,
            tol,
            AttnShape {
                heads,
                kv_heads: kv,
                head_dim: d,
            },
            lens,
        )?;
    }
    optimizer(&mut s, &mut rng, tol)?;
    Ok(s.out)
}

fn gemms<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    for &(m, n, k, batch) in &[
        (1, 1, 1, 1),
        (37, 29, 53, 1),
        (64, 96, 33, 3),
        (130, 7, 250, 2),
    ] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0)] {
                let spec = GemmSpec::new(m, n, k)
                    .trans(ta, tb)
                    .scale(alpha, beta)
                    .batched(batch);
                let a = rng.vec(batch * m * k, 1.0);
                let b = rng.vec(batch * k * n, 1.0);
                let c0 = rng.vec(batch * m * n, 1.0);
                let mut want = c0.clone();
                s.cpu.gemm(&spec, &a, &b, &mut want)?;
                let (da, db) = (s.up(&a)?, s.up(&b)?);
                let mut dc = s.up(&c0)?;
                s.dev.gemm(&spec, &da, &db, &mut dc)?;
                let name = format!(
                    "gemm {m}x{n}x{k} b{batch} t{}{} a{alpha} b{beta}",
                    ta as u8, tb as u8
                );
                s.check(name, &dc, &want, tol.gemm)?;
            }
        }
    }
    Ok(())
}

fn pointwise<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    let n = 1000 + rng.below(100) as usize;
    let (a, b, dout) = (rng.vec(n, 3.0), rng.vec(n, 3.0), rng.vec(n, 1.0));
    let (da, db, ddo) = (s.up(&a)?, s.up(&b)?, s.up(&dout)?);
    let mut want = vec![0.0; n];
    s.cpu.add(&a, &b, &mut want)?;
    let mut got = s.dev.zeros(n)?;
    s.dev.add(&da, &db, &mut got)?;
    s.check("add".into(), &got, &want, tol.f32)?;
    let mut want = b.clone();
    s.cpu.axpy(-0.7, &a, &mut want)?;
    let mut got = s.up(&b)?;
    s.dev.axpy(-0.7, &da, &mut got)?;
    s.check("axpy".into(), &got, &want, tol.f32)?;
    let mut got = s.up(&b)?;
    s.dev.copy(&da, &mut got)?;
    s.check("copy (bitwise)".into(), &got, &a, 0.0)?;
    let mut want = a.clone();
    s.cpu.scale(1.3, &mut want)?;
    let mut got = s.up(&a)?;
    s.dev.scale(1.3, &mut got)?;
    s.check("scale".into(), &got, &want, tol.f32)?;
    let (w, g) = (s.cpu.sum_squares(&a)?, s.dev.sum_squares(&da)?);
    s.out.push(Check {
        name: "sum_squares".into(),
        rel_err: ((w - g) / w).abs(),
        tol: 1e-12,
    });
    let mut want = a.clone();
    s.cpu.round_bf16(&mut want)?;
    let mut got = s.up(&a)?;
    s.dev.round_bf16(&mut got)?;
    s.check("round_bf16 (bitwise)".into(), &got, &want, 0.0)?;
    let mut want = vec![0.0; n];
    s.cpu.swiglu_forward(&a, &b, &mut want)?;
    let mut got = s.dev.zeros(n)?;
    s.dev.swiglu_forward(&da, &db, &mut got)?;
    s.check("swiglu_forward".into(), &got, &want, tol.f32)?;
    let (mut wg, mut wu) = (vec![0.0; n], vec![0.0; n]);
    s.cpu.swiglu_backward(&dout, &a, &b, &mut wg, &mut wu)?;
    let (mut gg, mut gu) = (s.dev.zeros(n)?, s.dev.zeros(n)?);
    s.dev.swiglu_backward(&ddo, &da, &db, &mut gg, &mut gu)?;
    s.check("swiglu_backward dgate".into(), &gg, &wg, tol.f32)?;
    s.check("swiglu_backward dup".into(), &gu, &wu, tol.f32)?;
    Ok(())
}

fn norms_and_rope<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    for &(rows, dim) in &[(1usize, 7usize), (37, 300), (129, 1024)] {
        let (x, w, dy) = (
            rng.vec(rows * dim, 2.0),
            rng.vec(dim, 1.0),
            rng.vec(rows * dim, 1.0),
        );
        let dw0 = rng.vec(dim, 1.0);
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        s.cpu.rms_norm_forward(&x, &w, 1e-5, &mut y, &mut rstd)?;
        let (dx_, dw_, ddy) = (s.up(&x)?, s.up(&w)?, s.up(&dy)?);
        let (mut gy, mut grstd) = (s.dev.zeros(rows * dim)?, s.dev.zeros(rows)?);
        s.dev
            .rms_norm_forward(&dx_, &dw_, 1e-5, &mut gy, &mut grstd)?;
        s.check(format!("rms_norm_forward {rows}x{dim}"), &gy, &y, tol.f32)?;
        s.check(
            format!("rms_norm_forward rstd {rows}x{dim}"),
            &grstd,
            &rstd,
            tol.f32,
        )?;
        let (mut dx, mut dw) = (vec![0.0; rows * dim], dw0.clone());
        s.cpu
            .rms_norm_backward(&dy, &x, &w, &rstd, &mut dx, &mut dw)?;
        let (mut gdx, mut gdw) = (s.dev.zeros(rows * dim)?, s.up(&dw0)?);
        s.dev
            .rms_norm_backward(&ddy, &dx_, &dw_, &grstd, &mut gdx, &mut gdw)?;
        s.check(
            format!("rms_norm_backward dx {rows}x{dim}"),
            &gdx,
            &dx,
            tol.f32,
        )?;
        s.check(
            format!("rms_norm_backward dweight {rows}x{dim}"),
            &gdw,
            &dw,
            tol.f32,
        )?;
    }
    let llama3 = crate::Rope {
        theta: 500000.0,
        scaling: crate::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
    };
    for &(tokens, heads, hd) in &[(5usize, 3usize, 8usize), (70, 4, 64), (33, 2, 128)] {
        let x = rng.vec(tokens * heads * hd, 1.0);
        let pos: Vec<u32> = (0..tokens).map(|_| rng.below(4096) as u32).collect();
        let rope = if hd == 64 {
            llama3
        } else {
            crate::Rope::plain(10000.0)
        };
        for inverse in [false, true] {
            let mut want = x.clone();
            let r = Rotation::new(&pos, heads, hd, &rope).inverted(inverse);
            s.cpu.rope(&mut want, &r)?;
            let mut got = s.up(&x)?;
            s.dev.rope(&mut got, &r)?;
            // cos/sin of angles up to 4096 rad: f32 argument reduction differs by an ulp or two.
            s.check(
                format!("rope {tokens}x{heads}x{hd} inverse={inverse}"),
                &got,
                &want,
                1e-5,
            )?;
        }
    }
    Ok(())
}

fn embeddings<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    let (rows, dim, vocab_start, n) = (50usize, 33usize, 20usize, 300usize);
    let w = rng.vec(rows * dim, 1.0);
    let ids: Vec<u32> = (0..n).map(|_| rng.below(100) as u32).collect();
    let mut want = vec![0.0; n * dim];
    s.cpu
        .embedding_forward(&w, dim, vocab_start, &ids, &mut want)?;
    let dw = s.up(&w)?;
    let mut got = s.dev.zeros(n * dim)?;
    s.dev
        .embedding_forward(&dw, dim, vocab_start, &ids, &mut got)?;
    s.check("embedding_forward (shard)".into(), &got, &want, 0.0)?;
    let g = rng.vec(n * dim, 1.0);
    let g0 = rng.vec(rows * dim, 1.0);
    let mut want = g0.clone();
    s.cpu
        .embedding_backward(&g, dim, vocab_start, &ids, &mut want)?;
    let dg = s.up(&g)?;
    let mut got = s.up(&g0)?;
    s.dev
        .embedding_backward(&dg, dim, vocab_start, &ids, &mut got)?;
    s.check(
        "embedding_backward (shard, repeated ids, bitwise)".into(),
        &got,
        &want,
        0.0,
    )?;
    let _ = tol;
    Ok(())
}

fn losses<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    let (rows, vocab) = (77usize, 1001usize);
    let logits = rng.vec(rows * vocab, 8.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let mask: Vec<bool> = (0..rows).map(|r| r % 5 != 3).collect();
    let mut lse = vec![0.0; rows];
    let want = s
        .cpu
        .cross_entropy_forward(&logits, vocab, &targets, &mask, &mut lse)?;
    let dl = s.up(&logits)?;
    let mut glse = s.dev.zeros(rows)?;
    let got = s
        .dev
        .cross_entropy_forward(&dl, vocab, &targets, &mask, &mut glse)?;
    s.out.push(Check {
        name: "cross_entropy_forward loss".into(),
        rel_err: ((got as f64 - want as f64) / want as f64).abs(),
        tol: tol.f32,
    });
    s.check("cross_entropy_forward lse".into(), &glse, &lse, tol.f32)?;
    let mut want = vec![0.0; rows * vocab];
    s.cpu
        .cross_entropy_backward(&logits, vocab, &targets, &mask, &lse, 0.01, &mut want)?;
    let mut got = s.dev.zeros(rows * vocab)?;
    s.dev
        .cross_entropy_backward(&dl, vocab, &targets, &mask, &glse, 0.01, &mut got)?;
    s.check("cross_entropy_backward".into(), &got, &want, tol.f32)?;
    Ok(())
}

fn attention<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
    shape: AttnShape,
    lens: &[usize],
) -> Result<(), KernelError> {
    let mut cu = vec![0usize];
    for &l in lens {
        cu.push(cu.last().copied().unwrap_or(0) + l);
    }
    let t = *cu.last().unwrap_or(&0);
    let (h, kv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let q = rng.vec(t * h * d, 1.0);
    let k = rng.vec(t * kv * d, 1.0);
    let v = rng.vec(t * kv * d, 1.0);
    let dout = rng.vec(t * h * d, 1.0);
    let scale = 1.0 / (d as f32).sqrt();
    let (mut o, mut lse) = (vec![0.0; t * h * d], vec![0.0; h * t]);
    s.cpu
        .attention_forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut lse)?;
    let (gq, gk, gv, gdo) = (s.up(&q)?, s.up(&k)?, s.up(&v)?, s.up(&dout)?);
    let (mut go, mut glse) = (s.dev.zeros(t * h * d)?, s.dev.zeros(h * t)?);
    s.dev
        .attention_forward(&gq, &gk, &gv, &cu, shape, scale, &mut go, &mut glse)?;
    let case = format!("h{h} kv{kv} d{d} lens{lens:?}");
    s.check(format!("attention_forward out {case}"), &go, &o, tol.f32)?;
    s.check(
        format!("attention_forward lse {case}"),
        &glse,
        &lse,
        tol.f32,
    )?;
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    s.cpu.attention_backward(
        &dout, &q, &k, &v, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
    )?;
    let (mut gdq, mut gdk, mut gdv) = (
        s.dev.zeros(q.len())?,
        s.dev.zeros(k.len())?,
        s.dev.zeros(v.len())?,
    );
    s.dev.attention_backward(
        &gdo, &gq, &gk, &gv, &go, &glse, &cu, shape, scale, &mut gdq, &mut gdk, &mut gdv,
    )?;
    // The backward sums over up to `t` keys in another order: a looser f32 bound.
    let btol = tol.f32 * 10.0;
    s.check(format!("attention_backward dq {case}"), &gdq, &dq, btol)?;
    s.check(format!("attention_backward dk {case}"), &gdk, &dk, btol)?;
    s.check(format!("attention_backward dv {case}"), &gdv, &dv, btol)?;
    Ok(())
}

fn optimizer<B: Backend>(
    s: &mut Suite<'_, B>,
    rng: &mut Rng,
    tol: Tolerance,
) -> Result<(), KernelError> {
    let n = 4099;
    let cfg = AdamW {
        lr: 3e-3,
        weight_decay: 0.1,
        ..AdamW::default()
    };
    let (p, g, m) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 0.1));
    let v: Vec<f32> = rng.vec(n, 0.01).iter().map(|x| x.abs()).collect();
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    s.cpu.adamw(&cfg, 7, &mut wp, &g, &mut wm, &mut wv)?;
    let (mut gp, gg, mut gm, mut gv) = (s.up(&p)?, s.up(&g)?, s.up(&m)?, s.up(&v)?);
    s.dev.adamw(&cfg, 7, &mut gp, &gg, &mut gm, &mut gv)?;
    s.check("adamw param".into(), &gp, &wp, tol.f32)?;
    s.check("adamw exp_avg".into(), &gm, &wm, tol.f32)?;
    s.check("adamw exp_avg_sq".into(), &gv, &wv, tol.f32)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_passes_against_itself_and_a_wrong_value_fails() {
        let other = CpuBackend::new(1).unwrap();
        let checks = run_all(&other, Tolerance::F32, 7).unwrap();
        assert!(checks.len() > 60, "{} checks", checks.len());
        for c in &checks {
            assert!(c.passed(), "{} {:e}", c.name, c.rel_err);
        }
        assert!(rel(&[1.0, 2.0], &[1.0, 2.1]) > 1e-3);
        assert!(rel(&[f32::NAN], &[1.0]).is_infinite());
    }
}
