//! `--pipeline-schedule pipedream-2bw` in the rank loop ([`runtime::Stashing`]): each step
//! hands the pipeline a copy of the weights (the version its micro-batches read), gets back the
//! last step's gradients and applies them with that step's learning rate. A step's metrics wait
//! for its gradients (its loss, norm and staleness are known then); before a hook that reads
//! the weights (a checkpoint, an evaluation, a stop, the end) the pipeline is drained — a flush,
//! after which the next step reads the newest weights.

use data::Packing;
use graph::ExecGraph;
use kernels::Backend;
use runtime::{Optimizer, RankGroups, Stashed, Stashing};

use crate::error::{Result, TrainError};
use crate::metrics::StepMetrics;

/// What the 2BW schedule keeps between steps on one rank.
pub(crate) struct TwoBw<B: Backend> {
    pipe: Stashing<B>,
    exec: ExecGraph,
    shared: Vec<bool>,
    packing: Packing,
    /// The metrics of the step in flight, completed when its gradients come back.
    unreported: Option<StepMetrics>,
    /// The run's step of the pipeline's first (a resumed run starts past 0).
    first: u64,
}

/// A step's gradients applied: its loss, norm and staleness.
pub(crate) struct Applied {
    pub step: u64,
    pub loss: f32,
    pub norm: f64,
    pub staleness: u64,
}

impl<B: Backend> TwoBw<B> {
    /// A pipeline of `exec` (this rank's exec graph of the run's strategy), micro-batches of
    /// `packing`, starting at the run's step `first`; `shared` marks tied weights.
    pub fn new(exec: ExecGraph, shared: Vec<bool>, packing: Packing, first: usize) -> Self {
        TwoBw {
            pipe: Stashing::new(),
            exec,
            shared,
            packing,
            unreported: None,
            first: first as u64,
        }
    }

    /// Whether a step is in flight.
    pub fn pending(&self) -> bool {
        self.pipe.pending()
    }

    /// Runs `batch` (world rank `me`'s share, scaled by `loss_scale`) on a copy of the
    /// optimizer's weights and applies the last step's gradients, if they came back, with the
    /// learning rate `lr(step)` of their step.
    #[allow(clippy::too_many_arguments)] // a step, as the rank loop has it
    pub fn step(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        groups: &mut RankGroups,
        batch: &[Vec<u32>],
        me: usize,
        loss_scale: f32,
        lr: &dyn Fn(u64) -> f64,
    ) -> Result<(Option<Applied>, usize)> {
        let s = &self.exec.strategy;
        let mbs = runtime::rank_micro_batches(batch, &self.packing, s, me, loss_scale)?;
        let weights = runtime::stash(be, opt.params())?;
        let done = self
            .pipe
            .step(be, &self.exec, groups, weights, &self.shared, mbs)?;
        let peak = self.pipe.peak_bytes();
        Ok((apply(be, opt, groups, done, self.first, lr)?, peak))
    }

    /// Finishes the step in flight (a flush) and applies its gradients.
    pub fn drain(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        groups: &mut RankGroups,
        lr: &dyn Fn(u64) -> f64,
    ) -> Result<Option<Applied>> {
        let done = self.pipe.drain(be, &self.exec, groups, &self.shared)?;
        apply(be, opt, groups, done, self.first, lr)
    }

    /// Holds a step's metrics until its gradients come back.
    pub fn hold(&mut self, metrics: StepMetrics) {
        self.unreported = Some(metrics);
    }

    /// The held metrics as they are (their loss and norm never came).
    pub fn abandon(&mut self) -> Option<StepMetrics> {
        self.unreported.take()
    }

    /// The held metrics completed by `applied` (whose step they must be).
    pub fn release(&mut self, applied: &Applied) -> Option<StepMetrics> {
        let mut m = self.unreported.take_if(|m| m.step == applied.step + 1)?;
        m.loss = applied.loss;
        m.grad_norm = applied.norm;
        m.weight_staleness = Some(applied.staleness);
        Some(m)
    }
}

/// Checks the returned step's loss and applies its gradients (the pipeline's step `d.step`
/// is the run's `first + d.step`).
fn apply<B: Backend>(
    be: &B,
    opt: &mut Optimizer<B>,
    groups: &mut RankGroups,
    done: Option<Stashed<B>>,
    first: u64,
    lr: &dyn Fn(u64) -> f64,
) -> Result<Option<Applied>> {
    let Some(mut d) = done else {
        return Ok(None);
    };
    d.step += first;
    let loss = d.gradients.loss;
    if !loss.is_finite() {
        return Err(TrainError::NonFiniteLoss {
            step: d.step as usize + 1,
            loss,
        });
    }
    let norm = opt.update(be, groups, d.gradients.grads, lr(d.step))?;
    Ok(Some(Applied {
        step: d.step,
        loss,
        norm,
        staleness: d.staleness,
    }))
}
