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

use crate::error::{Result, TrainError};
use crate::metrics::HotMetrics;
use data::Packing;

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
    /// Each strategy's gradient bucket bytes.
    pub buckets: crate::planning::BucketSizer,
}

/// One distinct strategy of the schedule (with its first device), as this rank runs it.
struct Member {
    strategy: Strategy,
    /// Its first device: 0 unless it runs on a concurrent group of the devices.
    offset: usize,
    /// Its exec graph on this rank; `None` where this rank is not among its devices.
    exec: Option<ExecGraph>,
    /// Its groups; `None` for the instantiation strategy, which runs on the optimizer's, and
    /// where this rank is not among its devices.
    groups: Option<RankGroups>,
    shared: Vec<bool>,
    /// Spec index of every exec-graph parameter (none where this rank is not among its
    /// devices).
    spec_of: Vec<usize>,
    /// Every spec's distribution under this strategy, on world devices.
    placement: Vec<(Vec<usize>, Distribution)>,
}

impl Member {
    /// This rank's index among the member's devices, if it is one of them.
    fn local(&self, me: usize) -> Option<usize> {
        local_index(me, self.offset, self.strategy.devices())
    }
}

/// World rank `me`'s index among the `n` devices from `offset`, if it is one of them.
fn local_index(me: usize, offset: usize, n: usize) -> Option<usize> {
    (me >= offset && me < offset + n).then(|| me - offset)
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
    /// Every bucket's packing (its micro-batch budget under the run's policy).
    packings: Vec<Packing>,
    me: usize,
    /// Whether the strategies run on concurrent groups of the devices.
    concurrent: bool,
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
        packings: &[Packing],
        setup: &HotSetup,
        world: &dyn Communicator,
    ) -> Result<Self> {
        let (cfg, devices_per_node) = (&setup.cfg, setup.devices_per_node);
        let me = world.rank().0;
        if packings.len() != plan.buckets.len() {
            return Err(TrainError::setting(
                "micro_batch_tokens",
                format!(
                    "{} budgets for {} buckets",
                    packings.len(),
                    plan.buckets.len()
                ),
            ));
        }
        let distinct = plan.members();
        let concurrent = plan.is_concurrent();
        let specs = model::param_specs(cfg);
        let mut members = Vec::with_capacity(distinct.len());
        for (s, offset) in &distinct {
            let n = s.devices();
            let local = local_index(me, *offset, n);
            let exec = local.map(|l| rank_exec(cfg, s, l)).transpose()?;
            let groups = match local {
                None => None,
                // The instantiation strategy runs on the optimizer's groups.
                Some(_) if *s == plan.inst && *offset == 0 => None,
                Some(_) => {
                    // A concurrent group gets a communicator of its own, made by its members
                    // only; a strategy over every device splits the world.
                    let group;
                    let on: &dyn Communicator = if n == world.size() {
                        world
                    } else {
                        let ranks: Vec<comm::Rank> =
                            (*offset..offset + n).map(comm::Rank).collect();
                        group = world.sub_group(&ranks)?;
                        group.as_ref()
                    };
                    let mut g = RankGroups::new(on, s)?.with_agreement(setup.agreement.clone());
                    g.bucket_bytes = setup.buckets.bytes(s);
                    Some(g)
                }
            };
            let placement = model::placements_at(cfg, s, *offset)?
                .into_iter()
                .map(|(_, shape, d)| (shape, d))
                .collect();
            let (spec_of, shared) = match &exec {
                None => (Vec::new(), Vec::new()),
                Some(e) => {
                    let spec_of = e
                        .graph
                        .params
                        .iter()
                        .map(|&p| {
                            let name = &e.graph.info(p).name;
                            specs.iter().position(|x| &x.name == name).ok_or_else(|| {
                                TrainError::setting(
                                    "model",
                                    format!("{name} is not a parameter of the config"),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let shared = e
                        .graph
                        .params
                        .iter()
                        .map(|&p| {
                            cfg.tie_word_embeddings
                                && e.graph.info(p).name == "model.embed_tokens.weight"
                        })
                        .collect();
                    (spec_of, shared)
                }
            };
            members.push(Member {
                strategy: s.clone(),
                offset: *offset,
                exec,
                groups,
                shared,
                spec_of,
                placement,
            });
        }
        let index = |s: &Strategy, o: usize| {
            distinct
                .iter()
                .position(|(d, x)| d == s && *x == o)
                .unwrap_or(0)
        };
        let member_of = plan
            .buckets
            .iter()
            .enumerate()
            .map(|(i, (_, s))| index(s, plan.offset(i)))
            .collect();
        let inst = index(&plan.inst, 0);
        let topo = Topology::new(devices_per_node);
        let mut plans = Vec::new();
        for a in &members {
            let mut row = Vec::new();
            for b in &members {
                row.push(if a.strategy == b.strategy && a.offset == b.offset {
                    None
                } else {
                    // Every rank needs the same plans: the first to ask makes them.
                    let key = format!(
                        "{cfg:?}|{}@{}|{}@{}|{devices_per_node}",
                        a.strategy, a.offset, b.strategy, b.offset
                    );
                    Some(plan_cache().get_or_plan(&key, || {
                        let ts = model::switch_tensors_at(
                            cfg,
                            (&a.strategy, a.offset),
                            (&b.strategy, b.offset),
                        )
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
            packings: packings.to_vec(),
            me,
            concurrent,
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

    /// Binds `moved` (member `i`'s whole local pieces) on the backend: under ZeRO-3 only this
    /// rank's flat chunk of every piece.
    fn upload<B: Backend>(&self, be: &B, i: usize, moved: &[Vec<f32>]) -> Result<Vec<B::Buffer>> {
        let m = &self.members[i];
        let local = m.local(self.me).unwrap_or(0);
        Ok(runtime::zero::bind_params(be, &m.strategy, local, moved)?)
    }

    /// Bucket `b`'s forward and backward under its member on this rank, the parameters
    /// `bound`: its loss, its peak bytes and its gradients as whole local pieces (reduced over
    /// the member's DP; gathered from their flat chunks under ZeRO-2/3).
    #[allow(clippy::too_many_arguments)]
    fn pass<B: Backend>(
        &mut self,
        be: &B,
        groups: &mut RankGroups,
        bound: &[B::Buffer],
        seqs: &[Vec<u32>],
        b: usize,
        scale: f32,
        schedule: Schedule,
    ) -> Result<(f32, usize, Vec<Vec<f32>>)> {
        let me = self.me;
        let packing = self.packings[b];
        let m = &mut self.members[self.member_of[b]];
        let local = m.local(me).ok_or_else(|| TrainError::Rank {
            rank: me,
            reason: format!("asked to run {}, which is not on this device", m.strategy),
        })?;
        let mbs = runtime::rank_micro_batches(seqs, &packing, &m.strategy, local, scale)?;
        let exec = m.exec.as_ref().ok_or_else(|| TrainError::Rank {
            rank: me,
            reason: format!("{} runs here but has no graph", m.strategy),
        })?;
        let g = match m.groups.as_mut() {
            Some(g) => g,
            None => &mut *groups,
        };
        let res = pipeline_step(be, exec, g, bound, &m.shared, &mbs, schedule)?;
        let mut grads: Vec<Vec<f32>> = res
            .grads
            .into_iter()
            .map(|g| runtime::host::release_to_host(be, g))
            .collect::<std::result::Result<_, _>>()?;
        if m.strategy.zero >= Zero::Gradients {
            // Flat 1/dp chunks of the DP-summed pieces: gather the whole pieces to switch.
            let lens = m
                .spec_of
                .iter()
                .map(|&k| {
                    let (shape, dist) = &m.placement[k];
                    Ok(dist
                        .piece_of(DeviceId(me), shape)?
                        .map_or(0, |p| p.region.volume()))
                })
                .collect::<Result<Vec<_>>>()?;
            let g = match m.groups.as_ref() {
                Some(g) => g,
                None => &*groups,
            };
            runtime::zero::whole_grads(&m.strategy, g, &mut grads, &lens)?;
        }
        Ok((res.loss, res.peak_bytes, grads))
    }

    /// The step's summed gradients `a` (the instantiation's whole local pieces) as the
    /// optimizer takes them: its flat chunks under ZeRO-2/3.
    fn to_optimizer<B: Backend>(&self, be: &B, a: Vec<Vec<f32>>) -> Result<Vec<B::Buffer>> {
        let s = &self.members[self.inst].strategy;
        Ok(runtime::zero::optimizer_grads(be, s, self.me, a)?)
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
        let todo: Vec<usize> = (0..buckets.len())
            .filter(|&i| !buckets[i].is_empty())
            .collect();
        if todo.is_empty() {
            return Err(TrainError::setting("global_batch", "an empty global batch"));
        }
        let seqs =
            |b: usize| -> Vec<Vec<u32>> { buckets[b].iter().map(|&k| batch[k].clone()).collect() };
        if self.concurrent {
            return self.step_concurrent(be, world, opt, groups, &todo, &seqs, scale, schedule);
        }
        let me = self.me;
        let inst = self.inst;
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
                let bufs = self.upload(be, i, &moved)?;
                hosts.insert(i, moved);
                switching += ts.elapsed().as_secs_f64();
                Some(bufs)
            };
            let bound: &[B::Buffer] = match &device {
                Some(b) => b,
                None => opt.params(),
            };
            let (loss, peak, grads) = self.pass(be, groups, bound, &seqs(b), b, scale, schedule)?;
            out.loss += loss;
            out.peak_bytes = out.peak_bytes.max(peak);
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
                    add(&mut a, grads);
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
        out.grads = self.to_optimizer(be, a)?;
        Ok(out)
    }

    /// A step of a concurrent plan, in three phases so that the groups compute at the same
    /// time: every strategy a bucket needs gets the parameters from the instantiation's layout
    /// (every rank takes part in every switch: the senders are wherever the pieces are), each
    /// rank runs its group's buckets one after another, then every bucket's gradients switch
    /// home and are summed there in bucket order (the same order on every rank and in every
    /// run). The loss is each bucket's as its first device saw it, summed over the world.
    #[allow(clippy::too_many_arguments)]
    fn step_concurrent<B: Backend>(
        &mut self,
        be: &B,
        world: &dyn Communicator,
        opt: &Optimizer<B>,
        groups: &mut RankGroups,
        todo: &[usize],
        seqs: &dyn Fn(usize) -> Vec<Vec<u32>>,
        scale: f32,
        schedule: Schedule,
    ) -> Result<HotStep<B>> {
        let (me, inst) = (self.me, self.inst);
        let mut out = HotStep {
            loss: 0.0,
            grads: Vec::new(),
            peak_bytes: 0,
            metrics: HotMetrics::default(),
        };
        let mut bytes = 0u64;
        let ts = Instant::now();
        let home = opt.params_host(be, groups)?;
        let mut bound: BTreeMap<usize, Vec<B::Buffer>> = BTreeMap::new();
        let mut needed: Vec<usize> = Vec::new();
        for &b in todo {
            if !needed.contains(&self.member_of[b]) {
                needed.push(self.member_of[b]);
            }
        }
        for &i in &needed {
            let moved = self.switch(world, home.clone(), inst, i, &mut bytes)?;
            if self.members[i].local(me).is_some() {
                bound.insert(i, self.upload(be, i, &moved)?);
            }
        }
        drop(home);
        out.metrics.switch_seconds += ts.elapsed().as_secs_f64();
        let mut grads_of: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
        let mut loss = 0.0f64;
        let mut seconds: BTreeMap<usize, f64> = BTreeMap::new();
        for &b in todo {
            let i = self.member_of[b];
            let Some(params) = bound.get(&i) else {
                continue;
            };
            let t0 = Instant::now();
            let (l, peak, grads) = self.pass(be, groups, params, &seqs(b), b, scale, schedule)?;
            if self.members[i].local(me) == Some(0) {
                loss += f64::from(l);
                *seconds.entry(i).or_default() += t0.elapsed().as_secs_f64();
            }
            out.peak_bytes = out.peak_bytes.max(peak);
            grads_of.insert(b, grads);
        }
        drop(bound);
        // Every rank reports every group's seconds (as its first device clocked them), each
        // strategy named with its first device: `tp2@2`.
        for &i in &needed {
            let m = &self.members[i];
            let t = comm::words::all_sum_f64(world, seconds.get(&i).copied().unwrap_or(0.0))?;
            *out.metrics
                .strategy_seconds
                .entry(format!("{}@{}", m.strategy, m.offset))
                .or_default() += t;
        }
        let ts = Instant::now();
        let mut acc: Option<Vec<Vec<f32>>> = None;
        for &b in todo {
            let grads = grads_of.remove(&b).unwrap_or_default();
            let g = self.switch(world, grads, self.member_of[b], inst, &mut bytes)?;
            match acc.as_mut() {
                None => acc = Some(g),
                Some(a) => add(a, g),
            }
        }
        out.loss = comm::words::all_sum_f64(world, loss)? as f32;
        out.metrics.switch_seconds += ts.elapsed().as_secs_f64();
        out.metrics.switch_bytes = bytes;
        let a = acc.ok_or_else(|| TrainError::Rank {
            rank: me,
            reason: "no strategy ran".into(),
        })?;
        out.grads = self.to_optimizer(be, a)?;
        Ok(out)
    }
}

/// `a += g`, piece by piece.
fn add(a: &mut [Vec<f32>], g: Vec<Vec<f32>>) {
    for (x, g) in a.iter_mut().zip(g) {
        for (u, v) in x.iter_mut().zip(g) {
            *u += v;
        }
    }
}

/// Plans shared by the rank threads of this process.
fn plan_cache() -> &'static switch::PlanCache {
    static CACHE: std::sync::OnceLock<switch::PlanCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(switch::PlanCache::new)
}
