//! Several jobs on one cluster sharing the links between nodes (the survey's outlook §5(3)):
//! each job repeats a step of compute that needs no shared link, then an exchange that does;
//! while several jobs exchange at once they share the link's bandwidth, either fairly (each
//! gets an equal share: processor sharing, as TCP flows or NCCL rings on one NIC tend to) or by
//! strict priority (the first job in the list takes all it can, the next what is left).
//! A fluid model, event by event: exact for its assumptions, which are that a job's exchange is
//! limited by the shared link alone and that its compute never waits for anything else.
//!
//! ```
//! use sim::sharing::{share, JobLoad, Policy};
//!
//! let job = JobLoad { compute: 1.0, exchange: 0.5, overlap: 0.0 };
//! // Alone: 1.5 s a step. Two alike sharing fairly stay in lockstep and each step takes 2 s.
//! let alone = share(&[job], Policy::Fair, 20);
//! assert!((alone[0] - 1.5).abs() < 1e-9);
//! let fair = share(&[job, job], Policy::Fair, 20);
//! assert!((fair[0] - 2.0).abs() < 1e-9);
//! // By priority the second job's exchange is pushed past the first's, after which they
//! // interleave and both run at the speed they have alone.
//! let prio = share(&[job, job], Policy::Priority, 200);
//! assert!(prio.iter().all(|t| (t - 1.5).abs() < 0.01), "{prio:?}");
//! ```

use serde::Serialize;

/// How jobs exchanging at once share the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Policy {
    /// Equal shares among the jobs exchanging.
    Fair,
    /// All of it to the first job (in list order) that is exchanging.
    Priority,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fair" => Ok(Policy::Fair),
            "priority" => Ok(Policy::Priority),
            other => Err(format!("--share {other}: use fair or priority")),
        }
    }
}

/// One job's step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JobLoad {
    /// Seconds of the step's compute (everything but the exposed part of its exchange).
    pub compute: f64,
    /// Seconds its exchange takes with the shared link to itself.
    pub exchange: f64,
    /// How long before the compute ends the exchange may start (the backward it hides under;
    /// at most `compute`).
    pub overlap: f64,
}

impl JobLoad {
    /// Its step alone: the compute, and what of the exchange the overlap does not hide.
    pub fn alone(&self) -> f64 {
        self.compute + (self.exchange - self.overlap.min(self.compute)).max(0.0)
    }
}

/// Each job's mean step seconds over its first `steps` steps, all jobs starting at time 0,
/// until every job has done `steps` steps. A step computes for `compute` seconds; its exchange
/// starts `overlap` before the compute ends and runs at the job's share of the link; the step
/// ends when both are done.
pub fn share(jobs: &[JobLoad], policy: Policy, steps: usize) -> Vec<f64> {
    let n = jobs.len();
    // Per job: when its current step started, the exchange left (None: not started).
    let mut start = vec![0.0f64; n];
    let mut left: Vec<Option<f64>> = vec![None; n];
    let mut done = vec![0usize; n];
    let mut finished = vec![0.0f64; n];
    let mut now = 0.0f64;
    let opens = |i: usize, start: f64| start + (jobs[i].compute - jobs[i].overlap).max(0.0);
    let ends = |i: usize, start: f64| start + jobs[i].compute;
    let tiny = |i: usize| 1e-12 * (1.0 + jobs[i].exchange);
    while done.iter().any(|&d| d < steps) {
        let exchanging: Vec<usize> = (0..n)
            .filter(|&i| left[i].is_some_and(|l| l > tiny(i)))
            .collect();
        let rate = |i: usize| -> f64 {
            if !exchanging.contains(&i) {
                return 0.0;
            }
            match policy {
                Policy::Fair => 1.0 / exchanging.len() as f64,
                Policy::Priority if exchanging.first() == Some(&i) => 1.0,
                Policy::Priority => 0.0,
            }
        };
        // The next event: an exchange opening, a compute ending, an exchange ending.
        let mut next = f64::INFINITY;
        for i in 0..n {
            let at = match left[i] {
                None => opens(i, start[i]),
                Some(l) if l > tiny(i) && rate(i) > 0.0 => now + l / rate(i),
                Some(_) => f64::INFINITY,
            };
            next = next.min(at);
            if ends(i, start[i]) > now {
                next = next.min(ends(i, start[i]));
            }
        }
        if !next.is_finite() {
            break;
        }
        let dt = next - now;
        now = next;
        for i in 0..n {
            if let Some(l) = left[i].as_mut() {
                *l -= dt * rate(i);
            }
            if left[i].is_none() && opens(i, start[i]) <= now {
                left[i] = Some(jobs[i].exchange);
            }
            let exchanged = left[i].is_some_and(|l| l <= tiny(i));
            if exchanged && ends(i, start[i]) <= now {
                if done[i] < steps {
                    done[i] += 1;
                    finished[i] = now;
                }
                start[i] = now;
                left[i] = None;
                if opens(i, now) <= now {
                    left[i] = Some(jobs[i].exchange);
                }
            }
        }
    }
    finished.iter().map(|&t| t / steps.max(1) as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exchange hidden under the compute alone: shared fairly by two, it takes twice as
    /// long, and what no longer fits under the compute shows: `c + max(0, 2x − o)`.
    #[test]
    fn overlap_hides_an_exchange_until_sharing_stretches_it() {
        let j = JobLoad {
            compute: 1.0,
            exchange: 0.4,
            overlap: 0.6,
        };
        assert_eq!(j.alone(), 1.0);
        assert!((share(&[j], Policy::Fair, 10)[0] - 1.0).abs() < 1e-9);
        let two = share(&[j, j], Policy::Fair, 10);
        assert!(two.iter().all(|t| (t - 1.2).abs() < 1e-9), "{two:?}");
        // Hidden even when shared: nothing shows.
        let light = JobLoad { exchange: 0.2, ..j };
        let two = share(&[light, light], Policy::Fair, 10);
        assert!(two.iter().all(|t| (t - 1.0).abs() < 1e-9), "{two:?}");
    }

    #[test]
    fn alone_a_step_is_its_compute_and_its_exchange() {
        for (c, x) in [(1.0, 0.25), (0.2, 3.0), (2.0, 0.0)] {
            let t = share(
                &[JobLoad {
                    compute: c,
                    exchange: x,
                    overlap: 0.0,
                }],
                Policy::Fair,
                7,
            );
            assert!((t[0] - (c + x)).abs() < 1e-9, "{t:?}");
        }
    }

    /// Fair sharing keeps jobs that start together in lockstep, every exchange at 1/k of the
    /// link: k alike take `c + k·x` a step.
    #[test]
    fn fair_sharing_slows_every_exchange_by_the_jobs_sharing_it() {
        let j = JobLoad {
            compute: 1.0,
            exchange: 0.3,
            overlap: 0.0,
        };
        for k in 1..=4 {
            let t = share(&vec![j; k], Policy::Fair, 50);
            for s in &t {
                assert!((s - (1.0 + 0.3 * k as f64)).abs() < 1e-9, "{k}: {t:?}");
            }
        }
    }

    /// By priority the first job always runs as if alone; the others wait for its exchanges.
    /// Where the computes are long enough to hide the others' exchanges (`c ≥ (k−1)·x`) they
    /// fall into a staggered rhythm and every job ends at its speed alone; where they are not,
    /// the link is busy all the time and the jobs' steps add up to the link's whole time
    /// (`Σ x` per step of each).
    #[test]
    fn priority_staggers_the_exchanges() {
        let j = JobLoad {
            compute: 1.0,
            exchange: 0.3,
            overlap: 0.0,
        };
        let t = share(&[j, j, j], Policy::Priority, 400);
        assert!((t[0] - 1.3).abs() < 1e-9, "{t:?}");
        assert!(t.iter().all(|s| (s - 1.3).abs() < 0.01), "{t:?}");
        // Exchanges longer than the compute: the link is the bottleneck. Fairly, both keep in
        // lockstep at `c + 2x`; by priority the first runs as if alone and the second gets the
        // link only while the first computes (0.1 s of every 1.1): about 11 s a step.
        let heavy = JobLoad {
            compute: 0.1,
            exchange: 1.0,
            overlap: 0.0,
        };
        let fair = share(&[heavy, heavy], Policy::Fair, 400);
        assert!(fair.iter().all(|s| (s - 2.1).abs() < 1e-9), "{fair:?}");
        let prio = share(&[heavy, heavy], Policy::Priority, 400);
        assert!((prio[0] - 1.1).abs() < 1e-9, "{prio:?}");
        assert!((prio[1] - 11.0).abs() < 0.2, "{prio:?}");
    }
}
