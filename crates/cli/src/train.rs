//! `hotspa train`: the training loop over thread ranks or MPI processes, static, hot-switched or
//! planned every step (`--strategies auto`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use comm::{Communicator, ThreadComm};
use data::Dataset;
use graph::Strategy;
use kernels::{CpuBackend, CudaBackend, GemmPrecision};
use model::{gather_weights, Checkpoint, LlamaConfig, Weights};
use runtime::{MicroBatch, RuntimeError, Schedule};

mod default_run;
mod planning;
mod rank_job;

use default_run::default_run;
use planning::auto_planner;
pub(crate) use planning::plan_inputs;
use rank_job::RankJob;

#[derive(ClapArgs, Clone)]
pub struct Args {
    /// An HF `config.json`, or the directory holding it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Initial weights (safetensors, HF names; f32, bf16 or f16). Default: random from --seed.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Training data: a JSONL file (`input_ids` or `text` per line) or a directory of text files.
    #[arg(long)]
    data: Option<PathBuf>,
    /// An HF tokenizer.json for `text` records and text files (default: one token per byte).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Number of devices: thread ranks in this process (default 1), or, under `mpirun`, one rank
    /// per process (default and only allowed value: the MPI world size).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    devices: usize,
    /// Where the ranks compute: cpu, or cuda (rank r on GPU r mod the GPU count; needs a build
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GEMM operand precision on cuda: bf16 (fp32 master weights, f32 accumulation) or f32.
    #[arg(long, default_value = "bf16")]
    gemm_precision: String,
    /// Nodes are groups of this many devices (used by the switch planner); under `mpirun` MPI
    /// says which ranks share a node.
    #[arg(long)]
    devices_per_node: Option<usize>,
    /// Parallel strategy, e.g. dp4, tp4, dp2tp2, tp2pp2, dp2zero1 (default: dp over every device).
    #[arg(long, conflicts_with = "strategies")]
    strategy: Option<String>,
    /// Hot switching: `STRATEGY:MAXLEN,…` (MAXLEN ascending, the last may be `max`), e.g.
    /// "dp4:64,dp2tp2:256,tp4:max". Each sequence trains under the first strategy that takes its
    /// length; parameters and gradients switch between them inside the step. `auto`: the
    /// planner chooses every step's strategies and bucket edges (needs --profile).
    #[arg(long)]
    strategies: Option<String>,
    /// With `--strategies auto`: the cost model's calibration (`hotspa profile --devices N`).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Also time the run as the simulator would on this cluster (a preset such as a800x32, or
    /// a cluster file such as a `hotspa profile` output): every kernel and message still runs
    /// here, and each step's metrics add `simulated_seconds`, the virtual clock's time.
    #[arg(long)]
    sim_cluster: Option<String>,
    /// Pipeline schedule: 1f1b or gpipe.
    #[arg(long, default_value = "1f1b")]
    pipeline_schedule: String,
    /// Sequences per global batch.
    #[arg(long, default_value_t = 8)]
    global_batch: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Token budget of a micro-batch (a sequence longer than it gets a micro-batch of its own);
    /// with --strategies, one value for all or one per strategy (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize])]
    micro_batch_tokens: Vec<usize>,
    /// Documents longer than this are cut into pieces (default: max_position_embeddings).
    #[arg(long)]
    max_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// constant or cosine (linear warm-up, then cosine decay to --min-lr over the remaining steps).
    #[arg(long, default_value = "constant")]
    lr_schedule: String,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Decoupled weight decay (tensors of rank ≥ 2 only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (inf: no clipping).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of the initialisation and of the shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// on: shuffle reproducibly from --seed; off: file order.
    #[arg(long, default_value = "on")]
    shuffle: String,
    /// Write the final weights (f32 safetensors, HF names).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Write one JSON object per step.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Write checkpoints into this directory (atomic, verified on load).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N steps (default: at the end only).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// The default run's corpus (the project's own files); not a flag.
    #[arg(skip)]
    data_files: Option<Vec<PathBuf>>,
    /// Resume from a checkpoint directory (its `latest`, or a step directory), under any strategy.
    #[arg(long)]
    resume: Option<PathBuf>,
}

/// What the rank threads tell the main thread.
enum Msg {
    /// One step's metrics line (rank 0).
    Metrics(String),
    /// Every rank's pieces of the weights and both moments after `step` steps (rank 0, which
    /// collected them).
    Checkpoint { step: u64, parts: Vec<RankPart> },
}

/// One rank's pieces of the weights and both moments, with what it holds.
type RankPart = ([Vec<Vec<f32>>; 3], model::Held);

/// On world rank 0 at the end: every rank's final pieces with what it holds, and every rank's
/// peak bytes.
type Collected = (Vec<(Vec<Vec<f32>>, model::Held)>, Vec<usize>);

/// The run's settings, recorded in checkpoints.
fn run_record(a: &Args, strategy: &Strategy) -> serde_json::Value {
    serde_json::json!({
        "strategy": strategy.to_string(), "devices": a.devices, "global_batch": a.global_batch,
        "steps": a.steps, "micro_batch_tokens": a.micro_batch_tokens, "max_len": a.max_len,
        "lr": a.lr, "lr_schedule": a.lr_schedule, "warmup": a.warmup, "min_lr": a.min_lr,
        "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps, "weight_decay": a.weight_decay,
        "grad_clip": a.grad_clip, "seed": a.seed, "shuffle": a.shuffle,
        "data": a.data, "model": a.model, "init": a.init,
    })
}

/// The learning rate of `step` (0-based) of `steps`.
fn lr_at(a: &Args, step: usize) -> f64 {
    if a.warmup > 0 && step < a.warmup {
        return a.lr * (step + 1) as f64 / a.warmup as f64;
    }
    match a.lr_schedule.as_str() {
        "cosine" => {
            let span = a.steps.saturating_sub(a.warmup).max(1) as f64;
            let progress = ((step - a.warmup.min(step)) as f64 / span).min(1.0);
            a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        _ => a.lr,
    }
}

/// Packs `seqs` into micro-batches of at most `budget` tokens, in order.
pub(crate) fn pack(
    seqs: &[Vec<u32>],
    budget: usize,
    scale: f32,
) -> Result<Vec<MicroBatch>, RuntimeError> {
    let mut out = Vec::new();
    let mut cur: Vec<Vec<u32>> = Vec::new();
    let mut tokens = 0;
    for s in seqs {
        if !cur.is_empty() && tokens + s.len() > budget {
            out.push(MicroBatch::pack(&cur, scale)?);
            cur.clear();
            tokens = 0;
        }
        tokens += s.len();
        cur.push(s.clone());
    }
    if !cur.is_empty() {
        out.push(MicroBatch::pack(&cur, scale)?);
    }
    Ok(out)
}

pub fn run(args: Args, bare: bool) -> Result<()> {
    if bare {
        return default_run(args);
    }
    let (Some(model_path), true) = (
        args.model.clone(),
        args.data.is_some() || args.data_files.is_some(),
    ) else {
        bail!(
            "pass --model <config.json|dir> and --data <file.jsonl|dir> \
             (or run `hotspa train` with no arguments at all for the embedded default run)"
        );
    };
    if args.checkpoint_every.is_some() && args.checkpoint_dir.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir");
    }
    if args.checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be at least 1");
    }
    if !matches!(args.lr_schedule.as_str(), "constant" | "cosine") {
        bail!("--lr-schedule {}: use constant or cosine", args.lr_schedule);
    }
    let shuffle = match args.shuffle.as_str() {
        "on" => Some(args.seed),
        "off" => None,
        other => bail!("--shuffle {other}: use on or off"),
    };
    let schedule: Schedule = args.pipeline_schedule.parse().map_err(anyhow::Error::msg)?;
    let precision: GemmPrecision = args.gemm_precision.parse().map_err(anyhow::Error::msg)?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            // Fail before any data is read when the backend cannot open.
            let gpus = kernels::cuda::device_count()?;
            eprintln!("cuda: {gpus} GPU(s); rank r runs on GPU r mod {gpus}; GEMMs in {precision}");
            Device::Cuda(precision)
        }
        other => bail!("--device {other}: use cpu or cuda"),
    };
    // Under mpirun: one rank per process, the world size is the device count, and MPI says
    // which ranks share a node.
    let mut args = args;
    let mpi = match comm::mpi::launch() {
        Some((_, size)) if size > 1 => {
            if args.devices != 0 && args.devices != size {
                bail!(
                    "--devices {} conflicts with the MPI world of {size} processes (mpirun -np {size}): \
                     under mpirun every process is one rank; drop --devices or make them agree",
                    args.devices
                );
            }
            args.devices = size;
            let world = comm::MpiComm::init()
                .with_context(|| format!("started by mpirun as one of {size} processes"))?;
            let per_node = mpi_devices_per_node(world.nodes())?;
            if let Some(d) = args.devices_per_node.filter(|&d| d != per_node) {
                bail!(
                    "--devices-per-node {d} conflicts with MPI's placement ({per_node} ranks per node)"
                );
            }
            args.devices_per_node = Some(per_node);
            Some(Arc::new(world))
        }
        _ => None,
    };
    let root = mpi.as_ref().is_none_or(|w| w.rank().0 == 0);
    if args.devices == 0 {
        args.devices = 1;
    }
    let args = args;
    anyhow::ensure!(
        args.global_batch >= 1 && args.steps >= 1,
        "--global-batch and --steps must be at least 1"
    );
    let sim_cluster = match &args.sim_cluster {
        Some(name) => {
            let c = sim::presets::cluster_or_file(name)?;
            if c.devices() < args.devices {
                bail!(
                    "--sim-cluster {name}: {} has {} devices, fewer than --devices {}",
                    c.name,
                    c.devices(),
                    args.devices
                );
            }
            Some(Arc::new(c.take(args.devices)))
        }
        None => None,
    };
    let cfg = Arc::new(LlamaConfig::load(&model_path)?);
    let max_len = args.max_len.unwrap_or(cfg.max_position_embeddings);
    let (ds, data_name) = match (&args.data_files, &args.data) {
        (Some(files), _) => (
            Dataset::from_text_files(files, max_len)?,
            format!("{} files of this project", files.len()),
        ),
        (None, Some(p)) => (
            Dataset::load(p, cfg.vocab_size, max_len)?,
            p.display().to_string(),
        ),
        (None, None) => bail!("no training data"),
    };
    let spec = args
        .strategy
        .clone()
        .unwrap_or_else(|| format!("dp{}", args.devices));
    // `--strategies auto`: the planner picks the instantiation strategy on the first batch and
    // every step's schedule around it.
    let auto = match (args.strategies.as_deref(), &args.profile) {
        (Some("auto"), Some(p)) => {
            // Planned on the run's first batch whatever step it resumes at, so that a resumed
            // run keeps the optimizer in the same layout.
            let first: Vec<usize> = ds
                .batch(0, args.global_batch, shuffle)
                .iter()
                .map(Vec::len)
                .collect();
            Some(Arc::new(auto_planner(&args, &cfg, p, &first)?))
        }
        (Some("auto"), None) => bail!(
            "--strategies auto needs --profile FILE (write one with `hotspa profile --devices {}`)",
            args.devices
        ),
        _ => None,
    };
    let hot = match &args.strategies {
        Some(_) if auto.is_some() => None,
        Some(spec) => {
            let h = crate::hot::HotSchedule::parse(spec, args.devices)?;
            for (s, _) in &h.entries {
                s.stage_layers(cfg.num_hidden_layers)?;
            }
            Some(Arc::new(h))
        }
        None => {
            if args.micro_batch_tokens.len() != 1 {
                bail!("--micro-batch-tokens takes one value without --strategies");
            }
            None
        }
    };
    let strategy = match (&hot, &auto) {
        (Some(h), _) => h.entries[h.inst].0.clone(),
        (None, Some(a)) => a.1.clone(),
        (None, None) => Strategy::parse(&spec, args.devices)?,
    };
    strategy.stage_layers(cfg.num_hidden_layers)?;
    if let (Some(a), true) = (&auto, root) {
        eprintln!(
            "automatic planning: {} holds the weights and the optimizer; each step's strategies \
             and bucket edges come from the cost model",
            a.1
        );
    }
    if let Some(h) = &hot {
        let list: Vec<String> = h
            .entries
            .iter()
            .map(|(s, m)| format!("{s} (≤ {})", m.map_or("any".into(), |m| m.to_string())))
            .collect();
        if root {
            eprintln!(
            "hot switching: {}; {} holds the weights and the optimizer (least model state per device)",
            list.join(", "),
            strategy
        );
        }
    }
    let resumed = match &args.resume {
        Some(dir) => {
            let ck = Checkpoint::load(dir, &cfg)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            if ck.step as usize >= args.steps {
                bail!(
                    "the checkpoint in {} is at step {}, not before --steps {}",
                    dir.display(),
                    ck.step,
                    args.steps
                );
            }
            if root {
                eprintln!("resuming from {} at step {}", dir.display(), ck.step);
            }
            Some(Arc::new(ck))
        }
        None => None,
    };
    let start_step = resumed.as_ref().map_or(0, |c| c.step as usize);
    let weights = Arc::new(match (&resumed, &args.init) {
        (Some(ck), _) => ck.weights.clone(),
        (None, Some(p)) => Weights::load(&cfg, p)?,
        (None, None) => Weights::random(&cfg, args.seed),
    });
    if let Some(h) = &hot {
        if let Some(bound) = h.entries.last().and_then(|e| e.1) {
            if let Some((i, s)) = ds
                .sequences()
                .iter()
                .enumerate()
                .find(|(_, s)| s.len() > bound)
            {
                bail!(
                    "--strategies: sequence {i} of the data has {} tokens, longer than every strategy                      takes (the last bound is {bound}; end the list with `STRATEGY:max`, or cut with --max-len)",
                    s.len()
                );
            }
        }
    }
    let ds = Arc::new(ds);
    for p in [&args.save, &args.metrics].into_iter().flatten() {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let mut metrics = match &args.metrics {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    if root {
        eprintln!(
        "hotspa train: {} parameters, {} sequences ({} too short, skipped) from {}, {} on {} {} devices{}, {} steps of {} sequences",
        weights.numel(),
        ds.sequences().len(),
        ds.skipped(),
        data_name,
        strategy,
        args.devices,
        args.device,
        if mpi.is_some() { " (one MPI process each)" } else { "" },
        args.steps,
        args.global_batch
    );
    }
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let r2 = resumed.clone();
    let h2 = hot.clone();
    let auto2 = auto.clone();
    let (a2, s2, c2, w2, d2) = (
        args.clone(),
        strategy.clone(),
        cfg.clone(),
        weights.clone(),
        ds.clone(),
    );
    let start = Instant::now();
    let mpi2 = mpi.clone();
    // Thread ranks share this process's cores: the clock counts how many compute at once.
    let share = match (&sim_cluster, &mpi) {
        (Some(c), None) if c.shared_cores > 0.0 => {
            Some(sim::CoreShare::new(args.devices, c.shared_cores))
        }
        _ => None,
    };
    let sim2 = sim_cluster.clone().map(|c| (c, share));
    let n_threads = args.devices;
    let worker = std::thread::spawn(move || -> anyhow::Result<Option<Collected>> {
        let one_rank = move |world: &dyn Communicator, ranks_here: usize| {
            let job = RankJob {
                args: &a2,
                strategy: &s2,
                cfg: &c2,
                weights: &w2,
                data: &d2,
                resumed: r2.as_deref(),
                start_step,
                shuffle,
                schedule,
                tx: &tx,
                hot: h2.as_deref(),
                auto: auto2.as_deref(),
                devices_per_node: a2.devices_per_node.unwrap_or(a2.devices),
            };
            match device {
                Device::Cpu => {
                    job.run_maybe_clocked(CpuBackend::for_ranks(ranks_here)?, world, sim2.as_ref())
                }
                Device::Cuda(precision) => {
                    let count = kernels::cuda::device_count()?;
                    let gpu = CudaBackend::new(world.rank().0 % count, precision)?;
                    job.run_maybe_clocked(gpu, world, sim2.as_ref())
                }
            }
        };
        match mpi2 {
            Some(world) => {
                // The ranks on this node share its cores.
                let node = world.nodes()[world.rank().0];
                let here = world.nodes().iter().filter(|&&n| n == node).count();
                one_rank(world.as_ref(), here)
            }
            None => {
                let n = n_threads;
                let mut all = ThreadComm::run(n, move |world| one_rank(&world, n))?;
                Ok(all.swap_remove(0))
            }
        }
    });
    let bar = if root {
        indicatif::ProgressBar::new(args.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(start_step as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?,
    );
    let mut total_tokens = 0u64;
    // (steps, measured seconds, simulated seconds) after the first step (warm-up).
    let mut timed = (0usize, 0.0f64, 0.0f64);
    for msg in rx {
        let line = match msg {
            Msg::Metrics(line) => line,
            Msg::Checkpoint { step, parts } => {
                let pick = |i: usize| -> Vec<(Vec<Vec<f32>>, model::Held)> {
                    parts
                        .iter()
                        .map(|(p, h)| (p[i].clone(), h.clone()))
                        .collect()
                };
                let ck = Checkpoint {
                    step,
                    weights: gather_weights(&cfg, &strategy, &pick(0))?,
                    exp_avg: gather_weights(&cfg, &strategy, &pick(1))?,
                    exp_avg_sq: gather_weights(&cfg, &strategy, &pick(2))?,
                    run: run_record(&args, &strategy),
                };
                if let Some(dir) = &args.checkpoint_dir {
                    let at = ck.save(dir, &cfg)?;
                    bar.suspend(|| eprintln!("checkpoint written to {}", at.display()));
                }
                continue;
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        total_tokens += v["tokens"].as_u64().unwrap_or(0);
        if let (Some(sim), true) = (
            v["simulated_seconds"].as_f64(),
            v["step"].as_u64().unwrap_or(0) > start_step as u64 + 1,
        ) {
            timed.0 += 1;
            timed.1 += v["seconds"].as_f64().unwrap_or(0.0);
            timed.2 += sim;
        }
        if let Some(f) = metrics.as_mut() {
            writeln!(f, "{line}")?;
        }
        if !bar.is_hidden() {
            bar.set_message(format!(
                "loss {:.4}  {:.0} tokens/s{}",
                v["loss"].as_f64().unwrap_or(f64::NAN),
                v["tokens_per_s"].as_f64().unwrap_or(0.0),
                hot_note(&v)
            ));
            bar.inc(1);
            continue;
        }
        // Not a terminal (a log, CI): one line per step instead of the bar.
        eprintln!(
            "step {:>5}/{}  loss {:.4}  grad_norm {:.3}  lr {:.2e}  {:.0} tokens/s{}",
            v["step"],
            args.steps,
            v["loss"].as_f64().unwrap_or(f64::NAN),
            v["grad_norm"].as_f64().unwrap_or(f64::NAN),
            v["lr"].as_f64().unwrap_or(0.0),
            v["tokens_per_s"].as_f64().unwrap_or(0.0),
            hot_note(&v)
        );
    }
    bar.finish_and_clear();
    let outcome = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the training threads panicked"))?;
    let collected = match (outcome, &mpi) {
        (Ok(c), _) => c,
        (Err(e), Some(world)) => {
            // Make every other process stop now rather than wait for this one.
            eprintln!(
                "Error: MPI rank {} of {}: {e:#}",
                world.rank().0,
                world.size()
            );
            world.abort(1)
        }
        (Err(e), None) => return Err(e),
    };
    let elapsed = start.elapsed().as_secs_f64();
    // Only world rank 0 gets everything; it writes the results.
    let Some((per_rank, peaks)) = collected else {
        return Ok(());
    };
    let trained = gather_weights(&cfg, &strategy, &per_rank)?;
    eprintln!(
        "done: {} steps in {elapsed:.2} s, {:.0} tokens/s; peak activation+gradient bytes per rank: {peaks:?}",
        args.steps - start_step,
        total_tokens as f64 / elapsed
    );
    if let (Some(c), true) = (&sim_cluster, timed.0 > 0) {
        let k = timed.0 as f64;
        eprintln!(
            "simulated on {}: {} per step (steps after the first; measured here {:.4} s, with the clocks' own messages)",
            c.name,
            seconds(timed.2 / k),
            timed.1 / k
        );
    }
    if runtime::profile::enabled() {
        eprintln!(
            "time per op kind (HOTSPA_PROFILE=1; every op waited for):\n{}",
            runtime::profile::report()
        );
    }
    if let Some(p) = &args.save {
        trained.save(p)?;
        eprintln!("weights written to {}", p.display());
    }
    if let Some(p) = &args.metrics {
        eprintln!("metrics written to {}", p.display());
    }
    Ok(())
}

/// Nodes as the switch planner sees them: blocks of consecutive ranks of one size.
fn mpi_devices_per_node(nodes: &[usize]) -> Result<usize> {
    let per = nodes.iter().filter(|&&n| n == nodes[0]).count().max(1);
    let blocks = nodes.iter().enumerate().all(|(r, &n)| n == r / per);
    if !blocks || !nodes.len().is_multiple_of(per) {
        bail!(
            "MPI placed the ranks on nodes as {nodes:?}; hotspa needs the same number of ranks on \
             every node, numbered node by node (mpirun's default --map-by slot, or --map-by ppr:N:node)"
        );
    }
    Ok(per)
}

/// Runs `hotspa train` from an argument list (the first element is `train`), as `bench step`
/// does.
pub fn run_argv(argv: &[String]) -> Result<()> {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(clap::Subcommand)]
    enum Sub {
        Train(Box<Args>),
    }
    let w = <Wrap as clap::Parser>::try_parse_from(
        std::iter::once("hotspa".to_string()).chain(argv.iter().cloned()),
    )?;
    let Sub::Train(args) = w.cmd;
    run(*args, false)
}

/// The hot-switching part of a step line: time per strategy and in switches, bytes switched.
/// A duration for people: seconds, or milliseconds/microseconds when short.
fn seconds(s: f64) -> String {
    if s >= 0.1 {
        format!("{s:.3} s")
    } else if s >= 1e-4 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} µs", s * 1e6)
    }
}

fn hot_note(v: &serde_json::Value) -> String {
    let sim = v["simulated_seconds"]
        .as_f64()
        .map_or(String::new(), |s| format!("  simulated {}", seconds(s)));
    let Some(per) = v["strategy_seconds"].as_object() else {
        return sim;
    };
    let parts: Vec<String> = per
        .iter()
        .map(|(k, s)| format!("{k} {:.3}s", s.as_f64().unwrap_or(0.0)))
        .collect();
    format!(
        "  [{}; switch {:.3}s {:.1} MB]{sim}",
        parts.join(", "),
        v["switch_seconds"].as_f64().unwrap_or(0.0),
        v["switch_bytes"].as_f64().unwrap_or(0.0) / 1e6
    )
}

/// `--sim-cluster`: the cluster, and the cores the thread ranks share.
type SimSetup = (Arc<planner::Cluster>, Option<Arc<sim::CoreShare>>);

/// Which backend the ranks run on.
#[derive(Clone, Copy)]
enum Device {
    Cpu,
    Cuda(GemmPrecision),
}
