//! The parameter catalogue: every weight of a LLaMA model with its HF name, shape and role.

use std::fmt;

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
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let layer = Some(l);
        out.push(spec(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            Role::QProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            Role::KProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            Role::VProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            Role::OProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            Role::GateProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.mlp.up_proj.weight"),
            vec![i, h],
            Role::UpProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            Role::DownProj,
            layer,
        ));
        out.push(spec(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            Role::InputNorm,
            layer,
        ));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Role::PostAttentionNorm,
            layer,
        ));
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
