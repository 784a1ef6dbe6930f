//! The LLaMA graph (built by `build_graph`, differentiated by `graph::backward`, run by
//! `runtime::run` in f32 on packed sequences) against an independent eager f64 implementation
//! written here with plain loops, one sequence at a time, in HF's conventions: loss against the
//! eager loss, every parameter's gradient against central finite differences of the eager loss.

use std::path::Path;

use kernels::{Backend, CpuBackend};
use model::{build_graph, param_specs, LlamaConfig, Weights};
use runtime::{run, MicroBatch};

struct Eager<'a> {
    cfg: &'a LlamaConfig,
    w: &'a [Vec<f64>],
    names: Vec<String>,
}

impl Eager<'_> {
    fn p(&self, name: &str) -> &[f64] {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name}"));
        &self.w[i]
    }

    /// `W [out, in] · x`.
    fn mv(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = self.p(name);
        let inp = x.len();
        (0..w.len() / inp)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum())
            .collect()
    }

    fn norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = self.p(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.cfg.rms_norm_eps).sqrt();
        x.iter().zip(w).map(|(v, g)| g * (v * r)).collect()
    }

    /// HF: q·cos(emb) + rotate_half(q)·sin(emb), emb = cat(freqs, freqs).
    fn rope(&self, x: &mut [f64], heads: usize, pos: usize) {
        let d = self.cfg.head_dim();
        for h in 0..heads {
            let v: Vec<f64> = x[h * d..(h + 1) * d].to_vec();
            for j in 0..d {
                let i = j % (d / 2);
                let a = pos as f64 / self.cfg.rope_theta.powf((2 * i) as f64 / d as f64);
                let rot = if j < d / 2 {
                    -v[j + d / 2]
                } else {
                    v[j - d / 2]
                };
                x[h * d + j] = v[j] * a.cos() + rot * a.sin();
            }
        }
    }

    /// Sum of next-token cross-entropies of one sequence.
    fn seq_loss(&self, s: &[u32]) -> f64 {
        let c = self.cfg;
        let (h, d, heads, kv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.kv_heads(),
        );
        let emb = self.p("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = s
            .iter()
            .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let n1: Vec<Vec<f64>> = x
                .iter()
                .map(|v| self.norm(&format!("{p}.input_layernorm.weight"), v))
                .collect();
            let mut q: Vec<Vec<f64>> = n1
                .iter()
                .map(|v| self.mv(&format!("{p}.self_attn.q_proj.weight"), v))
                .collect();
            let mut k: Vec<Vec<f64>> = n1
                .iter()
                .map(|v| self.mv(&format!("{p}.self_attn.k_proj.weight"), v))
                .collect();
            let v: Vec<Vec<f64>> = n1
                .iter()
                .map(|v| self.mv(&format!("{p}.self_attn.v_proj.weight"), v))
                .collect();
            for t in 0..s.len() {
                self.rope(&mut q[t], heads, t);
                self.rope(&mut k[t], kv, t);
            }
            for t in 0..s.len() {
                let mut a = vec![0.0; heads * d];
                for hh in 0..heads {
                    let g = hh / (heads / kv);
                    let sc: Vec<f64> = (0..=t)
                        .map(|u| {
                            (0..d)
                                .map(|e| q[t][hh * d + e] * k[u][g * d + e])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                    for u in 0..=t {
                        for e in 0..d {
                            a[hh * d + e] += (sc[u] - m).exp() / z * v[u][g * d + e];
                        }
                    }
                }
                let o = self.mv(&format!("{p}.self_attn.o_proj.weight"), &a);
                x[t].iter_mut().zip(o).for_each(|(xi, oi)| *xi += oi);
            }
            for xt in x.iter_mut() {
                let n2 = self.norm(&format!("{p}.post_attention_layernorm.weight"), xt);
                let g = self.mv(&format!("{p}.mlp.gate_proj.weight"), &n2);
                let u = self.mv(&format!("{p}.mlp.up_proj.weight"), &n2);
                let m: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let dn = self.mv(&format!("{p}.mlp.down_proj.weight"), &m);
                xt.iter_mut().zip(dn).for_each(|(a, b)| *a += b);
            }
        }
        let head = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let mut total = 0.0;
        for t in 0..s.len() - 1 {
            let logits = self.mv(head, &self.norm("model.norm.weight", &x[t]));
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
            total += lse - logits[s[t + 1] as usize];
        }
        total
    }

    fn loss(&self, seqs: &[Vec<u32>]) -> f64 {
        let predicted: usize = seqs.iter().map(|s| s.len() - 1).sum();
        seqs.iter().map(|s| self.seq_loss(s)).sum::<f64>() / predicted as f64
    }
}

fn config(tied: bool, kv: usize) -> LlamaConfig {
    let json = format!(
        r#"{{"vocab_size": 23, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": {kv}, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": {tied}}}"#
    );
    LlamaConfig::from_json(&json, Path::new("test")).unwrap()
}

/// Larger-than-init weights so every gradient is well above f32 noise; norm weights ≠ 1.
fn weights(cfg: &LlamaConfig, seed: u64) -> Weights {
    let mut w = Weights::random(cfg, seed);
    for (k, t) in w.tensors_mut().iter_mut().enumerate() {
        for (i, v) in t.iter_mut().enumerate() {
            *v = if *v == 1.0 {
                1.0 + 0.1 * (((i * 7 + k * 3) % 11) as f32 - 5.0) / 5.0
            } else {
                *v * 10.0
            };
        }
    }
    w
}

fn check(tied: bool, kv: usize) {
    let cfg = config(tied, kv);
    let w = weights(&cfg, 3);
    let seqs: Vec<Vec<u32>> = vec![
        (0..9).map(|i| (i * 5 + 1) % 23).collect(),
        vec![4, 19],
        (0..70).map(|i| (i * i + 3) % 23).collect(), // longer than one attention tile
    ];
    let predicted: usize = seqs.iter().map(|s| s.len() - 1).sum();

    let mut g = build_graph(&cfg).unwrap();
    graph::backward(&mut g).unwrap();
    let cpu = CpuBackend::new(2).unwrap();
    // The graph stores row-parallel weights transposed; the reference reads HF layout.
    let params: Vec<Vec<f32>> = w.stored().iter().map(|t| cpu.upload(t).unwrap()).collect();
    let batch = MicroBatch::pack(&seqs, 1.0 / predicted as f32).unwrap();
    let out = run(&cpu, &g, &params, &batch).unwrap();
    let specs = param_specs(&cfg);
    let grads: Vec<Vec<f32>> = out
        .grads
        .iter()
        .zip(&specs)
        .map(|(g, s)| s.from_stored(g.clone()))
        .collect();

    let w64: Vec<Vec<f64>> = w
        .tensors()
        .iter()
        .map(|t| t.iter().map(|&v| v as f64).collect())
        .collect();
    let names: Vec<String> = param_specs(&cfg).into_iter().map(|s| s.name).collect();
    let eager = Eager {
        cfg: &cfg,
        w: &w64,
        names: names.clone(),
    };
    let want = eager.loss(&seqs);
    assert!(
        ((out.loss as f64) - want).abs() <= 1e-5 * want.abs(),
        "loss {} vs eager {want}",
        out.loss
    );

    let h = 1e-5;
    for (k, name) in names.iter().enumerate() {
        let grad = &grads[k];
        let scale = grad.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(scale > 1e-6, "{name}: gradient is all zero");
        let n = grad.len();
        for idx in [0, n / 3, n / 2, n - 1, (n * 7) / 11] {
            let mut wp = w64.clone();
            wp[k][idx] += h;
            let lp = Eager {
                cfg: &cfg,
                w: &wp,
                names: names.clone(),
            }
            .loss(&seqs);
            wp[k][idx] -= 2.0 * h;
            let lm = Eager {
                cfg: &cfg,
                w: &wp,
                names: names.clone(),
            }
            .loss(&seqs);
            let num = (lp - lm) / (2.0 * h);
            let ana = grad[idx] as f64;
            assert!(
                (num - ana).abs() <= 2e-3 * scale + 1e-7,
                "{name}[{idx}]: finite difference {num:.8} vs graph {ana:.8} (largest |grad| {scale:.3e})"
            );
        }
    }
    assert!(out.peak_bytes > 0);
}

#[test]
fn gqa_untied_matches_eager_reference_and_finite_differences() {
    check(false, 2);
}

#[test]
fn mha_tied_matches_eager_reference_and_finite_differences() {
    check(true, 4);
}

#[test]
fn activations_are_freed_at_last_use() {
    let cfg = config(false, 2);
    let w = weights(&cfg, 1);
    let mut g = build_graph(&cfg).unwrap();
    graph::backward(&mut g).unwrap();
    let cpu = CpuBackend::new(1).unwrap();
    let params: Vec<Vec<f32>> = w.stored();
    let seqs: Vec<Vec<u32>> = vec![(0..200).map(|i| i % 23).collect()];
    let batch = MicroBatch::pack(&seqs, 1.0 / 199.0).unwrap();
    let out = run(&cpu, &g, &params, &batch).unwrap();
    let t = batch.tokens();
    let everything: usize = g
        .tensors
        .iter()
        .filter(|x| x.kind != graph::TensorKind::Param)
        .map(|x| x.numel(t) * 4)
        .sum();
    assert!(
        out.peak_bytes < everything * 3 / 4,
        "peak {} of {} bytes",
        out.peak_bytes,
        everything
    );
    // A batch with an out-of-vocabulary id is refused before anything runs.
    let bad = MicroBatch::pack(&[vec![1, 99]], 1.0).unwrap();
    let e = run(&cpu, &g, &params, &bad).err().unwrap().to_string();
    assert!(
        e.contains("token id 99 at position 1 is outside the vocabulary of 23"),
        "{e}"
    );
}
