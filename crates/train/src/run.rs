//! A whole run: prepared and checked ([`crate::prepare`]), the ranks started (thread ranks in
//! this process, or this process's rank under `mpirun`), their reports sent to the sinks,
//! checkpoints and the final weights written — and no rank able to hang it.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm::{Communicator, ThreadComm};
use graph::Strategy;
use kernels::{CpuBackend, CudaBackend};
use model::{gather_weights, Checkpoint, Weights};

use crate::config::{Device, TrainConfig};
use crate::error::{Result, TrainError};
use crate::job::{Collected, Job, Msg};
use crate::metrics::{Fanout, JsonLines, Sink, StepMetrics};
use crate::prepare::{prepare, Prepared};
use crate::watchdog::{Fault, Heartbeats};

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
    /// The run stopped early when asked to ([`TrainConfig::stop`]), after this many steps.
    pub stopped_at: Option<usize>,
    /// Under the parameter server: every worker step this process saw, in the order they
    /// were reported (thread ranks: every worker's).
    pub worker_steps: Vec<crate::metrics::WorkerStep>,
    /// Under ASP or SSP: the workers of this process that left after a failed step.
    pub lost_workers: Vec<usize>,
}

impl TrainOutcome {
    /// Tokens trained per second over the run.
    pub fn tokens_per_s(&self) -> f64 {
        let tokens: u64 = self.steps.iter().map(|m| m.tokens).sum();
        tokens as f64 / self.seconds.max(1e-12)
    }
}

/// Trains as `cfg` says, sending reports to `sink`. Under `mpirun` (more than one process)
/// this process is one rank and the world size is the device count.
///
/// A rank that fails ends the run promptly; one that stops making progress (stuck in compute
/// or I/O, or in communication past the timeout) ends it within the communication timeout plus
/// a margin, naming it. Its thread cannot be killed: it is left behind, and a program that
/// goes on after such an error should exit soon (the CLI does).
pub fn run(cfg: &TrainConfig, sink: &mut dyn Sink) -> Result<TrainOutcome> {
    let fault = Fault::from_env()?;
    let p = prepare(cfg, sink)?;
    let root = p.root();
    let buckets = crate::planning::BucketSizer::of(&p.cfg, p.devices_per_node);
    if root {
        crate::prepare::batch_notice(&p.cfg, &p.data, sink);
        sink.notice(&p.summary);
        if let crate::planning::BucketSizer::Auto(cost) = &buckets {
            sink.notice(&format!(
                "gradient buckets (auto, by the α–β model of each DP group on {}): {:.3} MiB under {}",
                cost.cluster.name,
                buckets.bytes(&p.inst) as f64 / 1048576.0,
                p.inst
            ));
        }
    }
    let mut file = match (&p.cfg.metrics, root) {
        (Some(path), true) if p.start_step > 0 => {
            let (f, dropped) = JsonLines::resume(path, p.start_step as u64)?;
            if dropped > 0 {
                sink.notice(&format!(
                    "{}: {dropped} line(s) after step {} dropped (the resumed steps are trained again)",
                    path.display(),
                    p.start_step
                ));
            }
            Some(f)
        }
        (Some(path), true) => Some(JsonLines::create(path)?),
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
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let first_rank = p.mpi.as_ref().map_or(0, |w| w.rank().0);
    let ranks_here = if p.mpi.is_some() {
        1
    } else {
        p.cfg.world_size()
    };
    let heartbeats = Heartbeats::new(first_rank, ranks_here);
    let exchange = agreement(&p);
    let job = Arc::new(Job {
        cfg: p.cfg.clone(),
        inst: p.inst.clone(),
        weights: p.weights.clone(),
        data: p.data.clone(),
        resumed: p.resumed.clone(),
        start_step: p.start_step,
        planner: p.planner.clone(),
        devices_per_node: p.devices_per_node,
        agreement: exchange.clone(),
        buckets,
        tx: tx.clone(),
        heartbeats: heartbeats.clone(),
        fault,
        eval_data: p.eval_data.clone(),
    });
    let start = Instant::now();
    let worker = spawn_ranks(&p, job, tx);
    let mut steps = Vec::new();
    let mut checkpoints = Vec::new();
    let mut stopped_at = None;
    let mut worker_steps = Vec::new();
    let mut lost_workers = Vec::new();
    let mut failure: Option<TrainError> = None;
    let limit = crate::watchdog::limit();
    // A signal's stop: when asked, and the last report from the ranks since.
    let mut stop_waiting: Option<Instant> = None;
    let mut longest_step = 0.0f64;
    let outcome = loop {
        let got = rx.recv_timeout(Duration::from_secs(1));
        let asked = p
            .cfg
            .stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        if asked && (stop_waiting.is_none() || got.is_ok()) {
            stop_waiting = Some(Instant::now());
        }
        if let Some(since) = stop_waiting {
            if got.is_err() && since.elapsed() > crate::watchdog::stop_grace(longest_step) {
                let stuck = heartbeats.most_silent().map_or_else(
                    || "the ranks did not report".to_string(),
                    |(r, s, step, what)| {
                        format!(
                            "rank {r} has made no progress for {s:.0} s (step {step}, in {what})"
                        )
                    },
                );
                break Err(TrainError::Interrupted {
                    stuck,
                    last_checkpoint: checkpoints.last().cloned(),
                });
            }
        }
        match got {
            Ok(Msg::Finished(r)) => break r,
            Ok(Msg::Step(mut m)) => {
                longest_step = longest_step.max(m.seconds);
                m.exchange_choices = exchange.choice_summary();
                if failure.is_none() {
                    if let Err(e) = sink.step(&m) {
                        failure = Some(e);
                    }
                }
                steps.push(*m);
            }
            Ok(Msg::Checkpoint { step, parts }) => {
                if failure.is_none() {
                    match write_checkpoint(&p, step, &parts) {
                        Ok((at, notices)) => {
                            for n in &notices {
                                sink.notice(n);
                            }
                            sink.checkpoint(step, &at);
                            checkpoints.push(at);
                        }
                        Err(e) => failure = Some(e),
                    }
                }
            }
            Ok(Msg::Stopped { step }) => stopped_at = Some(step),
            Ok(Msg::WorkerStep(s)) => worker_steps.push(s),
            Ok(Msg::Notice(n)) => sink.notice(&n),
            Ok(Msg::WorkerLost {
                worker,
                rank,
                step,
                reason,
            }) => {
                let say = format!(
                    "worker {worker} (rank {rank}) left the run at its step {step}: {reason}; the \
                     parameter servers keep the parameters and give its share to another worker"
                );
                if root {
                    sink.notice(&say);
                } else {
                    eprintln!("{say}");
                }
                lost_workers.push(worker);
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = heartbeats.check(limit) {
                    break Err(e);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                break Err(TrainError::Rank {
                    rank: first_rank,
                    reason: "the rank threads ended without a result".into(),
                })
            }
        }
    };
    let gave_up = matches!(outcome, Err(TrainError::Interrupted { .. }));
    if outcome.is_ok() || (!gave_up && heartbeats.check(limit).is_ok()) {
        // The worker has returned (or is about to); a stuck one is left behind.
        let _ = worker.join();
    }
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
        (Err(e), None) => return Err(blame_the_stuck(e, &heartbeats)),
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
        stopped_at,
        worker_steps,
        lost_workers,
    };
    // Only world rank 0 gets everything; it writes the results.
    let Some((per_rank, peaks)) = collected else {
        return Ok(out);
    };
    let trained = gather_weights(&p.cfg.model, &p.inst, &per_rank)?;
    if let Some(path) = &p.cfg.save {
        save(&p, path, &trained)?;
    }
    out.weights = Some(trained);
    out.peak_bytes = peaks;
    Ok(out)
}

/// A communication timeout names the rank that gave up and the peer it waited for, which may
/// itself be waiting (a pipeline's chain): where another rank has been silent for at least the
/// timeout — the one that stopped first — the error names that one.
fn blame_the_stuck(e: TrainError, heartbeats: &Heartbeats) -> TrainError {
    let timeout = comm::default_timeout().as_secs_f64();
    // The timeout, directly or as the runtime's.
    let gave_up = match &e {
        TrainError::Comm(comm::CommError::Timeout { rank, .. })
        | TrainError::Runtime(runtime::RuntimeError::Comm(comm::CommError::Timeout {
            rank, ..
        })) => Some(rank.0),
        _ => None,
    };
    match (gave_up, heartbeats.most_silent()) {
        (Some(rank), Some((r, silent, step, what))) if r != rank && silent >= timeout => {
            TrainError::Rank {
                rank: r,
                reason: format!(
                    "made no progress for {silent:.0} s (step {step}, in {what}): the others \
                     gave up waiting (the first to: {e})"
                ),
            }
        }
        _ => e,
    }
}

/// Starts the ranks on a thread of their own, which sends [`Msg::Finished`] with their result
/// when they are done (or when the communicator gave up on a failed or stuck one).
/// The gradient agreement of the run: its exchange, `auto` weighing algorithms on the simulated
/// cluster, else the planner's, else nominal links of this machine.
fn agreement(p: &Prepared) -> Arc<crate::exchange::Agreement> {
    let cluster = p.cfg.simulate.clone().or_else(|| match &p.cfg.strategy {
        crate::StrategySpec::Auto(a) => Some(a.cluster.clone()),
        _ => None,
    });
    Arc::new(
        crate::exchange::Agreement::new(p.cfg.exchange, cluster, p.devices_per_node)
            .with_clip(Some(p.cfg.grad_clip))
            .with_onebit(match p.cfg.optimizer {
                crate::OptimizerKind::AdamW => None,
                crate::OptimizerKind::OneBitAdam { warmup } => Some(crate::exchange::OneBit {
                    warmup,
                    beta1: p.cfg.adamw.beta1 as f32,
                }),
            }),
    )
}

fn spawn_ranks(
    p: &Prepared,
    job: Arc<Job>,
    tx: std::sync::mpsc::Sender<Msg>,
) -> std::thread::JoinHandle<()> {
    let mpi = p.mpi.clone();
    let device = p.cfg.device;
    let devices = p.cfg.world_size();
    let servers = p.cfg.ps.map_or(0, |ps| ps.servers);
    let simulate = p.cfg.simulate.clone().map(Arc::new);
    std::thread::spawn(move || {
        // Thread ranks share this process's cores: the clock counts how many compute at once.
        let share = match (&simulate, &mpi) {
            (Some(c), None) if c.shared_cores > 0.0 => {
                Some(sim::CoreShare::lending(devices, c.shared_cores, c.lending))
            }
            _ => None,
        };
        let one_rank = move |world: &dyn Communicator, ranks_here: usize| -> Result<_> {
            let me = world.rank().0;
            job.heartbeats.watch_this_thread(me);
            if me < servers {
                // A parameter server: no backend, its shard on the host.
                let r = crate::ps::serve(&job, world);
                job.heartbeats.done(me);
                runtime::progress::set_hook(None);
                return r;
            }
            let sim = simulate.as_ref().map(|c| (c.clone(), share.clone()));
            let r = match device {
                Device::Cpu => run_clocked(
                    &job,
                    CpuBackend::for_ranks(ranks_here)?,
                    world,
                    sim.as_ref(),
                ),
                Device::Cuda(precision) => {
                    let count = kernels::cuda::device_count()?;
                    let gpu = CudaBackend::new(me % count, precision)?;
                    run_clocked(&job, gpu, world, sim.as_ref())
                }
            };
            job.heartbeats.done(me);
            runtime::progress::set_hook(None);
            r
        };
        let result = match mpi {
            Some(world) => {
                // The ranks on this node share its cores.
                let node = world.nodes()[world.rank().0];
                let here = world.nodes().iter().filter(|&&n| n == node).count();
                one_rank(world.as_ref(), here)
            }
            None => ThreadComm::run(devices, move |world| one_rank(&world, devices))
                .map(|mut all| all.swap_remove(0)),
        };
        let _ = tx.send(Msg::Finished(result));
    })
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
        None if job.cfg.ps.is_some() => job.work(&be, world),
        None if job.cfg.sync == crate::SyncMode::FedAvg => job.federate(&be, world),
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

/// Writes the final weights: one safetensors file, or an HF model folder (replacing an
/// existing one of hotspa's only when forced: the check before the first step allowed it, and
/// `save_folder` checks again).
fn save(p: &Prepared, path: &std::path::Path, weights: &Weights) -> Result<()> {
    recheck_disk(p, "save")?;
    if crate::outputs::is_single_file(path) {
        if p.save_dtype != model::Dtype::F32 {
            return Err(TrainError::setting(
                "save_dtype",
                "a single .safetensors file is written in f32; save a model folder for bf16 or f16",
            ));
        }
        return Ok(weights.save(path)?);
    }
    let opts = model::SaveOptions {
        dtype: p.save_dtype,
        shard_bytes: model::folder::SHARD_BYTES,
        extra_files: p.tokenizer_files.clone(),
    };
    Ok(model::save_folder(path, &p.cfg.model, weights, &opts)?)
}

/// The disk check of before the first step, again for one output before it is written (the
/// disk may have filled since).
fn recheck_disk(p: &Prepared, setting: &str) -> Result<()> {
    let need: Vec<_> = crate::resources::disk_need(&p.cfg)
        .into_iter()
        .filter(|n| n.0 == setting)
        .collect();
    crate::resources::check_disk(&need)
}

fn write_checkpoint(
    p: &Prepared,
    step: u64,
    parts: &[crate::job::RankPart],
) -> Result<(std::path::PathBuf, Vec<String>)> {
    recheck_disk(p, "checkpoint_dir")?;
    let pick = |i: usize| -> Vec<(Vec<Vec<f32>>, model::Held)> {
        parts
            .iter()
            .map(|(sets, h, _)| (sets[i].clone(), h.clone()))
            .collect()
    };
    let state = parts
        .iter()
        .enumerate()
        .flat_map(|(r, (_, _, kept))| kept.entries(r))
        .collect();
    let model = &p.cfg.model;
    let ck = Checkpoint {
        step,
        weights: gather_weights(model, &p.inst, &pick(0))?,
        exp_avg: gather_weights(model, &p.inst, &pick(1))?,
        exp_avg_sq: gather_weights(model, &p.inst, &pick(2))?,
        run: p.cfg.record(&p.inst, &p.data_sha256),
        state,
    };
    let dir = p
        .checkpoints
        .as_ref()
        .ok_or_else(|| TrainError::setting("checkpoint_dir", "no checkpoint directory"))?;
    dir.save_with(&ck, model, &p.tokenizer_files)
}
