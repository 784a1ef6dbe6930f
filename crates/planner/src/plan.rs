//! Step plans: which strategy trains which lengths, their estimated time (switches from the
//! switch planner's actual plans), the best static strategy, and the automatic plan (dynamic
//! programming over bucket edges).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use graph::{Strategy, Zero};
use rayon::prelude::*;
use serde::Serialize;
use switch::{traffic, Method, Topology};

use crate::cost::{instantiation, Breakdown, CostModel};
use crate::error::{PlanError, Result};

/// A step plan — the hot-switching schedule a run follows: buckets `(longest length, strategy)`
/// in ascending order, and the instantiation strategy that holds the master weights and the
/// optimizer. An edge of `usize::MAX` (written `max`) takes any length.
///
/// A concurrent plan (`dp2:64 | tp2:max`) splits the devices into groups that run at the same
/// time: each bucket's strategy runs on its group's devices (`offsets`), a group may switch
/// between several strategies (`dp2:64,tp2:512 | cp2:max`), and the instantiation strategy
/// spans every device.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// `(upper edge, strategy)`: a sequence goes to the first bucket whose edge holds it.
    pub buckets: Vec<(usize, Strategy)>,
    /// Holds the weights and runs the update.
    pub inst: Strategy,
    /// The first device of every bucket's strategy, one per bucket: all 0 unless the plan is
    /// concurrent, where a group's strategies run on devices `offset..offset + devices()`.
    pub offsets: Vec<usize>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .buckets
            .iter()
            .map(|(e, s)| {
                if *e == usize::MAX {
                    format!("{s}:max")
                } else {
                    format!("{s}:{e}")
                }
            })
            .collect();
        let mut text = String::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                text.push_str(if self.offset(i) != self.offset(i - 1) {
                    " | "
                } else {
                    ","
                });
            }
            text.push_str(part);
        }
        write!(f, "{text} (weights in {})", self.inst)
    }
}

impl Plan {
    /// One strategy for every length.
    pub fn single(s: Strategy) -> Self {
        Plan::new(vec![(usize::MAX, s.clone())], s)
    }

    /// A plan whose strategies all span every device (time-multiplexed).
    pub fn new(buckets: Vec<(usize, Strategy)>, inst: Strategy) -> Self {
        let offsets = vec![0; buckets.len()];
        Plan {
            buckets,
            inst,
            offsets,
        }
    }

    /// The first device of bucket `i`'s strategy (0 unless the plan is concurrent).
    pub fn offset(&self, i: usize) -> usize {
        self.offsets.get(i).copied().unwrap_or(0)
    }

    /// Whether the devices split into groups running at the same time.
    pub fn is_concurrent(&self) -> bool {
        self.buckets
            .iter()
            .enumerate()
            .any(|(i, (_, s))| s.devices() != self.inst.devices() || self.offset(i) != 0)
    }

    /// Every distinct `(strategy, first device)` the plan runs, in bucket order, then the
    /// instantiation strategy (on device 0) if no bucket runs it.
    pub fn members(&self) -> Vec<(Strategy, usize)> {
        let mut out: Vec<(Strategy, usize)> = Vec::new();
        let all = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, (_, s))| (s, self.offset(i)));
        for (s, o) in all.chain([(&self.inst, 0)]) {
            if !out.iter().any(|(x, y)| x == s && *y == o) {
                out.push((s.clone(), o));
            }
        }
        out
    }

    /// Parses a concurrent plan: groups separated by `|`, each a schedule as [`Plan::parse`]
    /// takes on as many devices as its strategies' degrees multiply to, the groups' devices
    /// adding up to `devices` and the length bounds increasing across the whole list (a
    /// sequence goes to the first bucket that holds it). The instantiation strategy is the
    /// least model state per device among the groups' own ones widened to every device by DP.
    fn parse_concurrent(spec: &str, devices: usize) -> Result<Self> {
        let bad = |m: String| PlanError::Invalid(m);
        let mut groups = Vec::new();
        for (g, group) in spec.split('|').map(str::trim).enumerate() {
            let first = group
                .split(',')
                .next()
                .and_then(|p| p.split_once(':'))
                .map(|(s, _)| s)
                .ok_or_else(|| {
                    bad(format!(
                        "concurrent group {} (`{group}`) is not STRATEGY:MAXLEN,…",
                        g + 1
                    ))
                })?;
            let n = Strategy::parse_own(first)
                .map_err(|e| bad(e.to_string()))?
                .devices();
            let sub = Plan::parse(group, n)
                .map_err(|e| bad(format!("concurrent group {} (`{group}`): {e}", g + 1)))?;
            groups.push(sub.buckets);
        }
        Self::concurrent(groups, devices)
    }

    /// A concurrent plan of `groups` (each a list of `(upper edge, strategy)` on as many
    /// devices as its strategies' degrees multiply to, the groups one after another from
    /// device 0) on `devices`: the groups' devices must add up to `devices` and the bounds
    /// increase across the whole list (a sequence goes to the first bucket that holds it). The
    /// instantiation strategy is the least model state per device among the groups' own ones
    /// widened to every device by DP (CP folded into DP: the optimizer needs no sequence
    /// split; recomputation dropped: the holder runs no pass), or DP over every device with
    /// the optimizer's state sharded (ZeRO-1) where no group's devices divide them.
    pub fn concurrent(groups: Vec<Vec<(usize, Strategy)>>, devices: usize) -> Result<Self> {
        let bad = |m: String| PlanError::Invalid(m);
        let bound = |e: usize| {
            if e == usize::MAX {
                "max".to_string()
            } else {
                e.to_string()
            }
        };
        let (mut buckets, mut offsets, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (g, group) in groups.into_iter().enumerate() {
            let n = group.first().map_or(0, |(_, s)| s.devices());
            if n == 0 {
                return Err(bad(format!("concurrent group {} is empty", g + 1)));
            }
            let all: Vec<&Strategy> = group.iter().map(|(_, s)| s).collect();
            let own = all[instantiation(&all)].clone();
            for (e, s) in group {
                if s.devices() != n {
                    return Err(bad(format!(
                        "concurrent group {}: {s} runs on {} devices, the group's first strategy on {n}",
                        g + 1,
                        s.devices()
                    )));
                }
                if let Some(&(prev, _)) = buckets.last() {
                    if e <= prev {
                        return Err(bad(format!(
                            "concurrent group {}: length bounds must increase across the groups \
                             ({} then {}): a sequence goes to the first bucket that holds it",
                            g + 1,
                            bound(prev),
                            bound(e),
                        )));
                    }
                }
                buckets.push((e, s));
                offsets.push(offset);
            }
            if devices.is_multiple_of(n) {
                let mut w = own;
                w.dp *= w.cp * devices / n;
                w.cp = 1;
                w.cp_exchange = Default::default();
                // The weights' holder runs no pass: recomputation is the group's own.
                w.recompute = graph::Recompute::None;
                wide.push(w);
            }
            offset += n;
        }
        if offset != devices {
            return Err(bad(format!(
                "the concurrent groups take {offset} devices, the run has {devices}"
            )));
        }
        if wide.is_empty() {
            // No group's strategy widens to the run: the weights are held over DP, the
            // optimizer's state sharded (ZeRO-1) so that a large model still fits.
            let spec = if devices > 1 {
                format!("dp{devices}zero1")
            } else {
                "dp1".to_string()
            };
            wide.push(Strategy::parse(&spec, devices).map_err(|e| bad(e.to_string()))?);
        }
        let all: Vec<&Strategy> = wide.iter().collect();
        let inst = all[instantiation(&all)].clone();
        Ok(Plan {
            buckets,
            inst,
            offsets,
        })
    }

    /// Parses `STRATEGY:MAXLEN,…` (MAXLEN ascending, the last may be `max`) for `devices`,
    /// e.g. `dp4:64,dp2tp2:256,tp4:max`; the instantiation strategy is [`instantiation`]'s
    /// choice among them.
    pub fn parse(spec: &str, devices: usize) -> Result<Self> {
        if spec.contains('|') {
            return Self::parse_concurrent(spec, devices);
        }
        let bad = |m: String| PlanError::Invalid(m);
        let mut buckets: Vec<(usize, Strategy)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (s, m) = part.split_once(':').ok_or_else(|| {
                bad(format!(
                    "`{part}` is not STRATEGY:MAXLEN (e.g. dp4:512 or tp4:max)"
                ))
            })?;
            let strategy = Strategy::parse(s, devices).map_err(|e| bad(e.to_string()))?;
            let max = match m {
                "max" => usize::MAX,
                n => n
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{n}` is neither a length nor `max`")))?,
            };
            if max < 2 {
                return Err(bad(format!(
                    "`{part}`: a bucket of sequences up to {max} tokens stays empty (every \
                     sequence has at least 2 tokens)"
                )));
            }
            if let Some(&(prev, _)) = buckets.last() {
                if prev == usize::MAX {
                    return Err(bad("only the last strategy may be `max`".into()));
                }
                if max <= prev {
                    return Err(bad(format!("lengths must increase ({prev} then {m})")));
                }
            }
            buckets.push((max, strategy));
        }
        if buckets.is_empty() {
            return Err(bad("the list of strategies is empty".into()));
        }
        let all: Vec<&Strategy> = buckets.iter().map(|(_, s)| s).collect();
        let inst = all[instantiation(&all)].clone();
        Ok(Plan::new(buckets, inst))
    }

    /// The distinct strategies the plan runs, in bucket order, then the instantiation
    /// strategy if no bucket uses it.
    pub fn strategies(&self) -> Vec<&Strategy> {
        let mut out: Vec<&Strategy> = Vec::new();
        for s in self.buckets.iter().map(|(_, s)| s).chain([&self.inst]) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// The bucket a sequence of `len` tokens goes to (`None` beyond every edge).
    pub fn bucket_of(&self, len: usize) -> Option<usize> {
        let bounds: Vec<Option<usize>> = self
            .buckets
            .iter()
            .map(|&(e, _)| (e != usize::MAX).then_some(e))
            .collect();
        data::packing::bucket_of(len, &bounds)
    }

    /// The sequences (indices) of every bucket, for sequences of `lens`; an error names a
    /// sequence beyond every edge.
    pub fn bucket(&self, lens: impl IntoIterator<Item = usize>) -> Result<Vec<Vec<usize>>> {
        let mut out = vec![Vec::new(); self.buckets.len()];
        for (i, l) in lens.into_iter().enumerate() {
            let b = self.bucket_of(l).ok_or_else(|| {
                PlanError::Invalid(format!("a sequence of {l} tokens is beyond every bucket"))
            })?;
            out[b].push(i);
        }
        Ok(out)
    }
}

/// The lengths of `lens` in each of `plan`'s buckets.
fn bucket_lengths(plan: &Plan, lens: &[usize]) -> Result<Vec<Vec<usize>>> {
    Ok(plan
        .bucket(lens.iter().copied())?
        .into_iter()
        .map(|b| b.into_iter().map(|k| lens[k]).collect())
        .collect())
}

/// A plan's estimate for one global batch.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// The plan.
    pub plan: String,
    /// Step time by component, seconds.
    pub breakdown: Breakdown,
    /// Step time, seconds.
    pub seconds: f64,
    /// Tokens of the batch over the step time.
    pub tokens_per_s: f64,
    /// The largest memory per device of any strategy used (states + activations), bytes.
    pub memory_bytes: f64,
    /// Sequences per bucket.
    pub sequences: Vec<usize>,
}

/// A switch as the planner prices it.
#[derive(Debug, Default)]
struct SwitchCost {
    seconds: f64,
    moved: usize,
    /// Its fused messages: `(sender, receiver, elements, across nodes)`.
    messages: Vec<(usize, usize, usize, bool)>,
}

/// The cost model with a cache of switch times.
pub struct Planner {
    /// The cost model.
    pub cost: CostModel,
    /// Whether the candidates include context parallelism (CP degree, ring or Ulysses) and
    /// activation recomputation (default: no, HotSPa's DP × TP × PP space).
    pub context: bool,
    switches: Mutex<HashMap<(String, String), Arc<SwitchCost>>>,
}

impl Planner {
    /// A planner over `cost`.
    pub fn new(cost: CostModel) -> Self {
        Self {
            cost,
            context: false,
            switches: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds to move the parameters (bf16) from `a`'s layout to `b`'s, from the switch
    /// planner's exact plan: per link class the most any device sends or receives over its
    /// bandwidth, plus one latency per message; the classes run concurrently.
    pub fn switch_seconds(&self, a: &Strategy, b: &Strategy) -> Result<f64> {
        Ok(self.switch_plan(a, b)?.0)
    }

    /// A switch's seconds (as [`Planner::switch_seconds`]) and the elements it moves, from the
    /// switch planner's exact plan, cached.
    fn switch_plan(&self, a: &Strategy, b: &Strategy) -> Result<(f64, usize)> {
        self.switch_plan_at((a, 0), (b, 0))
    }

    /// [`Planner::switch_plan`] between strategies on devices from the given offsets (a
    /// concurrent group's).
    fn switch_plan_at(&self, a: (&Strategy, usize), b: (&Strategy, usize)) -> Result<(f64, usize)> {
        let c = self.switch_cost(a, b)?;
        Ok((c.seconds, c.moved))
    }

    /// A switch's load per device and link class, its messages per sending device, its
    /// seconds ([`Planner::load_seconds`]) and the elements it moves, cached.
    fn switch_cost(
        &self,
        (a, oa): (&Strategy, usize),
        (b, ob): (&Strategy, usize),
    ) -> Result<Arc<SwitchCost>> {
        if a == b && oa == ob {
            return Ok(Arc::new(SwitchCost::default()));
        }
        let key = (format!("{a}@{oa}"), format!("{b}@{ob}"));
        if let Some(t) = self
            .switches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(t.clone());
        }
        let err = |e: String| PlanError::Switch(format!("{a} -> {b}: {e}"));
        let tensors = model::switch_tensors_at(&self.cost.cfg, (a, oa), (b, ob))
            .map_err(|e| err(e.to_string()))?;
        let c = &self.cost.cluster;
        let p = traffic(&tensors, Topology::new(c.devices_per_node), Method::Exact)
            .map_err(|e| err(e.to_string()))?;
        let per_device = p.pairs.len() as f64 / a.devices().max(1) as f64;
        let node = |d: usize| d / c.devices_per_node.max(1);
        let messages = p
            .pairs
            .iter()
            .map(|&(f, t, n)| (f.0, t.0, n, node(f.0) != node(t.0)))
            .collect();
        let out = Arc::new(SwitchCost {
            seconds: self.load_seconds(&p.load, per_device),
            moved: p.moved,
            messages,
        });
        self.switches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, out.clone());
        Ok(out)
    }

    /// Seconds of a load of transfers: per link class the most any device sends or receives
    /// over its bandwidth plus `messages` latencies; the classes run concurrently.
    fn load_seconds(&self, load: &switch::Load, messages: f64) -> f64 {
        let c = &self.cost.cluster;
        switch::LinkClass::ALL
            .iter()
            .map(|&class| {
                let link = match class {
                    switch::LinkClass::SameNode => c.same_node,
                    switch::LinkClass::CrossNode => c.cross_node,
                };
                let bytes = load.cost(class) as f64 * c.elem_bytes;
                if bytes > 0.0 {
                    link.seconds(bytes, messages)
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max)
    }

    /// Moves the devices' clocks `t` through `set`, switches run one after another as the
    /// runtime runs them (one batched exchange per device and switch, as the simulator's clock
    /// times it): a device involved in a switch is done when it has pushed and taken its bytes
    /// through its links (each class at once) and every message for it has arrived — a
    /// message leaves when its sender reaches the switch. Devices wait only for their own
    /// messages, so switches whose devices differ overlap.
    fn run_switches(&self, t: &mut [f64], set: &[Arc<SwitchCost>]) {
        let c = &self.cost.cluster;
        let link = |cross: bool| if cross { c.cross_node } else { c.same_node };
        for sw in set {
            let before = t.to_vec();
            // Elements each device sends and receives per class: [same node, cross node].
            let mut sent: HashMap<usize, [usize; 2]> = HashMap::new();
            let mut recv: HashMap<usize, [usize; 2]> = HashMap::new();
            let mut arrivals: HashMap<usize, f64> = HashMap::new();
            for &(from, to, n, cross) in &sw.messages {
                sent.entry(from).or_default()[usize::from(cross)] += n;
                recv.entry(to).or_default()[usize::from(cross)] += n;
                let at = before.get(from).copied().unwrap_or(0.0)
                    + link(cross).seconds(n as f64 * c.elem_bytes, 1.0);
                let a = arrivals.entry(to).or_insert(f64::NEG_INFINITY);
                *a = a.max(at);
            }
            let devices: std::collections::BTreeSet<usize> =
                sent.keys().chain(recv.keys()).copied().collect();
            for d in devices {
                let (s, r) = (
                    sent.get(&d).copied().unwrap_or_default(),
                    recv.get(&d).copied().unwrap_or_default(),
                );
                let own = [false, true]
                    .iter()
                    .map(|&cross| {
                        let k = usize::from(cross);
                        let n = s[k].max(r[k]);
                        if n == 0 {
                            0.0
                        } else {
                            link(cross).seconds(n as f64 * c.elem_bytes, 1.0)
                        }
                    })
                    .fold(0.0, f64::max);
                if let Some(slot) = t.get_mut(d) {
                    let arrived = arrivals.get(&d).copied().unwrap_or(f64::NEG_INFINITY);
                    *slot = (before[d] + own).max(arrived);
                }
            }
        }
    }

    /// How many tokens a micro-batch of `s` holds beside `inst`'s state; an error when the
    /// bucket `g` has a longer sequence.
    fn holding(&self, s: &Strategy, inst: &Strategy, g: &[usize]) -> Result<usize> {
        let cap = self.cost.capacity(s, inst);
        let longest = g.iter().copied().max().unwrap_or(0);
        if longest > cap {
            return Err(PlanError::Invalid(format!(
                "{s} holds at most {cap} tokens per micro-batch, the bucket has a sequence of {longest}"
            )));
        }
        Ok(cap)
    }

    /// A plan's estimate from its step's breakdown (the update and the step's synchronisation
    /// added here) and its largest memory per device.
    fn finish(
        &self,
        plan: &Plan,
        lens: &[usize],
        groups: &[Vec<usize>],
        mut total: Breakdown,
        memory: f64,
    ) -> Estimate {
        // By priority the update runs on the summing thread, inside `dp_reduce`.
        total.optimizer = if self.cost.by_priority(&plan.inst) {
            0.0
        } else {
            self.cost.optimizer(&plan.inst)
        };
        total.sync = self.cost.step_sync(&plan.inst, plan.inst.devices());
        let seconds = total.total();
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        Estimate {
            plan: plan.to_string(),
            breakdown: total,
            seconds,
            tokens_per_s: tokens / seconds,
            memory_bytes: memory,
            sequences: groups.iter().map(Vec::len).collect(),
        }
    }

    /// The estimate of `plan` on the global batch `lens`.
    pub fn evaluate(&self, plan: &Plan, lens: &[usize]) -> Result<Estimate> {
        if plan.is_concurrent() {
            return self.evaluate_concurrent(plan, lens);
        }
        let groups = bucket_lengths(plan, lens)?;
        let mut total = Breakdown::default();
        let mut memory: f64 = 0.0;
        let mut used: Vec<&Strategy> = Vec::new();
        for ((_, s), g) in plan.buckets.iter().zip(&groups) {
            if g.is_empty() {
                continue;
            }
            let cap = self.holding(s, &plan.inst, g)?;
            total.add(&self.cost.strategy(s, g, cap));
            let tokens = cap.min(g.iter().sum());
            memory = memory.max(self.cost.memory(s, &plan.inst, tokens).total());
            if !used.contains(&s) {
                used.push(s);
            }
        }
        // The switches the runtime makes: the order and gradient route with the fewest
        // elements (members: the instantiation strategy first, then the buckets' strategies).
        let mut members: Vec<&Strategy> = vec![&plan.inst];
        for s in used {
            if !members.contains(&s) {
                members.push(s);
            }
        }
        let todo: Vec<usize> = (0..groups.len())
            .filter(|&b| !groups[b].is_empty())
            .collect();
        let member_of = |b: usize| {
            members
                .iter()
                .position(|m| **m == plan.buckets[b].1)
                .unwrap_or(0)
        };
        let mut moved = vec![vec![0usize; members.len()]; members.len()];
        for (a, x) in members.iter().enumerate() {
            for (b, y) in members.iter().enumerate() {
                if a != b {
                    moved[a][b] = self.switch_plan(x, y)?.1;
                }
            }
        }
        let r = crate::route::route(&todo, &member_of, 0, &|a, b| moved[a][b]);
        for (a, b) in r.switches {
            total.switch += self.switch_seconds(members[a], members[b])?;
        }
        Ok(self.finish(plan, lens, &groups, total, memory))
    }

    /// The estimate of a concurrent plan, as the runtime runs its step: the parameters switch
    /// from the instantiation's layout to every strategy with sequences; the groups run their
    /// buckets at the same time (the slowest group's time and its breakdown); every bucket's
    /// gradients switch home; then the update. Each device's clock runs through the switches
    /// as the runtime's batched exchanges run them ([`Planner::run_switches`]): a device waits
    /// only for its own messages, so a group's gradients may travel home while another group
    /// still computes. A group's
    /// strategy is priced as if its devices began a node (its links as on devices
    /// `0..n`): a group that straddles nodes is priced optimistically.
    fn evaluate_concurrent(&self, plan: &Plan, lens: &[usize]) -> Result<Estimate> {
        let groups = bucket_lengths(plan, lens)?;
        let mut per_group: Vec<(usize, Breakdown)> = Vec::new();
        let mut memory: f64 = 0.0;
        let mut members: Vec<(&Strategy, usize)> = Vec::new();
        let mut home = Vec::new();
        for (b, ((_, s), g)) in plan.buckets.iter().zip(&groups).enumerate() {
            if g.is_empty() {
                continue;
            }
            let offset = plan.offset(b);
            let cap = self.holding(s, &plan.inst, g)?;
            let time = self.cost.strategy(s, g, cap);
            match per_group.iter_mut().find(|(o, _)| *o == offset) {
                Some((_, t)) => t.add(&time),
                None => per_group.push((offset, time)),
            }
            let tokens = cap.min(g.iter().sum());
            memory = memory.max(self.cost.memory(s, &plan.inst, tokens).total());
            if !members.contains(&(s, offset)) {
                members.push((s, offset));
            }
            home.push(self.switch_cost((s, offset), (&plan.inst, 0))?);
        }
        // Each device's clock through the step: the switches in, its group's buckets, the
        // switches home.
        let out = members
            .iter()
            .map(|&m| self.switch_cost((&plan.inst, 0), m))
            .collect::<Result<Vec<_>>>()?;
        let mut t = vec![0.0; plan.inst.devices()];
        self.run_switches(&mut t, &out);
        for (offset, time) in &per_group {
            let n = plan
                .buckets
                .iter()
                .enumerate()
                .find(|&(b, _)| plan.offset(b) == *offset)
                .map_or(0, |(_, (_, s))| s.devices());
            for x in t.iter_mut().skip(*offset).take(n) {
                *x += time.total();
            }
        }
        self.run_switches(&mut t, &home);
        let end = t.iter().copied().fold(0.0, f64::max);
        let mut total = per_group
            .into_iter()
            .map(|(_, t)| t)
            .max_by(|a, b| a.total().total_cmp(&b.total()))
            .unwrap_or_default();
        // The switches: what the step takes beyond the slowest group's own time.
        total.switch = (end - total.total()).max(0.0);
        Ok(self.finish(plan, lens, &groups, total, memory))
    }

    /// Every strategy (SP with TP, the optimizer distributed over DP: ZeRO-1) over the cluster's devices
    /// that, holding its own master weights, takes at least `min_tokens` per micro-batch: TP a power of two dividing the heads and at most one node
    /// (or two), PP dividing the layers, at most 8 stages.
    pub fn candidates(&self, min_tokens: usize) -> Vec<Strategy> {
        self.candidates_on(self.cost.cluster.devices(), min_tokens)
    }

    /// [`Planner::candidates`] on `n` of the cluster's devices (a concurrent group's).
    pub fn candidates_on(&self, n: usize, min_tokens: usize) -> Vec<Strategy> {
        let c = &self.cost.cfg;
        let heads = c.num_attention_heads;
        let mut out = Vec::new();
        let mut tp = 1;
        while tp <= n && tp <= 2 * self.cost.cluster.devices_per_node && tp <= heads {
            if heads.is_multiple_of(tp) {
                for pp in 1..=8usize.min(n / tp) {
                    if !n.is_multiple_of(tp * pp) || !c.num_hidden_layers.is_multiple_of(pp) {
                        continue;
                    }
                    for s in self.variants(n, tp, pp) {
                        if self.cost.capacity(&s, &s) >= min_tokens {
                            out.push(s);
                        }
                    }
                }
            }
            tp *= 2;
        }
        out
    }

    /// The strategies on `n` devices with TP `tp` and PP `pp`: DP over the rest, ZeRO-1 where
    /// there are replicas; with [`Planner::context`] also every CP degree (a power of two up to
    /// 8) under the ring and, where the heads divide, Ulysses, each without and with selective
    /// and full recomputation.
    fn variants(&self, n: usize, tp: usize, pp: usize) -> Vec<Strategy> {
        let c = &self.cost.cfg;
        let make = |cp: usize, cp_exchange, recompute| {
            let dp = n / (tp * pp * cp);
            Strategy {
                dp,
                cp,
                cp_exchange,
                recompute,
                tp,
                pp,
                sp: tp > 1,
                zero: if dp * cp > 1 {
                    Zero::Optimizer
                } else {
                    Zero::Off
                },
            }
        };
        let ring = graph::CpExchange::Ring;
        if !self.context {
            return vec![make(1, ring, graph::Recompute::None)];
        }
        let (heads, kv) = (c.num_attention_heads / tp, (c.kv_heads() / tp).max(1));
        let mut out = Vec::new();
        let mut cp = 1;
        while cp <= 8 && (n / (tp * pp)).is_multiple_of(cp) {
            let mut exchanges = vec![ring];
            let ulysses =
                heads.is_multiple_of(cp) && (kv.is_multiple_of(cp) || cp.is_multiple_of(kv));
            if cp > 1 && ulysses {
                exchanges.push(graph::CpExchange::Ulysses);
            }
            for x in exchanges {
                for r in [
                    graph::Recompute::None,
                    graph::Recompute::Selective,
                    graph::Recompute::Full,
                ] {
                    out.push(make(cp, x, r));
                }
            }
            cp *= 2;
        }
        out
    }

    /// Whether `s` recomputes while the same strategy recomputing less (selective, or nothing)
    /// already holds sequences of `top` tokens.
    fn lighter_fits(&self, s: &Strategy, inst: &Strategy, top: usize) -> bool {
        let lighter: &[graph::Recompute] = match s.recompute {
            graph::Recompute::None => &[],
            graph::Recompute::Selective => &[graph::Recompute::None],
            graph::Recompute::Full => &[graph::Recompute::None, graph::Recompute::Selective],
        };
        lighter.iter().any(|&r| {
            let t = Strategy {
                recompute: r,
                ..s.clone()
            };
            self.cost.capacity(&t, inst) >= top
        })
    }

    /// The fastest single strategy for the batch (what a static system runs).
    pub fn best_static(&self, lens: &[usize]) -> Result<(Plan, Estimate)> {
        let longest = lens.iter().copied().max().unwrap_or(1);
        let mut found = Vec::new();
        for s in self.candidates(longest) {
            let p = Plan::new(vec![(longest, s.clone())], s);
            let e = self.evaluate(&p, lens)?;
            found.push((p, e));
        }
        self.fastest(found, longest)
    }

    /// The fastest of `found` (the first of equals), or where there is none, the refusal of a
    /// batch whose longest sequence (`longest` tokens) no strategy holds.
    fn fastest(
        &self,
        found: impl IntoIterator<Item = (Plan, Estimate)>,
        longest: usize,
    ) -> Result<(Plan, Estimate)> {
        let mut best: Option<(Plan, Estimate)> = None;
        for (p, e) in found {
            if best.as_ref().is_none_or(|(_, b)| e.seconds < b.seconds) {
                best = Some((p, e));
            }
        }
        best.ok_or_else(|| PlanError::TooLong {
            len: longest,
            longest: self.longest_any(),
            context: self.context,
        })
    }

    fn longest_any(&self) -> usize {
        self.candidates(1)
            .iter()
            .map(|s| self.cost.capacity(s, s))
            .max()
            .unwrap_or(0)
    }

    /// The automatic plan: bucket edges from a grid (powers of two and their 1.5×, from about a
    /// 64th of the longest sequence to it), a strategy per bucket, and the instantiation strategy, minimising
    /// the estimate by dynamic programming over the edges for every instantiation candidate.
    /// The search space holds every plan whose edges are on the grid, so the result is never
    /// slower, by this model, than such a hand-picked plan.
    pub fn auto(&self, lens: &[usize]) -> Result<(Plan, Estimate)> {
        self.auto_with(lens, None)
    }

    /// [`Planner::auto`] with the instantiation strategy fixed (a run keeps its optimizer in
    /// one layout).
    pub fn auto_with(&self, lens: &[usize], inst: Option<&Strategy>) -> Result<(Plan, Estimate)> {
        let longest = lens.iter().copied().max().unwrap_or(1);
        let mut edges = vec![0usize];
        // Powers of two from about a 64th of the longest (at least 2; 512 at 32K).
        let mut e = 2usize;
        while e * 2 <= (longest / 64).max(2) {
            e *= 2;
        }
        while e < longest {
            edges.push(e);
            if e * 3 / 2 < longest {
                edges.push(e * 3 / 2);
            }
            e *= 2;
        }
        edges.push(longest);
        edges.sort_unstable();
        edges.dedup();
        let mut cands = self.candidates(1);
        // A strategy with CP or recomputation holds the weights exactly as the same strategy
        // with DP in place of CP and without recomputation (the same replicas, the same state
        // bytes and placements), so those are the only instantiations worth trying.
        if inst.is_none() {
            cands.retain(|c| c.cp == 1 && c.recompute == graph::Recompute::None);
        }
        if let Some(i) = inst {
            cands.retain(|c| c == i);
            if cands.is_empty() {
                return Err(PlanError::Invalid(format!(
                    "{i} cannot hold the weights and the optimizer on these devices"
                )));
            }
        }
        if cands.is_empty() {
            return Err(PlanError::TooLong {
                len: longest,
                longest: 0,
                context: self.context,
            });
        }
        let mut sorted = lens.to_vec();
        sorted.sort_unstable();
        let range = |a: usize, b: usize| -> &[usize] {
            let lo = sorted.partition_point(|&l| l <= edges[a]);
            let hi = sorted.partition_point(|&l| l <= edges[b]);
            &sorted[lo..hi]
        };
        let ne = edges.len();
        // Every strategy that fits at all when another holds the master weights.
        let all = self.candidates(0);
        // A bucket's time under a strategy depends on the instantiation only through the
        // micro-batch budget it leaves: kept across instantiations by (strategy, edges, budget).
        let timed: Mutex<HashMap<(usize, usize, usize, usize), f64>> = Mutex::new(HashMap::new());
        // The instantiations are independent but for the caches they share: planned on every
        // core (their exact switch plans are most of the time at cluster scale), the best
        // taken in their order, so the result does not depend on the threads.
        let per_inst = |inst: &Strategy| -> Result<Option<(Plan, Estimate)>> {
            let mut best: Option<(Plan, Estimate)> = None;
            // (index into `all`, micro-batch budget) of each strategy that fits at all.
            let (runnable, caps): (Vec<usize>, Vec<usize>) = (0..all.len())
                .map(|i| (i, self.cost.capacity(&all[i], inst)))
                .filter(|&(_, cap)| cap > 0)
                .unzip();
            // Bucket times: (a, b, strategy) -> seconds (None: does not fit).
            let mut bucket = vec![vec![vec![None; runnable.len()]; ne]; ne];
            for (a, from) in bucket.iter_mut().enumerate() {
                for (b, times) in from.iter_mut().enumerate().skip(a + 1) {
                    let g = range(a, b);
                    let top = g.last().copied().unwrap_or(0);
                    for (k, &i) in runnable.iter().enumerate() {
                        let (s, cap) = (&all[i], caps[k]);
                        times[k] = if g.is_empty() {
                            Some(0.0)
                        } else if cap < top || self.lighter_fits(s, inst, top) {
                            // Recomputing only costs time where less of it holds the bucket.
                            None
                        } else {
                            let key = (i, a, b, cap);
                            let known = timed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&key)
                                .copied();
                            Some(known.unwrap_or_else(|| {
                                let t = self.cost.strategy(s, g, cap).total();
                                timed
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(key, t);
                                t
                            }))
                        };
                    }
                }
            }
            let cands: Vec<&Strategy> = runnable.iter().map(|&i| &all[i]).collect();
            // Switch times on demand: a strategy's is only wanted where its bucket time alone
            // could still improve on the best way found so far (switches cost ≥ 0), which
            // spares most exact switch plans at cluster scale.
            let mut sw: Vec<Option<f64>> = vec![None; cands.len()];
            // f[b] = (cost, previous edge, strategy) covering lengths up to edges[b].
            let mut f: Vec<Option<(f64, usize, usize)>> = vec![None; ne];
            f[0] = Some((0.0, 0, 0));
            for b in 1..ne {
                // Every way to end a bucket at edge b, cheapest before its switch first: once
                // that alone reaches the best so far, no later one can beat it.
                let mut ways: Vec<(f64, usize, usize)> = Vec::new();
                for a in 0..b {
                    let Some((base, _, _)) = f[a] else { continue };
                    for (k, t) in bucket[a][b].iter().enumerate() {
                        if let Some(t) = t {
                            ways.push((base + t, a, k));
                        }
                    }
                }
                ways.sort_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));
                for (without, a, k) in ways {
                    if f[b].is_some_and(|(x, _, _)| without >= x) {
                        break;
                    }
                    let switch = if range(a, b).is_empty() {
                        0.0
                    } else if let Some(x) = sw[k] {
                        x
                    } else {
                        let x = 2.0 * self.switch_seconds(inst, cands[k])?;
                        sw[k] = Some(x);
                        x
                    };
                    let c = without + switch;
                    if f[b].is_none_or(|(x, _, _)| c < x) {
                        f[b] = Some((c, a, k));
                    }
                }
            }
            let mut buckets = Vec::new();
            let mut b = ne - 1;
            while b > 0 {
                let Some((_, a, k)) = f[b] else { break };
                buckets.push((edges[b], (*cands[k]).clone()));
                b = a;
            }
            buckets.reverse();
            // Adjacent buckets of one strategy as one bucket, where that is not slower.
            let mut merged: Vec<(usize, Strategy)> = Vec::new();
            for (e, s) in &buckets {
                match merged.last_mut() {
                    Some((le, ls)) if ls == s => *le = *e,
                    _ => merged.push((*e, s.clone())),
                }
            }
            for buckets in [merged, buckets] {
                let p = Plan::new(buckets, inst.clone());
                let Ok(est) = self.evaluate(&p, lens) else {
                    continue;
                };
                if best.as_ref().is_none_or(|(_, b)| est.seconds < b.seconds) {
                    best = Some((p, est));
                }
            }
            Ok(best)
        };
        let found: Result<Vec<Option<(Plan, Estimate)>>> = cands.par_iter().map(per_inst).collect();
        self.fastest(found?.into_iter().flatten(), longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, Efficiency, Link};

    #[test]
    fn auto_buckets_balance_latencies_against_the_last_buckets_transfer() {
        let p = planner(8);
        let c = &p.cost;
        let dp8 = Strategy::parse("dp8", 8).unwrap();
        // By hand: G = 4 bytes × parameters, one node of 8 (the same-node link), √(G·α·n·β).
        let g = 4.0 * c.params();
        let l = c.cluster.same_node;
        let want = (g * l.latency_us * 1e-6 * 8.0 * l.gbps * 1e9).sqrt();
        assert_eq!(c.auto_bucket_bytes(&dp8), want as usize);
        // Cost at b: (G/b)·2(n−1)·α + 2(n−1)/n·b/β — least there, more at half and double.
        let cost = |b: f64| (g / b) * 14.0 * l.latency_us * 1e-6 + 14.0 / 8.0 * b / (l.gbps * 1e9);
        assert!(cost(want) < cost(want / 2.0) && cost(want) < cost(want * 2.0));
        // No DP group: the default.
        let tp8 = Strategy::parse("tp8", 8).unwrap();
        assert_eq!(c.auto_bucket_bytes(&tp8), 4 << 20);
    }

    #[test]
    fn concurrent_plans_parse_into_groups_of_devices() {
        let p = Plan::parse("dp2:64 | tp2:max", 4).unwrap();
        assert_eq!(p.offsets, [0, 2]);
        assert_eq!(p.buckets[0].1.to_string(), "dp2");
        assert_eq!(p.buckets[1].1.to_string(), "tp2");
        // dp2 widened is dp4 (a whole replica per device), tp2's is dp2tp2: less state.
        assert_eq!(p.inst.to_string(), "dp2tp2");
        assert!(p.is_concurrent());
        assert_eq!(p.to_string(), "dp2:64 | tp2:max (weights in dp2tp2)");
        assert_eq!(
            p.bucket([10, 64, 65, 900]).unwrap(),
            [vec![0, 1], vec![2, 3]]
        );
        let m: Vec<String> = p
            .members()
            .iter()
            .map(|(s, o)| format!("{s}@{o}"))
            .collect();
        assert_eq!(m, ["dp2@0", "tp2@2", "dp2tp2@0"]);
        // A group switching between two strategies beside one with CP (folded into DP for
        // the instantiation).
        let p = Plan::parse("dp2:64,tp2:512 | cp2:max", 4).unwrap();
        assert_eq!(p.offsets, [0, 0, 2]);
        assert_eq!(
            p.to_string(),
            "dp2:64,tp2:512 | cp2:max (weights in dp2tp2)"
        );
        // Recomputation is a group's, not the weights' holder's.
        let p = Plan::parse("dp2:64 | tp2+full:max", 4).unwrap();
        assert_eq!(p.to_string(), "dp2:64 | tp2+full:max (weights in dp2tp2)");
        let p = Plan::parse("dp4:100 | tp2pp2:max", 8).unwrap();
        assert_eq!(
            (p.offsets.clone(), p.inst.to_string()),
            (vec![0, 4], "dp2tp2pp2".into())
        );
        // No group widens to 5 devices: DP over them holds the weights, ZeRO-1 the optimizer.
        let p = Plan::parse("dp3:64 | tp2:max", 5).unwrap();
        assert_eq!(p.inst.to_string(), "dp5zero1");
        // Plain plans are not concurrent.
        assert!(!Plan::parse("dp4:64,tp4:max", 4).unwrap().is_concurrent());
        for (spec, devices, says) in [
            ("dp2:64 | tp2:max", 8, "take 4 devices, the run has 8"),
            (
                "tp2:max | dp2:64",
                4,
                "must increase across the groups (max then 64)",
            ),
            ("dp2:64 | ", 4, "concurrent group 2"),
            ("dp2:64,tp4:max | dp2:max", 8, "concurrent group 1"),
            ("dp2:64 | tp2:512", 4, ""),
        ] {
            match Plan::parse(spec, devices) {
                Err(e) => assert!(e.to_string().contains(says), "{spec}: {e}"),
                // A last bound short of `max` is the data check's business, as in plain plans.
                Ok(p) => assert!(says.is_empty() && p.is_concurrent(), "{spec}"),
            }
        }
        // Priced as the runtime runs it: the slower group's time, plus the switches.
        let p = planner(4);
        let lens = [10, 12, 9, 3000, 2500];
        let both = p
            .evaluate(&Plan::parse("dp2:64 | tp2:max", 4).unwrap(), &lens)
            .unwrap();
        let long = p
            .evaluate(&Plan::parse("dp2:8 | tp2:max", 4).unwrap(), &[3000, 2500])
            .unwrap();
        assert!(both.seconds >= long.seconds - 1e-12, "{both:?} vs {long:?}");
        assert!(both.breakdown.switch > 0.0);
        assert_eq!(both.sequences, [3, 2]);
        // The search: two groups, the sequences up to its edge on the first; its estimate is
        // the plan's.
        let lens: Vec<usize> = (0..60)
            .map(|i| 200 + (i * 37) % 900)
            .chain([6000, 5000])
            .collect();
        let (plan, est) = p
            .concurrent(&lens)
            .unwrap()
            .expect("some split holds the batch");
        assert!(plan.is_concurrent() && plan.buckets.len() == 2, "{plan}");
        assert_eq!(plan.offsets[0], 0);
        assert_eq!(plan.offsets[1], plan.buckets[0].1.devices());
        assert_eq!(p.evaluate(&plan, &lens).unwrap().seconds, est.seconds);
        assert_eq!(est.sequences.iter().sum::<usize>(), lens.len());
    }

    fn planner(gpus: usize) -> Planner {
        let cluster = Cluster {
            efficiency: Efficiency {
                attention: 0.45,
                ..Efficiency::GPU
            },
            ..Cluster::new(
                "test",
                gpus.div_ceil(8),
                gpus.min(8),
                312.0,
                80.0,
                Link::new(400.0, 5.0),
                Link::new(200.0, 10.0),
            )
        };
        let cfg = model::LlamaConfig::preset("llama2-7b").unwrap();
        Planner::new(CostModel::new(cluster, cfg))
    }

    fn s(spec: &str, n: usize) -> Strategy {
        Strategy::parse(spec, n).unwrap()
    }

    #[test]
    fn the_model_counts_like_the_paper() {
        let p = planner(8);
        // LLaMA-2 7B has 6.74 B parameters.
        assert!(
            (p.cost.params() / 6.738e9 - 1.0).abs() < 0.001,
            "{}",
            p.cost.params()
        );
        let (g, a) = p.cost.flops(&[4096]);
        // Every matrix but the embedding lookup (2 % of the parameters) is a GEMM.
        assert!((g / (6.0 * 4096.0 * p.cost.params()) - 0.98).abs() < 0.01);
        // Attention grows with the square of the length.
        let (_, a2) = p.cost.flops(&[8192]);
        assert!((a2 / a - 4.0).abs() < 1e-9);
    }

    #[test]
    fn memory_bounds_the_micro_batch() {
        let p = planner(8);
        let dp8 = s("dp8zero1", 8);
        let tp8 = s("tp8sp", 8);
        // With the optimizer distributed (ZeRO-1) the master state is sharded over all 8
        // devices whoever holds it (TP × PP × DP = 8), so DP8 holds as many tokens next to a TP8
        // instantiation as alone; TP8 holds the most. Without ZeRO every DP replica holds all of
        // it: 7B × 12 bytes leave DP8 no room at all.
        assert!(p.cost.capacity(&dp8, &dp8) > 4096);
        assert_eq!(p.cost.capacity(&dp8, &tp8), p.cost.capacity(&dp8, &dp8));
        let plain = s("dp8", 8);
        assert_eq!(p.cost.capacity(&plain, &plain), 0);
        assert_eq!(p.cost.capacity(&plain, &tp8), p.cost.capacity(&dp8, &tp8));
        assert!(p.cost.capacity(&tp8, &tp8) > p.cost.capacity(&s("dp4tp2sp", 8), &tp8));
        let plan = Plan::new(vec![(100_000, dp8.clone())], tp8.clone());
        let err = p.evaluate(&plan, &[90_000]).unwrap_err().to_string();
        assert!(err.contains("holds at most"), "{err}");
        let plan = Plan::new(vec![(1000, dp8)], tp8);
        let err = p.evaluate(&plan, &[2000]).unwrap_err().to_string();
        assert!(err.contains("beyond every bucket"), "{err}");
    }

    #[test]
    fn context_parallelism_and_recomputation_trade_time_for_memory() {
        let p = planner(8);
        let (dp8, cp8) = (s("dp8zero1", 8), s("cp8zero1", 8));
        // Splitting every sequence over 8 ranks holds 8× the tokens of one micro-batch.
        let ratio = p.cost.capacity(&cp8, &cp8) as f64 / p.cost.capacity(&dp8, &dp8) as f64;
        assert!(ratio > 7.0, "{ratio}");
        // Recomputation holds more and costs more compute: full more than selective.
        let (sel, full) = (s("dp8zero1+selective", 8), s("dp8zero1+full", 8));
        let cap = |x: &Strategy| p.cost.capacity(x, x);
        assert!(cap(&full) > cap(&sel) && cap(&sel) > cap(&dp8));
        let time = |x: &Strategy| p.cost.micro_batch(x, &[4096]).0;
        assert!(time(&full) > time(&sel) && time(&sel) > time(&dp8));
        // The CP exchange costs time the DP run does not pay; Ulysses and the ring differ.
        let (ring, uly) = (s("dp2cp4zero1", 8), s("dp2cp4ulysseszero1", 8));
        let comm = |x: &Strategy| p.cost.micro_batch(x, &[32768]).1;
        assert!(comm(&ring) > 0.0 && comm(&uly) > 0.0 && comm(&ring) != comm(&uly));
        // With context parallelism in the search, the candidates include CP and recomputation.
        let mut q = planner(8);
        assert!(q.candidates(1).iter().all(|c| c.cp == 1));
        q.context = true;
        let all = q.candidates(1);
        assert!(all
            .iter()
            .any(|c| c.cp == 8 && c.recompute == graph::Recompute::Full));
        assert!(all
            .iter()
            .any(|c| c.cp_exchange == graph::CpExchange::Ulysses));
    }

    #[test]
    fn pipelines_pay_a_bubble_and_switches_cost_time() {
        let p = planner(8);
        let lens = vec![2048; 32];
        let pp = p.cost.strategy(&s("dp4pp2", 8), &lens, 65536);
        assert!(pp.bubble > 0.0 && pp.pp_comm > 0.0);
        let dp = p.cost.strategy(&s("dp8", 8), &lens, 65536);
        assert_eq!(dp.bubble, 0.0);
        assert!(dp.dp_reduce > 0.0);
        // DP8 -> TP8 is local copies only; TP8 -> DP8 gathers everything.
        assert_eq!(p.switch_seconds(&s("dp8", 8), &s("tp8sp", 8)).unwrap(), 0.0);
        let t = p.switch_seconds(&s("tp8sp", 8), &s("dp8", 8)).unwrap();
        // Each device receives 7/8 of 6.74 B bf16 parameters at 400 GB/s: ~29 ms.
        assert!(t > 0.02 && t < 0.05, "{t}");
        assert_eq!(p.switch_seconds(&s("dp8", 8), &s("dp8", 8)).unwrap(), 0.0);
    }

    /// `--comm-schedule priority`: the pieces the next forward reads first (a third of the
    /// values) are summed during the next step, which waits for each parameter it reaches; the
    /// rest during the last backward. With fast links only the wait for the first pieces shows;
    /// with slow ones it hides both the last backward and the first forward, so less shows
    /// than under fifo (which hides the backward only) — and more when every piece waits for
    /// the next step (the forward's reads then wait for the whole exchange).
    #[test]
    fn priority_overlaps_the_last_backward_and_the_next_forward() {
        let lens = vec![2048; 16];
        let tp = s("dp8tp2", 16);
        for cross in [200.0, 2.0] {
            let mut p = planner(16);
            // Pieces of 32 M values (64 MiB in bf16): at 4 MiB a 7B model's 6,400 pieces
            // would each pay the ring's latency (the model says so: about 2 s here).
            p.cost.bucket_elems = 32 << 20;
            p.cost.cluster.cross_node = Link::new(cross, 10.0);
            let dp = s("dp16", 16);
            let fifo = p.cost.strategy(&dp, &lens, 65536);
            p.cost.priority = true;
            assert!(p.cost.by_priority(&dp) && !p.cost.by_priority(&tp));
            let prio = p.cost.strategy(&dp, &lens, 65536);
            p.cost.priority_defer = 1.0;
            let all_late = p.cost.strategy(&dp, &lens, 65536);
            let work = prio.compute + prio.elementwise;
            let exchange = p
                .cost
                .exchange
                .cost(&p.cost.cluster, p.cost.params(), &[], p.cost.dp_shape(&dp))
                .seconds;
            if cross > 100.0 {
                assert!(prio.dp_reduce < 0.05 * work, "{prio:?}");
            } else {
                let step = work + prio.dp_reduce;
                assert!(
                    step > exchange && step < exchange + work,
                    "{step} vs {exchange}"
                );
                assert!(prio.dp_reduce < fifo.dp_reduce, "{prio:?} vs {fifo:?}");
                assert!(
                    all_late.dp_reduce > fifo.dp_reduce,
                    "{all_late:?} vs {fifo:?}"
                );
            }
        }
    }

    #[test]
    fn the_automatic_plan_beats_static_and_grid_plans() {
        let p = planner(8);
        let mut lens: Vec<usize> = (0..96).map(|i| 300 + (i * 97) % 1500).collect();
        lens.extend([20_000, 12_000, 9_000, 6_000]);
        let (_, fixed) = p.best_static(&lens).unwrap();
        let (plan, auto) = p.auto(&lens).unwrap();
        assert!(auto.seconds <= fixed.seconds + 1e-9, "{plan}");
        // Any plan on the grid's edges is in the search space.
        let hand = Plan::new(
            vec![
                (4096, s("dp8", 8)),
                (16384, s("dp2tp2pp2sp", 8)),
                (20_000, s("tp4pp2sp", 8)),
            ],
            s("tp4pp2sp", 8),
        );
        let h = p.evaluate(&hand, &lens).unwrap();
        assert!(
            auto.seconds <= h.seconds + 1e-9,
            "auto {} vs hand {}",
            auto.seconds,
            h.seconds
        );
    }

    #[test]
    fn shared_cores_lend_by_the_measured_share_and_pipeline_messages_wait_for_a_core() {
        let base = planner(4).cost;
        let seconds = |lending: f64, handoff_us: f64, shared: f64, s: &str| {
            let cluster = Cluster {
                shared_cores: shared,
                lending,
                handoff_us,
                ..base.cluster.clone()
            };
            let cost = CostModel::new(cluster, base.cfg.clone());
            let s = Strategy::parse(s, 4).unwrap();
            cost.strategy(&s, &[4096; 8], 4096).total()
        };
        // 4 devices on 2 cores, pp4 over 8 micro-batches (busy 8/11 of the time): idle stages
        // lend their cores in full, in part, or not at all.
        let (full, part, none) = (
            seconds(1.0, 0.0, 2.0, "pp4"),
            seconds(0.5, 0.0, 2.0, "pp4"),
            seconds(0.0, 0.0, 2.0, "pp4"),
        );
        assert!(full < part && part < none, "{full} {part} {none}");
        assert!((none - seconds(1.0, 0.0, 0.0, "pp4")).abs() < 1e-12 * none);
        // A wait for a core per stage-boundary message: at least the fill's and the drain's
        // (3 boundaries each way) on the critical path, at most every message's (8
        // micro-batches, 3 boundaries, forward and back).
        let waited = seconds(1.0, 1000.0, 2.0, "pp4") - full;
        assert!((6e-3 - 1e-9..=48e-3 + 1e-9).contains(&waited), "{waited}");
        // Not without pipelines, nor on devices of their own.
        assert_eq!(
            seconds(1.0, 1000.0, 2.0, "dp4"),
            seconds(1.0, 0.0, 2.0, "dp4")
        );
        assert_eq!(
            seconds(1.0, 1000.0, 0.0, "pp4"),
            seconds(1.0, 0.0, 0.0, "pp4")
        );
    }
}
