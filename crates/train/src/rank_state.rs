//! What a rank keeps between steps beyond its weights and AdamW moments, typed: the gradient
//! agreement's residuals, warm starts and draw counters, and periodic averaging's anchor
//! weights and outer momentum. Its encoding — as named tensors to gather to rank 0, and as a
//! checkpoint's `state` entries `rank{r}/NAME` (agreement) and `rank{r}/sync/NAME`
//! (averaging) — lives here and nowhere else.

use std::collections::BTreeMap;

/// One rank's state between steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RankState {
    /// The gradient agreement's (`GradientAgreement::state`), by name.
    pub agreement: Vec<(String, Vec<f32>)>,
    /// Periodic averaging's (`Replicas::state`), by name.
    pub averaging: Vec<(String, Vec<f32>)>,
}

/// The averaging's names, after the agreement's.
const AVERAGING: &str = "sync/";

impl RankState {
    /// As one list of named tensors (to send to rank 0).
    pub fn to_named(&self) -> Vec<(String, Vec<f32>)> {
        let averaging = self
            .averaging
            .iter()
            .map(|(k, v)| (format!("{AVERAGING}{k}"), v.clone()));
        self.agreement.iter().cloned().chain(averaging).collect()
    }

    /// The inverse of [`RankState::to_named`].
    pub fn from_named(named: Vec<(String, Vec<f32>)>) -> Self {
        let mut out = RankState::default();
        for (k, v) in named {
            match k.strip_prefix(AVERAGING) {
                Some(s) => out.averaging.push((s.to_string(), v)),
                None => out.agreement.push((k, v)),
            }
        }
        out
    }

    /// Rank `rank`'s entries of a checkpoint's `state`.
    pub fn entries(&self, rank: usize) -> impl Iterator<Item = (String, Vec<f32>)> + '_ {
        self.to_named()
            .into_iter()
            .map(move |(k, v)| (format!("rank{rank}/{k}"), v))
    }

    /// Rank `rank`'s state in a checkpoint's `state` (empty where it kept none).
    pub fn of_rank(state: &BTreeMap<String, Vec<f32>>, rank: usize) -> Self {
        let prefix = format!("rank{rank}/");
        Self::from_named(
            state
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_state_survives_a_checkpoint_and_stays_apart_from_other_ranks() {
        let s = RankState {
            agreement: vec![
                ("residual/0".into(), vec![1.0]),
                ("draws".into(), vec![2.0]),
            ],
            averaging: vec![("anchor/3".into(), vec![3.0, 4.0])],
        };
        let other = RankState {
            agreement: vec![("residual/0".into(), vec![9.0])],
            averaging: Vec::new(),
        };
        let state: BTreeMap<String, Vec<f32>> = s.entries(1).chain(other.entries(12)).collect();
        assert!(state.contains_key("rank1/sync/anchor/3"));
        let mut back = RankState::of_rank(&state, 1);
        back.agreement.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = s.clone();
        want.agreement.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back, want);
        assert_eq!(RankState::of_rank(&state, 12), other);
        assert_eq!(RankState::of_rank(&state, 2), RankState::default());
    }
}
