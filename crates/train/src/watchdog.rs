//! No rank may hang a run forever. Every rank thread reports its progress (the runtime beats
//! before every op and pipeline slot, the rank loop at every phase of a step) into its slot of
//! [`Heartbeats`]; the thread that collects the run's reports checks them every second and
//! fails the run when a rank has made no progress for longer than the communication timeout
//! plus a margin ([`limit`]) — by then every rank waiting on it has timed out too, so only a rank stuck
//! outside communication (compute, I/O, a deadlock) is caught here.
//!
//! `HOTSPA_FAULT` injects faults for tests: `freeze:RANK:STEP` makes rank `RANK` stop making
//! progress forever at the start of step `STEP` (1-based), `panic:RANK:STEP` makes it panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::TrainError;

/// One rank's progress: when it last reported, at which step, doing what.
struct Slot {
    /// Milliseconds since the run began; `u64::MAX` once the rank has finished.
    at_ms: AtomicU64,
    step: AtomicU64,
    what: Mutex<&'static str>,
}

/// The progress of every rank of this process.
pub struct Heartbeats {
    start: Instant,
    /// World rank of slot 0 (under MPI this process's rank; threads: 0).
    first_rank: usize,
    slots: Vec<Slot>,
}

impl Heartbeats {
    /// Slots for `ranks` ranks, the first being world rank `first_rank`.
    pub fn new(first_rank: usize, ranks: usize) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            first_rank,
            slots: (0..ranks)
                .map(|_| Slot {
                    at_ms: AtomicU64::new(0),
                    step: AtomicU64::new(0),
                    what: Mutex::new("starting"),
                })
                .collect(),
        })
    }

    fn slot(&self, rank: usize) -> Option<&Slot> {
        self.slots.get(rank.checked_sub(self.first_rank)?)
    }

    /// Seconds since the run began.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// World rank `rank` starts `what`.
    pub fn beat(&self, rank: usize, what: &'static str) {
        if let Some(s) = self.slot(rank) {
            s.at_ms
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
            *s.what.lock().unwrap_or_else(|p| p.into_inner()) = what;
        }
    }

    /// World rank `rank` starts step `step` (1-based).
    pub fn step(&self, rank: usize, step: usize) {
        if let Some(s) = self.slot(rank) {
            s.step.store(step as u64, Ordering::Relaxed);
        }
        self.beat(rank, "step");
    }

    /// World rank `rank` has finished (well or not): no longer watched.
    pub fn done(&self, rank: usize) {
        if let Some(s) = self.slot(rank) {
            s.at_ms.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// Installs the runtime's progress hook on this (rank `rank`'s) thread.
    pub fn watch_this_thread(self: &Arc<Self>, rank: usize) {
        let me = self.clone();
        runtime::progress::set_hook(Some(Arc::new(move |what| me.beat(rank, what))));
    }

    /// The rank silent the longest: (world rank, seconds, step, what it was doing).
    pub fn most_silent(&self) -> Option<(usize, f64, u64, &'static str)> {
        let now = self.start.elapsed().as_millis() as u64;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.at_ms.load(Ordering::Relaxed) != u64::MAX)
            .map(|(i, s)| {
                let silent = now.saturating_sub(s.at_ms.load(Ordering::Relaxed));
                let what = *s.what.lock().unwrap_or_else(|p| p.into_inner());
                (
                    self.first_rank + i,
                    silent as f64 / 1e3,
                    s.step.load(Ordering::Relaxed),
                    what,
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The first rank silent for longer than `limit`, as an error naming it and where it is.
    pub fn check(&self, limit: Duration) -> Result<(), TrainError> {
        let now = self.start.elapsed().as_millis() as u64;
        for (i, s) in self.slots.iter().enumerate() {
            let at = s.at_ms.load(Ordering::Relaxed);
            if at == u64::MAX {
                continue;
            }
            let silent = Duration::from_millis(now.saturating_sub(at));
            if silent > limit {
                let what = *s.what.lock().unwrap_or_else(|p| p.into_inner());
                return Err(TrainError::Rank {
                    rank: self.first_rank + i,
                    reason: format!(
                        "made no progress for {:.0} s (step {}, in {what}); it is stuck — \
                         stopping the run (the limit is the communication timeout plus a margin: \
                         HOTSPA_COMM_TIMEOUT_SECS)",
                        silent.as_secs_f64(),
                        s.step.load(Ordering::Relaxed)
                    ),
                });
            }
        }
        Ok(())
    }
}

/// How long a rank may be silent: the communication timeout plus [`MARGIN`] — long enough that
/// a rank waiting on a dead or stopped peer reports it first (with the communicator's own
/// diagnosis, e.g. MPI's census of who never arrived: the waiting ranks give up at the timeout,
/// and the run ends [`comm::AFTER_FAILURE`] later), short enough that a rank stuck
/// outside communication ends the run in bounded time.
pub fn limit() -> Duration {
    comm::default_timeout() + MARGIN
}

/// What [`limit`] adds to the communication timeout.
pub const MARGIN: Duration = Duration::from_secs(10);

/// How long a run asked to stop (a signal) waits for the ranks' next report before it gives
/// up on them: three times the longest step so far and 10 s, at most [`limit`]. Every report
/// (a step's end, a checkpoint's pieces) starts the wait again.
pub fn stop_grace(longest_step: f64) -> Duration {
    (Duration::from_secs_f64(3.0 * longest_step.max(0.0)) + Duration::from_secs(10)).min(limit())
}

/// A fault to inject (`HOTSPA_FAULT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Stop making progress forever.
    Freeze {
        /// World rank.
        rank: usize,
        /// 1-based step.
        step: usize,
    },
    /// Panic.
    Panic {
        /// World rank.
        rank: usize,
        /// 1-based step.
        step: usize,
    },
}

impl Fault {
    /// The fault `HOTSPA_FAULT` asks for, if any (a malformed value is an error).
    pub fn from_env() -> Result<Option<Self>, TrainError> {
        let Ok(v) = std::env::var("HOTSPA_FAULT") else {
            return Ok(None);
        };
        let bad = || {
            TrainError::setting(
                "HOTSPA_FAULT",
                format!("`{v}`: write freeze:RANK:STEP or panic:RANK:STEP"),
            )
        };
        let parts: Vec<&str> = v.split(':').collect();
        let [kind, rank, step] = parts.as_slice() else {
            return Err(bad());
        };
        let rank = rank.parse().map_err(|_| bad())?;
        let step = step.parse().map_err(|_| bad())?;
        match *kind {
            "freeze" => Ok(Some(Fault::Freeze { rank, step })),
            "panic" => Ok(Some(Fault::Panic { rank, step })),
            _ => Err(bad()),
        }
    }

    /// Injects the fault if it is rank `rank`'s at step `step` (1-based).
    pub fn at(&self, rank: usize, step: usize) {
        match *self {
            Fault::Freeze { rank: r, step: s } if (r, s) == (rank, step) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Fault::Panic { rank: r, step: s } if (r, s) == (rank, step) => {
                panic!("HOTSPA_FAULT: rank {rank} panics at step {step}")
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_rank_is_named_with_its_step_and_op() {
        let h = Heartbeats::new(0, 2);
        h.step(0, 3);
        h.beat(1, "gemm");
        assert!(h.check(Duration::from_secs(1)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        h.done(1);
        let e = h.check(Duration::from_millis(10)).unwrap_err().to_string();
        assert!(
            e.starts_with("rank 0: made no progress") && e.contains("step 3, in step"),
            "{e}"
        );
    }
}
