//! The analytic cost model: compute (FLOPs, including attention's quadratic term, over a
//! calibrated efficiency), TP/SP collectives and pipeline transfers (α–β over the link each group
//! uses), pipeline bubbles of 1F1B, the DP gradient reduction, and the memory of model states and
//! activations, which bounds the tokens of a micro-batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use data::Packing;
use graph::{Strategy, Zero};
use model::LlamaConfig;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::exchange::{Exchange, ExchangeCost, GroupShape};

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
    /// Kernel calls of a micro-batch by `(tp, sp, recompute)`, counted once.
    kernels: Arc<Mutex<HashMap<KernelKey, f64>>>,
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
            kernels: Default::default(),
        };
        // Training FLOPs of a sequence: 6·l·(GEMM parameters) + 6·l²·(attention width)·layers.
        let c = &out.cfg;
        let gemm = c.num_hidden_layers as f64 * out.layer_matmul_params()
            + (c.vocab_size * c.hidden_size) as f64;
        let attention = (c.num_attention_heads * c.head_dim() * c.num_hidden_layers) as f64;
        out.packing = Packing::Balanced {
            budget: usize::MAX,
            quadratic: attention / gemm,
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

    /// Seconds of the optimizer update on `inst`'s pieces (0 where the cluster leaves it out).
    pub fn optimizer(&self, inst: &Strategy) -> f64 {
        let c = &self.cluster;
        let per = self.params() / (inst.tp * inst.pp) as f64;
        let per = if inst.zero >= Zero::Optimizer {
            per / inst.dp as f64
        } else {
            per
        };
        if c.optimizer_gparams > 0.0 {
            per / (c.optimizer_gparams * 1e9)
        } else if c.memory_gbps > 0.0 {
            per * OPTIMIZER_ELEMENTS * 4.0 / (c.memory_gbps * 1e9)
        } else {
            0.0
        }
    }

    /// Parameters of the decoder layers' matrices (per layer).
    pub fn layer_matmul_params(&self) -> f64 {
        let c = &self.cfg;
        let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
        let q = (c.num_attention_heads * c.head_dim()) as f64;
        let kv = (c.kv_heads() * c.head_dim()) as f64;
        h * q * 2.0 + h * kv * 2.0 + 3.0 * h * i
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

    /// Model-state bytes per device while `s` runs and `inst` holds the master weights
    /// ([`state_bytes_per_param`] with the cluster's element size).
    pub fn state_bytes(&self, s: &Strategy, inst: &Strategy) -> f64 {
        self.params() * state_bytes_per_param(self.cluster.elem_bytes, s, inst)
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
        let width = c.num_attention_heads * c.head_dim() / s.tp;
        let attention: f64 = layers
            * lens
                .iter()
                .map(|&l| self.cluster.attention_seconds(l, width))
                .sum::<f64>()
            / cp;
        let (layer_linear, head) = self.linear_parts(s, (tokens / cp).ceil() as usize);
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

    /// One DP replica of `s` running `seqs` (packed by the model's [`Packing`] into
    /// micro-batches of at most `cap` tokens) through its 1F1B pipeline.
    pub fn replica(&self, s: &Strategy, seqs: &[usize], cap: usize) -> Breakdown {
        let cap = cap.max(1);
        let all: Vec<usize> = (0..seqs.len()).collect();
        let bins: Vec<(usize, Vec<usize>)> = self
            .packing
            .micro_batches(seqs, &all, cap)
            .into_iter()
            .map(|mb| {
                let lens: Vec<usize> = mb.iter().map(|&k| seqs[k]).collect();
                (lens.iter().sum(), lens)
            })
            .collect();
        let pp = s.pp as f64;
        let mut out = Breakdown::default();
        let mut longest_stage = 0.0f64;
        let boundary = self.cluster.link(s.replicas() * s.tp + 1);
        for (tokens, lens) in &bins {
            let (compute, tp_comm, elementwise) = self.micro_batch(s, lens);
            out.compute += compute / pp;
            out.tp_comm += tp_comm / pp;
            out.elementwise += elementwise / pp;
            longest_stage = longest_stage.max((compute + tp_comm + elementwise) / pp);
            if s.pp > 1 {
                let bytes = *tokens as f64 * self.cfg.hidden_size as f64 * self.cluster.elem_bytes;
                out.pp_comm += 2.0 * boundary.seconds(bytes / (s.tp * s.cp) as f64, 1.0);
            }
        }
        if !bins.is_empty() {
            out.bubble = (pp - 1.0) * longest_stage;
            // On shared cores the ranks of idle stages lend their cores to the busy ones: with
            // `m` micro-batches a stage is busy `m / (m + pp − 1)` of the time.
            let c = &self.cluster;
            let n = c.devices() as f64;
            if s.pp > 1 && c.shared_cores > 0.0 && n > c.shared_cores {
                let m = bins.len() as f64;
                let busy = m / (m + pp - 1.0);
                let speedup = (1.0 / busy).min(n / c.shared_cores).max(1.0);
                out.compute /= speedup;
                out.tp_comm /= speedup;
                out.elementwise /= speedup;
                out.bubble /= speedup;
            }
        }
        out
    }

    /// `s` running `seqs` in micro-batches of at most `cap` tokens: sequences dealt to the DP
    /// replicas by the model's [`Packing`], the slowest replica, and the gradient reduction
    /// over DP.
    pub fn strategy(&self, s: &Strategy, seqs: &[usize], cap: usize) -> Breakdown {
        if seqs.is_empty() {
            return Breakdown::default();
        }
        let replicas: Vec<Vec<usize>> = self
            .packing
            .deal(seqs, s.dp)
            .into_iter()
            .map(|r| r.into_iter().map(|k| seqs[k]).collect())
            .collect();
        let mut out = replicas
            .iter()
            .map(|v| self.replica(s, v, cap))
            .max_by(|a, b| a.total().total_cmp(&b.total()))
            .unwrap_or_default();
        out.dp_reduce = self.dp_exchange(s).seconds;
        out
    }
}
