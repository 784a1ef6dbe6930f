//! The typed configuration of a training run: what the CLI's flags build, or a program by hand.

mod checks;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use data::Packing;
use graph::{Schedule, Strategy};
use kernels::{AdamW, GemmPrecision};
use model::{LlamaConfig, Weights};
use planner::exchange::Exchange;
use planner::{Cluster, Plan};

use crate::error::{Result, TrainError};

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Random from the run's seed (N(0, 0.02), norms 1).
    Random,
    /// A safetensors file with HF names, or a model folder (one `model.safetensors` or a sharded
    /// `model.safetensors.index.json`); f32, bf16 or f16.
    File(PathBuf),
    /// Weights already in memory.
    Weights(std::sync::Arc<Weights>),
}

/// The training data.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// A JSONL file (`input_ids` or `text` per line) or a directory of text files.
    Path(PathBuf),
    /// Text files, one document each, in this order.
    Files(Vec<PathBuf>),
    /// Text files split at blank lines, every paragraph a document.
    Paragraphs(Vec<PathBuf>),
    /// Token sequences in memory (each document is cut to `max_len` like a file's).
    Sequences(Vec<Vec<u32>>),
}

/// How text becomes token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Tokenizer {
    /// One token per UTF-8 byte (vocabulary 256).
    Bytes,
    /// A Hugging Face `tokenizer.json`, or a folder holding one (special tokens added as HF's
    /// `tokenizer(text)` adds them).
    File(PathBuf),
}

/// Where the ranks compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend, the cores divided between the ranks of a process.
    Cpu,
    /// The CUDA backend (rank r on GPU r mod the GPU count), GEMMs in this precision.
    Cuda(GemmPrecision),
}

/// Which parallel strategies a step runs.
#[derive(Debug, Clone, PartialEq)]
pub enum StrategySpec {
    /// One strategy for every sequence.
    Fixed(Strategy),
    /// Hot switching: each sequence trains under the strategy of the first bucket whose length
    /// bound holds it; the plan's instantiation strategy holds the weights and the optimizer.
    Hot(Plan),
    /// The planner chooses every step's buckets and strategies by the cost model of a
    /// (calibrated) cluster; the instantiation strategy is chosen on the run's first batch.
    Auto(Box<AutoPlanning>),
}

/// How a strategy's sequences are dealt to its DP replicas and packed into micro-batches
/// (`--packing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackingPolicy {
    /// In batch order, round-robin over the replicas, each replica's filled in order.
    InOrder,
    /// Longest first to the replica with the least work (`len + q·len²`: attention's share
    /// by the model's FLOPs), then first-fit decreasing into micro-batches.
    #[default]
    Balanced,
}

impl std::str::FromStr for PackingPolicy {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "in-order" => Ok(Self::InOrder),
            "balanced" => Ok(Self::Balanced),
            other => Err(TrainError::setting(
                "packing",
                format!("`{other}`: give in-order or balanced"),
            )),
        }
    }
}

/// The size of the buckets the DP gradient all-reduce sums, each on its own while the last
/// backward runs (`--bucket-mb`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Buckets {
    /// This many bytes of `f32` gradients (4 MiB unless asked).
    Bytes(usize),
    /// Per strategy, by the α–β model of its DP group's links
    /// ([`planner::CostModel::auto_bucket_bytes`]) on the simulated or planning cluster, else
    /// nominal links of this machine.
    Auto,
}

impl std::str::FromStr for Buckets {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<f64>() {
            Ok(mb) if mb.is_finite() && mb * 1048576.0 >= 1024.0 => {
                Ok(Self::Bytes((mb * 1048576.0) as usize))
            }
            _ => Err(TrainError::setting(
                "bucket_mb",
                format!("`{s}`: give auto or a size in MiB of at least 1 KiB (e.g. 4 or 0.25)"),
            )),
        }
    }
}

/// What automatic planning plans with.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPlanning {
    /// The cluster the cost model describes (this machine's calibration, or a preset).
    pub cluster: Cluster,
    /// Whether the search also covers context parallelism (CP 2–8, ring or Ulysses) and
    /// activation recomputation per bucket ([`planner::Planner::context`]); otherwise it is
    /// HotSPa's DP × TP × PP space.
    pub context: bool,
    /// Whether a step may also run as up to [`planner::MAX_GROUPS`] concurrent groups of
    /// devices, each on a range of lengths ([`planner::Planner::auto_or_groups`]), where the
    /// cost model says that is faster than the time-multiplexed plan.
    pub concurrent: bool,
}

impl AutoPlanning {
    /// Planning over `cluster`'s DP × TP × PP strategies.
    pub fn new(cluster: Cluster) -> Self {
        Self {
            cluster,
            context: false,
            concurrent: false,
        }
    }
}

/// The learning rate over the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The rate after warm-up.
    pub peak: f64,
    /// Steps of linear warm-up from `peak / warmup` to `peak`.
    pub warmup: usize,
    /// What follows the warm-up.
    pub decay: Decay,
}

/// The learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    /// `peak` to the end.
    Constant,
    /// Cosine from `peak` to `min_lr` over the steps after warm-up.
    Cosine {
        /// The final rate.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The rate of `step` (0-based) of a run of `steps`.
    pub fn at(&self, step: usize, steps: usize) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Cosine { min_lr } => {
                let span = steps.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup.min(step)) as f64 / span).min(1.0);
                min_lr
                    + 0.5 * (self.peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Checkpoints during the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpointing {
    /// The directory of step folders and `latest`, owned by the run while it lives.
    pub dir: PathBuf,
    /// Every this many steps (and at the end); `None`: at the end only.
    pub every: Option<usize>,
    /// Step folders kept (the oldest beyond them are removed).
    pub keep_last: usize,
}

/// Held-out evaluation during a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluating {
    /// The held-out data (read like the training data).
    pub data: DataSource,
    /// Every this many steps (and after the last); `None`: after the last only.
    pub every: Option<usize>,
}

/// The largest learning rate a run takes.
pub const MAX_LR: f64 = 1.0;

/// Step folders a run keeps unless told otherwise.
pub const KEEP_LAST: usize = 3;

/// Everything a training run needs. [`TrainConfig::new`] gives the CLI's defaults.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The model.
    pub model: LlamaConfig,
    /// Where the model's config was read (recorded in checkpoints).
    pub model_path: Option<PathBuf>,
    /// The initial weights.
    pub init: Init,
    /// The training data.
    pub data: DataSource,
    /// How `text` records and text files are tokenized.
    pub tokenizer: Tokenizer,
    /// Append the end-of-sequence id (the model config's `eos_token_id`, else the tokenizer's
    /// `eos_token`) after every text document.
    pub append_eos: bool,
    /// Documents longer than this are cut into pieces (default: `max_position_embeddings`).
    pub max_len: Option<usize>,
    /// Thread ranks in this process; under `mpirun` the MPI world size (0: whatever MPI says,
    /// or 1 without MPI).
    pub devices: usize,
    /// Where the ranks compute.
    pub device: Device,
    /// Devices per node, for the switch planner (under `mpirun`, MPI's placement).
    pub devices_per_node: Option<usize>,
    /// The strategies.
    pub strategy: StrategySpec,
    /// Token budget of a micro-batch: one value, or one per bucket of a hot schedule.
    pub micro_batch_tokens: Vec<usize>,
    /// The pipeline schedule.
    pub pipeline_schedule: Schedule,
    /// How each strategy deals its sequences to its DP replicas and packs micro-batches.
    pub packing: PackingPolicy,
    /// The size of the DP gradient all-reduce's buckets.
    pub buckets: Buckets,
    /// When the DP gradients are summed: in buckets during the backward (`fifo`), or in
    /// pieces during the next step, the first layers first (`priority`).
    pub comm_schedule: runtime::CommSchedule,
    /// Sequences per global batch.
    pub global_batch: usize,
    /// Optimizer steps of the whole run (a resumed run continues to this count).
    pub steps: usize,
    /// The learning rate.
    pub lr: LrSchedule,
    /// AdamW's β1, β2, ε and weight decay (its `lr` is replaced by the schedule's).
    pub adamw: AdamW,
    /// AdamW, or 1-bit Adam over the DP replicas.
    pub optimizer: crate::settings::OptimizerKind,
    /// Clip the global gradient norm to this (`f64::INFINITY`: no clipping).
    pub grad_clip: f64,
    /// Seed of the initialisation and of the shuffle.
    pub seed: u64,
    /// Shuffle the data reproducibly from the seed (else file order).
    pub shuffle: bool,
    /// Write the final weights here: an HF model folder (`config.json`, weights sharded above
    /// 5 GiB, `generation_config.json`, the tokenizer's files), or, for a path ending in
    /// `.safetensors`, that one file.
    pub save: Option<PathBuf>,
    /// The dtype of the saved weights (`None`: the initial weights' dtype, f32 for random ones).
    pub save_dtype: Option<model::Dtype>,
    /// Write one JSON object per step here.
    pub metrics: Option<PathBuf>,
    /// Checkpoints.
    pub checkpoint: Option<Checkpointing>,
    /// Held-out loss and perplexity during the run.
    pub eval: Option<Evaluating>,
    /// Continue from this checkpoint directory (its `latest`, or a step folder).
    pub resume: Option<PathBuf>,
    /// Also time the run as on this cluster (the simulator's clock); the training is unchanged.
    pub simulate: Option<Cluster>,
    /// How DP replicas exchange gradients: exact by the ring (the default), another all-reduce
    /// algorithm, or a codec with error feedback.
    pub exchange: Exchange,
    /// How the DP replicas stay in step: the gradient exchange every step (BSP), or periodic
    /// averaging of the weights (local SGD, DiLoCo).
    pub sync: crate::settings::SyncMode,
    /// Parameter servers (`None`: the replicas exchange gradients by all-reduce). The world is
    /// then `devices` workers followed by the servers.
    pub ps: Option<crate::settings::ParamServers>,
    /// Ranks whose compute is slowed, as stragglers.
    pub slow_ranks: Vec<crate::settings::SlowRank>,
    /// Federated training's clients, rounds and sub-models (under `sync` fedavg; otherwise
    /// they must stay at their defaults).
    pub fed: crate::settings::Federated,
    /// Go ahead where a safety check would refuse: start fresh in a checkpoint directory that
    /// holds another run's steps (deleting them), resume under settings that change the data
    /// order.
    pub force: bool,
    /// Set (e.g. by a signal handler) to stop after the current step: every rank agrees on the
    /// step, a checkpoint and the final weights are written as configured, and the outcome says
    /// the run stopped early.
    pub stop: Option<Arc<AtomicBool>>,
}

impl TrainConfig {
    /// A run of `model` on `data` with the CLI's defaults: one device, `dp1`, 10 steps of 8
    /// sequences, micro-batches of 4096 tokens, 1F1B, AdamW (lr 3e-4 constant, β 0.9/0.95,
    /// ε 1e-8, decay 0.1), clipping at 1, seed 0, shuffled, random initial weights.
    pub fn new(model: LlamaConfig, data: DataSource) -> Self {
        Self {
            model,
            model_path: None,
            init: Init::Random,
            data,
            tokenizer: Tokenizer::Bytes,
            append_eos: false,
            max_len: None,
            devices: 1,
            device: Device::Cpu,
            devices_per_node: None,
            strategy: StrategySpec::Fixed(Strategy::single()),
            micro_batch_tokens: vec![4096],
            pipeline_schedule: Schedule::OneFOneB,
            packing: PackingPolicy::Balanced,
            buckets: Buckets::Bytes(4 << 20),
            comm_schedule: runtime::CommSchedule::Fifo,
            global_batch: 8,
            steps: 10,
            lr: LrSchedule {
                peak: 3e-4,
                warmup: 0,
                decay: Decay::Constant,
            },
            adamw: AdamW {
                lr: 3e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                freeze_variance_after: None,
            },
            optimizer: crate::settings::OptimizerKind::AdamW,
            grad_clip: 1.0,
            seed: 0,
            shuffle: true,
            save: None,
            save_dtype: None,
            metrics: None,
            checkpoint: None,
            eval: None,
            resume: None,
            simulate: None,
            exchange: Exchange::default(),
            sync: crate::settings::SyncMode::Bsp,
            ps: None,
            slow_ranks: Vec::new(),
            fed: crate::settings::Federated::default(),
            force: false,
            stop: None,
        }
    }

    /// The longest piece a document is cut into.
    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(self.model.max_position_embeddings)
    }

    /// The shuffle seed the dataset takes.
    pub fn shuffle_seed(&self) -> Option<u64> {
        self.shuffle.then_some(self.seed)
    }

    /// How bucket `i`'s strategy packs ([`TrainConfig::packing`] at that bucket's budget):
    /// the runtime packs and the cost model estimates with this one policy.
    pub fn packing_of(&self, i: usize) -> Packing {
        self.packing_at(self.budget(i))
    }

    /// The run's packing policy at micro-batches of at most `budget` tokens: in batch order
    /// round-robin, or balanced by each sequence's work (`len + q·len²`, `q` the model's
    /// attention FLOPs per squared token over its GEMM FLOPs per token).
    pub fn packing_at(&self, budget: usize) -> Packing {
        match self.packing {
            PackingPolicy::InOrder => Packing::InOrder { budget },
            PackingPolicy::Balanced => Packing::Balanced {
                budget,
                quadratic: planner::quadratic_work(&self.model),
            },
        }
    }

    /// The threshold of the global gradient norm's clipping: `grad_clip`, or none under DGC and
    /// under 1-bit Adam with DP replicas, whose members clip their own gradients to
    /// `grad_clip / √N` instead (Lin et al. 2018, §3.2: local gradient clipping replaces the
    /// global one; 1-bit Adam's momentum is formed from the member's own gradient).
    pub fn global_clip(&self) -> f64 {
        let onebit_dp = matches!(
            (self.optimizer, &self.strategy),
            (crate::settings::OptimizerKind::OneBitAdam { .. }, StrategySpec::Fixed(s)) if s.dp > 1
        );
        if self.exchange.codec.is_dgc() || onebit_dp {
            f64::INFINITY
        } else {
            self.grad_clip
        }
    }

    /// AdamW's settings for the run's optimizer: 1-bit Adam freezes the variance after its
    /// warm-up.
    pub fn adamw(&self) -> AdamW {
        AdamW {
            freeze_variance_after: match self.optimizer {
                crate::settings::OptimizerKind::AdamW => None,
                crate::settings::OptimizerKind::OneBitAdam { warmup } => Some(warmup),
            },
            ..self.adamw
        }
    }

    /// The budget of bucket `i`'s micro-batches.
    pub fn budget(&self, i: usize) -> usize {
        match self.micro_batch_tokens.as_slice() {
            [one] => *one,
            many => many.get(i).copied().unwrap_or(usize::MAX),
        }
    }

    /// Checks what can be checked without reading any file: every number finite and in its
    /// range (the range in the message), the strategies against the device count and the
    /// model, the budgets against the buckets, the simulated cluster.
    pub fn check(&self) -> Result<()> {
        fn at_least(setting: &'static str, v: usize, min: usize) -> Result<()> {
            if v < min {
                return Err(TrainError::setting(
                    setting,
                    format!("{v} is out of range: must be at least {min}"),
                ));
            }
            Ok(())
        }
        fn real(setting: &'static str, v: f64, ok: bool, range: &str) -> Result<()> {
            if !ok || v.is_nan() {
                return Err(TrainError::setting(
                    setting,
                    format!("{v} is out of range: must be {range}"),
                ));
            }
            Ok(())
        }
        checks::check_exchange(self)?;
        checks::check_sync(self)?;
        checks::check_optimizer(self)?;
        checks::check_ps(self)?;
        checks::check_comm_schedule(self)?;
        checks::check_pipeline_schedule(self)?;
        if self.sync == crate::settings::SyncMode::FedAvg {
            if self.ps.is_some() {
                return Err(TrainError::setting(
                    "ps_servers",
                    "fedavg averages the clients by all-reduce; drop --ps-servers",
                ));
            }
            self.fed.check(self)?;
        } else if self.fed != crate::settings::Federated::default() {
            return Err(TrainError::setting(
                "fed_clients",
                format!(
                    "the federated settings (--fed-…) apply to --sync fedavg only; --sync is {}",
                    self.sync
                ),
            ));
        }
        for (i, s) in self.slow_ranks.iter().enumerate() {
            if self.slow_ranks[..i].iter().any(|o| o.rank == s.rank) {
                return Err(TrainError::setting(
                    "slow_rank",
                    format!("rank {} is given twice; give each slow rank once", s.rank),
                ));
            }
            if s.rank >= self.devices {
                return Err(TrainError::setting(
                    "slow_rank",
                    format!(
                        "rank {} is not a worker of {} devices",
                        s.rank, self.devices
                    ),
                ));
            }
        }
        if let Some(d) = self.devices_per_node {
            at_least("devices_per_node", d, 1)?;
            if !self.devices.is_multiple_of(d) && self.devices > 1 {
                return Err(TrainError::setting(
                    "devices_per_node",
                    format!(
                        "{d} does not divide the {} devices: every node holds as many",
                        self.devices
                    ),
                ));
            }
        }
        at_least("global_batch", self.global_batch, 1)?;
        at_least("steps", self.steps, 1)?;
        at_least("devices", self.devices, 1)?;
        if let Some(m) = self.max_len {
            at_least("max_len", m, 2)?;
        }
        if self.micro_batch_tokens.is_empty() {
            return Err(TrainError::setting(
                "micro_batch_tokens",
                "give at least one budget",
            ));
        }
        for &b in &self.micro_batch_tokens {
            at_least("micro_batch_tokens", b, 1)?;
        }
        let lr = self.lr.peak;
        real("lr", lr, lr.is_finite() && lr > 0.0, "positive and finite")?;
        // AdamW moves a weight by lr·m̂/(√v̂ + ε) a step: about lr where ε is small against the
        // gradients, about (lr/ε)·g where it is large (AdamW as SGD). Past 1 by both, no model
        // survives its first steps.
        let eps = self.adamw.eps;
        if lr > MAX_LR && lr / eps > MAX_LR {
            return Err(TrainError::setting(
                "lr",
                format!(
                    "{lr} is out of range: AdamW moves every weight by about lr per step (or by \
                     (lr/eps)·gradient when --eps is large), and with --eps {eps} both exceed \
                     {MAX_LR}; no model survives that"
                ),
            ));
        }
        if self.lr.warmup > self.steps {
            return Err(TrainError::setting(
                "warmup",
                format!(
                    "{} steps of warm-up in a run of {}: the run would end before the rate \
                     reaches --lr; shorten the warm-up or add steps",
                    self.lr.warmup, self.steps
                ),
            ));
        }
        if let Decay::Cosine { min_lr } = self.lr.decay {
            real(
                "min_lr",
                min_lr,
                min_lr.is_finite() && (0.0..=lr).contains(&min_lr),
                &format!("between 0 and the peak learning rate {lr}"),
            )?;
        }
        let a = &self.adamw;
        real("beta1", a.beta1, (0.0..1.0).contains(&a.beta1), "in [0, 1)")?;
        real("beta2", a.beta2, (0.0..1.0).contains(&a.beta2), "in [0, 1)")?;
        real(
            "eps",
            a.eps,
            a.eps.is_finite() && a.eps > 0.0,
            "positive and finite",
        )?;
        real(
            "weight_decay",
            a.weight_decay,
            a.weight_decay.is_finite() && a.weight_decay >= 0.0,
            "at least 0 and finite",
        )?;
        if a.weight_decay * lr >= 1.0 {
            return Err(TrainError::setting(
                "weight_decay",
                format!(
                    "{} × --lr {lr} = {} ≥ 1: decoupled weight decay multiplies every matrix by \
                     1 − lr·weight_decay each step, which zeroes or flips it; lower one of them",
                    a.weight_decay,
                    a.weight_decay * lr
                ),
            ));
        }
        real(
            "grad_clip",
            self.grad_clip,
            self.grad_clip > 0.0,
            "positive (inf: no clipping)",
        )?;
        if let Some(e) = self.eval.as_ref().and_then(|e| e.every) {
            at_least("eval_every", e, 1)?;
        }
        if let Some(c) = &self.checkpoint {
            if let Some(e) = c.every {
                at_least("checkpoint_every", e, 1)?;
            }
            at_least("keep_last", c.keep_last, 1)?;
        }
        let layers = self.model.num_hidden_layers;
        match &self.strategy {
            StrategySpec::Fixed(s) => {
                self.check_strategy(s)?;
                s.stage_layers(layers)?;
                if self.micro_batch_tokens.len() != 1 {
                    return Err(TrainError::setting(
                        "micro_batch_tokens",
                        "takes one value without a hot-switching schedule",
                    ));
                }
            }
            StrategySpec::Hot(plan) => {
                for (s, offset) in plan.members() {
                    if plan.is_concurrent() && s != plan.inst {
                        // A concurrent group's strategy runs on the group's devices.
                        if offset + s.devices() > self.devices {
                            return Err(TrainError::setting(
                                "strategies",
                                format!(
                                    "{s} on devices {offset}.. needs {} devices, the run has {}",
                                    offset + s.devices(),
                                    self.devices
                                ),
                            ));
                        }
                        self.check_strategy_on(&s, s.devices())?;
                    } else {
                        self.check_strategy(&s)?;
                    }
                    s.stage_layers(layers)?;
                }
                let n = plan.buckets.len();
                if !(self.micro_batch_tokens.len() == 1 || self.micro_batch_tokens.len() == n) {
                    return Err(TrainError::setting(
                        "micro_batch_tokens",
                        format!(
                            "{} values for {n} strategies (give one, or one per strategy)",
                            self.micro_batch_tokens.len()
                        ),
                    ));
                }
            }
            StrategySpec::Auto(auto) => {
                let cluster = &auto.cluster;
                if auto.context {
                    // The strategies are chosen step by step, so what CP does not do yet is
                    // refused for the whole run.
                    if let Device::Cuda(_) = self.device {
                        return Err(TrainError::setting(
                            "plan_context",
                            "automatic planning with context parallelism in its search: CP's \
                             attention exchange runs on the host (CPU kernels); it is not built \
                             for --device cuda yet; drop --plan-context",
                        ));
                    }
                }
                cluster
                    .validate()
                    .map_err(|e| TrainError::setting("profile", e.to_string()))?;
                if cluster.devices() != self.devices {
                    return Err(TrainError::setting(
                        "profile",
                        format!(
                            "the calibration is for {} devices, the run has {} (run `hotspa profile --devices {}`)",
                            cluster.devices(),
                            self.devices,
                            self.devices
                        ),
                    ));
                }
                if self.micro_batch_tokens.len() != 1 {
                    return Err(TrainError::setting(
                        "micro_batch_tokens",
                        "takes one value with automatic planning",
                    ));
                }
            }
        }
        if let Some(c) = &self.simulate {
            c.validate()
                .map_err(|e| TrainError::setting("sim_cluster", e.to_string()))?;
            if c.devices() < self.devices {
                return Err(TrainError::setting(
                    "sim_cluster",
                    format!(
                        "{} has {} devices, fewer than the run's {}",
                        c.name,
                        c.devices(),
                        self.devices
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The run's settings as recorded in checkpoints, with the training data's fingerprint
    /// ([`data::Dataset::fingerprint`]: what a resumed run's data must still be).
    pub fn record(&self, inst: &Strategy, data_sha256: &str) -> serde_json::Value {
        let (lr_schedule, min_lr) = match self.lr.decay {
            Decay::Constant => ("constant", 0.0),
            Decay::Cosine { min_lr } => ("cosine", min_lr),
        };
        let data = match &self.data {
            DataSource::Path(p) => serde_json::json!(p),
            DataSource::Files(f) => serde_json::json!(format!("{} files", f.len())),
            DataSource::Paragraphs(f) => {
                serde_json::json!(format!("paragraphs of {} files", f.len()))
            }
            DataSource::Sequences(s) => serde_json::json!(format!("{} sequences", s.len())),
        };
        let init = match &self.init {
            Init::Random => serde_json::Value::Null,
            Init::File(p) => serde_json::json!(p),
            Init::Weights(_) => serde_json::json!("(in memory)"),
        };
        serde_json::json!({
            "strategy": inst.to_string(), "devices": self.devices,
            "global_batch": self.global_batch, "steps": self.steps,
            "micro_batch_tokens": self.micro_batch_tokens, "max_len": self.max_len,
            "lr": self.lr.peak, "lr_schedule": lr_schedule, "warmup": self.lr.warmup,
            "min_lr": min_lr, "beta1": self.adamw.beta1, "beta2": self.adamw.beta2,
            "eps": self.adamw.eps, "weight_decay": self.adamw.weight_decay,
            "grad_clip": self.grad_clip, "seed": self.seed,
            "shuffle": if self.shuffle { "on" } else { "off" },
            "data": data, "data_sha256": data_sha256, "model": self.model_path, "init": init,
            "tokenizer": match &self.tokenizer {
                Tokenizer::Bytes => serde_json::json!("bytes"),
                Tokenizer::File(p) => serde_json::json!(p),
            },
            "append_eos": self.append_eos,
            "grad_compression": self.exchange.codec.to_string(),
            "error_feedback": self.exchange.error_feedback,
            "compress_cross_node_only": self.exchange.cross_node_only,
            "allreduce": self.exchange.algorithm.to_string(),
            "sync": self.sync.to_string(),
            "ps_servers": self.ps.map(|p| p.servers),
            "fed": (self.sync == crate::settings::SyncMode::FedAvg).then(|| format!("{:?}", self.fed)),
        })
    }
}

impl TrainConfig {
    /// Every rank of the run: the devices, and the parameter servers after them.
    pub fn world_size(&self) -> usize {
        self.devices + self.ps.map_or(0, |p| p.servers)
    }
}

impl TrainConfig {
    /// A strategy of this run: its device count, and what context parallelism does not do yet.
    fn check_strategy(&self, s: &Strategy) -> Result<()> {
        self.check_strategy_on(s, self.devices)
    }

    /// [`Self::check_strategy`] for a strategy that runs on `devices` of the run's devices.
    fn check_strategy_on(&self, s: &Strategy, devices: usize) -> Result<()> {
        if s.devices() != devices {
            return Err(TrainError::setting(
                "strategy",
                format!("{s} runs on {} devices, the run has {devices}", s.devices()),
            ));
        }
        if s.cp > 1 {
            if let Device::Cuda(_) = self.device {
                return Err(TrainError::setting(
                    "strategy",
                    format!(
                        "{s}: context parallelism's attention exchange runs on the host (CPU \
                         kernels); it is not built for --device cuda yet"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dgc_clips_locally_instead_of_globally() {
        let model = model::LlamaConfig::from_json(
            r#"{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let mut cfg = TrainConfig::new(model, DataSource::Sequences(vec![vec![1, 2, 3]]));
        cfg.grad_clip = 0.5;
        assert_eq!(cfg.global_clip(), 0.5);
        cfg.exchange.codec = "dgc:0.01".parse().unwrap();
        assert_eq!(cfg.global_clip(), f64::INFINITY);
    }

    #[test]
    fn warm_up_then_cosine_to_the_floor() {
        let s = LrSchedule {
            peak: 1.0,
            warmup: 4,
            decay: Decay::Cosine { min_lr: 0.1 },
        };
        assert_eq!(s.at(0, 14), 0.25);
        assert_eq!(s.at(3, 14), 1.0);
        assert_eq!(s.at(4, 14), 1.0);
        assert!((s.at(9, 14) - 0.55).abs() < 1e-12);
        assert!((s.at(14, 14) - 0.1).abs() < 1e-12);
        let c = LrSchedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(c.at(13, 14), 1.0);
    }
}
