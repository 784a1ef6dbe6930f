//! The one-axis transition table (DESIGN §2.1): which collective turns one DState into another.

use std::fmt;

use crate::error::{DStateError, Result};
use crate::state::{DState, Placement};

/// The communication a one-axis transition needs, run among the members of that axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collective {
    /// Nothing changes.
    Identity,
    /// `P → D`.
    AllReduce,
    /// `P → S(dim)`.
    ReduceScatter {
        /// The dim scattered.
        dim: usize,
    },
    /// `S(dim) → D`.
    AllGather {
        /// The dim gathered.
        dim: usize,
    },
    /// `D → S(dim)`: each member keeps its chunk, no communication.
    LocalSlice {
        /// The dim sliced.
        dim: usize,
    },
    /// `S(from_dim) → S(to_dim)`.
    AllToAll {
        /// The dim split before.
        from_dim: usize,
        /// The dim split after.
        to_dim: usize,
    },
    /// `D → P`: the member with coordinate 0 keeps the value, the others zero theirs.
    LocalZero,
}

impl Collective {
    /// True when the transition moves bytes between devices.
    pub fn communicates(&self) -> bool {
        !matches!(
            self,
            Collective::Identity | Collective::LocalSlice { .. } | Collective::LocalZero
        )
    }

    /// Short name as used in plans (`all-reduce`, `local-slice`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Collective::Identity => "identity",
            Collective::AllReduce => "all-reduce",
            Collective::ReduceScatter { .. } => "reduce-scatter",
            Collective::AllGather { .. } => "all-gather",
            Collective::LocalSlice { .. } => "local-slice",
            Collective::AllToAll { .. } => "all-to-all",
            Collective::LocalZero => "local-zero",
        }
    }
}

/// A one-axis transition between two DStates of the same device group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Source DState.
    pub from: DState,
    /// Destination DState.
    pub to: DState,
    /// The axis that changes (`None` for the identity).
    pub axis: Option<usize>,
    /// What to run along that axis.
    pub collective: Collective,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.axis {
            Some(a) => write!(
                f,
                "{} -> {}: {}@axis{}",
                self.from,
                self.to,
                self.collective.name(),
                a
            ),
            None => write!(f, "{} -> {}: identity", self.from, self.to),
        }
    }
}

/// The collective that turns `from` into `to`, when they differ on at most one axis.
///
/// A changed `Split(d)` must be the innermost axis splitting `d` on its side: otherwise the pieces
/// the axis members exchange are not contiguous chunks of one another, and the move needs a
/// resharding plan instead ([`DStateError::InnerSplitConflict`]).
pub fn transition(from: &DState, to: &DState) -> Result<Transition> {
    let mismatch = || DStateError::DegreeMismatch {
        from: from.to_string(),
        to: to.to_string(),
    };
    if from.axes().len() != to.axes().len() {
        return Err(mismatch());
    }
    if from
        .axes()
        .iter()
        .zip(to.axes())
        .any(|(a, b)| a.degree != b.degree)
    {
        return Err(mismatch());
    }
    let changed: Vec<usize> = (0..from.axes().len())
        .filter(|&i| from.axes()[i].placement != to.axes()[i].placement)
        .collect();
    let axis = match changed.as_slice() {
        [] => {
            return Ok(Transition {
                from: from.clone(),
                to: to.clone(),
                axis: None,
                collective: Collective::Identity,
            })
        }
        [a] => *a,
        _ => {
            return Err(DStateError::NotOneAxis {
                from: from.to_string(),
                to: to.to_string(),
                axes: changed,
            })
        }
    };
    let innermost = |state: &DState, dim: usize| -> Result<()> {
        match state.innermost_split_of(dim) {
            Some(inner) if inner != axis => Err(DStateError::InnerSplitConflict {
                axis,
                dim,
                inner_axis: inner,
            }),
            _ => Ok(()),
        }
    };
    use Placement::*;
    let (p, q) = (from.axes()[axis].placement, to.axes()[axis].placement);
    let collective = match (p, q) {
        (Partial, Duplicate) => Collective::AllReduce,
        (Partial, Split(dim)) => {
            innermost(to, dim)?;
            Collective::ReduceScatter { dim }
        }
        (Split(dim), Duplicate) => {
            innermost(from, dim)?;
            Collective::AllGather { dim }
        }
        (Duplicate, Split(dim)) => {
            innermost(to, dim)?;
            Collective::LocalSlice { dim }
        }
        (Split(a), Split(b)) => {
            innermost(from, a)?;
            innermost(to, b)?;
            Collective::AllToAll {
                from_dim: a,
                to_dim: b,
            }
        }
        (Duplicate, Partial) => Collective::LocalZero,
        _ => {
            return Err(DStateError::NoCollective {
                from: p.to_string(),
                to: q.to_string(),
                axis,
            })
        }
    };
    Ok(Transition {
        from: from.clone(),
        to: to.clone(),
        axis: Some(axis),
        collective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> DState {
        s.parse().unwrap()
    }

    #[test]
    fn the_table() {
        let cases = [
            ("[P×4]", "[D×4]", "all-reduce"),
            ("[P×4]", "[S(1)×4]", "reduce-scatter"),
            ("[S(0)×4]", "[D×4]", "all-gather"),
            ("[D×4]", "[S(0)×4]", "local-slice"),
            ("[S(0)×4]", "[S(1)×4]", "all-to-all"),
            ("[D×4]", "[P×4]", "local-zero"),
            ("[D×4]", "[D×4]", "identity"),
        ];
        for (a, b, name) in cases {
            assert_eq!(transition(&ds(a), &ds(b)).unwrap().collective.name(), name);
        }
        assert_eq!(
            transition(&ds("[D×2, S(0)×4]"), &ds("[D×2, S(1)×4]"))
                .unwrap()
                .to_string(),
            "[D×2, S(0)×4] -> [D×2, S(1)×4]: all-to-all@axis1"
        );
    }

    #[test]
    fn refusals_say_why() {
        let e = transition(&ds("[S(0)×4]"), &ds("[P×4]")).unwrap_err();
        assert_eq!(e.to_string(), "no collective turns S(0) into P on axis 0");
        let e = transition(&ds("[S(0)×2, S(0)×2]"), &ds("[D×2, S(0)×2]")).unwrap_err();
        assert!(matches!(
            e,
            DStateError::InnerSplitConflict {
                axis: 0,
                dim: 0,
                inner_axis: 1
            }
        ));
        let e = transition(&ds("[S(0)×2, D×2]"), &ds("[D×2, S(0)×2]")).unwrap_err();
        assert!(matches!(e, DStateError::NotOneAxis { .. }));
        let e = transition(&ds("[D×2]"), &ds("[D×4]")).unwrap_err();
        assert!(matches!(e, DStateError::DegreeMismatch { .. }));
        // The inner axis of a nested split may change freely.
        assert!(transition(&ds("[S(0)×2, S(0)×2]"), &ds("[S(0)×2, D×2]")).is_ok());
    }
}
