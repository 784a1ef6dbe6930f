//! The parameter catalogue: every weight of a LLaMA model with its HF name, shape and role.

use std::borrow::Cow;
use std::fmt;

use graph::{TpLayout, WeightLayout};

use crate::config::LlamaConfig;

/// What a parameter is, which the parallel strategies need (column/row parallel, vocab parallel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    Embedding,
    /// `q_proj` `[heads·head_dim, hidden]`.
    QProj,
    /// `k_proj` `[kv_heads·head_dim, hidden]`.
    KProj,
    /// `v_proj` `[kv_heads·head_dim, hidden]`.
    VProj,
    /// `o_proj` `[hidden, heads·head_dim]`.
    OProj,
    /// `gate_proj` `[intermediate, hidden]`.
    GateProj,
    /// `up_proj` `[intermediate, hidden]`.
    UpProj,
    /// `down_proj` `[hidden, intermediate]`.
    DownProj,
    /// `input_layernorm` `[hidden]`.
    InputNorm,
    /// `post_attention_layernorm` `[hidden]`.
    PostAttentionNorm,
    /// `model.norm.weight` `[hidden]`.
    FinalNorm,
    /// `lm_head.weight` `[vocab, hidden]` (absent when embeddings are tied).
    LmHead,
}

/// One parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape, HF layout (linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// What it is.
    pub role: Role,
    /// The decoder layer, for per-layer parameters.
    pub layer: Option<usize>,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// AdamW decays tensors of rank ≥ 2 only (DESIGN §3): not the norm weights.
    pub fn weight_decay(&self) -> bool {
        self.shape.len() >= 2
    }

    /// The tensor-parallel layout of this parameter.
    pub fn tp_layout(&self, head_dim: usize) -> TpLayout {
        match self.role {
            Role::Embedding | Role::LmHead => TpLayout::Vocab,
            Role::QProj | Role::KProj | Role::VProj => TpLayout::Column { unit: head_dim },
            Role::OProj => TpLayout::Row { unit: head_dim },
            Role::GateProj | Role::UpProj => TpLayout::Column { unit: 1 },
            Role::DownProj => TpLayout::Row { unit: 1 },
            Role::InputNorm | Role::PostAttentionNorm | Role::FinalNorm => TpLayout::Replicated,
        }
    }

    /// How the training graph stores this parameter: the row-parallel projections (`o_proj`,
    /// `down_proj`) transposed, `[in, out]`, so that their TP split is contiguous (the layout
    /// optimisation); everything else as in HF.
    pub fn storage(&self) -> WeightLayout {
        match self.role {
            Role::OProj | Role::DownProj => WeightLayout::InOut,
            _ => WeightLayout::OutIn,
        }
    }

    /// The shape the training graph stores (see [`ParamSpec::storage`]).
    pub fn stored_shape(&self) -> Vec<usize> {
        match self.storage() {
            WeightLayout::OutIn => self.shape.clone(),
            WeightLayout::InOut => self.shape.iter().rev().copied().collect(),
        }
    }

    /// HF-layout values in the graph's storage layout (borrowed when they are the same).
    pub fn to_stored<'a>(&self, hf: &'a [f32]) -> Cow<'a, [f32]> {
        match self.storage() {
            WeightLayout::OutIn => Cow::Borrowed(hf),
            WeightLayout::InOut => Cow::Owned(transpose(hf, self.shape[0], self.shape[1])),
        }
    }

    /// Values in the graph's storage layout back in HF layout.
    pub fn from_stored(&self, stored: Vec<f32>) -> Vec<f32> {
        match self.storage() {
            WeightLayout::OutIn => stored,
            WeightLayout::InOut => transpose(&stored, self.shape[1], self.shape[0]),
        }
    }
}

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` matrix, in cache-sized tiles.
/// A slice of the wrong length (an invariant the callers check) is returned as it is.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    if a.len() != rows * cols {
        return a.to_vec();
    }
    const TILE: usize = 32;
    let mut out = vec![0.0; a.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
    out
}

impl fmt::Display for ParamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.name, self.shape)
    }
}

/// Every parameter of `cfg`, in HF order: embedding, then per layer the attention and MLP
/// projections and the two norms, then the final norm and (unless tied) lm_head.
pub fn param_specs(cfg: &LlamaConfig) -> Vec<ParamSpec> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let spec = |name: String, shape: Vec<usize>, role, layer| ParamSpec {
        name,
        shape,
        role,
        layer,
    };
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Role::Embedding,
        None,
    )];
    // One layer's parameters: name under `model.layers.{l}.`, shape, role.
    let per_layer = [
        ("self_attn.q_proj", vec![q, h], Role::QProj),
        ("self_attn.k_proj", vec![kv, h], Role::KProj),
        ("self_attn.v_proj", vec![kv, h], Role::VProj),
        ("self_attn.o_proj", vec![h, q], Role::OProj),
        ("mlp.gate_proj", vec![i, h], Role::GateProj),
        ("mlp.up_proj", vec![i, h], Role::UpProj),
        ("mlp.down_proj", vec![h, i], Role::DownProj),
        ("input_layernorm", vec![h], Role::InputNorm),
        ("post_attention_layernorm", vec![h], Role::PostAttentionNorm),
    ];
    for l in 0..cfg.num_hidden_layers {
        for (name, shape, role) in &per_layer {
            let name = format!("model.layers.{l}.{name}.weight");
            out.push(spec(name, shape.clone(), *role, Some(l)));
        }
    }
    out.push(spec(
        "model.norm.weight".into(),
        vec![h],
        Role::FinalNorm,
        None,
    ));
    if !cfg.tie_word_embeddings {
        out.push(spec(
            "lm_head.weight".into(),
            vec![v, h],
            Role::LmHead,
            None,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_parallel_weights_are_stored_transposed_and_come_back() {
        let cfg = LlamaConfig::preset("llama2-7b").unwrap();
        let specs = param_specs(&cfg);
        let o = specs.iter().find(|s| s.role == Role::OProj).unwrap();
        let d = specs.iter().find(|s| s.role == Role::DownProj).unwrap();
        let q = specs.iter().find(|s| s.role == Role::QProj).unwrap();
        assert_eq!(o.stored_shape(), vec![4096, 4096]);
        assert_eq!(d.shape, vec![4096, 11008]);
        assert_eq!(d.stored_shape(), vec![11008, 4096]);
        assert_eq!(q.stored_shape(), q.shape);
        // [2, 3] -> [3, 2] and back.
        let small = ParamSpec {
            name: "w".into(),
            shape: vec![2, 3],
            role: Role::DownProj,
            layer: Some(0),
        };
        let hf = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let stored = small.to_stored(&hf).into_owned();
        assert_eq!(stored, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(small.from_stored(stored), hf);
        // Larger than one tile, odd sizes.
        let (r, c) = (37, 70);
        let a: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let t = transpose(&a, r, c);
        assert_eq!(t[5 * r + 7], a[7 * c + 5]);
        assert_eq!(transpose(&t, c, r), a);
    }
}
