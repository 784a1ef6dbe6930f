//! Activation recomputation as a graph-to-graph pass on a differentiated graph: forward ops are
//! cloned into the backward, just before the first backward op that reads what they produce,
//! and the backward reads the clones' outputs. The originals are then read by the forward only,
//! so the executor (which frees every tensor after its last use) drops them when the forward is
//! done with them, and the memory model, which walks the same graph, counts exactly that.
//! The clones run the same kernels on the same inputs, so the gradients are bitwise those
//! without recomputation.
//!
//! - [`Recompute::Full`]: per decoder layer (ops whose outputs are named `model.layers.{l}.…`),
//!   everything the backward reads is recomputed from the layer's input, which is kept (with
//!   anything else another layer reads, such as the residual stream between layers).
//! - [`Recompute::Selective`]: attention's output and log-sum-exp are recomputed from the kept
//!   Q, K, V before attention's backward and the output projection's weight gradient read them.
//!   With a FlashAttention-style kernel there is no score matrix to drop (what Megatron's
//!   selective recomputation saves), so this drops the attention output instead.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Op, OpKind, TensorId, TensorKind};

/// What the backward recomputes instead of keeping from the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Recompute {
    /// Keep every activation the backward reads.
    #[default]
    None,
    /// Recompute attention's output and log-sum-exp from the kept Q, K, V.
    Selective,
    /// Keep each decoder layer's input; recompute the layer's forward before its backward.
    Full,
}

impl Recompute {
    /// `none`, `selective` or `full`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "selective" => Some(Self::Selective),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Selective => "selective",
            Self::Full => "full",
        })
    }
}

/// Forward ops recomputed together, and what of theirs is kept rather than recomputed.
struct Group {
    ops: Vec<usize>,
    keep: HashSet<TensorId>,
}

/// The layer index of a forward op: every output named `model.layers.{l}.…`.
fn layer_of(g: &Graph, op: &Op) -> Option<usize> {
    let mut layer = None;
    for &o in &op.outputs {
        let rest = g.info(o).name.strip_prefix("model.layers.")?;
        let l: usize = rest.split('.').next()?.parse().ok()?;
        if layer.is_some_and(|x| x != l) {
            return None;
        }
        layer = Some(l);
    }
    layer
}

fn groups(g: &Graph, mode: Recompute) -> Vec<Group> {
    let forward = g.num_forward_ops();
    match mode {
        Recompute::None => Vec::new(),
        Recompute::Selective => (0..forward)
            .filter(|&i| matches!(g.ops[i].kind, OpKind::Attention { .. }))
            .map(|i| Group {
                ops: vec![i],
                keep: HashSet::new(),
            })
            .collect(),
        Recompute::Full => {
            let mut by_layer: Vec<(usize, Vec<usize>)> = Vec::new();
            for i in 0..forward {
                if let Some(l) = layer_of(g, &g.ops[i]) {
                    match by_layer.iter_mut().find(|(x, _)| *x == l) {
                        Some((_, ops)) => ops.push(i),
                        None => by_layer.push((l, vec![i])),
                    }
                }
            }
            by_layer
                .into_iter()
                .map(|(_, ops)| {
                    let mine: HashSet<usize> = ops.iter().copied().collect();
                    let produced: HashSet<TensorId> = ops
                        .iter()
                        .flat_map(|&i| g.ops[i].outputs.iter().copied())
                        .collect();
                    // What another forward op reads (the next layer's input), or the stage
                    // hands on, is a checkpoint: kept.
                    let mut keep: HashSet<TensorId> = (0..forward)
                        .filter(|i| !mine.contains(i))
                        .flat_map(|i| g.ops[i].inputs.iter().copied())
                        .filter(|t| produced.contains(t))
                        .collect();
                    keep.extend(g.outputs.iter().filter(|t| produced.contains(t)));
                    Group { ops, keep }
                })
                .collect()
        }
    }
}

/// `g` (differentiated) with `mode`'s forward ops recomputed in its backward.
pub fn recompute(g: &Graph, mode: Recompute) -> Result<Graph> {
    if g.forward_ops.is_none() {
        return Err(GraphError::Invalid(
            "recomputation rewrites the backward: differentiate the graph first".into(),
        ));
    }
    let mut out = g.clone();
    if mode == Recompute::None {
        return Ok(out);
    }
    let forward = g.num_forward_ops();
    // Ops of the autodiff's backward (clones are never rewritten: they read the originals).
    let mut original = vec![true; g.ops.len()];
    for group in groups(g, mode) {
        let produced: HashSet<TensorId> = group
            .ops
            .iter()
            .flat_map(|&i| g.ops[i].outputs.iter().copied())
            .collect();
        let readers = |out: &Graph, original: &[bool], t: &TensorId| {
            (forward..out.ops.len()).any(|j| original[j] && out.ops[j].inputs.contains(t))
        };
        let needed: HashSet<TensorId> = produced
            .iter()
            .filter(|t| !group.keep.contains(t) && readers(&out, &original, t))
            .copied()
            .collect();
        if needed.is_empty() {
            continue;
        }
        // The ops that produce what is needed, and what they need of the group in turn.
        let mut wanted = needed.clone();
        let mut clone_ops = Vec::new();
        for &i in group.ops.iter().rev() {
            if g.ops[i].outputs.iter().any(|o| wanted.contains(o)) {
                clone_ops.push(i);
                for &x in &g.ops[i].inputs {
                    if produced.contains(&x) && !group.keep.contains(&x) {
                        wanted.insert(x);
                    }
                }
            }
        }
        clone_ops.reverse();
        let at = (forward..out.ops.len())
            .find(|&j| original[j] && out.ops[j].inputs.iter().any(|x| needed.contains(x)))
            .unwrap_or(out.ops.len());
        let mut map: HashMap<TensorId, TensorId> = HashMap::new();
        let mut clones = Vec::with_capacity(clone_ops.len());
        for &i in &clone_ops {
            let op = &g.ops[i];
            let inputs = op
                .inputs
                .iter()
                .map(|x| map.get(x).copied().unwrap_or(*x))
                .collect();
            let outputs: Vec<TensorId> = op
                .outputs
                .iter()
                .map(|&o| {
                    let info = g.info(o).clone();
                    let t = out.add_tensor(
                        format!("recompute({})", info.name),
                        info.shape,
                        TensorKind::Activation,
                    );
                    map.insert(o, t);
                    t
                })
                .collect();
            clones.push(Op {
                kind: op.kind,
                inputs,
                outputs,
            });
        }
        for (op, _) in out.ops[at..]
            .iter_mut()
            .zip(&original[at..])
            .filter(|(_, &o)| o)
        {
            for x in &mut op.inputs {
                if needed.contains(x) {
                    *x = map[x];
                }
            }
        }
        let n = clones.len();
        out.ops.splice(at..at, clones);
        original.splice(at..at, std::iter::repeat_n(false, n));
    }
    out.verify()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backward, GraphBuilder};

    /// embed → layer 0 (norm, gate/up, SwiGLU, down) → head → loss.
    fn graph() -> Graph {
        let mut b = GraphBuilder::new();
        let emb = b.param("embed", &[8, 4]);
        let nw = b.param("norm", &[4]);
        let (wg, wu, wd) = (
            b.param("gate", &[6, 4]),
            b.param("up", &[6, 4]),
            b.param("down", &[4, 6]),
        );
        let x = b.embedding(emb, "x").unwrap();
        let n = b.rms_norm(x, nw, 1e-5, "model.layers.0.norm").unwrap();
        let g = b.linear(n, wg, "model.layers.0.gate").unwrap();
        let u = b.linear(n, wu, "model.layers.0.up").unwrap();
        let m = b.swiglu(g, u, "model.layers.0.act").unwrap();
        let d = b.linear(m, wd, "model.layers.0.down").unwrap();
        let logits = b.linear(d, emb, "logits").unwrap();
        b.cross_entropy(logits, "loss").unwrap();
        let mut g = b.finish().unwrap();
        backward(&mut g).unwrap();
        g
    }

    #[test]
    fn full_recomputation_keeps_the_layer_input_and_clones_the_rest_into_the_backward() {
        let g = graph();
        assert_eq!(recompute(&g, Recompute::None).unwrap(), g);
        let r = recompute(&g, Recompute::Full).unwrap();
        let forward = g.num_forward_ops();
        // Four layer ops run again after the forward; the layer's output (`down`, read by the
        // head outside the layer) is a checkpoint, kept rather than recomputed.
        assert_eq!(r.ops.len(), g.ops.len() + 4);
        let name = |t: TensorId| r.info(t).name.clone();
        // No backward op reads a layer activation of the forward any more but that output; the
        // clones read the layer input `x`, which is kept.
        for op in &r.ops[forward..] {
            for &t in &op.inputs {
                let n = name(t);
                let kept = n == "model.layers.0.down";
                assert!(
                    kept || !n.starts_with("model.layers.0."),
                    "{n} read by {:?}",
                    op.kind
                );
            }
        }
        let first = &r.ops[forward..]
            .iter()
            .find(|o| o.outputs.iter().any(|&t| name(t).starts_with("recompute(")))
            .unwrap();
        assert_eq!(first.kind, OpKind::RmsNorm { eps: 1e-5 });
        assert_eq!(name(first.inputs[0]), "x");
        // Selective touches attention only: this graph has none.
        assert_eq!(recompute(&g, Recompute::Selective).unwrap(), g);
        assert_eq!(Recompute::parse("full"), Some(Recompute::Full));
        assert_eq!(Recompute::parse("some"), None);
    }

    #[test]
    fn an_undifferentiated_graph_is_refused() {
        let mut b = GraphBuilder::new();
        let emb = b.param("embed", &[8, 4]);
        let x = b.embedding(emb, "x").unwrap();
        let logits = b.linear(x, emb, "logits").unwrap();
        b.cross_entropy(logits, "loss").unwrap();
        let g = b.finish().unwrap();
        let e = recompute(&g, Recompute::Full).unwrap_err().to_string();
        assert!(e.contains("differentiate the graph first"), "{e}");
    }
}
