//! Hot switching inside `hotspa train` (`--strategies "dp4:64,dp2tp2:256,tp4:max"`): each step's
//! sequences are bucketed by length, each bucket trains under its own strategy, and parameters
//! and gradients move between the strategies with `switch` plans.
//!
//! The instantiation strategy (least model-state memory per device) holds the fp32 master
//! weights and the AdamW state and runs the update. The strategies with a non-empty bucket run
//! one after another; each gets the parameters from the cheapest layout that already holds them
//! (the instantiation's or an earlier strategy's) and adds its gradients (reduced over its DP
//! replicas) to the step's sum, which either stays in the instantiation layout ("star": each
//! strategy's gradients switch home) or travels from strategy to strategy and switches home once
//! ("chain"). The order and the route are the ones with the fewest switch bytes (exhaustive over
//! the non-empty strategies: at most 720 orders for 6).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use comm::Communicator;
use dstate::{DeviceId, Distribution};
use graph::{ExecGraph, Strategy};
use kernels::Backend;
use model::{rank_exec, LlamaConfig};
use runtime::{pipeline_step, Optimizer, RankGroups, RuntimeError, Schedule};
use switch::{execute, plan, Method, Pieces, Plan, Topology};

/// The parsed `--strategies` list.
#[derive(Debug, Clone)]
pub struct HotSchedule {
    /// (strategy, longest sequence it takes; `None` = no limit), in the order given.
    pub entries: Vec<(Strategy, Option<usize>)>,
    /// Index of the instantiation strategy.
    pub inst: usize,
}

/// Model-state bytes per device under `s` (fp32 weights, gradients, two AdamW moments), in units
/// of the parameter count.
fn state_per_device(s: &Strategy) -> f64 {
    let shard = (s.tp * s.pp) as f64;
    let dp = s.dp as f64;
    let w = if s.zero >= 3 { 4.0 / dp } else { 4.0 };
    let g = if s.zero >= 2 { 4.0 / dp } else { 4.0 };
    let o = if s.zero >= 1 { 8.0 / dp } else { 8.0 };
    (w + g + o) / shard
}

impl HotSchedule {
    /// Parses `STRATEGY:MAXLEN,…` (MAXLEN ascending, the last may be `max`) for `devices`.
    pub fn parse(spec: &str, devices: usize) -> Result<Self> {
        let mut entries: Vec<(Strategy, Option<usize>)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (s, m) = part.split_once(':').with_context(|| {
                format!("--strategies: `{part}` is not STRATEGY:MAXLEN (e.g. dp4:512 or tp4:max)")
            })?;
            let strategy = Strategy::parse(s, devices)?;
            let max = match m {
                "max" => None,
                n => Some(n.parse::<usize>().with_context(|| {
                    format!("--strategies: `{n}` is neither a length nor `max`")
                })?),
            };
            if let Some((_, prev)) = entries.last() {
                match (prev, max) {
                    (None, _) => bail!("--strategies: only the last strategy may be `max`"),
                    (Some(p), Some(m)) if m <= *p => {
                        bail!("--strategies: lengths must increase ({p} then {m})")
                    }
                    _ => {}
                }
            }
            entries.push((strategy, max));
        }
        if entries.is_empty() {
            bail!("--strategies is empty");
        }
        let inst = (0..entries.len())
            .min_by(|&a, &b| {
                state_per_device(&entries[a].0).total_cmp(&state_per_device(&entries[b].0))
            })
            .unwrap_or(0);
        Ok(Self { entries, inst })
    }

    /// The schedule of a planner's plan: its buckets in order (the last takes any length) and
    /// its instantiation strategy, added first with no bucket of its own where no bucket uses
    /// it.
    pub fn from_plan(plan: &planner::Plan) -> Self {
        let n = plan.buckets.len();
        let mut entries: Vec<(Strategy, Option<usize>)> = plan
            .buckets
            .iter()
            .enumerate()
            .map(|(i, (e, s))| (s.clone(), (i + 1 < n).then_some(*e)))
            .collect();
        let inst = match entries.iter().position(|(s, _)| *s == plan.inst) {
            Some(i) => i,
            None => {
                entries.insert(0, (plan.inst.clone(), Some(0)));
                0
            }
        };
        Self { entries, inst }
    }

    /// The strategy each sequence goes to; an error names a sequence longer than every bound.
    pub fn buckets(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<Vec<u32>>>, RuntimeError> {
        let mut out = vec![Vec::new(); self.entries.len()];
        for s in batch {
            let i = self
                .entries
                .iter()
                .position(|(_, m)| m.is_none_or(|m| s.len() <= m))
                .ok_or_else(|| {
                    RuntimeError::Batch(format!(
                        "a sequence of {} tokens is longer than every strategy of --strategies takes",
                        s.len()
                    ))
                })?;
            out[i].push(s.clone());
        }
        Ok(out)
    }
}

/// One strategy as a rank runs it.
struct Member {
    strategy: Strategy,
    exec: ExecGraph,
    groups: RankGroups,
    shared: Vec<bool>,
    /// Spec index of every exec-graph parameter.
    spec_of: Vec<usize>,
    /// Every spec's distribution under this strategy.
    placement: Vec<(Vec<usize>, Distribution)>,
    micro_batch_tokens: usize,
}

/// What one step of hot switching reports.
pub struct HotStep<B: Backend> {
    /// The global batch's loss.
    pub loss: f32,
    /// The step's gradient for the instantiation strategy's pieces.
    pub grads: Vec<B::Buffer>,
    /// Largest peak bytes of any strategy's pass on this rank.
    pub peak_bytes: usize,
    /// Seconds spent in each strategy (training only), by strategy name.
    pub strategy_seconds: BTreeMap<String, f64>,
    /// Seconds spent switching parameters and gradients.
    pub switch_seconds: f64,
    /// Bytes the switches moved (all ranks together).
    pub switch_bytes: u64,
}

/// A rank's view of every strategy of the schedule.
pub struct HotRank {
    schedule: HotSchedule,
    members: Vec<Member>,
    me: usize,
    /// `plans[a][b]`: the switch from strategy `a`'s layout to `b`'s (`None` on the diagonal).
    plans: Vec<Vec<Option<std::sync::Arc<Plan>>>>,
}

fn pieces_of(host: Vec<Vec<f32>>, member: &Member, me: usize, specs: usize) -> Result<Pieces> {
    let mut out: Pieces = vec![None; specs];
    for (j, values) in host.into_iter().enumerate() {
        let k = member.spec_of[j];
        let (shape, dist) = &member.placement[k];
        let piece = dist
            .piece_of(DeviceId(me), shape)?
            .with_context(|| format!("rank {me} holds parameter {k} but has no piece of it"))?;
        if piece.region.volume() != values.len() {
            bail!(
                "parameter {k}: the rank's piece has {} values, its region {} holds {}",
                values.len(),
                piece.region,
                piece.region.volume()
            );
        }
        out[k] = Some((piece.region, values));
    }
    Ok(out)
}

fn from_pieces(pieces: &mut Pieces, member: &Member) -> Result<Vec<Vec<f32>>> {
    member
        .spec_of
        .iter()
        .map(|&k| {
            pieces[k]
                .take()
                .map(|(_, v)| v)
                .with_context(|| format!("the switch left parameter {k} without a piece"))
        })
        .collect()
}

impl HotRank {
    /// Builds every strategy's exec graph, groups and switch plans for world rank `me`.
    pub fn new(
        schedule: &HotSchedule,
        cfg: &LlamaConfig,
        world: &dyn Communicator,
        micro_batch_tokens: &[usize],
        devices_per_node: usize,
    ) -> Result<Self> {
        let me = world.rank().0;
        let n = schedule.entries.len();
        if !(micro_batch_tokens.len() == 1 || micro_batch_tokens.len() == n) {
            bail!(
                "--micro-batch-tokens has {} values for {n} strategies (give one, or one per strategy)",
                micro_batch_tokens.len()
            );
        }
        let topo = Topology::new(devices_per_node);
        let mut members = Vec::new();
        for (i, (s, _)) in schedule.entries.iter().enumerate() {
            let exec = rank_exec(cfg, s, me)?;
            let groups = RankGroups::new(world, s)?;
            let place = model::placements(cfg, s).with_context(|| {
                format!("hot switching needs every parameter's layout under {s}")
            })?;
            let specs = model::param_specs(cfg);
            let spec_of = exec
                .graph
                .params
                .iter()
                .map(|&p| {
                    let name = &exec.graph.info(p).name;
                    specs
                        .iter()
                        .position(|x| &x.name == name)
                        .with_context(|| format!("{name} is not a parameter of the config"))
                })
                .collect::<Result<Vec<_>>>()?;
            let shared = exec
                .graph
                .params
                .iter()
                .map(|&p| {
                    cfg.tie_word_embeddings
                        && exec.graph.info(p).name == "model.embed_tokens.weight"
                })
                .collect();
            members.push(Member {
                strategy: s.clone(),
                exec,
                groups,
                shared,
                spec_of,
                placement: place.into_iter().map(|(_, shape, d)| (shape, d)).collect(),
                micro_batch_tokens: micro_batch_tokens
                    [if micro_batch_tokens.len() == 1 { 0 } else { i }],
            });
        }
        let mut plans = Vec::new();
        for (a, _) in schedule.entries.iter().enumerate() {
            let mut row = Vec::new();
            for (b, _) in schedule.entries.iter().enumerate() {
                row.push(if a == b {
                    None
                } else {
                    // Every rank needs the same plans: the first to ask makes them.
                    let (sa, sb) = (&schedule.entries[a].0, &schedule.entries[b].0);
                    let key = format!("{cfg:?}|{sa}|{sb}|{devices_per_node}");
                    Some(plan_cache().get_or_plan(&key, || {
                        let ts = crate::switch_cmd::tensors(cfg, sa, sb)
                            .map_err(|e| switch::SwitchError::Pieces(e.to_string()))?;
                        plan(&ts, topo, Method::Exact)
                    })?)
                });
            }
            plans.push(row);
        }
        Ok(Self {
            schedule: schedule.clone(),
            members,
            me,
            plans,
        })
    }

    /// Elements a switch from layout `a` to layout `b` moves.
    fn moved(&self, a: usize, b: usize) -> usize {
        self.plans[a][b].as_ref().map_or(0, |p| p.moved())
    }

    /// The order of `todo` (strategy indices) and the gradient route with the fewest switch
    /// bytes. Parameters for a strategy come from the cheapest layout that already holds them
    /// (the instantiation's, or an earlier strategy's). Gradients either go straight back to the
    /// instantiation layout after each strategy (`chain = false`), or the running sum travels
    /// from strategy to strategy and goes back once (`chain = true`).
    pub fn order(&self, todo: &[usize]) -> (Vec<usize>, bool) {
        let inst = self.schedule.inst;
        let params = |o: &[usize]| -> usize {
            (0..o.len())
                .map(|k| {
                    std::iter::once(inst)
                        .chain(o[..k].iter().copied())
                        .map(|l| self.moved(l, o[k]))
                        .min()
                        .unwrap_or(0)
                })
                .sum()
        };
        let star = |o: &[usize]| -> usize { o.iter().map(|&s| self.moved(s, inst)).sum() };
        let chain = |o: &[usize]| -> usize {
            o.windows(2).map(|w| self.moved(w[0], w[1])).sum::<usize>()
                + self.moved(o[o.len() - 1], inst)
        };
        let mut best = (todo.to_vec(), false);
        let mut best_cost = usize::MAX;
        let mut cur = todo.to_vec();
        permute(&mut cur, 0, &mut |o| {
            let p = params(o);
            for (c, is_chain) in [(p + star(o), false), (p + chain(o), true)] {
                if c < best_cost {
                    best_cost = c;
                    best = (o.to_vec(), is_chain);
                }
            }
        });
        best
    }

    /// Switches `host` (layout `from`, its exec order) to layout `to`; adds the bytes moved.
    fn switch(
        &self,
        world: &dyn Communicator,
        host: Vec<Vec<f32>>,
        from: usize,
        to: usize,
        bytes: &mut u64,
    ) -> Result<Vec<Vec<f32>>> {
        if from == to {
            return Ok(host);
        }
        let specs = self.members[from].placement.len();
        let src = pieces_of(host, &self.members[from], self.me, specs)?;
        let p = self.plans[from][to]
            .as_ref()
            .context("a switch plan is missing")?;
        let mut got = execute(p, world, &src)?;
        *bytes += p.moved() as u64 * 4;
        from_pieces(&mut got, &self.members[to])
    }

    /// One step's gradients for the global `batch` (every rank passes the same batch), with the
    /// instantiation strategy's current parameters `params` (its exec-graph order).
    #[allow(clippy::too_many_arguments)]
    pub fn step<B: Backend>(
        &mut self,
        be: &B,
        world: &dyn Communicator,
        opt: &Optimizer<B>,
        batch: &[Vec<u32>],
        scale: f32,
        schedule: Schedule,
    ) -> Result<HotStep<B>> {
        let buckets = self.schedule.buckets(batch)?;
        let me = self.me;
        let inst = self.schedule.inst;
        let todo: Vec<usize> = (0..buckets.len())
            .filter(|&i| !buckets[i].is_empty())
            .collect();
        if todo.is_empty() {
            bail!("an empty global batch");
        }
        let (order, chain) = self.order(&todo);
        let mut out = HotStep {
            loss: 0.0,
            grads: Vec::new(),
            peak_bytes: 0,
            strategy_seconds: BTreeMap::new(),
            switch_seconds: 0.0,
            switch_bytes: 0,
        };
        // Host copies of the parameters in every layout they have reached (the instantiation's
        // is downloaded when first needed).
        let mut hosts: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
        // The gradients accumulated so far, with their layout.
        let mut acc: Option<(usize, Vec<Vec<f32>>)> = None;
        for &i in &order {
            let t0 = Instant::now();
            let mut switching = 0.0;
            let device: Option<Vec<B::Buffer>> = if i == inst {
                None
            } else {
                let ts = Instant::now();
                if let std::collections::btree_map::Entry::Vacant(e) = hosts.entry(inst) {
                    // Whole local pieces (all-gathered over DP under ZeRO-3).
                    e.insert(opt.params_host(be, &self.members[inst].groups)?);
                }
                let from = *hosts
                    .keys()
                    .min_by_key(|&&l| (self.moved(l, i), l))
                    .context("no parameters to switch from")?;
                let h = hosts.get(&from).cloned().unwrap_or_default();
                let moved = self.switch(world, h, from, i, &mut out.switch_bytes)?;
                // Under ZeRO-3 a rank binds only its flat chunk of every piece.
                let s = &self.members[i].strategy;
                let (_, d, _) = s.coords(me);
                let bufs = moved
                    .iter()
                    .map(|x| {
                        if s.zero >= 3 {
                            be.upload(&x[dstate::chunk(0..x.len(), s.dp, d)])
                        } else {
                            be.upload(x)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                hosts.insert(i, moved);
                switching += ts.elapsed().as_secs_f64();
                Some(bufs)
            };
            let m = &mut self.members[i];
            let (_, dp_rank, _) = m.strategy.coords(me);
            let mine: Vec<Vec<u32>> = buckets[i]
                .iter()
                .skip(dp_rank)
                .step_by(m.strategy.dp)
                .cloned()
                .collect();
            let mbs = crate::train::pack(&mine, m.micro_batch_tokens, scale)?;
            let bound: &[B::Buffer] = match &device {
                Some(b) => b,
                None => opt.params(),
            };
            let res = pipeline_step(be, &m.exec, &mut m.groups, bound, &m.shared, &mbs, schedule)?;
            out.loss += res.loss;
            out.peak_bytes = out.peak_bytes.max(res.peak_bytes);
            let mut grads: Vec<Vec<f32>> = res
                .grads
                .iter()
                .map(|g| be.download(g))
                .collect::<Result<_, _>>()?;
            if m.strategy.zero >= 2 {
                // Flat 1/dp chunks of the DP-summed pieces: gather the whole pieces to switch.
                let specs = &m.spec_of;
                for (j, g) in grads.iter_mut().enumerate() {
                    let (shape, dist) = &m.placement[specs[j]];
                    let len = dist
                        .piece_of(DeviceId(me), shape)?
                        .map_or(0, |p| p.region.volume());
                    let counts = comm::chunk_counts(len, m.strategy.dp);
                    let mut whole = vec![0.0; len];
                    m.groups.dp.all_gather(g, &mut whole, &counts)?;
                    *g = whole;
                }
            }
            let ts = Instant::now();
            // Star: this strategy's gradients go home now. Chain: the running sum comes here.
            let (here, grads) = if chain {
                (i, grads)
            } else {
                (
                    inst,
                    self.switch(world, grads, i, inst, &mut out.switch_bytes)?,
                )
            };
            acc = Some(match acc.take() {
                None => (here, grads),
                Some((l, a)) => {
                    let mut a = self.switch(world, a, l, here, &mut out.switch_bytes)?;
                    for (x, g) in a.iter_mut().zip(grads) {
                        for (u, v) in x.iter_mut().zip(g) {
                            *u += v;
                        }
                    }
                    (here, a)
                }
            });
            switching += ts.elapsed().as_secs_f64();
            out.switch_seconds += switching;
            *out.strategy_seconds
                .entry(self.members[i].strategy.to_string())
                .or_default() += t0.elapsed().as_secs_f64() - switching;
        }
        let (l, a) = acc.context("no strategy ran")?;
        let ts = Instant::now();
        let a = self.switch(world, a, l, inst, &mut out.switch_bytes)?;
        out.switch_seconds += ts.elapsed().as_secs_f64();
        // The instantiation strategy's optimizer takes its flat chunks under ZeRO-2/3.
        let s = &self.members[inst].strategy;
        let (_, d, _) = s.coords(me);
        out.grads = a
            .iter()
            .map(|g| {
                if s.zero >= 2 {
                    be.upload(&g[dstate::chunk(0..g.len(), s.dp, d)])
                } else {
                    be.upload(g)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(out)
    }

    /// The instantiation strategy's groups (its optimizer updates over them).
    pub fn inst_groups(&mut self) -> &mut RankGroups {
        let i = self.schedule.inst;
        &mut self.members[i].groups
    }
}

/// Plans shared by the rank threads of this process.
fn plan_cache() -> &'static switch::PlanCache {
    static CACHE: std::sync::OnceLock<switch::PlanCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(switch::PlanCache::new)
}

/// Calls `f` with every permutation of `v[k..]` (Heap-free recursive swaps; `v` is restored).
fn permute(v: &mut Vec<usize>, k: usize, f: &mut dyn FnMut(&[usize])) {
    if k + 1 >= v.len() {
        f(v);
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, f);
        v.swap(k, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_all_visited() {
        let mut seen = Vec::new();
        permute(&mut vec![0, 1, 2], 0, &mut |o| seen.push(o.to_vec()));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn schedules_parse_and_pick_the_leanest_instantiation() {
        let h = HotSchedule::parse("dp4:64,dp2tp2:256,tp4:max", 4).unwrap();
        assert_eq!(h.inst, 2);
        let b = h
            .buckets(&[vec![1; 10], vec![1; 300], vec![1; 100]])
            .unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
        let h = HotSchedule::parse("dp4:8,dp2tp2:16", 4).unwrap();
        assert!(h.buckets(&[vec![1; 17]]).is_err());
    }
}
