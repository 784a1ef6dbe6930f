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

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::sync::SyncMode;

pub(crate) use server::serve;

/// Where the server ranks run (it decides which messages cross nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Servers on machines of their own (one node each).
    #[default]
    Dedicated,
    /// Server `s` on the node of worker `s·W/K` (an extra process or thread there).
    CoLocated,
}

impl Placement {
    /// `dedicated` or `colocated`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "dedicated" => Ok(Placement::Dedicated),
            "colocated" | "co-located" => Ok(Placement::CoLocated),
            _ => Err(TrainError::setting(
                "ps_placement",
                format!("{s:?}: use dedicated or colocated"),
            )),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Dedicated => "dedicated",
            Placement::CoLocated => "colocated",
        })
    }
}

/// The parameter servers of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamServers {
    /// Server ranks (after the workers).
    pub servers: usize,
    /// Where they run.
    pub placement: Placement,
}

/// A rank whose compute is slowed (`--slow-rank R:FACTOR`): after computing its gradients it
/// waits `(FACTOR − 1)` times as long as that took, as a straggler would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowRank {
    /// World rank (a worker's).
    pub rank: usize,
    /// How many times slower its compute is (≥ 1).
    pub factor: f64,
}

impl SlowRank {
    /// `R:FACTOR`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| TrainError::setting("slow_rank", format!("{s:?}: {why}"));
        let (r, f) = s
            .split_once(':')
            .ok_or_else(|| bad("use RANK:FACTOR, e.g. 3:4"))?;
        let rank = r
            .parse::<usize>()
            .map_err(|_| bad("the rank is not a number"))?;
        let factor = f
            .parse::<f64>()
            .map_err(|_| bad("the factor is not a number"))?;
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(bad("the factor must be finite and at least 1"));
        }
        Ok(SlowRank { rank, factor })
    }

    /// Waits as `rank`'s straggling would after `compute` of work (no wait for other ranks).
    pub(crate) fn delay(slow: &[SlowRank], rank: usize, compute: std::time::Duration) {
        if let Some(s) = slow.iter().find(|s| s.rank == rank) {
            std::thread::sleep(compute.mul_f64(s.factor - 1.0));
        }
    }
}

/// One worker step under the parameter server, as the worker saw it (thread ranks report
/// every worker's; under MPI a process reports its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStep {
    /// The worker (world rank).
    pub worker: usize,
    /// Its own step count, from 1.
    pub step: usize,
    /// The share of the data it trained: DP part `share mod W` of global batch `share / W`.
    pub share: usize,
    /// Seconds from the run's start when it began computing (after its parameters arrived).
    pub started_s: f64,
    /// When it had its gradients and began pushing them.
    pub finished_s: f64,
    /// Its loss: the mean over its share's tokens (BSP: its part of the global batch's mean).
    pub loss: f32,
    /// Updates of other workers that server 0 applied between this worker's pull and its push
    /// (0 under BSP).
    pub staleness: u64,
}

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

/// The consistency models that run on the parameter server, and the checks of a run that
/// uses it.
pub(crate) fn check(cfg: &crate::TrainConfig) -> Result<()> {
    let needs = matches!(cfg.sync, SyncMode::Ssp { .. } | SyncMode::Asp);
    let Some(ps) = cfg.ps else {
        if needs {
            return Err(TrainError::setting(
                "sync",
                format!(
                    "{} runs on the parameter server: give --ps-servers K",
                    cfg.sync
                ),
            ));
        }
        return Ok(());
    };
    let refuse = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
    if ps.servers == 0 {
        return refuse("ps_servers", "0 is out of range: must be at least 1".into());
    }
    if cfg.sync.every().is_some() {
        return refuse(
            "sync",
            format!(
                "{} averages the replicas' weights by all-reduce; the parameter server runs \
                 bsp, ssp:S or asp",
                cfg.sync
            ),
        );
    }
    crate::replica::check_whole_replicas(
        cfg,
        "ps_servers",
        "the parameter server's workers",
        "the parameter server",
    )?;
    let e = &cfg.exchange;
    let exact = planner::exchange::Exchange::default();
    if e.algorithm != exact.algorithm || e.cross_node_only {
        return refuse(
            "ps_servers",
            "pushes go to the servers, not through an all-reduce: --allreduce and \
             --compress-cross-node-only do not apply"
                .into(),
        );
    }
    if matches!(e.codec, comm::codec::Codec::PowerSgd(_)) {
        return refuse(
            "ps_servers",
            "PowerSGD's factors need all-reduces between the workers; pushes to the parameter \
             server take bf16, fp16, int8, sign, topk:F or randk:F"
                .into(),
        );
    }
    Ok(())
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

    #[test]
    fn slow_ranks_parse_and_refuse() {
        assert_eq!(
            SlowRank::parse("3:4").unwrap(),
            SlowRank {
                rank: 3,
                factor: 4.0
            }
        );
        for bad in ["3", "x:2", "1:0.5", "1:inf", "1:nan"] {
            assert!(SlowRank::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Placement::parse("colocated").unwrap(), Placement::CoLocated);
        assert!(Placement::parse("remote").is_err());
    }
}
