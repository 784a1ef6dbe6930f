//! The synchronisation models' settings, as the configuration holds them: the consistency
//! model (`--sync`), the parameter servers (`--ps-servers`, `--ps-placement`), stragglers
//! (`--slow-rank`) and federated averaging (`--fed-…`). Plain values: the checks against a whole run live with the
//! configuration, the behaviour in `sync`, `ps` and `fed`.

use std::fmt;

use crate::error::{Result, TrainError};

/// The run's optimizer (`--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// AdamW (PyTorch semantics); the DP replicas exchange gradients as `--grad-compression`
    /// says.
    #[default]
    AdamW,
    /// 1-bit Adam (Tang et al. 2021): `warmup` steps of AdamW with the gradients summed exactly,
    /// then the variance frozen and the DP replicas exchanging their momentum by the 1-bit
    /// `sign` codec with error feedback on the worker and the server side.
    OneBitAdam {
        /// Steps of exact AdamW before the variance freezes (the paper's `T_w`).
        warmup: u64,
    },
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimizerKind::AdamW => f.write_str("adamw"),
            OptimizerKind::OneBitAdam { warmup } => {
                write!(f, "onebit-adam (exact for {warmup} steps)")
            }
        }
    }
}

/// How the data is split over the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharding {
    /// A seeded shuffle of the sequences dealt round-robin.
    #[default]
    Iid,
    /// Whole sources (files, or documents of one file) in order, in contiguous blocks: each
    /// client sees only its own files.
    BySource,
}

/// How the server weighs the clients' models in its average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FedWeighting {
    /// By the size of each client's data (its shard's predicted tokens), as McMahan et al.
    /// weigh by `n_k`.
    #[default]
    Size,
    /// By the tokens each client trained this round.
    Tokens,
}

/// Federated training's settings (used under `--sync fedavg`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Federated {
    /// Clients the data is split over.
    pub clients: usize,
    /// The fraction of clients sampled each round (at least one is).
    pub fraction: f64,
    /// Local AdamW steps per client and round.
    pub local_steps: usize,
    /// Sequences per local step.
    pub batch: usize,
    /// How the data is split.
    pub sharding: Sharding,
    /// How the average weighs the clients.
    pub weighting: FedWeighting,
    /// Epochs of its own shard each client trains per round (McMahan's `E`), in batches of
    /// `batch` in a fresh seeded order each epoch; `None`: `local_steps` steps.
    pub epochs: Option<usize>,
    /// The probability that a sampled client drops out of a round (trains nothing and sends
    /// nothing; the server averages those that report).
    pub client_dropout: f64,
    /// The fraction of every layer's FFN units a client drops (Federated Dropout; 0: none).
    pub dropout: f64,
}

impl Default for Federated {
    fn default() -> Self {
        Federated {
            clients: 0,
            fraction: 1.0,
            local_steps: 5,
            batch: 8,
            sharding: Sharding::Iid,
            weighting: FedWeighting::Size,
            epochs: None,
            client_dropout: 0.0,
            dropout: 0.0,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_modes_parse_and_refuse_by_name() {
        assert_eq!(SyncMode::parse("bsp", None, None).unwrap(), SyncMode::Bsp);
        assert_eq!(
            SyncMode::parse("ssp:0", None, None).unwrap(),
            SyncMode::Ssp { staleness: 0 }
        );
        assert_eq!(SyncMode::parse("asp", None, None).unwrap(), SyncMode::Asp);
        assert_eq!(
            SyncMode::parse("local:5", None, None).unwrap(),
            SyncMode::Local { every: 5 }
        );
        assert_eq!(
            SyncMode::parse("diloco:20", None, Some(0.5)).unwrap(),
            SyncMode::DiLoCo {
                every: 20,
                outer_lr: OUTER_LR,
                outer_momentum: 0.5
            }
        );
        for (s, lr, mu, says) in [
            ("ssp", None, None, "staleness bound"),
            ("asp:2", None, None, "use bsp, ssp:S, asp"),
            ("fedavg:2", None, None, "use bsp, ssp:S, asp"),
            ("local:0", None, None, "at least 1"),
            ("local", None, None, "at least 1"),
            ("gossip", None, None, "at least 1"),
            ("local:4", Some(0.7), None, "outer_lr"),
            ("bsp", None, Some(0.9), "outer_momentum"),
            ("diloco:4", Some(-1.0), None, "outer_lr"),
            ("diloco:4", None, Some(1.0), "outer_momentum"),
        ] {
            let e = SyncMode::parse(s, lr, mu).unwrap_err().to_string();
            assert!(e.contains(says), "{s}: {e}");
        }
    }

    /// Against PyTorch's SGD with Nesterov momentum written out in f64 (torch.optim.SGD:
    /// `buf = g` on the first step, then `buf = μ buf + g`; `g ← g + μ buf`; `p ← p − lr g`).

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

/// The consistency model of the DP replicas.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SyncMode {
    /// Every step, the gradient exchange (bulk-synchronous).
    #[default]
    Bsp,
    /// Local SGD: the weights averaged every `every` steps.
    Local {
        /// Steps between averagings.
        every: usize,
    },
    /// Stale-synchronous on the parameter server: no worker more than `staleness` steps ahead
    /// of the slowest.
    Ssp {
        /// The bound `s`.
        staleness: usize,
    },
    /// Asynchronous on the parameter server: every push applied on arrival, no barrier.
    Asp,
    /// Federated averaging over client shards ([`crate::Federated`] says how).
    FedAvg,
    /// Gossip: every `every` steps each replica averages its weights with its two neighbours
    /// on a ring of the DP group (and with everyone at the end, at checkpoints and evaluations).
    Gossip {
        /// Steps between gossip rounds.
        every: usize,
    },
    /// DiLoCo: every `every` steps an outer SGD step with Nesterov momentum on the averaged
    /// change of the weights.
    DiLoCo {
        /// Inner steps between outer steps.
        every: usize,
        /// The outer learning rate (the paper's 0.7).
        outer_lr: f64,
        /// The outer Nesterov momentum (the paper's 0.9).
        outer_momentum: f64,
    },
}

/// DiLoCo's outer learning rate by default (Douillard et al. 2023).
pub const OUTER_LR: f64 = 0.7;
/// DiLoCo's outer Nesterov momentum by default.
pub const OUTER_MOMENTUM: f64 = 0.9;

impl SyncMode {
    /// `bsp`, `ssp:S`, `asp`, `local:H`, `diloco:H` or `fedavg`, with DiLoCo's outer learning
    /// rate and momentum (which only DiLoCo takes).
    pub fn parse(s: &str, outer_lr: Option<f64>, outer_momentum: Option<f64>) -> Result<Self> {
        let bad = |why: String| TrainError::setting("sync", format!("{s:?}: {why}"));
        let every = |h: &str| -> Result<usize> {
            match h.parse::<usize>() {
                Ok(h) if h >= 1 => Ok(h),
                _ => Err(bad(format!("{h:?} is not a step count of at least 1"))),
            }
        };
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let mode = match (kind, arg) {
            ("bsp", "") => SyncMode::Bsp,
            ("local", h) => SyncMode::Local { every: every(h)? },
            ("gossip", h) => SyncMode::Gossip { every: every(h)? },
            ("diloco", h) => SyncMode::DiLoCo {
                every: every(h)?,
                outer_lr: outer_lr.unwrap_or(OUTER_LR),
                outer_momentum: outer_momentum.unwrap_or(OUTER_MOMENTUM),
            },
            ("ssp", h) => SyncMode::Ssp {
                staleness: h.parse::<usize>().map_err(|_| {
                    bad(format!("{h:?} is not a staleness bound (a step count ≥ 0)"))
                })?,
            },
            ("asp", "") => SyncMode::Asp,
            ("fedavg", "") => SyncMode::FedAvg,
            _ => {
                return Err(bad(
                    "use bsp, ssp:S, asp, local:H, gossip:H, diloco:H or fedavg".into(),
                ))
            }
        };
        if !matches!(mode, SyncMode::DiLoCo { .. }) {
            for (flag, given) in [
                ("outer_lr", outer_lr.is_some()),
                ("outer_momentum", outer_momentum.is_some()),
            ] {
                if given {
                    return Err(TrainError::setting(
                        flag,
                        format!("only DiLoCo has an outer step; --sync is {s}"),
                    ));
                }
            }
        }
        if let SyncMode::DiLoCo {
            outer_lr,
            outer_momentum,
            ..
        } = mode
        {
            if !(outer_lr.is_finite() && outer_lr > 0.0) {
                return Err(TrainError::setting(
                    "outer_lr",
                    format!("{outer_lr} is out of range: must be finite and > 0"),
                ));
            }
            if !(0.0..1.0).contains(&outer_momentum) {
                return Err(TrainError::setting(
                    "outer_momentum",
                    format!("{outer_momentum} is out of range: must be in [0, 1)"),
                ));
            }
        }
        Ok(mode)
    }

    /// Steps between synchronisations (`None`: every step by the gradient exchange).
    pub fn every(&self) -> Option<usize> {
        match *self {
            SyncMode::Bsp | SyncMode::Ssp { .. } | SyncMode::Asp | SyncMode::FedAvg => None,
            SyncMode::Local { every }
            | SyncMode::Gossip { every }
            | SyncMode::DiLoCo { every, .. } => Some(every),
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SyncMode::Bsp => f.write_str("bsp"),
            SyncMode::Ssp { staleness } => write!(f, "ssp:{staleness}"),
            SyncMode::Asp => f.write_str("asp"),
            SyncMode::FedAvg => f.write_str("fedavg"),
            SyncMode::Local { every } => write!(f, "local:{every}"),
            SyncMode::Gossip { every } => write!(f, "gossip:{every}"),
            SyncMode::DiLoCo {
                every,
                outer_lr,
                outer_momentum,
            } => write!(
                f,
                "diloco:{every} (outer lr {outer_lr}, Nesterov momentum {outer_momentum})"
            ),
        }
    }
}
