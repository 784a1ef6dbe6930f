//! Runs a graph on one rank: every op on the backend, activations freed after their last use,
//! live bytes tracked to report the peak.

use graph::{Graph, OpKind, TensorId, TensorKind};
use kernels::{Backend, GemmSpec};

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};

/// What one forward+backward run returns.
pub struct StepOutput<B: Backend> {
    /// The loss (already multiplied by the batch's loss scale).
    pub loss: f32,
    /// The gradient of every parameter, in `graph.params` order (empty without a backward pass).
    pub grads: Vec<B::Buffer>,
    /// Most bytes of activations and gradients alive at once (parameters not counted).
    pub peak_bytes: usize,
}

enum Slot<B: Backend> {
    Empty,
    Param(usize),
    Owned(B::Buffer, usize),
}

/// Runs `graph` on `batch` with `params` bound in `graph.params` order.
pub fn run<B: Backend>(
    backend: &B,
    graph: &Graph,
    params: &[B::Buffer],
    batch: &MicroBatch,
) -> Result<StepOutput<B>> {
    if params.len() != graph.params.len() {
        return Err(RuntimeError::Binding(format!(
            "{} parameters bound, the graph has {}",
            params.len(),
            graph.params.len()
        )));
    }
    let tokens = batch.tokens();
    for (i, &p) in graph.params.iter().enumerate() {
        let info = graph.info(p);
        let n = backend.len(&params[i]);
        if n != info.numel(tokens) {
            return Err(RuntimeError::Binding(format!(
                "{} has {n} values, its shape {:?} needs {}",
                info.name,
                info.resolve(tokens),
                info.numel(tokens)
            )));
        }
    }
    if let Some(op) = graph.ops.iter().find(|o| o.kind == OpKind::Embedding) {
        batch.validate(graph.info(op.inputs[0]).resolve(tokens)[0])?;
    }

    // Last reader of every tensor; kept tensors (loss, parameter gradients) are never freed.
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
        for &t in &op.outputs {
            outs.push(backend.zeros(graph.info(t).numel(tokens))?);
        }
        {
            let get = |t: TensorId| -> Result<&B::Buffer> {
                match &slots[t.0] {
                    Slot::Param(k) => Ok(&params[*k]),
                    Slot::Owned(b, _) => Ok(b),
                    Slot::Empty => Err(RuntimeError::Binding(format!(
                        "{} ({t}) is read by op #{i} but holds no value",
                        graph.info(t).name
                    ))),
                }
            };
            let dims = |t: TensorId| graph.info(t).resolve(tokens);
            let ins: Vec<&B::Buffer> = op.inputs.iter().map(|&t| get(t)).collect::<Result<_>>()?;
            execute(
                backend, op.kind, &ins, &mut outs, &op.inputs, &dims, batch, tokens,
            )?;
        }
        for (&t, buf) in op.outputs.iter().zip(outs) {
            let bytes = graph.info(t).numel(tokens) * std::mem::size_of::<f32>();
            live += bytes;
            slots[t.0] = Slot::Owned(buf, bytes);
        }
        peak = peak.max(live);
        // Free what is no longer needed: inputs read for the last time, outputs never read.
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
            Slot::Owned(b, _) => backend.download(b)?.first().copied().unwrap_or(0.0),
            _ => return Err(RuntimeError::Binding("the loss was not computed".into())),
        },
        None => 0.0,
    };
    let mut grads = Vec::with_capacity(graph.grads.len());
    for &(p, gp) in &graph.grads {
        match std::mem::replace(&mut slots[gp.0], Slot::Empty) {
            Slot::Owned(b, _) => grads.push(b),
            _ => {
                return Err(RuntimeError::Binding(format!(
                    "the gradient of {} was not computed",
                    graph.info(p).name
                )))
            }
        }
    }
    debug_assert!(graph
        .grads
        .iter()
        .all(|(_, g)| graph.info(*g).kind == TensorKind::Grad));
    Ok(StepOutput {
        loss,
        grads,
        peak_bytes: peak,
    })
}

/// One op on the backend. `dims(t)` is the concrete shape of input tensor `t`.
#[allow(clippy::too_many_arguments)]
fn execute<B: Backend>(
    be: &B,
    kind: OpKind,
    ins: &[&B::Buffer],
    outs: &mut [B::Buffer],
    in_ids: &[TensorId],
    dims: &dyn Fn(TensorId) -> Vec<usize>,
    batch: &MicroBatch,
    tokens: usize,
) -> Result<()> {
    let t = tokens;
    match kind {
        OpKind::Embedding => {
            let d = dims(in_ids[0])[1];
            be.embedding_forward(ins[0], d, 0, &batch.ids, &mut outs[0])?;
        }
        OpKind::EmbeddingGrad => {
            let d = dims(in_ids[0])[1];
            be.embedding_backward(ins[0], d, 0, &batch.ids, &mut outs[0])?;
        }
        OpKind::Linear => {
            let w = dims(in_ids[1]);
            be.gemm(
                &GemmSpec::new(t, w[0], w[1]).trans(false, true),
                ins[0],
                ins[1],
                &mut outs[0],
            )?;
        }
        OpKind::LinearGradInput => {
            let w = dims(in_ids[1]);
            be.gemm(&GemmSpec::new(t, w[1], w[0]), ins[0], ins[1], &mut outs[0])?;
        }
        OpKind::LinearGradWeight => {
            let (dy, x) = (dims(in_ids[0]), dims(in_ids[1]));
            be.gemm(
                &GemmSpec::new(dy[1], x[1], t).trans(true, false),
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
            heads,
            head_dim,
            theta,
        }
        | OpKind::RopeGrad {
            heads,
            head_dim,
            theta,
        } => {
            be.axpy(1.0, ins[0], &mut outs[0])?;
            let inverse = matches!(kind, OpKind::RopeGrad { .. });
            be.rope(
                &mut outs[0],
                &batch.positions,
                heads,
                head_dim,
                theta,
                inverse,
            )?;
        }
        OpKind::Attention { shape, scale } => {
            let (o, lse) = outs.split_at_mut(1);
            be.attention_forward(
                ins[0],
                ins[1],
                ins[2],
                &batch.cu_seqlens,
                shape,
                scale,
                &mut o[0],
                &mut lse[0],
            )?;
        }
        OpKind::AttentionGrad { shape, scale } => {
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
                shape,
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
            let v = dims(in_ids[0])[1];
            let (loss, lse) = outs.split_at_mut(1);
            let sum =
                be.cross_entropy_forward(ins[0], v, &batch.targets, &batch.mask, &mut lse[0])?;
            loss[0] = be.upload(&[sum * batch.loss_scale])?;
        }
        OpKind::CrossEntropyGrad => {
            let v = dims(in_ids[0])[1];
            be.cross_entropy_backward(
                ins[0],
                v,
                &batch.targets,
                &batch.mask,
                ins[1],
                batch.loss_scale,
                &mut outs[0],
            )?;
        }
    }
    Ok(())
}
