//! One rank's training loop: its pieces of the weights and the optimizer, every step's
//! gradients (static, hot-switched or planned), the update, metrics and checkpoints.

use std::time::Instant;

use comm::{Communicator, ReduceOp};
use data::Dataset;
use graph::Strategy;
use kernels::{AdamW, Backend};
use model::{rank_exec, rank_params, Checkpoint, LlamaConfig, RankParams, Weights};
use runtime::{pipeline_step, Optimizer, RankGroups, RuntimeError, Schedule};

use super::{lr_at, pack, Args, Collected, Msg, SimSetup};

/// Everything one rank needs for the run.
pub(super) struct RankJob<'a> {
    pub(super) args: &'a Args,
    pub(super) strategy: &'a Strategy,
    pub(super) cfg: &'a LlamaConfig,
    pub(super) weights: &'a Weights,
    pub(super) data: &'a Dataset,
    pub(super) resumed: Option<&'a Checkpoint>,
    pub(super) start_step: usize,
    pub(super) shuffle: Option<u64>,
    pub(super) schedule: Schedule,
    pub(super) tx: &'a std::sync::mpsc::Sender<Msg>,
    pub(super) hot: Option<&'a crate::hot::HotSchedule>,
    /// `--strategies auto`: the planner and the fixed instantiation strategy.
    pub(super) auto: Option<&'a (planner::Planner, Strategy)>,
    pub(super) devices_per_node: usize,
}

impl RankJob<'_> {
    /// [`RankJob::run`] on `be` and `world`, or, with `--sim-cluster`, on both wrapped in the
    /// simulator's clocked backend and communicator.
    pub(super) fn run_maybe_clocked<B: Backend>(
        &self,
        be: B,
        world: &dyn Communicator,
        sim: Option<&SimSetup>,
    ) -> anyhow::Result<Option<Collected>> {
        match sim {
            None => self.run(&be, world, None),
            Some((cluster, share)) => {
                let clock = sim::Clock::new();
                let mut be = sim::SimBackend::new(be, cluster, clock.clone());
                let mut world = sim::SimComm::over(world, cluster, clock.clone())?;
                if let Some(share) = share {
                    be = be.sharing(share.clone());
                    world = world.sharing(share.clone());
                }
                self.run(&be, &world, Some(&clock))
            }
        }
    }

    /// The training loop of one rank on backend `be`; returns its final pieces, what they are,
    /// and its peak bytes. With a `clock` (the simulator's), each step's metrics add its time.
    fn run<B: Backend>(
        &self,
        be: &B,
        world: &dyn Communicator,
        clock: Option<&sim::Clock>,
    ) -> anyhow::Result<Option<Collected>> {
        let me = world.rank().0;
        // What every rank holds (rank 0 assembles checkpoints and the result from it).
        let all_held: Vec<model::Held> = if me == 0 {
            let mut by_stage: Vec<Option<model::Held>> = vec![None; self.strategy.pp];
            (0..world.size())
                .map(|r| {
                    let stage = self.strategy.coords(r).0;
                    if by_stage[stage].is_none() {
                        let exec = rank_exec(self.cfg, self.strategy, r)?;
                        by_stage[stage] = Some(model::held(self.cfg, &exec)?);
                    }
                    Ok(by_stage[stage].clone().unwrap_or_default())
                })
                .collect::<anyhow::Result<_>>()?
        } else {
            Vec::new()
        };
        let (_, dp_rank, tp_rank) = self.strategy.coords(me);
        let exec = rank_exec(self.cfg, self.strategy, me)?;
        let mut groups = RankGroups::new(world, self.strategy)?;
        let RankParams { params, shared, .. } =
            rank_params(self.cfg, &exec, self.weights, tp_rank)?;
        let every = self
            .args
            .checkpoint_dir
            .as_ref()
            .map(|_| self.args.checkpoint_every.unwrap_or(self.args.steps));
        let adamw = AdamW {
            lr: self.args.lr,
            beta1: self.args.beta1,
            beta2: self.args.beta2,
            eps: self.args.eps,
            weight_decay: self.args.weight_decay,
        };
        let params = params
            .iter()
            .map(|p| be.upload(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut opt = Optimizer::new(
            be,
            &exec,
            &groups,
            params,
            &shared,
            adamw,
            self.args.grad_clip,
        )?;
        if let Some(ck) = &self.resumed {
            let m = rank_params(self.cfg, &exec, &ck.exp_avg, tp_rank)?.params;
            let v = rank_params(self.cfg, &exec, &ck.exp_avg_sq, tp_rank)?.params;
            opt.restore(be, &m, &v, ck.step)?;
        }
        // Hot-switching ranks by schedule (one for a fixed schedule; one per plan under auto).
        let mut hot_ranks: std::collections::HashMap<String, crate::hot::HotRank> =
            Default::default();
        let mut current: Option<String> = None;
        if let Some(h) = self.hot {
            let r = crate::hot::HotRank::new(
                h,
                self.cfg,
                world,
                &self.args.micro_batch_tokens,
                self.devices_per_node,
            )?;
            hot_ranks.insert(String::new(), r);
            current = Some(String::new());
        }
        let mut peak_all = 0usize;
        for step in self.start_step..self.args.steps {
            let t0 = Instant::now();
            let clock0 = clock.map(sim::Clock::read);
            let batch = self.data.batch(step, self.args.global_batch, self.shuffle);
            let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
            let tokens: usize = batch.iter().map(|s| s.len()).sum();
            let mut extra = String::new();
            if let Some((planner, inst)) = self.auto {
                // Every rank plans the same batch the same way.
                let tp = Instant::now();
                let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
                let (plan, est) = planner.auto_with(&lens, Some(inst))?;
                let key = plan.to_string();
                if !hot_ranks.contains_key(&key) {
                    let sched = crate::hot::HotSchedule::from_plan(&plan);
                    let r = crate::hot::HotRank::new(
                        &sched,
                        self.cfg,
                        world,
                        &self.args.micro_batch_tokens[..1],
                        self.devices_per_node,
                    )?;
                    hot_ranks.insert(key.clone(), r);
                }
                extra = format!(
                    ", \"plan\": {}, \"planning_seconds\": {:.6}, \"predicted_seconds\": {:.6}",
                    serde_json::to_string(&key)?,
                    tp.elapsed().as_secs_f64(),
                    est.seconds
                );
                current = Some(key);
            }
            let mut hot = current.as_ref().and_then(|k| hot_ranks.get_mut(k));
            let out = if let Some(h) = hot.as_mut() {
                let r = h.step(
                    be,
                    world,
                    &opt,
                    &batch,
                    1.0 / predicted as f32,
                    self.schedule,
                )?;
                extra += &format!(
                    ", \"strategy_seconds\": {}, \"switch_seconds\": {:.6}, \"switch_bytes\": {}",
                    serde_json::to_string(&r.strategy_seconds)?,
                    r.switch_seconds,
                    r.switch_bytes
                );
                runtime::StepGradients {
                    loss: r.loss,
                    grads: r.grads,
                    peak_bytes: r.peak_bytes,
                }
            } else {
                let mine: Vec<Vec<u32>> = batch
                    .into_iter()
                    .skip(dp_rank)
                    .step_by(self.strategy.dp)
                    .collect();
                let mbs = pack(
                    &mine,
                    self.args.micro_batch_tokens[0],
                    1.0 / predicted as f32,
                )?;
                pipeline_step(
                    be,
                    &exec,
                    &mut groups,
                    opt.params(),
                    &shared,
                    &mbs,
                    self.schedule,
                )?
            };
            if !out.loss.is_finite() {
                return Err(anyhow::Error::from(RuntimeError::Batch(format!(
                    "step {}: the loss is {}; stopping before the update, weights unchanged",
                    step + 1,
                    out.loss
                ))));
            }
            let lr = lr_at(self.args, step);
            let t_opt = runtime::profile::enabled().then(Instant::now);
            let norm = match hot.as_mut() {
                Some(h) => opt.update(be, h.inst_groups(), out.grads, lr)?,
                None => opt.update(be, &mut groups, out.grads, lr)?,
            };
            if let Some(t) = t_opt {
                be.synchronize()?;
                runtime::profile::record("optimizer (norm+AdamW)", t.elapsed().as_secs_f64());
            }
            let mut peak = [out.peak_bytes as f32];
            world.all_reduce(&mut peak, ReduceOp::Max)?;
            peak_all = peak_all.max(out.peak_bytes);
            if let (Some(c), Some(c0)) = (clock, &clock0) {
                let d = c.read().since(c0);
                use sim::Phase::*;
                extra += &format!(
                    ", \"simulated_seconds\": {:.6}, \"simulated\": {{\"compute\": {:.6}, \"elementwise\": {:.6}, \"optimizer\": {:.6}, \"transfer\": {:.6}, \"wait\": {:.6}}}",
                    d.now,
                    d.phase(Compute),
                    d.phase(Elementwise),
                    d.phase(Optimizer),
                    d.phase(Transfer),
                    d.phase(Wait)
                );
            }
            if me == 0 {
                let secs = t0.elapsed().as_secs_f64();
                let line = format!(
                    "{{\"step\": {}, \"loss\": {}, \"grad_norm\": {}, \"lr\": {}, \"tokens\": {}, \"seconds\": {:.6}, \"tokens_per_s\": {:.1}, \"peak_bytes\": {}{extra}}}",
                    step + 1,
                    out.loss,
                    norm,
                    lr,
                    tokens,
                    secs,
                    tokens as f64 / secs,
                    peak[0] as u64
                );
                let _ = self.tx.send(Msg::Metrics(line));
            }
            if every.is_some_and(|e| (step + 1) % e == 0 || step + 1 == self.args.steps) {
                let mo = opt.state_host(be, &groups)?;
                let sets = vec![opt.params_host(be, &groups)?, mo.exp_avg, mo.exp_avg_sq];
                if let Some(all) = crate::gather::to_root(world, sets)? {
                    let parts = all
                        .into_iter()
                        .zip(&all_held)
                        .map(|(mut sets, h)| {
                            let v = sets.pop().unwrap_or_default();
                            let m = sets.pop().unwrap_or_default();
                            let p = sets.pop().unwrap_or_default();
                            ([p, m, v], h.clone())
                        })
                        .collect();
                    let _ = self.tx.send(Msg::Checkpoint {
                        step: step as u64 + 1,
                        parts,
                    });
                }
            }
        }
        // The peak travels as three exact 16-bit parts.
        let p = peak_all as u64;
        let peak = vec![
            (p >> 32) as f32,
            ((p >> 16) & 0xffff) as f32,
            (p & 0xffff) as f32,
        ];
        let sets = vec![opt.params_host(be, &groups)?, vec![peak]];
        let Some(all) = crate::gather::to_root(world, sets)? else {
            return Ok(None);
        };
        let mut pieces = Vec::with_capacity(all.len());
        let mut peaks = Vec::with_capacity(all.len());
        for (mut sets, h) in all.into_iter().zip(all_held) {
            let peak = sets.pop().and_then(|mut v| v.pop()).unwrap_or_default();
            let part = |i: usize| peak.get(i).copied().unwrap_or(0.0) as u64;
            peaks.push(((part(0) << 32) | (part(1) << 16) | part(2)) as usize);
            pieces.push((sets.pop().unwrap_or_default(), h));
        }
        Ok(Some((pieces, peaks)))
    }
}
