//! Held-out loss and perplexity: the loss over every predicted token of a dataset, summed on
//! the weights an optimizer holds (by `hotspa eval`, and by `--eval-data` every
//! `--eval-every` steps of a run).

use comm::Communicator;
use data::Dataset;
use kernels::Backend;
use runtime::{Optimizer, RankGroups};
use serde::Serialize;

use crate::error::Result;
use crate::runner::{StepInput, StepRunner};

/// The loss of a dataset: the mean next-token cross-entropy over every predicted token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean loss per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens predicted (every position but the last of each sequence).
    pub predicted_tokens: u64,
    /// Sequences (documents cut to `max_len`).
    pub sequences: usize,
}

impl Evaluation {
    fn from_sum(sum: f64, predicted: u64, sequences: usize) -> Self {
        let loss = sum / predicted.max(1) as f64;
        Evaluation {
            loss,
            perplexity: loss.exp(),
            predicted_tokens: predicted,
            sequences,
        }
    }
}

/// Runs every sequence of `data` in order, `batch` at a time, through `runner` on the
/// optimizer's current weights: (loss summed over every predicted token, predicted tokens).
/// Every rank of the strategy calls it with the same data.
pub(crate) fn loss_sum<B: Backend>(
    runner: &mut dyn StepRunner<B>,
    backend: &B,
    world: &dyn Communicator,
    optimizer: &Optimizer<B>,
    groups: &mut RankGroups,
    data: &Dataset,
    batch: usize,
) -> Result<(f64, u64)> {
    let (mut sum, mut predicted) = (0.0f64, 0u64);
    for chunk in data.sequences().chunks(batch.max(1)) {
        // The loss scale 1 makes the step's loss the sum over its predicted tokens.
        let out = runner.gradients(StepInput {
            backend,
            world,
            optimizer,
            groups,
            batch: chunk,
            loss_scale: 1.0,
            gate: None,
        })?;
        sum += f64::from(out.loss);
        predicted += chunk.iter().map(|s| s.len() as u64 - 1).sum::<u64>();
    }
    Ok((sum, predicted))
}

/// [`Evaluation`] from a loss sum over `predicted` tokens of `sequences` sequences.
pub(crate) fn evaluation(sum: f64, predicted: u64, sequences: usize) -> Evaluation {
    Evaluation::from_sum(sum, predicted, sequences)
}
