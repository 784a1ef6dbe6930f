//! Building forward graphs with shape checks.

use kernels::AttnShape;

use crate::error::{GraphError, Result};
use crate::ir::{Dim, Graph, Op, OpKind, TensorId, TensorKind, TpLayout, WeightLayout};

/// Builds a forward graph op by op; every method checks its operands' shapes.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    g: Graph,
}

fn fixed(d: Dim) -> Option<usize> {
    match d {
        Dim::Fixed(n) => Some(n),
        Dim::Tokens => None,
    }
}

impl GraphBuilder {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// A parameter of a fixed shape, replicated under tensor parallelism.
    pub fn param(&mut self, name: impl Into<String>, shape: &[usize]) -> TensorId {
        self.param_with(name, shape, TpLayout::Replicated)
    }

    /// A parameter with its tensor-parallel layout.
    pub fn param_with(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        layout: TpLayout,
    ) -> TensorId {
        let t = self.g.add_tensor(
            name,
            shape.iter().map(|&n| Dim::Fixed(n)).collect(),
            TensorKind::Param,
        );
        self.g.params.push(t);
        self.g.param_layouts.push(layout);
        t
    }

    /// An activation bound from outside (`[T, width]`), e.g. a pipeline stage's input.
    pub fn input(&mut self, name: impl Into<String>, width: usize) -> TensorId {
        let t = self.g.add_tensor(
            name,
            vec![Dim::Tokens, Dim::Fixed(width)],
            TensorKind::Input,
        );
        self.g.inputs.push(t);
        t
    }

    /// Marks `t` as handed to the outside, e.g. a pipeline stage's output.
    pub fn output(&mut self, t: TensorId) {
        self.g.outputs.push(t);
    }

    fn shape(&self, t: TensorId) -> &[Dim] {
        &self.g.tensors[t.0].shape
    }

    fn name(&self, t: TensorId) -> &str {
        &self.g.tensors[t.0].name
    }

    fn emit(
        &mut self,
        kind: OpKind,
        inputs: Vec<TensorId>,
        outs: Vec<(String, Vec<Dim>)>,
    ) -> Vec<TensorId> {
        let outputs: Vec<TensorId> = outs
            .into_iter()
            .map(|(n, s)| self.g.add_tensor(n, s, TensorKind::Activation))
            .collect();
        self.g.ops.push(Op {
            kind,
            inputs,
            outputs: outputs.clone(),
        });
        outputs
    }

    fn err(&self, op: &str, name: &str, reason: String) -> GraphError {
        GraphError::Shape {
            op: format!("{op} → {name}"),
            reason,
        }
    }

    /// `[T, hidden]` rows of `w` (`[vocab, hidden]`) for the batch's token ids.
    pub fn embedding(&mut self, w: TensorId, name: &str) -> Result<TensorId> {
        let s = self.shape(w).to_vec();
        if s.len() != 2 {
            return Err(self.err("embedding", name, format!("weight must be 2-d, got {s:?}")));
        }
        Ok(self.emit(
            OpKind::Embedding,
            vec![w],
            vec![(name.into(), vec![Dim::Tokens, s[1]])],
        )[0])
    }

    /// `x [T, in] · wᵀ` with `w` `[out, in]`, or `x · w` with `w` `[in, out]` when `w` is a
    /// row-parallel parameter ([`TpLayout::Row`] weights are stored transposed).
    pub fn linear(&mut self, x: TensorId, w: TensorId, name: &str) -> Result<TensorId> {
        let (xs, ws) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        let layout = match self.g.params.iter().position(|&p| p == w) {
            Some(k) if matches!(self.g.param_layouts[k], TpLayout::Row { .. }) => {
                WeightLayout::InOut
            }
            _ => WeightLayout::OutIn,
        };
        let (in_dim, out_dim) = (layout.in_dim(), layout.out_dim());
        if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[in_dim] || fixed(ws[in_dim]).is_none() {
            let (op, w_shape) = match layout {
                WeightLayout::OutIn => ("ᵀ", "[out, in]"),
                WeightLayout::InOut => ("", "[in, out]"),
            };
            return Err(self.err(
                "linear",
                name,
                format!(
                    "{} {:?} · {}{op} {:?} ({w_shape}) do not fit",
                    self.name(x),
                    xs,
                    self.name(w),
                    ws
                ),
            ));
        }
        Ok(self.emit(
            OpKind::Linear { w: layout },
            vec![x, w],
            vec![(name.into(), vec![xs[0], ws[out_dim]])],
        )[0])
    }

    /// RMSNorm of `x [T, h]` with weight `[h]`.
    pub fn rms_norm(&mut self, x: TensorId, w: TensorId, eps: f64, name: &str) -> Result<TensorId> {
        let (xs, ws) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if xs.len() != 2 || ws.len() != 1 || xs[1] != ws[0] {
            return Err(self.err(
                "rms_norm",
                name,
                format!("x {xs:?} and weight {ws:?} do not fit"),
            ));
        }
        let outs = vec![
            (name.into(), xs.clone()),
            (format!("{name}.rstd"), vec![xs[0]]),
        ];
        Ok(self.emit(OpKind::RmsNorm { eps }, vec![x, w], outs)[0])
    }

    /// RoPE on `x [T, heads·head_dim]`.
    pub fn rope(
        &mut self,
        x: TensorId,
        heads: usize,
        head_dim: usize,
        rope: kernels::Rope,
        name: &str,
    ) -> Result<TensorId> {
        let xs = self.shape(x).to_vec();
        if xs.len() != 2 || xs[1] != Dim::Fixed(heads * head_dim) || !head_dim.is_multiple_of(2) {
            return Err(self.err(
                "rope",
                name,
                format!("x {xs:?} is not [T, {heads}×{head_dim}] with an even head_dim"),
            ));
        }
        Ok(self.emit(
            OpKind::Rope {
                heads,
                head_dim,
                rope,
            },
            vec![x],
            vec![(name.into(), xs)],
        )[0])
    }

    /// Causal GQA attention; `q [T, heads·d]`, `k`, `v` `[T, kv_heads·d]`.
    pub fn attention(
        &mut self,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        shape: AttnShape,
        name: &str,
    ) -> Result<TensorId> {
        let (qs, ks, vs) = (
            self.shape(q).to_vec(),
            self.shape(k).to_vec(),
            self.shape(v).to_vec(),
        );
        let qd = Dim::Fixed(shape.heads * shape.head_dim);
        let kd = Dim::Fixed(shape.kv_heads * shape.head_dim);
        if qs.len() != 2
            || qs[1] != qd
            || ks != vs
            || ks.len() != 2
            || ks[1] != kd
            || qs[0] != ks[0]
            || shape.kv_heads == 0
            || !shape.heads.is_multiple_of(shape.kv_heads)
        {
            return Err(self.err(
                "attention",
                name,
                format!("q {qs:?}, k {ks:?}, v {vs:?} do not fit {shape:?}"),
            ));
        }
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let outs = vec![
            (name.into(), qs.clone()),
            (format!("{name}.lse"), vec![Dim::Fixed(shape.heads), qs[0]]),
        ];
        Ok(self.emit(OpKind::Attention { shape, scale }, vec![q, k, v], outs)[0])
    }

    /// `silu(gate) · up`.
    pub fn swiglu(&mut self, gate: TensorId, up: TensorId, name: &str) -> Result<TensorId> {
        let (gs, us) = (self.shape(gate).to_vec(), self.shape(up).to_vec());
        if gs != us {
            return Err(self.err("swiglu", name, format!("gate {gs:?} and up {us:?} differ")));
        }
        Ok(self.emit(OpKind::SwiGlu, vec![gate, up], vec![(name.into(), gs)])[0])
    }

    /// `a + b`.
    pub fn add(&mut self, a: TensorId, b: TensorId, name: &str) -> Result<TensorId> {
        let (as_, bs) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if as_ != bs {
            return Err(self.err("add", name, format!("{as_:?} and {bs:?} differ")));
        }
        Ok(self.emit(OpKind::Add, vec![a, b], vec![(name.into(), as_)])[0])
    }

    /// The loss: `loss_scale · Σ` next-token cross-entropy of `logits [T, vocab]` over the batch's
    /// predicted positions. Becomes the graph's loss.
    pub fn cross_entropy(&mut self, logits: TensorId, name: &str) -> Result<TensorId> {
        let s = self.shape(logits).to_vec();
        if s.len() != 2 || fixed(s[1]).is_none() {
            return Err(self.err(
                "cross_entropy",
                name,
                format!("logits {s:?} are not [T, vocab]"),
            ));
        }
        let outs = vec![
            (name.into(), vec![Dim::Fixed(1)]),
            (format!("{name}.lse"), vec![s[0]]),
        ];
        let loss = self.emit(OpKind::CrossEntropy, vec![logits], outs)[0];
        self.g.loss = Some(loss);
        Ok(loss)
    }

    /// The finished, verified graph.
    pub fn finish(self) -> Result<Graph> {
        self.g.verify()?;
        Ok(self.g)
    }
}
