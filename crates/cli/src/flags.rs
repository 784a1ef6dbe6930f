//! The flags of a training run, shared by `hotspa train`, `hotspa plan` and `bench step`, and
//! their translation into the library's [`TrainConfig`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use graph::{Schedule, Strategy};
use kernels::GemmPrecision;
use model::LlamaConfig;
use train::{
    Checkpointing, DataSource, Decay, Device, Init, LrSchedule, StrategySpec, Tokenizer,
    TrainConfig,
};

#[derive(ClapArgs, Clone)]
pub struct TrainFlags {
    /// An HF `config.json`, or a model folder (its `config.json`; its weights and tokenizer are
    /// used unless --init and --tokenizer say otherwise).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Initial weights: a safetensors file or model folder (HF names; f32, bf16 or f16; one
    /// file or sharded), or `random` (from --seed). Default: the --model folder's weights if it
    /// has any, else random.
    #[arg(long)]
    pub init: Option<String>,
    /// Training data: a JSONL file (`input_ids` or `text` per line) or a directory of text files.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// An HF tokenizer.json (or a folder holding one) for `text` records, text files and
    /// Parquet text, special tokens added as HF's tokenizer(text) adds them; or `bytes` (one
    /// token per byte). Default: the --model folder's tokenizer.json if it has one, else bytes.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Append the end-of-sequence id (the config's eos_token_id, else the tokenizer's eos_token)
    /// after every text document.
    #[arg(long)]
    pub append_eos: bool,
    /// Number of devices: thread ranks in this process (default 1), or, under `mpirun`, one rank
    /// per process (default and only allowed value: the MPI world size).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Where the ranks compute: cpu, or cuda (rank r on GPU r mod the GPU count; needs a build
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GEMM operand precision on cuda: bf16 (fp32 master weights, f32 accumulation) or f32
    /// [default: bf16]. Only with --device cuda.
    #[arg(long)]
    pub gemm_precision: Option<String>,
    /// Nodes are groups of this many devices (used by the switch planner); under `mpirun` MPI
    /// says which ranks share a node.
    #[arg(long)]
    pub devices_per_node: Option<usize>,
    /// Parallel strategy, e.g. dp4, tp4, dp2tp2, tp2pp2, dp2zero1, dp2cp2 (context parallelism, ring attention), cp4ulysses (Ulysses) (default: dp over every device).
    #[arg(long, conflicts_with = "strategies")]
    pub strategy: Option<String>,
    /// Hot switching: `STRATEGY:MAXLEN,…` (MAXLEN ascending, the last may be `max`), e.g.
    /// "dp4:64,dp2tp2:256,tp4:max". Each sequence trains under the first strategy that takes its
    /// length; parameters and gradients switch between them inside the step. `auto`: the
    /// planner chooses every step's strategies and bucket edges (needs --profile).
    #[arg(long)]
    pub strategies: Option<String>,
    /// Activation recomputation for every strategy that does not say its own (`tp4+full`):
    /// none, selective (attention's output and log-sum-exp recomputed from the kept Q, K, V) or
    /// full (each decoder layer's input kept, the layer recomputed before its backward).
    #[arg(long)]
    pub recompute: Option<String>,
    /// With `--strategies auto`: the cost model's calibration (`hotspa profile --devices N`).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// With `--strategies auto`: the planner also searches context parallelism (CP 2–8, ring
    /// or Ulysses) and activation recomputation (selective, full) for every bucket, as
    /// `hotspa simulate --context` does; without it, DP × TP × PP only.
    #[arg(long)]
    pub plan_context: bool,
    /// With `--strategies auto`: a step may also run as up to four concurrent groups of
    /// devices, each on a range of lengths under its own strategy (with `--plan-context`, its
    /// own CP degree), where the cost model says that is faster.
    #[arg(long)]
    pub plan_concurrent: bool,
    /// Also time the run as the simulator would on this cluster (a preset such as a800x32, or
    /// a cluster file such as a `hotspa profile` output): every kernel and message still runs
    /// here, and each step's metrics add `simulated_seconds`, the virtual clock's time.
    #[arg(long)]
    pub sim_cluster: Option<String>,
    /// Pipeline schedule: 1f1b, gpipe or pipedream-2bw [default: 1f1b]. Only where a strategy
    /// has pipeline stages (or the planner may choose them). pipedream-2bw (Narayanan et al.
    /// 2021) does not flush between steps: a step's micro-batches enter while the last step's
    /// finish, each reads the weights stashed when its step began (two versions kept), and the
    /// update is one step late, W(t+1) = W(t) − lr·∇f(W(t−1)); metrics add `weight_staleness`.
    /// Checkpoints, evaluations and the end flush it. One --strategy with pp ≥ 2, no ZeRO-3,
    /// BSP, AdamW, fifo.
    #[arg(long)]
    pub pipeline_schedule: Option<String>,
    /// How each strategy deals its sequences to its DP replicas and packs its micro-batches:
    /// balanced (longest first to the replica with the least work, `len + q·len²` with `q`
    /// attention's FLOPs per squared token over the GEMMs' per token, then first-fit
    /// decreasing) or in-order (batch order, round-robin). The cost model estimates the same.
    #[arg(long, default_value = "balanced")]
    pub packing: String,
    /// Size of the buckets the DP gradient all-reduce sums while the backward runs, in MiB, or
    /// auto: per strategy √(G·α·n·β) by the α–β model of its DP group's links (G its gradient
    /// bytes, n its members; the --sim-cluster or planning cluster, else nominal links), the
    /// size at which the buckets' latencies and the last bucket's unoverlapped transfer cost
    /// least together.
    #[arg(long, default_value = "4")]
    pub bucket_mb: String,
    /// When the DP gradients are summed: fifo (in buckets as the last backward finishes them,
    /// overlapping it) or priority (P3 / ByteScheduler: in pieces of --bucket-mb in the order
    /// the next forward reads the parameters; the last two thirds during the last backward,
    /// the first third during the next step, each parameter updated as soon as it is summed
    /// and the forward waiting per parameter; the same update; pure data parallelism without
    /// ZeRO, with --grad-clip inf).
    #[arg(long, default_value = "fifo")]
    pub comm_schedule: String,
    /// How DP replicas exchange gradients: none (exact f32), bf16, fp16, int8 (a scale per 256
    /// values), sign (1 bit and a scale), topk:F or randk:F (a fraction F, e.g. 0.01 or 1%, as
    /// index–value pairs or at shared random positions), powersgd:R (rank-R factors of every
    /// matrix), qsgd:S (QSGD: a norm per 256 values, each value a sign and one of S levels,
    /// rounded stochastically and unbiased), dgc:F (Deep Gradient Compression: local clipping
    /// to --grad-clip/√N instead of the global clipping, a velocity with momentum 0.9 accumulated and its top F sent, sent
    /// positions cleared, the fraction warmed up from 25%; run with --beta1 0), oktopk:F and
    /// okdgc:F (top-k's and DGC's selections summed by Ok-Topk's balanced sparse all-reduce:
    /// a member's bytes do not grow with the members; the owners keep the largest sums and the
    /// rest stays with the senders), sketch:RxC
    /// (FetchSGD's federated uplink: a count sketch of each client's change, the server's
    /// error accumulation, the C/4 largest coordinates applied; with --sync fedavg), or auto
    /// (per bucket, the most faithful of exact, bf16 and int8, over the group or across nodes
    /// only, whose modelled time is within 10 % of the fastest). Lossy: the loss curve changes
    /// (see --error-feedback).
    #[arg(long, default_value = "none")]
    pub grad_compression: String,
    /// on: every rank adds back what its codec left out the step before (EF-SGD; the residuals
    /// go into checkpoints); off: what a codec drops is lost.
    #[arg(long, default_value = "on")]
    pub error_feedback: String,
    /// Keep the gradient exchange inside a node exact and compress only what crosses nodes
    /// (nodes: --devices-per-node, or MPI's placement).
    #[arg(long)]
    pub compress_cross_node_only: bool,
    /// The all-reduce of exact gradient sums: ring, rhd (recursive halving–doubling), tree
    /// (double binary tree), hier (reduce-scatter in a node, all-reduce across, all-gather in),
    /// or auto (the cheapest by the α–β model, per bucket size and node layout, on the
    /// --sim-cluster cluster, else with --strategies auto the --profile one, else nominal
    /// links of this machine). Each adds in
    /// its own fixed order: only ring is bitwise the default run.
    #[arg(long, default_value = "ring")]
    pub allreduce: String,
    /// How the DP replicas stay in step: bsp (the gradient exchange every step, or with
    /// --ps-servers the servers' summed update), ssp:S (parameter server, no worker more than S
    /// steps ahead of the slowest), asp (parameter server, every push applied on arrival),
    /// local:H (each replica runs its own AdamW on its share of every batch; the weights are
    /// averaged every H steps and after the last), gossip:H (the same, each replica averaging
    /// with its two ring neighbours only; with everyone at the end, checkpoints and
    /// evaluations), diloco:H (as local:H, with an outer SGD step with Nesterov momentum on the
    /// averaged change every H steps) or fedavg (federated clients, --fed-*). Needs --strategy
    /// with DP and no ZeRO.
    #[arg(long, default_value = "bsp")]
    pub sync: String,
    /// Parameter servers: K more ranks (ranks 0..K, the --devices workers after them) that hold
    /// the parameters and AdamW state in shards; workers push gradients and pull parameters.
    /// ssp:S and asp take 1 when not given.
    #[arg(long)]
    pub ps_servers: Option<usize>,
    /// Where the parameter servers run: dedicated (nodes of their own) or colocated (on the
    /// workers' nodes); it decides which bytes cross nodes.
    #[arg(long, default_value = "dedicated")]
    pub ps_placement: String,
    /// Federated averaging (--sync fedavg): clients the data is split over [default: one per
    /// device].
    #[arg(long)]
    pub fed_clients: Option<usize>,
    /// Fraction of the clients sampled each round [default: 1].
    #[arg(long, allow_hyphen_values = true)]
    pub fed_fraction: Option<f64>,
    /// Local AdamW steps per client and round [default: 5].
    #[arg(long)]
    pub fed_local_steps: Option<usize>,
    /// Sequences per local step [default: 8].
    #[arg(long)]
    pub fed_batch: Option<usize>,
    /// How the data is split over the clients: iid (a seeded shuffle) or by-source (whole files,
    /// or documents of one file, in order: non-IID) [default: iid].
    #[arg(long)]
    pub fed_shards: Option<String>,
    /// Federated Dropout: the fraction of every layer's FFN units each client drops for its
    /// sub-model [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub fed_dropout: Option<f64>,
    /// How the server weighs the clients' models: size (each client's data, McMahan's n_k) or
    /// tokens (what each trained this round) [default: size].
    #[arg(long)]
    pub fed_weighting: Option<String>,
    /// Epochs of its own shard each client trains per round (McMahan's E), instead of
    /// --fed-local-steps.
    #[arg(long)]
    pub fed_epochs: Option<usize>,
    /// The probability that a sampled client drops out of a round (sends nothing) [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub fed_dropout_clients: Option<f64>,
    /// Slow worker R's compute FACTOR times (R:FACTOR, repeatable): after its gradients it
    /// waits (FACTOR − 1) times as long as they took, as a straggler.
    #[arg(long)]
    pub slow_rank: Vec<String>,
    /// DiLoCo's outer learning rate [default: 0.7].
    #[arg(long, allow_hyphen_values = true)]
    pub outer_lr: Option<f64>,
    /// DiLoCo's outer Nesterov momentum [default: 0.9].
    #[arg(long, allow_hyphen_values = true)]
    pub outer_momentum: Option<f64>,
    /// Sequences per global batch.
    #[arg(long, default_value_t = 8)]
    pub global_batch: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Token budget of a micro-batch (a sequence longer than it gets a micro-batch of its own);
    /// with --strategies, one value for all or one per strategy (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize])]
    pub micro_batch_tokens: Vec<usize>,
    /// Documents longer than this are cut into pieces (default: max_position_embeddings).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4, allow_hyphen_values = true)]
    pub lr: f64,
    /// constant or cosine (linear warm-up, then cosine decay to --min-lr over the remaining steps).
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Final learning rate of the cosine schedule [default: 0]. Only with --lr-schedule cosine.
    #[arg(long, allow_hyphen_values = true)]
    pub min_lr: Option<f64>,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9, allow_hyphen_values = true)]
    pub beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.95, allow_hyphen_values = true)]
    pub beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8, allow_hyphen_values = true)]
    pub eps: f64,
    /// Decoupled weight decay (tensors of rank ≥ 2 only).
    #[arg(long, default_value_t = 0.1, allow_hyphen_values = true)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (inf: no clipping). Under dgc:F, okdgc:F and onebit-adam
    /// with DP replicas each member clips its own gradient to this / √N instead.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub grad_clip: f64,
    /// adamw, or onebit-adam (1-bit Adam, Tang et al. 2021: --onebit-warmup steps of exact
    /// AdamW, then the variance frozen and the DP replicas exchanging their momentum by a 1-bit
    /// codec with error feedback on both sides).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// onebit-adam's exact warm-up steps before the variance freezes [default: a fifth of
    /// --steps, at least 1].
    #[arg(long)]
    pub onebit_warmup: Option<u64>,
    /// Seed of the initialisation and of the shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// on: shuffle reproducibly from --seed; off: file order.
    #[arg(long, default_value = "on")]
    pub shuffle: String,
    /// Write the final model: an HF model folder (config.json, weights sharded above 5 GiB,
    /// generation_config.json, the tokenizer's files), or one f32 file for a path ending in
    /// .safetensors. Checked before the first step: a non-empty folder needs --force.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// The saved weights' dtype: bf16, f16 or f32 (default: the initial weights' dtype, f32 for
    /// random ones).
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Write one JSON object per step.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write checkpoints into this directory (atomic, verified on load).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N steps (default: at the end only).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Keep the last N step folders of the checkpoint directory (older ones are removed)
    /// [default: 3]. Only with --checkpoint-dir.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Go ahead where a safety check refuses: start fresh in a checkpoint directory holding
    /// another run's steps (they are deleted), resume although the data settings changed.
    #[arg(long)]
    pub force: bool,
    /// Held-out data (read like --data): its loss and perplexity every --eval-every steps and
    /// after the last, in the metrics, the step line and the plot.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (default: after the last step only).
    #[arg(long, requires = "eval_data")]
    pub eval_every: Option<usize>,
    /// Resume from a checkpoint directory (its `latest`, or a step directory), under any strategy.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// The embedded default run (what `hotspa train` alone does), changed by the other flags
    /// given here, e.g. `--default-run --grad-compression bf16 --steps 50`.
    #[arg(long)]
    pub default_run: bool,
    /// The default run's corpus (the paragraphs of the project's own files); not a flag.
    #[arg(skip)]
    pub data_files: Option<Vec<PathBuf>>,
}

impl TrainFlags {
    /// Every flag at its default (what `hotspa train` with no flag but the required ones gets).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            flags: TrainFlags,
        }
        <Wrap as clap::Parser>::parse_from(["hotspa"]).flags
    }

    /// The device count: `--devices`, or under `mpirun` the MPI world size (a different
    /// `--devices` is an error).
    pub fn device_count(&self) -> Result<usize> {
        if self.devices == Some(0) {
            bail!("--devices 0 is out of range: must be at least 1");
        }
        // The parameter servers are processes of the MPI world too (ssp:S and asp take one
        // when not given).
        let servers = self
            .ps_servers
            .unwrap_or_else(|| usize::from(self.sync.starts_with("ssp") || self.sync == "asp"));
        match comm::mpi::launch() {
            Some((_, world)) if world > 1 => {
                let size = world.saturating_sub(servers).max(1);
                match self.devices {
                    Some(d) if d != size => bail!(
                        "--devices {d} conflicts with the MPI world of {world} processes \
                         (mpirun -np {world}, {servers} of them parameter servers): under mpirun \
                         every process is one rank; drop --devices or make them agree"
                    ),
                    _ => Ok(size),
                }
            }
            _ => Ok(self.devices.unwrap_or(1)),
        }
    }

    /// Flags that would change nothing here, refused by name (a flag is never taken silently).
    fn check_meaningful(&self) -> Result<()> {
        let needs = [
            (
                self.checkpoint_every.is_some(),
                "--checkpoint-every",
                "--checkpoint-dir",
                self.checkpoint_dir.is_some(),
            ),
            (
                self.keep_last.is_some(),
                "--keep-last",
                "--checkpoint-dir",
                self.checkpoint_dir.is_some(),
            ),
            (
                self.save_dtype.is_some(),
                "--save-dtype",
                "--save",
                self.save.is_some(),
            ),
            (
                self.gemm_precision.is_some(),
                "--gemm-precision",
                "--device cuda",
                self.device == "cuda",
            ),
            (
                self.min_lr.is_some(),
                "--min-lr",
                "--lr-schedule cosine",
                self.lr_schedule == "cosine",
            ),
            (
                self.onebit_warmup.is_some(),
                "--onebit-warmup",
                "--optimizer onebit-adam",
                self.optimizer == "onebit-adam",
            ),
        ];
        for (given, flag, parent, present) in needs {
            if given && !present {
                bail!("{flag} applies only with {parent}: without it the flag changes nothing");
            }
        }
        if self.fed_clients == Some(0) {
            bail!("--fed-clients 0 is out of range: must be at least 1 (leave it out for one client per device)");
        }
        Ok(())
    }

    /// The run these flags describe: the model's config read, the strategies parsed, presets
    /// and cluster files loaded.
    pub fn config(&self) -> Result<TrainConfig> {
        // A resumed run's model is the checkpoint's own (its step folder is a model folder).
        let model = match (&self.model, &self.resume) {
            (Some(m), _) => Some(m.clone()),
            (None, Some(r)) => Some(
                model::Checkpoint::step_dir(r)
                    .with_context(|| format!("--resume {}", r.display()))?,
            ),
            (None, None) => None,
        };
        let (Some(model_path), true) = (model, self.data.is_some() || self.data_files.is_some())
        else {
            bail!(
                "pass --model <config.json|dir> and --data <file.jsonl|dir> \
                 (or run `hotspa train` with no arguments at all for the embedded default run)"
            );
        };
        self.check_meaningful()?;
        let model = LlamaConfig::load(&model_path)?;
        let data = match (&self.data_files, &self.data) {
            (Some(files), _) => DataSource::Paragraphs(files.clone()),
            (None, Some(p)) => DataSource::Path(p.clone()),
            (None, None) => bail!("no training data"),
        };
        let devices = self.device_count()?;
        let mut cfg = TrainConfig::new(model, data);
        cfg.model_path = Some(model_path);
        cfg.devices = devices;
        cfg.devices_per_node = self.devices_per_node;
        cfg.device = match self.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(
                self.gemm_precision
                    .as_deref()
                    .unwrap_or("bf16")
                    .parse::<GemmPrecision>()
                    .map_err(anyhow::Error::msg)?,
            ),
            other => bail!("--device {other}: use cpu or cuda"),
        };
        let recompute =
            match self.recompute.as_deref() {
                None => None,
                Some(m) => Some(graph::Recompute::parse(m).ok_or_else(|| {
                    anyhow::anyhow!("--recompute {m}: use none, selective or full")
                })?),
            };
        // A strategy without its own `+mode` takes --recompute's.
        let with_mode = |s: &str| match recompute {
            Some(m) if !s.contains('+') => format!("{s}+{m}"),
            _ => s.to_string(),
        };
        if recompute.is_some() && self.strategies.as_deref() == Some("auto") {
            bail!(
                "--recompute with --strategies auto: the planner chooses recomputation itself \
                 with --plan-context (per bucket); drop --recompute, or give the strategies"
            );
        }
        if self.plan_context && self.strategies.as_deref() != Some("auto") {
            bail!("--plan-context widens the search of --strategies auto; it does nothing to a given strategy");
        }
        if self.plan_concurrent && self.strategies.as_deref() != Some("auto") {
            bail!("--plan-concurrent widens the search of --strategies auto; it does nothing to a given strategy");
        }
        cfg.strategy = match (self.strategies.as_deref(), &self.profile) {
            (Some("auto"), Some(p)) => {
                let cluster = sim::presets::cluster_or_file(&p.display().to_string())
                    .with_context(|| format!("--profile {}", p.display()))?;
                StrategySpec::Auto(Box::new(train::AutoPlanning {
                    cluster,
                    context: self.plan_context,
                    concurrent: self.plan_concurrent,
                }))
            }
            (Some("auto"), None) => bail!(
                "--strategies auto needs --profile FILE (write one with `hotspa profile --devices {devices}`)"
            ),
            (Some(spec), _) => {
                let spec: Vec<String> = spec
                    .split(',')
                    .map(|part| match part.split_once(':') {
                        Some((s, m)) => format!("{}:{m}", with_mode(s)),
                        None => part.to_string(),
                    })
                    .collect();
                StrategySpec::Hot(
                    planner::Plan::parse(&spec.join(","), devices).context("--strategies")?,
                )
            }
            (None, _) => {
                let spec = self
                    .strategy
                    .clone()
                    .unwrap_or_else(|| format!("dp{devices}"));
                StrategySpec::Fixed(Strategy::parse(&with_mode(&spec), devices)?)
            }
        };
        if let Some(sched) = &self.pipeline_schedule {
            let pipelined = match &cfg.strategy {
                StrategySpec::Fixed(s) => s.pp > 1,
                StrategySpec::Hot(plan) => plan.strategies().iter().any(|s| s.pp > 1),
                // The planner may choose pipeline stages.
                StrategySpec::Auto(_) => true,
            };
            if !pipelined {
                bail!(
                    "--pipeline-schedule {sched} applies only to strategies with pipeline stages \
                     (ppN, N > 1): no strategy of this run has them, so it changes nothing"
                );
            }
        }
        cfg.exchange = exchange_of(
            &self.grad_compression,
            &self.error_feedback,
            self.compress_cross_node_only,
            &self.allreduce,
        )?;
        cfg.sync = train::SyncMode::parse(&self.sync, self.outer_lr, self.outer_momentum)?;
        let placement = train::Placement::parse(&self.ps_placement)?;
        let servers = match (self.ps_servers, cfg.sync) {
            (Some(k), _) => Some(k),
            (None, train::SyncMode::Ssp { .. } | train::SyncMode::Asp) => Some(1),
            (None, _) => None,
        };
        if servers.is_none() && placement != train::Placement::default() {
            bail!("--ps-placement {placement}: there are no parameter servers (--ps-servers)");
        }
        cfg.ps = servers.map(|servers| train::ParamServers { servers, placement });
        let d = train::Federated::default();
        cfg.fed = train::Federated {
            clients: self.fed_clients.unwrap_or(d.clients),
            fraction: self.fed_fraction.unwrap_or(d.fraction),
            local_steps: self.fed_local_steps.unwrap_or(d.local_steps),
            batch: self.fed_batch.unwrap_or(d.batch),
            sharding: match self.fed_shards.as_deref() {
                None | Some("iid") => train::Sharding::Iid,
                Some("by-source") => train::Sharding::BySource,
                Some(other) => bail!("--fed-shards {other}: use iid or by-source"),
            },
            dropout: self.fed_dropout.unwrap_or(d.dropout),
            weighting: match self.fed_weighting.as_deref() {
                None | Some("size") => train::FedWeighting::Size,
                Some("tokens") => train::FedWeighting::Tokens,
                Some(other) => bail!("--fed-weighting {other}: use size or tokens"),
            },
            epochs: self.fed_epochs,
            client_dropout: self.fed_dropout_clients.unwrap_or(d.client_dropout),
        };
        if self.fed_epochs.is_some() && self.fed_local_steps.is_some() {
            bail!("--fed-epochs and --fed-local-steps both say how long a client trains; give one");
        }
        cfg.slow_ranks = self
            .slow_rank
            .iter()
            .map(|s| train::SlowRank::parse(s))
            .collect::<Result<_, _>>()?;
        cfg.micro_batch_tokens = self.micro_batch_tokens.clone();
        cfg.pipeline_schedule = self
            .pipeline_schedule
            .as_deref()
            .unwrap_or("1f1b")
            .parse::<Schedule>()?;
        cfg.packing = self.packing.parse()?;
        cfg.buckets = self.bucket_mb.parse()?;
        cfg.comm_schedule = self.comm_schedule.parse().context("--comm-schedule")?;
        cfg.global_batch = self.global_batch;
        cfg.steps = self.steps;
        cfg.max_len = self.max_len;
        cfg.lr = LrSchedule {
            peak: self.lr,
            warmup: self.warmup,
            decay: match self.lr_schedule.as_str() {
                "constant" => Decay::Constant,
                "cosine" => Decay::Cosine {
                    min_lr: self.min_lr.unwrap_or(0.0),
                },
                other => bail!("--lr-schedule {other}: use constant or cosine"),
            },
        };
        cfg.adamw = kernels::AdamW {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            freeze_variance_after: None,
        };
        cfg.grad_clip = self.grad_clip;
        cfg.optimizer = match self.optimizer.as_str() {
            "adamw" => train::OptimizerKind::AdamW,
            "onebit-adam" => train::OptimizerKind::OneBitAdam {
                warmup: self.onebit_warmup.unwrap_or((self.steps as u64 / 5).max(1)),
            },
            other => bail!("--optimizer {other}: use adamw or onebit-adam"),
        };
        cfg.seed = self.seed;
        cfg.shuffle = match self.shuffle.as_str() {
            "on" => true,
            "off" => false,
            other => bail!("--shuffle {other}: use on or off"),
        };
        let folder = cfg
            .model_path
            .clone()
            .filter(|p| p.is_dir() && self.data_files.is_none());
        cfg.init = match (self.init.as_deref(), &folder) {
            (Some("random"), _) => Init::Random,
            (Some(p), _) => Init::File(PathBuf::from(p)),
            // A resumed run takes the checkpoint's weights.
            (None, Some(dir)) if model::has_weights(dir) && self.resume.is_none() => {
                Init::File(dir.clone())
            }
            // Weights in a format not read here are never traded for random ones silently.
            (None, Some(dir)) if self.resume.is_none() => match model::folder::foreign_weights(dir)
            {
                Some(file) => bail!("{}", model::folder::foreign_weights_reason(dir, &file)),
                None => Init::Random,
            },
            (None, _) => Init::Random,
        };
        cfg.tokenizer = match (self.tokenizer.as_deref(), &folder) {
            (Some("bytes"), _) => Tokenizer::Bytes,
            (Some(p), _) => Tokenizer::File(PathBuf::from(p)),
            (None, Some(dir)) if dir.join("tokenizer.json").is_file() => {
                Tokenizer::File(dir.join("tokenizer.json"))
            }
            (None, _) => Tokenizer::Bytes,
        };
        cfg.append_eos = self.append_eos;
        cfg.save = self.save.clone();
        cfg.save_dtype = match &self.save_dtype {
            Some(d) => Some(d.parse::<model::Dtype>().map_err(anyhow::Error::msg)?),
            None => None,
        };
        cfg.metrics = self.metrics.clone();
        cfg.checkpoint = self.checkpoint_dir.as_ref().map(|dir| Checkpointing {
            dir: dir.clone(),
            every: self.checkpoint_every,
            keep_last: self.keep_last.unwrap_or(train::KEEP_LAST),
        });
        cfg.force = self.force;
        cfg.resume = self.resume.clone();
        cfg.eval = self.eval_data.as_ref().map(|d| train::Evaluating {
            data: DataSource::Path(d.clone()),
            every: self.eval_every,
        });
        cfg.simulate = match &self.sim_cluster {
            Some(name) => {
                let c = sim::presets::cluster_or_file(name)
                    .with_context(|| format!("--sim-cluster {name}"))?;
                if c.devices() < devices {
                    bail!(
                        "--sim-cluster {name}: {} has {} devices, fewer than --devices {devices}",
                        c.name,
                        c.devices()
                    );
                }
                Some(c.take(devices))
            }
            None => None,
        };
        Ok(cfg)
    }
}

/// The gradient exchange the flags `--grad-compression`, `--error-feedback`,
/// `--compress-cross-node-only` and `--allreduce` name (`train` and `simulate` share them).
pub(crate) fn exchange_of(
    compression: &str,
    error_feedback: &str,
    cross_node_only: bool,
    allreduce: &str,
) -> Result<planner::exchange::Exchange> {
    let (codec, adaptive) =
        planner::exchange::compression(compression).context("--grad-compression")?;
    Ok(planner::exchange::Exchange {
        codec,
        adaptive,
        error_feedback: match error_feedback {
            "on" => true,
            "off" => false,
            other => bail!("--error-feedback {other}: use on or off"),
        },
        cross_node_only,
        algorithm: allreduce.parse().context("--allreduce")?,
        step: None,
    })
}
