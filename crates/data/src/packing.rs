//! The one policy that turns a global batch into work: which bucket (strategy) takes each
//! sequence, which DP replica of that strategy trains it, and which sequences share a
//! micro-batch. The runtime packs with it and the planner's cost model estimates with it, so a
//! plan is always estimated on the packing that runs.
//!
//! ```
//! use data::Packing;
//!
//! let lens = [5, 9, 2, 7, 3];
//! let p = Packing::InOrder { budget: 12 };
//! // Round-robin over 2 replicas, then filled in order up to 12 tokens.
//! assert_eq!(p.deal(&lens, 2), vec![vec![0, 2, 4], vec![1, 3]]);
//! assert_eq!(p.micro_batches(&lens, &[0, 2, 4], usize::MAX), vec![vec![0, 2, 4]]);
//! assert_eq!(p.micro_batches(&lens, &[1, 3], usize::MAX), vec![vec![1], vec![3]]);
//! assert_eq!(data::packing::bucket_of(7, &[Some(4), Some(8), None]), Some(1));
//! ```

/// How a strategy's sequences are dealt to its DP replicas and packed into micro-batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Packing {
    /// What `hotspa train` does: sequences in batch order, round-robin over the DP replicas,
    /// each replica's filled in order into micro-batches of at most `budget` tokens (a longer
    /// sequence alone).
    InOrder {
        /// Tokens per micro-batch (`--micro-batch-tokens`).
        budget: usize,
    },
    /// Longest first to the replica with the least work (`len + quadratic · len²`, attention's
    /// share), then first-fit decreasing into micro-batches of at most `budget` tokens.
    Balanced {
        /// Tokens per micro-batch (`usize::MAX`: the capacity alone bounds them).
        budget: usize,
        /// Work of a sequence beyond its length, per squared token (0: tokens only).
        quadratic: f64,
    },
}

impl Packing {
    /// The sequences (indices into `lens`) each of `replicas` DP replicas trains.
    pub fn deal(&self, lens: &[usize], replicas: usize) -> Vec<Vec<usize>> {
        let replicas = replicas.max(1);
        let mut out = vec![Vec::new(); replicas];
        match *self {
            Packing::InOrder { .. } => {
                for k in 0..lens.len() {
                    out[k % replicas].push(k);
                }
            }
            Packing::Balanced { quadratic, .. } => {
                let mut work = vec![0.0f64; replicas];
                for k in longest_first(lens) {
                    let l = lens[k] as f64;
                    let r = least(&work);
                    work[r] += l + quadratic * l * l;
                    out[r].push(k);
                }
            }
        }
        out
    }

    /// The most tokens a micro-batch takes.
    pub fn budget(&self) -> usize {
        match *self {
            Packing::InOrder { budget } | Packing::Balanced { budget, .. } => budget,
        }
    }

    /// One replica's `mine` (indices into `lens`) as micro-batches of at most the budget and at
    /// most `cap` tokens; a sequence longer than that gets one of its own.
    pub fn micro_batches(&self, lens: &[usize], mine: &[usize], cap: usize) -> Vec<Vec<usize>> {
        let limit = self.budget().min(cap);
        let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
        match *self {
            Packing::InOrder { .. } => {
                for &k in mine {
                    match bins.last_mut() {
                        Some((t, v)) if *t + lens[k] <= limit => {
                            *t += lens[k];
                            v.push(k);
                        }
                        _ => bins.push((lens[k], vec![k])),
                    }
                }
            }
            Packing::Balanced { .. } => {
                let sub: Vec<usize> = mine.iter().map(|&k| lens[k]).collect();
                for j in longest_first(&sub) {
                    let k = mine[j];
                    match bins.iter_mut().find(|(t, _)| t + lens[k] <= limit) {
                        Some((t, v)) => {
                            *t += lens[k];
                            v.push(k);
                        }
                        None => bins.push((lens[k], vec![k])),
                    }
                }
            }
        }
        bins.into_iter().map(|(_, v)| v).collect()
    }

    /// Every replica's micro-batches: `layout[r][m]` lists the sequences of replica `r`'s
    /// micro-batch `m`.
    pub fn layout(&self, lens: &[usize], replicas: usize, cap: usize) -> Vec<Vec<Vec<usize>>> {
        self.deal(lens, replicas)
            .iter()
            .map(|mine| self.micro_batches(lens, mine, cap))
            .collect()
    }
}

/// The bucket a sequence of `len` tokens goes to: the first whose bound holds it (`None` = no
/// bound), or `None` when none does.
pub fn bucket_of(len: usize, bounds: &[Option<usize>]) -> Option<usize> {
    bounds.iter().position(|b| b.is_none_or(|b| len <= b))
}

/// Indices of `lens`, longest first (ties in index order, so every rank agrees).
fn longest_first(lens: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    order
}

/// The index of the smallest value (the first of equals).
fn least(work: &[f64]) -> usize {
    let mut best = 0;
    for (i, w) in work.iter().enumerate() {
        if *w < work[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(lens: &[usize], mb: &[usize]) -> usize {
        mb.iter().map(|&k| lens[k]).sum()
    }

    #[test]
    fn every_sequence_lands_in_exactly_one_micro_batch_under_its_cap() {
        let lens: Vec<usize> = (0..41).map(|i| 1 + (i * 37) % 90).collect();
        for p in [
            Packing::InOrder { budget: 100 },
            Packing::Balanced {
                budget: 100,
                quadratic: 0.0,
            },
            Packing::Balanced {
                budget: usize::MAX,
                quadratic: 0.01,
            },
        ] {
            for replicas in [1, 3, 4] {
                let layout = p.layout(&lens, replicas, 128);
                let mut seen: Vec<usize> = layout.iter().flatten().flatten().copied().collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "{p:?}");
                for mb in layout.iter().flatten() {
                    assert!(
                        mb.len() == 1 || tokens(&lens, mb) <= p.budget().min(128),
                        "{p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn balanced_dealing_evens_out_the_work() {
        let lens = [100, 1, 1, 1, 60, 40];
        let p = Packing::Balanced {
            budget: usize::MAX,
            quadratic: 0.0,
        };
        let d = p.deal(&lens, 2);
        let work: Vec<usize> = d.iter().map(|r| tokens(&lens, r)).collect();
        assert_eq!(work, vec![102, 101]);
        // In order, the same lengths deal by position only.
        let d = Packing::InOrder { budget: 1000 }.deal(&lens, 2);
        assert_eq!(d, vec![vec![0, 2, 4], vec![1, 3, 5]]);
    }

    #[test]
    fn buckets_take_the_first_bound_that_holds() {
        let b = [Some(64), Some(256), None];
        assert_eq!(bucket_of(64, &b), Some(0));
        assert_eq!(bucket_of(65, &b), Some(1));
        assert_eq!(bucket_of(10_000, &b), Some(2));
        assert_eq!(bucket_of(300, &b[..2]), None);
    }
}
