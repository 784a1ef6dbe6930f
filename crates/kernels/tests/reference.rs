//! Forwards against independent textbook references (naive loops, materialised softmax, HF's
//! rotate-half written out, PyTorch's documented AdamW), and the f32 path against f64.

use kernels::matmul::gemm;
use kernels::ops::{adamw, attention, loss, norm, rope};
use kernels::{AdamW, AttnShape, Backend, CpuBackend, GemmSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn assert_close(name: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())),
            "{name}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn gemm_matches_naive_loops_for_every_flag() {
    let mut rng = StdRng::seed_from_u64(1);
    for &(m, n, k, batch) in &[
        (1, 1, 1, 1),
        (3, 5, 7, 2),
        (17, 9, 33, 3),
        (64, 65, 1, 1),
        (2, 3, 0, 1),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = randn(&mut rng, batch * m * k);
                let b = randn(&mut rng, batch * k * n);
                let c0 = randn(&mut rng, batch * m * n);
                let spec = GemmSpec::new(m, n, k)
                    .trans(ta, tb)
                    .scale(0.5, 2.0)
                    .batched(batch);
                let mut c = c0.clone();
                gemm(&spec, &a, &b, &mut c, 2).unwrap();
                let mut want = vec![0.0; batch * m * n];
                for bi in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = 0.0;
                            for l in 0..k {
                                let av = if ta {
                                    a[bi * m * k + l * m + i]
                                } else {
                                    a[bi * m * k + i * k + l]
                                };
                                let bv = if tb {
                                    b[bi * k * n + j * k + l]
                                } else {
                                    b[bi * k * n + l * n + j]
                                };
                                s += av * bv;
                            }
                            let idx = bi * m * n + i * n + j;
                            want[idx] = 0.5 * s + 2.0 * c0[idx];
                        }
                    }
                }
                assert_close(
                    &format!("gemm {m}x{n}x{k} ta={ta} tb={tb}"),
                    &c,
                    &want,
                    1e-12,
                );
            }
        }
    }
}

/// Materialised softmax attention with per-sequence causal masks and GQA head mapping.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu: &[usize],
    s: AttnShape,
    scale: f64,
) -> Vec<f64> {
    let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
    let mut out = vec![0.0; q.len()];
    for w in cu.windows(2) {
        for head in 0..h {
            let g = head / (h / kvh);
            for t in w[0]..w[1] {
                let scores: Vec<f64> = (w[0]..=t)
                    .map(|u| {
                        (0..d)
                            .map(|e| q[(t * h + head) * d + e] * k[(u * kvh + g) * d + e])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                for (j, u) in (w[0]..=t).enumerate() {
                    let p = (scores[j] - mx).exp() / z;
                    for e in 0..d {
                        out[(t * h + head) * d + e] += p * v[(u * kvh + g) * d + e];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn blockwise_attention_matches_materialised_softmax() {
    let mut rng = StdRng::seed_from_u64(2);
    // The last sequence is longer than the kernel's query chunk (256 rows) plus a key block.
    let cu = [0, 1, 130, 130, 200, 263, 600];
    let shape = AttnShape {
        heads: 6,
        kv_heads: 2,
        head_dim: 5,
    };
    let t = 600;
    let q = randn(&mut rng, t * 6 * 5);
    let k = randn(&mut rng, t * 2 * 5);
    let v = randn(&mut rng, t * 2 * 5);
    let scale = 0.8;
    let (mut o, mut lse) = (vec![0.0; q.len()], vec![0.0; 6 * t]);
    attention::forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut lse).unwrap();
    assert_close(
        "attention",
        &o,
        &naive_attention(&q, &k, &v, &cu, shape, scale),
        1e-12,
    );

    // The f32 backend agrees with the f64 kernel.
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let cpu = CpuBackend::new(2).unwrap();
    let (mut o32, mut lse32) = (vec![0f32; q.len()], vec![0f32; 6 * t]);
    cpu.attention_forward(
        &f(&q),
        &f(&k),
        &f(&v),
        &cu,
        shape,
        scale as f32,
        &mut o32,
        &mut lse32,
    )
    .unwrap();
    let o32: Vec<f64> = o32.iter().map(|&x| x as f64).collect();
    assert_close("attention f32", &o32, &o, 1e-5);
    let dout = randn(&mut rng, q.len());
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention::backward(
        &dout, &q, &k, &v, &o, &lse, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    let (mut dq32, mut dk32, mut dv32) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    let o32f: Vec<f32> = o32.iter().map(|&x| x as f32).collect();
    cpu.attention_backward(
        &f(&dout),
        &f(&q),
        &f(&k),
        &f(&v),
        &o32f,
        &lse32,
        &cu,
        shape,
        scale as f32,
        &mut dq32,
        &mut dk32,
        &mut dv32,
    )
    .unwrap();
    let up = |x: Vec<f32>| x.into_iter().map(|v| v as f64).collect::<Vec<f64>>();
    assert_close("dq f32", &up(dq32), &dq, 1e-4);
    assert_close("dk f32", &up(dk32), &dk, 1e-4);
    assert_close("dv f32", &up(dv32), &dv, 1e-4);
}

#[test]
fn attention_refuses_bad_layouts() {
    let shape = AttnShape {
        heads: 3,
        kv_heads: 2,
        head_dim: 2,
    };
    let (mut o, mut l) = (vec![0.0f64; 12], vec![0.0; 6]);
    let e = attention::forward(
        &[0.0; 12],
        &[0.0; 8],
        &[0.0; 8],
        &[0, 2],
        shape,
        1.0,
        &mut o,
        &mut l,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    let shape = AttnShape {
        heads: 2,
        kv_heads: 2,
        head_dim: 2,
    };
    let e = attention::forward(
        &[0.0; 8],
        &[0.0; 8],
        &[0.0; 8],
        &[0, 3, 2],
        shape,
        1.0,
        &mut o[..8],
        &mut l[..4],
    )
    .unwrap_err();
    assert!(e.to_string().contains("never decrease"), "{e}");
}

#[test]
fn rope_is_hf_rotate_half() {
    let mut rng = StdRng::seed_from_u64(3);
    let (tokens, heads, d) = (5, 2, 8);
    let x = randn(&mut rng, tokens * heads * d);
    let theta = 500000.0;
    // Sparse positions (angles one by one) and packed sequences' dense ones (from a table).
    for pos in [[0u32, 1, 7, 0, 4095], [0, 1, 2, 0, 1]] {
        rope_matches_hf(&x, &pos, heads, d, theta);
    }
    let mut y = x.clone();
    let plain = rope::Rope::plain(theta);
    let odd = rope::Rotation::new(&[0u32, 1, 7, 0, 4095], heads * 2, d / 2 + 1, &plain);
    assert!(rope::apply(&mut y, &odd).is_err());
}

/// HF: emb = cat(freqs, freqs); out = x*cos(emb) + rotate_half(x)*sin(emb),
/// rotate_half(x) = cat(-x[half:], x[:half]).
fn rope_matches_hf(x: &[f64], pos: &[u32], heads: usize, d: usize, theta: f64) {
    let tokens = pos.len();
    let mut y = x.to_vec();
    let plain = rope::Rope::plain(theta);
    rope::apply(&mut y, &rope::Rotation::new(pos, heads, d, &plain)).unwrap();
    for t in 0..tokens {
        for h in 0..heads {
            let v = &x[(t * heads + h) * d..(t * heads + h + 1) * d];
            for j in 0..d {
                let i = j % (d / 2);
                let inv = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                let a = pos[t] as f64 * inv;
                let rot = if j < d / 2 {
                    -v[j + d / 2]
                } else {
                    v[j - d / 2]
                };
                let want = v[j] * a.cos() + rot * a.sin();
                let got = y[(t * heads + h) * d + j];
                assert!(
                    (want - got).abs() < 1e-12,
                    "t{t} h{h} j{j}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn rms_norm_and_cross_entropy_match_formulas() {
    let x = [1.0f64, 2.0, 3.0, -4.0];
    let w = [0.5f64, 2.0];
    let (mut y, mut r) = ([0.0; 4], [0.0; 2]);
    norm::forward(&x, &w, 0.0, &mut y, &mut r).unwrap();
    let r0 = 1.0 / (2.5f64).sqrt();
    let r1 = 1.0 / (12.5f64).sqrt();
    assert_close(
        "rmsnorm",
        &y,
        &[0.5 * r0, 4.0 * r0, 1.5 * r1, -8.0 * r1],
        1e-15,
    );

    let logits = [1.0f64, 2.0, 3.0, 0.0, 0.0, 0.0];
    let mut lse = [0.0; 2];
    let total = loss::forward(&logits, 3, &[2, 1], &[true, false], &mut lse).unwrap();
    let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
    assert!((total - want).abs() < 1e-14);
    assert!((lse[1] - 3f64.ln()).abs() < 1e-14);
    let e = loss::forward(&logits, 3, &[3, 0], &[true, false], &mut lse).unwrap_err();
    assert!(
        e.to_string()
            .contains("target 3 is outside the vocabulary of 3"),
        "{e}"
    );
}

#[test]
fn adamw_follows_pytorch_documentation() {
    let cfg = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        freeze_variance_after: None,
    };
    // First step: m̂ = g and v̂ = g², so the update is lr·g/(|g|+eps) after decay.
    let (mut p, mut m, mut v) = (vec![1.0f64, -2.0], vec![0.0; 2], vec![0.0; 2]);
    adamw::step(&cfg, 1, &mut p, &[0.5, -3.0], &mut m, &mut v).unwrap();
    let want0 = 1.0 * (1.0 - 1e-3) - 1e-2 * 0.5 / (0.5 + 1e-8);
    let want1 = -2.0 * (1.0 - 1e-3) + 1e-2 * 3.0 / (3.0 + 1e-8);
    assert!(
        (p[0] - want0).abs() < 1e-14 && (p[1] - want1).abs() < 1e-14,
        "{p:?}"
    );

    // Several steps against the documented algorithm with m̂ = m/(1-β1^t), v̂ = v/(1-β2^t).
    let mut rng = StdRng::seed_from_u64(4);
    let n = 7;
    let mut p = randn(&mut rng, n);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut rp, mut rm, mut rv) = (p.clone(), vec![0.0; n], vec![0.0; n]);
    for t in 1..=5u64 {
        let g = randn(&mut rng, n);
        adamw::step(&cfg, t, &mut p, &g, &mut m, &mut v).unwrap();
        for i in 0..n {
            rp[i] -= cfg.lr * cfg.weight_decay * rp[i];
            rm[i] = cfg.beta1 * rm[i] + (1.0 - cfg.beta1) * g[i];
            rv[i] = cfg.beta2 * rv[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let mh = rm[i] / (1.0 - cfg.beta1.powi(t as i32));
            let vh = rv[i] / (1.0 - cfg.beta2.powi(t as i32));
            rp[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
        }
    }
    assert_close("adamw", &p, &rp, 1e-10);
    assert_eq!(adamw::clip_coef(10.0, 1.0), 1.0 / (10.0 + 1e-6));
    assert_eq!(adamw::clip_coef(0.5, 1.0), 1.0);
}

#[test]
fn bf16_and_f16_casts_round_to_nearest() {
    use kernels::ops::elementwise::{from_bf16, from_f16, to_bf16, to_f16};
    let x = [1.0f32, 1.0 + 1.0 / 256.0, -3.140625, 65504.0];
    let b = from_bf16(&to_bf16(&x));
    assert_eq!(b[0], 1.0);
    assert_eq!(b[1], 1.0); // halfway rounds to even
    assert_eq!(b[2], -3.140625);
    assert_eq!(from_f16(&to_f16(&x))[3], 65504.0);
}
