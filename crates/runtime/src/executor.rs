//! Runs a graph on one rank: every op on the backend, activations freed after their last use,
//! live bytes tracked to report the peak. With DStates and a TP group it runs one rank's part of
//! an exec graph: local shapes from each tensor's piece, comm ops as collectives, vocab-parallel
//! embedding and cross-entropy.

use comm::{Communicator, ReduceOp};
use dstate::DState;
use graph::{ExecGraph, Graph, OpKind, TensorId, WeightLayout};
use kernels::{Backend, GemmSpec};

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};
use crate::stream::ParamView;
use crate::tp::TpGroup;

/// What one forward+backward run returns.
pub struct StepOutput<B: Backend> {
    /// The loss (already multiplied by the batch's loss scale); 0 without a loss.
    pub loss: f32,
    /// The gradient of every parameter, in `graph.params` order (this rank's pieces).
    pub grads: Vec<B::Buffer>,
    /// The gradient of every input, in `graph.inputs` order (a pipeline stage sends them back).
    pub input_grads: Vec<B::Buffer>,
    /// Most bytes of activations and gradients alive at once (parameters not counted).
    pub peak_bytes: usize,
    /// With [`Pass::capture`]: this rank's piece of every tensor an op produced, by tensor id.
    pub captured: Vec<Option<Vec<f32>>>,
}

enum Slot<B: Backend> {
    Empty,
    Param(usize),
    Owned(B::Buffer, usize),
}

/// Runs a single-device `graph` (forward, then backward if it has one) on `batch` with `params`
/// bound in `graph.params` order.
pub fn run<B: Backend>(
    backend: &B,
    graph: &Graph,
    params: &[B::Buffer],
    batch: &MicroBatch,
) -> Result<StepOutput<B>> {
    let mut pass = Pass::new(backend, graph, None, params, batch, Vec::new())?;
    pass.forward(None)?;
    pass.backward(None, Vec::new())?;
    pass.finish()
}

/// Runs this rank's part of `exec`, forward then backward (parameters are this TP rank's
/// pieces; the graph must have no inputs or outputs — pipeline stages use [`Pass`]).
pub fn run_exec<B: Backend>(
    backend: &B,
    exec: &ExecGraph,
    tp: &mut TpGroup,
    params: &[B::Buffer],
    batch: &MicroBatch,
) -> Result<StepOutput<B>> {
    let mut pass = Pass::new(
        backend,
        &exec.graph,
        Some((&exec.states, tp.rank(), tp.dp_position())),
        params,
        batch,
        Vec::new(),
    )?;
    pass.forward(Some(tp))?;
    pass.backward(Some(tp), Vec::new())?;
    pass.finish()
}

/// One micro-batch's run of a graph, in two phases (forward, backward) so that a pipeline
/// schedule can interleave the micro-batches of a stage. Values stay alive between the phases
/// exactly as long as a later op reads them.
pub struct Pass<'a, B: Backend> {
    backend: &'a B,
    graph: &'a Graph,
    states: Option<&'a [DState]>,
    params: ParamView<'a, B>,
    batch: &'a MicroBatch,
    /// Everything the pass owns (what it keeps when suspended).
    owned: Suspended<B>,
}

/// A [`Pass`] between its forward and its backward with nothing borrowed: what a stage keeps
/// of a micro-batch in flight across the end of a step (PipeDream-2BW). [`Suspended::resume`]
/// binds the same graph, weights and micro-batch again.
pub struct Suspended<B: Backend> {
    tp_rank: Option<usize>,
    dp_pos: (usize, usize),
    slots: Vec<Slot<B>>,
    last_use: Vec<Option<usize>>,
    grad_of: Vec<Option<usize>>,
    keep: Vec<bool>,
    live: usize,
    peak: usize,
    phase_peak: usize,
    next: usize,
    captured: Option<Vec<Option<Vec<f32>>>>,
}

impl<B: Backend> Suspended<B> {
    /// The pass again, on `graph` with `states`, `params` and `batch` — the ones it was
    /// created with (the caller keeps them; only their lengths can be checked here).
    pub fn resume<'a>(
        self,
        backend: &'a B,
        graph: &'a Graph,
        states: Option<&'a [DState]>,
        params: impl Into<ParamView<'a, B>>,
        batch: &'a MicroBatch,
    ) -> Result<Pass<'a, B>> {
        let params = params.into();
        if self.slots.len() != graph.tensors.len() || params.len() != graph.params.len() {
            return Err(RuntimeError::Binding(format!(
                "a pass of {} tensors resumed on a graph of {} with {} parameters",
                self.slots.len(),
                graph.tensors.len(),
                params.len()
            )));
        }
        Ok(Pass {
            backend,
            graph,
            states,
            params,
            batch,
            owned: self,
        })
    }
}

/// This rank's piece of a tensor: local shape and global offset.
struct Local {
    shape: Vec<usize>,
    offset: Vec<usize>,
}

impl<'a, B: Backend> Pass<'a, B> {
    /// Binds `params` (this rank's pieces, `graph.params` order; under ZeRO-3 its flat DP
    /// chunks of them; behind a [`crate::Gate`], each read when an op first needs it) and
    /// `inputs` (`graph.inputs` order) for one micro-batch. `exec` gives the DStates, this
    /// rank's TP rank and its `(DP rank, DP size)` (None on one device).
    pub fn new(
        backend: &'a B,
        graph: &'a Graph,
        exec: Option<(&'a [DState], usize, (usize, usize))>,
        params: impl Into<ParamView<'a, B>>,
        batch: &'a MicroBatch,
        inputs: Vec<B::Buffer>,
    ) -> Result<Self> {
        let params = params.into();
        let n = graph.tensors.len();
        let mut pass = Pass {
            backend,
            graph,
            states: exec.map(|e| e.0),
            params,
            batch,
            owned: Suspended {
                tp_rank: exec.map(|e| e.1),
                dp_pos: exec.map_or((0, 1), |e| e.2),
                slots: (0..n).map(|_| Slot::Empty).collect(),
                last_use: vec![None; n],
                grad_of: {
                    let mut v = vec![None; n];
                    for (k, &(_, g)) in graph.grads.iter().enumerate() {
                        v[g.0] = Some(k);
                    }
                    v
                },
                keep: vec![false; n],
                live: 0,
                peak: 0,
                phase_peak: 0,
                next: 0,
                captured: None,
            },
        };
        if params.len() != graph.params.len() {
            return Err(RuntimeError::Binding(format!(
                "{} parameters bound, the graph has {}",
                params.len(),
                graph.params.len()
            )));
        }
        let sharded: Vec<bool> = {
            let mut v = vec![false; n];
            for op in graph.ops.iter().filter(|o| o.kind == OpKind::GatherParam) {
                v[op.inputs[0].0] = true;
            }
            v
        };
        for (i, &p) in graph.params.iter().enumerate() {
            let mut want = pass.local_numel(p)?;
            if sharded[p.0] {
                want = dstate::chunk(0..want, pass.owned.dp_pos.1, pass.owned.dp_pos.0).len();
            }
            // Behind a gate, a parameter is published by the update that made it.
            if let ParamView::Ready(bound) = params {
                if backend.len(&bound[i]) != want {
                    return Err(RuntimeError::Binding(format!(
                        "{} has {} values, this rank's piece of {:?} needs {want}",
                        graph.info(p).name,
                        backend.len(&bound[i]),
                        pass.global(p)
                    )));
                }
            }
            pass.owned.slots[p.0] = Slot::Param(i);
        }
        if let Some(op) = graph.ops.iter().find(|o| o.kind == OpKind::Embedding) {
            batch.validate(pass.global(op.inputs[0])[0])?;
        } else {
            batch.validate(usize::MAX)?;
        }
        if inputs.len() != graph.inputs.len() {
            return Err(RuntimeError::Binding(format!(
                "{} inputs bound, the graph has {}",
                inputs.len(),
                graph.inputs.len()
            )));
        }
        for (&t, buf) in graph.inputs.iter().zip(inputs) {
            pass.bind(t, buf)?;
        }
        for (i, op) in graph.ops.iter().enumerate() {
            for &t in &op.inputs {
                pass.owned.last_use[t.0] = Some(i);
            }
        }
        if let Some(l) = graph.loss {
            pass.owned.keep[l.0] = true;
        }
        for &(_, g) in graph.grads.iter().chain(&graph.input_grads) {
            pass.owned.keep[g.0] = true;
        }
        for &o in &graph.outputs {
            pass.owned.keep[o.0] = true;
        }
        Ok(pass)
    }

    /// Keeps a host copy of every tensor produced from now on (for validators and debugging;
    /// costs a download per op).
    pub fn capture(&mut self) {
        self.owned.captured = Some(vec![None; self.graph.tensors.len()]);
    }

    fn bind(&mut self, t: TensorId, buf: B::Buffer) -> Result<()> {
        let want = self.local_numel(t)?;
        if self.backend.len(&buf) != want {
            return Err(RuntimeError::Binding(format!(
                "{} was given {} values, this rank's piece needs {want}",
                self.graph.info(t).name,
                self.backend.len(&buf)
            )));
        }
        let bytes = want * std::mem::size_of::<f32>();
        self.owned.live += bytes;
        self.owned.peak = self.owned.peak.max(self.owned.live);
        self.owned.slots[t.0] = Slot::Owned(buf, bytes);
        Ok(())
    }

    fn global(&self, t: TensorId) -> Vec<usize> {
        self.graph.info(t).resolve(self.batch.tokens())
    }

    fn local_with(&self, t: TensorId) -> Result<Local> {
        local_piece(self.graph, self.states, self.owned.tp_rank, self.batch, t)
    }

    /// Number of values of this rank's piece of `t`.
    pub fn local_numel(&self, t: TensorId) -> Result<usize> {
        Ok(self.local_with(t)?.shape.iter().product())
    }

    /// Bytes of activations and gradients this pass holds now.
    pub fn live_bytes(&self) -> usize {
        self.owned.live
    }

    /// Lets go of what the pass borrows, keeping its values (see [`Suspended`]).
    pub fn suspend(self) -> Suspended<B> {
        self.owned
    }

    /// The most bytes this pass held during its latest phase (forward or backward).
    pub fn phase_peak_bytes(&self) -> usize {
        self.owned.phase_peak
    }

    /// Runs the forward ops.
    pub fn forward(&mut self, tp: Option<&mut TpGroup>) -> Result<()> {
        let end = self.graph.num_forward_ops();
        self.run_until(end, tp)
    }

    /// This rank's pieces of the graph's outputs, copied to the host (a stage sends them on).
    pub fn outputs(&self) -> Result<Vec<std::borrow::Cow<'_, [f32]>>> {
        self.graph
            .outputs
            .iter()
            .map(|&o| match &self.owned.slots[o.0] {
                Slot::Owned(b, _) => crate::host::view(self.backend, b),
                _ => Err(RuntimeError::Binding(format!(
                    "output {} was not computed",
                    self.graph.info(o).name
                ))),
            })
            .collect()
    }

    /// Binds the incoming gradients of the outputs and runs the backward ops.
    pub fn backward(
        &mut self,
        tp: Option<&mut TpGroup>,
        output_grads: Vec<B::Buffer>,
    ) -> Result<()> {
        self.backward_with(tp, output_grads, &mut |_, _| Ok(()))
    }

    /// Like [`Pass::backward`], calling `on_grad(k, grad)` as soon as the gradient of parameter
    /// `k` is final (so its reduction can start while the backward goes on).
    pub fn backward_with(
        &mut self,
        tp: Option<&mut TpGroup>,
        output_grads: Vec<B::Buffer>,
        on_grad: &mut dyn FnMut(usize, &B::Buffer) -> Result<()>,
    ) -> Result<()> {
        if output_grads.len() != self.graph.output_grads.len() {
            return Err(RuntimeError::Binding(format!(
                "{} output gradients bound, the graph has {}",
                output_grads.len(),
                self.graph.output_grads.len()
            )));
        }
        for (&t, buf) in self.graph.output_grads.iter().zip(output_grads) {
            self.bind(t, buf)?;
        }
        let end = self.graph.ops.len();
        self.run_until_with(end, tp, on_grad)
    }

    /// The loss, the parameter and input gradients, and the peak bytes.
    pub fn finish(mut self) -> Result<StepOutput<B>> {
        let be = self.backend;
        let loss = match self.graph.loss {
            Some(l) => match &self.owned.slots[l.0] {
                Slot::Owned(b, _) => be.download(b)?.first().copied().unwrap_or(0.0),
                _ => return Err(RuntimeError::Binding("the loss was not computed".into())),
            },
            None => 0.0,
        };
        let mut take = |pairs: &[(TensorId, TensorId)]| -> Result<Vec<B::Buffer>> {
            pairs
                .iter()
                .map(
                    |&(p, g)| match std::mem::replace(&mut self.owned.slots[g.0], Slot::Empty) {
                        Slot::Owned(b, _) => Ok(b),
                        _ => Err(RuntimeError::Binding(format!(
                            "the gradient of {} was not computed",
                            self.graph.info(p).name
                        ))),
                    },
                )
                .collect()
        };
        let grads = take(&self.graph.grads)?;
        let input_grads = take(&self.graph.input_grads)?;
        Ok(StepOutput {
            loss,
            grads,
            input_grads,
            peak_bytes: self.owned.peak,
            captured: self.owned.captured.take().unwrap_or_default(),
        })
    }

    fn run_until(&mut self, end: usize, tp: Option<&mut TpGroup>) -> Result<()> {
        self.run_until_with(end, tp, &mut |_, _| Ok(()))
    }

    fn run_until_with(
        &mut self,
        end: usize,
        mut tp: Option<&mut TpGroup>,
        on_grad: &mut dyn FnMut(usize, &B::Buffer) -> Result<()>,
    ) -> Result<()> {
        let graph = self.graph;
        let be = self.backend;
        if let (Some(t), Some(r)) = (tp.as_ref(), self.owned.tp_rank) {
            if t.rank() != r {
                return Err(RuntimeError::Binding(format!(
                    "pass bound for TP rank {r} run on TP rank {}",
                    t.rank()
                )));
            }
        }
        let tp_rank = self.owned.tp_rank;
        self.owned.phase_peak = self.owned.live;
        while self.owned.next < end {
            let i = self.owned.next;
            let op = &graph.ops[i];
            crate::progress::beat(op.kind.name());
            let mut outs: Vec<B::Buffer> = Vec::with_capacity(op.outputs.len());
            let mut sizes = Vec::with_capacity(op.outputs.len());
            for &t in &op.outputs {
                let numel = self.local_numel(t)?;
                sizes.push(numel * std::mem::size_of::<f32>());
                outs.push(if writes_every_output(op.kind) {
                    be.scratch(numel)?
                } else {
                    be.zeros(numel)?
                });
            }
            {
                let mut ins: Vec<&B::Buffer> = Vec::with_capacity(op.inputs.len());
                for &t in &op.inputs {
                    ins.push(match &self.owned.slots[t.0] {
                        Slot::Param(k) => self.params.get(*k)?,
                        Slot::Owned(b, _) => b,
                        Slot::Empty => {
                            return Err(RuntimeError::Binding(format!(
                                "{} ({t}) is read by op #{i} but holds no value",
                                graph.info(t).name
                            )))
                        }
                    });
                }
                let ctx = Ctx {
                    backend: be,
                    graph,
                    states: self.states,
                    batch: self.batch,
                    tp_rank,
                };
                let t0 = crate::profile::enabled().then(std::time::Instant::now);
                ctx.execute(
                    op.kind,
                    &ins,
                    &mut outs,
                    &op.inputs,
                    &op.outputs,
                    tp.as_deref_mut(),
                )?;
                if let Some(t0) = t0 {
                    be.synchronize()?;
                    let name = format!("{:?}", op.kind);
                    let name = name.split([' ', '{', '(']).next().unwrap_or("");
                    crate::profile::record(name, t0.elapsed().as_secs_f64());
                }
            }
            for ((&t, buf), bytes) in op.outputs.iter().zip(outs).zip(sizes) {
                if let Some(c) = self.owned.captured.as_mut() {
                    c[t.0] = Some(be.download(&buf)?);
                }
                if let Some(k) = self.owned.grad_of[t.0] {
                    on_grad(k, &buf)?;
                }
                self.owned.live += bytes;
                self.owned.slots[t.0] = Slot::Owned(buf, bytes);
            }
            self.owned.peak = self.owned.peak.max(self.owned.live);
            self.owned.phase_peak = self.owned.phase_peak.max(self.owned.live);
            for &t in op.inputs.iter().chain(&op.outputs) {
                let dead = match self.owned.last_use[t.0] {
                    Some(l) => l == i,
                    None => op.outputs.contains(&t),
                };
                if dead && !self.owned.keep[t.0] {
                    if let Slot::Owned(_, bytes) = self.owned.slots[t.0] {
                        self.owned.live -= bytes;
                        if let Slot::Owned(buf, _) =
                            std::mem::replace(&mut self.owned.slots[t.0], Slot::Empty)
                        {
                            be.recycle(buf);
                        }
                    }
                }
            }
            self.owned.next += 1;
        }
        Ok(())
    }
}

/// Whether [`Ctx::execute`] writes every value of every output of `kind` without reading it
/// first, so that the outputs need not start as zeros ([`Backend::scratch`]). The others
/// accumulate into zeros (the embedding's and RMSNorm's weight gradients, RoPE's copy by
/// `axpy`) or are small. Debug builds fill scratch buffers with NaN, so an op listed here by
/// mistake fails the tests that run it (listing `RmsNormGrad` fails
/// `optimizer_equivalence::dp2_and_tp4_train_like_one_device`, for one).
fn writes_every_output(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Linear { .. }
            | OpKind::LinearGradInput { .. }
            | OpKind::LinearGradWeight { .. }
            | OpKind::RmsNorm { .. }
            | OpKind::Attention { .. }
            | OpKind::AttentionGrad { .. }
            | OpKind::Rope { .. }
            | OpKind::RopeGrad { .. }
            | OpKind::SwiGlu
            | OpKind::SwiGluGrad
            | OpKind::Add
            | OpKind::CrossEntropyGrad
            | OpKind::Comm { .. }
            | OpKind::GatherParam
    )
}

/// This rank's piece of `t` for `batch`: the whole tensor on one device, otherwise the piece of
/// its DState at `tp_rank`.
fn local_piece(
    graph: &Graph,
    states: Option<&[DState]>,
    tp_rank: Option<usize>,
    batch: &MicroBatch,
    t: TensorId,
) -> Result<Local> {
    let shape = graph.info(t).resolve(batch.tokens());
    match (states, tp_rank) {
        (Some(states), Some(r)) => {
            let reg = states[t.0].piece(r, &shape)?.region;
            Ok(Local {
                shape: reg.shape(),
                offset: reg.offset(),
            })
        }
        (Some(states), None) if states[t.0].size() > 1 => Err(RuntimeError::Binding(
            "a graph with distributed tensors bound without a TP rank".into(),
        )),
        _ => Ok(Local {
            offset: vec![0; shape.len()],
            shape,
        }),
    }
}

/// The CP group a micro-batch split over one needs, checked to be the group of its part.
fn cp_group(tp: Option<&TpGroup>, rank: usize) -> Result<(&dyn Communicator, graph::CpExchange)> {
    let (comm, exchange) = tp.and_then(TpGroup::cp).ok_or_else(|| {
        RuntimeError::Binding("a micro-batch split over a CP group, run without one".into())
    })?;
    if comm.rank().0 != rank {
        return Err(RuntimeError::Binding(format!(
            "CP rank {}'s attention got the part of CP rank {rank}",
            comm.rank().0
        )));
    }
    Ok((comm, exchange))
}

struct Ctx<'a, B: Backend> {
    backend: &'a B,
    graph: &'a Graph,
    states: Option<&'a [DState]>,
    batch: &'a MicroBatch,
    tp_rank: Option<usize>,
}

impl<B: Backend> Ctx<'_, B> {
    fn global(&self, t: TensorId) -> Vec<usize> {
        self.graph.info(t).resolve(self.batch.tokens())
    }

    fn local(&self, t: TensorId) -> Result<Local> {
        local_piece(self.graph, self.states, self.tp_rank, self.batch, t)
    }

    fn execute(
        &self,
        kind: OpKind,
        ins: &[&B::Buffer],
        outs: &mut [B::Buffer],
        in_ids: &[TensorId],
        out_ids: &[TensorId],
        mut tp: Option<&mut TpGroup>,
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
            OpKind::Linear { w: layout } => {
                let (x, w) = (dims(self, 0)?, dims(self, 1)?);
                let spec = match layout {
                    // y[T, out] = x[T, in] · w[out, in]ᵀ
                    WeightLayout::OutIn => GemmSpec::new(x[0], w[0], w[1]).trans(false, true),
                    // y[T, out] = x[T, in] · w[in, out]
                    WeightLayout::InOut => GemmSpec::new(x[0], w[1], w[0]),
                };
                be.gemm(&spec, ins[0], ins[1], &mut outs[0])?;
            }
            OpKind::LinearGradInput { w: layout } => {
                let (dy, w) = (dims(self, 0)?, dims(self, 1)?);
                let spec = match layout {
                    // dx[T, in] = dy[T, out] · w[out, in]
                    WeightLayout::OutIn => GemmSpec::new(dy[0], w[1], w[0]),
                    // dx[T, in] = dy[T, out] · w[in, out]ᵀ
                    WeightLayout::InOut => GemmSpec::new(dy[0], w[0], w[1]).trans(false, true),
                };
                be.gemm(&spec, ins[0], ins[1], &mut outs[0])?;
            }
            OpKind::LinearGradWeight { w: layout } => {
                let (dy, x) = (dims(self, 0)?, dims(self, 1)?);
                match layout {
                    // dw[out, in] = dy[T, out]ᵀ · x[T, in]
                    WeightLayout::OutIn => be.gemm(
                        &GemmSpec::new(dy[1], x[1], dy[0]).trans(true, false),
                        ins[0],
                        ins[1],
                        &mut outs[0],
                    )?,
                    // dw[in, out] = x[T, in]ᵀ · dy[T, out]
                    WeightLayout::InOut => be.gemm(
                        &GemmSpec::new(x[1], dy[1], x[0]).trans(true, false),
                        ins[1],
                        ins[0],
                        &mut outs[0],
                    )?,
                }
            }
            OpKind::RmsNorm { eps } => {
                let (y, rest) = outs.split_at_mut(1);
                be.rms_norm_forward(ins[0], ins[1], eps, &mut y[0], &mut rest[0])?;
            }
            OpKind::RmsNormGrad => {
                let (dx, dw) = outs.split_at_mut(1);
                be.rms_norm_backward(ins[0], ins[1], ins[2], ins[3], &mut dx[0], &mut dw[0])?;
            }
            OpKind::Rope { head_dim, rope, .. } | OpKind::RopeGrad { head_dim, rope, .. } => {
                let x = dims(self, 0)?;
                be.copy(ins[0], &mut outs[0])?;
                let inverse = matches!(kind, OpKind::RopeGrad { .. });
                let r = kernels::Rotation::new(&batch.positions, x[1] / head_dim, head_dim, &rope);
                be.rope(&mut outs[0], &r.inverted(inverse))?;
            }
            OpKind::Attention { shape, scale } => {
                let local = kernels::AttnShape {
                    heads: dims(self, 0)?[1] / shape.head_dim,
                    kv_heads: dims(self, 1)?[1] / shape.head_dim,
                    head_dim: shape.head_dim,
                };
                let (o, lse) = outs.split_at_mut(1);
                if let Some((split, rank)) = &batch.context {
                    let (comm, exchange) = cp_group(tp.as_deref(), *rank)?;
                    let (out, l) =
                        crate::context::CpAttention::new(comm, exchange, split, local, scale)
                            .through(be)
                            .forward(
                                &crate::host::view(be, ins[0])?,
                                &crate::host::view(be, ins[1])?,
                                &crate::host::view(be, ins[2])?,
                            )?;
                    o[0] = crate::host::adopt(be, out)?;
                    lse[0] = crate::host::adopt(be, l)?;
                    return Ok(());
                }
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
                if let Some((split, rank)) = &batch.context {
                    let (comm, exchange) = cp_group(tp.as_deref(), *rank)?;
                    let host = ins[..6]
                        .iter()
                        .map(|b| crate::host::view(be, b))
                        .collect::<Result<Vec<_>>>()?;
                    let saved = crate::context::Saved {
                        dout: &host[0],
                        q: &host[1],
                        k: &host[2],
                        v: &host[3],
                        out: &host[4],
                        lse: &host[5],
                    };
                    let (gq, gk, gv) =
                        crate::context::CpAttention::new(comm, exchange, split, local, scale)
                            .through(be)
                            .backward(&saved)?;
                    dq[0] = crate::host::adopt(be, gq)?;
                    dk[0] = crate::host::adopt(be, gk)?;
                    dv[0] = crate::host::adopt(be, gv)?;
                    return Ok(());
                }
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
                    let (l, s) = self.parallel_cross_entropy(
                        &crate::host::view(be, ins[0])?,
                        &logits,
                        tp.as_deref_mut(),
                    )?;
                    loss[0] = be.upload(&[l])?;
                    lse[0] = crate::host::adopt(be, s)?;
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
                        &crate::host::view(be, ins[0])?,
                        &crate::host::view(be, ins[1])?,
                        &logits,
                    );
                    outs[0] = crate::host::adopt(be, d)?;
                }
            }
            OpKind::GatherParam => {
                let tp = tp.as_deref().ok_or_else(|| {
                    RuntimeError::Binding("a ZeRO-3 gather in a graph run without groups".into())
                })?;
                let shard = crate::host::view(be, ins[0])?;
                crate::host::in_place(be, &mut outs[0], |o| tp.gather_param(&shard, o))?;
            }
            OpKind::Comm { collective, axis } => {
                let states = self.states.ok_or_else(|| {
                    RuntimeError::Binding("a comm op in a graph run without DStates".into())
                })?;
                let tp = tp.ok_or_else(|| {
                    RuntimeError::Binding("a comm op in a graph run without a TP group".into())
                })?;
                let shape = self.graph.info(in_ids[0]).resolve(batch.tokens());
                let (from, to) = (&states[in_ids[0].0], &states[out_ids[0].0]);
                let local = crate::host::view(be, ins[0])?;
                crate::host::in_place(be, &mut outs[0], |o| {
                    tp.apply(collective, axis, from, to, &shape, &local, o)
                })?;
            }
        }
        Ok(())
    }

    /// Vocab-parallel cross-entropy (Megatron): full logits are never gathered; three
    /// all-reduces over the TP group (row max, sum of exponentials, target logit).
    fn parallel_cross_entropy(
        &self,
        logits: &[f32],
        local: &Local,
        tp: Option<&mut TpGroup>,
    ) -> Result<(f32, Vec<f32>)> {
        let batch = self.batch;
        let (rows, v, start) = (local.shape[0], local.shape[1], local.offset[1]);
        let tp = tp.ok_or_else(|| {
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
