//! The gradient-agreement seam (DESIGN §4): how the DP replicas of a strategy end a step with
//! the same gradient. The runtime decides *when* gradients are reduced (buckets of about
//! [`crate::RankGroups::bucket_bytes`], started while the last backward still runs; under
//! ZeRO-2/3 per parameter after the step); a [`GradientAgreement`] decides *how*. Today's is
//! [`ExactAllReduce`]; a compressed or hierarchical reduction is another implementation, set on
//! the groups with [`crate::RankGroups::with_agreement`], without touching the step runners.

use comm::{Communicator, ReduceOp};
use graph::Strategy;

use crate::error::Result;

/// Which gradients a reduction carries: bucket (or, under ZeRO-2/3, parameter) `index` of a step
/// under `strategy`. Stable from step to step, so a reduction may keep state per key (e.g. an
/// error-feedback residual).
#[derive(Debug, Clone, Copy)]
pub struct BucketKey<'a> {
    /// The strategy whose replicas agree.
    pub strategy: &'a Strategy,
    /// The bucket (ZeRO ≤ 1) or the parameter (ZeRO-2/3) in the exec graph's order.
    pub index: usize,
    /// The shapes of this rank's pieces of the parameters whose gradients the reduction
    /// carries, concatenated in this order (their volumes add up to its length): a low-rank
    /// codec compresses each matrix on its own.
    pub shapes: &'a [Vec<usize>],
}

/// How DP replicas agree on gradients.
pub trait GradientAgreement: Send + Sync {
    /// A short name for reports, e.g. `exact all-reduce`.
    fn name(&self) -> String;
    /// Sums `flat` (the concatenated gradients of one bucket) over the DP group `dp` in place:
    /// every member ends with the same values. Called from the thread that overlaps the
    /// reduction with the backward.
    fn all_reduce(&self, dp: &dyn Communicator, key: BucketKey<'_>, flat: &mut [f32])
        -> Result<()>;
    /// ZeRO-2/3: sums `grad` (one parameter's local piece) over `dp` and leaves this member its
    /// chunk (`counts[rank]` values) in `out`.
    fn reduce_scatter(
        &self,
        dp: &dyn Communicator,
        key: BucketKey<'_>,
        grad: &[f32],
        out: &mut [f32],
        counts: &[usize],
    ) -> Result<()>;
    /// What world rank `rank` keeps between steps (e.g. error-feedback residuals) as named
    /// vectors, for checkpoints; sorted by name.
    fn state(&self, rank: usize) -> Vec<(String, Vec<f32>)> {
        let _ = rank;
        Vec::new()
    }
    /// Gives world rank `rank` back what [`GradientAgreement::state`] returned. One that keeps
    /// no state refuses a non-empty one.
    fn restore(&self, rank: usize, state: Vec<(String, Vec<f32>)>) -> Result<()> {
        match state.first() {
            None => Ok(()),
            Some((name, _)) => Err(crate::RuntimeError::Agreement(format!(
                "{} keeps no state between steps, but rank {rank} was given `{name}` and {} more",
                self.name(),
                state.len() - 1
            ))),
        }
    }
}

/// The exact sum by the communicator's own all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactAllReduce;

impl GradientAgreement for ExactAllReduce {
    fn name(&self) -> String {
        "exact all-reduce".into()
    }
    fn all_reduce(&self, dp: &dyn Communicator, _: BucketKey<'_>, flat: &mut [f32]) -> Result<()> {
        Ok(dp.all_reduce(flat, ReduceOp::Sum)?)
    }
    fn reduce_scatter(
        &self,
        dp: &dyn Communicator,
        _: BucketKey<'_>,
        grad: &[f32],
        out: &mut [f32],
        counts: &[usize],
    ) -> Result<()> {
        Ok(dp.reduce_scatter(grad, out, counts, ReduceOp::Sum)?)
    }
}
