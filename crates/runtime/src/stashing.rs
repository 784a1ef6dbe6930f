//! PipeDream-2BW (Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", ICML
//! 2021): a pipeline that does not flush between steps. A step's micro-batches enter a stage
//! while the last step's still run their backward there (1F1B's steady state across the step
//! boundary), so the fill and drain bubbles are paid once per run instead of once per step.
//!
//! Every micro-batch runs its forward and its backward on the weights its step began with
//! (*weight stashing*): the caller hands each step a copy of the weights, and a stage holds at
//! most two versions at once (*double buffering*) — the one the finishing step's backwards read
//! and the one the new step's forwards read. A step's gradients are complete on every stage
//! during the next step, so the update they make is one step late:
//!
//! ```text
//! W(t+1) = W(t) - lr * grad f(W(t-1))      (W(-1) = W(0))
//! ```
//!
//! [`Stashing::step`] runs one step's forwards and the last step's remaining backwards and
//! returns the last step's gradients, summed over the micro-batches and reduced over DP exactly
//! like [`crate::pipeline_step`]'s; [`Stashing::drain`] finishes what is in flight (a flush:
//! before a checkpoint, an evaluation, the end). Every stage of a pipeline gets the same
//! micro-batches; a step needs at least `stages - 1` of them so that the last step's backwards
//! are all done within it.

use std::collections::VecDeque;
use std::sync::Arc;

use comm::words;
use graph::{ExecGraph, Slot, Zero};
use kernels::Backend;

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};
use crate::executor::{Pass, Suspended};
use crate::parallel::{CommSchedule, RankGroups, StepGradients};
use crate::pipeline::{accumulate, end_of_step, GradHook, StageOf};
use crate::reducer::{
    bucket_shapes, overlapped, param_shapes, plan_buckets, reduce_over_dp_now, unflatten_buckets,
    BucketFeeder, GradFeed,
};

/// One version of this rank's weights, shared by the micro-batches that read it.
pub type Weights<B> = Arc<Vec<<B as Backend>::Buffer>>;

/// A copy of `params`: the version a step's micro-batches will read while the optimizer goes
/// on updating `params`.
pub fn stash<B: Backend>(backend: &B, params: &[B::Buffer]) -> Result<Weights<B>> {
    let copies = params
        .iter()
        .map(|p| {
            let mut c = backend.scratch(backend.len(p))?;
            backend.copy(p, &mut c)?;
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(copies))
}

/// A micro-batch between its forward and its backward, with what it reads.
struct InFlight<B: Backend> {
    pass: Suspended<B>,
    batch: Arc<MicroBatch>,
    weights: Weights<B>,
    /// Its step (the number of [`Stashing::step`] calls before the one that started it).
    step: u64,
    /// Its number among every micro-batch of the run (the tag of its messages).
    number: usize,
}

/// A step whose backwards are not all done: what they summed so far.
struct Open<B: Backend> {
    step: u64,
    /// Backwards still to run on this stage.
    remaining: usize,
    loss: f32,
    grads: Option<Vec<B::Buffer>>,
    /// Updates applied between the weights it read and the ones it will update.
    staleness: u64,
    /// Its DP sums, where they were taken in buckets while its last backward ran.
    reduced: Option<Reduced>,
}

/// A step's gradients summed over DP in buckets.
struct Reduced {
    /// Parameter indices, bucket by bucket.
    buckets: Vec<Vec<usize>>,
    /// Each bucket's sum, flat.
    sums: Vec<Vec<f32>>,
}

/// A step's gradients, returned one step late.
pub struct Stashed<B: Backend> {
    /// Which step they are of (0-based count of [`Stashing::step`] calls).
    pub step: u64,
    /// The step's loss and gradients as [`crate::pipeline_step`] returns them, and the most
    /// activation and gradient bytes the call held at once.
    pub gradients: StepGradients<B>,
    /// How many updates were applied between the weights the gradients were computed on and
    /// the weights they update: 1 in the steady state, 0 for the first step after a flush.
    pub staleness: u64,
}

/// One rank's PipeDream-2BW pipeline across steps.
pub struct Stashing<B: Backend> {
    in_flight: VecDeque<InFlight<B>>,
    open: VecDeque<Open<B>>,
    steps: u64,
    /// Micro-batches forwarded so far (the next one's number).
    numbered: usize,
    /// The most activation and gradient bytes the last call held at once.
    last_peak: usize,
}

impl<B: Backend> Default for Stashing<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Stashing<B> {
    /// An empty pipeline.
    pub fn new() -> Self {
        Stashing {
            in_flight: VecDeque::new(),
            open: VecDeque::new(),
            steps: 0,
            numbered: 0,
            last_peak: 0,
        }
    }

    /// Micro-batches forwarded on this stage and not yet backwarded.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The most activation and gradient bytes the last call ([`Stashing::step`] or
    /// [`Stashing::drain`]) held at once, whether or not it returned gradients.
    pub fn peak_bytes(&self) -> usize {
        self.last_peak
    }

    /// Whether a step's backwards are still to run (a [`Stashing::drain`] would return it).
    pub fn pending(&self) -> bool {
        !self.open.is_empty()
    }

    /// Runs step `micro_batches` (this rank's, read on `weights`, usually [`stash`]ed from
    /// the optimizer's parameters) and the last step's remaining backwards; returns the last
    /// step's gradients, or nothing on the first step after a flush. The caller applies them
    /// before the next call.
    #[allow(clippy::too_many_arguments)] // a step of a pipeline, as `pipeline_step` takes it
    pub fn step(
        &mut self,
        backend: &B,
        exec: &ExecGraph,
        groups: &mut RankGroups,
        weights: Weights<B>,
        shared: &[bool],
        micro_batches: Vec<MicroBatch>,
    ) -> Result<Option<Stashed<B>>> {
        check(exec, groups)?;
        let stages = groups.pp.size();
        // Every replica refuses together: a step too small to finish the last one's backwards.
        let fewest =
            u64::MAX - words::all_max(groups.dp.as_ref(), u64::MAX - micro_batches.len() as u64)?;
        if fewest + 1 < stages as u64 {
            return Err(RuntimeError::Schedule(format!(
                "pipedream-2bw needs at least {} micro-batches per step on every replica (one \
                 fewer than the {stages} stages) to finish the last step's backwards within the \
                 next step; a replica got {fewest} — lower --micro-batch-tokens or raise \
                 --global-batch",
                stages - 1,
            )));
        }
        let step = self.steps;
        self.steps += 1;
        // An update follows this call exactly when the last step is open (it finishes now).
        let staleness = u64::from(!self.open.is_empty());
        self.open.push_back(Open {
            step,
            remaining: micro_batches.len(),
            loss: 0.0,
            grads: None,
            staleness,
            reduced: None,
        });
        let batches: Vec<Arc<MicroBatch>> = micro_batches.into_iter().map(Arc::new).collect();
        let peak = self.run(backend, exec, groups, Some((&weights, &batches)))?;
        match self.open.front() {
            Some(o) if o.step < step => self.close(backend, exec, groups, shared, peak),
            _ => Ok(None),
        }
    }

    /// Runs every backward in flight (a flush); the gradients of the step they finish, if any.
    pub fn drain(
        &mut self,
        backend: &B,
        exec: &ExecGraph,
        groups: &mut RankGroups,
        shared: &[bool],
    ) -> Result<Option<Stashed<B>>> {
        check(exec, groups)?;
        if self.open.is_empty() {
            return Ok(None);
        }
        let peak = self.run(backend, exec, groups, None)?;
        self.close(backend, exec, groups, shared, peak)
    }

    /// The oldest open step, whose backwards are all done on this stage (and so on every
    /// stage): its gradients reduced over DP and stages.
    fn close(
        &mut self,
        backend: &B,
        exec: &ExecGraph,
        groups: &mut RankGroups,
        shared: &[bool],
        peak_bytes: usize,
    ) -> Result<Option<Stashed<B>>> {
        let Some(o) = self.open.pop_front() else {
            return Ok(None);
        };
        if o.remaining > 0 {
            return Err(RuntimeError::Schedule(format!(
                "step {} still has {} backwards to run when it should be done",
                o.step, o.remaining
            )));
        }
        let mut grads = match o.grads {
            Some(g) => g,
            None => crate::reducer::param_shapes(exec, groups.tp.rank())?
                .iter()
                .map(|s| backend.zeros(s.iter().product()))
                .collect::<std::result::Result<_, _>>()?,
        };
        match o.reduced {
            Some(r) => unflatten_buckets(backend, &r.buckets, &r.sums, &mut grads)?,
            None => reduce_over_dp_now(backend, groups, exec, &mut grads)?,
        }
        let loss = end_of_step(backend, groups, exec, shared, &mut grads, o.loss)?;
        Ok(Some(Stashed {
            step: o.step,
            gradients: StepGradients {
                loss,
                grads,
                peak_bytes,
                presummed: None,
            },
            staleness: o.staleness,
        }))
    }

    /// The slots of one call: each new micro-batch's forward, followed (once more than the
    /// stages behind this one are in flight) by the oldest one's backward; without new ones,
    /// every backward left. Returns the most bytes the passes held at once.
    fn run(
        &mut self,
        backend: &B,
        exec: &ExecGraph,
        groups: &mut RankGroups,
        new: Option<(&Weights<B>, &[Arc<MicroBatch>])>,
    ) -> Result<usize> {
        let stages = groups.pp.size();
        let stage = groups.pp.rank().0;
        let behind = stages - stage - 1;
        let at = StageOf {
            exec,
            stage,
            tp_rank: groups.tp.rank(),
        };
        let tp_rank = groups.tp.rank();
        let step = self.steps.saturating_sub(1);
        // What every pass reads lives here for the whole call, the passes borrowing it: the
        // micro-batches in flight, then the new ones.
        let mut reads: Vec<(Arc<MicroBatch>, Weights<B>, u64, usize)> = Vec::new();
        let mut suspended = Vec::with_capacity(self.in_flight.len());
        for f in self.in_flight.drain(..) {
            reads.push((f.batch, f.weights, f.step, f.number));
            suspended.push(f.pass);
        }
        if let Some((w, batches)) = new {
            for (j, b) in batches.iter().enumerate() {
                reads.push((b.clone(), w.clone(), step, self.numbered + j));
            }
        }
        let resumed = suspended.len();
        let mut passes: VecDeque<(Pass<'_, B>, usize)> = VecDeque::new();
        for (k, s) in suspended.into_iter().enumerate() {
            let (b, w, _, _) = &reads[k];
            let pass = s.resume(backend, &exec.graph, Some(&exec.states), &w[..], b)?;
            passes.push_back((pass, k));
        }
        // The order: each new forward, then the oldest backward (the passes run their
        // backwards in `reads` order) once more than the stages behind are in flight;
        // draining, every backward left.
        let mut order = Vec::new();
        let (mut flying, mut backwards) = (resumed, 0);
        for k in resumed..reads.len() {
            order.push(Slot::F(k));
            flying += 1;
            if flying > behind {
                order.push(Slot::B(backwards));
                backwards += 1;
                flying -= 1;
            }
        }
        if new.is_none() {
            order.extend((backwards..backwards + flying).map(Slot::B));
        }
        // The step whose last backward on this stage runs in this call: its DP reduction
        // starts in buckets while that backward runs, as under 1F1B.
        let last: Option<(u64, usize)> = {
            let mut left: Vec<(u64, usize)> =
                self.open.iter().map(|o| (o.step, o.remaining)).collect();
            order.iter().find_map(|slot| match *slot {
                Slot::B(k) => {
                    let of = reads[k].2;
                    let l = left.iter_mut().find(|l| l.0 == of)?;
                    l.1 = l.1.saturating_sub(1);
                    (l.1 == 0).then_some((of, k))
                }
                Slot::F(_) => None,
            })
        };
        let bucketed =
            last.is_some() && groups.dp.size() > 1 && exec.strategy.zero < Zero::Gradients;
        let shapes = param_shapes(exec, tp_rank)?;
        let buckets = if bucketed {
            let lens = shapes.iter().map(|s| s.iter().product()).collect();
            plan_buckets(exec, lens, groups.bucket_bytes)
        } else {
            Vec::new()
        };
        let bucket_shapes = bucket_shapes(&buckets, &shapes);
        let open = &mut self.open;
        let (peak, reduced) = overlapped(
            groups,
            &exec.strategy,
            &bucket_shapes,
            |tx, tp, pp| -> Result<usize> {
                let mut feeder = BucketFeeder::new(&buckets, shapes.len());
                let mut peak = 0usize;
                for slot in order {
                    match slot {
                        Slot::F(k) => {
                            let (mb, w, _, number) = &reads[k];
                            crate::progress::beat("pipeline forward");
                            let pass = at.forward(backend, tp, pp, (&w[..]).into(), mb, *number)?;
                            let others: usize = passes.iter().map(|(p, _)| p.live_bytes()).sum();
                            peak = peak.max(others + pass.phase_peak_bytes());
                            passes.push_back((pass, k));
                        }
                        Slot::B(_) => {
                            let Some((pass, k)) = passes.pop_front() else {
                                continue;
                            };
                            let (mb, _, of, number) = &reads[k];
                            crate::progress::beat("pipeline backward");
                            let others: usize = passes.iter().map(|(p, _)| p.live_bytes()).sum();
                            let o = open.iter_mut().find(|o| o.step == *of).ok_or_else(|| {
                                RuntimeError::Schedule(format!(
                                    "a backward of step {of}, which is not open"
                                ))
                            })?;
                            let acc = o.grads.as_ref();
                            let mut feed =
                                |j: usize, g: &B::Buffer| feeder.last(backend, acc, j, g, tx);
                            let hook: Option<&mut GradHook<'_, B>> =
                                (bucketed && last == Some((*of, k))).then_some(&mut feed);
                            let (out, p) = at.backward(backend, tp, pp, pass, mb, *number, hook)?;
                            peak = peak.max(others + p);
                            o.loss += out.loss;
                            o.remaining = o.remaining.saturating_sub(1);
                            accumulate(backend, &mut o.grads, out.grads)?;
                        }
                    }
                }
                Ok(peak)
            },
        )?;
        if let (true, Some((of, _))) = (bucketed, last) {
            if let Some(o) = self.open.iter_mut().find(|o| o.step == of) {
                o.reduced = Some(Reduced {
                    buckets,
                    sums: reduced,
                });
            }
        }
        self.numbered += reads.len() - resumed;
        for (pass, k) in passes {
            let (batch, weights, step, number) = reads[k].clone();
            self.in_flight.push_back(InFlight {
                pass: pass.suspend(),
                batch,
                weights,
                step,
                number,
            });
        }
        self.last_peak = peak;
        Ok(peak)
    }
}

/// What the schedule cannot run, refused before anything is sent.
fn check(exec: &ExecGraph, groups: &RankGroups) -> Result<()> {
    if exec.strategy.zero >= Zero::Parameters {
        return Err(RuntimeError::Schedule(
            "pipedream-2bw keeps two versions of every weight; ZeRO-3 shards them per step \
             (not built): use ZeRO-1 or -2"
                .into(),
        ));
    }
    if groups.comm_schedule != CommSchedule::Fifo {
        return Err(RuntimeError::Schedule(
            "pipedream-2bw sums gradients as each step ends, not by priority".into(),
        ));
    }
    Ok(())
}
