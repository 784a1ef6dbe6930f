//! Hot switching inside a step: each step's sequences are bucketed by length, each bucket
//! trains under its own strategy, and parameters and gradients move between the strategies
//! with `switch` plans.
//!
//! The instantiation strategy (least model-state memory per device, [`planner::instantiation`])
//! holds the fp32 master weights and the AdamW state and runs the update. The buckets with
//! sequences run one after another; each gets the parameters from the cheapest layout that
//! already holds them (the instantiation's or an earlier strategy's) and adds its gradients
//! (reduced over its DP replicas) to the step's sum, which either stays in the instantiation
//! layout ("star": each strategy's gradients switch home) or travels from strategy to strategy
//! and switches home once ("chain"). The order and the route are the ones with the fewest switch
//! bytes (exhaustive over the non-empty buckets: at most 720 orders for 6).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use comm::Communicator;
use dstate::{DeviceId, Distribution};
use graph::{ExecGraph, Schedule, Strategy, Zero};
use kernels::Backend;
use model::{rank_exec, LlamaConfig};
use planner::Plan;
use runtime::{pipeline_step, GradientAgreement, Optimizer, RankGroups};
use switch::{execute, Method, Pieces, Topology};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::metrics::HotMetrics;

/// What the hot-switching ranks of a run share.
#[derive(Clone)]
pub struct HotSetup {
    /// The model.
    pub cfg: LlamaConfig,
    /// Devices per node (the switch planner prefers senders on the receiver's node).
    pub devices_per_node: usize,
    /// How each strategy's DP replicas agree on gradients.
    pub agreement: Arc<dyn GradientAgreement>,
    /// The pipeline schedule.
    pub schedule: Schedule,
}

/// One distinct strategy of the schedule, as this rank runs it.
struct Member {
    strategy: Strategy,
    exec: ExecGraph,
    /// Its groups; `None` for the instantiation strategy, which runs on the optimizer's.
    groups: Option<RankGroups>,
    shared: Vec<bool>,
    /// Spec index of every exec-graph parameter.
    spec_of: Vec<usize>,
    /// Every spec's distribution under this strategy.
    placement: Vec<(Vec<usize>, Distribution)>,
}

/// What one step of hot switching gives the optimizer.
pub struct HotStep<B: Backend> {
    /// The global batch's loss.
    pub loss: f32,
    /// The step's gradient for the instantiation strategy's pieces.
    pub grads: Vec<B::Buffer>,
    /// Largest peak bytes of any strategy's pass on this rank.
    pub peak_bytes: usize,
    /// Time per strategy and in switches.
    pub metrics: HotMetrics,
}

/// A rank's view of every strategy of a schedule.
pub struct HotRank {
    plan: Plan,
    members: Vec<Member>,
    /// The member of every bucket.
    member_of: Vec<usize>,
    /// The member holding the weights and the optimizer.
    inst: usize,
    /// Every bucket's micro-batch budget.
    budgets: Vec<usize>,
    me: usize,
    /// `plans[a][b]`: the switch from member `a`'s layout to `b`'s (`None` on the diagonal).
    plans: Vec<Vec<Option<Arc<switch::Plan>>>>,
}

fn pieces_of(host: Vec<Vec<f32>>, member: &Member, me: usize, specs: usize) -> Result<Pieces> {
    let mut out: Pieces = vec![None; specs];
    for (j, values) in host.into_iter().enumerate() {
        let k = member.spec_of[j];
        let (shape, dist) = &member.placement[k];
        let piece = dist
            .piece_of(DeviceId(me), shape)?
            .ok_or_else(|| TrainError::Rank {
                rank: me,
                reason: format!("holds parameter {k} but has no piece of it"),
            })?;
        if piece.region.volume() != values.len() {
            return Err(TrainError::Rank {
                rank: me,
                reason: format!(
                    "parameter {k}: the rank's piece has {} values, its region {} holds {}",
                    values.len(),
                    piece.region,
                    piece.region.volume()
                ),
            });
        }
        out[k] = Some((piece.region, values));
    }
    Ok(out)
}

fn from_pieces(pieces: &mut Pieces, member: &Member, me: usize) -> Result<Vec<Vec<f32>>> {
    member
        .spec_of
        .iter()
        .map(|&k| {
            pieces[k]
                .take()
                .map(|(_, v)| v)
                .ok_or_else(|| TrainError::Rank {
                    rank: me,
                    reason: format!("the switch left parameter {k} without a piece"),
                })
        })
        .collect()
}

impl HotRank {
    /// Builds every strategy's exec graph, groups and switch plans for world rank
    /// `world.rank()`. `budgets` has one micro-batch budget per bucket of `plan`.
    pub fn new(
        plan: &Plan,
        budgets: &[usize],
        setup: &HotSetup,
        world: &dyn Communicator,
    ) -> Result<Self> {
        let (cfg, devices_per_node) = (&setup.cfg, setup.devices_per_node);
        let me = world.rank().0;
        if budgets.len() != plan.buckets.len() {
            return Err(TrainError::setting(
                "micro_batch_tokens",
                format!(
                    "{} budgets for {} buckets",
                    budgets.len(),
                    plan.buckets.len()
                ),
            ));
        }
        let distinct = plan.strategies();
        let specs = model::param_specs(cfg);
        let mut members = Vec::with_capacity(distinct.len());
        for s in &distinct {
            let exec = rank_exec(cfg, s, me)?;
            let groups = if **s == plan.inst {
                None
            } else {
                Some(RankGroups::new(world, s)?.with_agreement(setup.agreement.clone()))
            };
            let place = model::placements(cfg, s)?;
            let spec_of = exec
                .graph
                .params
                .iter()
                .map(|&p| {
                    let name = &exec.graph.info(p).name;
                    specs.iter().position(|x| &x.name == name).ok_or_else(|| {
                        TrainError::setting(
                            "model",
                            format!("{name} is not a parameter of the config"),
                        )
                    })
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
                strategy: (*s).clone(),
                exec,
                groups,
                shared,
                spec_of,
                placement: place.into_iter().map(|(_, shape, d)| (shape, d)).collect(),
            });
        }
        let index = |s: &Strategy| distinct.iter().position(|d| *d == s).unwrap_or(0);
        let member_of = plan.buckets.iter().map(|(_, s)| index(s)).collect();
        let inst = index(&plan.inst);
        let topo = Topology::new(devices_per_node);
        let mut plans = Vec::new();
        for a in &distinct {
            let mut row = Vec::new();
            for b in &distinct {
                row.push(if a == b {
                    None
                } else {
                    // Every rank needs the same plans: the first to ask makes them.
                    let key = format!("{cfg:?}|{a}|{b}|{devices_per_node}");
                    Some(plan_cache().get_or_plan(&key, || {
                        let ts = model::switch_tensors(cfg, a, b)
                            .map_err(|e| switch::SwitchError::Pieces(e.to_string()))?;
                        switch::plan(&ts, topo, Method::Exact)
                    })?)
                });
            }
            plans.push(row);
        }
        Ok(Self {
            plan: plan.clone(),
            members,
            member_of,
            inst,
            budgets: budgets.to_vec(),
            me,
            plans,
        })
    }

    /// The schedule.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Elements a switch from member `a`'s layout to `b`'s moves.
    fn moved(&self, a: usize, b: usize) -> usize {
        self.plans[a][b].as_ref().map_or(0, |p| p.moved())
    }

    /// The order of `todo` (bucket indices) and the gradient route with the fewest switch bytes.
    /// Parameters for a bucket come from the cheapest layout that already holds them (the
    /// instantiation's, or an earlier bucket's strategy's). Gradients either go straight back
    /// to the instantiation layout after each bucket (`chain = false`), or the running sum
    /// travels from strategy to strategy and goes back once (`chain = true`).
    pub fn order(&self, todo: &[usize]) -> (Vec<usize>, bool) {
        let r = planner::route::route(todo, &|b| self.member_of[b], self.inst, &|a, b| {
            self.moved(a, b)
        });
        (r.order, r.chain)
    }

    /// Switches `host` (member `from`'s layout, its exec order) to member `to`'s layout; adds
    /// the bytes moved.
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
            .ok_or_else(|| TrainError::Rank {
                rank: self.me,
                reason: "a switch plan is missing".into(),
            })?;
        let mut got = execute(p, world, &src)?;
        *bytes += p.moved() as u64 * 4;
        from_pieces(&mut got, &self.members[to], self.me)
    }

    /// One step's gradients for the global `batch` (every rank passes the same batch), with the
    /// optimizer `opt` of the instantiation strategy and its `groups`.
    #[allow(clippy::too_many_arguments)]
    pub fn step<B: Backend>(
        &mut self,
        be: &B,
        world: &dyn Communicator,
        opt: &Optimizer<B>,
        groups: &mut RankGroups,
        batch: &[Vec<u32>],
        scale: f32,
        schedule: Schedule,
    ) -> Result<HotStep<B>> {
        let buckets = self.plan.bucket(batch.iter().map(Vec::len))?;
        let me = self.me;
        let inst = self.inst;
        let todo: Vec<usize> = (0..buckets.len())
            .filter(|&i| !buckets[i].is_empty())
            .collect();
        if todo.is_empty() {
            return Err(TrainError::setting("global_batch", "an empty global batch"));
        }
        let (order, chain) = self.order(&todo);
        let mut out = HotStep {
            loss: 0.0,
            grads: Vec::new(),
            peak_bytes: 0,
            metrics: HotMetrics::default(),
        };
        // Host copies of the parameters in every layout they have reached (the instantiation's
        // is downloaded when first needed).
        let mut hosts: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
        // The gradients accumulated so far, with their layout.
        let mut acc: Option<(usize, Vec<Vec<f32>>)> = None;
        let mut bytes = 0u64;
        for &b in &order {
            let i = self.member_of[b];
            let t0 = Instant::now();
            let mut switching = 0.0;
            let device: Option<Vec<B::Buffer>> = if i == inst {
                None
            } else {
                let ts = Instant::now();
                if let std::collections::btree_map::Entry::Vacant(e) = hosts.entry(inst) {
                    // Whole local pieces (all-gathered over DP under ZeRO-3).
                    e.insert(opt.params_host(be, groups)?);
                }
                let from = hosts
                    .keys()
                    .copied()
                    .min_by_key(|&l| (self.moved(l, i), l))
                    .unwrap_or(inst);
                let h = hosts.get(&from).cloned().unwrap_or_default();
                let moved = self.switch(world, h, from, i, &mut bytes)?;
                // Under ZeRO-3 a rank binds only its flat chunk of every piece.
                let s = &self.members[i].strategy;
                let (_, d, _) = s.coords(me);
                let bufs = moved
                    .iter()
                    .map(|x| {
                        if s.zero >= Zero::Parameters {
                            be.upload(&x[dstate::chunk(0..x.len(), s.replicas(), d)])
                        } else {
                            be.upload(x)
                        }
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                hosts.insert(i, moved);
                switching += ts.elapsed().as_secs_f64();
                Some(bufs)
            };
            let m = &mut self.members[i];
            let seqs: Vec<Vec<u32>> = buckets[b].iter().map(|&k| batch[k].clone()).collect();
            let packing = TrainConfig::packing(self.budgets[b]);
            let mbs = runtime::rank_micro_batches(&seqs, &packing, &m.strategy, me, scale)?;
            let bound: &[B::Buffer] = match &device {
                Some(b) => b,
                None => opt.params(),
            };
            let g = match m.groups.as_mut() {
                Some(g) => g,
                None => &mut *groups,
            };
            let res = pipeline_step(be, &m.exec, g, bound, &m.shared, &mbs, schedule)?;
            out.loss += res.loss;
            out.peak_bytes = out.peak_bytes.max(res.peak_bytes);
            let mut grads: Vec<Vec<f32>> = res
                .grads
                .into_iter()
                .map(|g| runtime::host::release_to_host(be, g))
                .collect::<std::result::Result<_, _>>()?;
            if m.strategy.zero >= Zero::Gradients {
                // Flat 1/dp chunks of the DP-summed pieces: gather the whole pieces to switch.
                let g = match m.groups.as_ref() {
                    Some(g) => g,
                    None => &*groups,
                };
                for (j, gr) in grads.iter_mut().enumerate() {
                    let (shape, dist) = &m.placement[m.spec_of[j]];
                    let len = dist
                        .piece_of(DeviceId(me), shape)?
                        .map_or(0, |p| p.region.volume());
                    let counts = comm::chunk_counts(len, m.strategy.replicas());
                    let mut whole = vec![0.0; len];
                    g.dp.all_gather(gr, &mut whole, &counts)?;
                    *gr = whole;
                }
            }
            let ts = Instant::now();
            // Star: this strategy's gradients go home now. Chain: the running sum comes here.
            let (here, grads) = if chain {
                (i, grads)
            } else {
                (inst, self.switch(world, grads, i, inst, &mut bytes)?)
            };
            acc = Some(match acc.take() {
                None => (here, grads),
                Some((l, a)) => {
                    let mut a = self.switch(world, a, l, here, &mut bytes)?;
                    for (x, g) in a.iter_mut().zip(grads) {
                        for (u, v) in x.iter_mut().zip(g) {
                            *u += v;
                        }
                    }
                    (here, a)
                }
            });
            switching += ts.elapsed().as_secs_f64();
            out.metrics.switch_seconds += switching;
            *out.metrics
                .strategy_seconds
                .entry(self.members[i].strategy.to_string())
                .or_default() += t0.elapsed().as_secs_f64() - switching;
        }
        let (l, a) = acc.ok_or_else(|| TrainError::Rank {
            rank: me,
            reason: "no strategy ran".into(),
        })?;
        let ts = Instant::now();
        let a = self.switch(world, a, l, inst, &mut bytes)?;
        out.metrics.switch_seconds += ts.elapsed().as_secs_f64();
        out.metrics.switch_bytes = bytes;
        // The instantiation strategy's optimizer takes its flat chunks under ZeRO-2/3.
        let s = &self.members[inst].strategy;
        let (_, d, _) = s.coords(me);
        out.grads = a
            .into_iter()
            .map(|g| {
                if s.zero >= Zero::Gradients {
                    Ok(be.upload(&g[dstate::chunk(0..g.len(), s.replicas(), d)])?)
                } else {
                    runtime::host::adopt(be, g)
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(out)
    }
}

/// Plans shared by the rank threads of this process.
fn plan_cache() -> &'static switch::PlanCache {
    static CACHE: std::sync::OnceLock<switch::PlanCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(switch::PlanCache::new)
}
