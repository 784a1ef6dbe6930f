//! Priority communication scheduling (`--comm-schedule priority`, after P3 and ByteScheduler):
//! a step's gradients are summed over DP while the *next* step computes, in pieces ordered by
//! when the next forward needs them (the first layers first), and each parameter is updated as
//! soon as its last piece is summed. The next forward waits per parameter, not per step: a
//! [`Gate`] publishes each updated parameter once, and a pass reading it through a
//! [`ParamView::Gated`] waits for it (bounded by the communicator's timeout).
//!
//! The update is the synchronous one (the next step reads exactly the weights a step-by-step
//! run would), so a run under either schedule trains the same model; only when the summing
//! happens changes. It needs every parameter's gradient whole on every DP member and no global
//! norm before the update: pure data parallelism without ZeRO or clipping (the configuration
//! refuses the rest by name).

use std::ops::Range;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use comm::Communicator;
use graph::{ExecGraph, Strategy};
use kernels::Backend;

use crate::agreement::{BucketKey, GradientAgreement};
use crate::error::{Result, RuntimeError};
use crate::optimizer::Lent;

/// Parameters published one by one by another thread; a read waits for its parameter.
pub struct Gate<B: Backend> {
    slots: Vec<OnceLock<B::Buffer>>,
    failed: Mutex<Option<String>>,
    ready: Condvar,
    timeout: Duration,
}

impl<B: Backend> Gate<B> {
    /// `params` empty slots; a read gives up after `timeout`.
    pub fn new(params: usize, timeout: Duration) -> Self {
        Gate {
            slots: (0..params).map(|_| OnceLock::new()).collect(),
            failed: Mutex::new(None),
            ready: Condvar::new(),
            timeout,
        }
    }

    /// How many parameters the gate holds.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Publishes parameter `k` (once).
    pub fn publish(&self, k: usize, buf: B::Buffer) -> Result<()> {
        let slot = self.slots.get(k).ok_or_else(|| {
            RuntimeError::Binding(format!("parameter {k} of {} published", self.slots.len()))
        })?;
        if slot.set(buf).is_err() {
            return Err(RuntimeError::Binding(format!(
                "parameter {k} published twice"
            )));
        }
        let _held = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        self.ready.notify_all();
        Ok(())
    }

    /// Tells every reader that nothing more will come, and why.
    pub fn fail(&self, why: String) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get_or_insert(why);
        self.ready.notify_all();
    }

    /// Parameter `k`, once published.
    pub fn wait(&self, k: usize) -> Result<&B::Buffer> {
        let slot = self.slots.get(k).ok_or_else(|| {
            RuntimeError::Binding(format!("parameter {k} of {} read", self.slots.len()))
        })?;
        let deadline = Instant::now() + self.timeout;
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(b) = slot.get() {
                return Ok(b);
            }
            if let Some(why) = failed.as_ref() {
                return Err(RuntimeError::Agreement(format!(
                    "parameter {k} was never updated: {why}"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RuntimeError::Agreement(format!(
                    "parameter {k} was not updated within {:?} (the gradient exchange of the \
                     step before is stuck)",
                    self.timeout
                )));
            }
            failed = self
                .ready
                .wait_timeout(failed, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every parameter, all published.
    pub fn into_buffers(self) -> Result<Vec<B::Buffer>> {
        self.slots
            .into_iter()
            .enumerate()
            .map(|(k, s)| {
                s.into_inner().ok_or_else(|| {
                    RuntimeError::Binding(format!("parameter {k} was never updated"))
                })
            })
            .collect()
    }
}

/// The parameters a pass reads: all at hand, or through a [`Gate`].
pub enum ParamView<'a, B: Backend> {
    /// Bound in `graph.params` order.
    Ready(&'a [B::Buffer]),
    /// Published one by one while the pass runs.
    Gated(&'a Gate<B>),
}

impl<B: Backend> Clone for ParamView<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for ParamView<'_, B> {}

impl<'a, B: Backend> From<&'a [B::Buffer]> for ParamView<'a, B> {
    fn from(p: &'a [B::Buffer]) -> Self {
        ParamView::Ready(p)
    }
}

impl<'a, B: Backend> From<&'a Vec<B::Buffer>> for ParamView<'a, B> {
    fn from(p: &'a Vec<B::Buffer>) -> Self {
        ParamView::Ready(p)
    }
}

impl<'a, B: Backend> From<&'a Gate<B>> for ParamView<'a, B> {
    fn from(g: &'a Gate<B>) -> Self {
        ParamView::Gated(g)
    }
}

impl<'a, B: Backend> ParamView<'a, B> {
    /// How many parameters are bound.
    pub fn len(&self) -> usize {
        match self {
            ParamView::Ready(p) => p.len(),
            ParamView::Gated(g) => g.len(),
        }
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parameter `k` (waiting for it behind a gate).
    pub fn get(&self, k: usize) -> Result<&'a B::Buffer> {
        match *self {
            ParamView::Ready(p) => p
                .get(k)
                .ok_or_else(|| RuntimeError::Binding(format!("parameter {k} of {} read", p.len()))),
            ParamView::Gated(g) => g.wait(k),
        }
    }
}

/// The parameters in the order the forward first reads them (index into `graph.params`).
pub fn forward_order(exec: &ExecGraph) -> Vec<usize> {
    let g = &exec.graph;
    by_first_op(g, g.params.len(), |o, k| o.inputs.contains(&g.params[k]))
}

/// `0..n` ordered by the first op of `g` for which `touches(op, k)` holds (ties, and those no
/// op touches, last, in index order).
pub(crate) fn by_first_op(
    g: &graph::Graph,
    n: usize,
    touches: impl Fn(&graph::Op, usize) -> bool,
) -> Vec<usize> {
    let at: Vec<usize> = (0..n)
        .map(|k| {
            g.ops
                .iter()
                .position(|o| touches(o, k))
                .unwrap_or(usize::MAX)
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&k| at[k]);
    order
}

/// Pieces of about `piece` values in `order`: small parameters fused, large ones cut; each a
/// list of `(parameter, range of its values)`.
pub fn pieces(order: &[usize], lens: &[usize], piece: usize) -> Vec<Vec<(usize, Range<usize>)>> {
    let piece = piece.max(1);
    let mut out: Vec<Vec<(usize, Range<usize>)>> = Vec::new();
    let mut size = 0;
    for &k in order {
        let len = lens.get(k).copied().unwrap_or(0);
        let mut at = 0;
        while at < len {
            if out.is_empty() || size >= piece {
                out.push(Vec::new());
                size = 0;
            }
            let end = (at + piece - size).min(len);
            if let Some(p) = out.last_mut() {
                p.push((k, at..end));
            }
            size += end - at;
            at = end;
        }
    }
    out
}

/// The first piece summed during the backward: the pieces before it hold the first `share`
/// of the values (in the forward's order) and wait for the next step.
pub fn deferred(pieces: &[Vec<(usize, Range<usize>)>], share: f64) -> usize {
    let total: usize = pieces.iter().flatten().map(|(_, r)| r.len()).sum();
    let keep = (share.clamp(0.0, 1.0) * total as f64).ceil() as usize;
    let mut seen = 0;
    for (j, p) in pieces.iter().enumerate() {
        if seen >= keep {
            return j;
        }
        seen += p.iter().map(|(_, r)| r.len()).sum::<usize>();
    }
    pieces.len()
}

/// What the update of one step by priority needs besides the optimizer.
pub struct PriorityUpdate<'a> {
    /// A DP communicator of its own (the step that runs meanwhile uses the others).
    pub comm: &'a mut dyn Communicator,
    /// How the members agree on a piece.
    pub agreement: &'a dyn GradientAgreement,
    /// The strategy (for the agreement's keys).
    pub strategy: &'a Strategy,
    /// Parameters in the order the forward needs them ([`forward_order`]).
    pub order: &'a [usize],
    /// Values a piece sums at most.
    pub piece: usize,
    /// The learning rate of the step.
    pub lr: f64,
    /// The first piece that is summed already (during the step's last backward); the pieces
    /// before it are summed here.
    pub presummed: usize,
}

/// Sums `grads` (this member's, unreduced before piece `u.presummed`) over DP piece by piece
/// in priority order and
/// publishes each parameter into `gate` as soon as its AdamW update is done; `lent` holds the
/// optimizer's state and the parameters before the step ([`crate::Optimizer::lend`]).
/// Returns the summed gradient's norm (every member holds the whole of it). On an error, the gate is told, so that no reader waits for it.
pub fn update_by_priority<B: Backend>(
    backend: &B,
    lent: &mut Lent<B>,
    grads: Vec<B::Buffer>,
    gate: &Gate<B>,
    u: PriorityUpdate<'_>,
) -> Result<f64> {
    let r = run_update(backend, lent, grads, gate, u);
    if let Err(e) = &r {
        gate.fail(e.to_string());
    }
    r
}

fn run_update<B: Backend>(
    backend: &B,
    opt: &mut Lent<B>,
    grads: Vec<B::Buffer>,
    gate: &Gate<B>,
    u: PriorityUpdate<'_>,
) -> Result<f64> {
    let lens: Vec<usize> = grads.iter().map(|g| backend.len(g)).collect();
    let mut host: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| backend.download(g))
        .collect::<std::result::Result<_, _>>()?;
    drop(grads);
    let mut left = lens.clone();
    let mut total = 0.0f64;
    for k in (0..lens.len()).filter(|&k| lens[k] == 0) {
        let g = backend.zeros(0)?;
        gate.publish(k, opt.updated(backend, k, &g, u.lr)?)?;
    }
    for (index, piece) in pieces(u.order, &lens, u.piece).into_iter().enumerate() {
        crate::progress::beat("priority gradient exchange");
        let mut flat: Vec<f32> = Vec::new();
        for (k, r) in &piece {
            flat.extend_from_slice(&host[*k][r.clone()]);
        }
        if index < u.presummed {
            let key = BucketKey {
                strategy: u.strategy,
                index,
                shapes: &[],
            };
            u.agreement.all_reduce(&*u.comm, key, &mut flat)?;
        }
        let mut at = 0;
        for (k, r) in piece {
            let n = r.len();
            host[k][r].copy_from_slice(&flat[at..at + n]);
            at += n;
            left[k] -= n;
            if left[k] == 0 {
                let g = std::mem::take(&mut host[k]);
                total +=
                    opt.weight(k) * g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
                let g = backend.upload(&g)?;
                gate.publish(k, opt.updated(backend, k, &g, u.lr)?)?;
            }
        }
    }
    let norm = f64::from(total as f32).sqrt();
    if !norm.is_finite() {
        return Err(RuntimeError::Batch(format!(
            "the gradient norm is {norm}: a loss or gradient is NaN or infinite; under \
             --comm-schedule priority the parameters summed before it were already updated, \
             so the run stops here (the last checkpoint is intact)"
        )));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_fuse_small_parameters_and_cut_large_ones_in_order() {
        let p = pieces(&[2, 0, 1], &[5, 2, 1], 4);
        assert_eq!(
            p,
            vec![vec![(2, 0..1), (0, 0..3)], vec![(0, 3..5), (1, 0..2)],]
        );
        // Every value once.
        let covered: usize = p.iter().flatten().map(|(_, r)| r.len()).sum();
        assert_eq!(covered, 8);
    }

    #[test]
    fn the_deferred_share_is_the_first_pieces() {
        let p = pieces(&[0, 1, 2], &[4, 4, 4], 2);
        assert_eq!(p.len(), 6);
        assert_eq!(deferred(&p, 1.0 / 3.0), 2);
        assert_eq!(deferred(&p, 0.5), 3);
        assert_eq!(deferred(&p, 1.0), 6);
        assert_eq!(deferred(&p, 0.0), 0);
    }

    #[test]
    fn a_gate_hands_out_what_was_published_and_reports_failure() {
        let gate: Gate<kernels::CpuBackend> = Gate::new(2, Duration::from_millis(50));
        gate.publish(1, vec![3.0]).unwrap();
        assert_eq!(gate.wait(1).unwrap(), &vec![3.0]);
        assert!(gate.publish(1, vec![4.0]).is_err());
        let e = gate.wait(0).unwrap_err().to_string();
        assert!(e.contains("not updated within"), "{e}");
        gate.fail("the exchange failed".into());
        let e = gate.wait(0).unwrap_err().to_string();
        assert!(e.contains("the exchange failed"), "{e}");
        assert!(gate.into_buffers().is_err());
    }
}
