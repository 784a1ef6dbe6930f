//! Every backward against central finite differences of its forward, computed in f64, on random
//! shapes including odd sizes. The loss is `L = Σ w ⊙ forward(x)` with random weights `w`, so the
//! upstream gradient handed to each backward is `w`.

use kernels::ops::{attention, embedding, loss, norm, rope, swiglu};
use kernels::AttnShape;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic` against central differences of `f` at `x` on up to `max` coordinates.
fn check(name: &str, x: &[f64], analytic: &[f64], max: usize, f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-5;
    let stride = (x.len() / max.max(1)).max(1);
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(stride) {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * h);
        let tol = 1e-6 * (1.0 + num.abs().max(analytic[i].abs()));
        assert!(
            (num - analytic[i]).abs() <= tol,
            "{name}[{i}]: finite difference {num:.10} vs backward {:.10}",
            analytic[i]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn embedding_backward(rows in 1usize..7, dim in 1usize..6, n in 1usize..9, start in 0usize..3, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let weight = randn(&mut rng, rows * dim);
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..(rows + start + 2) as u32)).collect();
        let w = randn(&mut rng, n * dim);
        let f = |wt: &[f64]| {
            let mut out = vec![0.0; n * dim];
            embedding::forward(wt, dim, start, &ids, &mut out).unwrap();
            dot(&out, &w)
        };
        let mut g = vec![0.0; rows * dim];
        embedding::backward(&w, dim, start, &ids, &mut g).unwrap();
        check("embedding.weight", &weight, &g, 200, f);
    }

    #[test]
    fn rms_norm_backward(rows in 1usize..5, dim in 1usize..10, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        // Rows of near-zero norm make rstd ~ 1/sqrt(eps) and the central difference inaccurate
        // (third derivative ~ rstd³); keep every |x| ≥ 0.2.
        let x: Vec<f64> = randn(&mut rng, rows * dim).iter().map(|v| v.signum() * (0.2 + v.abs())).collect();
        let wt = randn(&mut rng, dim);
        let w = randn(&mut rng, rows * dim);
        let eps = 1e-5;
        let fwd = |x: &[f64], wt: &[f64]| {
            let (mut y, mut r) = (vec![0.0; rows * dim], vec![0.0; rows]);
            norm::forward(x, wt, eps, &mut y, &mut r).unwrap();
            (dot(&y, &w), r)
        };
        let (_, rstd) = fwd(&x, &wt);
        let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
        norm::backward(&w, &x, &wt, &rstd, &mut dx, &mut dw).unwrap();
        check("rms_norm.x", &x, &dx, 200, |x| fwd(x, &wt).0);
        check("rms_norm.weight", &wt, &dw, 200, |wt| fwd(&x, wt).0);
    }

    #[test]
    fn rope_backward(tokens in 1usize..6, heads in 1usize..4, half in 1usize..5, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = 2 * half;
        let x = randn(&mut rng, tokens * heads * d);
        let pos: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..5000)).collect();
        let w = randn(&mut rng, x.len());
        let plain = rope::Rope::plain(10000.0);
        let rotation = rope::Rotation::new(&pos, heads, d, &plain);
        let f = |x: &[f64]| {
            let mut y = x.to_vec();
            rope::apply(&mut y, &rotation).unwrap();
            dot(&y, &w)
        };
        let mut g = w.clone();
        rope::apply(&mut g, &rotation.inverted(true)).unwrap();
        check("rope.x", &x, &g, 200, f);
    }

    #[test]
    fn swiglu_backward(n in 1usize..30, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let gate: Vec<f64> = randn(&mut rng, n).iter().map(|v| 4.0 * v).collect();
        let up = randn(&mut rng, n);
        let w = randn(&mut rng, n);
        let f = |g: &[f64], u: &[f64]| {
            let mut o = vec![0.0; n];
            swiglu::forward(g, u, &mut o).unwrap();
            dot(&o, &w)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu::backward(&w, &gate, &up, &mut dg, &mut du).unwrap();
        check("swiglu.gate", &gate, &dg, 100, |g| f(g, &up));
        check("swiglu.up", &up, &du, 100, |u| f(&gate, u));
    }

    #[test]
    fn cross_entropy_backward(rows in 1usize..6, vocab in 1usize..12, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let logits: Vec<f64> = randn(&mut rng, rows * vocab).iter().map(|v| 3.0 * v).collect();
        let targets: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mask: Vec<bool> = (0..rows).map(|r| r == 0 || rng.random_bool(0.7)).collect();
        let scale = 0.37;
        let f = |l: &[f64]| {
            let mut lse = vec![0.0; rows];
            scale * loss::forward(l, vocab, &targets, &mask, &mut lse).unwrap()
        };
        let mut lse = vec![0.0; rows];
        loss::forward(&logits, vocab, &targets, &mask, &mut lse).unwrap();
        let mut g = vec![0.0; rows * vocab];
        loss::backward(&logits, vocab, &targets, &mask, &lse, scale, &mut g).unwrap();
        check("cross_entropy.logits", &logits, &g, 200, f);
    }

    #[test]
    fn attention_backward(
        lens in prop::collection::vec(0usize..80, 1..4),
        kv_heads in 1usize..3, rep in 1usize..3, head_dim in 1usize..6, seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cu = vec![0usize];
        for l in &lens { cu.push(cu.last().unwrap() + l); }
        let t = *cu.last().unwrap();
        let shape = AttnShape { heads: kv_heads * rep, kv_heads, head_dim };
        let q = randn(&mut rng, t * shape.heads * head_dim);
        let k = randn(&mut rng, t * kv_heads * head_dim);
        let v = randn(&mut rng, t * kv_heads * head_dim);
        let w = randn(&mut rng, q.len());
        let scale = 1.0 / (head_dim as f64).sqrt();
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let (mut o, mut lse) = (vec![0.0; q.len()], vec![0.0; shape.heads * t]);
            attention::forward(q, k, v, &cu, shape, scale, &mut o, &mut lse).unwrap();
            (o, lse)
        };
        let (o, lse) = fwd(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention::backward(&w, &q, &k, &v, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv).unwrap();
        check("attention.q", &q, &dq, 60, |q| dot(&fwd(q, &k, &v).0, &w));
        check("attention.k", &k, &dk, 60, |k| dot(&fwd(&q, k, &v).0, &w));
        check("attention.v", &v, &dv, 60, |v| dot(&fwd(&q, &k, v).0, &w));
    }
}
