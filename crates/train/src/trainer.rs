//! One rank's training loop as a step plus hooks: [`Trainer::step`] computes the gradients and
//! applies the update (with periodic averaging when it is due); after it, the hooks —
//! [`Trainer::evaluate`], [`Trainer::report`], [`Trainer::agree_to_stop`] and
//! [`Trainer::checkpoint`] — each do one thing. `Job::run` strings them together.

use std::sync::Arc;
use std::time::Instant;

use comm::wire::{Wire, WireMeter};
use comm::{words, Communicator};
use kernels::Backend;
use model::{rank_exec, rank_params, Held, RankParams};
use runtime::{Optimizer, RankGroups};

use crate::error::{Result, TrainError};
use crate::job::{Collected, Job, Msg};
use crate::metrics::{EvalMetrics, SimulatedMetrics, SimulatedPhases, StepMetrics, WireMetrics};
use crate::priority::{Priority, Summing};
use crate::rank_state::RankState;
use crate::runner::{StaticRunner, StepInput, StepRunner};
use crate::stashing::{Applied, TwoBw};
use crate::sync::Replicas;

/// Periodic averaging (local SGD, DiLoCo, gossip): between synchronisations a data replica's
/// gradients are its own (its DP groups are its CP group: itself alone without CP, else the
/// ranks that share its tokens); the replicas average over the ranks holding the same piece in
/// the other data replicas, and the real DP groups are kept for evaluation.
struct Averaging {
    replicas: Replicas,
    /// The real DP group and its gradient twin, while the step's groups hold the replica's own.
    real_dp: (Box<dyn Communicator>, Box<dyn Communicator>),
}

impl Averaging {
    /// Runs `f` with `groups` over the real DP groups (an evaluation), then puts the replica's
    /// own back, whatever `f` returned.
    fn with_real_dp<T>(
        &mut self,
        groups: &mut RankGroups,
        f: impl FnOnce(&mut RankGroups) -> T,
    ) -> T {
        std::mem::swap(&mut groups.dp, &mut self.real_dp.0);
        std::mem::swap(&mut groups.dp_grads, &mut self.real_dp.1);
        let out = f(groups);
        std::mem::swap(&mut groups.dp, &mut self.real_dp.0);
        std::mem::swap(&mut groups.dp_grads, &mut self.real_dp.1);
        out
    }
}

/// Whether a hook that runs every `every` steps runs after 0-based `step` of `steps` (and after
/// the last).
fn due(every: Option<usize>, step: usize, steps: usize) -> bool {
    every.is_some_and(|e| (step + 1).is_multiple_of(e) || step + 1 == steps)
}

/// What one step did, for the hooks after it.
pub(crate) struct StepDone {
    /// The 0-based step.
    pub step: usize,
    metrics: StepMetrics,
    /// The replicas are one after this step (always without periodic averaging).
    synced: bool,
}

/// One rank's state across the steps of a run.
pub(crate) struct Trainer<'j, B: Backend> {
    job: &'j Job,
    be: &'j B,
    world: Wire,
    meter: Arc<WireMeter>,
    clock: Option<&'j sim::Clock>,
    me: usize,
    /// What every rank holds (world rank 0 only).
    all_held: Vec<Held>,
    opt: Optimizer<B>,
    groups: RankGroups,
    runner: Box<dyn StepRunner<B>>,
    averaging: Option<Averaging>,
    /// The runner of `--eval-data` (on the optimizer's weights, under its strategy) and how
    /// often it runs.
    eval: Option<(StaticRunner, usize)>,
    checkpoint_every: Option<usize>,
    peak: usize,
    /// `--comm-schedule priority`: the update that runs during the next step.
    priority: Option<Priority<B>>,
    /// `--pipeline-schedule pipedream-2bw`: the pipeline kept in flight from step to step.
    two_bw: Option<TwoBw<B>>,
}

impl<'j, B: Backend> Trainer<'j, B> {
    /// Rank `world.rank()` of `job` on `be`: its groups, optimizer, averaging and runners, and
    /// what a resumed checkpoint restores.
    pub fn start(
        job: &'j Job,
        be: &'j B,
        world: &dyn Communicator,
        clock: Option<&'j sim::Clock>,
    ) -> Result<Self> {
        let cfg = &job.cfg;
        let model = &cfg.model;
        // Every byte this rank sends, by link class (nodes of `devices_per_node` ranks).
        let meter = Arc::new(WireMeter::default());
        let per = job.devices_per_node.max(1);
        let nodes = Arc::new((0..world.size()).map(|r| r / per).collect::<Vec<_>>());
        let all: Vec<comm::Rank> = (0..world.size()).map(comm::Rank).collect();
        let world = Wire::new(world.sub_group(&all)?, nodes, meter.clone());
        let me = world.rank().0;
        let all_held = if me == 0 {
            job.everyones_held(world.size())?
        } else {
            Vec::new()
        };
        let (_, _, tp_rank) = job.inst.coords(me);
        let exec = rank_exec(model, &job.inst, me)?;
        let mut groups = RankGroups::new(&world, &job.inst)?.with_agreement(job.agreement.clone());
        groups.bucket_bytes = job.buckets.bytes(&job.inst);
        groups.comm_schedule = cfg.comm_schedule;
        let priority = match cfg.comm_schedule {
            runtime::CommSchedule::Priority => Some(Priority::start(
                &world,
                &job.inst,
                &exec,
                groups.bucket_bytes,
            )?),
            runtime::CommSchedule::Fifo => None,
        };
        let (mut opt, RankParams { shared, .. }) =
            crate::optim::start(cfg, be, &exec, &groups, &job.weights, tp_rank)?;
        let mut averaging = None;
        if cfg.sync.every().is_some() {
            let (_, my_cp) = job.inst.data_coords(me);
            let dp: Vec<comm::Rank> = job
                .inst
                .group(me, graph::MeshAxis::Dp)
                .into_iter()
                .filter(|&r| job.inst.data_coords(r).1 == my_cp)
                .map(comm::Rank)
                .collect();
            let own: Vec<comm::Rank> = job
                .inst
                .group(me, graph::MeshAxis::Cp)
                .into_iter()
                .map(comm::Rank)
                .collect();
            let real_dp = std::mem::replace(&mut groups.dp, world.sub_group(&own)?);
            let real_grads = std::mem::replace(&mut groups.dp_grads, world.sub_group(&own)?);
            let replicas = Replicas::new(
                cfg.sync,
                world.sub_group(&dp)?,
                opt.params_host(be, &groups)?,
            );
            averaging = Some(Averaging {
                replicas,
                real_dp: (real_dp, real_grads),
            });
        }
        if let Some(ck) = &job.resumed {
            let m = rank_params(model, &exec, &ck.exp_avg, tp_rank)?.params;
            let v = rank_params(model, &exec, &ck.exp_avg_sq, tp_rank)?.params;
            opt.restore(be, &m, &v, ck.step)?;
            let state = RankState::of_rank(&ck.state, me);
            job.agreement.restore(me, state.agreement)?;
            if let Some(a) = &mut averaging {
                a.replicas.restore(be, &mut opt, state.averaging)?;
            }
        }
        let eval = match &job.eval_data {
            Some(_) => Some((
                StaticRunner::new(
                    rank_exec(model, &job.inst, me)?,
                    shared.clone(),
                    cfg.packing_of(0),
                    cfg.pipeline_schedule,
                ),
                cfg.eval.as_ref().and_then(|e| e.every).unwrap_or(cfg.steps),
            )),
            None => None,
        };
        let two_bw = match cfg.pipeline_schedule.flushless() {
            true => Some(TwoBw::new(
                rank_exec(model, &job.inst, me)?,
                shared.clone(),
                cfg.packing_of(0),
                job.start_step,
            )),
            false => None,
        };
        let runner = job.runner::<B>(&world, exec, shared)?;
        Ok(Trainer {
            job,
            be,
            world,
            meter,
            clock,
            me,
            all_held,
            opt,
            groups,
            runner,
            averaging,
            eval,
            checkpoint_every: cfg
                .checkpoint
                .as_ref()
                .map(|c| c.every.unwrap_or(cfg.steps)),
            peak: 0,
            priority,
            two_bw,
        })
    }

    /// Step `step` (0-based): the global batch's gradients, the update, and periodic averaging
    /// when it is due.
    pub fn step(&mut self, step: usize) -> Result<StepDone> {
        let (job, be, me) = (self.job, self.be, self.me);
        let cfg = &job.cfg;
        job.heartbeats.step(me, step + 1);
        if let Some(f) = &job.fault {
            f.at(me, step + 1);
        }
        let started = Instant::now();
        let clock0 = self.clock.map(sim::Clock::read);
        let batch = job.data.batch(step, cfg.global_batch, cfg.shuffle_seed());
        let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
        let tokens: usize = batch.iter().map(Vec::len).sum();
        // A replica of periodic averaging takes the mean over its own share's tokens.
        let own = match &self.averaging {
            Some(_) => job.own_predicted(&batch, me),
            None => predicted,
        };
        let t_grads = Instant::now();
        let loss_scale = 1.0 / own.max(1) as f32;
        let lr = cfg.lr.at(step, cfg.steps);
        let t_opt;
        let (out, norm, staleness) = if self.two_bw.is_some() {
            t_opt = None;
            let (loss, norm, peak_bytes, staleness) = self.step_two_bw(step, &batch, loss_scale)?;
            let out = crate::runner::StepGradients::<B> {
                loss,
                grads: Vec::new(),
                peak_bytes,
                hot: None,
                plan: None,
                presummed: None,
            };
            (out, norm, staleness)
        } else {
            let agreement = self.groups.agreement.clone();
            let summing = Summing {
                agreement: agreement.as_ref(),
                strategy: &job.inst,
                timeout: self.world.timeout() + crate::watchdog::MARGIN,
            };
            let (runner, groups, world) = (&mut self.runner, &mut self.groups, &self.world);
            let mut compute = |gate: Option<&runtime::Gate<B>>, optimizer: &Optimizer<B>| {
                runner.gradients(StepInput {
                    backend: be,
                    world,
                    optimizer,
                    groups,
                    batch: &batch,
                    loss_scale,
                    gate,
                })
            };
            let (mut out, previous) = match &mut self.priority {
                // The last step's update is summed and applied while this one computes.
                Some(p) => p.overlap(be, &mut self.opt, &summing, compute)?,
                None => (compute(None, &self.opt)?, None),
            };
            if let Some(norm) = previous {
                self.release(norm);
            }
            crate::settings::SlowRank::delay(&cfg.slow_ranks, me, t_grads.elapsed());
            if let Some(a) = &self.averaging {
                // The loss of the global batch: the replicas' means weighted by their tokens.
                out.loss = a.replicas.weighted_loss(out.loss, own, predicted)?;
            }
            if !out.loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss: out.loss,
                });
            }
            t_opt = runtime::profile::enabled().then(Instant::now);
            let norm = match &mut self.priority {
                Some(p) => {
                    p.defer(std::mem::take(&mut out.grads), lr, out.presummed);
                    // A hook after this step reads the weights: its update cannot wait.
                    let eval_every = self.eval.as_ref().map(|e| e.1);
                    if step + 1 == cfg.steps
                        || due(self.checkpoint_every, step, cfg.steps)
                        || due(eval_every, step, cfg.steps)
                    {
                        p.settle(be, &mut self.opt, &summing)?.unwrap_or(f64::NAN)
                    } else {
                        // Known once the next step has applied the update (see `report`).
                        f64::NAN
                    }
                }
                None => {
                    self.opt
                        .update(be, &mut self.groups, std::mem::take(&mut out.grads), lr)?
                }
            };
            (out, norm, None)
        };
        let mut synced = true;
        if let Some(a) = &mut self.averaging {
            synced = false;
            if a.replicas.due(step + 1, cfg.steps) {
                // Gossip makes the replicas one only where one model is read.
                let eval_every = self.eval.as_ref().map(|e| e.1);
                let at = |e: Option<usize>| e.is_some_and(|e| (step + 1).is_multiple_of(e));
                let everyone = step + 1 == cfg.steps || at(self.checkpoint_every) || at(eval_every);
                a.replicas
                    .synchronise(be, &mut self.opt, &self.groups, everyone)?;
                synced = everyone || !matches!(cfg.sync, crate::SyncMode::Gossip { .. });
            }
        }
        if let Some(t) = t_opt {
            be.synchronize()?;
            runtime::profile::record("optimizer (norm+AdamW)", t.elapsed().as_secs_f64());
        }
        self.peak = self.peak.max(out.peak_bytes);
        // Every rank's peak and bytes on the wire, and the simulated clock's time, of the step
        // alone (an evaluation after it is not counted).
        let peak_bytes = words::all_max(&self.world, out.peak_bytes as u64)?;
        let sent = self.meter.take();
        let wire = words::all_sum(&self.world, &[sent.intra_node, sent.inter_node])?;
        let simulated = match (self.clock, &clock0) {
            (Some(c), Some(c0)) => {
                let d = c.read().since(c0);
                use sim::Phase::*;
                Some(SimulatedMetrics {
                    simulated_seconds: d.now,
                    simulated_kernels: d.kernels,
                    simulated: SimulatedPhases {
                        compute: d.phase(Compute),
                        elementwise: d.phase(Elementwise),
                        optimizer: d.phase(Optimizer),
                        transfer: d.phase(Transfer),
                        wait: d.phase(Wait),
                    },
                })
            }
            _ => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepDone {
            step,
            metrics: StepMetrics {
                step: step as u64 + 1,
                loss: out.loss,
                grad_norm: norm,
                lr,
                tokens: tokens as u64,
                seconds,
                tokens_per_s: tokens as f64 / seconds,
                peak_bytes,
                plan: out.plan,
                hot: out.hot,
                simulated,
                wire: Some(WireMetrics {
                    wire_intra_node_bytes: wire[0],
                    wire_inter_node_bytes: wire[1],
                }),
                weight_staleness: staleness,
                ..Default::default()
            },
            synced,
        })
    }

    /// Hook: the held-out loss when `--eval-every` says so (on every rank; over the real DP
    /// groups under periodic averaging, whose configuration puts evaluations at
    /// synchronisations).
    pub fn evaluate(&mut self, done: &mut StepDone) -> Result<()> {
        let (job, be) = (self.job, self.be);
        let (Some((runner, every)), Some(data)) = (&mut self.eval, &job.eval_data) else {
            return Ok(());
        };
        if !due(Some(*every), done.step, job.cfg.steps) {
            return Ok(());
        }
        job.heartbeats.beat(self.me, "evaluation");
        let (world, opt, batch) = (&self.world, &self.opt, job.cfg.global_batch);
        let mut sum = |groups: &mut RankGroups| {
            crate::loss::loss_sum::<B>(runner, be, world, opt, groups, data, batch)
        };
        let (sum, n) = match &mut self.averaging {
            Some(a) => a.with_real_dp(&mut self.groups, sum)?,
            None => sum(&mut self.groups)?,
        };
        let e = crate::loss::evaluation(sum, n, data.sequences().len());
        done.metrics.eval = Some(EvalMetrics {
            eval_loss: e.loss,
            eval_perplexity: e.perplexity,
        });
        Ok(())
    }

    /// Hook: the step's metrics to the reporting thread (from world rank 0); under the
    /// priority schedule, once its update (and so its gradient norm) is done.
    pub fn report(&mut self, done: &StepDone) {
        if let Some(p) = self.priority.as_mut().filter(|p| p.pending()) {
            p.hold(done.metrics.clone());
            return;
        }
        if let Some(t) = self.two_bw.as_mut().filter(|t| t.pending()) {
            t.hold(done.metrics.clone());
            return;
        }
        self.send(done.metrics.clone());
    }

    fn send(&self, metrics: StepMetrics) {
        if self.me == 0 {
            let _ = self.job.tx.send(Msg::Step(Box::new(metrics)));
        }
    }

    /// A run that fails: the held metrics of the step whose update (priority) or gradients
    /// (PipeDream-2BW) never came, as far as they are known (the rest NaN, `null` in JSON).
    fn report_unfinished(&mut self) {
        let held = match (&mut self.priority, &mut self.two_bw) {
            (Some(p), _) => p.release(f64::NAN),
            (_, Some(t)) => t.abandon(),
            _ => None,
        };
        if let Some(m) = held {
            self.send(m);
        }
    }

    /// The held metrics of the step whose update just finished, with its norm.
    fn release(&mut self, norm: f64) {
        if let Some(m) = self.priority.as_mut().and_then(|p| p.release(norm)) {
            self.send(m);
        }
    }

    /// Applies a pending priority update now (a stop, the end of the run) and reports its step.
    fn settle(&mut self) -> Result<()> {
        if self.two_bw.is_some() {
            return self.drain_two_bw().map(|_| ());
        }
        let Some(p) = self.priority.as_mut() else {
            return Ok(());
        };
        let agreement = self.groups.agreement.clone();
        let summing = Summing {
            agreement: agreement.as_ref(),
            strategy: &self.job.inst,
            timeout: self.world.timeout() + crate::watchdog::MARGIN,
        };
        if let Some(norm) = p.settle(self.be, &mut self.opt, &summing)? {
            self.release(norm);
        }
        Ok(())
    }

    /// Step `step` under PipeDream-2BW: its micro-batches enter the pipeline while the last
    /// step's finish, whose gradients are applied now (and their metrics sent). Before a hook
    /// that reads the weights the pipeline drains, so this step's loss, norm and staleness are
    /// known; otherwise they are NaN until the next step. Also returns the step's peak bytes.
    fn step_two_bw(
        &mut self,
        step: usize,
        batch: &[Vec<u32>],
        loss_scale: f32,
    ) -> Result<(f32, f64, usize, Option<u64>)> {
        let (be, me, cfg) = (self.be, self.me, &self.job.cfg);
        let lr = |s: u64| cfg.lr.at(s as usize, cfg.steps);
        let Some(t) = self.two_bw.as_mut() else {
            return Ok((f32::NAN, f64::NAN, 0, None));
        };
        let (last, peak) = t.step(
            be,
            &mut self.opt,
            &mut self.groups,
            batch,
            me,
            loss_scale,
            &lr,
        )?;
        let released = last.as_ref().and_then(|a| t.release(a));
        if let Some(m) = released {
            self.send(m);
        }
        let eval_every = self.eval.as_ref().map(|e| e.1);
        let flush = step + 1 == cfg.steps
            || due(self.checkpoint_every, step, cfg.steps)
            || due(eval_every, step, cfg.steps);
        let now = if flush { self.drain_two_bw()? } else { None };
        Ok(match now {
            Some(a) => (a.loss, a.norm, peak, Some(a.staleness)),
            None => (f32::NAN, f64::NAN, peak, None),
        })
    }

    /// Drains the 2BW pipeline (a flush) and applies the step in flight; sends its held
    /// metrics, if any (a stop or the end), and returns what was applied.
    fn drain_two_bw(&mut self) -> Result<Option<Applied>> {
        let (be, cfg) = (self.be, &self.job.cfg);
        let lr = |s: u64| cfg.lr.at(s as usize, cfg.steps);
        let Some(t) = self.two_bw.as_mut() else {
            return Ok(None);
        };
        let applied = t.drain(be, &mut self.opt, &mut self.groups, &lr)?;
        let released = applied.as_ref().and_then(|a| t.release(a));
        if let Some(m) = released {
            self.send(m);
        }
        Ok(applied)
    }

    /// Hook: whether the run stops after this step, asked by a signal: every rank agrees,
    /// whoever saw it first; stopping between synchronisations makes the replicas one first.
    pub fn agree_to_stop(&mut self, done: &mut StepDone) -> Result<bool> {
        let cfg = &self.job.cfg;
        let stop = match &cfg.stop {
            Some(flag) => {
                let mine = u64::from(flag.load(std::sync::atomic::Ordering::Relaxed));
                words::all_max(&self.world, mine)? > 0 && done.step + 1 < cfg.steps
            }
            None => false,
        };
        if stop && !done.synced {
            if let Some(a) = &mut self.averaging {
                a.replicas
                    .synchronise(self.be, &mut self.opt, &self.groups, true)?;
                done.synced = true;
            }
        }
        Ok(stop)
    }

    /// Hook: a checkpoint when `--checkpoint-every` says so, or when stopping early with a
    /// checkpoint directory.
    pub fn checkpoint(&mut self, done: &StepDone, stopping: bool) -> Result<()> {
        if stopping {
            self.settle()?;
        }
        let every = self.checkpoint_every;
        if !(due(every, done.step, self.job.cfg.steps) || (stopping && every.is_some())) {
            return Ok(());
        }
        let be = self.be;
        self.job.heartbeats.beat(self.me, "checkpoint");
        let averaging = match &self.averaging {
            Some(a) => a.replicas.state(be, &self.opt, &self.groups)?,
            None => Vec::new(),
        };
        let kept = RankState {
            agreement: self.job.agreement.state(self.me),
            averaging,
        };
        let mo = self.opt.state_host(be, &self.groups)?;
        let sets = vec![
            self.opt.params_host(be, &self.groups)?,
            mo.exp_avg,
            mo.exp_avg_sq,
            crate::gather::named_to_set(kept.to_named()),
        ];
        if let Some(all) = crate::gather::to_root(&self.world, sets)? {
            let parts = all
                .into_iter()
                .zip(&self.all_held)
                .map(|(mut sets, h)| {
                    let kept = RankState::from_named(crate::gather::set_to_named(
                        sets.pop().unwrap_or_default(),
                    )?);
                    let v = sets.pop().unwrap_or_default();
                    let m = sets.pop().unwrap_or_default();
                    let p = sets.pop().unwrap_or_default();
                    Ok(([p, m, v], h.clone(), kept))
                })
                .collect::<Result<Vec<_>>>()?;
            let _ = self.job.tx.send(Msg::Checkpoint {
                step: done.step as u64 + 1,
                parts,
            });
        }
        Ok(())
    }

    /// After the last step: on world rank 0, every rank's final pieces and peak bytes.
    pub fn finish(mut self) -> Result<Option<Collected>> {
        self.settle()?;
        self.job.heartbeats.beat(self.me, "collecting the weights");
        // Every rank's peak, exactly: an all-gather of integers.
        let peaks = words::all_gather(&self.world, self.peak as u64)?;
        let sets = vec![self.opt.params_host(self.be, &self.groups)?];
        let Some(all) = crate::gather::to_root(&self.world, sets)? else {
            return Ok(None);
        };
        let pieces = all
            .into_iter()
            .zip(self.all_held)
            .map(|(mut sets, h)| (sets.pop().unwrap_or_default(), h))
            .collect();
        Ok(Some((
            pieces,
            peaks.into_iter().map(|p| p as usize).collect(),
        )))
    }
}

impl Job {
    /// The training loop of one rank on backend `be`; returns (on world rank 0) every rank's
    /// final pieces and peak bytes. With a `clock` (the simulator's), each step's metrics add
    /// its time.
    pub fn run<B: Backend>(
        &self,
        be: &B,
        world: &dyn Communicator,
        clock: Option<&sim::Clock>,
    ) -> Result<Option<Collected>> {
        let mut trainer = Trainer::start(self, be, world, clock)?;
        for step in self.start_step..self.cfg.steps {
            let mut done = match trainer.step(step) {
                Ok(done) => done,
                Err(e) => {
                    // The step before, whose update or gradients were still pending, keeps its
                    // line with what was known of it.
                    trainer.report_unfinished();
                    return Err(e);
                }
            };
            trainer.evaluate(&mut done)?;
            trainer.report(&done);
            let stop = trainer.agree_to_stop(&mut done)?;
            trainer.checkpoint(&done, stop)?;
            if stop {
                if world.rank().0 == 0 {
                    let _ = self.tx.send(Msg::Stopped { step: step + 1 });
                }
                break;
            }
        }
        trainer.finish()
    }
}
