//! Parallel strategies written compactly (`dp2tp2`, `tp4sp`, `tp2pp2`, `dp4zero1`), validated once
//! against the device count, and their mapping onto ranks: TP innermost, then DP, PP outermost.

use std::fmt;
use std::ops::Range;

use crate::error::{GraphError, Result};

/// A parallel strategy over `dp · tp · pp` devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Strategy {
    /// Data-parallel degree.
    pub dp: usize,
    /// Tensor-parallel degree (Megatron column/row parallel).
    pub tp: usize,
    /// Pipeline-parallel degree (stages).
    pub pp: usize,
    /// Megatron sequence parallelism inside the TP group.
    pub sp: bool,
    /// What ZeRO shards over the DP group.
    pub zero: Zero,
}

/// The ZeRO stage of a strategy: what is sharded over its DP group. Stages are ordered, so
/// `zero >= Zero::Gradients` reads "gradients (and the optimizer state) are sharded".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Zero {
    /// Nothing: every DP replica holds everything.
    #[default]
    Off,
    /// ZeRO-1: the optimizer state.
    Optimizer,
    /// ZeRO-2: the optimizer state and the gradients.
    Gradients,
    /// ZeRO-3: the optimizer state, the gradients and the parameters.
    Parameters,
}

impl Zero {
    /// The stage number, 0 to 3.
    pub fn stage(self) -> u8 {
        self as u8
    }

    /// The stage of number `n` (0 to 3).
    pub fn from_stage(n: usize) -> Option<Self> {
        [
            Zero::Off,
            Zero::Optimizer,
            Zero::Gradients,
            Zero::Parameters,
        ]
        .get(n)
        .copied()
    }
}

/// Which ranks form one group of an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshAxis {
    /// Ranks sharing a DP replica index differ only in DP.
    Dp,
    /// Ranks of one TP group.
    Tp,
    /// Ranks of one pipeline (one per stage).
    Pp,
}

impl Strategy {
    /// Parses a spec such as `dp2tp2pp2`, `tp4sp`, `dp4zero1` (factors in any order, each at
    /// most once, missing degrees 1) and checks `dp·tp·pp = devices`, naming every factor.
    pub fn parse(spec: &str, devices: usize) -> Result<Self> {
        let err = |reason: String| GraphError::Strategy {
            spec: spec.to_string(),
            reason,
        };
        let s = spec.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err(err(
                "empty; write e.g. dp2tp2, tp4sp, tp2pp2, dp4zero1".into()
            ));
        }
        let (mut dp, mut tp, mut pp, mut sp, mut zero) = (None, None, None, false, None);
        let mut rest = s.as_str();
        while !rest.is_empty() {
            let key = ["zero", "dp", "tp", "pp", "sp"]
                .into_iter()
                .find(|k| rest.starts_with(k))
                .ok_or_else(|| {
                    err(format!(
                        "unexpected `{rest}` (factors are dpN, tpN, ppN, sp, zeroN)"
                    ))
                })?;
            rest = &rest[key.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            rest = &rest[digits.len()..];
            if key == "sp" {
                if !digits.is_empty() {
                    return Err(err("`sp` takes no degree: it uses the TP group".into()));
                }
                if sp {
                    return Err(err("`sp` appears twice".into()));
                }
                sp = true;
                continue;
            }
            let n: usize = digits
                .parse()
                .map_err(|_| err(format!("`{key}` needs a number, e.g. {key}2")))?;
            let slot = match key {
                "dp" => &mut dp,
                "tp" => &mut tp,
                "pp" => &mut pp,
                _ => &mut zero,
            };
            if slot.is_some() {
                return Err(err(format!("`{key}` appears twice")));
            }
            *slot = Some(n);
        }
        let (dp, tp, pp) = (dp.unwrap_or(1), tp.unwrap_or(1), pp.unwrap_or(1));
        if dp == 0 || tp == 0 || pp == 0 {
            return Err(err("degrees must be at least 1".into()));
        }
        let stage = zero.unwrap_or(0);
        let zero = Zero::from_stage(stage)
            .ok_or_else(|| err(format!("zero{stage}: ZeRO stages are 1, 2 and 3")))?;
        if sp && tp == 1 {
            return Err(err(
                "`sp` splits activations over the TP group and needs tp > 1".into(),
            ));
        }
        if zero > Zero::Off && dp == 1 {
            return Err(err(format!(
                "zero{stage} shards over the DP group and needs dp > 1"
            )));
        }
        if dp * tp * pp != devices {
            return Err(err(format!(
                "dp{dp} × tp{tp} × pp{pp} = {} devices, but there are {devices}",
                dp * tp * pp
            )));
        }
        Ok(Self {
            dp,
            tp,
            pp,
            sp,
            zero,
        })
    }

    /// One device, no parallelism (`dp1`).
    pub fn single() -> Self {
        Self {
            dp: 1,
            tp: 1,
            pp: 1,
            sp: false,
            zero: Zero::Off,
        }
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// `(pp, dp, tp)` coordinates of `rank`: TP innermost, PP outermost.
    pub fn coords(&self, rank: usize) -> (usize, usize, usize) {
        (
            rank / (self.dp * self.tp),
            rank / self.tp % self.dp,
            rank % self.tp,
        )
    }

    /// The rank at `(pp, dp, tp)`.
    pub fn rank_of(&self, pp: usize, dp: usize, tp: usize) -> usize {
        (pp * self.dp + dp) * self.tp + tp
    }

    /// The ranks of `rank`'s group along `axis`, in axis order.
    pub fn group(&self, rank: usize, axis: MeshAxis) -> Vec<usize> {
        let (p, d, t) = self.coords(rank);
        match axis {
            MeshAxis::Tp => (0..self.tp).map(|x| self.rank_of(p, d, x)).collect(),
            MeshAxis::Dp => (0..self.dp).map(|x| self.rank_of(p, x, t)).collect(),
            MeshAxis::Pp => (0..self.pp).map(|x| self.rank_of(x, d, t)).collect(),
        }
    }

    /// Balanced contiguous layer ranges, one per stage (the first stages take the extra layers).
    pub fn stage_layers(&self, layers: usize) -> Result<Vec<Range<usize>>> {
        if self.pp > layers {
            return Err(GraphError::Strategy {
                spec: self.to_string(),
                reason: format!("{} pipeline stages but only {layers} layers", self.pp),
            });
        }
        let (base, extra) = (layers / self.pp, layers % self.pp);
        let mut start = 0;
        Ok((0..self.pp)
            .map(|s| {
                let n = base + usize::from(s < extra);
                let r = start..start + n;
                start += n;
                r
            })
            .collect())
    }
}

impl fmt::Display for Strategy {
    /// Canonical form: `dp2tp2pp2`, then `sp`, then `zeroN`; degrees of 1 omitted (`dp1` alone
    /// for a single device).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        for (k, v) in [("dp", self.dp), ("tp", self.tp), ("pp", self.pp)] {
            if v > 1 {
                s += &format!("{k}{v}");
            }
        }
        if s.is_empty() {
            s = "dp1".into();
        }
        if self.sp {
            s += "sp";
        }
        if self.zero > Zero::Off {
            s += &format!("zero{}", self.zero.stage());
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_examples() {
        for (spec, n, canon) in [
            ("dp2tp2", 4, "dp2tp2"),
            ("tp4sp", 4, "tp4sp"),
            ("tp2pp2", 4, "tp2pp2"),
            ("dp4zero1", 4, "dp4zero1"),
            ("pp2dp2", 4, "dp2pp2"),
            ("dp2tp2pp2", 8, "dp2tp2pp2"),
            ("dp1", 1, "dp1"),
        ] {
            assert_eq!(
                Strategy::parse(spec, n).unwrap().to_string(),
                canon,
                "{spec}"
            );
        }
    }

    #[test]
    fn errors_name_every_factor() {
        let e = Strategy::parse("dp2tp2", 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "strategy `dp2tp2`: dp2 × tp2 × pp1 = 4 devices, but there are 8"
        );
        for (spec, needle) in [
            ("tp4sp2", "takes no degree"),
            ("dpx", "needs a number"),
            ("dp2dp2", "appears twice"),
            ("sp", "needs tp > 1"),
            ("zero1", "needs dp > 1"),
            ("dp2zero4", "stages are 1, 2 and 3"),
            ("fsdp2", "unexpected `fsdp2`"),
            ("", "empty"),
        ] {
            let e = Strategy::parse(spec, 2).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn mapping_puts_tp_innermost_and_pp_outermost() {
        let s = Strategy::parse("dp2tp2pp2", 8).unwrap();
        assert_eq!(s.coords(5), (1, 0, 1));
        assert_eq!(s.group(5, MeshAxis::Tp), vec![4, 5]);
        assert_eq!(s.group(5, MeshAxis::Dp), vec![5, 7]);
        assert_eq!(s.group(5, MeshAxis::Pp), vec![1, 5]);
        let p = Strategy::parse("pp4", 4).unwrap();
        assert_eq!(p.stage_layers(5).unwrap(), vec![0..2, 2..3, 3..4, 4..5]);
        assert!(p.stage_layers(3).is_err());
    }
}
