//! How DP replicas agree on gradients in a run: the [`runtime::GradientAgreement`] that carries
//! a [`planner::exchange::Exchange`] — an exact sum by the chosen all-reduce algorithm, or a
//! codec from [`comm::codec`] with error feedback (per member, per strategy and bucket), on the
//! whole group or only across nodes.
//!
//! State kept between steps (residuals, PowerSGD's warm start, random-k's draw counters) lives
//! here per world rank, named `strategy/bucket/kind`, and goes into checkpoints, so a resumed run
//! continues bitwise.
//!
//! ```
//! use std::sync::Arc;
//! use comm::{codec::Codec, Communicator, ThreadComm};
//! use graph::Strategy;
//! use planner::exchange::Exchange;
//! use runtime::{BucketKey, GradientAgreement};
//! use train::exchange::Agreement;
//!
//! let bf16 = Exchange { codec: Codec::Bf16, ..Exchange::default() };
//! let a = Arc::new(Agreement::new(bf16, None, 1));
//! let a2 = a.clone();
//! let s = Strategy::parse("dp2", 2)?;
//! let out = ThreadComm::run(2, move |c| -> runtime::Result<Vec<f32>> {
//!     let mut g = vec![0.1 * (c.rank().0 as f32 + 1.0); 4];
//!     let key = BucketKey { strategy: &s, index: 0, shapes: &[vec![4]] };
//!     a2.all_reduce(&c, key, &mut g)?;
//!     Ok(g)
//! })?;
//! assert_eq!(out[0], out[1]);
//! assert!((out[0][0] - 0.3).abs() < 2e-3);
//! // Each member keeps what bf16 left out, to add next time.
//! assert!(a.state(0).iter().any(|(name, _)| name == "dp2/0/worker"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use comm::allreduce::{self, Algorithm, Hierarchy};
use comm::codec::{self, Codec};
use comm::{chunk_counts, words, Communicator, ReduceOp};
use planner::exchange::{Exchange, GroupShape};
use planner::{Cluster, Link};
use runtime::{BucketKey, GradientAgreement, Result, RuntimeError};

use crate::powersgd::{self, PowerSgdState};

/// The links `auto` assumes for a run with no cluster to go by (threads or processes on this
/// machine, TCP between machines): nominal, not measured.
pub fn nominal_cluster(devices: usize, devices_per_node: usize) -> Cluster {
    let per = devices_per_node.max(1);
    Cluster::new(
        "this machine (nominal links)",
        devices.div_ceil(per).max(1),
        per,
        1.0,
        1.0,
        Link::new(10.0, 5.0),
        Link::new(1.0, 50.0),
    )
}

/// One member's state: named vectors.
#[derive(Default)]
struct Kept(BTreeMap<String, Vec<f32>>);

impl Kept {
    /// The vector `name` of `len` values (zeros the first time), taken out; put it back.
    fn take(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        match self.0.remove(name) {
            None => Ok(vec![0.0; len]),
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(RuntimeError::Agreement(format!(
                "`{name}` holds {} values, the gradients it belongs to {len} (a checkpoint of \
                 another model or strategy layout?)",
                v.len()
            ))),
        }
    }

    fn put(&mut self, name: String, v: Vec<f32>) {
        self.0.insert(name, v);
    }

    /// The counter `name` (0 the first time), kept one higher for next time.
    fn next_count(&mut self, name: &str) -> Result<u64> {
        let n = words::decode(&self.take(name, 2)?)?
            .first()
            .copied()
            .unwrap_or(0);
        self.put(name.to_string(), words::encode(&[n + 1]));
        Ok(n)
    }
}

/// Gradient agreement by an [`Exchange`]; one for all ranks of a process.
pub struct Agreement {
    exchange: Exchange,
    cluster: Cluster,
    devices_per_node: usize,
    /// The run's global clipping threshold, for DGC's local clipping (`None`: no clipping).
    clip: Option<f32>,
    /// 1-bit Adam's exchange of the momentum instead of the gradients.
    onebit: Option<OneBit>,
    /// `auto`'s choice per bucket (`strategy/bucket/`).
    chosen: Mutex<BTreeMap<String, Exchange>>,
    kept: Mutex<HashMap<usize, Kept>>,
}

/// 1-bit Adam's exchange (Tang et al. 2021, Algorithm 1): for `warmup` steps the gradients are
/// summed exactly and each member follows AdamW's momentum `m ← β1·m + (1−β1)·g`; after it,
/// each member sends its own momentum term `β1·m/N + (1−β1)·g_i` by the 1-bit `sign` codec with
/// error feedback on the worker and the server side ([`codec::all_reduce_dense`]), and the sum
/// is the new momentum. The gradient handed to the optimizer is the one that takes AdamW's
/// momentum to it, `(m_new − β1·m)/(1−β1)`; the optimizer freezes the variance after the same
/// warm-up ([`kernels::AdamW::freeze_variance_after`]), so the step is 1-bit Adam's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneBit {
    /// Exact steps before the momentum is compressed.
    pub warmup: u64,
    /// AdamW's β1.
    pub beta1: f32,
}

/// DGC's velocity momentum (Lin et al. 2018 train with momentum SGD at 0.9).
pub const DGC_MOMENTUM: f32 = 0.9;

/// Steps per stage of DGC's sparsity warm-up ([`comm::dgc::WARMUP_STAGE`]).
pub const DGC_WARMUP_STAGE: u64 = comm::dgc::WARMUP_STAGE;

impl Agreement {
    /// Agreement by `exchange`; `auto` weighs algorithms on `cluster` (default: the nominal
    /// links of this machine) with `devices_per_node` devices on a node.
    pub fn new(exchange: Exchange, cluster: Option<Cluster>, devices_per_node: usize) -> Self {
        let cluster =
            cluster.unwrap_or_else(|| nominal_cluster(devices_per_node, devices_per_node));
        Self {
            exchange,
            cluster,
            devices_per_node: devices_per_node.max(1),
            clip: None,
            onebit: None,
            chosen: Mutex::new(BTreeMap::new()),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// The same agreement, DGC clipping each member's gradient to `clip / √members` (the run's
    /// global threshold; infinite or `None`: no clipping).
    pub fn with_clip(mut self, clip: Option<f64>) -> Self {
        self.clip = clip.filter(|c| c.is_finite()).map(|c| c as f32);
        self
    }

    /// The same agreement exchanging 1-bit Adam's momentum (`None`: the gradients).
    pub fn with_onebit(mut self, onebit: Option<OneBit>) -> Self {
        self.onebit = onebit;
        self
    }

    /// The exchange it carries.
    pub fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    /// What `--grad-compression auto` chose for each bucket so far (`strategy/bucket/` and the
    /// exchange), in name order; empty unless adaptive.
    pub fn choices(&self) -> Vec<(String, Exchange)> {
        let chosen = self.chosen.lock().unwrap_or_else(|p| p.into_inner());
        chosen.iter().map(|(k, e)| (k.clone(), *e)).collect()
    }

    /// [`Agreement::choices`] counted by exchange, e.g. `none ×3, int8 across nodes ×2` (`None`
    /// unless adaptive or before the first exchange).
    pub fn choice_summary(&self) -> Option<String> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, e) in self.choices() {
            *counts.entry(e.codec_label()).or_default() += 1;
        }
        (!counts.is_empty()).then(|| {
            counts
                .iter()
                .map(|(e, n)| format!("{e} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// The exchange of bucket `prefix` of `len` values over members on `nodes`: the run's, or
    /// [`Exchange::adapt`]'s choice (recorded for [`Agreement::choices`]).
    /// A bucket's choice depends only on its length and its members' nodes, which stay with its
    /// name: it is weighed once and kept.
    fn chosen(&self, prefix: &str, len: usize, nodes: &[usize]) -> Exchange {
        if !self.exchange.adaptive {
            return self.exchange;
        }
        let mut chosen = self.chosen.lock().unwrap_or_else(|p| p.into_inner());
        *chosen.entry(prefix.to_string()).or_insert_with(|| {
            self.exchange
                .adapt(&self.cluster, len as f64, self.shape(nodes))
        })
    }

    fn shape(&self, nodes: &[usize]) -> GroupShape {
        let per_node = nodes.iter().filter(|&&n| n == nodes[0]).count().max(1);
        GroupShape {
            members: nodes.len(),
            per_node,
            groups_per_node: (self.devices_per_node / per_node).max(1),
        }
    }

    /// Runs `f` on world rank `rank`'s state (taken out of the shared map while `f` runs, so
    /// that no lock is held across a collective).
    fn with_kept<T>(&self, rank: usize, f: impl FnOnce(&mut Kept) -> Result<T>) -> Result<T> {
        let mut mine = {
            let mut all = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            all.remove(&rank).unwrap_or_default()
        };
        let out = f(&mut mine);
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rank, mine);
        out
    }

    /// The exact sum by the chosen algorithm.
    fn exact(&self, c: &dyn Communicator, buf: &mut [f32], nodes: &[usize]) -> Result<()> {
        let bytes = (buf.len() * 4) as f64;
        match self
            .exchange
            .algorithm_for(&self.cluster, bytes, self.shape(nodes))
        {
            Algorithm::Ring => c.all_reduce(buf, ReduceOp::Sum)?,
            Algorithm::Hierarchical => {
                Hierarchy::new(c, nodes)?.all_reduce(buf, ReduceOp::Sum, Algorithm::Ring)?
            }
            a => allreduce::all_reduce(c, buf, ReduceOp::Sum, a)?,
        }
        Ok(())
    }

    /// 1-bit Adam's exchange of bucket `prefix` ([`OneBit`]): the member's gradient in `buf`
    /// (clipped to `clip / √N` first), the gradient that takes AdamW's momentum to the agreed
    /// one out.
    fn onebit(
        &self,
        c: &dyn Communicator,
        buf: &mut [f32],
        prefix: &str,
        kept: &mut Kept,
        ob: OneBit,
    ) -> Result<()> {
        let len = buf.len();
        let name = |kind: &str| format!("{prefix}{kind}");
        if let Some(clip) = self.clip {
            codec::clip_local(buf, clip, c.size());
        }
        let mut m = kept.take(&name("momentum"), len)?;
        let step = kept.next_count(&name("steps"))?;
        let (b1, omb1) = (ob.beta1, 1.0 - ob.beta1);
        if step < ob.warmup {
            // Exact: the optimizer's AdamW forms this same momentum from this same sum.
            self.exact(c, buf, &c.member_nodes())?;
            for (m, &g) in m.iter_mut().zip(buf.iter()) {
                *m = b1 * *m + omb1 * g;
            }
        } else {
            let members = c.size() as f32;
            let mut mine: Vec<f32> = buf
                .iter()
                .zip(&m)
                .map(|(&g, &m)| b1 * m / members + omb1 * g)
                .collect();
            // The 1-bit codec with error feedback on both sides, as `sign` runs.
            let sign = Exchange {
                codec: Codec::Sign,
                error_feedback: true,
                cross_node_only: false,
                adaptive: false,
                ..self.exchange
            };
            self.compressed(&sign, c, &mut mine, &[], prefix, kept)?;
            for ((g, m), &agreed) in buf.iter_mut().zip(m.iter_mut()).zip(&mine) {
                *g = (agreed - b1 * *m) / omb1;
                *m = agreed;
            }
        }
        kept.put(name("momentum"), m);
        Ok(())
    }

    /// The codec's all-reduce of `buf` over `c`; `prefix` names the state (`strategy/bucket/`).
    fn compressed(
        &self,
        ex: &Exchange,
        c: &dyn Communicator,
        buf: &mut [f32],
        shapes: &[Vec<usize>],
        prefix: &str,
        kept: &mut Kept,
    ) -> Result<()> {
        let feedback = ex.error_feedback;
        let len = buf.len();
        let codec = ex.codec;
        let name = |kind: &str| format!("{prefix}{kind}");
        let mut worker = if feedback {
            Some(kept.take(&name("worker"), len)?)
        } else {
            None
        };
        let nodes = c.member_nodes();
        let algo = |bytes: usize| ex.algorithm_for(&self.cluster, bytes as f64, self.shape(&nodes));
        match codec {
            Codec::None => self.exact(c, buf, &nodes)?,
            Codec::Bf16 | Codec::Fp16 | Codec::Int8 | Codec::Sign | Codec::Qsgd(_) => {
                let chunk = chunk_counts(len, c.size())[c.rank().0];
                let mut server = if feedback {
                    Some(kept.take(&name("server"), chunk)?)
                } else {
                    None
                };
                codec::all_reduce_dense(
                    c,
                    buf,
                    codec,
                    worker.as_deref_mut(),
                    server.as_deref_mut(),
                )?;
                if let Some(s) = server {
                    kept.put(name("server"), s);
                }
            }
            Codec::TopK(_) => codec::all_reduce_top_k(c, buf, codec, worker.as_deref_mut())?,
            Codec::OkTopK(_) => {
                comm::sparse::all_reduce_top_k_balanced(c, buf, codec, worker.as_deref_mut())?
            }
            Codec::Sketch(..) => {
                return Err(RuntimeError::Agreement(format!(
                    "{codec} is a federated uplink (--sync fedavg), not a DP exchange"
                )))
            }
            Codec::Dgc(fraction) | Codec::OkDgc(fraction) => {
                // The unsent values are DGC's own residual (`--error-feedback` must be on).
                let mut velocity = kept.take(&name("velocity"), len)?;
                let mut accumulated = kept.take(&name("accumulated"), len)?;
                let step = kept.next_count(&name("steps"))?;
                comm::dgc::all_reduce_dgc(
                    c,
                    buf,
                    comm::dgc::Dgc {
                        velocity: &mut velocity,
                        accumulated: &mut accumulated,
                        momentum: DGC_MOMENTUM,
                        density: comm::dgc::dgc_density(fraction, step, DGC_WARMUP_STAGE),
                        clip: self.clip,
                        balanced: matches!(codec, Codec::OkDgc(_)),
                    },
                )?;
                kept.put(name("velocity"), velocity);
                kept.put(name("accumulated"), accumulated);
            }
            Codec::RandK(_) => {
                let draws = name("draws");
                let count = kept.next_count(&draws)?;
                let seed = fnv(&draws) ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let k = codec.keep(len);
                codec::all_reduce_random_k(
                    c,
                    buf,
                    codec,
                    seed,
                    worker.as_deref_mut(),
                    algo(4 * k),
                )?;
            }
            Codec::PowerSgd(r) => {
                let qname = name("q");
                let mut q = kept.0.remove(&qname).unwrap_or_default();
                let seed = fnv(&qname);
                powersgd::all_reduce(
                    c,
                    buf,
                    shapes,
                    r,
                    PowerSgdState {
                        q: &mut q,
                        residual: worker.as_deref_mut(),
                        seed,
                    },
                    &algo,
                )?;
                kept.put(qname, q);
            }
        }
        if let Some(w) = worker {
            kept.put(name("worker"), w);
        }
        Ok(())
    }
}

/// FNV-1a of a name: seeds that every member derives alike.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl GradientAgreement for Agreement {
    fn name(&self) -> String {
        format!("gradient exchange {}", self.exchange)
    }

    fn all_reduce(
        &self,
        dp: &dyn Communicator,
        key: BucketKey<'_>,
        flat: &mut [f32],
    ) -> Result<()> {
        if dp.size() <= 1 {
            return Ok(());
        }
        let nodes = dp.member_nodes();
        let me = dp.world_ranks()[dp.rank().0].0;
        let prefix = format!("{}/{}/", key.strategy, key.index);
        if let Some(ob) = self.onebit {
            return self.with_kept(me, |k| self.onebit(dp, flat, &prefix, k, ob));
        }
        let ex = self.chosen(&prefix, flat.len(), &nodes);
        if ex.codec == Codec::None {
            return self.exact(dp, flat, &nodes);
        }
        let per_node = self.shape(&nodes).per_node;
        let spans_nodes = nodes.iter().any(|&n| n != nodes[0]);
        if ex.cross_node_only && (!spans_nodes || per_node > 1) {
            if !spans_nodes {
                return self.exact(dp, flat, &nodes);
            }
            // Exact inside the node, the codec across nodes on this member's chunk.
            let h = Hierarchy::new(dp, &nodes)?;
            let counts = chunk_counts(flat.len(), h.intra.size());
            let mut chunk = vec![0.0; counts[h.intra.rank().0]];
            h.intra
                .reduce_scatter(flat, &mut chunk, &counts, ReduceOp::Sum)?;
            let prefix = format!("{prefix}across/");
            self.with_kept(me, |k| {
                self.compressed(&ex, h.inter.as_ref(), &mut chunk, &[], &prefix, k)
            })?;
            h.intra.all_gather(&chunk, flat, &counts)?;
            return Ok(());
        }
        self.with_kept(me, |k| {
            self.compressed(&ex, dp, flat, key.shapes, &prefix, k)
        })
    }

    fn reduce_scatter(
        &self,
        dp: &dyn Communicator,
        key: BucketKey<'_>,
        grad: &[f32],
        out: &mut [f32],
        counts: &[usize],
    ) -> Result<()> {
        let me = dp.rank().0;
        if dp.size() <= 1 {
            out.copy_from_slice(grad);
            return Ok(());
        }
        let prefix = format!("{}/{}/", key.strategy, key.index);
        let ex = self.chosen(&prefix, grad.len(), &dp.member_nodes());
        let codec = ex.codec;
        if codec == Codec::None && self.onebit.is_none() {
            return Ok(dp.reduce_scatter(grad, out, counts, ReduceOp::Sum)?);
        }
        let mut work = grad.to_vec();
        if codec.is_dense() && !ex.cross_node_only && self.onebit.is_none() {
            let world = dp.world_ranks()[me].0;
            let name = format!("{prefix}worker");
            let feedback = ex.error_feedback;
            let sum = self.with_kept(world, |k| {
                let mut worker = if feedback {
                    Some(k.take(&name, work.len())?)
                } else {
                    None
                };
                let s = codec::reduce_scatter_dense(
                    dp,
                    &mut work,
                    counts,
                    codec,
                    worker.as_deref_mut(),
                )?;
                if let Some(w) = worker {
                    k.put(name.clone(), w);
                }
                Ok(s)
            })?;
            out.copy_from_slice(&sum);
            return Ok(());
        }
        // The other codecs (and 1-bit Adam) reduce the whole tensor and keep this member's
        // chunk.
        self.all_reduce(dp, key, &mut work)?;
        let start: usize = counts[..me].iter().sum();
        out.copy_from_slice(&work[start..start + counts[me]]);
        Ok(())
    }

    fn state(&self, rank: usize) -> Vec<(String, Vec<f32>)> {
        let all = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&rank)
            .map(|k| k.0.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn restore(&self, rank: usize, state: Vec<(String, Vec<f32>)>) -> Result<()> {
        let mut all = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(rank, Kept(state.into_iter().collect()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::ThreadComm;
    use graph::Strategy;
    use std::sync::Arc;

    /// A gradient with a steady part of mixed magnitudes (what a lossy codec keeps dropping or
    /// distorting the same way every step) and a little noise.
    fn grad(rank: usize, step: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let scale = if i % 5 == 0 { 10.0 } else { 1.0 };
                let steady = ((i * 37 % 17) as f32 - 8.0) * 1e-3 * scale;
                let noise = (((i * 31 + rank * 7 + step * 3) % 41) as f32 - 20.0) * 2.5e-5;
                steady + noise
            })
            .collect()
    }

    /// `steps` all-reduces of bucket 0 under `exchange` on `n` ranks; every rank's results.
    fn run(exchange: Exchange, n: usize, steps: usize, len: usize) -> Vec<Vec<Vec<f32>>> {
        run_on(Agreement::new(exchange, None, 2), n, steps, len)
    }

    /// [`run`] with the agreement `a`.
    fn run_on(a: Agreement, n: usize, steps: usize, len: usize) -> Vec<Vec<Vec<f32>>> {
        let a = Arc::new(a);
        ThreadComm::run(n, move |c| -> Result<Vec<Vec<f32>>> {
            let s = Strategy::parse(&format!("dp{n}"), n)
                .map_err(|e| RuntimeError::Binding(e.to_string()))?;
            let shapes = vec![vec![len / 8, 8]];
            let mut out = Vec::new();
            for step in 0..steps {
                let mut g = grad(c.rank().0, step, len);
                let key = BucketKey {
                    strategy: &s,
                    index: 0,
                    shapes: &shapes,
                };
                a.all_reduce(&c, key, &mut g)?;
                out.push(g);
            }
            Ok(out)
        })
        .unwrap()
    }

    #[test]
    fn the_exact_ring_is_the_communicators_all_reduce_bit_for_bit() {
        let got = run(Exchange::default(), 4, 2, 96);
        let want = ThreadComm::run(4, |c| -> Result<Vec<Vec<f32>>> {
            let mut out = Vec::new();
            for step in 0..2 {
                let mut g = grad(c.rank().0, step, 96);
                c.all_reduce(&mut g, ReduceOp::Sum)?;
                out.push(g);
            }
            Ok(out)
        })
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn with_feedback_the_running_sum_of_what_arrived_tracks_the_exact_one() {
        // Over many steps, error feedback makes the accumulated compressed sums differ from the
        // accumulated exact sums by only the last residuals; without it, the gap grows with
        // every step (mean over the values).
        let (n, steps, len) = (3, 40, 128);
        let exact: Vec<f32> = (0..len)
            .map(|i| {
                (0..steps)
                    .map(|s| (0..n).map(|r| grad(r, s, len)[i]).sum::<f32>())
                    .sum()
            })
            .collect();
        let gap = |exchange: Exchange| -> f32 {
            let out = run(exchange, n, steps, len);
            (0..len)
                .map(|i| (out[0].iter().map(|g| g[i]).sum::<f32>() - exact[i]).abs())
                .sum::<f32>()
                / len as f32
        };
        for codec in [
            Codec::Sign,
            Codec::TopK(0.05),
            Codec::RandK(0.1),
            Codec::PowerSgd(1),
        ] {
            let with = gap(Exchange {
                codec,
                ..Exchange::default()
            });
            let without = gap(Exchange {
                codec,
                error_feedback: false,
                ..Exchange::default()
            });
            assert!(
                with < 0.5 * without,
                "{codec}: with feedback {with}, without {without}"
            );
        }
    }

    #[test]
    fn onebit_is_exact_in_its_warm_up_then_its_momenta_track_the_exact_ones() {
        let (n, steps, len, warmup) = (3, 1280, 128, 5);
        let b1 = 0.9f32;
        let onebit = Agreement::new(Exchange::default(), None, 2)
            .with_onebit(Some(OneBit { warmup, beta1: b1 }));
        let got = run_on(onebit, n, steps, len);
        let exact = run(Exchange::default(), n, steps, len);
        assert_eq!(got[0][..warmup as usize], exact[0][..warmup as usize]);
        assert_ne!(got[0][warmup as usize], exact[0][warmup as usize]);
        assert!(got.iter().all(|r| *r == got[0]), "the members disagree");
        // The gradients handed on take AdamW's momentum to the agreed one. The parameters move
        // by the running sum of the momenta; with error feedback on both sides that sum stays
        // within a bounded distance of the exact momenta's (Tang et al. 2021, §4).
        let momenta = |gs: &[Vec<f32>]| -> Vec<Vec<f64>> {
            let mut m = vec![0.0f64; len];
            let mut sum = vec![0.0f64; len];
            gs.iter()
                .map(|g| {
                    for i in 0..len {
                        m[i] = f64::from(b1) * m[i] + f64::from(1.0 - b1) * f64::from(g[i]);
                        sum[i] += m[i];
                    }
                    sum.clone()
                })
                .collect()
        };
        let (path, want) = (momenta(&got[0]), momenta(&exact[0]));
        let mean = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>() / len as f64;
        let gap = |t: usize| -> f64 {
            mean(
                &path[t]
                    .iter()
                    .zip(&want[t])
                    .map(|(a, b)| a - b)
                    .collect::<Vec<_>>(),
            )
        };
        // Relative to the distance travelled, the gap falls: 0.43 at 80 steps, 0.06 at 1,280
        // (a gap that grew with the steps, as an uncorrected codec's, would stay level).
        let rel = |t: usize| gap(t) / mean(&want[t]);
        let (early, late) = (rel(79), rel(steps - 1));
        assert!(
            late < 0.1 && late < 0.25 * early,
            "relative gap {early} at 80 steps, {late} at {steps}"
        );
    }

    #[test]
    fn state_survives_a_round_trip_and_a_wrong_size_is_refused() {
        let a = Agreement::new(
            Exchange {
                codec: Codec::Int8,
                ..Exchange::default()
            },
            None,
            1,
        );
        a.restore(3, vec![("dp2/0/worker".into(), vec![1.0, 2.0])])
            .unwrap();
        assert_eq!(
            a.state(3),
            vec![("dp2/0/worker".to_string(), vec![1.0, 2.0])]
        );
        let mut k = Kept::default();
        k.put("x".into(), vec![0.0; 3]);
        let e = k.take("x", 4).unwrap_err().to_string();
        assert!(e.contains("`x` holds 3 values") && e.contains("4"), "{e}");
    }
}
