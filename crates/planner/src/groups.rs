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

/// How many two-group splits [`Planner::concurrent`] estimates whole.
const SHORTLIST: usize = 4;

/// The search over one sorted batch: where it may be cut, and every group's fastest strategy on
/// a size over a range of the sorted lengths, weighed when the search first asks for it.
struct Search<'p> {
    planner: &'p Planner,
    /// The batch's lengths, ascending.
    sorted: Vec<usize>,
    /// `cuts[i]`: where range `i` of the sorted lengths starts (strictly increasing, from 0 to
    /// the batch's size): at every power of two between the batch's lengths, or
    /// ([`Search::coarsen`]) every few of them.
    cuts: Vec<usize>,
    /// `bounds[i]`: the upper length bound of a range ending at cut `i` (`usize::MAX` for the
    /// last).
    bounds: Vec<usize>,
    /// The devices of a group other than the last: multiples of this.
    unit: usize,
    /// `least[i]`: the device-seconds the first `i` sorted sequences take at the least
    /// ([`CostModel::least_device_seconds`](crate::CostModel::least_device_seconds), summed).
    least: Vec<f64>,
    /// `best[(devices, first sequence, end)]` (positions in `sorted`), for the groups weighed
    /// so far: shared by the searches over fine and coarse cuts.
    best: HashMap<(usize, usize, usize), Best>,
    /// The best splits found, by `(from cut, devices, groups)`, over the current cuts.
    memo: HashMap<(usize, usize, usize), Option<Split>>,
}

impl<'p> Search<'p> {
    /// The search over `lens` at every power of two between its lengths; `None` for an empty
    /// batch.
    fn new(planner: &'p Planner, lens: &[usize]) -> Option<Self> {
        let n = planner.cost.cluster.devices();
        let mut sorted = lens.to_vec();
        sorted.sort_unstable();
        let &longest = sorted.last()?;
        // Groups of whole nodes where there are several, else any split of the node; beyond
        // 16 nodes, of whole sixteenths of the nodes (at 1,024 GPUs 15 splits, not 127).
        let per = planner.cost.cluster.devices_per_node.max(1);
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
        cuts.push(sorted.len());
        bounds.push(usize::MAX);
        let mut least = vec![0.0];
        for &l in &sorted {
            let sum = least[least.len() - 1] + planner.cost.least_device_seconds(l);
            least.push(sum);
        }
        Some(Search {
            planner,
            sorted,
            cuts,
            bounds,
            unit,
            least,
            best: HashMap::new(),
            memo: HashMap::new(),
        })
    }

    /// At most [`MAX_RANGES`] ranges: every few powers of two where the batch spans more (the
    /// split's search grows with the square of the ranges). The groups weighed are kept.
    fn coarsen(&mut self) {
        let inner = self.cuts.len() - 2;
        if inner >= MAX_RANGES {
            let every = inner.div_ceil(MAX_RANGES - 1);
            let keep: Vec<usize> = (0..self.cuts.len())
                .filter(|&i| i == 0 || i == inner + 1 || i % every == 0)
                .collect();
            self.cuts = keep.iter().map(|&i| self.cuts[i]).collect();
            self.bounds = keep.iter().map(|&i| self.bounds[i]).collect();
            self.memo.clear();
        }
    }

    /// No group of `m` devices runs the ranges from cut `a` to cut `b` faster than this.
    fn lower(&self, m: usize, a: usize, b: usize) -> f64 {
        (self.least[self.cuts[b]] - self.least[self.cuts[a]]) / m.max(1) as f64
    }

    /// The fastest candidate on `m` devices for the ranges from cut `a` to cut `b`, weighed on
    /// every core the first time it is asked for (the first of equally fast candidates in
    /// [`Planner::candidates_on`]'s order).
    fn best_of(&mut self, m: usize, a: usize, b: usize) -> &Best {
        let (planner, sorted) = (self.planner, &self.sorted);
        let (from, to) = (self.cuts[a], self.cuts[b]);
        self.best.entry((m, from, to)).or_insert_with(|| {
            let group = &sorted[from..to];
            let top = group.last().copied().unwrap_or(0);
            planner
                .candidates_on(m, top)
                .into_par_iter()
                .enumerate()
                .map(|(i, s)| {
                    let cost = &planner.cost;
                    let t = cost.strategy(&s, group, cost.capacity(&s, &s)).total();
                    (i, s, t)
                })
                .min_by(|x, y| x.2.total_cmp(&y.2).then(x.0.cmp(&y.0)))
                .map(|(_, s, t)| (s, t))
        })
    }

    fn seconds(&mut self, m: usize, a: usize, b: usize) -> Option<f64> {
        self.best_of(m, a, b).as_ref().map(|(_, t)| *t)
    }

    /// The best split of the ranges from cut `a` on over `r` devices into at most `g` groups,
    /// by the slowest group's own time. A first group, or the rest after it, whose lower bound
    /// ([`Search::lower`]: a group is no faster than its sequences' least work shared evenly,
    /// and the rest's slowest group no faster than all of theirs) is no better than the best
    /// split found so far is not weighed: the result is the same as weighing every one.
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
                    let best = out.as_ref().map(|(t, _)| *t);
                    if let Some(better) = self.split_at(a, b, m, r, g, best) {
                        out = Some(better);
                    }
                    m += self.unit;
                }
            }
        }
        self.memo.insert((a, r, g), out.clone());
        out
    }

    /// The split of the ranges from cut `a` on over `r` devices into at most `g` groups whose
    /// first group takes the ranges up to cut `b` on `m` devices, where it is faster than
    /// `best`; not weighed where a lower bound already says it is not.
    fn split_at(
        &mut self,
        a: usize,
        b: usize,
        m: usize,
        r: usize,
        g: usize,
        best: Option<f64>,
    ) -> Option<Split> {
        let beaten = |t: f64| best.is_some_and(|best| t >= best);
        let last = self.cuts.len() - 1;
        if beaten(self.lower(m, a, b).max(self.lower(r - m, b, last))) {
            return None;
        }
        let t = self.seconds(m, a, b).filter(|&t| !beaten(t))?;
        let (rest, mut groups) = self.split(b, r - m, g - 1)?;
        let worst = t.max(rest);
        if beaten(worst) {
            return None;
        }
        groups.insert(0, (b, m));
        Some((worst, groups))
    }

    /// The `keep` best splits of all the devices into two groups at one cut, by the slower
    /// group's own time (ties in the order of the first group's size, then the cut), pruned
    /// by the lower bounds as [`Search::split`] is: `(seconds, cut, first group's devices)`.
    fn two_groups(&mut self, keep: usize) -> Vec<(f64, usize, usize)> {
        let n = self.planner.cost.cluster.devices();
        let last = self.cuts.len() - 1;
        let mut out: Vec<(f64, usize, usize)> = Vec::new();
        let worst = |out: &Vec<(f64, usize, usize)>| {
            if out.len() < keep {
                f64::INFINITY
            } else {
                out[out.len() - 1].0
            }
        };
        let mut m = self.unit;
        while m < n {
            for b in 1..last {
                let bound = self.lower(m, 0, b).max(self.lower(n - m, b, last));
                if bound >= worst(&out) {
                    continue;
                }
                let Some(t) = self.seconds(m, 0, b).filter(|&t| t < worst(&out)) else {
                    continue;
                };
                let Some(rest) = self.seconds(n - m, b, last) else {
                    continue;
                };
                let t = t.max(rest);
                if t < worst(&out) {
                    let at = out.partition_point(|x| x.0 <= t);
                    out.insert(at, (t, b, m));
                    out.truncate(keep);
                }
            }
            m += self.unit;
        }
        out
    }

    /// [`Search::two_groups`]' [`SHORTLIST`] as plans.
    fn shortlist(&mut self) -> Vec<Plan> {
        let n = self.planner.cost.cluster.devices();
        self.two_groups(SHORTLIST)
            .into_iter()
            .filter_map(|(_, b, m)| self.plan(&[(b, m), (self.cuts.len() - 1, n - m)], n))
            .collect()
    }

    /// The plan of `groups` (upper cut, devices), each under its fastest strategy.
    fn plan(&mut self, groups: &[(usize, usize)], devices: usize) -> Option<Plan> {
        let mut from = 0;
        let mut spec = Vec::new();
        for &(to, m) in groups {
            let (s, _) = self.best_of(m, from, to).clone()?;
            spec.push(vec![(self.bounds[to], s)]);
            from = to;
        }
        Plan::concurrent(spec, devices).ok()
    }
}

impl Planner {
    /// The best plan of two groups of devices running at the same time (per step, as
    /// Hydraulis and FlexSP plan): the sequences up to an edge on the first `k` devices under
    /// one strategy, the rest on the other `n − k` under another. Searched over `k` (whole
    /// nodes where there are several, in steps of a sixteenth of the nodes beyond 16 of them,
    /// else any share of the node), the edges (powers of two between the batch's lengths)
    /// and every candidate strategy of each group on its own share, a split whose lower bound
    /// cannot make the shortlist not weighed; the few best by their groups' own time are then
    /// estimated whole ([`Planner::evaluate`]: switches and the instantiation included).
    /// `None` where no split holds the batch.
    pub fn concurrent(&self, lens: &[usize]) -> Result<Option<(Plan, Estimate)>> {
        let Some(mut search) = Search::new(self, lens) else {
            return Ok(None);
        };
        Ok(self.fastest_of(search.shortlist(), lens))
    }

    /// The best concurrent plan of at most `max_groups` groups of devices for `lens`. Searched
    /// exactly by dynamic programming over where the sorted lengths are cut (at powers of two
    /// between the batch's lengths, every few of them where that would make more than 10
    /// ranges) and how many devices each group gets (as [`Planner::concurrent`]; the last
    /// group takes the rest), the objective the slowest group's own time, pruned by lower
    /// bounds (a group is no faster than its sequences' least work shared evenly over its
    /// devices) without changing the result; the best split of every group count up to
    /// `max_groups` is then estimated whole ([`Planner::evaluate`]: the switches in and home
    /// and the update included) beside [`Planner::concurrent`]'s shortlist of two-group
    /// splits (weighed on the same tables), and the fastest returned. `None` where no split
    /// holds the batch.
    pub fn concurrent_groups(
        &self,
        lens: &[usize],
        max_groups: usize,
    ) -> Result<Option<(Plan, Estimate)>> {
        let n = self.cost.cluster.devices();
        let Some(mut search) = Search::new(self, lens) else {
            return Ok(None);
        };
        let mut plans = search.shortlist();
        search.coarsen();
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
        Ok(self.fastest_of(plans, lens))
    }

    /// The fastest of `plans` estimated whole, on every core (the first of equally fast ones).
    fn fastest_of(&self, plans: Vec<Plan>, lens: &[usize]) -> Option<(Plan, Estimate)> {
        let estimates: Vec<_> = plans
            .into_par_iter()
            .map(|plan| self.evaluate(&plan, lens).map(|est| (plan, est)))
            .collect();
        let mut best: Option<(Plan, Estimate)> = None;
        for (plan, est) in estimates.into_iter().flatten() {
            if best.as_ref().is_none_or(|(_, b)| est.seconds < b.seconds) {
                best = Some((plan, est));
            }
        }
        best
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
    fn brute(s: &mut Search, a: usize, r: usize, g: usize) -> f64 {
        let last = s.cuts.len() - 1;
        let mut best = s.seconds(r, a, last).unwrap_or(f64::INFINITY);
        if g > 1 {
            for b in a + 1..last {
                for m in 1..r {
                    if m % s.unit == 0 {
                        let t = s.seconds(m, a, b).unwrap_or(f64::INFINITY);
                        let rest = brute(s, b, r - m, g - 1);
                        best = best.min(t.max(rest));
                    }
                }
            }
        }
        best
    }

    #[test]
    fn the_split_is_the_best_of_every_split_by_brute_force() {
        let p = planner();
        let mut s = Search::new(&p, &batch()).expect("a batch");
        s.coarsen();
        assert!(s.cuts.len() >= 4, "{:?}", s.cuts);
        for g in 1..=3 {
            for a in 0..s.cuts.len() - 1 {
                for r in 1..=8 {
                    // The pruned search first, on a table it fills itself.
                    let got = s.split(a, r, g);
                    let want = brute(&mut s, a, r, g);
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
    fn no_candidate_runs_a_range_faster_than_its_lower_bound() {
        let p = planner();
        let s = Search::new(&p, &batch()).expect("a batch");
        let last = s.cuts.len() - 1;
        let mut checked = 0;
        for m in [1, 2, 4, 8] {
            for a in 0..last {
                for b in a + 1..=last {
                    let group = &s.sorted[s.cuts[a]..s.cuts[b]];
                    let top = *group.last().expect("a range holds sequences");
                    for c in p.candidates_on(m, top) {
                        let t = p.cost.strategy(&c, group, p.cost.capacity(&c, &c)).total();
                        let bound = s.lower(m, a, b);
                        assert!(bound > 0.0 && t >= bound, "{c} on {group:?}: {t} < {bound}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100, "{checked}");
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
