//! Everything checked and loaded before the first step, in one place: the world (MPI or
//! threads), every number and strategy, every output path, the checkpoint directory's lock, the
//! data, a resumed checkpoint and whether its settings still mean the same, the memory the run
//! needs, and only then the weights.

use std::path::Path;
use std::sync::Arc;

use comm::Communicator;
use data::Dataset;
use graph::Strategy;
use model::{Checkpoint, Weights};
use planner::Planner;

use crate::checkpoints::CheckpointDir;
use crate::config::{Device, Init, StrategySpec, Tokenizer, TrainConfig};
use crate::error::{Result, TrainError};
use crate::inputs::{load, load_data, tokenizer};
use crate::metrics::Sink;

/// Everything loaded and decided before the ranks start.
pub(crate) struct Prepared {
    pub cfg: Arc<TrainConfig>,
    pub inst: Strategy,
    pub data: Arc<Dataset>,
    pub weights: Arc<Weights>,
    pub resumed: Option<Arc<Checkpoint>>,
    pub start_step: usize,
    pub planner: Option<Arc<Planner>>,
    pub devices_per_node: usize,
    pub mpi: Option<Arc<comm::MpiComm>>,
    /// World rank 0's hold on the checkpoint directory.
    pub checkpoints: Option<CheckpointDir>,
    /// The dtype the final weights are saved in.
    pub save_dtype: model::Dtype,
    /// The files saved model folders and checkpoints carry: the tokenizer's, and the model
    /// folder's `generation_config.json` (read once, here).
    pub tokenizer_files: Vec<model::CarriedFile>,
    /// The training data's fingerprint, recorded in checkpoints.
    pub data_sha256: String,
    /// World rank 0's locks on `--save` and `--metrics`, held until the run ends.
    pub _outputs: crate::outputs::Claimed,
    /// The held-out data of `--eval-data`.
    pub eval_data: Option<Arc<Dataset>>,
    /// A line saying what the run trains (model, data, strategy, devices, steps).
    pub summary: String,
}

impl Prepared {
    /// Whether this process reports and writes (world rank 0).
    pub fn root(&self) -> bool {
        self.mpi.as_ref().is_none_or(|w| w.rank().0 == 0)
    }
}

/// Sequences reaching past `max_position_embeddings` (allowed by a larger `--max-len`), said
/// before the data are used (by a run or an evaluation).
fn data_notices(cfg: &TrainConfig, data: &Dataset, sink: &mut dyn Sink) {
    let longest = data.sequences().iter().map(Vec::len).max().unwrap_or(0);
    let limit = cfg.model.max_position_embeddings;
    if longest > limit {
        sink.notice(&format!(
            "--max-len {}: sequences of up to {longest} tokens train at positions past the \
             model's max_position_embeddings ({limit}); RoPE goes on past it as in transformers, \
             but raise max_position_embeddings in config.json if the model is meant for them",
            cfg.max_len()
        ));
    }
}

/// A global batch larger than the dataset (every step then repeats sequences), said before a
/// run's first step.
pub(crate) fn batch_notice(cfg: &TrainConfig, data: &Dataset, sink: &mut dyn Sink) {
    let n = data.sequences().len();
    if cfg.global_batch > n {
        sink.notice(&format!(
            "the global batch ({}) is larger than the dataset ({n} sequence{}): every step \
             trains some sequences more than once",
            cfg.global_batch,
            if n == 1 { "" } else { "s" }
        ));
    }
}

/// Settings whose change makes a checkpoint's data position mean something else: the data's
/// content (its token sequences' fingerprint, whatever path or tokenizer file they came from)
/// and how batches are drawn from it.
const DATA_POSITION: [&str; 4] = ["data_sha256", "global_batch", "seed", "shuffle"];
/// The same for checkpoints written before the fingerprint (by path and settings).
const DATA_POSITION_BY_PATH: [&str; 6] = [
    "data",
    "tokenizer",
    "global_batch",
    "max_len",
    "seed",
    "shuffle",
];
/// Settings a resumed run may change, reported when it does.
const REPORTED: [&str; 17] = [
    "sync",
    "grad_compression",
    "error_feedback",
    "compress_cross_node_only",
    "allreduce",
    "steps",
    "lr",
    "lr_schedule",
    "warmup",
    "min_lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "grad_clip",
    "strategy",
    "devices",
];

/// `key: saved → now` for each of `keys` whose value differs (keys the checkpoint lacks are
/// not compared: older checkpoints).
fn changed(keys: &[&str], saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    keys.iter()
        .filter(|k| saved.get(**k).is_some() && saved[**k] != now[**k])
        .map(|k| format!("{k}: {} → {}", saved[*k], now[*k]))
        .collect()
}

/// Resolves the world, checks everything, loads the data, the weights and a resumed
/// checkpoint, and decides the instantiation strategy.
pub(crate) fn prepare(cfg: &TrainConfig, sink: &mut dyn Sink) -> Result<Prepared> {
    let mut cfg = cfg.clone();
    // Every blocking call's limit, checked before it is relied on.
    comm::timeout_from_env()?;
    if let Device::Cuda(precision) = cfg.device {
        // Fail before any data is read when the backend cannot open.
        let gpus = kernels::cuda::device_count()?;
        sink.notice(&format!(
            "cuda: {gpus} GPU(s); rank r runs on GPU r mod {gpus}; GEMMs in {precision}"
        ));
    }
    let mpi = mpi_world(&mut cfg)?;
    let root = mpi.as_ref().is_none_or(|w| w.rank().0 == 0);
    let mut quiet = crate::metrics::NoSink;
    let sink: &mut dyn Sink = if root { sink } else { &mut quiet };
    let local = checked(cfg, mpi.clone(), root, sink);
    match &mpi {
        None => local,
        // Every rank's verdict and settings, shared before any rank starts.
        Some(world) => crate::agreement::agree(world.as_ref(), local, settings),
    }
}

/// What every MPI rank must share: the run's record without its paths, the model config, the
/// strategies, and the initial weights and held-out data by content.
fn settings(p: &Prepared) -> serde_json::Value {
    let c = &p.cfg;
    crate::agreement::comparable(
        c.record(&p.inst, &p.data_sha256),
        &[
            (
                "model_config",
                serde_json::to_value(&c.model).unwrap_or_default(),
            ),
            ("strategies", format!("{:?}", c.strategy).into()),
            (
                "pipeline_schedule",
                format!("{:?}", c.pipeline_schedule).into(),
            ),
            (
                "initial_weights",
                crate::agreement::weights_fingerprint(&p.weights).into(),
            ),
            ("start_step", p.start_step.into()),
            (
                "eval_data",
                p.eval_data
                    .as_ref()
                    .map(|d| d.fingerprint())
                    .unwrap_or_default()
                    .into(),
            ),
            ("slow_ranks", format!("{:?}", c.slow_ranks).into()),
            (
                "sim_cluster",
                c.simulate
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default()
                    .into(),
            ),
            ("devices_per_node", p.devices_per_node.into()),
            (
                "checkpoint_every",
                c.checkpoint.as_ref().and_then(|k| k.every).into(),
            ),
            ("eval_every", c.eval.as_ref().and_then(|e| e.every).into()),
            ("exchange", format!("{:?}", c.exchange).into()),
        ],
    )
}

/// Everything of [`prepare`] after the world is known: each check and load of this rank.
fn checked(
    cfg: TrainConfig,
    mpi: Option<Arc<comm::MpiComm>>,
    root: bool,
    sink: &mut dyn Sink,
) -> Result<Prepared> {
    cfg.check()?;
    if mpi.is_none() {
        crate::resources::check_threads(cfg.world_size(), kernels::available_cores())?;
    }
    if cfg.resume.is_some() && !matches!(cfg.init, Init::Random) {
        return Err(TrainError::setting(
            "init",
            "a resumed run continues from the checkpoint's weights; drop --init (or --resume)",
        ));
    }
    // Every output path, before anything is read or computed (rank 0 writes them all): where
    // each lies against the inputs and the others, what is there already, and a lock on each.
    let mut checkpoints = None;
    let mut claimed = crate::outputs::Claimed::default();
    if root {
        claimed = crate::outputs::claim(&cfg, cfg.resume.is_some())?;
        crate::resources::check_disk(&crate::resources::disk_need(&cfg))?;
        if let Some(c) = &cfg.checkpoint {
            use crate::outputs::{checkpoint_home, resolve};
            let resuming = cfg
                .resume
                .as_ref()
                .is_some_and(|r| resolve(&checkpoint_home(r)) == resolve(&c.dir));
            checkpoints = Some(CheckpointDir::open(
                &c.dir,
                c.keep_last,
                resuming,
                cfg.force,
            )?);
        }
    }
    let data = load_data(&cfg)?;
    let data_sha256 = data.fingerprint();
    data_notices(&cfg, &data, sink);
    let eval_data = match &cfg.eval {
        Some(e) => Some(Arc::new(load(&cfg, &e.data)?)),
        None => None,
    };
    let (inst, planner, strategies) = decide(&cfg, &data, sink)?;
    check_two_bw_batches(&cfg, &data, &inst)?;
    exchange_notices(&cfg, &strategies, planner.is_some(), sink);
    let resumed = match &cfg.resume {
        Some(dir) => Some(Arc::new(resume(&cfg, dir, &inst, &data_sha256, sink)?)),
        None => None,
    };
    if let Some(ck) = &resumed {
        let e = &cfg.exchange;
        let kept = ck.state.len();
        if kept > 0 && (e.codec == comm::codec::Codec::None || !e.error_feedback) {
            sink.notice(&format!(
                "the checkpoint holds {kept} vectors of gradient-exchange state (error-feedback \
                 residuals, warm starts) that --grad-compression {} --error-feedback {} does not \
                 use",
                e.codec,
                if e.error_feedback { "on" } else { "off" }
            ));
        }
    }
    let start_step = resumed.as_ref().map_or(0, |c| c.step as usize);
    if root && mpi.is_some() {
        if let Some(n) = sigkill_notice(&cfg) {
            sink.notice(&n);
        }
    }
    let ranks_here = if mpi.is_some() { 1 } else { cfg.devices };
    let strategy_refs: Vec<&Strategy> = strategies.iter().collect();
    let need =
        crate::resources::memory_need(&cfg, &inst, &strategy_refs, ranks_here, resumed.is_some())?;
    crate::resources::check_memory(&need, crate::resources::available_memory())?;
    let (weights, dtype) = match (&resumed, &cfg.init) {
        (Some(ck), _) => (ck.weights.clone(), model::Dtype::F32),
        (None, Init::File(p)) => {
            let (w, d, checked) = model::load_weights_checked(&cfg.model, p)?;
            sink.notice(&format!(
                "initial weights from {} ({d}; {checked})",
                p.display()
            ));
            (w, d)
        }
        (None, Init::Weights(w)) => ((**w).clone(), model::Dtype::F32),
        (None, Init::Random) => {
            sink.notice(&format!(
                "initial weights: random (normal with std {} from seed {}; norms 1)",
                cfg.model.initializer_range, cfg.seed
            ));
            (
                Weights::try_random(&cfg.model, cfg.seed)?,
                model::Dtype::F32,
            )
        }
    };
    let weights = Arc::new(weights);
    let save_dtype = cfg.save_dtype.unwrap_or(dtype);
    let mut tokenizer_files = match &cfg.tokenizer {
        Tokenizer::File(_) => tokenizer(&cfg)?.files(),
        Tokenizer::Bytes => Vec::new(),
    };
    // The model folder's generation settings travel with the weights, as transformers'
    // save_pretrained keeps them (the written folder's own file holds only its token ids).
    if let Some(g) = cfg
        .model_path
        .as_ref()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent().map(Path::to_path_buf).unwrap_or_default()
            }
        })
        .map(|d| d.join("generation_config.json"))
        .filter(|g| g.is_file())
    {
        tokenizer_files.push(g);
    }
    let tokenizer_files = tokenizer_files
        .iter()
        .map(|f| model::CarriedFile::read(f))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let summary = format!(
        "hotspa train: {} parameters, {} sequences ({} too short, skipped), {} on {} {} devices{}, {} steps of {} sequences",
        weights.numel(),
        data.sequences().len(),
        data.skipped(),
        inst,
        cfg.devices,
        match cfg.device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        },
        if mpi.is_some() { " (one MPI process each)" } else { "" },
        cfg.steps,
        cfg.global_batch
    );
    let summary = match cfg.ps {
        Some(ps) => format!(
            "{summary}; {} parameter server(s) ({}) as the first ranks (0..{}), workers after them, {}",
            ps.servers,
            ps.placement,
            ps.servers - 1,
            cfg.sync
        ),
        None => summary,
    };
    // Thread ranks sit on one node unless told otherwise (or simulated on a cluster's nodes).
    let devices_per_node = cfg
        .devices_per_node
        .or(cfg
            .simulate
            .as_ref()
            .map(|c| c.devices_per_node.min(cfg.devices)))
        .unwrap_or(cfg.devices);
    Ok(Prepared {
        cfg: Arc::new(cfg),
        inst,
        data: Arc::new(data),
        weights,
        resumed,
        start_step,
        planner,
        devices_per_node,
        mpi,
        checkpoints,
        save_dtype,
        tokenizer_files,
        data_sha256,
        _outputs: claimed,
        eval_data,
        summary,
    })
}

/// Says where a gradient-exchange setting changes nothing in this run (no strategy with DP,
/// every rank on one node, ...), so that no flag is taken silently.
/// PipeDream-2BW finishes a step's last backwards inside the next step, which needs at least
/// `pp − 1` micro-batches on every replica: every step's batch is dealt and packed (lengths
/// only) before the first, so that a short batch deep in the run is refused now, naming it.
fn check_two_bw_batches(cfg: &TrainConfig, data: &Dataset, s: &graph::Strategy) -> Result<()> {
    if !cfg.pipeline_schedule.flushless() || s.pp < 2 {
        return Ok(());
    }
    let packing = cfg.packing_of(0);
    for step in 0..cfg.steps {
        let lens: Vec<usize> = data
            .batch(step, cfg.global_batch, cfg.shuffle_seed())
            .iter()
            .map(Vec::len)
            .collect();
        let fewest = packing
            .deal(&lens, s.dp)
            .iter()
            .map(|mine| packing.micro_batches(&lens, mine, usize::MAX).len())
            .min()
            .unwrap_or(0);
        if fewest + 1 < s.pp {
            return Err(TrainError::setting(
                "pipeline_schedule",
                format!(
                    "pipedream-2bw on {} stages needs at least {} micro-batch(es) per step on every \
                     replica (the last step's backwards finish inside the next one); step {} \
                     gives a replica {fewest}: lower --micro-batch-tokens or raise --global-batch",
                    s.pp,
                    s.pp - 1,
                    step + 1
                ),
            ));
        }
    }
    Ok(())
}

fn exchange_notices(
    cfg: &TrainConfig,
    strategies: &[Strategy],
    planned: bool,
    sink: &mut dyn Sink,
) {
    use comm::codec::Codec;
    use planner::exchange::AlgorithmChoice;
    let e = &cfg.exchange;
    let default = planner::exchange::Exchange::default();
    if *e == default {
        return;
    }
    let with_dp: Vec<&Strategy> = strategies.iter().filter(|s| s.replicas() > 1).collect();
    if with_dp.is_empty() && !planned {
        sink.notice(&format!(
            "gradient exchange {e}: no strategy of this run has DP > 1, so no gradients are \
             exchanged and it changes nothing"
        ));
        return;
    }
    if e.codec == Codec::None && !e.error_feedback {
        sink.notice("--error-feedback off: there is no codec (--grad-compression none), nothing to feed back");
    }
    let one_node = cfg.devices_per_node.unwrap_or(cfg.devices) >= cfg.devices
        && cfg
            .simulate
            .as_ref()
            .is_none_or(|c| c.devices_per_node >= cfg.devices);
    if e.cross_node_only && one_node {
        sink.notice(
            "--compress-cross-node-only: every rank is on one node (see --devices-per-node), so \
             the exchange stays exact",
        );
    }
    if e.algorithm == AlgorithmChoice::Fixed(comm::allreduce::Algorithm::Hierarchical) && one_node {
        sink.notice("--allreduce hier: every rank is on one node, so it runs as the ring");
    }
    if with_dp.iter().any(|s| s.zero >= graph::Zero::Gradients) {
        sink.notice(&format!(
            "ZeRO-2/3 reduce-scatters each gradient: by the ring whatever --allreduce says{}",
            if (e.codec.is_dense() && !e.cross_node_only) || e.codec == Codec::None {
                String::new()
            } else {
                format!(
                    ", and {} reduces the whole gradient before this rank keeps its slice",
                    e.codec
                )
            }
        ));
    }
}

/// Under `mpirun` (more than one process): the MPI world, whose size is the device count and
/// whose placement says which ranks share a node.
fn mpi_world(cfg: &mut TrainConfig) -> Result<Option<Arc<comm::MpiComm>>> {
    let Some((_, world_size)) = comm::mpi::launch().filter(|&(_, size)| size > 1) else {
        return Ok(None);
    };
    // The parameter servers are ranks too: the first `servers` of the world.
    let servers = cfg.ps.map_or(0, |p| p.servers);
    let size = world_size.saturating_sub(servers);
    if size == 0 {
        return Err(TrainError::setting(
            "ps_servers",
            format!(
                "{servers} servers leave no workers in the MPI world of {world_size} processes"
            ),
        ));
    }
    if cfg.devices != 1 && cfg.devices != size {
        return Err(TrainError::setting(
            "devices",
            format!(
                "{} conflicts with the MPI world of {world_size} processes (mpirun -np \
                 {world_size}, {servers} of them parameter servers): under mpirun every process \
                 is one rank; drop --devices or make them agree",
                cfg.devices
            ),
        ));
    }
    cfg.devices = size;
    let world = comm::MpiComm::init()?;
    let per_node = mpi_devices_per_node(&world.nodes()[servers..])?;
    if let Some(d) = cfg.devices_per_node.filter(|&d| d != per_node) {
        return Err(TrainError::setting(
            "devices_per_node",
            format!("{d} conflicts with MPI's placement ({per_node} ranks per node)"),
        ));
    }
    cfg.devices_per_node = Some(per_node);
    Ok(Some(Arc::new(world)))
}

/// The instantiation strategy, the planner of automatic planning, and every strategy the run
/// may use; checks that every sequence has a strategy.
fn decide(
    cfg: &TrainConfig,
    data: &Dataset,
    sink: &mut dyn Sink,
) -> Result<(Strategy, Option<Arc<Planner>>, Vec<Strategy>)> {
    Ok(match &cfg.strategy {
        StrategySpec::Fixed(s) => (s.clone(), None, vec![s.clone()]),
        StrategySpec::Hot(plan) => {
            let list: Vec<String> = plan
                .buckets
                .iter()
                .map(|(e, s)| {
                    let bound = if *e == usize::MAX {
                        "any".to_string()
                    } else {
                        e.to_string()
                    };
                    format!("{s} (≤ {bound})")
                })
                .collect();
            sink.notice(&format!(
                "hot switching: {}; {} holds the weights and the optimizer (least model state per device)",
                list.join(", "),
                plan.inst
            ));
            if let Some((i, s)) = data
                .sequences()
                .iter()
                .enumerate()
                .find(|(_, s)| plan.bucket_of(s.len()).is_none())
            {
                return Err(TrainError::setting(
                    "strategies",
                    format!(
                        "sequence {i} of the data has {} tokens, longer than every strategy takes \
                         (the last bound is {}; end the list with `STRATEGY:max`, or cut with --max-len)",
                        s.len(),
                        plan.buckets.last().map_or(0, |b| b.0)
                    ),
                ));
            }
            let all = plan.strategies().into_iter().cloned().collect();
            (plan.inst.clone(), None, all)
        }
        StrategySpec::Auto(auto) => {
            let planner = crate::planning::planner(cfg, auto.cluster.clone());
            // Planned on the run's first batch whatever step it resumes at, so that a resumed
            // run keeps the optimizer in the same layout.
            let first: Vec<usize> = data
                .batch(0, cfg.global_batch, cfg.shuffle_seed())
                .iter()
                .map(Vec::len)
                .collect();
            let (plan, _) = planner.auto(&first).map_err(crate::planning::plan_error)?;
            sink.notice(&format!(
                "automatic planning: {} holds the weights and the optimizer; each step's strategies \
                 and bucket edges come from the cost model",
                plan.inst
            ));
            let all = plan.strategies().into_iter().cloned().collect();
            (plan.inst.clone(), Some(Arc::new(planner)), all)
        }
    })
}

/// Loads (and verifies) the checkpoint in `dir`, refusing one whose settings give its data
/// position another meaning (unless forced) and reporting changed optimizer settings.
fn resume(
    cfg: &TrainConfig,
    dir: &Path,
    inst: &Strategy,
    data_sha256: &str,
    sink: &mut dyn Sink,
) -> Result<Checkpoint> {
    let ck = Checkpoint::load(dir, &cfg.model).map_err(|source| TrainError::Resume {
        dir: dir.to_path_buf(),
        source,
    })?;
    if ck.step as usize >= cfg.steps {
        return Err(TrainError::setting(
            "resume",
            format!(
                "the checkpoint in {} is at step {}, not before the run's {} steps",
                dir.display(),
                ck.step,
                cfg.steps
            ),
        ));
    }
    let now = cfg.record(inst, data_sha256);
    let keys: &[&str] = if ck.run.get("data_sha256").is_some() {
        &DATA_POSITION
    } else {
        &DATA_POSITION_BY_PATH
    };
    let breaking = changed(keys, &ck.run, &now);
    if !breaking.is_empty() {
        if !cfg.force {
            return Err(TrainError::setting(
                "resume",
                format!(
                    "the checkpoint in {} was written by a run whose data position means something \
                     else now ({}); resume with the same settings, or pass --force to continue anyway",
                    dir.display(),
                    breaking.join("; ")
                ),
            ));
        }
        sink.notice(&format!(
            "--force: resuming although the data position changed meaning ({})",
            breaking.join("; ")
        ));
    }
    let other = changed(&REPORTED, &ck.run, &now);
    if !other.is_empty() {
        sink.notice(&format!(
            "resuming with changed settings: {}",
            other.join("; ")
        ));
    }
    sink.notice(&format!(
        "resuming from {} at step {}",
        dir.display(),
        ck.step
    ));
    Ok(ck)
}

/// Under Open MPI's `mpirun`, a signal to mpirun reaches the ranks as SIGTERM and is followed by
/// SIGKILL `odls_base_sigkill_timeout` seconds later (1 by default): what a run can save in that
/// window. Said when a checkpoint (and the step before it) would not fit.
fn sigkill_notice(cfg: &TrainConfig) -> Option<String> {
    std::env::var("OMPI_COMM_WORLD_SIZE").ok()?;
    let window: f64 = std::env::var("OMPI_MCA_odls_base_sigkill_timeout")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1.0);
    // A checkpoint: weights and both moments gathered on rank 0 and written (at ~200 MB/s), plus
    // the step in flight (unknown before the first; a second at least).
    let params: f64 = model::param_specs(&cfg.model)
        .iter()
        .map(|s| s.numel() as f64)
        .sum();
    let need = 1.0 + 12.0 * params / 200e6;
    (cfg.checkpoint.is_some() && window < need).then(|| {
        format!(
            "under mpirun a signal leaves the ranks {window} s before Open MPI kills them \
             (odls_base_sigkill_timeout), and finishing a step and writing a checkpoint of this \
             model takes about {need:.0} s or more: launch with `mpirun --mca \
             odls_base_sigkill_timeout {}` (or longer than a step) for a signal to leave a \
             checkpoint",
            (4.0 * need).ceil().max(30.0)
        )
    })
}

/// Nodes as the switch planner sees them: blocks of consecutive ranks of one size.
fn mpi_devices_per_node(nodes: &[usize]) -> Result<usize> {
    let Some(&first) = nodes.first() else {
        return Ok(1);
    };
    let per = nodes.iter().filter(|&&n| n == first).count().max(1);
    let blocks = nodes.iter().enumerate().all(|(r, &n)| n == r / per);
    if !blocks || !nodes.len().is_multiple_of(per) {
        return Err(TrainError::setting(
            "devices_per_node",
            format!(
                "MPI placed the ranks on nodes as {nodes:?}; hotspa needs the same number of ranks \
                 on every node, numbered node by node (mpirun's default --map-by slot, or --map-by ppr:N:node)"
            ),
        ));
    }
    Ok(per)
}
