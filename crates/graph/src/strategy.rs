//! Parallel strategies written compactly (`dp2tp2`, `tp4sp`, `tp2pp2`, `dp4zero1`, `dp2cp2`,
//! `cp4ulysses`), validated once against the device count, and their mapping onto ranks: TP
//! innermost, then CP, then DP, PP outermost.
//!
//! Context parallelism splits every micro-batch's tokens over the `cp` ranks of a CP group, which
//! hold the same parameter pieces: for the parameters (their placement, gradient reduction,
//! ZeRO, switches) the `dp · cp` ranks are the replicas of one piece — the DP group — while the
//! data is dealt over the `dp` data replicas only.

use std::fmt;
use std::ops::Range;

use crate::error::{GraphError, Result};
use crate::recompute::Recompute;

/// A parallel strategy over `dp · cp · tp · pp` devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Strategy {
    /// Data-parallel degree: how many parts the data is dealt in.
    pub dp: usize,
    /// Context-parallel degree: how many ranks split each micro-batch's tokens.
    pub cp: usize,
    /// How the CP group's attention exchanges keys and values.
    pub cp_exchange: CpExchange,
    /// Tensor-parallel degree (Megatron column/row parallel).
    pub tp: usize,
    /// Pipeline-parallel degree (stages).
    pub pp: usize,
    /// Megatron sequence parallelism inside the TP group.
    pub sp: bool,
    /// What ZeRO shards over the DP group.
    pub zero: Zero,
    /// What the backward recomputes instead of keeping (`+selective`, `+full`).
    pub recompute: Recompute,
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

/// How the ranks of a CP group exchange what attention needs (`runtime::context` runs them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CpExchange {
    /// Ring attention: key/value blocks passed around the ring (the default).
    #[default]
    Ring,
    /// DeepSpeed-Ulysses: all-to-all from the token split to a head split and back.
    Ulysses,
}

impl CpExchange {
    /// Bytes (f32) one rank of a CP group of `cp` sends to the others in one attention forward
    /// and in its backward, each rank holding `tokens` tokens of `heads` query and `kv_heads`
    /// key/value heads (this rank's, under TP) of `head_dim`: the ring passes K,V `cp − 1` hops
    /// forward and K,V,dK,dV `cp − 1` hops plus dK,dV home backward; Ulysses sends the other
    /// ranks their heads of Q,K,V and takes back O and the log-sum-exp, and backward dO,Q,O,lse,
    /// K,V out and dQ,dK,dV back (a kv head goes to every rank that reads it when there are fewer
    /// than `cp`).
    pub fn bytes_per_rank(
        self,
        cp: usize,
        tokens: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> (usize, usize) {
        let others = cp.saturating_sub(1);
        let (n, d) = (tokens, head_dim);
        let f32s = match self {
            Self::Ring => {
                let kv = n * kv_heads * d;
                (
                    others * 2 * kv,
                    others * 4 * kv + if cp > 1 { 2 * kv } else { 0 },
                )
            }
            Self::Ulysses => {
                let hc = heads / cp.max(1);
                let nk = (kv_heads / cp.max(1)).max(1);
                let fwd = others * n * (hc * d + 2 * nk * d + hc * d + hc);
                let bwd = others * n * (3 * hc * d + hc + 2 * nk * d + hc * d + 2 * nk * d);
                (fwd, bwd)
            }
        };
        (4 * f32s.0, 4 * f32s.1)
    }
}

impl fmt::Display for CpExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ring => "ring",
            Self::Ulysses => "ulysses",
        })
    }
}

/// Which ranks form one group of an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshAxis {
    /// The replicas of one parameter piece: ranks that differ only in DP or CP (`dp · cp`).
    Dp,
    /// Ranks of one CP group (splitting the same micro-batches' tokens).
    Cp,
    /// Ranks of one TP group.
    Tp,
    /// Ranks of one pipeline (one per stage).
    Pp,
}

impl Strategy {
    /// Parses a spec such as `dp2tp2pp2`, `tp4sp`, `dp4zero1` (factors in any order, each at
    /// most once, missing degrees 1) and checks `dp·tp·pp = devices`, naming every factor.
    pub fn parse(spec: &str, devices: usize) -> Result<Self> {
        let s = Self::parse_own(spec)?;
        let (dp, tp, pp, cp) = (s.dp, s.tp, s.pp, s.cp);
        if dp * cp * tp * pp != devices {
            let cps = if cp > 1 {
                format!(" × cp{cp}")
            } else {
                String::new()
            };
            return Err(GraphError::Strategy {
                spec: spec.to_string(),
                reason: format!(
                    "dp{dp}{cps} × tp{tp} × pp{pp} = {} devices, but there are {devices}",
                    dp * cp * tp * pp
                ),
            });
        }
        Ok(s)
    }

    /// Parses a spec as [`Strategy::parse`] does, on as many devices as its degrees multiply
    /// to (a concurrent group's strategy, whose devices are the group's).
    pub fn parse_own(spec: &str) -> Result<Self> {
        let err = |reason: String| GraphError::Strategy {
            spec: spec.to_string(),
            reason,
        };
        let lower = spec.trim().to_ascii_lowercase();
        let (s, recompute) = match lower.split_once('+') {
            None => (lower.as_str(), Recompute::None),
            Some((body, mode)) => (
                body,
                Recompute::parse(mode).ok_or_else(|| {
                    err(format!(
                        "`+{mode}`: recomputation is `+none`, `+selective` or `+full`"
                    ))
                })?,
            ),
        };
        if s.is_empty() {
            return Err(err(
                "empty; write e.g. dp2tp2, tp4sp, tp2pp2, dp4zero1".into()
            ));
        }
        let (mut dp, mut tp, mut pp, mut cp, mut sp, mut zero) =
            (None, None, None, None, false, None);
        let mut exchange: Option<CpExchange> = None;
        let mut rest = s;
        while !rest.is_empty() {
            let key = ["zero", "dp", "tp", "pp", "sp", "cp", "ring", "ulysses"]
                .into_iter()
                .find(|k| rest.starts_with(k))
                .ok_or_else(|| {
                    err(format!(
                        "unexpected `{rest}` (factors are dpN, cpN, tpN, ppN, sp, ring, ulysses, \
                         zeroN)"
                    ))
                })?;
            rest = &rest[key.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            rest = &rest[digits.len()..];
            if key == "ring" || key == "ulysses" {
                if !digits.is_empty() {
                    return Err(err(format!(
                        "`{key}` takes no degree: it uses the CP group"
                    )));
                }
                if exchange.is_some() {
                    return Err(err("give one of `ring` and `ulysses`".into()));
                }
                exchange = Some(if key == "ring" {
                    CpExchange::Ring
                } else {
                    CpExchange::Ulysses
                });
                continue;
            }
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
                "cp" => &mut cp,
                _ => &mut zero,
            };
            if slot.is_some() {
                return Err(err(format!("`{key}` appears twice")));
            }
            *slot = Some(n);
        }
        let (dp, tp, pp, cp) = (
            dp.unwrap_or(1),
            tp.unwrap_or(1),
            pp.unwrap_or(1),
            cp.unwrap_or(1),
        );
        if dp == 0 || tp == 0 || pp == 0 || cp == 0 {
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
        if zero > Zero::Off && dp * cp == 1 {
            return Err(err(format!(
                "zero{stage} shards over the DP group (dp · cp ranks) and needs dp or cp > 1"
            )));
        }
        if exchange.is_some() && cp == 1 {
            return Err(err(
                "`ring`/`ulysses` choose the CP group's exchange and need cp > 1".into(),
            ));
        }
        Ok(Self {
            dp,
            cp,
            cp_exchange: exchange.unwrap_or_default(),
            tp,
            pp,
            sp,
            zero,
            recompute,
        })
    }

    /// One device, no parallelism (`dp1`).
    pub fn single() -> Self {
        Self {
            dp: 1,
            cp: 1,
            cp_exchange: CpExchange::Ring,
            tp: 1,
            pp: 1,
            sp: false,
            zero: Zero::Off,
            recompute: Recompute::None,
        }
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.dp * self.cp * self.tp * self.pp
    }

    /// The replicas of every parameter piece: `dp · cp` (the size of the DP group).
    pub fn replicas(&self) -> usize {
        self.dp * self.cp
    }

    /// `(pp, replica, tp)` coordinates of `rank`: TP innermost, PP outermost; `replica` counts
    /// the `dp · cp` replicas of the rank's parameter pieces (data replica × CP rank, CP inner).
    pub fn coords(&self, rank: usize) -> (usize, usize, usize) {
        (
            rank / (self.replicas() * self.tp),
            rank / self.tp % self.replicas(),
            rank % self.tp,
        )
    }

    /// `(data replica, CP rank)` of `rank`: which part of the data it trains, and which tokens
    /// of it.
    pub fn data_coords(&self, rank: usize) -> (usize, usize) {
        let replica = self.coords(rank).1;
        (replica / self.cp, replica % self.cp)
    }

    /// The rank at `(pp, replica, tp)`.
    pub fn rank_of(&self, pp: usize, replica: usize, tp: usize) -> usize {
        (pp * self.replicas() + replica) * self.tp + tp
    }

    /// The ranks of `rank`'s group along `axis`, in axis order.
    pub fn group(&self, rank: usize, axis: MeshAxis) -> Vec<usize> {
        let (p, r, t) = self.coords(rank);
        match axis {
            MeshAxis::Tp => (0..self.tp).map(|x| self.rank_of(p, r, x)).collect(),
            MeshAxis::Dp => (0..self.replicas())
                .map(|x| self.rank_of(p, x, t))
                .collect(),
            MeshAxis::Cp => {
                let first = r - r % self.cp;
                (first..first + self.cp)
                    .map(|x| self.rank_of(p, x, t))
                    .collect()
            }
            MeshAxis::Pp => (0..self.pp).map(|x| self.rank_of(x, r, t)).collect(),
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
        for (k, v) in [
            ("dp", self.dp),
            ("cp", self.cp),
            ("tp", self.tp),
            ("pp", self.pp),
        ] {
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
        if self.cp > 1 && self.cp_exchange == CpExchange::Ulysses {
            s += "ulysses";
        }
        if self.zero > Zero::Off {
            s += &format!("zero{}", self.zero.stage());
        }
        if self.recompute != Recompute::None {
            s += &format!("+{}", self.recompute);
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
            ("cp2dp2", 4, "dp2cp2"),
            ("tp2cp2ring", 4, "cp2tp2"),
            ("ulyssescp4", 4, "cp4ulysses"),
            ("cp2pp2", 4, "cp2pp2"),
            ("dp2tp2+full", 4, "dp2tp2+full"),
            ("cp4ulysses+Selective", 4, "cp4ulysses+selective"),
            ("tp4+none", 4, "tp4"),
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
            ("zero1", "needs dp or cp > 1"),
            ("dp2zero4", "stages are 1, 2 and 3"),
            ("fsdp2", "unexpected `fsdp2`"),
            ("dp2ring", "need cp > 1"),
            ("dp2+half", "`+half`: recomputation is"),
            ("cp2ring2", "takes no degree"),
            ("cp2ringulysses", "give one of"),
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
        // CP between TP and DP: the DP group is every replica of the piece (dp · cp ranks).
        let c = Strategy::parse("dp2cp2tp2", 8).unwrap();
        assert_eq!(c.group(5, MeshAxis::Tp), vec![4, 5]);
        assert_eq!(c.group(5, MeshAxis::Cp), vec![5, 7]);
        assert_eq!(c.group(5, MeshAxis::Dp), vec![1, 3, 5, 7]);
        assert_eq!(c.data_coords(5), (1, 0));
        assert_eq!(c.data_coords(3), (0, 1));
        assert_eq!(
            Strategy::parse("dp2cp2", 8).unwrap_err().to_string(),
            "strategy `dp2cp2`: dp2 × cp2 × tp1 × pp1 = 4 devices, but there are 8"
        );
    }
}
