//! `--comm-schedule priority` in the rank loop: a step's gradients stay unsummed until the next
//! step, which sums them piece by piece in the order its forward needs the parameters and
//! updates each parameter as its last piece arrives, while it computes
//! ([`runtime::stream`]). Before a hook that reads the weights (a checkpoint, an evaluation,
//! the end of the run) the pending update is settled at once, and a step's metrics wait for
//! its gradient norm, which is known once its update is done.

use std::time::Duration;

use comm::Communicator;
use graph::{ExecGraph, MeshAxis, Strategy};
use kernels::Backend;
use runtime::stream::{forward_order, update_by_priority, PriorityUpdate};
use runtime::{Gate, GradientAgreement, Optimizer, RuntimeError};

use crate::error::Result;
use crate::metrics::StepMetrics;

/// What the priority schedule keeps between steps.
pub(crate) struct Priority<B: Backend> {
    /// A DP handle of the update's own (the step running meanwhile uses the others).
    comm: Box<dyn Communicator>,
    /// Parameters in the order the forward needs them.
    order: Vec<usize>,
    /// Values a summed piece holds at most.
    piece: usize,
    /// The last step's gradients (summed from the piece `presummed` on), learning rate and
    /// that piece.
    pending: Option<(Vec<B::Buffer>, f64, usize)>,
    /// The metrics of the step whose update is pending.
    unreported: Option<StepMetrics>,
}

/// What an update needs of the rank: the agreement and the strategy its keys name.
pub(crate) struct Summing<'a> {
    pub agreement: &'a dyn GradientAgreement,
    pub strategy: &'a Strategy,
    /// How long a read of a parameter waits: longer than the communicator's timeout, so
    /// that a stuck exchange fails (naming who is missing) before the read gives up.
    pub timeout: Duration,
}

impl<B: Backend> Priority<B> {
    /// World rank `me`'s state under `inst` (its exec graph `exec`), pieces of `bucket_bytes`.
    pub fn start(
        world: &dyn Communicator,
        inst: &Strategy,
        exec: &ExecGraph,
        bucket_bytes: usize,
    ) -> Result<Self> {
        let me = world.rank().0;
        let dp: Vec<comm::Rank> = inst
            .group(me, MeshAxis::Dp)
            .into_iter()
            .map(comm::Rank)
            .collect();
        Ok(Priority {
            comm: world.sub_group(&dp)?,
            order: forward_order(exec),
            piece: (bucket_bytes / std::mem::size_of::<f32>()).max(1),
            pending: None,
            unreported: None,
        })
    }

    fn update<'s>(&'s mut self, lr: f64, presummed: usize, s: &Summing<'s>) -> PriorityUpdate<'s> {
        PriorityUpdate {
            comm: self.comm.as_mut(),
            agreement: s.agreement,
            strategy: s.strategy,
            order: &self.order,
            piece: self.piece,
            lr,
            presummed,
        }
    }

    /// Runs `compute` (a step's passes, given the gate its weights come through, if an update
    /// is pending, and the optimizer) while the pending update is summed and applied on
    /// another thread; `compute`'s result and the pending update's gradient norm.
    pub fn overlap<R>(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        s: &Summing<'_>,
        compute: impl FnOnce(Option<&Gate<B>>, &Optimizer<B>) -> Result<R>,
    ) -> Result<(R, Option<f64>)> {
        let Some((grads, lr, presummed)) = self.pending.take() else {
            return Ok((compute(None, opt)?, None));
        };
        let mut lent = opt.lend()?;
        let gate = Gate::new(grads.len(), s.timeout);
        let u = self.update(lr, presummed, s);
        let (out, norm) = std::thread::scope(|scope| {
            let (gate, lent) = (&gate, &mut lent);
            let summing = scope.spawn(move || update_by_priority(be, lent, grads, gate, u));
            let out = compute(Some(gate), opt);
            if out.is_err() {
                gate.fail("the step reading the weights failed".into());
            }
            let norm = summing.join().unwrap_or_else(|_| {
                Err(RuntimeError::Binding(
                    "the priority update thread panicked".into(),
                ))
            });
            (out, norm)
        });
        // The exchange's own error first: a timeout there names the member that never came.
        let norm = norm?;
        let out = out?;
        opt.take_back(lent, gate.into_buffers()?);
        Ok((out, Some(norm)))
    }

    /// Keeps a step's gradients for the next step: summed from piece `presummed` on (during
    /// its backward), this member's alone before it (all of them without `presummed`).
    pub fn defer(&mut self, grads: Vec<B::Buffer>, lr: f64, presummed: Option<usize>) {
        self.pending = Some((grads, lr, presummed.unwrap_or(usize::MAX)));
    }

    /// Whether an update is pending.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Sums and applies the pending update now, with no step to overlap; its norm.
    pub fn settle(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        s: &Summing<'_>,
    ) -> Result<Option<f64>> {
        Ok(self.overlap(be, opt, s, |_, _| Ok(()))?.1)
    }

    /// Holds a step's metrics until its update's norm is known.
    pub fn hold(&mut self, metrics: StepMetrics) {
        self.unreported = Some(metrics);
    }

    /// The held metrics, with their norm.
    pub fn release(&mut self, norm: f64) -> Option<StepMetrics> {
        self.unreported.take().map(|mut m| {
            m.grad_norm = norm;
            m
        })
    }
}
