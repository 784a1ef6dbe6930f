//! Federated averaging (`--sync fedavg`, McMahan et al. 2017): the data is split into client
//! shards (IID, or non-IID by source: each client owns whole files or documents), every round a
//! sampled fraction of the clients start from the global model, take local AdamW steps on
//! their own shard, and send their model back (optionally through a codec); the new global
//! model is the clients' models averaged with weights by the tokens they trained on. With
//! Federated Dropout (Caldas et al. 2018) each client trains a sub-model with a fraction of
//! every layer's FFN units removed, sends only what it kept, and a unit's new value averages
//! the clients that trained it.
//!
//! The ranks simulate the clients: a round's sampled clients are dealt round-robin to the
//! ranks, each a whole replica on one device, and the average is an all-reduce — what a
//! central server would compute. Rank 0 reports every round.

use std::time::Instant;

use comm::codec::Codec;
use comm::sketch::CountSketch;
use comm::{Communicator, ReduceOp};
use graph::ExecGraph;
use kernels::Backend;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Result, TrainError};
use crate::job::{Collected, Job, Msg};
use crate::metrics::{FedMetrics, StepMetrics};
use crate::replica::{whole_model, Replica};
use crate::settings::{FedWeighting, Sharding};

/// The clients' shards: sequence indices of `sources` (one per sequence) split over `clients`.
pub(crate) fn shards(
    sources: &[u32],
    clients: usize,
    sharding: Sharding,
    seed: u64,
) -> Vec<Vec<usize>> {
    let n = sources.len();
    let mut out = vec![Vec::new(); clients];
    match sharding {
        Sharding::Iid => {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0xFEDA_0001));
            for (i, k) in order.into_iter().enumerate() {
                out[i % clients].push(k);
            }
        }
        Sharding::BySource => {
            let mut distinct: Vec<u32> = sources.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            let m = distinct.len();
            for (k, s) in sources.iter().enumerate() {
                let rank = distinct.binary_search(s).unwrap_or(0);
                out[rank * clients / m.max(1)].push(k);
            }
        }
    }
    out
}

/// The clients sampled in `round`: `max(1, round(fraction · clients))` of them, ascending.
pub(crate) fn sample(clients: usize, fraction: f64, seed: u64, round: usize) -> Vec<usize> {
    let m = ((fraction * clients as f64).round() as usize).clamp(1, clients);
    let mut all: Vec<usize> = (0..clients).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (round as u64).wrapping_mul(0x9E37_79B9));
    all.shuffle(&mut rng);
    let mut picked = all[..m].to_vec();
    picked.sort_unstable();
    picked
}

/// Which of round `round`'s `sampled` clients report (each drops out with probability
/// `dropout`, drawn from the seed).
pub(crate) fn reporting(sampled: &[usize], dropout: f64, seed: u64, round: usize) -> Vec<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ 0xD80F_0C11 ^ (round as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
    );
    sampled
        .iter()
        .map(|_| rand::Rng::random::<f64>(&mut rng) >= dropout)
        .collect()
}

/// The sequences (indices into `shard`) of local step `e` of a client training `epochs` epochs
/// of its shard in batches of `batch`: a fresh seeded order each epoch, the last batch of an
/// epoch shorter where the shard does not divide.
fn epoch_batch(shard: &[usize], batch: usize, e: usize, key: u64) -> Vec<usize> {
    let per_epoch = shard.len().div_ceil(batch);
    let (epoch, b) = (e / per_epoch, e % per_epoch);
    let mut order: Vec<usize> = shard.to_vec();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        key ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order[b * batch..((b + 1) * batch).min(order.len())].to_vec()
}

/// Per parameter of `exec`, the FFN units' rows: `Some(units)` for the FFN weights (stored
/// `[intermediate, hidden]`, unit `u` being row `u`), with the layer index.
fn ffn_rows(exec: &ExecGraph, intermediate: usize) -> Result<Vec<Option<usize>>> {
    let g = &exec.graph;
    g.params
        .iter()
        .map(|&p| {
            let info = g.info(p);
            let is_ffn = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
                .iter()
                .any(|n| info.name.contains(n));
            if !is_ffn {
                return Ok(None);
            }
            if info.shape.first() != Some(&graph::Dim::Fixed(intermediate)) {
                return Err(TrainError::setting(
                    "fed_dropout",
                    format!(
                        "{} is stored as {:?}, not [intermediate, hidden]",
                        info.name, info.shape
                    ),
                ));
            }
            let layer = info
                .name
                .split('.')
                .find_map(|t| t.parse::<usize>().ok())
                .unwrap_or(0);
            Ok(Some(layer))
        })
        .collect()
}

/// Which of `units` FFN units of `layer` client `client` keeps in `round`.
fn kept_units(
    units: usize,
    dropout: f64,
    seed: u64,
    round: usize,
    client: usize,
    layer: usize,
) -> Vec<bool> {
    let keep = (((1.0 - dropout) * units as f64).round() as usize).clamp(1, units);
    let mut order: Vec<usize> = (0..units).collect();
    let key = seed ^ ((round as u64) << 40) ^ ((client as u64) << 20) ^ layer as u64;
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(key ^ 0xD209));
    let mut kept = vec![false; units];
    for &u in &order[..keep] {
        kept[u] = true;
    }
    kept
}

impl Job {
    /// Rank `world.rank()`'s part of federated training; rank 0 returns the final weights.
    pub(crate) fn federate<B: Backend>(
        &self,
        be: &B,
        world: &dyn Communicator,
    ) -> Result<Option<Collected>> {
        let cfg = &self.cfg;
        let fed = cfg.fed;
        let me = world.rank().0;
        let w = world.size();
        let clients = if fed.clients == 0 { w } else { fed.clients };
        let (mut replica, mut global) = Replica::new(self, be, world)?;
        let zeros: Vec<Vec<f32>> = global.iter().map(|p| vec![0.0; p.len()]).collect();
        let rows = ffn_rows(&replica.exec, cfg.model.intermediate_size)?;
        let hidden = cfg.model.hidden_size;
        let parts = shards(self.data.sources(), clients, fed.sharding, cfg.seed);
        if let Some(c) = parts.iter().position(Vec::is_empty) {
            return Err(TrainError::setting(
                "fed_clients",
                format!(
                    "client {c} of {clients} gets no data ({} sequences from {} sources, split {:?}); \
                     use fewer clients",
                    self.data.sequences().len(),
                    {
                        let mut s = self.data.sources().to_vec();
                        s.sort_unstable();
                        s.dedup();
                        s.len()
                    },
                    fed.sharding
                ),
            ));
        }
        let packing = cfg.packing_of(0);
        let seqs = self.data.sequences();
        // Every client's data size: the tokens its shard predicts.
        let sizes: Vec<usize> = parts
            .iter()
            .map(|p| p.iter().map(|&k| seqs[k].len().saturating_sub(1)).sum())
            .collect();
        let mut peak_all = 0u64;
        let mut last_loss = 0.0f32;
        // FetchSGD's uplink: one count sketch of the whole model's change (the same hashes every
        // round), and the server's error accumulation in sketch space.
        let sketch = match cfg.exchange.codec {
            Codec::Sketch(r, c) => {
                Some(CountSketch::new(r as usize, c as usize, cfg.seed ^ 0x5E7C))
            }
            _ => None,
        };
        let table = sketch.map_or(0, |s| s.rows * s.cols);
        let mut error = vec![0.0f32; table];
        for round in 0..cfg.steps {
            self.heartbeats.step(me, round + 1);
            let t0 = Instant::now();
            let lr = cfg.lr.at(round, cfg.steps);
            let sampled = sample(clients, fed.fraction, cfg.seed, round);
            let reports = reporting(&sampled, fed.client_dropout, cfg.seed, round);
            // Σ tokens · client model (kept elements), Σ tokens per element, and the stats:
            // [Σ loss · predicted, Σ predicted, Σ tokens, up bytes, down bytes, Σ norm · predicted].
            let mut acc: Vec<Vec<f32>> = zeros.clone();
            let mut weight: Vec<Vec<f32>> = zeros.clone();
            let mut stats = [0.0f64; 6];
            let mut peak = 0usize;
            // Σ tokens · the clients' sketches, then Σ tokens.
            let mut sketched = vec![0.0f32; table + usize::from(sketch.is_some())];
            for (slot, &c) in sampled.iter().enumerate() {
                if slot % w != me || !reports[slot] {
                    continue;
                }
                // The client's (sub-)model: the global one with its dropped units zeroed.
                let masks: Vec<Option<Vec<bool>>> = rows
                    .iter()
                    .map(|r| {
                        r.filter(|_| fed.dropout > 0.0).map(|layer| {
                            kept_units(
                                cfg.model.intermediate_size,
                                fed.dropout,
                                cfg.seed,
                                round,
                                c,
                                layer,
                            )
                        })
                    })
                    .collect();
                let mut start = global.clone();
                for (p, m) in start.iter_mut().zip(&masks) {
                    if let Some(m) = m {
                        for (u, row) in p.chunks_mut(hidden).enumerate() {
                            if !m[u] {
                                row.fill(0.0);
                            }
                        }
                    }
                }
                replica.opt.set_params_host(be, &start)?;
                replica.opt.restore(be, &zeros, &zeros, 0)?;
                let shard = &parts[c];
                let mut trained = 0usize;
                let steps = match fed.epochs {
                    Some(epochs) => epochs * shard.len().div_ceil(fed.batch),
                    None => fed.local_steps,
                };
                let key = cfg.seed ^ ((round as u64) << 32) ^ ((c as u64) << 8) ^ 0xE90C;
                for e in 0..steps {
                    let batch: Vec<Vec<u32>> = match fed.epochs {
                        Some(_) => epoch_batch(shard, fed.batch, e, key)
                            .into_iter()
                            .map(|k| seqs[k].clone())
                            .collect(),
                        None => {
                            let at = (round * fed.local_steps + e) * fed.batch;
                            (0..fed.batch)
                                .map(|i| seqs[shard[(at + i) % shard.len()]].clone())
                                .collect()
                        }
                    };
                    let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
                    let out = replica.gradients(
                        be,
                        &batch,
                        &packing,
                        1,
                        0,
                        1.0 / predicted.max(1) as f32,
                        cfg.pipeline_schedule,
                    )?;
                    if !out.loss.is_finite() {
                        return Err(TrainError::NonFiniteLoss {
                            step: round + 1,
                            loss: out.loss,
                        });
                    }
                    stats[0] += out.loss as f64 * predicted as f64;
                    stats[1] += predicted as f64;
                    stats[2] += batch.iter().map(Vec::len).sum::<usize>() as f64;
                    trained += predicted;
                    peak = peak.max(out.peak_bytes);
                    let norm = replica.opt.update(be, &mut replica.groups, out.grads, lr)?;
                    stats[5] += norm * predicted as f64;
                }
                let model = replica.opt.params_host(be, &replica.groups)?;
                // The client's weight in the average: its data's size (McMahan's n_k) or what it
                // trained this round.
                let n = match fed.weighting {
                    FedWeighting::Size => sizes[c] as f32,
                    FedWeighting::Tokens => trained as f32,
                };
                if let Some(s) = &sketch {
                    // The whole model's change, one vector, sketched (no sub-models: refused).
                    let delta: Vec<f32> = model
                        .iter()
                        .zip(&start)
                        .flat_map(|(p, q)| p.iter().zip(q).map(|(a, b)| a - b))
                        .collect();
                    s.add(&mut sketched[..table], &delta, n);
                    sketched[table] += n;
                    stats[3] += 4.0 * table as f64;
                    stats[4] += 4.0 * delta.len() as f64;
                    continue;
                }
                for (k, (p, start_p)) in model.iter().zip(&start).enumerate() {
                    let kept = |i: usize| masks[k].as_ref().is_none_or(|m| m[i / hidden]);
                    let sent = (0..p.len()).filter(|&i| kept(i)).count();
                    // The upload: the client's change, through the codec.
                    let delta: Vec<f32> = p.iter().zip(start_p).map(|(a, b)| a - b).collect();
                    let (delta, words) = uplink(cfg.exchange.codec, &delta, cfg.seed, round, c, k);
                    stats[3] += 4.0
                        * if masks[k].is_some() {
                            words as f64 * sent as f64 / p.len().max(1) as f64
                        } else {
                            words as f64
                        };
                    stats[4] += 4.0 * sent as f64;
                    for (i, d) in delta.iter().enumerate() {
                        if kept(i) {
                            acc[k][i] += n * (start_p[i] + d);
                            weight[k][i] += n;
                        }
                    }
                }
            }
            // The server's average: every rank's sums added.
            if let Some(s) = &sketch {
                world.all_reduce(&mut sketched, ReduceOp::Sum)?;
                fetch(s, &mut error, &sketched, &mut global);
            } else {
                for (a, wt) in acc.iter_mut().zip(weight.iter_mut()) {
                    world.all_reduce(a, ReduceOp::Sum)?;
                    world.all_reduce(wt, ReduceOp::Sum)?;
                }
            }
            let mut s32: Vec<f32> = stats.iter().map(|&x| x as f32).collect();
            world.all_reduce(&mut s32, ReduceOp::Sum)?;
            for ((g, a), wt) in global.iter_mut().zip(&acc).zip(&weight) {
                for ((x, &sum), &n) in g.iter_mut().zip(a).zip(wt) {
                    if n > 0.0 {
                        *x = sum / n;
                    }
                }
            }
            // A round nobody reported trains nothing and keeps the last round's loss.
            if s32[1] > 0.0 {
                last_loss = s32[0] / s32[1];
            }
            peak_all = peak_all.max(peak as u64);
            let peak = comm::words::all_max(world, peak as u64)?;
            if me == 0 {
                let seconds = t0.elapsed().as_secs_f64();
                let tokens = s32[2] as u64;
                let _ = self.tx.send(Msg::Step(Box::new(StepMetrics {
                    step: round as u64 + 1,
                    loss: last_loss,
                    // The clients' local steps' norms, weighted by their tokens.
                    grad_norm: (s32[5] / s32[1].max(1.0)) as f64,
                    lr,
                    tokens,
                    seconds,
                    tokens_per_s: tokens as f64 / seconds.max(1e-12),
                    peak_bytes: peak,
                    fed: Some(FedMetrics {
                        fed_clients: reports.iter().filter(|&&r| r).count() as u64,
                        fed_dropped: reports.iter().filter(|&&r| !r).count() as u64,
                        fed_up_bytes: s32[3] as u64,
                        fed_down_bytes: s32[4] as u64,
                    }),
                    ..Default::default()
                })));
            }
        }
        let peaks = comm::words::all_gather(world, peak_all)?;
        if me != 0 {
            return Ok(None);
        }
        let peaks = peaks.into_iter().map(|p| p as usize).collect();
        Ok(Some(whole_model(global, &replica.held, w, peaks)))
    }
}

/// FetchSGD's server step (Rothchild et al. 2020, Algorithm 1, no server momentum: FedAvg's
/// server takes the average change as it is): the clients' weighted sketches over their
/// weight (`sketched`: the table, then Σ weights) join the error accumulation; the largest
/// `cols / 4` coordinates it recovers (by the rows' median) are applied to `global` and their
/// sketch taken out of the accumulation, which keeps everything else for later rounds. A
/// round nobody reported changes nothing.
fn fetch(s: &CountSketch, error: &mut [f32], sketched: &[f32], global: &mut [Vec<f32>]) {
    let (table, total) = sketched.split_at(error.len());
    let total = total.first().copied().unwrap_or(0.0);
    if total <= 0.0 {
        return;
    }
    for (e, x) in error.iter_mut().zip(table) {
        *e += x / total;
    }
    let len: usize = global.iter().map(Vec::len).sum();
    let heavy = s.top_k(error, len, (s.cols / 4).max(1));
    let mut update = vec![0.0f32; len];
    for &(j, v) in &heavy {
        update[j as usize] = v;
    }
    s.add(error, &update, -1.0);
    let mut at = 0;
    for p in global.iter_mut() {
        for (x, u) in p.iter_mut().zip(&update[at..]) {
            *x += u;
        }
        at += p.len();
    }
}

/// A client's change `delta` of parameter `k` as the server decodes it, and the words sent.
fn uplink(
    codec: Codec,
    delta: &[f32],
    seed: u64,
    round: usize,
    client: usize,
    k: usize,
) -> (Vec<f32>, usize) {
    // Random draws (QSGD's rounding, random-k's positions) from the run's seed, the round, the
    // client and the parameter.
    let s = seed ^ ((round as u64) << 32) ^ ((client as u64) << 16) ^ k as u64;
    match codec {
        Codec::None => (delta.to_vec(), delta.len()),
        c if c.is_dense() => (c.round_trip_salted(delta, s), c.encoded_words(delta.len())),
        Codec::TopK(_) => {
            let mut out = vec![0.0; delta.len()];
            let keep = codec.keep(delta.len());
            for i in comm::codec::top_k(delta, keep) {
                out[i as usize] = delta[i as usize];
            }
            // An index and a value each.
            (out, 2 * keep)
        }
        Codec::RandK(_) => {
            let mut out = vec![0.0; delta.len()];
            let keep = codec.keep(delta.len());
            // The kept values as they are (as the gradient codec sends them); the seed
            // travels instead of the indices.
            for i in comm::codec::random_k(delta.len(), keep, s) {
                out[i as usize] = delta[i as usize];
            }
            (out, keep)
        }
        _ => (delta.to_vec(), delta.len()),
    }
}
