//! Runs a graph on one rank: every op on the backend, activations freed after their last use,
//! live bytes tracked to report the peak. With DStates and a TP group it runs one rank's part of
//! an exec graph: local shapes from each tensor's piece, comm ops as collectives, vocab-parallel
//! embedding and cross-entropy.

use comm::ReduceOp;
use dstate::DState;
use graph::{ExecGraph, Graph, OpKind, TensorId};
use kernels::{Backend, GemmSpec};

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};
use crate::tp::TpGroup;

/// What one forward+backward run returns.
pub struct StepOutput<B: Backend> {
    /// The loss (already multiplied by the batch's loss scale).
    pub loss: f32,
    /// The gradient of every parameter, in `graph.params` order (this rank's pieces).
    pub grads: Vec<B::Buffer>,
    /// Most bytes of activations and gradients alive at once (parameters not counted).
    pub peak_bytes: usize,
}

enum Slot<B: Backend> {
    Empty,
    Param(usize),
    Owned(B::Buffer, usize),
}

/// Runs a single-device `graph` on `batch` with `params` bound in `graph.params` order.
pub fn run<B: Backend>(
    backend: &B,
    graph: &Graph,
    params: &[B::Buffer],
    batch: &MicroBatch,
) -> Result<StepOutput<B>> {
    Executor {
        backend,
        graph,
        states: None,
        tp: None,
        batch,
    }
    .run(params)
}

/// Runs this rank's part of `exec` (parameters are this TP rank's pieces).
pub fn run_exec<B: Backend>(
    backend: &B,
    exec: &ExecGraph,
    tp: &mut TpGroup,
    params: &[B::Buffer],
    batch: &MicroBatch,
) -> Result<StepOutput<B>> {
    Executor {
        backend,
        graph: &exec.graph,
        states: Some(&exec.states),
        tp: Some(tp),
        batch,
    }
    .run(params)
}

struct Executor<'a, B: Backend> {
    backend: &'a B,
    graph: &'a Graph,
    states: Option<&'a [DState]>,
    tp: Option<&'a mut TpGroup>,
    batch: &'a MicroBatch,
}

/// This rank's piece of a tensor: local shape and global offset.
struct Local {
    shape: Vec<usize>,
    offset: Vec<usize>,
}

impl<B: Backend> Executor<'_, B> {
    fn global(&self, t: TensorId) -> Vec<usize> {
        self.graph.info(t).resolve(self.batch.tokens())
    }

    fn local(&self, t: TensorId) -> Result<Local> {
        let shape = self.global(t);
        match (self.states, &self.tp) {
            (Some(states), Some(tp)) => {
                let r = states[t.0].piece(tp.rank(), &shape)?.region;
                Ok(Local {
                    shape: r.shape(),
                    offset: r.offset(),
                })
            }
            _ => Ok(Local {
                offset: vec![0; shape.len()],
                shape,
            }),
        }
    }

    fn run(mut self, params: &[B::Buffer]) -> Result<StepOutput<B>> {
        let graph = self.graph;
        let be = self.backend;
        if params.len() != graph.params.len() {
            return Err(RuntimeError::Binding(format!(
                "{} parameters bound, the graph has {}",
                params.len(),
                graph.params.len()
            )));
        }
        for (i, &p) in graph.params.iter().enumerate() {
            let want: usize = self.local(p)?.shape.iter().product();
            if be.len(&params[i]) != want {
                return Err(RuntimeError::Binding(format!(
                    "{} has {} values, this rank's piece of {:?} needs {want}",
                    graph.info(p).name,
                    be.len(&params[i]),
                    self.global(p)
                )));
            }
        }
        if let Some(op) = graph.ops.iter().find(|o| o.kind == OpKind::Embedding) {
            self.batch.validate(self.global(op.inputs[0])[0])?;
        }

        let n = graph.tensors.len();
        let mut last_use = vec![None; n];
        for (i, op) in graph.ops.iter().enumerate() {
            for &t in &op.inputs {
                last_use[t.0] = Some(i);
            }
        }
        let mut keep = vec![false; n];
        if let Some(l) = graph.loss {
            keep[l.0] = true;
        }
        for &(_, gp) in &graph.grads {
            keep[gp.0] = true;
        }
        let mut slots: Vec<Slot<B>> = (0..n).map(|_| Slot::Empty).collect();
        for (i, &p) in graph.params.iter().enumerate() {
            slots[p.0] = Slot::Param(i);
        }
        let (mut live, mut peak) = (0usize, 0usize);

        for (i, op) in graph.ops.iter().enumerate() {
            let mut outs: Vec<B::Buffer> = Vec::with_capacity(op.outputs.len());
            let mut sizes = Vec::with_capacity(op.outputs.len());
            for &t in &op.outputs {
                let numel: usize = self.local(t)?.shape.iter().product();
                sizes.push(numel * std::mem::size_of::<f32>());
                outs.push(be.zeros(numel)?);
            }
            {
                let mut ins: Vec<&B::Buffer> = Vec::with_capacity(op.inputs.len());
                for &t in &op.inputs {
                    ins.push(match &slots[t.0] {
                        Slot::Param(k) => &params[*k],
                        Slot::Owned(b, _) => b,
                        Slot::Empty => {
                            return Err(RuntimeError::Binding(format!(
                                "{} ({t}) is read by op #{i} but holds no value",
                                graph.info(t).name
                            )))
                        }
                    });
                }
                self.execute(op.kind, &ins, &mut outs, &op.inputs, &op.outputs)?;
            }
            for ((&t, buf), bytes) in op.outputs.iter().zip(outs).zip(sizes) {
                live += bytes;
                slots[t.0] = Slot::Owned(buf, bytes);
            }
            peak = peak.max(live);
            for &t in op.inputs.iter().chain(&op.outputs) {
                let dead = match last_use[t.0] {
                    Some(l) => l == i,
                    None => op.outputs.contains(&t),
                };
                if dead && !keep[t.0] {
                    if let Slot::Owned(_, bytes) = slots[t.0] {
                        live -= bytes;
                        slots[t.0] = Slot::Empty;
                    }
                }
            }
        }

        let loss = match graph.loss {
            Some(l) => match &slots[l.0] {
                Slot::Owned(b, _) => be.download(b)?.first().copied().unwrap_or(0.0),
                _ => return Err(RuntimeError::Binding("the loss was not computed".into())),
            },
            None => 0.0,
        };
        let mut grads = Vec::with_capacity(graph.grads.len());
        for &(p, gp) in &graph.grads {
            match std::mem::replace(&mut slots[gp.0], Slot::Empty) {
                Slot::Owned(b, _) => grads.push(b),
                // A gradient that is itself kept under another name (never happens for graphs
                // from `graph::backward`, whose gradients are fresh tensors).
                _ => {
                    return Err(RuntimeError::Binding(format!(
                        "the gradient of {} was not computed",
                        graph.info(p).name
                    )))
                }
            }
        }
        Ok(StepOutput {
            loss,
            grads,
            peak_bytes: peak,
        })
    }

    fn execute(
        &mut self,
        kind: OpKind,
        ins: &[&B::Buffer],
        outs: &mut [B::Buffer],
        in_ids: &[TensorId],
        out_ids: &[TensorId],
    ) -> Result<()> {
        let be = self.backend;
        let batch = self.batch;
        let dims = |me: &Self, k: usize| me.local(in_ids[k]).map(|l| l.shape);
        match kind {
            OpKind::Embedding => {
                let w = self.local(in_ids[0])?;
                be.embedding_forward(ins[0], w.shape[1], w.offset[0], &batch.ids, &mut outs[0])?;
            }
            OpKind::EmbeddingGrad => {
                let w = self.local(in_ids[1])?;
                be.embedding_backward(ins[0], w.shape[1], w.offset[0], &batch.ids, &mut outs[0])?;
            }
            OpKind::Linear => {
                let (x, w) = (dims(self, 0)?, dims(self, 1)?);
                be.gemm(
                    &GemmSpec::new(x[0], w[0], w[1]).trans(false, true),
                    ins[0],
                    ins[1],
                    &mut outs[0],
                )?;
            }
            OpKind::LinearGradInput => {
                let (dy, w) = (dims(self, 0)?, dims(self, 1)?);
                be.gemm(
                    &GemmSpec::new(dy[0], w[1], w[0]),
                    ins[0],
                    ins[1],
                    &mut outs[0],
                )?;
            }
            OpKind::LinearGradWeight => {
                let (dy, x) = (dims(self, 0)?, dims(self, 1)?);
                be.gemm(
                    &GemmSpec::new(dy[1], x[1], dy[0]).trans(true, false),
                    ins[0],
                    ins[1],
                    &mut outs[0],
                )?;
            }
            OpKind::RmsNorm { eps } => {
                let (y, rest) = outs.split_at_mut(1);
                be.rms_norm_forward(ins[0], ins[1], eps, &mut y[0], &mut rest[0])?;
            }
            OpKind::RmsNormGrad => {
                let (dx, dw) = outs.split_at_mut(1);
                be.rms_norm_backward(ins[0], ins[1], ins[2], ins[3], &mut dx[0], &mut dw[0])?;
            }
            OpKind::Rope {
                head_dim, theta, ..
            }
            | OpKind::RopeGrad {
                head_dim, theta, ..
            } => {
                let x = dims(self, 0)?;
                be.axpy(1.0, ins[0], &mut outs[0])?;
                let inverse = matches!(kind, OpKind::RopeGrad { .. });
                be.rope(
                    &mut outs[0],
                    &batch.positions,
                    x[1] / head_dim,
                    head_dim,
                    theta,
                    inverse,
                )?;
            }
            OpKind::Attention { shape, scale } => {
                let local = kernels::AttnShape {
                    heads: dims(self, 0)?[1] / shape.head_dim,
                    kv_heads: dims(self, 1)?[1] / shape.head_dim,
                    head_dim: shape.head_dim,
                };
                let (o, lse) = outs.split_at_mut(1);
                be.attention_forward(
                    ins[0],
                    ins[1],
                    ins[2],
                    &batch.cu_seqlens,
                    local,
                    scale,
                    &mut o[0],
                    &mut lse[0],
                )?;
            }
            OpKind::AttentionGrad { shape, scale } => {
                let local = kernels::AttnShape {
                    heads: dims(self, 1)?[1] / shape.head_dim,
                    kv_heads: dims(self, 2)?[1] / shape.head_dim,
                    head_dim: shape.head_dim,
                };
                let (dq, rest) = outs.split_at_mut(1);
                let (dk, dv) = rest.split_at_mut(1);
                be.attention_backward(
                    ins[0],
                    ins[1],
                    ins[2],
                    ins[3],
                    ins[4],
                    ins[5],
                    &batch.cu_seqlens,
                    local,
                    scale,
                    &mut dq[0],
                    &mut dk[0],
                    &mut dv[0],
                )?;
            }
            OpKind::SwiGlu => be.swiglu_forward(ins[0], ins[1], &mut outs[0])?,
            OpKind::SwiGluGrad => {
                let (dg, du) = outs.split_at_mut(1);
                be.swiglu_backward(ins[0], ins[1], ins[2], &mut dg[0], &mut du[0])?;
            }
            OpKind::Add => be.add(ins[0], ins[1], &mut outs[0])?,
            OpKind::CrossEntropy => {
                let logits = self.local(in_ids[0])?;
                let vocab = self.global(in_ids[0])[1];
                let (loss, lse) = outs.split_at_mut(1);
                if logits.shape[1] == vocab {
                    let sum = be.cross_entropy_forward(
                        ins[0],
                        vocab,
                        &batch.targets,
                        &batch.mask,
                        &mut lse[0],
                    )?;
                    loss[0] = be.upload(&[sum * batch.loss_scale])?;
                } else {
                    let (l, s) = self.parallel_cross_entropy(&be.download(ins[0])?, &logits)?;
                    loss[0] = be.upload(&[l])?;
                    lse[0] = be.upload(&s)?;
                }
            }
            OpKind::CrossEntropyGrad => {
                let logits = self.local(in_ids[0])?;
                let vocab = self.global(in_ids[0])[1];
                if logits.shape[1] == vocab {
                    be.cross_entropy_backward(
                        ins[0],
                        vocab,
                        &batch.targets,
                        &batch.mask,
                        ins[1],
                        batch.loss_scale,
                        &mut outs[0],
                    )?;
                } else {
                    let d = self.parallel_cross_entropy_grad(
                        &be.download(ins[0])?,
                        &be.download(ins[1])?,
                        &logits,
                    );
                    outs[0] = be.upload(&d)?;
                }
            }
            OpKind::Comm { collective, axis } => {
                let states = self.states.ok_or_else(|| {
                    RuntimeError::Binding("a comm op in a graph run without DStates".into())
                })?;
                let tp = self.tp.as_deref_mut().ok_or_else(|| {
                    RuntimeError::Binding("a comm op in a graph run without a TP group".into())
                })?;
                let shape = self.graph.info(in_ids[0]).resolve(batch.tokens());
                let (from, to) = (&states[in_ids[0].0], &states[out_ids[0].0]);
                let out = tp.apply(collective, axis, from, to, &shape, be.download(ins[0])?)?;
                outs[0] = be.upload(&out)?;
            }
        }
        Ok(())
    }

    /// Vocab-parallel cross-entropy (Megatron): full logits are never gathered; three
    /// all-reduces over the TP group (row max, sum of exponentials, target logit).
    fn parallel_cross_entropy(&mut self, logits: &[f32], local: &Local) -> Result<(f32, Vec<f32>)> {
        let batch = self.batch;
        let (rows, v, start) = (local.shape[0], local.shape[1], local.offset[1]);
        let tp = self.tp.as_deref_mut().ok_or_else(|| {
            RuntimeError::Binding("vocab-parallel cross-entropy without a TP group".into())
        })?;
        let row = |r: usize| &logits[r * v..(r + 1) * v];
        let mut max: Vec<f32> = (0..rows)
            .map(|r| row(r).iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
            .collect();
        tp.comm().all_reduce(&mut max, ReduceOp::Max)?;
        let mut sum: Vec<f32> = (0..rows)
            .map(|r| row(r).iter().map(|&x| (x - max[r]).exp()).sum())
            .collect();
        let mut target: Vec<f32> = (0..rows)
            .map(|r| {
                let t = batch.targets[r] as usize;
                if batch.mask[r] && t >= start && t < start + v {
                    row(r)[t - start]
                } else {
                    0.0
                }
            })
            .collect();
        tp.comm().all_reduce(&mut sum, ReduceOp::Sum)?;
        tp.comm().all_reduce(&mut target, ReduceOp::Sum)?;
        let lse: Vec<f32> = (0..rows).map(|r| max[r] + sum[r].ln()).collect();
        let total: f32 = (0..rows)
            .filter(|&r| batch.mask[r])
            .map(|r| lse[r] - target[r])
            .sum();
        Ok((total * batch.loss_scale, lse))
    }

    fn parallel_cross_entropy_grad(&self, logits: &[f32], lse: &[f32], local: &Local) -> Vec<f32> {
        let batch = self.batch;
        let (rows, v, start) = (local.shape[0], local.shape[1], local.offset[1]);
        let s = batch.loss_scale;
        let mut d = vec![0.0; rows * v];
        for r in (0..rows).filter(|&r| batch.mask[r]) {
            for c in 0..v {
                d[r * v + c] = s * (logits[r * v + c] - lse[r]).exp();
            }
            let t = batch.targets[r] as usize;
            if t >= start && t < start + v {
                d[r * v + t - start] -= s;
            }
        }
        d
    }
}
