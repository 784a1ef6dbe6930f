//! Micro-batches: variable-length sequences packed into one token stream.

use std::sync::Arc;

use data::Packing;

use crate::context::CpSplit;
use crate::error::{Result, RuntimeError};

/// The micro-batches DP replica `replica` of `replicas` trains of `seqs` (a strategy's share of
/// the global batch), dealt and packed by `packing` — the policy the planner's cost model
/// estimates with.
pub fn micro_batches(
    seqs: &[Vec<u32>],
    packing: &Packing,
    replicas: usize,
    replica: usize,
    loss_scale: f32,
) -> Result<Vec<MicroBatch>> {
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let dealt = packing.deal(&lens, replicas);
    let mine = dealt
        .get(replica)
        .ok_or_else(|| RuntimeError::Batch(format!("replica {replica} of {replicas}")))?;
    packing
        .micro_batches(&lens, mine, usize::MAX)
        .iter()
        .map(|mb| {
            let part: Vec<Vec<u32>> = mb.iter().map(|&k| seqs[k].clone()).collect();
            MicroBatch::pack(&part, loss_scale)
        })
        .collect()
}

/// The micro-batches world rank `rank` trains of `seqs` under `strategy`: those of its data
/// replica ([`micro_batches`] over `strategy.dp`), and under context parallelism its CP rank's
/// part of each ([`MicroBatch::context_part`]).
pub fn rank_micro_batches(
    seqs: &[Vec<u32>],
    packing: &Packing,
    strategy: &graph::Strategy,
    rank: usize,
    loss_scale: f32,
) -> Result<Vec<MicroBatch>> {
    let (replica, cp_rank) = strategy.data_coords(rank);
    let mbs = micro_batches(seqs, packing, strategy.dp, replica, loss_scale)?;
    if strategy.cp == 1 {
        return Ok(mbs);
    }
    mbs.iter()
        .map(|m| m.context_part(strategy.cp, cp_rank))
        .collect()
}

/// Packed sequences with everything the kernels read from the host.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Input token ids, all sequences back to back.
    pub ids: Vec<u32>,
    /// The next token at every position (ignored where `mask` is false).
    pub targets: Vec<u32>,
    /// Which positions predict a token (all but the last of each sequence).
    pub mask: Vec<bool>,
    /// Position ids, restarting at 0 for every sequence.
    pub positions: Vec<u32>,
    /// Cumulative sequence lengths `0 = c0 ≤ … ≤ cS = T`.
    pub cu_seqlens: Vec<usize>,
    /// Multiplies the loss sum: `1 / (predicted tokens of the whole global batch)` (DESIGN §3).
    pub loss_scale: f32,
    /// Under context parallelism: how the whole micro-batch is split over the CP group and
    /// which rank of it this part belongs to (the other fields then hold this rank's tokens,
    /// `cu_seqlens` their boundaries per sequence; attention runs the group's exchange).
    pub context: Option<(Arc<CpSplit>, usize)>,
}

impl MicroBatch {
    /// Packs `sequences` (each of ≥ 2 tokens): position `t` of a sequence predicts token `t+1`.
    pub fn pack(sequences: &[Vec<u32>], loss_scale: f32) -> Result<Self> {
        let mut b = MicroBatch {
            ids: Vec::new(),
            targets: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
            cu_seqlens: vec![0],
            loss_scale,
            context: None,
        };
        for (i, s) in sequences.iter().enumerate() {
            if s.len() < 2 {
                return Err(RuntimeError::Batch(format!(
                    "sequence {i} has {} token(s); at least 2 are needed to predict one",
                    s.len()
                )));
            }
            for (t, &id) in s.iter().enumerate() {
                b.ids.push(id);
                b.targets.push(s.get(t + 1).copied().unwrap_or(0));
                b.mask.push(t + 1 < s.len());
                b.positions.push(t as u32);
            }
            b.cu_seqlens.push(b.ids.len());
        }
        Ok(b)
    }

    /// A micro-batch without tokens (a replica with no data still takes part in collectives).
    pub fn empty() -> Self {
        MicroBatch {
            ids: Vec::new(),
            targets: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
            cu_seqlens: vec![0],
            loss_scale: 0.0,
            context: None,
        }
    }

    /// Rank `rank`'s part of this micro-batch under the load-balanced split over a CP group of
    /// `cp` ranks ([`CpSplit::balanced`]): its tokens with their targets, mask and positions in
    /// their sequences.
    pub fn context_part(&self, cp: usize, rank: usize) -> Result<Self> {
        if self.context.is_some() {
            return Err(RuntimeError::Batch(
                "this micro-batch is already one rank's part of a CP split".into(),
            ));
        }
        let split = CpSplit::balanced(&self.cu_seqlens, cp)?;
        let rows = split.global_rows(rank);
        let mut cu = vec![0];
        let mut seq = None;
        for c in split.chunks(rank) {
            if seq == Some(c.seq) {
                *cu.last_mut().unwrap_or(&mut 0) += c.len;
            } else {
                cu.push(cu.last().copied().unwrap_or(0) + c.len);
                seq = Some(c.seq);
            }
        }
        Ok(MicroBatch {
            ids: rows.iter().map(|&r| self.ids[r]).collect(),
            targets: rows.iter().map(|&r| self.targets[r]).collect(),
            mask: rows.iter().map(|&r| self.mask[r]).collect(),
            positions: rows.iter().map(|&r| self.positions[r]).collect(),
            cu_seqlens: cu,
            loss_scale: self.loss_scale,
            context: Some((Arc::new(split), rank)),
        })
    }

    /// Packed token count `T`.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Number of predicted positions.
    pub fn predicted(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// Checks internal consistency and that every id and target is below `vocab`.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let t = self.ids.len();
        let bad = |m: String| Err(RuntimeError::Batch(m));
        if self.targets.len() != t || self.mask.len() != t || self.positions.len() != t {
            return bad(format!(
                "{t} ids but {} targets, {} mask entries, {} positions",
                self.targets.len(),
                self.mask.len(),
                self.positions.len()
            ));
        }
        if self.cu_seqlens.first() != Some(&0)
            || self.cu_seqlens.last() != Some(&t)
            || self.cu_seqlens.windows(2).any(|w| w[1] < w[0])
        {
            return bad(format!(
                "cu_seqlens {:?} do not partition {t} tokens",
                self.cu_seqlens
            ));
        }
        if let Some(i) = self.ids.iter().position(|&x| x as usize >= vocab) {
            return bad(format!(
                "token id {} at position {i} is outside the vocabulary of {vocab}",
                self.ids[i]
            ));
        }
        if let Some(i) = (0..t).find(|&i| self.mask[i] && self.targets[i] as usize >= vocab) {
            return bad(format!(
                "target {} at position {i} is outside the vocabulary of {vocab}",
                self.targets[i]
            ));
        }
        if !self.loss_scale.is_finite() {
            return bad(format!("loss scale {} is not finite", self.loss_scale));
        }
        Ok(())
    }
}
