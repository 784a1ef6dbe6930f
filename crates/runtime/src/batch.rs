//! Micro-batches: variable-length sequences packed into one token stream.

use data::Packing;

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
        }
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
