//! Reverse-mode autodiff as a graph-to-graph pass: one backward rule per op, each made of ops.

use std::collections::HashMap;

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Op, OpKind, TensorId, TensorKind};

struct Pass<'a> {
    g: &'a mut Graph,
    grad: HashMap<TensorId, TensorId>,
}

impl Pass<'_> {
    fn new_grad(&mut self, of: TensorId) -> TensorId {
        let info = self.g.info(of).clone();
        self.g
            .add_tensor(format!("grad({})", info.name), info.shape, TensorKind::Grad)
    }

    fn emit(
        &mut self,
        kind: OpKind,
        inputs: Vec<TensorId>,
        grads_of: &[TensorId],
    ) -> Vec<TensorId> {
        let outputs: Vec<TensorId> = grads_of.iter().map(|&t| self.new_grad(t)).collect();
        self.g.ops.push(Op {
            kind,
            inputs,
            outputs: outputs.clone(),
        });
        for (&t, &gt) in grads_of.iter().zip(&outputs) {
            self.accumulate(t, gt);
        }
        outputs
    }

    /// Records `g` as (a further part of) the gradient of `t`, summing with an `Add` op when `t`
    /// already has one (a tensor read by several ops, or a tied weight).
    fn accumulate(&mut self, t: TensorId, g: TensorId) {
        match self.grad.get(&t).copied() {
            None => {
                self.grad.insert(t, g);
            }
            Some(prev) => {
                let sum = self.new_grad(t);
                self.g.ops.push(Op {
                    kind: OpKind::Add,
                    inputs: vec![prev, g],
                    outputs: vec![sum],
                });
                self.grad.insert(t, sum);
            }
        }
    }
}

/// Appends the backward pass to `g`: from its loss (which must come from a `CrossEntropy` op)
/// and from an incoming gradient for each of its outputs (new `Input` tensors, listed in
/// `g.output_grads`). Fills `g.grads` with the gradient of every parameter and `g.input_grads`
/// with the gradient of every input. Parameters nothing depends on are an error (their gradient
/// would silently be missing).
pub fn backward(g: &mut Graph) -> Result<()> {
    if g.loss.is_none() && g.outputs.is_empty() {
        return Err(GraphError::Invalid(
            "the graph has no loss or output to differentiate".into(),
        ));
    }
    if g.forward_ops.is_some() {
        return Err(GraphError::Invalid(
            "backward already ran on this graph".into(),
        ));
    }
    let loss = g.loss;
    g.forward_ops = Some(g.ops.len());
    let forward: Vec<Op> = g.ops.clone();
    let mut pass = Pass {
        g,
        grad: HashMap::new(),
    };
    for o in pass.g.outputs.clone() {
        let info = pass.g.info(o).clone();
        let seed = pass.g.add_tensor(
            format!("grad({})", info.name),
            info.shape,
            TensorKind::Input,
        );
        pass.g.output_grads.push(seed);
        pass.accumulate(o, seed);
    }
    let mut seeded = !pass.g.outputs.is_empty();
    for op in forward.iter().rev() {
        let i = &op.inputs;
        if op.kind == OpKind::CrossEntropy {
            if Some(op.outputs[0]) != loss {
                return Err(GraphError::NotImplemented(
                    "a cross-entropy that is not the loss".into(),
                ));
            }
            pass.emit(OpKind::CrossEntropyGrad, vec![i[0], op.outputs[1]], &[i[0]]);
            seeded = true;
            continue;
        }
        // Ops whose main output does not reach the loss contribute nothing. (Secondary outputs
        // such as `rstd` and `lse` are only read by backward ops.)
        let Some(d) = pass.grad.get(&op.outputs[0]).copied() else {
            continue;
        };
        match op.kind {
            OpKind::Embedding => {
                pass.emit(OpKind::EmbeddingGrad, vec![d, i[0]], &[i[0]]);
            }
            OpKind::Linear { w } => {
                pass.emit(OpKind::LinearGradInput { w }, vec![d, i[1]], &[i[0]]);
                pass.emit(OpKind::LinearGradWeight { w }, vec![d, i[0]], &[i[1]]);
            }
            OpKind::RmsNorm { .. } => {
                let inputs = vec![d, i[0], i[1], op.outputs[1]];
                pass.emit(OpKind::RmsNormGrad, inputs, &[i[0], i[1]]);
            }
            OpKind::Rope {
                heads,
                head_dim,
                rope,
            } => {
                let kind = OpKind::RopeGrad {
                    heads,
                    head_dim,
                    rope,
                };
                pass.emit(kind, vec![d], &[i[0]]);
            }
            OpKind::Attention { shape, scale } => {
                let inputs = vec![d, i[0], i[1], i[2], op.outputs[0], op.outputs[1]];
                let kind = OpKind::AttentionGrad { shape, scale };
                pass.emit(kind, inputs, &[i[0], i[1], i[2]]);
            }
            OpKind::SwiGlu => {
                pass.emit(OpKind::SwiGluGrad, vec![d, i[0], i[1]], &[i[0], i[1]]);
            }
            OpKind::Add => {
                // The gradient flows unchanged to both operands: no op, a shared tensor.
                pass.accumulate(i[0], d);
                pass.accumulate(i[1], d);
            }
            OpKind::CrossEntropy
            | OpKind::EmbeddingGrad
            | OpKind::LinearGradInput { .. }
            | OpKind::LinearGradWeight { .. }
            | OpKind::RmsNormGrad
            | OpKind::RopeGrad { .. }
            | OpKind::AttentionGrad { .. }
            | OpKind::SwiGluGrad
            | OpKind::CrossEntropyGrad
            | OpKind::Comm { .. }
            | OpKind::GatherParam => {
                return Err(GraphError::NotImplemented(format!(
                    "differentiating {} (second-order gradients)",
                    op.kind.name()
                )))
            }
        }
    }
    if !seeded {
        return Err(GraphError::Invalid(
            "the loss is not produced by any op".into(),
        ));
    }
    let params = pass.g.params.clone();
    let mut grads = Vec::with_capacity(params.len());
    for p in params {
        match pass.grad.get(&p) {
            Some(&gp) => grads.push((p, gp)),
            None => {
                return Err(GraphError::Invalid(format!(
                    "the loss does not depend on parameter {}",
                    pass.g.info(p).name
                )))
            }
        }
    }
    pass.g.grads = grads;
    let mut input_grads = Vec::new();
    for i in pass.g.inputs.clone() {
        match pass.grad.get(&i) {
            Some(&gi) => input_grads.push((i, gi)),
            None => {
                return Err(GraphError::Invalid(format!(
                    "nothing depends on input {}",
                    pass.g.info(i).name
                )))
            }
        }
    }
    pass.g.input_grads = input_grads;
    pass.g.verify()
}
