//! Text generation on the CPU: the LLaMA decoder one token at a time with a KV cache (the keys
//! and values of every earlier position kept per layer), then greedy choice or sampling with
//! temperature, top-k and top-p from a seed, until an end-of-sequence id or a token budget.

use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::params::param_specs;
use crate::weights::Weights;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    /// Seed of the sampling.
    pub seed: u64,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether every setting is in range: a finite temperature of at least 0, `top_p` in (0, 1].
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::InvalidGeneration {
                setting: "temperature",
                reason: format!("{} is out of range: must be at least 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidGeneration {
                setting: "top_p",
                reason: format!("{} is out of range: must be in (0, 1]", self.top_p),
            });
        }
        Ok(())
    }
}

/// One layer's weights, HF layout (`[out, in]`).
struct Layer<'a> {
    input_norm: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    post_norm: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
}

/// A decoder with its KV cache.
pub struct Generator<'a> {
    cfg: &'a LlamaConfig,
    embed: &'a [f32],
    layers: Vec<Layer<'a>>,
    norm: &'a [f32],
    lm_head: &'a [f32],
    inv_freq: Vec<f32>,
    /// Per layer: keys and values of every position so far, `[pos][kv_heads · head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Positions in the cache.
    len: usize,
}

/// `y = W · x` for `W` `[out, in]`.
fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    let n = x.len();
    (0..out)
        .map(|r| {
            w[r * n..(r + 1) * n]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len() as f64;
    let r = (1.0 / (ms + eps).sqrt()) as f32;
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// HF's rotate-half RoPE of every head of `x` at position `pos`.
fn rope(x: &mut [f32], head_dim: usize, inv_freq: &[f32], pos: usize) {
    let half = head_dim / 2;
    for h in x.chunks_mut(head_dim) {
        for j in 0..half {
            let a = pos as f32 * inv_freq[j];
            let (s, c) = a.sin_cos();
            let (x0, x1) = (h[j], h[j + half]);
            h[j] = x0 * c - x1 * s;
            h[j + half] = x1 * c + x0 * s;
        }
    }
}

impl<'a> Generator<'a> {
    /// A generator over `weights` (HF layout) of `cfg`.
    pub fn new(cfg: &'a LlamaConfig, weights: &'a Weights) -> Result<Self> {
        let specs = param_specs(cfg);
        let get = |name: &str| -> Result<&'a [f32]> {
            let i = specs.iter().position(|s| s.name == name).ok_or_else(|| {
                ModelError::Mismatch(format!("{name} is not a parameter of the config"))
            })?;
            Ok(weights.tensors()[i].as_slice())
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: get(&format!("{p}.self_attn.q_proj.weight"))?,
                k: get(&format!("{p}.self_attn.k_proj.weight"))?,
                v: get(&format!("{p}.self_attn.v_proj.weight"))?,
                o: get(&format!("{p}.self_attn.o_proj.weight"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: get(&format!("{p}.mlp.gate_proj.weight"))?,
                up: get(&format!("{p}.mlp.up_proj.weight"))?,
                down: get(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            get("lm_head.weight")?
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            inv_freq: cfg.rope().inv_freq::<f32>(cfg.head_dim()),
            keys: vec![Vec::new(); cfg.num_hidden_layers],
            values: vec![Vec::new(); cfg.num_hidden_layers],
            len: 0,
        })
    }

    /// Feeds `token` at the next position; returns the logits of the token after it.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let c = self.cfg;
        let (h, hd, heads, kv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.kv_heads(),
        );
        let t = token as usize;
        if t >= c.vocab_size {
            return Err(ModelError::Mismatch(format!(
                "token {token} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let pos = self.len;
        let mut x = self.embed[t * h..(t + 1) * h].to_vec();
        let group = heads / kv;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, w) in self.layers.iter().enumerate() {
            let n1 = rms_norm(&x, w.input_norm, c.rms_norm_eps);
            let mut q = matvec(w.q, &n1, heads * hd);
            let mut k = matvec(w.k, &n1, kv * hd);
            let v = matvec(w.v, &n1, kv * hd);
            rope(&mut q, hd, &self.inv_freq, pos);
            rope(&mut k, hd, &self.inv_freq, pos);
            self.keys[l].extend_from_slice(&k);
            self.values[l].extend_from_slice(&v);
            let (keys, values) = (&self.keys[l], &self.values[l]);
            let mut attn = vec![0.0f32; heads * hd];
            for head in 0..heads {
                let g = head / group;
                let qh = &q[head * hd..(head + 1) * hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|p| {
                        let kp = &keys[(p * kv + g) * hd..(p * kv + g + 1) * hd];
                        qh.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                let out = &mut attn[head * hd..(head + 1) * hd];
                for (p, w) in e.iter().enumerate() {
                    let vp = &values[(p * kv + g) * hd..(p * kv + g + 1) * hd];
                    for (o, vv) in out.iter_mut().zip(vp) {
                        *o += w / z * vv;
                    }
                }
            }
            for (xi, oi) in x.iter_mut().zip(matvec(w.o, &attn, h)) {
                *xi += oi;
            }
            let n2 = rms_norm(&x, w.post_norm, c.rms_norm_eps);
            let i = c.intermediate_size;
            let gate = matvec(w.gate, &n2, i);
            let up = matvec(w.up, &n2, i);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xi, di) in x.iter_mut().zip(matvec(w.down, &act, h)) {
                *xi += di;
            }
        }
        self.len += 1;
        let n = rms_norm(&x, self.norm, c.rms_norm_eps);
        Ok(matvec(self.lm_head, &n, c.vocab_size))
    }

    /// Feeds the whole of `tokens` at once from an empty cache — the prompt's prefill: every
    /// layer over all its positions as training runs it (GEMMs, blockwise causal attention),
    /// the keys and values kept in the cache; returns the logits of the token after the last.
    /// With tokens already in the cache it feeds them one at a time instead.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        use kernels::{AttnShape, Backend, GemmSpec, Rotation};
        if self.len > 0 || tokens.len() < 2 {
            let mut logits = Vec::new();
            for &t in tokens {
                logits = self.step(t)?;
            }
            return Ok(logits);
        }
        let c = self.cfg;
        let (h, hd, heads, kv, inter) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.kv_heads(),
            c.intermediate_size,
        );
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Mismatch(format!(
                "token {t} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let n = tokens.len();
        let be = kernels::CpuBackend::new(kernels::available_cores())
            .map_err(|e| ModelError::Mismatch(e.to_string()))?;
        let k_err = |e: kernels::KernelError| ModelError::Mismatch(e.to_string());
        // `C[n, out] = X[n, inn] · Wᵀ` for `W` `[out, inn]`.
        let linear = |x: &Vec<f32>, w: &[f32], out: usize| -> Result<Vec<f32>> {
            let mut y = vec![0.0f32; n * out];
            let spec = GemmSpec {
                trans_b: true,
                ..GemmSpec::new(n, out, w.len() / out)
            };
            be.gemm(&spec, x, &w.to_vec(), &mut y).map_err(k_err)?;
            Ok(y)
        };
        let norm = |x: &Vec<f32>, w: &[f32]| -> Result<Vec<f32>> {
            let (mut y, mut rstd) = (vec![0.0f32; x.len()], vec![0.0f32; n]);
            be.rms_norm_forward(x, &w.to_vec(), c.rms_norm_eps, &mut y, &mut rstd)
                .map_err(k_err)?;
            Ok(y)
        };
        let positions: Vec<u32> = (0..n as u32).collect();
        let rope = c.rope();
        let shape = AttnShape {
            heads,
            kv_heads: kv,
            head_dim: hd,
        };
        let mut x = vec![0.0f32; n * h];
        be.embedding_forward(&self.embed.to_vec(), h, 0, tokens, &mut x)
            .map_err(k_err)?;
        for (l, w) in self.layers.iter().enumerate() {
            let n1 = norm(&x, w.input_norm)?;
            let mut q = linear(&n1, w.q, heads * hd)?;
            let mut k = linear(&n1, w.k, kv * hd)?;
            let v = linear(&n1, w.v, kv * hd)?;
            be.rope(&mut q, &Rotation::new(&positions, heads, hd, &rope))
                .map_err(k_err)?;
            be.rope(&mut k, &Rotation::new(&positions, kv, hd, &rope))
                .map_err(k_err)?;
            let (mut attn, mut lse) = (vec![0.0f32; n * heads * hd], vec![0.0f32; heads * n]);
            let scale = 1.0 / (hd as f32).sqrt();
            be.attention_forward(&q, &k, &v, &[0, n], shape, scale, &mut attn, &mut lse)
                .map_err(k_err)?;
            self.keys[l] = k;
            self.values[l] = v;
            let o = linear(&attn, w.o, h)?;
            be.axpy(1.0, &o, &mut x).map_err(k_err)?;
            let n2 = norm(&x, w.post_norm)?;
            let gate = linear(&n2, w.gate, inter)?;
            let up = linear(&n2, w.up, inter)?;
            let mut act = vec![0.0f32; n * inter];
            be.swiglu_forward(&gate, &up, &mut act).map_err(k_err)?;
            let d = linear(&act, w.down, h)?;
            be.axpy(1.0, &d, &mut x).map_err(k_err)?;
        }
        self.len = n;
        let last = rms_norm(&x[(n - 1) * h..], self.norm, c.rms_norm_eps);
        Ok(matvec(self.lm_head, &last, c.vocab_size))
    }

    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The token chosen from `logits`.
fn choose(logits: &[f32], s: &Sampling, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let m = f64::from(logits[order[0]]);
    let mut p: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - m) / s.temperature).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    // Nucleus: the smallest prefix reaching top_p.
    let mut acc = 0.0;
    let mut keep = p.len();
    for (i, x) in p.iter().enumerate() {
        acc += x;
        if acc >= s.top_p {
            keep = i + 1;
            break;
        }
    }
    let z: f64 = p[..keep].iter().sum();
    let mut r = rng.random::<f64>() * z;
    for (i, x) in p[..keep].iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return order[i] as u32;
        }
    }
    order[keep - 1] as u32
}

/// Continues `prompt` by at most `max_new` tokens, stopping after any of `stop`; calls
/// `on_token` with each new token as it comes (return `false` to stop). Returns the new tokens.
pub fn generate(
    cfg: &LlamaConfig,
    weights: &Weights,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    sampling.check()?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidGeneration {
            setting: "prompt",
            reason: "is empty: give at least one token".into(),
        });
    }
    let mut g = Generator::new(cfg, weights)?;
    let mut logits = g.prefill(prompt)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
    let mut out = Vec::new();
    while out.len() < max_new {
        let t = choose(&logits, sampling, &mut rng);
        out.push(t);
        if !on_token(t) || stop.contains(&t) {
            break;
        }
        logits = g.step(t)?;
    }
    Ok(out)
}
