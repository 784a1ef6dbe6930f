//! A parameter server rank: its shard of the parameters and of the AdamW moments, the update
//! of every push (ASP, SSP) or of every step's summed pushes (BSP), the replies, and on
//! server 0 the metrics and the final weights.

use std::time::Instant;

use comm::{tags, Communicator, Rank, ReduceOp};
use graph::Strategy;
use kernels::ops::adamw;
use model::{rank_exec, rank_params};

use super::{
    push, unword, word, Layout, KIND_DONE, KIND_LOST, NO_SHARE, PUSH_HEADER, REPLY_HEADER,
};
use crate::error::{Result, TrainError};
use crate::job::{Collected, Job, Msg};
use crate::metrics::{PsMetrics, StepMetrics, WireMetrics};
use crate::replica::{split, whole_model};
use crate::settings::Placement;
use crate::settings::SyncMode;

/// One server's shard and its optimizer state.
struct Shard {
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// (parameter, range in the shard) for weight decay per parameter.
    pieces: Vec<(usize, std::ops::Range<usize>)>,
    /// Updates applied (AdamW's step count).
    updates: u64,
}

impl Shard {
    /// One AdamW step with gradient `g` (already scaled and clipped) at rate `lr`.
    fn apply(&mut self, job: &Job, layout: &Layout, g: &[f32], lr: f64) -> Result<()> {
        self.updates += 1;
        let base = job.cfg.adamw;
        for (k, r) in &self.pieces {
            let cfg = kernels::AdamW {
                lr,
                weight_decay: if layout.decay[*k] {
                    base.weight_decay
                } else {
                    0.0
                },
                ..base
            };
            adamw::step(
                &cfg,
                self.updates,
                &mut self.params[r.clone()],
                &g[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
            )?;
        }
        Ok(())
    }
}

/// What server 0 adds up between two reported steps.
#[derive(Default)]
struct Window {
    updates: usize,
    /// Σ loss × predicted tokens (ASP/SSP: each push's loss is its own mean).
    loss_weighted: f64,
    /// Σ loss (BSP: the pushes' parts of the global mean).
    loss_sum: f64,
    predicted: u64,
    tokens: u64,
    norm_sum: f64,
    peak: u64,
    staleness: u64,
    lr: f64,
}

/// The parameter-server side of a run on rank `world.rank()` (servers are world ranks
/// `0..K`, workers `K..K+W`). Server 0 returns the trained weights and the workers' peaks.
pub(crate) fn serve(job: &Job, world: &dyn Communicator) -> Result<Option<Collected>> {
    let cfg = &job.cfg;
    let ps = cfg
        .ps
        .ok_or_else(|| TrainError::setting("ps_servers", "no parameter servers configured"))?;
    let (k, w) = (ps.servers, cfg.devices);
    let me = world.rank().0;
    let servers: Vec<Rank> = (0..k).map(Rank).collect();
    let peers = world.sub_group(&servers)?;
    let single = Strategy::single();
    let exec = rank_exec(&cfg.model, &single, 0)?;
    let rp = rank_params(&cfg.model, &exec, &job.weights, 0)?;
    let layout = super::worker::layout_of(&exec, &rp.params, k);
    let range = layout.shards[me].clone();
    let n = range.len();
    let mut shard = Shard {
        params: rp.params.concat()[range].to_vec(),
        m: vec![0.0; n],
        v: vec![0.0; n],
        pieces: layout.pieces(me),
        updates: 0,
    };
    drop(rp);
    let bytes = Bytes::of(
        &layout,
        ps.placement,
        w,
        job.devices_per_node,
        cfg.exchange.codec,
    );
    let mut reporter = Reporter {
        job,
        me,
        bytes,
        last: Instant::now(),
        window: Window::default(),
        peaks: vec![0u64; w],
    };
    let stopped = match cfg.sync {
        SyncMode::Bsp => bsp(
            job,
            world,
            peers.as_ref(),
            &layout,
            &mut shard,
            &mut reporter,
        )?,
        SyncMode::Ssp { staleness } => asynchronous(
            job,
            world,
            &layout,
            &mut shard,
            &mut reporter,
            Some(staleness),
        )?,
        SyncMode::Asp => asynchronous(job, world, &layout, &mut shard, &mut reporter, None)?,
        other => {
            return Err(TrainError::setting(
                "sync",
                format!("{other} does not run on the parameter server"),
            ))
        }
    };
    if let (Some(step), 0) = (stopped, me) {
        let _ = job.tx.send(Msg::Stopped { step });
    }
    job.heartbeats.beat(me, "collecting the weights");
    let counts: Vec<usize> = layout.shards.iter().map(|r| r.len()).collect();
    let mut all = vec![0.0f32; layout.total()];
    peers.all_gather(&shard.params, &mut all, &counts)?;
    if me != 0 {
        return Ok(None);
    }
    let held = model::held(&cfg.model, &exec)?;
    let peaks = reporter.peaks.iter().map(|&p| p as usize).collect();
    Ok(Some(whole_model(
        split(&all, &layout.lens),
        &held,
        w,
        peaks,
    )))
}

/// BSP: every step, every worker's push (taken in worker order, so the sum is the same
/// whatever the timing), one update, then every worker's reply. Returns the step at which the
/// run stopped early (a worker said it is done before the last step).
fn bsp(
    job: &Job,
    world: &dyn Communicator,
    peers: &dyn Communicator,
    layout: &Layout,
    shard: &mut Shard,
    reporter: &mut Reporter<'_>,
) -> Result<Option<usize>> {
    let cfg = &job.cfg;
    let (me, k, w) = (world.rank().0, layout.shards.len(), cfg.devices);
    let n = shard.params.len();
    let codec = cfg.exchange.codec;
    let mut buf = vec![0.0f32; PUSH_HEADER + push::payload_len(codec, n)];
    let mut g = vec![0.0f32; n];
    for t in 0..cfg.steps {
        job.heartbeats.step(me, t + 1);
        let mut sum = vec![0.0f32; n];
        let mut pushed = vec![false; w];
        for (i, p) in pushed.iter_mut().enumerate() {
            world.recv(&mut buf, Rank(k + i), tags::PS_PUSH)?;
            job.heartbeats.beat(me, "serving");
            if unword(buf[0]) == KIND_DONE {
                continue;
            }
            *p = true;
            reporter.take(i, &buf, 0);
            let share = unword(buf[1]) as usize;
            push::decode(codec, &buf[PUSH_HEADER..], cfg.seed, share, me, &mut g)?;
            sum.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        if pushed.iter().any(|p| !p) {
            // A worker was asked to stop: the others get "no more" instead of parameters.
            for (i, _) in pushed.iter().enumerate().filter(|(_, p)| **p) {
                reply(world, k + i, shard, NO_SHARE)?;
            }
            return Ok(Some(t));
        }
        let loss = reporter.window.loss_sum as f32;
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: t + 1, loss });
        }
        // The global norm as the all-reduce run takes it: squares in f64, added in f32.
        let mut sq = [sum.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>() as f32];
        peers.all_reduce(&mut sq, ReduceOp::Sum)?;
        let norm = (sq[0] as f64).sqrt();
        if !norm.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: t + 1,
                loss: f32::NAN,
            });
        }
        let coef = adamw::clip_coef(norm, cfg.grad_clip);
        if coef != 1.0 {
            sum.iter_mut().for_each(|g| *g *= coef as f32);
        }
        let lr = cfg.lr.at(t, cfg.steps);
        shard.apply(job, layout, &sum, lr)?;
        for i in 0..w {
            reply(world, k + i, shard, 0)?;
        }
        reporter.window.norm_sum = norm;
        reporter.window.lr = lr;
        reporter.report(t + 1, true);
    }
    Ok(None)
}

/// ASP (`bound` none) and SSP: every push applied on arrival; its reply sent at once (ASP) or
/// once the worker is at most `bound` steps ahead of the slowest unfinished one (SSP). Server
/// 0 hands out the shares of the data. Returns the step at which the run stopped early.
fn asynchronous(
    job: &Job,
    world: &dyn Communicator,
    layout: &Layout,
    shard: &mut Shard,
    reporter: &mut Reporter<'_>,
    bound: Option<usize>,
) -> Result<Option<usize>> {
    let cfg = &job.cfg;
    let (me, k, w) = (world.rank().0, layout.shards.len(), cfg.devices);
    let total = cfg.steps * w;
    let n = shard.params.len();
    let codec = cfg.exchange.codec;
    let mut buf = vec![0.0f32; PUSH_HEADER + push::payload_len(codec, n)];
    let mut g = vec![0.0f32; n];
    let mut clocks = vec![0usize; w];
    let mut done = vec![false; w];
    let mut next_share = w;
    let mut stopped = None;
    // Per worker: the share its reply will carry, and the version it last got.
    let mut assigned = vec![NO_SHARE; w];
    let mut pulled = vec![0u64; w];
    let mut waiting: Vec<usize> = Vec::new();
    // Shares of workers that left, to be given again.
    let mut requeued: Vec<usize> = Vec::new();
    while done.iter().any(|d| !d) {
        let from = world.recv_any(&mut buf, tags::PS_PUSH)?.0;
        job.heartbeats.beat(me, "serving");
        let i = from
            .checked_sub(k)
            .filter(|&i| i < w)
            .ok_or_else(|| TrainError::Rank {
                rank: from,
                reason: "a server received a push from a rank that is not a worker".into(),
            })?;
        if unword(buf[0]) == KIND_LOST {
            // The worker's step failed: it is gone, its share goes to the next one asking.
            done[i] = true;
            requeued.push(unword(buf[1]) as usize);
        } else if unword(buf[0]) == KIND_DONE {
            done[i] = true;
            if next_share < total && stopped.is_none() {
                // Asked to stop before the shares ran out: no one gets another.
                stopped = Some(next_share / w);
                next_share = total;
            }
        } else {
            let share = unword(buf[1]) as usize;
            let (norm, loss) = (buf[2] as f64, buf[3]);
            if !loss.is_finite() || !norm.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: share / w + 1,
                    loss,
                });
            }
            let coef = adamw::clip_coef(norm, cfg.grad_clip) as f32;
            push::decode(codec, &buf[PUSH_HEADER..], cfg.seed, share, me, &mut g)?;
            if coef != 1.0 {
                g.iter_mut().for_each(|x| *x *= coef);
            }
            let lr = cfg.lr.at(share / w, cfg.steps);
            shard.apply(job, layout, &g, lr)?;
            clocks[i] += 1;
            let staleness = shard.updates - pulled[i] - 1;
            reporter.take(i, &buf, staleness);
            reporter.window.norm_sum += norm;
            reporter.window.lr = lr;
            if reporter.window.updates == w {
                reporter.report((shard.updates as usize) / w, false);
            }
            assigned[i] = if let Some(j) = requeued.pop() {
                j as u32
            } else if next_share < total {
                next_share += 1;
                (next_share - 1) as u32
            } else {
                NO_SHARE
            };
            waiting.push(i);
        }
        // Reply to every waiting worker now allowed to go on.
        let slowest = (0..w)
            .filter(|&j| !done[j])
            .map(|j| clocks[j])
            .min()
            .unwrap_or(usize::MAX);
        let mut still = Vec::new();
        for &j in &waiting {
            let ahead = clocks[j].saturating_sub(slowest);
            if bound.is_none_or(|b| ahead <= b) || done[j] {
                let share = if me == 0 { assigned[j] } else { NO_SHARE };
                reply(world, k + j, shard, share)?;
                pulled[j] = shard.updates;
            } else {
                still.push(j);
            }
        }
        waiting = still;
    }
    if reporter.window.updates > 0 {
        reporter.report(shard.updates.div_ceil(w as u64) as usize, false);
    }
    if me == 0 && !requeued.is_empty() {
        let _ = job.tx.send(Msg::Notice(format!(
            "{} share(s) of workers that left were not trained again: every other worker had \
             finished",
            requeued.len()
        )));
    }
    Ok(stopped)
}

/// Sends worker `to` this server's parameters, the version and (from server 0) its next share.
fn reply(world: &dyn Communicator, to: usize, shard: &Shard, share: u32) -> Result<()> {
    let mut msg = Vec::with_capacity(REPLY_HEADER + shard.params.len());
    msg.extend_from_slice(&[word(shard.updates as u32), word(share), 0.0, 0.0]);
    msg.extend_from_slice(&shard.params);
    world.send(&msg, Rank(to), tags::PS_PARAMS)?;
    Ok(())
}

/// The bytes of one update's messages (every server's push and reply for one worker), by
/// whether they cross nodes — exact, from the protocol's message sizes.
struct Bytes {
    /// Per worker: (intra-node, inter-node) bytes pushed, and replied.
    per_worker: Vec<(u64, u64)>,
    push_total: u64,
    reply_total: u64,
}

impl Bytes {
    fn of(
        layout: &Layout,
        placement: Placement,
        w: usize,
        per_node: usize,
        codec: comm::codec::Codec,
    ) -> Self {
        let per = per_node.max(1);
        let k = layout.shards.len();
        let worker_node = |i: usize| i / per;
        let worker_nodes = w.div_ceil(per);
        let server_node = |s: usize| match placement {
            Placement::Dedicated => worker_nodes + s,
            Placement::CoLocated => worker_node(s * w / k),
        };
        let mut per_worker = Vec::new();
        let (mut push_total, mut reply_total) = (0, 0);
        for i in 0..w {
            let (mut intra, mut inter) = (0u64, 0u64);
            for (s, r) in layout.shards.iter().enumerate() {
                let push = 4 * (PUSH_HEADER + push::payload_len(codec, r.len())) as u64;
                let back = 4 * (REPLY_HEADER + r.len()) as u64;
                push_total += push;
                reply_total += back;
                if worker_node(i) == server_node(s) {
                    intra += push + back;
                } else {
                    inter += push + back;
                }
            }
            per_worker.push((intra, inter));
        }
        Bytes {
            per_worker,
            push_total: push_total / w.max(1) as u64,
            reply_total: reply_total / w.max(1) as u64,
        }
    }
}

/// Server 0's step reports.
struct Reporter<'a> {
    job: &'a Job,
    me: usize,
    bytes: Bytes,
    last: Instant,
    window: Window,
    peaks: Vec<u64>,
}

impl Reporter<'_> {
    /// Adds worker `i`'s push (its header in `buf`) to the window.
    fn take(&mut self, i: usize, buf: &[f32], staleness: u64) {
        let wd = &mut self.window;
        let loss = buf[3] as f64;
        let tokens = unword(buf[4]) as u64;
        let predicted = unword(buf[5]) as u64;
        let peak = unword(buf[6]) as u64 | ((unword(buf[7]) as u64) << 32);
        wd.updates += 1;
        wd.loss_sum += loss;
        wd.loss_weighted += loss * predicted as f64;
        wd.predicted += predicted;
        wd.tokens += tokens;
        wd.peak = wd.peak.max(peak);
        wd.staleness = wd.staleness.max(staleness);
        self.peaks[i] = self.peaks[i].max(peak);
    }

    /// Sends step `step`'s metrics (server 0) and starts a new window. Under BSP the pushes'
    /// losses add up to the global mean; otherwise their token-weighted mean is reported.
    fn report(&mut self, step: usize, bsp: bool) {
        let wd = std::mem::take(&mut self.window);
        if self.me != 0 {
            return;
        }
        let seconds = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let loss = if bsp {
            wd.loss_sum
        } else {
            wd.loss_weighted / wd.predicted.max(1) as f64
        };
        let updates = wd.updates.max(1) as u64;
        let (intra, inter) = self
            .bytes
            .per_worker
            .iter()
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
        let w = self.bytes.per_worker.len().max(1) as u64;
        let _ = self.job.tx.send(Msg::Step(Box::new(StepMetrics {
            step: step as u64,
            loss: loss as f32,
            grad_norm: if bsp {
                wd.norm_sum
            } else {
                wd.norm_sum / updates as f64
            },
            lr: wd.lr,
            tokens: wd.tokens,
            seconds,
            tokens_per_s: wd.tokens as f64 / seconds.max(1e-12),
            peak_bytes: wd.peak,
            // The window's updates, each a push and a reply per server, at the mean worker's
            // split between its node and others.
            wire: Some(WireMetrics {
                wire_intra_node_bytes: intra * updates / w,
                wire_inter_node_bytes: inter * updates / w,
            }),
            ps: Some(PsMetrics {
                ps_updates: updates,
                ps_push_bytes: self.bytes.push_total * updates,
                ps_pull_bytes: self.bytes.reply_total * updates,
                ps_max_staleness: wd.staleness,
            }),
            ..Default::default()
        })));
    }
}
