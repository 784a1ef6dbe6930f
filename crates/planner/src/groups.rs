//! Concurrent plans of several groups of devices, searched for a step's batch (FlexSP's and
//! Hydraulis' idea on the planner's terms): the batch's sequences sorted by length and cut at
//! length edges into ranges, each range trained by a group of devices of its own under the
//! strategy that group runs it fastest with, the groups at the same time. With context
//! parallelism among the candidates ([`Planner::context`]) each sequence so gets its group's
//! CP degree and devices: the short ones none, the longest as many as they need.

use std::collections::HashMap;

use graph::Strategy;
use rayon::prelude::*;

use crate::error::Result;
use crate::plan::{Estimate, Plan, Planner};

/// The most groups `hotspa simulate` asks [`Planner::concurrent_groups`] for.
pub const MAX_GROUPS: usize = 4;

/// The most ranges of lengths the search cuts a batch into (the last group's included).
const MAX_RANGES: usize = 10;

/// The fastest candidate strategy of a group and its seconds, `None` where none holds the range.
type Best = Option<(Strategy, f64)>;

/// A split found by the search: `(seconds of its slowest group, [(upper cut, devices)])`.
type Split = (f64, Vec<(usize, usize)>);

/// The search's tables over one sorted batch.
struct Search {
    /// `cuts[i]`: where range `i` of the sorted lengths starts (strictly increasing, the last
    /// the batch's size).
    cuts: Vec<usize>,
    /// `bounds[i]`: the upper length bound of a range ending at cut `i` (`usize::MAX` for the
    /// last).
    bounds: Vec<usize>,
    /// The devices of a group other than the last: multiples of this.
    unit: usize,
    /// `best[(devices, from cut, to cut)]`.
    best: HashMap<(usize, usize, usize), Best>,
    memo: HashMap<(usize, usize, usize), Option<Split>>,
}

impl Search {
    fn seconds(&self, m: usize, a: usize, b: usize) -> Option<f64> {
        self.best
            .get(&(m, a, b))
            .and_then(|x| x.as_ref().map(|(_, t)| *t))
    }

    /// The best split of the ranges from cut `a` on over `r` devices into at most `g` groups,
    /// by the slowest group's own time.
    fn split(&mut self, a: usize, r: usize, g: usize) -> Option<Split> {
        if let Some(s) = self.memo.get(&(a, r, g)) {
            return s.clone();
        }
        let last = self.cuts.len() - 1;
        let mut out: Option<Split> = self.seconds(r, a, last).map(|t| (t, vec![(last, r)]));
        if g > 1 {
            for b in a + 1..last {
                let mut m = self.unit;
                while m < r {
                    if let Some(t) = self.seconds(m, a, b) {
                        if out.as_ref().is_none_or(|(best, _)| t < *best) {
                            if let Some((rest, mut groups)) = self.split(b, r - m, g - 1) {
                                let worst = t.max(rest);
                                if out.as_ref().is_none_or(|(best, _)| worst < *best) {
                                    groups.insert(0, (b, m));
                                    out = Some((worst, groups));
                                }
                            }
                        }
                    }
                    m += self.unit;
                }
            }
        }
        self.memo.insert((a, r, g), out.clone());
        out
    }

    /// The plan of `groups` (upper cut, devices), each under its fastest strategy.
    fn plan(&self, groups: &[(usize, usize)], devices: usize) -> Option<Plan> {
        let mut from = 0;
        let mut spec = Vec::new();
        for &(to, m) in groups {
            let (s, _) = self.best.get(&(m, from, to))?.clone()?;
            spec.push(vec![(self.bounds[to], s)]);
            from = to;
        }
        Plan::concurrent(spec, devices).ok()
    }
}

impl Planner {
    /// The best concurrent plan of at most `max_groups` groups of devices for `lens`. Searched
    /// exactly by dynamic programming over where the sorted lengths are cut (at powers of two
    /// between the batch's lengths, every few of them where that would make more than 10
    /// ranges) and how many devices each group gets (whole nodes where
    /// there are several, in steps of a sixteenth of the nodes beyond 16 of them, else any
    /// share of the node, as [`Planner::concurrent`]; the last group takes the rest), the
    /// objective the slowest group's own time; the best split of every group count up to
    /// `max_groups` is then estimated whole ([`Planner::evaluate`]: the switches in and home
    /// and the update included) beside [`Planner::concurrent`]'s two-group plan, and the fastest
    /// returned. `None` where no split holds the batch.
    pub fn concurrent_groups(
        &self,
        lens: &[usize],
        max_groups: usize,
    ) -> Result<Option<(Plan, Estimate)>> {
        let n = self.cost.cluster.devices();
        let Some(mut search) = self.tables(lens) else {
            return Ok(None);
        };
        let mut plans: Vec<Plan> = Vec::new();
        for g in 2..=max_groups.max(2) {
            if let Some((_, groups)) = search.split(0, n, g) {
                if groups.len() < 2 {
                    continue;
                }
                if let Some(p) = search.plan(&groups, n) {
                    if !plans.iter().any(|q| q.to_string() == p.to_string()) {
                        plans.push(p);
                    }
                }
            }
        }
        let mut best = self.concurrent(lens)?;
        let estimates: Vec<_> = plans
            .into_par_iter()
            .map(|plan| self.evaluate(&plan, lens).map(|est| (plan, est)))
            .collect();
        for (plan, est) in estimates.into_iter().flatten() {
            if best.as_ref().is_none_or(|(_, b)| est.seconds < b.seconds) {
                best = Some((plan, est));
            }
        }
        Ok(best)
    }

    /// A step's plan around a run's instantiation strategy `inst`: [`Planner::auto_with`]'s
    /// time-multiplexed plan, or the best of up to `max_groups` concurrent groups
    /// ([`Planner::concurrent_groups`]) holding the weights in `inst` instead, where its
    /// estimate is faster.
    pub fn auto_or_groups(
        &self,
        lens: &[usize],
        inst: &Strategy,
        max_groups: usize,
    ) -> Result<(Plan, Estimate)> {
        let best = self.auto_with(lens, Some(inst))?;
        let Some((mut plan, _)) = self.concurrent_groups(lens, max_groups)? else {
            return Ok(best);
        };
        plan.inst = inst.clone();
        Ok(match self.evaluate(&plan, lens) {
            Ok(e) if e.seconds < best.1.seconds => (plan, e),
            _ => best,
        })
    }

    /// The search's tables for `lens`: its cuts and every group's fastest strategy on every
    /// size it can have over every range of cuts. `None` for an empty batch.
    fn tables(&self, lens: &[usize]) -> Option<Search> {
        let n = self.cost.cluster.devices();
        let mut sorted = lens.to_vec();
        sorted.sort_unstable();
        let &longest = sorted.last()?;
        let per = self.cost.cluster.devices_per_node.max(1);
        let unit = if n > per {
            per * n.div_ceil(per).div_ceil(16)
        } else {
            1
        };
        let (mut cuts, mut bounds) = (vec![0], vec![0]);
        let mut e = sorted[0].max(2).next_power_of_two();
        while e < longest {
            let c = sorted.partition_point(|&l| l <= e);
            if c > cuts[cuts.len() - 1] && c < sorted.len() {
                cuts.push(c);
                bounds.push(e);
            }
            e *= 2;
        }
        // At most MAX_RANGES ranges: every few powers of two where the batch spans more (the
        // tables grow with the square of the ranges).
        let inner = cuts.len() - 1;
        if inner >= MAX_RANGES {
            let every = inner.div_ceil(MAX_RANGES - 1);
            let keep: Vec<usize> = (1..=inner).filter(|i| i % every == 0).collect();
            cuts = [0]
                .into_iter()
                .chain(keep.iter().map(|&i| cuts[i]))
                .collect();
            bounds = [0]
                .into_iter()
                .chain(keep.iter().map(|&i| bounds[i]))
                .collect();
        }
        cuts.push(sorted.len());
        bounds.push(usize::MAX);
        // Every group size the split can give: multiples of the unit, and what is left of
        // the devices after some of them.
        let mut sizes: Vec<usize> = (1..=n / unit)
            .flat_map(|k| [k * unit, n - (k * unit).min(n)])
            .chain([n])
            .filter(|&m| m > 0)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let last = cuts.len() - 1;
        let keys: Vec<(usize, usize, usize)> = sizes
            .iter()
            .flat_map(|&m| (0..last).flat_map(move |a| (a + 1..=last).map(move |b| (m, a, b))))
            .collect();
        let best: HashMap<_, _> = keys
            .into_par_iter()
            .map(|(m, a, b)| {
                let group = &sorted[cuts[a]..cuts[b]];
                let top = group.last().copied().unwrap_or(0);
                let best = self
                    .candidates_on(m, top)
                    .into_iter()
                    .map(|s| {
                        let cap = self.cost.capacity(&s, &s);
                        let t = self.cost.strategy(&s, group, cap).total();
                        (s, t)
                    })
                    .min_by(|x, y| x.1.total_cmp(&y.1));
                ((m, a, b), best)
            })
            .collect();
        Some(Search {
            cuts,
            bounds,
            unit,
            best,
            memo: HashMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, Link};
    use crate::cost::CostModel;

    /// One node of 8 A100-like GPUs, LLaMA-2 7B, CP in the search.
    fn planner() -> Planner {
        let link = |gbps| Link {
            gbps,
            latency_us: 5.0,
        };
        let cluster = Cluster::new("test", 1, 8, 312.0, 80.0, link(300.0), link(25.0));
        let cfg = model::LlamaConfig::preset("llama2-7b").expect("a preset");
        let mut p = Planner::new(CostModel::new(cluster, cfg));
        p.context = true;
        p
    }

    /// A long-tailed batch: many short sequences, a few long ones.
    fn batch() -> Vec<usize> {
        let mut lens = vec![300; 24];
        lens.extend([1500; 8]);
        lens.extend([6000, 7000, 12000, 30000]);
        lens
    }

    /// Every split of the ranges from cut `a` on over `r` devices into at most `g` groups, by
    /// brute force over the same table.
    fn brute(s: &Search, a: usize, r: usize, g: usize) -> f64 {
        let last = s.cuts.len() - 1;
        let mut best = s.seconds(r, a, last).unwrap_or(f64::INFINITY);
        if g > 1 {
            for b in a + 1..last {
                for m in 1..r {
                    if m % s.unit == 0 {
                        let t = s.seconds(m, a, b).unwrap_or(f64::INFINITY);
                        best = best.min(t.max(brute(s, b, r - m, g - 1)));
                    }
                }
            }
        }
        best
    }

    #[test]
    fn the_split_is_the_best_of_every_split_by_brute_force() {
        let p = planner();
        let mut s = p.tables(&batch()).expect("a batch");
        assert!(s.cuts.len() >= 4, "{:?}", s.cuts);
        for g in 1..=3 {
            for a in 0..s.cuts.len() - 1 {
                for r in 1..=8 {
                    let want = brute(&s, a, r, g);
                    let got = s.split(a, r, g);
                    assert_eq!(
                        got.as_ref().map_or(f64::INFINITY, |x| x.0),
                        want,
                        "{g} groups from cut {a} on {r}: {got:?}"
                    );
                    if let Some((_, groups)) = got {
                        assert!(groups.len() <= g);
                        assert_eq!(groups.iter().map(|&(_, m)| m).sum::<usize>(), r);
                    }
                }
            }
        }
        // More groups never slower by the objective.
        let two = s.split(0, 8, 2).expect("a split").0;
        assert!(s.split(0, 8, 3).expect("a split").0 <= two);
    }

    #[test]
    fn the_plan_holds_every_sequence_and_is_no_slower_than_two_groups() {
        let p = planner();
        let lens = batch();
        let (plan, est) = p
            .concurrent_groups(&lens, MAX_GROUPS)
            .expect("planned")
            .expect("a plan");
        assert!(plan.is_concurrent(), "{plan}");
        assert!(lens.iter().all(|&l| plan.bucket_of(l).is_some()), "{plan}");
        let (_, two) = p.concurrent(&lens).expect("planned").expect("a plan");
        assert!(
            est.seconds <= two.seconds,
            "{plan}: {} vs {}",
            est.seconds,
            two.seconds
        );
        // The estimate is the plan's own.
        assert_eq!(
            p.evaluate(&plan, &lens).expect("estimated").seconds,
            est.seconds
        );
    }
}
