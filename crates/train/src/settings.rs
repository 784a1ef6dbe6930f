//! The synchronisation models' settings, as the configuration holds them: the parameter
//! servers (`--ps-servers`, `--ps-placement`), stragglers (`--slow-rank`) and federated
//! averaging (`--fed-…`). Plain values: the checks against a whole run live with the
//! configuration, the behaviour in `ps` and `fed`.

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
