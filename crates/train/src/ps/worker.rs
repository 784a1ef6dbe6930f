//! A worker rank under the parameter server: a whole replica on one device that computes the
//! gradient of its share of the data, pushes it to every server and takes the parameters the
//! servers reply with.

use std::time::Instant;

use comm::{tags, Communicator, Rank};
use graph::ExecGraph;
use kernels::Backend;

use comm::codec::Codec;

use super::{
    push, unword, word, Layout, KIND_DONE, KIND_GRADIENT, KIND_LOST, NO_SHARE, PUSH_HEADER,
    REPLY_HEADER,
};
use crate::error::{Result, TrainError};
use crate::job::{Collected, Job, Msg};
use crate::metrics::WorkerStep;
use crate::replica::{split, Replica};
use crate::settings::SlowRank;
use crate::settings::SyncMode;

/// The servers' layout of `exec`'s parameters (`params`, in its order) over `servers`.
pub(crate) fn layout_of(exec: &ExecGraph, params: &[Vec<f32>], servers: usize) -> Layout {
    let g = &exec.graph;
    let decay = g
        .params
        .iter()
        .map(|&p| g.info(p).shape.len() >= 2)
        .collect();
    Layout::new(params.iter().map(Vec::len).collect(), decay, servers)
}

impl Job {
    /// Worker `world.rank() − K`'s loop on backend `be`.
    pub(crate) fn work<B: Backend>(
        &self,
        be: &B,
        world: &dyn Communicator,
    ) -> Result<Option<Collected>> {
        let cfg = &self.cfg;
        let k = cfg.ps.map_or(0, |p| p.servers);
        let w = cfg.devices;
        let me = world.rank().0;
        let i = me - k;
        let bsp = cfg.sync == SyncMode::Bsp;
        let (mut replica, params) = Replica::new(self, be, world)?;
        let layout = layout_of(&replica.exec, &params, k);
        let mut flat = params.concat();
        drop(params);
        let packing = cfg.packing_of(0);
        // Pushes through the codec, with this worker's error-feedback residual per slice.
        let codec = cfg.exchange.codec;
        let payload: Vec<usize> = layout
            .shards
            .iter()
            .map(|r| push::payload_len(codec, r.len()))
            .collect();
        let mut residuals: Vec<Vec<f32>> = if cfg.exchange.error_feedback && codec != Codec::None {
            layout.shards.iter().map(|r| vec![0.0; r.len()]).collect()
        } else {
            Vec::new()
        };
        let mut share = Some(i);
        let mut version = 0u64;
        let mut local = 0usize;
        let mut asked_to_stop = false;
        while let Some(j) = share {
            if bsp && local == cfg.steps {
                break;
            }
            let j = if bsp { local * w + i } else { j };
            local += 1;
            self.heartbeats.step(me, local);
            let started_s = self.heartbeats.elapsed();
            let (t, part) = (j / w, j % w);
            let batch = self.data.batch(t, cfg.global_batch, cfg.shuffle_seed());
            let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
            let predicted: usize = lens.iter().map(|l| l - 1).sum();
            let mine = packing
                .deal(&lens, w)
                .get(part)
                .cloned()
                .unwrap_or_default();
            let own: usize = mine.iter().map(|&s| lens[s] - 1).sum();
            let tokens: usize = mine.iter().map(|&s| lens[s]).sum();
            // BSP: parts of the global batch's mean, summed by the servers; otherwise each
            // push is its own share's mean.
            let scale = 1.0 / if bsp { predicted } else { own }.max(1) as f32;
            let mut compute = || -> Result<(f32, usize)> {
                if let Some(f) = &self.fault {
                    f.at(me, local);
                }
                let t0 = Instant::now();
                let out = replica.gradients(
                    be,
                    &batch,
                    &packing,
                    w,
                    part,
                    scale,
                    cfg.pipeline_schedule,
                )?;
                let mut at = 0;
                for g in &out.grads {
                    let h = be.download(g)?;
                    flat[at..at + h.len()].copy_from_slice(&h);
                    at += h.len();
                }
                SlowRank::delay(&cfg.slow_ranks, i, t0.elapsed());
                Ok((out.loss, out.peak_bytes))
            };
            let (loss, peak) = if bsp {
                // Under BSP every worker is needed for every step: a failure ends the run.
                compute()?
            } else {
                // Under ASP and SSP a worker whose step fails leaves; the servers keep the
                // parameters, give its share to another worker, and the others go on.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut compute)) {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => return self.leave(world, &layout, i, local, j, e.to_string()),
                    Err(p) => {
                        let why = comm::panic_message(p.as_ref());
                        return self.leave(world, &layout, i, local, j, format!("panicked: {why}"));
                    }
                }
            };
            let norm = flat
                .iter()
                .map(|&g| (g as f64) * (g as f64))
                .sum::<f64>()
                .sqrt();
            let finished_s = self.heartbeats.elapsed();
            let peak = peak as u64;
            let header = [
                word(KIND_GRADIENT),
                word(j as u32),
                norm as f32,
                loss,
                word(tokens as u32),
                word(own as u32),
                word(peak as u32),
                word((peak >> 32) as u32),
            ];
            for (s, r) in layout.shards.iter().enumerate() {
                let mut msg = Vec::with_capacity(PUSH_HEADER + payload[s]);
                msg.extend_from_slice(&header);
                push::encode(
                    codec,
                    &flat[r.clone()],
                    residuals.get_mut(s),
                    cfg.seed,
                    j,
                    s,
                    &mut msg,
                );
                world.send(&msg, Rank(s), tags::PS_PUSH)?;
            }
            self.heartbeats.beat(me, "waiting for the servers");
            let mut next = NO_SHARE;
            let mut newer = version;
            for (s, r) in layout.shards.iter().enumerate() {
                let mut buf = vec![0.0f32; REPLY_HEADER + r.len()];
                world.recv(&mut buf, Rank(s), tags::PS_PARAMS)?;
                if s == 0 {
                    newer = unword(buf[0]) as u64;
                    next = unword(buf[1]);
                }
                flat[r.clone()].copy_from_slice(&buf[REPLY_HEADER..]);
            }
            replica
                .opt
                .set_params_host(be, &split(&flat, &layout.lens))?;
            let _ = self.tx.send(Msg::WorkerStep(WorkerStep {
                worker: i,
                step: local,
                share: j,
                started_s,
                finished_s,
                loss,
                staleness: newer.saturating_sub(version + 1),
            }));
            version = newer;
            share = (next != NO_SHARE).then_some(next as usize);
            if bsp && next == NO_SHARE {
                break;
            }
            if cfg
                .stop
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
            {
                asked_to_stop = true;
                break;
            }
        }
        if !bsp || asked_to_stop {
            // The servers hear that this worker is done.
            let mut msg = Vec::new();
            for (s, len) in payload.iter().enumerate() {
                msg.clear();
                msg.resize(PUSH_HEADER + len, 0.0);
                msg[0] = word(KIND_DONE);
                world.send(&msg, Rank(s), tags::PS_PUSH)?;
            }
        }
        if bsp && asked_to_stop && local < cfg.steps {
            // Under BSP the servers stop everyone at this step.
            return Ok(None);
        }
        if !bsp && !asked_to_stop && share.is_some() {
            return Err(TrainError::Rank {
                rank: me,
                reason: "the worker stopped while shares were left".into(),
            });
        }
        Ok(None)
    }

    /// Worker `i` leaves the run after its step `step` (of share `share`) failed: it tells
    /// every server (which hand the share to another worker) and this process.
    fn leave(
        &self,
        world: &dyn Communicator,
        layout: &Layout,
        i: usize,
        step: usize,
        share: usize,
        reason: String,
    ) -> Result<Option<Collected>> {
        let me = world.rank().0;
        for (s, r) in layout.shards.iter().enumerate() {
            let len = push::payload_len(self.cfg.exchange.codec, r.len());
            let mut msg = vec![0.0f32; PUSH_HEADER + len];
            msg[0] = word(KIND_LOST);
            msg[1] = word(share as u32);
            world.send(&msg, Rank(s), tags::PS_PUSH)?;
        }
        let _ = self.tx.send(Msg::WorkerLost {
            worker: i,
            rank: me,
            step,
            reason,
        });
        self.heartbeats.done(me);
        Ok(None)
    }
}
