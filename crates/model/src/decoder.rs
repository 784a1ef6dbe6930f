//! The LLaMA decoder as a graph: HF's `LlamaForCausalLM` forward and the loss of DESIGN §3.

use graph::{GraphBuilder, GraphError};
use kernels::AttnShape;

use crate::config::LlamaConfig;
use crate::params::{param_specs, Role};

/// Builds the forward graph of `cfg` with its loss. Parameters are declared in
/// [`param_specs`] order in their stored layout, so `Weights::stored()` binds to `graph.params`
/// one to one.
///
/// Per layer: `x += o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))` with
/// `n1 = input_layernorm(x)`, then `x += down_proj(silu(gate_proj(n2)) · up_proj(n2))` with
/// `n2 = post_attention_layernorm(x)`; finally `logits = lm_head(norm(x))` (the embedding matrix
/// when tied) and the scaled next-token cross-entropy.
pub fn build_graph(cfg: &LlamaConfig) -> Result<graph::Graph, GraphError> {
    build_stage_graph(cfg, 0..cfg.num_hidden_layers, true, true)
}

/// The graph of one pipeline stage holding decoder `layers`: the first stage starts from the
/// embedding, the others from an input activation (the residual stream); the last ends with the
/// final norm, lm_head and the loss, the others with an output activation. Only the parameters
/// the stage uses are declared (in [`param_specs`] order); a tied embedding appears in the first
/// and the last stage, whose gradients must then be summed.
pub fn build_stage_graph(
    cfg: &LlamaConfig,
    layers: std::ops::Range<usize>,
    first: bool,
    last: bool,
) -> Result<graph::Graph, GraphError> {
    if layers.end > cfg.num_hidden_layers || layers.start > layers.end {
        return Err(GraphError::Invalid(format!(
            "layers {layers:?} of a {}-layer model",
            cfg.num_hidden_layers
        )));
    }
    let specs: Vec<_> = param_specs(cfg)
        .into_iter()
        .filter(|s| match s.role {
            Role::Embedding => first || (last && cfg.tie_word_embeddings),
            Role::FinalNorm | Role::LmHead => last,
            _ => s.layer.is_some_and(|l| layers.contains(&l)),
        })
        .collect();
    let mut b = GraphBuilder::new();
    let hd = cfg.head_dim();
    // Row-parallel weights are declared transposed (`ParamSpec::stored_shape`).
    let ids: Vec<_> = specs
        .iter()
        .map(|s| b.param_with(s.name.clone(), &s.stored_shape(), s.tp_layout(hd)))
        .collect();
    let find = |role: Role, layer: Option<usize>| {
        specs
            .iter()
            .position(|s| s.role == role && s.layer == layer)
            .map(|i| ids[i])
            .ok_or_else(|| {
                GraphError::Invalid(format!("no parameter for {role:?} layer {layer:?}"))
            })
    };
    let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
    let eps = cfg.rms_norm_eps;
    let shape = AttnShape {
        heads,
        kv_heads: kv,
        head_dim: hd,
    };
    let mut x = if first {
        b.embedding(find(Role::Embedding, None)?, "model.embed_tokens")?
    } else {
        b.input(
            format!("model.layers.{}.input", layers.start),
            cfg.hidden_size,
        )
    };
    for l in layers.clone() {
        let p = format!("model.layers.{l}");
        let at = Some(l);
        let n1 = b.rms_norm(
            x,
            find(Role::InputNorm, at)?,
            eps,
            &format!("{p}.input_layernorm"),
        )?;
        let q = b.linear(n1, find(Role::QProj, at)?, &format!("{p}.self_attn.q"))?;
        let k = b.linear(n1, find(Role::KProj, at)?, &format!("{p}.self_attn.k"))?;
        let v = b.linear(n1, find(Role::VProj, at)?, &format!("{p}.self_attn.v"))?;
        let q = b.rope(q, heads, hd, cfg.rope(), &format!("{p}.self_attn.q_rot"))?;
        let k = b.rope(k, kv, hd, cfg.rope(), &format!("{p}.self_attn.k_rot"))?;
        let a = b.attention(q, k, v, shape, &format!("{p}.self_attn.attn"))?;
        let o = b.linear(a, find(Role::OProj, at)?, &format!("{p}.self_attn.o"))?;
        x = b.add(x, o, &format!("{p}.attn_residual"))?;
        let n2 = b.rms_norm(
            x,
            find(Role::PostAttentionNorm, at)?,
            eps,
            &format!("{p}.post_attention_layernorm"),
        )?;
        let g = b.linear(n2, find(Role::GateProj, at)?, &format!("{p}.mlp.gate"))?;
        let u = b.linear(n2, find(Role::UpProj, at)?, &format!("{p}.mlp.up"))?;
        let m = b.swiglu(g, u, &format!("{p}.mlp.act"))?;
        let d = b.linear(m, find(Role::DownProj, at)?, &format!("{p}.mlp.down"))?;
        x = b.add(x, d, &format!("{p}.mlp_residual"))?;
    }
    if !last {
        b.output(x);
        return b.finish();
    }
    let x = b.rms_norm(x, find(Role::FinalNorm, None)?, eps, "model.norm")?;
    let head = if cfg.tie_word_embeddings {
        find(Role::Embedding, None)?
    } else {
        find(Role::LmHead, None)?
    };
    let logits = b.linear(x, head, "lm_head")?;
    b.cross_entropy(logits, "loss")?;
    b.finish()
}
