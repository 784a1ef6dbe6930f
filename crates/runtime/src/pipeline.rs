//! Pipeline parallelism: one stage's exec graph run over the micro-batches of a step under a
//! GPipe or 1F1B schedule, activations and their gradients sent between neighbouring stages.

use comm::{tags, Communicator, Rank, ReduceOp};
use graph::{ExecGraph, Schedule, Slot, Zero};
use kernels::Backend;

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};
use crate::executor::{Pass, StepOutput};
use crate::parallel::{CommSchedule, RankGroups, StepGradients};
use crate::reducer::{
    bucket_shapes, overlapped, param_shapes, plan_buckets, reduce_scatter_over_dp, sum_tied,
    unflatten_buckets, BucketFeeder, Feeder, GradFeed, PieceFeeder,
};
use crate::stream::ParamView;
use crate::tp::TpGroup;

/// Runs this rank's micro-batches (those of its DP replica; every TP rank of the replica runs
/// the same ones), sums their gradients, then all-reduces the gradients and the loss over DP.
/// This rank's gradient pieces equal the single-device
/// gradient of the whole global batch restricted to this rank's pieces.
pub fn step_gradients<B: Backend>(
    backend: &B,
    exec: &ExecGraph,
    groups: &mut RankGroups,
    params: &[B::Buffer],
    micro_batches: &[MicroBatch],
) -> Result<StepGradients<B>> {
    let shared = vec![false; params.len()];
    pipeline_step(
        backend,
        exec,
        groups,
        params,
        &shared,
        micro_batches,
        graph::Schedule::OneFOneB,
    )
}

/// Runs this rank's stage over the micro-batches of its DP replica under `schedule`, then sums
/// the gradients of `shared` parameters (a tied embedding held by the first and the last stage)
/// across those two stages and all-reduces every gradient over DP. `exec` is this stage's exec
/// graph; every stage of a pipeline must get the same micro-batches.
pub fn pipeline_step<'p, B: Backend + 'p>(
    backend: &B,
    exec: &ExecGraph,
    groups: &mut RankGroups,
    params: impl Into<ParamView<'p, B>>,
    shared: &[bool],
    micro_batches: &[MicroBatch],
    schedule: Schedule,
) -> Result<StepGradients<B>> {
    let params: ParamView<'p, B> = params.into();
    let stages = groups.pp.size();
    let stage = groups.pp.rank().0;
    let g = &exec.graph;
    if shared.len() != params.len() {
        return Err(RuntimeError::Binding(format!(
            "{} shared flags for {} parameters",
            shared.len(),
            params.len()
        )));
    }
    let has_input = !g.inputs.is_empty();
    let has_output = !g.outputs.is_empty();
    if (stage > 0) != has_input || (stage + 1 < stages) != has_output {
        return Err(RuntimeError::Binding(format!(
            "stage {stage} of {stages} got a graph with {} input(s) and {} output(s)",
            g.inputs.len(),
            g.outputs.len()
        )));
    }
    // ZeRO-3 gathers parameters over DP in every micro-batch: every replica must run as many
    // micro-batches as the busiest one (the others run empty ones).
    let padded: Vec<MicroBatch>;
    let micro_batches = if exec.strategy.zero >= Zero::Parameters && groups.dp.size() > 1 {
        let n = comm::words::all_max(groups.dp.as_ref(), micro_batches.len() as u64)?;
        padded = micro_batches
            .iter()
            .cloned()
            .chain(std::iter::repeat_with(MicroBatch::empty))
            .take(n as usize)
            .collect();
        &padded[..]
    } else {
        micro_batches
    };
    let tp_rank = groups.tp.rank();
    let slots = schedule.slots(stage, stages, micro_batches.len());
    let last_backward = slots.iter().rev().find_map(|p| match p {
        Slot::B(i) => Some(*i),
        Slot::F(_) => None,
    });
    let shapes = param_shapes(exec, tp_rank)?;
    // Each parameter's length: bound, or (behind a gate) this rank's piece of it.
    let lens: Vec<usize> = match params {
        ParamView::Ready(p) => p.iter().map(|b| backend.len(b)).collect(),
        ParamView::Gated(_) => shapes.iter().map(|s| s.iter().product()).collect(),
    };
    // DP reduction in buckets, started while the last backward still runs (ZeRO-2/3 reduce-
    // scatter per tensor after the step instead; under the priority schedule, during the next
    // step, by the caller).
    let bucketed = groups.dp.size() > 1
        && exec.strategy.zero < Zero::Gradients
        && groups.comm_schedule == CommSchedule::Fifo;
    let buckets = if bucketed {
        plan_buckets(exec, lens.clone(), groups.bucket_bytes)
    } else {
        Vec::new()
    };
    // Under priority, the pieces the next forward reads last are summed during the last
    // backward (in the order it finishes them); the first `priority_defer` wait for the next
    // step.
    let by_priority = groups.dp.size() > 1
        && exec.strategy.zero == Zero::Off
        && groups.comm_schedule == CommSchedule::Priority;
    let pieces = if by_priority {
        let piece = (groups.bucket_bytes / std::mem::size_of::<f32>()).max(1);
        crate::stream::pieces(&crate::stream::forward_order(exec), &lens, piece)
    } else {
        Vec::new()
    };
    let presummed = crate::stream::deferred(&pieces, groups.priority_defer);
    // The reduction thread's items: buckets, or the pieces from `presummed` on, each keyed by
    // its shapes (pieces: none; the priority schedule is exact).
    let bucket_shapes: Vec<Vec<Vec<usize>>> = if by_priority {
        vec![Vec::new(); pieces.len() - presummed]
    } else {
        bucket_shapes(&buckets, &shapes)
    };
    let overlap = !bucket_shapes.is_empty();
    if g.inputs.len() > tags::PIPELINE_INPUTS || g.output_grads.len() > tags::PIPELINE_INPUTS {
        return Err(RuntimeError::Binding(format!(
            "a stage exchanges {} inputs and {} output gradients per micro-batch, at most {} each",
            g.inputs.len(),
            g.output_grads.len(),
            tags::PIPELINE_INPUTS
        )));
    }
    let strategy = &exec.strategy;
    let (mut loss, mut peak_bytes) = (0.0f32, 0usize);
    let mut grads: Option<Vec<B::Buffer>> = None;
    let ((), reduced) = overlapped(
        groups,
        strategy,
        &bucket_shapes,
        |tx, tp, pp| -> Result<()> {
            let mut feeder = if by_priority {
                Feeder::Pieces(PieceFeeder::new(&pieces, presummed, params.len()))
            } else {
                Feeder::Buckets(BucketFeeder::new(&buckets, params.len()))
            };
            let mut passes: Vec<Option<Pass<'_, B>>> =
                (0..micro_batches.len()).map(|_| None).collect();
            for &slot in &slots {
                crate::progress::beat(match slot {
                    Slot::F(_) => "pipeline forward",
                    Slot::B(_) => "pipeline backward",
                });
                match slot {
                    Slot::F(i) => {
                        let stage_of = StageOf {
                            exec,
                            stage,
                            tp_rank,
                        };
                        let pass =
                            stage_of.forward(backend, tp, pp, params, &micro_batches[i], i)?;
                        let others: usize = passes.iter().flatten().map(|p| p.live_bytes()).sum();
                        peak_bytes = peak_bytes.max(others + pass.phase_peak_bytes());
                        passes[i] = Some(pass);
                    }
                    Slot::B(i) => {
                        let pass = passes[i].take().ok_or_else(|| {
                            RuntimeError::Binding(format!(
                                "backward of micro-batch {i} before its forward"
                            ))
                        })?;
                        let others: usize = passes.iter().flatten().map(|p| p.live_bytes()).sum();
                        let stage_of = StageOf {
                            exec,
                            stage,
                            tp_rank,
                        };
                        // The last backward hands each final gradient (with the earlier
                        // micro-batches' sum) to the bucket thread as it is done.
                        let acc = grads.as_ref();
                        let mut feed =
                            |k: usize, g: &B::Buffer| feeder.last(backend, acc, k, g, tx);
                        let hook: Option<&mut GradHook<'_, B>> =
                            (overlap && Some(i) == last_backward).then_some(&mut feed);
                        let (out, peak) =
                            stage_of.backward(backend, tp, pp, pass, &micro_batches[i], i, hook)?;
                        peak_bytes = peak_bytes.max(others + peak);
                        loss += out.loss;
                        accumulate(backend, &mut grads, out.grads)?;
                    }
                }
            }
            if overlap && last_backward.is_none() {
                // No data on this replica: it still contributes zeros, bucket by bucket.
                feeder.nothing(&lens, tx)?;
            }
            Ok(())
        },
    )?;
    let mut grads = match grads {
        Some(g) => g,
        None => lens
            .iter()
            .map(|&n| backend.zeros(n))
            .collect::<std::result::Result<_, _>>()?,
    };
    if bucketed {
        unflatten_buckets(backend, &buckets, &reduced, &mut grads)?;
    }
    if by_priority {
        // The summed pieces, last first, back into the gradients.
        let summed = pieces[presummed..].iter().rev().zip(&reduced);
        for (piece, flat) in summed {
            let mut at = 0;
            for (k, r) in piece {
                let n = r.len();
                crate::host::in_place(backend, &mut grads[*k], |h| {
                    h[r.clone()].copy_from_slice(&flat[at..at + n]);
                    Ok(())
                })?;
                at += n;
            }
        }
    }
    let loss = end_of_step(backend, groups, exec, shared, &mut grads, loss)?;
    Ok(StepGradients {
        loss,
        grads,
        peak_bytes,
        presummed: by_priority.then_some(presummed),
    })
}

/// What every schedule does once a step's gradients are summed over its micro-batches (and,
/// below ZeRO-2, over DP): the tied copies' halves summed, the gradients reduce-scattered
/// over DP under ZeRO-2/3, and the loss summed over stages and replicas; the step's loss.
pub(crate) fn end_of_step<B: Backend>(
    backend: &B,
    groups: &RankGroups,
    exec: &ExecGraph,
    shared: &[bool],
    grads: &mut [B::Buffer],
    loss: f32,
) -> Result<f32> {
    sum_tied(backend, groups, shared, grads)?;
    let mut l = [loss];
    if groups.pp.size() > 1 {
        groups.pp.all_reduce(&mut l, ReduceOp::Sum)?;
    }
    if exec.strategy.zero >= Zero::Gradients {
        reduce_scatter_over_dp(backend, groups, exec, grads)?;
    }
    if groups.dp.size() > 1 {
        groups.dp.all_reduce(&mut l, ReduceOp::Sum)?;
    }
    Ok(l[0])
}

/// Told of each parameter gradient of a backward as it becomes final (its index, its value).
pub(crate) type GradHook<'h, B> = dyn FnMut(usize, &<B as Backend>::Buffer) -> Result<()> + 'h;

/// One pipeline stage of a rank: its exec graph, its index, its TP rank.
#[derive(Clone, Copy)]
pub(crate) struct StageOf<'g> {
    pub exec: &'g ExecGraph,
    pub stage: usize,
    pub tp_rank: usize,
}

impl<'g> StageOf<'g> {
    /// Receives micro-batch `mb`'s inputs from the stage before (messages of micro-batch
    /// number `tag`), runs its forward and sends its outputs to the stage after.
    #[allow(clippy::too_many_arguments)] // a pass and where its messages go
    pub fn forward<'a, B: Backend>(
        self,
        backend: &'a B,
        tp: &mut TpGroup,
        pp: &dyn Communicator,
        params: ParamView<'a, B>,
        mb: &'a MicroBatch,
        tag: usize,
    ) -> Result<Pass<'a, B>>
    where
        'g: 'a,
    {
        let (exec, stage) = (self.exec, self.stage);
        let g = &exec.graph;
        let mut inputs = Vec::with_capacity(g.inputs.len());
        for (k, &x) in g.inputs.iter().enumerate() {
            let mut buf = vec![0.0; local_len(exec, x, self.tp_rank, mb)?];
            pp.recv(&mut buf, Rank(stage - 1), tags::pipeline(tag, false, k))?;
            inputs.push(crate::host::adopt(backend, buf)?);
        }
        let mut pass = Pass::new(
            backend,
            g,
            Some((&exec.states, self.tp_rank, tp.dp_position())),
            params,
            mb,
            inputs,
        )?;
        pass.forward(Some(&mut *tp))?;
        for (k, out) in pass.outputs()?.iter().enumerate() {
            pp.send(out, Rank(stage + 1), tags::pipeline(tag, false, k))?;
        }
        Ok(pass)
    }

    /// Receives `pass`'s output gradients from the stage after, runs its backward (telling
    /// `on_grad` of each parameter gradient as it becomes final) and sends its input
    /// gradients to the stage before; its output and the most bytes it held meanwhile.
    #[allow(clippy::too_many_arguments)] // a pass and where its messages go
    pub fn backward<B: Backend>(
        self,
        backend: &B,
        tp: &mut TpGroup,
        pp: &dyn Communicator,
        mut pass: Pass<'_, B>,
        mb: &MicroBatch,
        tag: usize,
        on_grad: Option<&mut GradHook<'_, B>>,
    ) -> Result<(StepOutput<B>, usize)> {
        let (exec, stage) = (self.exec, self.stage);
        let g = &exec.graph;
        let mut seeds = Vec::with_capacity(g.output_grads.len());
        for (k, &x) in g.output_grads.iter().enumerate() {
            let mut buf = vec![0.0; local_len(exec, x, self.tp_rank, mb)?];
            pp.recv(&mut buf, Rank(stage + 1), tags::pipeline(tag, true, k))?;
            seeds.push(crate::host::adopt(backend, buf)?);
        }
        match on_grad {
            Some(hook) => pass.backward_with(Some(&mut *tp), seeds, hook)?,
            None => pass.backward(Some(&mut *tp), seeds)?,
        }
        let peak = pass.phase_peak_bytes();
        let out = pass.finish()?;
        for (k, gx) in out.input_grads.iter().enumerate() {
            pp.send(
                &crate::host::view(backend, gx)?,
                Rank(stage - 1),
                tags::pipeline(tag, true, k),
            )?;
        }
        Ok((out, peak))
    }
}

/// Adds a micro-batch's gradients to the step's sum (the first ones become it).
pub(crate) fn accumulate<B: Backend>(
    backend: &B,
    sum: &mut Option<Vec<B::Buffer>>,
    grads: Vec<B::Buffer>,
) -> Result<()> {
    match sum.as_mut() {
        None => *sum = Some(grads),
        Some(acc) => {
            for (a, gr) in acc.iter_mut().zip(&grads) {
                backend.axpy(1.0, gr, a)?;
            }
        }
    }
    Ok(())
}

fn local_len(
    exec: &ExecGraph,
    x: graph::TensorId,
    tp_rank: usize,
    mb: &MicroBatch,
) -> Result<usize> {
    let shape = exec.graph.info(x).resolve(mb.tokens());
    Ok(exec.states[x.0].piece(tp_rank, &shape)?.region.volume())
}
