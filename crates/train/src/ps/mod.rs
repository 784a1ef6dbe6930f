//! The parameter-server architecture (`--ps-servers K`, the survey's §3 "centralised"
//! synchronisation): `K` server ranks after the `W` worker ranks hold the parameters and the
//! AdamW moments, sharded as contiguous ranges of all parameters laid end to end; workers
//! compute gradients on their share of the data, push them to every server, and receive the
//! servers' fresh parameters in reply.
//!
//! The consistency model says when a server updates and when it replies ([`SyncMode`]):
//!
//! * BSP: step `t`'s pushes of all workers are summed (workers scale by the global batch's
//!   predicted tokens, as the all-reduce run does), clipped by the norm of the sum (the servers
//!   add their shards' squares), and applied as one AdamW step; then every worker gets the
//!   parameters. The same update as the all-reduce run.
//! * ASP: every push is applied on arrival as one AdamW step (the worker's own mean gradient,
//!   clipped by its own norm) and answered at once: no barrier anywhere.
//! * SSP with bound `s`: as ASP, but a worker's reply waits until it would be at most `s` steps
//!   ahead of the slowest unfinished worker.
//!
//! Under ASP and SSP the data is handed out by server 0 in shares: share `j` is DP part
//! `j mod W` of global batch `j / W`, so the run trains on exactly the samples of `--steps`
//! BSP steps, and a fast worker takes more shares than a slow one. Server 0 reports a step's
//! metrics every `W` updates and, at the end, gathers the servers' shards into the weights.

mod push;
mod server;
mod worker;

use std::ops::Range;

pub(crate) use server::serve;

/// Values before the gradient in a push: kind, share, norm, loss, tokens, predicted tokens,
/// peak bytes (low, high 32 bits).
pub(crate) const PUSH_HEADER: usize = 8;
/// Values before the parameters in a reply: version (updates applied), next share, two unused.
pub(crate) const REPLY_HEADER: usize = 4;
/// A push's kind: gradients.
pub(crate) const KIND_GRADIENT: u32 = 0;
/// A push's kind: the worker has no more shares.
pub(crate) const KIND_DONE: u32 = 1;
/// A push's kind: the worker's step failed and it leaves the run (the share it had is given
/// to another worker).
pub(crate) const KIND_LOST: u32 = 2;
/// "No more shares" in a reply.
pub(crate) const NO_SHARE: u32 = u32::MAX;

/// An integer carried bit-exactly in an f32 slot.
pub(crate) fn word(x: u32) -> f32 {
    f32::from_bits(x)
}

/// The integer of [`word`].
pub(crate) fn unword(x: f32) -> u32 {
    x.to_bits()
}

/// How the parameters are laid out end to end and cut into the servers' shards.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Element count of every parameter.
    pub lens: Vec<usize>,
    /// Whether each takes weight decay (tensors of rank ≥ 2).
    pub decay: Vec<bool>,
    /// Every server's flat range.
    pub shards: Vec<Range<usize>>,
}

impl Layout {
    pub fn new(lens: Vec<usize>, decay: Vec<bool>, servers: usize) -> Self {
        let total: usize = lens.iter().sum();
        let shards = (0..servers)
            .map(|s| dstate::chunk(0..total, servers, s))
            .collect();
        Layout {
            lens,
            decay,
            shards,
        }
    }

    pub fn total(&self) -> usize {
        self.lens.iter().sum()
    }

    /// The pieces of server `s`'s shard: (parameter, range in the shard).
    pub fn pieces(&self, s: usize) -> Vec<(usize, Range<usize>)> {
        let shard = &self.shards[s];
        let mut out = Vec::new();
        let mut at = 0;
        for (k, &len) in self.lens.iter().enumerate() {
            let (lo, hi) = (at.max(shard.start), (at + len).min(shard.end));
            if lo < hi {
                out.push((k, lo - shard.start..hi - shard.start));
            }
            at += len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_parameter_once() {
        let l = Layout::new(vec![5, 3, 9, 1], vec![true, false, true, false], 3);
        assert_eq!(l.total(), 18);
        let mut seen = [0usize; 18];
        for s in 0..3 {
            let base = l.shards[s].start;
            let mut covered = 0;
            for (k, r) in l.pieces(s) {
                let start: usize = l.lens[..k].iter().sum();
                for i in r.clone() {
                    assert!(base + i >= start && base + i < start + l.lens[k]);
                    seen[base + i] += 1;
                }
                covered += r.len();
            }
            assert_eq!(covered, l.shards[s].len());
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
