//! A whole run: everything checked and loaded before the first step, the ranks started (thread
//! ranks in this process, or this process's rank under `mpirun`), their reports sent to the
//! sinks, checkpoints and the final weights written.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use comm::{Communicator, ThreadComm};
use data::{Dataset, TextTokenizer};
use graph::Strategy;
use kernels::{CpuBackend, CudaBackend};
use model::{gather_weights, Checkpoint, Weights};
use planner::Planner;
use runtime::{ExactAllReduce, GradientAgreement};

use crate::config::{DataSource, Device, Init, StrategySpec, Tokenizer, TrainConfig};
use crate::error::{Result, TrainError};
use crate::metrics::{Fanout, JsonLines, Sink, StepMetrics};
use crate::rank::{Collected, Job, Msg};

/// What a run did (complete on world rank 0; other MPI ranks get no weights or steps).
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained weights (world rank 0).
    pub weights: Option<Weights>,
    /// The strategy that held the weights and the optimizer.
    pub inst: Strategy,
    /// The step the run started at (0, or the resumed checkpoint's).
    pub start_step: usize,
    /// Every step's metrics (world rank 0).
    pub steps: Vec<StepMetrics>,
    /// Wall seconds from the first step to the end.
    pub seconds: f64,
    /// Every rank's peak activation and gradient bytes.
    pub peak_bytes: Vec<usize>,
    /// Where checkpoints were written, in order.
    pub checkpoints: Vec<std::path::PathBuf>,
}

impl TrainOutcome {
    /// Tokens trained per second over the run.
    pub fn tokens_per_s(&self) -> f64 {
        let tokens: u64 = self.steps.iter().map(|m| m.tokens).sum();
        tokens as f64 / self.seconds.max(1e-12)
    }
}

/// Everything loaded and decided before the ranks start.
struct Prepared {
    cfg: Arc<TrainConfig>,
    inst: Strategy,
    data: Arc<Dataset>,
    weights: Arc<Weights>,
    resumed: Option<Arc<Checkpoint>>,
    start_step: usize,
    planner: Option<Arc<Planner>>,
    devices_per_node: usize,
    mpi: Option<Arc<comm::MpiComm>>,
}

/// Trains as `cfg` says, sending reports to `sink`. Under `mpirun` (more than one process)
/// this process is one rank and the world size is the device count.
pub fn run(cfg: &TrainConfig, sink: &mut dyn Sink) -> Result<TrainOutcome> {
    let p = prepare(cfg, sink)?;
    let root = p.mpi.as_ref().is_none_or(|w| w.rank().0 == 0);
    let mut file = match (&p.cfg.metrics, root) {
        (Some(path), true) => {
            create_parent(path)?;
            Some(JsonLines::create(path)?)
        }
        _ => None,
    };
    let mut sinks: Vec<&mut dyn Sink> = vec![sink];
    if let Some(f) = file.as_mut() {
        sinks.push(f);
    }
    let mut sink = Fanout(sinks);
    if root {
        sink.start(p.start_step, p.cfg.steps);
    }
    if let Some(save) = &p.cfg.save {
        create_parent(save)?;
    }
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let job = Arc::new(Job {
        cfg: p.cfg.clone(),
        inst: p.inst.clone(),
        weights: p.weights.clone(),
        data: p.data.clone(),
        resumed: p.resumed.clone(),
        start_step: p.start_step,
        planner: p.planner.clone(),
        devices_per_node: p.devices_per_node,
        agreement: Arc::new(ExactAllReduce) as Arc<dyn GradientAgreement>,
        tx,
    });
    let start = Instant::now();
    let mpi = p.mpi.clone();
    let device = p.cfg.device;
    let devices = p.cfg.devices;
    let simulate = p.cfg.simulate.clone().map(Arc::new);
    let worker = std::thread::spawn(move || -> Result<Option<Collected>> {
        // Thread ranks share this process's cores: the clock counts how many compute at once.
        let share = match (&simulate, &mpi) {
            (Some(c), None) if c.shared_cores > 0.0 => {
                Some(sim::CoreShare::new(devices, c.shared_cores))
            }
            _ => None,
        };
        let one_rank = move |world: &dyn Communicator, ranks_here: usize| -> Result<_> {
            let sim = simulate.as_ref().map(|c| (c.clone(), share.clone()));
            match device {
                Device::Cpu => run_clocked(
                    &job,
                    CpuBackend::for_ranks(ranks_here)?,
                    world,
                    sim.as_ref(),
                ),
                Device::Cuda(precision) => {
                    let count = kernels::cuda::device_count()?;
                    let gpu = CudaBackend::new(world.rank().0 % count, precision)?;
                    run_clocked(&job, gpu, world, sim.as_ref())
                }
            }
        };
        match mpi {
            Some(world) => {
                // The ranks on this node share its cores.
                let node = world.nodes()[world.rank().0];
                let here = world.nodes().iter().filter(|&&n| n == node).count();
                one_rank(world.as_ref(), here)
            }
            None => {
                let mut all = ThreadComm::run(devices, move |world| one_rank(&world, devices))?;
                Ok(all.swap_remove(0))
            }
        }
    });
    let mut steps = Vec::new();
    let mut checkpoints = Vec::new();
    let mut failure: Option<TrainError> = None;
    for msg in rx {
        if failure.is_some() {
            continue;
        }
        let r = match msg {
            Msg::Step(m) => {
                let r = sink.step(&m);
                steps.push(m);
                r
            }
            Msg::Checkpoint { step, parts } => write_checkpoint(&p, step, &parts).map(|at| {
                sink.checkpoint(step, &at);
                checkpoints.push(at);
            }),
        };
        if let Err(e) = r {
            failure = Some(e);
        }
    }
    let outcome = worker.join().map_err(|_| TrainError::Rank {
        rank: 0,
        reason: "the training threads panicked".into(),
    })?;
    let collected = match (outcome, &p.mpi) {
        (Ok(c), _) => c,
        (Err(e), Some(world)) => {
            // Make every other process stop now rather than wait for this one.
            eprintln!(
                "Error: MPI rank {} of {}: {e}",
                world.rank().0,
                world.size()
            );
            world.abort(1)
        }
        (Err(e), None) => return Err(e),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut out = TrainOutcome {
        weights: None,
        inst: p.inst.clone(),
        start_step: p.start_step,
        steps,
        seconds,
        peak_bytes: Vec::new(),
        checkpoints,
    };
    // Only world rank 0 gets everything; it writes the results.
    let Some((per_rank, peaks)) = collected else {
        return Ok(out);
    };
    let trained = gather_weights(&p.cfg.model, &p.inst, &per_rank)?;
    if let Some(path) = &p.cfg.save {
        trained.save(path)?;
    }
    out.weights = Some(trained);
    out.peak_bytes = peaks;
    Ok(out)
}

/// One rank's loop on `be` and `world`, or, when simulating, on both wrapped in the
/// simulator's clocked backend and communicator.
fn run_clocked<B: kernels::Backend>(
    job: &Job,
    be: B,
    world: &dyn Communicator,
    sim: Option<&(Arc<planner::Cluster>, Option<Arc<sim::CoreShare>>)>,
) -> Result<Option<Collected>> {
    match sim {
        None => job.run(&be, world, None),
        Some((cluster, share)) => {
            let clock = sim::Clock::new();
            let mut be = sim::SimBackend::new(be, cluster, clock.clone());
            let mut world = sim::SimComm::over(world, cluster, clock.clone())?;
            if let Some(share) = share {
                be = be.sharing(share.clone());
                world = world.sharing(share.clone());
            }
            job.run(&be, &world, Some(&clock))
        }
    }
}

fn write_checkpoint(
    p: &Prepared,
    step: u64,
    parts: &[crate::rank::RankPart],
) -> Result<std::path::PathBuf> {
    let pick = |i: usize| -> Vec<(Vec<Vec<f32>>, model::Held)> {
        parts
            .iter()
            .map(|(sets, h)| (sets[i].clone(), h.clone()))
            .collect()
    };
    let model = &p.cfg.model;
    let ck = Checkpoint {
        step,
        weights: gather_weights(model, &p.inst, &pick(0))?,
        exp_avg: gather_weights(model, &p.inst, &pick(1))?,
        exp_avg_sq: gather_weights(model, &p.inst, &pick(2))?,
        run: p.cfg.record(&p.inst),
    };
    let dir = p
        .cfg
        .checkpoint
        .as_ref()
        .map(|c| c.dir.clone())
        .ok_or_else(|| TrainError::setting("checkpoint_dir", "no checkpoint directory"))?;
    Ok(ck.save(&dir, model)?)
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    Ok(())
}

/// Resolves the world (MPI or threads), checks the configuration, loads the data, the weights
/// and a resumed checkpoint, and decides the instantiation strategy.
fn prepare(cfg: &TrainConfig, sink: &mut dyn Sink) -> Result<Prepared> {
    let mut cfg = cfg.clone();
    if let Device::Cuda(precision) = cfg.device {
        // Fail before any data is read when the backend cannot open.
        let gpus = kernels::cuda::device_count()?;
        sink.notice(&format!(
            "cuda: {gpus} GPU(s); rank r runs on GPU r mod {gpus}; GEMMs in {precision}"
        ));
    }
    // Under mpirun: one rank per process, the world size is the device count, and MPI says
    // which ranks share a node.
    let mpi = match comm::mpi::launch() {
        Some((_, size)) if size > 1 => {
            if cfg.devices != 0 && cfg.devices != 1 && cfg.devices != size {
                return Err(TrainError::setting(
                    "devices",
                    format!(
                        "{} conflicts with the MPI world of {size} processes (mpirun -np {size}): \
                         under mpirun every process is one rank; drop --devices or make them agree",
                        cfg.devices
                    ),
                ));
            }
            cfg.devices = size;
            let world = comm::MpiComm::init()?;
            let per_node = mpi_devices_per_node(world.nodes())?;
            if let Some(d) = cfg.devices_per_node.filter(|&d| d != per_node) {
                return Err(TrainError::setting(
                    "devices_per_node",
                    format!("{d} conflicts with MPI's placement ({per_node} ranks per node)"),
                ));
            }
            cfg.devices_per_node = Some(per_node);
            Some(Arc::new(world))
        }
        _ => None,
    };
    let root = mpi.as_ref().is_none_or(|w| w.rank().0 == 0);
    let mut quiet = crate::metrics::NoSink;
    let sink: &mut dyn Sink = if root { sink } else { &mut quiet };
    if cfg.devices == 0 {
        cfg.devices = 1;
    }
    cfg.check()?;
    let data = load_data(&cfg)?;
    let (inst, planner) = match &cfg.strategy {
        StrategySpec::Fixed(s) => (s.clone(), None),
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
            (plan.inst.clone(), None)
        }
        StrategySpec::Auto(cluster) => {
            let planner = crate::planning::planner(&cfg, (**cluster).clone());
            // Planned on the run's first batch whatever step it resumes at, so that a resumed
            // run keeps the optimizer in the same layout.
            let first: Vec<usize> = data
                .batch(0, cfg.global_batch, cfg.shuffle_seed())
                .iter()
                .map(Vec::len)
                .collect();
            let (plan, _) = planner.auto(&first)?;
            sink.notice(&format!(
                "automatic planning: {} holds the weights and the optimizer; each step's strategies \
                 and bucket edges come from the cost model",
                plan.inst
            ));
            (plan.inst, Some(Arc::new(planner)))
        }
    };
    let resumed = match &cfg.resume {
        Some(dir) => {
            let ck = Checkpoint::load(dir, &cfg.model).map_err(|source| TrainError::Resume {
                dir: dir.clone(),
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
            sink.notice(&format!(
                "resuming from {} at step {}",
                dir.display(),
                ck.step
            ));
            Some(Arc::new(ck))
        }
        None => None,
    };
    let start_step = resumed.as_ref().map_or(0, |c| c.step as usize);
    let weights = Arc::new(match (&resumed, &cfg.init) {
        (Some(ck), _) => ck.weights.clone(),
        (None, Init::File(p)) => Weights::load(&cfg.model, p)?,
        (None, Init::Weights(w)) => (**w).clone(),
        (None, Init::Random) => Weights::random(&cfg.model, cfg.seed),
    });
    sink.notice(&format!(
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
    ));
    let devices_per_node = cfg.devices_per_node.unwrap_or(cfg.devices);
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
    })
}

/// The run's dataset: its files (or sequences) tokenized and cut to the run's `max_len`.
pub fn load_data(cfg: &TrainConfig) -> Result<Dataset> {
    let max_len = cfg.max_len();
    Ok(match &cfg.data {
        DataSource::Files(files) => Dataset::from_text_files(files, max_len)?,
        DataSource::Path(path) => {
            let tokenizer = match &cfg.tokenizer {
                Tokenizer::Bytes => TextTokenizer::Bytes,
                Tokenizer::File(t) => TextTokenizer::from_file(t)?,
            };
            Dataset::load_with(path, cfg.model.vocab_size, max_len, &tokenizer)?
        }
        DataSource::Sequences(seqs) => {
            Dataset::from_sequences(seqs, cfg.model.vocab_size, max_len)?
        }
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
