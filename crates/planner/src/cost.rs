//! The analytic cost model: compute (FLOPs, including attention's quadratic term, over a
//! calibrated efficiency), TP/SP collectives and pipeline transfers (α–β over the link each group
//! uses), pipeline bubbles of 1F1B, the DP gradient reduction, and the memory of model states and
//! activations, which bounds the tokens of a micro-batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use data::Packing;
use graph::{Schedule, Strategy, Zero};
use model::LlamaConfig;
use serde::Serialize;

use crate::cluster::{Cluster, Link};
use crate::exchange::{Exchange, ExchangeCost, GroupShape};
use crate::timeline::{self, Pass};

/// Elementwise traffic per token per layer, in elements, forward and backward: RMSNorms and
/// residual adds with their gradients on the whole stream (`× hidden`; split over TP only
/// under SP), RoPE on q and k (`× hidden`, split over TP) and SwiGLU (`× intermediate`, split).
const ELEMENTWISE_STREAM: f64 = 24.0;
const ELEMENTWISE_HEADS: f64 = 18.0;
const ELEMENTWISE_PER_INTERMEDIATE: f64 = 9.0;
/// AdamW reads the weight, gradient and two moments and writes three: elements per parameter.
const OPTIMIZER_ELEMENTS: f64 = 7.0;
/// Activation bytes per token per layer per hidden unit under TP with SP and FlashAttention
/// (Korthikanti et al., "Reducing Activation Recomputation", without the `5as/h` score term).
pub const ACT_BYTES_PER_TOKEN_HIDDEN: f64 = 34.0;
/// What the count of a micro-batch's kernel calls depends on: TP degree, SP, recomputation.
type KernelKey = (usize, bool, graph::Recompute);

/// The share of device memory the model may use (the rest: allocator, workspace, NCCL).
pub const USABLE_MEMORY: f64 = 0.9;

/// Seconds by component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// GEMMs and attention.
    pub compute: f64,
    /// TP/SP collectives and context parallelism's attention exchange (both inside the layers).
    pub tp_comm: f64,
    /// Pipeline bubbles (1F1B fill and drain).
    pub bubble: f64,
    /// Activations between pipeline stages.
    pub pp_comm: f64,
    /// The DP gradient reduction.
    pub dp_reduce: f64,
    /// Parameter and gradient switches between strategies.
    pub switch: f64,
    /// Elementwise kernels (norms, RoPE, SwiGLU, adds, cross-entropy), where the cluster
    /// models them.
    pub elementwise: f64,
    /// The optimizer update, where the cluster models it.
    pub optimizer: f64,
    /// The step's small collectives (the loss, the gradient norm, the metrics), and under
    /// ZeRO-1/2 the updated pieces' all-gather over DP.
    #[serde(default)]
    pub sync: f64,
}

impl Breakdown {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.compute
            + self.tp_comm
            + self.bubble
            + self.pp_comm
            + self.dp_reduce
            + self.switch
            + self.elementwise
            + self.optimizer
            + self.sync
    }

    /// Component-wise sum.
    pub fn add(&mut self, o: &Breakdown) {
        self.compute += o.compute;
        self.tp_comm += o.tp_comm;
        self.bubble += o.bubble;
        self.pp_comm += o.pp_comm;
        self.dp_reduce += o.dp_reduce;
        self.switch += o.switch;
        self.elementwise += o.elementwise;
        self.optimizer += o.optimizer;
        self.sync += o.sync;
    }
}

/// Memory per device, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Weights, gradients and optimizer state.
    pub states: f64,
    /// Activations of the micro-batches in flight and the logits.
    pub activations: f64,
}

impl Memory {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.states + self.activations
    }
}

/// Model-state bytes per parameter on a device while `s` runs and `inst` holds the master
/// weights: `s`'s weights and gradients, `elem_bytes` each over its TP × PP (ZeRO-3 shards the
/// weights and ZeRO-2 the gradients over its DP), plus `inst`'s fp32 master weights and two Adam
/// moments, 12 bytes over its TP × PP and, under ZeRO-1 or more (the distributed optimizer), over
/// its DP. A static strategy is its own `inst`. The one formula for model state: the cost model
/// bounds micro-batches with it and [`instantiation`] chooses the strategy that holds the weights.
pub fn state_bytes_per_param(elem_bytes: f64, s: &Strategy, inst: &Strategy) -> f64 {
    let dp = s.replicas() as f64;
    let w = if s.zero >= Zero::Parameters {
        elem_bytes / dp
    } else {
        elem_bytes
    };
    let g = if s.zero >= Zero::Gradients {
        elem_bytes / dp
    } else {
        elem_bytes
    };
    let master = (inst.tp * inst.pp) as f64
        * if inst.zero >= Zero::Optimizer {
            inst.replicas() as f64
        } else {
            1.0
        };
    (w + g) / (s.tp * s.pp) as f64 + 12.0 / master
}

/// Which of `strategies` holds the master weights and the optimizer of a hot-switching
/// schedule: the one with the least model state per device when it holds them itself (f32
/// training), the first of equals.
pub fn instantiation(strategies: &[&Strategy]) -> usize {
    let cost = |s: &Strategy| state_bytes_per_param(4.0, s, s);
    let mut best = 0;
    for (i, s) in strategies.iter().enumerate() {
        if cost(s) < cost(strategies[best]) {
            best = i;
        }
    }
    best
}

/// The cost model of one model on one cluster.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// The devices.
    pub cluster: Cluster,
    /// The model.
    pub cfg: LlamaConfig,
    /// How sequences are packed.
    pub packing: Packing,
    /// How DP replicas exchange gradients (default: exact, by the ring).
    pub exchange: Exchange,
    /// The pipeline schedule.
    pub schedule: Schedule,
    /// Elements a DP gradient bucket reaches before the next begins (the runtime's 4 MiB of
    /// f32).
    pub bucket_elems: usize,
    /// Buckets sized per strategy by [`CostModel::auto_bucket_bytes`] instead (`--bucket-mb
    /// auto`).
    pub auto_buckets: bool,
    /// `--comm-schedule priority` (pure DP): a step's gradients are summed in pieces of a
    /// bucket's size, the ones the next forward reads first during the next step (each
    /// parameter updated on that thread once summed, the forward waiting per parameter), the
    /// rest during the last backward ([`CostModel::priority_end`]).
    pub priority: bool,
    /// Under priority: the share of the values whose pieces wait for the next step (the
    /// runtime's `RankGroups::priority_defer`, 1/3); the rest are summed during the last
    /// backward.
    pub priority_defer: f64,
    /// Kernel calls of a micro-batch by `(tp, sp, recompute)`, counted once.
    kernels: Arc<Mutex<HashMap<KernelKey, f64>>>,
}

/// A layer's GEMM parameters: q, o, k, v and the three MLP projections.
fn layer_matmul_params(c: &LlamaConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    let kv = (c.kv_heads() * c.head_dim()) as f64;
    h * q * 2.0 + h * kv * 2.0 + 3.0 * h * i
}

/// A sequence's training work beyond its length, per squared token: its FLOPs are
/// `6·l·(GEMM parameters) + 6·l²·(attention width)·layers`, so over `6·(GEMM parameters)` a
/// sequence of `l` tokens is `l + quadratic_work · l²` (what [`Packing::Balanced`] balances).
pub fn quadratic_work(c: &LlamaConfig) -> f64 {
    let gemm =
        c.num_hidden_layers as f64 * layer_matmul_params(c) + (c.vocab_size * c.hidden_size) as f64;
    let attention = (c.num_attention_heads * c.head_dim() * c.num_hidden_layers) as f64;
    attention / gemm
}

impl CostModel {
    /// A cost model for `cfg` on `cluster`, packing [`Packing::Balanced`] by each sequence's
    /// work (its GEMMs and attention) up to each strategy's capacity.
    pub fn new(cluster: Cluster, cfg: LlamaConfig) -> Self {
        let mut out = Self {
            cluster,
            cfg,
            packing: Packing::InOrder { budget: 0 },
            exchange: Exchange::default(),
            schedule: Schedule::OneFOneB,
            bucket_elems: 1 << 20,
            auto_buckets: false,
            priority: false,
            priority_defer: 1.0 / 3.0,
            kernels: Default::default(),
        };
        out.packing = Packing::Balanced {
            budget: usize::MAX,
            quadratic: quadratic_work(&out.cfg),
        };
        out
    }

    /// Kernel calls of one micro-batch's forward and backward through every layer on one rank
    /// of `s`'s TP group: the ops of its exec graph other than communication (0 where the model
    /// cannot be lowered for `s`).
    pub fn kernels(&self, s: &Strategy) -> f64 {
        let key = (s.tp, s.sp, s.recompute);
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        *cache.entry(key).or_insert_with(|| {
            let whole = Strategy {
                dp: 1,
                pp: 1,
                zero: Zero::Off,
                ..s.clone()
            };
            model::rank_exec(&self.cfg, &whole, 0).map_or(0.0, |e| {
                e.graph
                    .ops
                    .iter()
                    .filter(|o| !matches!(o.kind, graph::OpKind::Comm { .. }))
                    .count() as f64
            })
        })
    }

    /// Seconds of the optimizer update on `inst`'s pieces (0 where the cluster leaves it out):
    /// the gradient norm's pass over them, clipping's scaling, AdamW, each a kernel per tensor.
    pub fn optimizer(&self, inst: &Strategy) -> f64 {
        let c = &self.cluster;
        let per = self.params() / (inst.tp * inst.pp) as f64;
        let per = if inst.zero >= Zero::Optimizer {
            per / inst.replicas() as f64
        } else {
            per
        };
        let adamw = if c.optimizer_gparams > 0.0 {
            per / (c.optimizer_gparams * 1e9)
        } else if c.memory_gbps > 0.0 {
            per * OPTIMIZER_ELEMENTS * 4.0 / (c.memory_gbps * 1e9)
        } else {
            0.0
        };
        // The norm reads every gradient, clipping reads and writes them (f32).
        let norm = if c.memory_gbps > 0.0 {
            per * 3.0 * 4.0 / (c.memory_gbps * 1e9)
        } else {
            0.0
        };
        let tensors = (0..inst.pp.max(1))
            .map(|k| self.stage_tensors(inst, k).len())
            .max()
            .unwrap_or(0) as f64;
        adamw + norm + 3.0 * tensors * c.kernel_overhead_us * 1e-6
    }

    /// Seconds to add one micro-batch's gradients of stage `stage` to the step's sum (f32, a
    /// kernel per tensor): what every micro-batch after a replica's first costs.
    fn accumulate(&self, s: &Strategy, stage: usize) -> f64 {
        let c = &self.cluster;
        let tensors = self.stage_tensors(s, stage);
        let values: f64 = tensors.iter().map(|t| t.len as f64).sum();
        let bytes = if c.memory_gbps > 0.0 {
            3.0 * 4.0 * values / (c.memory_gbps * 1e9)
        } else {
            0.0
        };
        c.compute_scale * bytes + tensors.len() as f64 * c.kernel_overhead_us * 1e-6
    }

    /// Parameters of the decoder layers' matrices (per layer).
    pub fn layer_matmul_params(&self) -> f64 {
        layer_matmul_params(&self.cfg)
    }

    /// Every parameter.
    pub fn params(&self) -> f64 {
        let c = &self.cfg;
        let (h, v) = (c.hidden_size as f64, c.vocab_size as f64);
        let emb = if c.tie_word_embeddings { 1.0 } else { 2.0 };
        c.num_hidden_layers as f64 * (self.layer_matmul_params() + 2.0 * h) + emb * v * h + h
    }

    /// Training FLOPs (forward and backward) of `lens` packed together: (GEMMs, attention).
    pub fn flops(&self, lens: &[usize]) -> (f64, f64) {
        let c = &self.cfg;
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        let (h, v, layers) = (
            c.hidden_size as f64,
            c.vocab_size as f64,
            c.num_hidden_layers as f64,
        );
        let gemm = 6.0 * tokens * (layers * self.layer_matmul_params() + v * h);
        // Causal attention: QKᵀ and AV, half the square, forward + backward ≈ 3 × forward.
        let q = (c.num_attention_heads * c.head_dim()) as f64;
        let attn: f64 = lens
            .iter()
            .map(|&l| 3.0 * 2.0 * (l as f64) * (l as f64) * q * layers)
            .sum();
        (gemm, attn)
    }

    /// Device-seconds that training one sequence of `len` tokens takes at the least under any
    /// strategy: its model FLOPs ([`CostModel::flops`]) at the fastest rates the cluster's
    /// kernels reach, scaled as compute is. [`CostModel::strategy`] on `m` devices is never
    /// faster than the sum of this over its sequences divided by `m` (every stage of every
    /// replica runs its passes one after another, and its devices share their work evenly at
    /// best), except where idle stages lend their shared cores to busy ones
    /// ([`Cluster::shared_cores`]): there this is 0.
    pub fn least_device_seconds(&self, len: usize) -> f64 {
        if self.cluster.shared_cores > 0.0 {
            return 0.0;
        }
        let (gemm, attn) = self.flops(&[len]);
        let c = &self.cluster;
        c.compute_scale * (gemm / c.fastest_gemm_flops() + attn / c.fastest_attention_flops())
    }

    /// Model-state bytes per device while `s` runs and `inst` holds the master weights
    /// ([`state_bytes_per_param`] with the cluster's element size), and under PipeDream-2BW
    /// the stashed second version of `s`'s weights.
    pub fn state_bytes(&self, s: &Strategy, inst: &Strategy) -> f64 {
        // PipeDream-2BW stashes a second version of the weights a step's micro-batches read.
        let stashed = if self.schedule.flushless() && s.pp > 1 {
            self.cluster.elem_bytes / (s.tp * s.pp) as f64
        } else {
            0.0
        };
        self.params() * (state_bytes_per_param(self.cluster.elem_bytes, s, inst) + stashed)
    }

    /// Activation bytes per token of a micro-batch on the busiest device (the first stage under
    /// 1F1B holds `pp` micro-batches of `layers/pp` layers: all layers' worth), plus the logits.
    /// Recomputation keeps less: `selective` drops attention's output (2 bytes per value, as the
    /// constant counts), `full` keeps each layer's input (the same) and one layer's activations
    /// while it is recomputed. A CP rank holds `1/cp` of the micro-batch's tokens.
    pub fn activation_bytes_per_token(&self, s: &Strategy) -> f64 {
        let c = &self.cfg;
        let tp = s.tp as f64;
        let layers = c.num_hidden_layers as f64;
        let h = c.hidden_size as f64;
        let per_layer = ACT_BYTES_PER_TOKEN_HIDDEN * h / tp;
        let kept = match s.recompute {
            graph::Recompute::None => layers * per_layer,
            graph::Recompute::Selective => layers * (per_layer - 2.0 * h / tp),
            graph::Recompute::Full => layers * 2.0 * h / tp + per_layer,
        };
        (kept + 8.0 * c.vocab_size as f64 / tp) / s.cp as f64
    }

    /// Memory per device under `s` (master weights in `inst`) with micro-batches of `tokens`.
    pub fn memory(&self, s: &Strategy, inst: &Strategy, tokens: usize) -> Memory {
        Memory {
            states: self.state_bytes(s, inst),
            activations: tokens as f64 * self.activation_bytes_per_token(s),
        }
    }

    /// The most tokens a micro-batch may hold under `s` with the master weights in `inst` (0
    /// when the states alone do not fit).
    pub fn capacity(&self, s: &Strategy, inst: &Strategy) -> usize {
        let budget = self.cluster.memory_gib * (1u64 << 30) as f64 * USABLE_MEMORY;
        let left = budget - self.state_bytes(s, inst);
        if left <= 0.0 {
            return 0;
        }
        (left / self.activation_bytes_per_token(s)).floor() as usize
    }

    /// Ring all-reduce of `bytes` over `n` devices spanning `span` consecutive devices (the TP
    /// collectives).
    fn all_reduce(&self, bytes: f64, n: usize, span: usize) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        let k = (n - 1) as f64;
        self.cluster
            .link(span)
            .seconds(2.0 * k / n as f64 * bytes, 2.0 * k)
    }

    /// Where the DP groups of `s` sit: TP innermost, node-contiguous.
    pub fn dp_shape(&self, s: &Strategy) -> GroupShape {
        let per = self.cluster.devices_per_node.max(1);
        let members = s.replicas();
        if s.tp <= per {
            GroupShape {
                members,
                per_node: (per / s.tp).clamp(1, members.max(1)),
                groups_per_node: s.tp,
            }
        } else {
            GroupShape {
                members,
                per_node: 1,
                groups_per_node: per,
            }
        }
    }

    /// The bucket size (bytes of `f32` gradients) that `s`'s DP all-reduce should use, by the
    /// α–β model of a ring over the group's slowest link: a step's buckets cost
    /// `(G/b)·2(n−1)·α` in latencies and the last one, which nothing overlaps, `2(n−1)/n·b/β`
    /// in bandwidth; their sum is least at `b = √(G·α·n·β)` (`G` the rank's gradient bytes,
    /// `n` the members, `α` the latency, `β` the bandwidth). Clamped to 64 KiB..G; 4 MiB where
    /// there is no DP group.
    pub fn auto_bucket_bytes(&self, s: &Strategy) -> usize {
        let n = s.replicas();
        let gradient = 4.0 * self.params() / (s.tp * s.pp) as f64;
        if n <= 1 || gradient <= 0.0 {
            return 4 << 20;
        }
        let shape = self.dp_shape(s);
        let link = if shape.per_node >= n {
            self.cluster.same_node
        } else {
            self.cluster.cross_node
        };
        let b = (gradient * link.latency_us * 1e-6 * n as f64 * link.gbps * 1e9).sqrt();
        (b.clamp(65536.0, gradient.max(65536.0))) as usize
    }

    /// The weight matrices of one pipeline stage's TP piece, `(rows, cols)`, for codecs that
    /// compress matrices (norm weights are vectors, sent exactly).
    pub fn matrices(&self, s: &Strategy) -> Vec<(f64, f64)> {
        let c = &self.cfg;
        let tp = s.tp.max(1);
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim();
        let kv = c.kv_heads() * c.head_dim();
        let layer = [
            (q / tp, h),
            (kv / tp, h),
            (kv / tp, h),
            (h, q / tp),
            (i / tp, h),
            (i / tp, h),
            (h, i / tp),
        ];
        let layers = c.num_hidden_layers.div_ceil(s.pp.max(1));
        let mut out: Vec<(f64, f64)> = (0..layers)
            .flat_map(|_| layer.iter().map(|&(r, k)| (r as f64, k as f64)))
            .collect();
        let embed = (c.vocab_size.div_ceil(tp) as f64, h as f64);
        out.push(embed);
        if !c.tie_word_embeddings {
            out.push(embed);
        }
        out
    }

    /// The DP gradient exchange of `s` by [`CostModel::exchange`].
    pub fn dp_exchange(&self, s: &Strategy) -> ExchangeCost {
        let values = self.params() / (s.tp * s.pp) as f64;
        self.exchange
            .cost(&self.cluster, values, &self.matrices(s), self.dp_shape(s))
    }

    /// Seconds of every linear layer's forward and two backward GEMMs for a micro-batch of
    /// `tokens` on one rank of `s`'s TP group (column-parallel layers split their outputs, row-
    /// parallel ones their inputs; the LM head its vocabulary), unscaled.
    pub fn linear_seconds(&self, s: &Strategy, tokens: usize) -> f64 {
        let (layers, head) = self.linear_parts(s, tokens);
        layers + head
    }

    /// [`CostModel::linear_seconds`] as (every decoder layer's, the LM head's).
    fn linear_parts(&self, s: &Strategy, tokens: usize) -> (f64, f64) {
        let c = &self.cfg;
        let tp = s.tp;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim();
        let kv = c.kv_heads() * c.head_dim();
        let g = |n: usize, k: usize| 3.0 * self.cluster.gemm_seconds(tokens, n, k, 1);
        let layer =
            g(q / tp, h) + 2.0 * g(kv / tp, h) + g(h, q / tp) + 2.0 * g(i / tp, h) + g(h, i / tp);
        (
            c.num_hidden_layers as f64 * layer,
            g(c.vocab_size.div_ceil(tp), h),
        )
    }

    /// Seconds of one layer's context-parallel attention exchange for a micro-batch of
    /// `tokens` under `s`, forward and backward (no overlap with the attention's compute, as
    /// the runtime runs it): the bytes of [`graph::CpExchange::bytes_per_rank`] at the
    /// cluster's element size over the links the CP group spans, one latency per hop or per
    /// peer of each all-to-all.
    pub fn cp_exchange_seconds(&self, s: &Strategy, tokens: f64) -> (f64, f64) {
        if s.cp <= 1 {
            return (0.0, 0.0);
        }
        let c = &self.cfg;
        let heads = c.num_attention_heads / s.tp;
        let kv = (c.kv_heads() / s.tp).max(1);
        let n = (tokens / s.cp as f64).ceil() as usize;
        let (fwd, bwd) = s
            .cp_exchange
            .bytes_per_rank(s.cp, n, heads, kv, c.head_dim());
        let scale = self.cluster.elem_bytes / 4.0;
        let k = (s.cp - 1) as f64;
        let (mf, mb) = match s.cp_exchange {
            graph::CpExchange::Ring => (k, k + 1.0),
            graph::CpExchange::Ulysses => (5.0 * k, 9.0 * k),
        };
        let link = self.cluster.link(s.cp * s.tp);
        (
            link.seconds(fwd as f64 * scale, mf),
            link.seconds(bwd as f64 * scale, mb),
        )
    }

    /// One micro-batch of `lens` through every layer on one TP group: (compute, TP comm,
    /// elementwise), compute and elementwise scaled by the cluster's `compute_scale`; the
    /// kernels' overhead counts as elementwise time.
    pub fn micro_batch(&self, s: &Strategy, lens: &[usize]) -> (f64, f64, f64) {
        let (c, t, e) = self.micro_batch_unscaled(s, lens);
        let k = self.cluster.compute_scale;
        let overhead = if self.cluster.kernel_overhead_us > 0.0 && !lens.is_empty() {
            self.kernels(s) * self.cluster.kernel_overhead_us * 1e-6
        } else {
            0.0
        };
        (c * k, t, e * k + overhead)
    }

    /// A CP rank's share of a micro-batch of `lens` (`tokens` in all) under `s`, by the kernel
    /// rates: one layer's attention, every layer's linear parts, and the head's. A CP rank
    /// computes its 1/cp of the tokens, and (balanced) of attention's pairs.
    fn layer_parts(&self, s: &Strategy, lens: &[usize], tokens: f64) -> (f64, f64, f64) {
        let c = &self.cfg;
        let cp = s.cp as f64;
        let width = c.num_attention_heads * c.head_dim() / s.tp;
        let attention = lens
            .iter()
            .map(|&l| self.cluster.attention_seconds(l, width))
            .sum::<f64>()
            / cp;
        let (layer_linear, head) = self.linear_parts(s, (tokens / cp).ceil() as usize);
        (attention, layer_linear, head)
    }

    /// [`CostModel::micro_batch`] by the kernel rates alone, without the kernels' overhead.
    pub fn micro_batch_unscaled(&self, s: &Strategy, lens: &[usize]) -> (f64, f64, f64) {
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        if tokens == 0.0 {
            return (0.0, 0.0, 0.0);
        }
        let c = &self.cfg;
        let tp = s.tp as f64;
        let layers = c.num_hidden_layers as f64;
        // A CP rank computes its 1/cp of the tokens, and (balanced) of attention's pairs.
        let cp = s.cp as f64;
        let (attention, layer_linear, head) = self.layer_parts(s, lens, tokens);
        let attention = layers * attention;
        // Recomputation runs the forward again (a third of a GEMM's or attention's forward and
        // backward): full every layer's, selective attention's.
        let (again, forward_comm) = match s.recompute {
            graph::Recompute::None => (0.0, 0.0),
            graph::Recompute::Selective => (attention / 3.0, 0.0),
            graph::Recompute::Full => ((layer_linear + attention) / 3.0, 0.5),
        };
        let compute = layer_linear + head + attention + again;
        // Per layer, forward and backward: 2 all-gathers + 2 reduce-scatters each way under
        // SP (the volume of 4 all-reduces of the activations); full recomputation repeats the
        // forward's half.
        let eb = self.cluster.elem_bytes;
        let act = tokens / cp * c.hidden_size as f64 * eb;
        let (cp_fwd, cp_bwd) = self.cp_exchange_seconds(s, tokens);
        let cp_again = if s.recompute == graph::Recompute::None {
            0.0
        } else {
            cp_fwd
        };
        let tp_comm = 4.0 * (1.0 + forward_comm) * layers * self.all_reduce(act, s.tp, s.tp)
            + layers * (cp_fwd + cp_bwd + cp_again);
        let elementwise = if self.cluster.memory_gbps > 0.0 {
            let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
            let stream = ELEMENTWISE_STREAM * h / if s.sp { tp } else { 1.0 };
            let split = (ELEMENTWISE_HEADS * h + ELEMENTWISE_PER_INTERMEDIATE * i) / tp;
            let again = if s.recompute == graph::Recompute::Full {
                4.0 / 3.0
            } else {
                1.0
            };
            let per_token = c.num_hidden_layers as f64 * (stream + split) * again
                + 3.0 * c.vocab_size as f64 / tp;
            tokens / cp * per_token * eb / (self.cluster.memory_gbps * 1e9)
        } else {
            0.0
        };
        (compute, tp_comm, elementwise)
    }

    /// The layers pipeline stage `stage` of `s` holds (every layer where the split fails).
    fn stage_range(&self, s: &Strategy, stage: usize) -> std::ops::Range<usize> {
        let layers = self.cfg.num_hidden_layers.max(1);
        s.stage_layers(layers)
            .ok()
            .and_then(|r| r.get(stage).cloned())
            .unwrap_or(0..layers)
    }

    /// The passes of one micro-batch of `lens` on pipeline stage `stage` of `s`: (forward,
    /// backward), each with its compute (GEMMs a third forward and two thirds backward, the
    /// same for attention; what recomputation runs again in the backward), TP/SP collectives
    /// (two per layer each way, the embedding's on the first stage, the head's and the
    /// vocabulary-parallel loss's on the last), context parallelism's exchange, elementwise
    /// kernels and the kernels' overhead (by the stage's share of the layers), and ZeRO-3's
    /// parameter all-gathers (before each use, forward and backward). Compute and elementwise
    /// time are scaled by the cluster's `compute_scale`.
    pub fn stage_passes(&self, s: &Strategy, lens: &[usize], stage: usize) -> (Pass, Pass) {
        let c = &self.cfg;
        let layers_all = c.num_hidden_layers.max(1);
        let mine = self.stage_range(s, stage).len() as f64;
        let share = mine / layers_all as f64;
        let first = stage == 0;
        let last = stage + 1 == s.pp.max(1);
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        let k = self.cluster.compute_scale;
        let mut fwd = Pass::default();
        let mut bwd = Pass::default();
        if tokens > 0.0 {
            let cp = s.cp as f64;
            let (attention, layer_linear, head) = self.layer_parts(s, lens, tokens);
            let per_layer_linear = layer_linear / layers_all as f64;
            let layer = per_layer_linear + attention;
            let again = match s.recompute {
                graph::Recompute::None => 0.0,
                graph::Recompute::Selective => attention / 3.0,
                graph::Recompute::Full => layer / 3.0,
            };
            fwd.compute = k * mine * layer / 3.0;
            bwd.compute = k * mine * (2.0 * layer / 3.0 + again);
            if last {
                fwd.compute += k * head / 3.0;
                bwd.compute += k * 2.0 * head / 3.0;
            }
            // TP: two collectives of the activations per layer each way (all-reduces, or SP's
            // all-gather and reduce-scatter: the same volume and steps), the forward's again
            // under full recomputation; the embedding's partial sums forward on the first
            // stage, the head's input gradient backward on the last, and the loss's three
            // collectives of a value per token.
            let eb = self.cluster.elem_bytes;
            let act = tokens / cp * c.hidden_size as f64 * eb;
            let ar = self.all_reduce(act, s.tp, s.tp);
            let small = self.all_reduce(tokens / cp * 4.0, s.tp, s.tp);
            let (cp_fwd, cp_bwd) = self.cp_exchange_seconds(s, tokens);
            let redo = s.recompute == graph::Recompute::Full;
            fwd.tp_comm = mine * (2.0 * ar + cp_fwd);
            bwd.tp_comm = mine
                * (2.0 * ar
                    + cp_bwd
                    + if s.recompute != graph::Recompute::None {
                        cp_fwd
                    } else {
                        0.0
                    }
                    + if redo { 2.0 * ar } else { 0.0 });
            if first {
                fwd.tp_comm += ar;
            }
            if last {
                fwd.tp_comm += 3.0 * small;
                bwd.tp_comm += ar;
            }
            if s.sp {
                // Norms run on sequence shards: each norm weight's gradient is summed over TP.
                let norms = 2.0 * mine + if last { 1.0 } else { 0.0 };
                bwd.tp_comm += norms * self.all_reduce(c.hidden_size as f64 * 4.0, s.tp, s.tp);
            }
            let elementwise = if self.cluster.memory_gbps > 0.0 {
                let tp = s.tp as f64;
                let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
                let stream = ELEMENTWISE_STREAM * h / if s.sp { tp } else { 1.0 };
                let split = (ELEMENTWISE_HEADS * h + ELEMENTWISE_PER_INTERMEDIATE * i) / tp;
                let again = if redo { 4.0 / 3.0 } else { 1.0 };
                let per_token = mine * (stream + split) * again
                    + if last {
                        3.0 * c.vocab_size as f64 / tp
                    } else {
                        0.0
                    };
                k * tokens / cp * per_token * eb / (self.cluster.memory_gbps * 1e9)
            } else {
                0.0
            };
            fwd.elementwise = elementwise / 3.0;
            bwd.elementwise = 2.0 * elementwise / 3.0;
        }
        // Every kernel call's overhead, empty micro-batches (ZeRO-3 pads with them) included.
        if self.cluster.kernel_overhead_us > 0.0 && (tokens > 0.0 || s.zero >= Zero::Parameters) {
            let calls = self.kernels(s) * share * self.cluster.kernel_overhead_us * 1e-6;
            fwd.elementwise += calls / 3.0;
            bwd.elementwise += 2.0 * calls / 3.0;
        }
        if s.zero >= Zero::Parameters && s.replicas() > 1 {
            let link = self.dp_link(s, stage);
            let n = s.replicas();
            let gathers: f64 = self
                .stage_tensors(s, stage)
                .iter()
                .map(|t| self.ring_chunks(t.len as f64, n, link))
                .sum();
            fwd.gathers = gathers;
            bwd.gathers = gathers;
        }
        (fwd, bwd)
    }

    /// A ring all-gather or reduce-scatter of `len` elements (in `n` chunks) over `link`: every
    /// member passes on `n − 1` chunks of the largest size, in `n − 1` messages.
    fn ring_chunks(&self, len: f64, n: usize, link: Link) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        let chunk = (len / n as f64).ceil();
        link.seconds(
            (n - 1) as f64 * chunk * self.cluster.elem_bytes,
            (n - 1) as f64,
        )
    }

    /// The node of a device (`devices_per_node` consecutive devices share one).
    fn node(&self, rank: usize) -> usize {
        rank / self.cluster.devices_per_node.max(1)
    }

    /// The link a group of ranks uses: cross-node when they are on more than one node (as the
    /// simulator's clock prices a collective).
    fn group_link(&self, ranks: &[usize]) -> Link {
        let first = ranks.first().map_or(0, |&r| self.node(r));
        if ranks.iter().all(|&r| self.node(r) == first) {
            self.cluster.same_node
        } else {
            self.cluster.cross_node
        }
    }

    /// The DP group's link of `s`'s pipeline stage `stage` (the replicas of one parameter piece).
    fn dp_link(&self, s: &Strategy, stage: usize) -> Link {
        let rank = s.rank_of(stage, 0, 0);
        self.group_link(&s.group(rank, graph::MeshAxis::Dp))
    }

    /// The link between stage `stage` and `stage + 1` of replica `replica`: cross-node when any
    /// of its TP or CP members sends to a peer on another node (the stage waits for the last of
    /// them).
    fn hop_link(&self, s: &Strategy, replica: usize, stage: usize) -> Link {
        let crosses = (0..s.cp).any(|cp| {
            (0..s.tp).any(|tp| {
                let a = s.rank_of(stage, replica * s.cp + cp, tp);
                let b = s.rank_of(stage + 1, replica * s.cp + cp, tp);
                self.node(a) != self.node(b)
            })
        });
        if crosses {
            self.cluster.cross_node
        } else {
            self.cluster.same_node
        }
    }

    /// The parameter tensors of `s`'s stage `stage` on one TP rank, in the order their
    /// gradients become final in the backward (the head's first, the embedding's last), each
    /// with its matrix shape where it is one.
    pub fn stage_tensors(&self, s: &Strategy, stage: usize) -> Vec<Tensor> {
        let c = &self.cfg;
        let tp = s.tp.max(1);
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim() / tp;
        let kv = (c.kv_heads() * c.head_dim()).div_ceil(tp).max(c.head_dim());
        let v = c.vocab_size.div_ceil(tp);
        let m = |r: usize, k: usize| Tensor {
            len: r * k,
            matrix: Some((r, k)),
        };
        let vector = |n: usize| Tensor {
            len: n,
            matrix: None,
        };
        let range = self.stage_range(s, stage);
        let last = stage + 1 == s.pp.max(1);
        let mut out = Vec::new();
        if last {
            if !c.tie_word_embeddings || s.pp > 1 {
                out.push(m(v, h));
            }
            out.push(vector(h));
        }
        for _ in range {
            // A layer's backward: the MLP first, then attention.
            out.extend([m(h, i / tp), m(i / tp, h), m(i / tp, h), vector(h)]);
            out.extend([m(h, q), m(kv, h), m(kv, h), m(q, h), vector(h)]);
        }
        if stage == 0 {
            out.push(m(v, h));
        }
        out
    }

    /// `s` running `seqs` in micro-batches of at most `cap` tokens, as the runtime runs it:
    /// sequences dealt to the DP replicas by the model's [`Packing`], each replica's micro-batches
    /// through its pipeline in the schedule's order (every stage boundary over the link it
    /// crosses), the DP reduction in buckets on its own thread from the last backward on
    /// (ZeRO-2/3: a reduce-scatter per tensor afterwards), the slowest of them all. The parts
    /// are those of the stage that ends last.
    pub fn strategy(&self, s: &Strategy, seqs: &[usize], cap: usize) -> Breakdown {
        if seqs.is_empty() {
            return Breakdown::default();
        }
        let cap = cap.max(1);
        let p = s.pp.max(1);
        let replicas: Vec<Vec<Vec<usize>>> = self
            .packing
            .deal(seqs, s.dp)
            .into_iter()
            .map(|mine| {
                self.packing
                    .micro_batches(seqs, &mine, cap)
                    .into_iter()
                    .map(|mb| mb.iter().map(|&k| seqs[k]).collect())
                    .collect()
            })
            .collect();
        // ZeRO-3 runs as many micro-batches on every replica as on the busiest.
        let most = replicas.iter().map(Vec::len).max().unwrap_or(0);
        let eb = self.cluster.elem_bytes;
        let zero3 = s.zero >= Zero::Parameters && s.replicas() > 1;
        // Every replica's passes (stage × micro-batch) and stage boundaries.
        let mut passes = Vec::with_capacity(replicas.len());
        let mut hops = Vec::with_capacity(replicas.len());
        let sums: Vec<f64> = (0..p).map(|k| self.accumulate(s, k)).collect();
        for (d, mbs) in replicas.iter().enumerate() {
            let mut mbs = mbs.clone();
            if zero3 {
                mbs.resize(most, Vec::new());
            }
            let (mut fwd, mut bwd) = (vec![Vec::new(); p], vec![Vec::new(); p]);
            for (k, (f, b)) in fwd.iter_mut().zip(bwd.iter_mut()).enumerate() {
                let sum = sums[k];
                for (i, lens) in mbs.iter().enumerate() {
                    let (pf, mut pb) = self.stage_passes(s, lens, k);
                    if i > 0 {
                        pb.elementwise += sum;
                    }
                    f.push(pf);
                    b.push(pb);
                }
            }
            // A stage boundary's message: each TP (and CP) member's piece of the activations,
            // and on shared cores the receiver's wait for a core.
            let handoff = self.cluster.handoff_seconds();
            let hop: Vec<Vec<timeline::Hop>> = (0..p.saturating_sub(1))
                .map(|k| {
                    let link = self.hop_link(s, d, k);
                    mbs.iter()
                        .map(|lens| {
                            let tokens: f64 =
                                lens.iter().map(|&l| l as f64).sum::<f64>() / s.cp as f64;
                            let piece = if s.sp { s.tp as f64 } else { 1.0 };
                            let bytes = tokens * self.cfg.hidden_size as f64 * eb / piece;
                            timeline::Hop {
                                seconds: link.seconds(bytes, 1.0) + handoff,
                                busy: bytes / (link.gbps * 1e9),
                            }
                        })
                        .collect()
                })
                .collect();
            passes.push((fwd, bwd));
            hops.push(hop);
        }
        if zero3 {
            // ZeRO-3 gathers every parameter over DP before each use: the replicas run each
            // micro-batch's passes in step, as slow as the slowest.
            let slowest = |side: usize, k: usize, i: usize| {
                passes
                    .iter()
                    .map(|r| if side == 0 { r.0[k][i] } else { r.1[k][i] })
                    .max_by(|a, b| a.total().total_cmp(&b.total()))
                    .unwrap_or_default()
            };
            let lockstep = |side: usize| -> Vec<Vec<Pass>> {
                (0..p)
                    .map(|k| (0..most).map(|i| slowest(side, k, i)).collect())
                    .collect()
            };
            let (f, b) = (lockstep(0), lockstep(1));
            for r in &mut passes {
                *r = (f.clone(), b.clone());
            }
        }
        let mut runs = Vec::with_capacity(replicas.len());
        // PipeDream-2BW: a step costs the pipeline's period; a step's gradients are summed over
        // DP in buckets while its last backward runs, as under 1F1B.
        let flushless = self.schedule.flushless() && p > 1;
        let mut periods = Vec::with_capacity(replicas.len());
        for ((fwd, bwd), hop) in passes.iter().zip(&hops) {
            if flushless {
                let (period, run) = timeline::steady(fwd, bwd, hop);
                periods.push(period);
                runs.push(run);
            } else {
                runs.push(timeline::pipeline(self.schedule, fwd, bwd, hop));
            }
        }
        // The critical replica's pipeline with free stage boundaries: what its hops cost.
        let idle = |d: usize| -> f64 {
            let (fwd, bwd) = &passes[d];
            let no_hop: Vec<Vec<timeline::Hop>> = hops[d]
                .iter()
                .map(|h| vec![timeline::Hop::default(); h.len()])
                .collect();
            if flushless {
                timeline::steady(fwd, bwd, &no_hop).0
            } else {
                timeline::pipeline(self.schedule, fwd, bwd, &no_hop).makespan()
            }
        };
        let pipe_end = if flushless {
            periods.iter().copied().fold(0.0, f64::max)
        } else {
            runs.iter().map(|r| r.makespan()).fold(0.0, f64::max)
        };
        // The DP reduction of every stage's gradients.
        let n = s.replicas();
        let mut side_end = 0.0f64;
        let mut after = 0.0f64;
        if n > 1 {
            for k in 0..p {
                let tensors = self.stage_tensors(s, k);
                let link = self.dp_link(s, k);
                if s.zero >= Zero::Gradients {
                    // A reduce-scatter per tensor after the pipeline.
                    let rs: f64 = tensors
                        .iter()
                        .map(|t| self.ring_chunks(t.len as f64, n, link))
                        .sum();
                    after = after.max(rs);
                    continue;
                }
                let shape = self.dp_shape(s);
                let bucket_elems = if self.auto_buckets {
                    (self.auto_bucket_bytes(s) / 4).max(1)
                } else {
                    self.bucket_elems
                };
                if self.by_priority(s) {
                    // The replica whose first forward is shortest waits first.
                    let first = passes
                        .iter()
                        .filter_map(|r| r.0[k].first())
                        .map(Pass::total)
                        .fold(f64::INFINITY, f64::min);
                    let first = if first.is_finite() { first } else { 0.0 };
                    let last = runs
                        .iter()
                        .filter_map(|r| r.last_backward[k])
                        .fold((0.0f64, 0.0f64), |m, lb| (m.0.max(lb.0), m.1.max(lb.1)));
                    let end =
                        self.priority_end(s, &tensors, shape, bucket_elems, first, last, pipe_end);
                    side_end = side_end.max(end);
                    continue;
                }
                let total: f64 = tensors.iter().map(|t| t.len as f64).sum();
                let mut ready = Vec::new();
                let mut seconds = Vec::new();
                let (mut size, mut done) = (0usize, 0.0f64);
                let mut mats: Vec<(f64, f64)> = Vec::new();
                let flush = |size: usize,
                             done: f64,
                             mats: &mut Vec<(f64, f64)>,
                             ready: &mut Vec<f64>,
                             seconds: &mut Vec<f64>| {
                    let frac = done / total.max(1.0);
                    // Under PipeDream-2BW a step's last backward on a stage is the last slot
                    // of the step that finishes it, whose end is the period's.
                    let at = runs
                        .iter()
                        .filter_map(|r| r.last_backward[k].map(|lb| (lb, r.end[k])))
                        .map(|((a, b), end)| {
                            let t = a + frac * (b - a);
                            if flushless {
                                pipe_end - (end - t)
                            } else {
                                t
                            }
                        })
                        .fold(0.0, f64::max);
                    ready.push(at);
                    seconds.push(
                        self.exchange
                            .cost(&self.cluster, size as f64, mats, shape)
                            .seconds,
                    );
                    mats.clear();
                };
                for t in &tensors {
                    if size >= bucket_elems {
                        flush(size, done, &mut mats, &mut ready, &mut seconds);
                        size = 0;
                    }
                    size += t.len;
                    done += t.len as f64;
                    if let Some((r, c)) = t.matrix {
                        mats.push((r as f64, c as f64));
                    }
                }
                if size > 0 {
                    flush(size, done, &mut mats, &mut ready, &mut seconds);
                }
                side_end = side_end.max(timeline::buckets(&ready, &seconds));
            }
        }
        // The stage that ends last, and its replica, give the parts.
        let (crit, stage) = runs
            .iter()
            .enumerate()
            .flat_map(|(d, r)| r.end.iter().enumerate().map(move |(k, &e)| (d, k, e)))
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .map_or((0, 0), |(d, k, _)| (d, k));
        let work = runs[crit].work[stage];
        let idle = idle(crit);
        let mut out = Breakdown {
            compute: work.compute,
            tp_comm: work.tp_comm,
            elementwise: work.elementwise,
            dp_reduce: work.gathers + (side_end - pipe_end).max(0.0) + after,
            pp_comm: (pipe_end - idle).max(0.0),
            bubble: (idle - work.total()).max(0.0),
            ..Breakdown::default()
        };
        // On shared cores the ranks of idle stages lend their cores to the busy ones: with
        // `m` micro-batches a stage is busy `m / (m + pp − 1)` of the time; the machine passes
        // on the share `lending` of that speed-up (a waiting thread that spins keeps its core).
        let c = &self.cluster;
        let devices = c.devices() as f64;
        if s.pp > 1 && c.oversubscribed() {
            let m = replicas[crit].len() as f64;
            let busy = if flushless {
                1.0
            } else {
                m / (m + p as f64 - 1.0)
            };
            let full = (1.0 / busy).min(devices / c.shared_cores).max(1.0);
            let speedup = 1.0 + c.lending.clamp(0.0, 1.0) * (full - 1.0);
            out.compute /= speedup;
            out.tp_comm /= speedup;
            out.elementwise /= speedup;
            out.bubble /= speedup;
        }
        out
    }

    /// Whether `s`'s DP reduction runs by priority: the schedule asks for it and `s` is what
    /// it runs under (pure DP without ZeRO; the configuration refuses the rest).
    pub fn by_priority(&self, s: &Strategy) -> bool {
        self.priority && s.tp * s.pp * s.cp == 1 && s.zero == Zero::Off && s.replicas() > 1
    }

    /// When a step ends under `--comm-schedule priority`, as the runtime runs it: the values
    /// are cut into pieces of `piece` in the order the forward reads them (`tensors` is the
    /// order their gradients become final, so reversed); the pieces holding the first
    /// [`CostModel::priority_defer`] of the values wait for the next step, where a thread of
    /// their own sums them in order from the step's start and updates every parameter in the
    /// forward's order once its values are summed; the step's first forward (`first_forward`
    /// seconds, reading the parameters in proportion to their values after the embedding's
    /// lookup) waits for each one it reaches before it is published. The other pieces are
    /// summed during the step's last backward (`last_backward`: its start and end), last
    /// first, each once the backward has finished it, after the thread. The step ends when
    /// the compute (`compute_end`, plus what it waited) and both sums are done.
    #[allow(clippy::too_many_arguments)] // the step's parts, as `strategy` has them
    fn priority_end(
        &self,
        s: &Strategy,
        tensors: &[Tensor],
        shape: GroupShape,
        piece: usize,
        first_forward: f64,
        last_backward: (f64, f64),
        compute_end: f64,
    ) -> f64 {
        let piece = piece.max(1) as f64;
        let forward: Vec<&Tensor> = tensors.iter().rev().collect();
        let total: f64 = forward.iter().map(|t| t.len as f64).sum();
        if total <= 0.0 {
            return compute_end;
        }
        let pieces = (total / piece).ceil() as usize;
        let size = |j: usize| (total - j as f64 * piece).min(piece);
        let keep = (self.priority_defer.clamp(0.0, 1.0) * total).ceil();
        let deferred = ((keep / piece).ceil() as usize).min(pieces);
        let seconds = |elems: f64| self.exchange.cost(&self.cluster, elems, &[], shape).seconds;
        let update_per_elem = self.optimizer(s) / total;
        // The compute the forward has done when it first reads a parameter.
        let read = forward
            .iter()
            .skip(1)
            .map(|t| t.len as f64)
            .sum::<f64>()
            .max(1.0);
        let (mut thread, mut summed, mut done, mut before, mut waited) =
            (0.0f64, 0usize, 0.0f64, 0.0f64, 0.0f64);
        for (k, t) in forward.iter().enumerate() {
            done += t.len as f64;
            // Every piece up to the one holding this parameter's last value.
            let last = ((done / piece).ceil() as usize).clamp(1, pieces) - 1;
            while summed <= last {
                if summed < deferred {
                    thread += seconds(size(summed));
                }
                summed += 1;
            }
            thread += update_per_elem * t.len as f64;
            let need = if k == 0 {
                0.0
            } else {
                first_forward * before / read
            };
            waited = waited.max(thread - need);
            if k > 0 {
                before += t.len as f64;
            }
        }
        let waited = waited.max(0.0);
        // The backward's pieces, last first: piece j is final once the backward has produced
        // every value from its first on (in the forward's order, the backward goes back).
        let (a, b) = last_backward;
        let (ready, secs): (Vec<f64>, Vec<f64>) = (deferred..pieces)
            .rev()
            .map(|j| {
                let frac = (total - j as f64 * piece) / total;
                let at = a + frac * (b - a) + waited;
                (at.max(thread), seconds(size(j)))
            })
            .unzip();
        let backward_end = timeline::buckets(&ready, &secs);
        (compute_end + waited).max(thread).max(backward_end)
    }

    /// What a step adds once, whatever its strategies, on the optimizer's `inst` over `world`
    /// devices: the loss's collectives over PP and DP, the gradient norm's over TP, PP and DP,
    /// the metrics' over the world (three), and under ZeRO-1/2 the all-gather of each updated
    /// piece over DP.
    pub fn step_sync(&self, inst: &Strategy, world: usize) -> f64 {
        let scalar = |ranks: Vec<usize>| -> f64 {
            let n = ranks.len();
            if n <= 1 {
                return 0.0;
            }
            self.group_link(&ranks)
                .seconds(2.0 * 4.0, 2.0 * (n - 1) as f64)
        };
        let g = |axis| inst.group(0, axis);
        let all: Vec<usize> = (0..world).collect();
        let world_gather = if world > 1 {
            self.group_link(&all)
                .seconds((world - 1) as f64 * 8.0, (world - 1) as f64)
        } else {
            0.0
        };
        let mut t = 2.0 * scalar(g(graph::MeshAxis::Pp))
            + 2.0 * scalar(g(graph::MeshAxis::Dp))
            + scalar(g(graph::MeshAxis::Tp))
            + 3.0 * world_gather;
        let n = inst.replicas();
        if n > 1 && inst.zero > Zero::Off && inst.zero < Zero::Parameters {
            t += (0..inst.pp.max(1))
                .map(|k| {
                    let link = self.dp_link(inst, k);
                    self.stage_tensors(inst, k)
                        .iter()
                        .map(|x| self.ring_chunks(x.len as f64, n, link))
                        .sum::<f64>()
                })
                .fold(0.0, f64::max);
        }
        t
    }
}

/// One parameter tensor of a stage on one TP rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tensor {
    /// Elements.
    pub len: usize,
    /// `(rows, cols)` where it is a matrix.
    pub matrix: Option<(usize, usize)>,
}
