//! Pipeline schedules: the order in which a stage runs the forward and backward passes of its
//! micro-batches. The runtime runs them and the planner's memory model counts the passes each
//! keeps in flight.

use std::fmt;
use std::str::FromStr;

use crate::error::GraphError;

/// The order in which a stage runs the forward (F) and backward (B) passes of its micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// All forwards, then all backwards: every micro-batch's activations live at once.
    GPipe,
    /// One forward, one backward (PipeDream-flush): at most `stages - stage` micro-batches in
    /// flight on a stage.
    #[default]
    OneFOneB,
    /// PipeDream-2BW (Narayanan et al., ICML 2021): 1F1B with no flush between steps. A step's
    /// micro-batches enter while the last step's finish their backward, every micro-batch runs
    /// forward and backward on the weights stashed when its step began, and each stage keeps
    /// two weight versions, so the update is `W(t+1) = W(t) - lr * grad f(W(t-1))` (a one-step
    /// delay). Within one step its slots are 1F1B's; the runtime's `Stashing` runs it across
    /// steps.
    TwoBw,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::TwoBw => "pipedream-2bw",
        })
    }
}

impl FromStr for Schedule {
    type Err = GraphError;
    fn from_str(s: &str) -> Result<Self, GraphError> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            "pipedream-2bw" | "2bw" => Ok(Schedule::TwoBw),
            _ => Err(GraphError::Strategy {
                spec: s.to_string(),
                reason: "unknown pipeline schedule (gpipe, 1f1b or pipedream-2bw)".into(),
            }),
        }
    }
}

/// One slot of a stage's schedule: the forward or the backward pass of micro-batch `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Forward of micro-batch `i`.
    F(usize),
    /// Backward of micro-batch `i`.
    B(usize),
}

impl Schedule {
    /// Whether the pipeline runs on without a flush between steps (and so trains on weights
    /// one step old).
    pub fn flushless(self) -> bool {
        self == Schedule::TwoBw
    }

    /// The slots stage `stage` of `stages` runs for `m` micro-batches.
    pub fn slots(self, stage: usize, stages: usize, m: usize) -> Vec<Slot> {
        match self {
            Schedule::GPipe => (0..m).map(Slot::F).chain((0..m).map(Slot::B)).collect(),
            Schedule::OneFOneB | Schedule::TwoBw => {
                let warmup = (stages - stage - 1).min(m);
                let mut out: Vec<Slot> = (0..warmup).map(Slot::F).collect();
                for i in 0..m - warmup {
                    out.push(Slot::F(warmup + i));
                    out.push(Slot::B(i));
                }
                out.extend((m - warmup..m).map(Slot::B));
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_warms_up_by_the_stages_behind() {
        use Slot::*;
        assert_eq!(
            Schedule::OneFOneB.slots(0, 2, 3),
            vec![F(0), F(1), B(0), F(2), B(1), B(2)]
        );
        assert_eq!(
            Schedule::OneFOneB.slots(1, 2, 3),
            vec![F(0), B(0), F(1), B(1), F(2), B(2)]
        );
        assert_eq!(Schedule::GPipe.slots(0, 2, 2), vec![F(0), F(1), B(0), B(1)]);
        assert_eq!("GPipe".parse::<Schedule>().unwrap(), Schedule::GPipe);
        assert!("zigzag".parse::<Schedule>().is_err());
        assert_eq!(
            "pipedream-2bw".parse::<Schedule>().unwrap(),
            Schedule::TwoBw
        );
        assert_eq!(Schedule::TwoBw.to_string(), "pipedream-2bw");
    }
}
