//! One rank's training loop: its pieces of the weights and the optimizer, every step's
//! gradients from the step runner, the update, metrics and checkpoints.

use std::sync::Arc;
use std::time::Instant;

use comm::wire::{Wire, WireMeter};
use comm::{words, Communicator};
use kernels::Backend;
use model::{rank_exec, rank_params, Held, RankParams};
use runtime::{Optimizer, RankGroups};

use crate::config::{StrategySpec, TrainConfig};
use crate::error::{Result, TrainError};
use crate::hot::{HotRank, HotSetup};
use crate::job::{Collected, Job, Msg};
use crate::metrics::{EvalMetrics, SimulatedMetrics, SimulatedPhases, StepMetrics, WireMetrics};
use crate::rank_state::RankState;
use crate::runner::{HotRunner, PlannedRunner, StaticRunner, StepInput, StepRunner};
use crate::sync::Replicas;

/// How many distinct plans' ranks automatic planning keeps.
pub const PLAN_CACHE: usize = 8;

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
        let cfg = &self.cfg;
        let model = &cfg.model;
        // Every byte this rank sends, by link class (nodes of `devices_per_node` ranks).
        let meter = Arc::new(WireMeter::default());
        let per = self.devices_per_node.max(1);
        let nodes = Arc::new((0..world.size()).map(|r| r / per).collect::<Vec<_>>());
        let all: Vec<comm::Rank> = (0..world.size()).map(comm::Rank).collect();
        let wired = Wire::new(world.sub_group(&all)?, nodes, meter.clone());
        let world: &dyn Communicator = &wired;
        let me = world.rank().0;
        let all_held = if me == 0 {
            self.everyones_held(world.size())?
        } else {
            Vec::new()
        };
        let (_, _, tp_rank) = self.inst.coords(me);
        let exec = rank_exec(model, &self.inst, me)?;
        let mut groups = RankGroups::new(world, &self.inst)?.with_agreement(self.agreement.clone());
        let (mut opt, RankParams { shared, .. }) =
            crate::optim::start(cfg, be, &exec, &groups, &self.weights, tp_rank)?;
        // Periodic averaging: between synchronisations a data replica's gradients are its own
        // (its DP groups are its CP group: itself alone without CP, else the ranks that share
        // its tokens); `replicas` averages over the ranks holding the same piece in the other
        // data replicas, and `dp_groups` keeps the real DP group for evaluation.
        let mut replicas = None;
        let mut dp_groups = None;
        if cfg.sync.every().is_some() {
            let (_, my_cp) = self.inst.data_coords(me);
            let dp: Vec<comm::Rank> = self
                .inst
                .group(me, graph::MeshAxis::Dp)
                .into_iter()
                .filter(|&r| self.inst.data_coords(r).1 == my_cp)
                .map(comm::Rank)
                .collect();
            let own: Vec<comm::Rank> = self
                .inst
                .group(me, graph::MeshAxis::Cp)
                .into_iter()
                .map(comm::Rank)
                .collect();
            let real_dp = std::mem::replace(&mut groups.dp, world.sub_group(&own)?);
            let real_grads = std::mem::replace(&mut groups.dp_grads, world.sub_group(&own)?);
            dp_groups = Some((real_dp, real_grads));
            replicas = Some(Replicas::new(
                cfg.sync,
                world.sub_group(&dp)?,
                opt.params_host(be, &groups)?,
            ));
        }
        if let Some(ck) = &self.resumed {
            let m = rank_params(model, &exec, &ck.exp_avg, tp_rank)?.params;
            let v = rank_params(model, &exec, &ck.exp_avg_sq, tp_rank)?.params;
            opt.restore(be, &m, &v, ck.step)?;
            let state = RankState::of_rank(&ck.state, me);
            self.agreement.restore(me, state.agreement)?;
            if let Some(r) = &mut replicas {
                r.restore(be, &mut opt, state.averaging)?;
            }
        }
        // Evaluation runs on the optimizer's weights, under its strategy.
        let mut eval_runner = match &self.eval_data {
            Some(_) => Some(StaticRunner::new(
                rank_exec(model, &self.inst, me)?,
                shared.clone(),
                cfg.budget(0),
                cfg.pipeline_schedule,
            )),
            None => None,
        };
        let eval_every = cfg.eval.as_ref().map(|e| e.every.unwrap_or(cfg.steps));
        let mut runner = self.runner::<B>(world, exec, shared)?;
        let every = cfg
            .checkpoint
            .as_ref()
            .map(|c| c.every.unwrap_or(cfg.steps));
        let mut peak_all = 0usize;
        for step in self.start_step..cfg.steps {
            self.heartbeats.step(me, step + 1);
            if let Some(f) = &self.fault {
                f.at(me, step + 1);
            }
            let t0 = Instant::now();
            let clock0 = clock.map(sim::Clock::read);
            let batch = self.data.batch(step, cfg.global_batch, cfg.shuffle_seed());
            let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
            let tokens: usize = batch.iter().map(Vec::len).sum();
            // A replica of periodic averaging takes the mean over its own share's tokens.
            let own = match &replicas {
                Some(_) => self.own_predicted(&batch, me),
                None => predicted,
            };
            let t_grads = Instant::now();
            let mut out = runner.gradients(StepInput {
                backend: be,
                world,
                optimizer: &opt,
                groups: &mut groups,
                batch: &batch,
                loss_scale: 1.0 / own.max(1) as f32,
            })?;
            crate::settings::SlowRank::delay(&cfg.slow_ranks, me, t_grads.elapsed());
            if let Some(r) = &replicas {
                // The loss of the global batch: the replicas' means weighted by their tokens.
                out.loss = r.weighted_loss(out.loss, own, predicted)?;
            }
            if !out.loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss: out.loss,
                });
            }
            let lr = cfg.lr.at(step, cfg.steps);
            let t_opt = runtime::profile::enabled().then(Instant::now);
            let norm = opt.update(be, &mut groups, out.grads, lr)?;
            let mut synced = false;
            if let Some(r) = &mut replicas {
                if r.due(step + 1, cfg.steps) {
                    // Gossip makes the replicas one only where one model is read.
                    let at = |e: Option<usize>| e.is_some_and(|e| (step + 1) % e == 0);
                    let everyone = step + 1 == cfg.steps || at(every) || at(eval_every);
                    r.synchronise(be, &mut opt, &groups, everyone)?;
                    // The replicas are one now (gossip: only when everyone averaged).
                    synced = everyone || !matches!(cfg.sync, crate::SyncMode::Gossip { .. });
                }
            }
            if let Some(t) = t_opt {
                be.synchronize()?;
                runtime::profile::record("optimizer (norm+AdamW)", t.elapsed().as_secs_f64());
            }
            let peak = words::all_max(world, out.peak_bytes as u64)?;
            let sent = meter.take();
            let wire = words::all_sum(world, &[sent.intra_node, sent.inter_node])?;
            peak_all = peak_all.max(out.peak_bytes);
            let simulated = match (clock, &clock0) {
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
            let seconds = t0.elapsed().as_secs_f64();
            let eval_due = eval_every.is_some_and(|e| (step + 1) % e == 0 || step + 1 == cfg.steps);
            let eval = match (&mut eval_runner, &self.eval_data) {
                (Some(r), Some(data)) if eval_due => {
                    self.heartbeats.beat(me, "evaluation");
                    // Periodic averaging evaluates at synchronisations (the configuration
                    // checks it), over the real DP groups.
                    if let Some((dp, grads)) = &mut dp_groups {
                        std::mem::swap(&mut groups.dp, dp);
                        std::mem::swap(&mut groups.dp_grads, grads);
                    }
                    let sum = crate::loss::loss_sum::<B>(
                        r,
                        be,
                        world,
                        &opt,
                        &mut groups,
                        data,
                        cfg.global_batch,
                    );
                    if let Some((dp, grads)) = &mut dp_groups {
                        std::mem::swap(&mut groups.dp, dp);
                        std::mem::swap(&mut groups.dp_grads, grads);
                    }
                    let (sum, n) = sum?;
                    let e = crate::loss::evaluation(sum, n, data.sequences().len());
                    Some(EvalMetrics {
                        eval_loss: e.loss,
                        eval_perplexity: e.perplexity,
                    })
                }
                _ => None,
            };
            if me == 0 {
                let _ = self.tx.send(Msg::Step(Box::new(StepMetrics {
                    step: step as u64 + 1,
                    loss: out.loss,
                    grad_norm: norm,
                    lr,
                    tokens: tokens as u64,
                    seconds,
                    tokens_per_s: tokens as f64 / seconds,
                    peak_bytes: peak,
                    plan: out.plan,
                    hot: out.hot,
                    simulated,
                    eval,
                    wire: Some(WireMetrics {
                        wire_intra_node_bytes: wire[0],
                        wire_inter_node_bytes: wire[1],
                    }),
                    ps: None,
                    fed: None,
                })));
            }
            let due = every.is_some_and(|e| (step + 1) % e == 0 || step + 1 == cfg.steps);
            // Asked to stop (a signal): every rank agrees on the step, whoever saw it first.
            let stop = match &cfg.stop {
                Some(flag) => {
                    let mine = u64::from(flag.load(std::sync::atomic::Ordering::Relaxed));
                    words::all_max(world, mine)? > 0 && step + 1 < cfg.steps
                }
                None => false,
            };
            if stop && !synced {
                // Stopping between synchronisations: the replicas become one first.
                if let Some(r) = &mut replicas {
                    r.synchronise(be, &mut opt, &groups, true)?;
                }
            }
            if due || (stop && every.is_some()) {
                self.heartbeats.beat(me, "checkpoint");
                let synced_state = match &replicas {
                    Some(r) => r.state(be, &opt, &groups)?,
                    None => Vec::new(),
                };
                self.send_checkpoint(be, world, &opt, &groups, &all_held, step + 1, synced_state)?;
            }
            if stop {
                if me == 0 {
                    let _ = self.tx.send(Msg::Stopped { step: step + 1 });
                }
                break;
            }
        }
        self.heartbeats.beat(me, "collecting the weights");
        // Every rank's peak, exactly: an all-gather of integers.
        let peaks = words::all_gather(world, peak_all as u64)?;
        let sets = vec![opt.params_host(be, &groups)?];
        let Some(all) = crate::gather::to_root(world, sets)? else {
            return Ok(None);
        };
        let pieces = all
            .into_iter()
            .zip(all_held)
            .map(|(mut sets, h)| (sets.pop().unwrap_or_default(), h))
            .collect();
        Ok(Some((
            pieces,
            peaks.into_iter().map(|p| p as usize).collect(),
        )))
    }

    /// Sends every rank's pieces of the weights and both moments after `step` steps to world
    /// rank 0, which passes them on to be written.
    #[allow(clippy::too_many_arguments)] // what a checkpoint is made of, each once
    fn send_checkpoint<B: Backend>(
        &self,
        be: &B,
        world: &dyn Communicator,
        opt: &Optimizer<B>,
        groups: &RankGroups,
        all_held: &[Held],
        step: usize,
        synced: Vec<(String, Vec<f32>)>,
    ) -> Result<()> {
        let mo = opt.state_host(be, groups)?;
        let kept = RankState {
            agreement: self.agreement.state(world.rank().0),
            averaging: synced,
        };
        let kept = crate::gather::named_to_set(kept.to_named());
        let sets = vec![
            opt.params_host(be, groups)?,
            mo.exp_avg,
            mo.exp_avg_sq,
            kept,
        ];
        if let Some(all) = crate::gather::to_root(world, sets)? {
            let parts = all
                .into_iter()
                .zip(all_held)
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
            let _ = self.tx.send(Msg::Checkpoint {
                step: step as u64,
                parts,
            });
        }
        Ok(())
    }

    /// The tokens this rank's DP replica predicts of `batch` (its share as the runtime deals).
    fn own_predicted(&self, batch: &[Vec<u32>], me: usize) -> usize {
        let (dp_rank, _) = self.inst.data_coords(me);
        let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
        let dealt = TrainConfig::packing(self.cfg.budget(0)).deal(&lens, self.inst.dp);
        dealt
            .get(dp_rank)
            .map(|mine| mine.iter().map(|&k| lens[k].saturating_sub(1)).sum())
            .unwrap_or(0)
    }

    /// What every rank holds (world rank 0 assembles checkpoints and the result from it).
    fn everyones_held(&self, size: usize) -> Result<Vec<Held>> {
        let mut by_stage: Vec<Option<Held>> = vec![None; self.inst.pp];
        (0..size)
            .map(|r| {
                let stage = self.inst.coords(r).0;
                if by_stage[stage].is_none() {
                    let exec = rank_exec(&self.cfg.model, &self.inst, r)?;
                    by_stage[stage] = Some(model::held(&self.cfg.model, &exec)?);
                }
                Ok(by_stage[stage].clone().unwrap_or_default())
            })
            .collect()
    }

    /// The step runner of the run's strategy spec.
    fn runner<B: Backend>(
        &self,
        world: &dyn Communicator,
        exec: graph::ExecGraph,
        shared: Vec<bool>,
    ) -> Result<Box<dyn StepRunner<B>>> {
        let cfg = &self.cfg;
        let schedule = cfg.pipeline_schedule;
        let setup = HotSetup {
            cfg: cfg.model.clone(),
            devices_per_node: self.devices_per_node,
            agreement: self.agreement.clone(),
            schedule,
        };
        Ok(match (&cfg.strategy, &self.planner) {
            (StrategySpec::Hot(plan), _) => {
                let budgets: Vec<usize> = (0..plan.buckets.len()).map(|i| cfg.budget(i)).collect();
                let rank = HotRank::new(plan, &budgets, &setup, world)?;
                Box::new(HotRunner::new(rank, schedule))
            }
            (StrategySpec::Auto(_), Some(planner)) => Box::new(PlannedRunner::new(
                planner.clone(),
                self.inst.clone(),
                cfg.budget(0),
                setup,
                PLAN_CACHE,
            )),
            _ => Box::new(StaticRunner::new(exec, shared, cfg.budget(0), schedule)),
        })
    }
}
