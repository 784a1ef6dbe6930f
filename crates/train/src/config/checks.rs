//! The checks of the synchronisation models' and the gradient exchange's settings against the
//! whole run: the exchange's codecs (`auto`, DGC, the sketch), 1-bit Adam, periodic averaging,
//! the parameter server, federated averaging, and the whole replicas the last two train.

use comm::codec::Codec;

use crate::config::{StrategySpec, TrainConfig};
use crate::error::{Result, TrainError};
use crate::settings::SyncMode;
use crate::settings::{Federated, OptimizerKind};

impl Federated {
    /// Checks the settings against the run (`clients` 0 means one per device).
    pub(crate) fn check(&self, cfg: &TrainConfig) -> Result<()> {
        let bad = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad(
                "fed_fraction",
                format!("{} is out of range: must be in (0, 1]", self.fraction),
            );
        }
        if self.local_steps == 0 {
            return bad(
                "fed_local_steps",
                "0 is out of range: must be at least 1".into(),
            );
        }
        if self.batch == 0 {
            return bad("fed_batch", "0 is out of range: must be at least 1".into());
        }
        if self.epochs == Some(0) {
            return bad("fed_epochs", "0 is out of range: must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.client_dropout) {
            return bad(
                "fed_dropout_clients",
                format!("{} is out of range: must be in [0, 1)", self.client_dropout),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "fed_dropout",
                format!("{} is out of range: must be in [0, 1)", self.dropout),
            );
        }
        let e = &cfg.exchange;
        if e.adaptive {
            return bad(
                "grad_compression",
                "auto chooses a codec per bucket of a DP exchange by its links; a client's \
                 upload goes to the server: name the codec"
                    .into(),
            );
        }
        if e.algorithm != planner::exchange::Exchange::default().algorithm || e.cross_node_only {
            return bad(
                "allreduce",
                "under --sync fedavg the clients' uploads go to the server as they are: \
                 --allreduce and --compress-cross-node-only do not apply"
                    .into(),
            );
        }
        if matches!(
            e.codec,
            Codec::PowerSgd(_) | Codec::Dgc(_) | Codec::OkDgc(_) | Codec::OkTopK(_)
        ) {
            return bad(
                "grad_compression",
                format!(
                    "{}: {}; use bf16, fp16, int8, sign, qsgd:S, topk:F or randk:F for the \
                     uplink",
                    e.codec,
                    if matches!(e.codec, Codec::OkTopK(_)) {
                        "its sums are made by the members themselves, region by region; a \
                         client's upload goes to the server whole"
                    } else {
                        "its state (PowerSGD's warm starts, DGC's velocity) lives with a DP \
                         member, which federated clients are not"
                    }
                ),
            );
        }
        if matches!(e.codec, Codec::Sketch(..)) && self.dropout > 0.0 {
            return bad(
                "fed_dropout",
                format!(
                    "{}: Federated Dropout's clients train different sub-models, whose changes \
                     the server averages coordinate by coordinate; a sketch mixes every \
                     coordinate: not implemented together",
                    e.codec
                ),
            );
        }
        check_whole_replicas(cfg, "sync", "federated clients", "--sync fedavg")
    }
}

/// The consistency models that run on the parameter server, and the checks of a run that
/// uses it.
pub(crate) fn check_ps(cfg: &TrainConfig) -> Result<()> {
    let needs = matches!(cfg.sync, SyncMode::Ssp { .. } | SyncMode::Asp);
    let Some(ps) = cfg.ps else {
        if needs {
            return Err(TrainError::setting(
                "sync",
                format!(
                    "{} runs on the parameter server: give --ps-servers K",
                    cfg.sync
                ),
            ));
        }
        return Ok(());
    };
    let refuse = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
    if ps.servers == 0 {
        return refuse("ps_servers", "0 is out of range: must be at least 1".into());
    }
    if cfg.sync.every().is_some() {
        return refuse(
            "sync",
            format!(
                "{} averages the replicas' weights by all-reduce; the parameter server runs \
                 bsp, ssp:S or asp",
                cfg.sync
            ),
        );
    }
    check_whole_replicas(
        cfg,
        "ps_servers",
        "the parameter server's workers",
        "the parameter server",
    )?;
    let e = &cfg.exchange;
    let exact = planner::exchange::Exchange::default();
    if e.adaptive {
        return refuse(
            "grad_compression",
            "auto chooses a codec per bucket of a DP exchange by its links; pushes go to the \
             parameter servers: name the codec"
                .into(),
        );
    }
    if e.algorithm != exact.algorithm || e.cross_node_only {
        return refuse(
            "ps_servers",
            "pushes go to the servers, not through an all-reduce: --allreduce and \
             --compress-cross-node-only do not apply"
                .into(),
        );
    }
    if matches!(
        e.codec,
        Codec::PowerSgd(_) | Codec::Dgc(_) | Codec::OkDgc(_) | Codec::OkTopK(_)
    ) {
        return refuse(
            "ps_servers",
            format!(
                "{}: {} between the workers; pushes to the parameter server take bf16, fp16, \
                 int8, sign, qsgd:S, topk:F or randk:F",
                e.codec,
                if matches!(e.codec, Codec::OkTopK(_)) {
                    "its sums are made region by region by the members"
                } else if e.codec.is_dgc() {
                    "DGC's velocities and sparse sums need all-gathers"
                } else {
                    "PowerSGD's factors need all-reduces"
                }
            ),
        );
    }
    Ok(())
}

/// The checks of 1-bit Adam against the run: it brings its own exchange (exact for the
/// warm-up, then the momentum by the 1-bit codec with error feedback), keeps one momentum per
/// bucket of one strategy's gradients, and runs in the all-reduce model.
pub(crate) fn check_optimizer(cfg: &TrainConfig) -> Result<()> {
    let OptimizerKind::OneBitAdam { warmup } = cfg.optimizer else {
        return Ok(());
    };
    let refuse = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
    if warmup == 0 {
        return refuse(
            "onebit_warmup",
            "0 is out of range: 1-bit Adam freezes the variance its warm-up estimated, so it \
             needs at least 1 exact step"
                .into(),
        );
    }
    let e = &cfg.exchange;
    if e.codec != Codec::None || e.cross_node_only || e.adaptive {
        return refuse(
            "grad_compression",
            format!(
                "onebit-adam exchanges the momentum by its own 1-bit codec after the warm-up; \
                 --grad-compression {} / --compress-cross-node-only do not apply (drop them)",
                compression_flag(e)
            ),
        );
    }
    if !e.error_feedback {
        return refuse(
            "error_feedback",
            "onebit-adam compensates the 1-bit codec's error on both sides (that is 1-bit Adam); \
             --error-feedback off does not apply to it"
                .into(),
        );
    }
    if cfg.sync != crate::settings::SyncMode::Bsp || cfg.ps.is_some() {
        return refuse(
            "optimizer",
            format!(
                "onebit-adam exchanges the momentum by all-reduce every step; --sync {}{} is \
                 another synchronisation model",
                cfg.sync,
                if cfg.ps.is_some() {
                    " with --ps-servers"
                } else {
                    ""
                }
            ),
        );
    }
    if !matches!(cfg.strategy, StrategySpec::Fixed(_)) {
        return refuse(
            "optimizer",
            "onebit-adam keeps one momentum per bucket of one strategy's gradients; a hot, \
             concurrent or planned schedule sums several strategies' partial gradients, whose \
             momenta are not defined: use --strategy"
                .into(),
        );
    }
    Ok(())
}

/// The checks of `--comm-schedule priority` against the run: each parameter is updated as
/// soon as its own gradient is summed, during the next step, so every DP member must hold
/// whole parameters (pure data parallelism, no ZeRO) and nothing may need every gradient
/// before any update (a global norm clip, a compressed or periodic exchange).
pub(crate) fn check_comm_schedule(cfg: &TrainConfig) -> Result<()> {
    if cfg.comm_schedule != runtime::CommSchedule::Priority {
        return Ok(());
    }
    let refuse = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
    let StrategySpec::Fixed(s) = &cfg.strategy else {
        return refuse(
            "comm_schedule",
            "priority sums one strategy's gradients during the next step; a hot, concurrent or \
             planned schedule switches strategies between steps: use --strategy"
                .into(),
        );
    };
    if s.dp < 2 || s.tp * s.pp * s.cp > 1 || s.zero != graph::Zero::Off {
        return refuse(
            "comm_schedule",
            format!(
                "priority needs pure data parallelism with whole parameters on every member \
             (dpN, N ≥ 2, no ZeRO); {s} is not"
            ),
        );
    }
    if cfg.grad_clip.is_finite() {
        return refuse(
            "grad_clip",
            format!(
                "priority updates each parameter as soon as its gradient is summed, and a \
             global norm clip ({}) needs every gradient first: pass --grad-clip inf",
                cfg.grad_clip
            ),
        );
    }
    let e = &cfg.exchange;
    if e.codec != Codec::None || e.adaptive || e.cross_node_only {
        return refuse(
            "grad_compression",
            format!(
                "priority sums exact pieces; --grad-compression {} is not implemented with it",
                compression_flag(e)
            ),
        );
    }
    if cfg.sync != crate::settings::SyncMode::Bsp || cfg.ps.is_some() {
        return refuse(
            "comm_schedule",
            format!(
                "priority schedules the every-step exchange; --sync {} has none",
                cfg.sync
            ),
        );
    }
    if cfg.optimizer != OptimizerKind::AdamW {
        return refuse(
            "optimizer",
            "priority updates AdamW parameter by parameter; onebit-adam exchanges momenta".into(),
        );
    }
    if cfg.simulate.is_some() {
        return refuse(
            "sim_cluster",
            "the simulator's clock does not time the update thread of --comm-schedule priority \
             yet; run it without --sim-cluster"
                .into(),
        );
    }
    if cfg.device != crate::config::Device::Cpu {
        return refuse(
            "comm_schedule",
            "priority updates parameters on a second thread, which the CUDA backend does not \
             share its stream with yet: use --device cpu"
                .into(),
        );
    }
    Ok(())
}

/// `--pipeline-schedule pipedream-2bw` carries a step's last backwards into the next step and
/// updates with a one-step-old gradient: it needs one static strategy with pipeline stages,
/// the every-step exchange and an update it can apply late (AdamW); the rest is refused by
/// name.
pub(crate) fn check_pipeline_schedule(cfg: &TrainConfig) -> Result<()> {
    if !cfg.pipeline_schedule.flushless() {
        return Ok(());
    }
    let refuse = |setting: &'static str, why: String| Err(TrainError::setting(setting, why));
    let StrategySpec::Fixed(s) = &cfg.strategy else {
        return refuse(
            "pipeline_schedule",
            "pipedream-2bw keeps one strategy's micro-batches in flight from step to step; a \
             hot, concurrent or planned schedule switches strategies between steps: use \
             --strategy"
                .into(),
        );
    };
    if s.pp < 2 {
        return refuse(
            "pipeline_schedule",
            format!("pipedream-2bw needs pipeline stages (ppN, N ≥ 2); {s} has none"),
        );
    }
    if s.zero >= graph::Zero::Parameters {
        return refuse(
            "pipeline_schedule",
            format!(
                "pipedream-2bw keeps two versions of every weight and ZeRO-3 shards them per \
                 step (not built); {s}: use zero1 or zero2"
            ),
        );
    }
    if cfg.comm_schedule != runtime::CommSchedule::Fifo {
        return refuse(
            "comm_schedule",
            "pipedream-2bw sums a step's gradients once its last backward is done; \
             --comm-schedule priority is not built with it"
                .into(),
        );
    }
    if cfg.sync != crate::settings::SyncMode::Bsp || cfg.ps.is_some() {
        return refuse(
            "pipeline_schedule",
            format!(
                "pipedream-2bw applies one update per step from the every-step exchange; --sync \
                 {} is not built with it",
                cfg.sync
            ),
        );
    }
    if cfg.optimizer != OptimizerKind::AdamW {
        return refuse(
            "optimizer",
            "pipedream-2bw applies AdamW one step late; onebit-adam with it is not built".into(),
        );
    }
    Ok(())
}

/// What a run of whole replicas needs (the parameter server's workers, federated clients):
/// one strategy of pure data parallelism over the devices, and none of what is not built for
/// them. `setting` names the refusing setting, `who` the replicas, `under` the mode.
pub(crate) fn check_whole_replicas(
    cfg: &TrainConfig,
    setting: &'static str,
    who: &str,
    under: &str,
) -> Result<()> {
    let s = match &cfg.strategy {
        StrategySpec::Fixed(s) => s,
        _ => {
            return Err(TrainError::setting(
                setting,
                format!(
                    "{under} runs one data-parallel strategy (--strategy dpN), not a \
                     hot-switching or planned schedule"
                ),
            ))
        }
    };
    if s.tp != 1 || s.pp != 1 || s.zero != graph::Zero::Off || s.dp != cfg.devices {
        return Err(TrainError::setting(
            setting,
            format!(
                "{s}: {who} are whole replicas — use --strategy dp{} (no TP, PP or ZeRO)",
                cfg.devices
            ),
        ));
    }
    for (name, what, given) in [
        ("checkpoint_dir", "checkpointing", cfg.checkpoint.is_some()),
        ("resume", "resuming", cfg.resume.is_some()),
        ("eval_data", "evaluation during the run", cfg.eval.is_some()),
        ("sim_cluster", "the simulated clock", cfg.simulate.is_some()),
    ] {
        if given {
            return Err(TrainError::setting(
                name,
                format!(
                    "{what} under {under} is not built; drop it (evaluate the saved model with \
                     `hotspa eval`)"
                ),
            ));
        }
    }
    Ok(())
}

/// The gradient exchange's settings against each other and the run: the sketch is a federated
/// uplink, DGC its own residual, `auto` its own choice of where to compress.
pub(crate) fn check_exchange(cfg: &TrainConfig) -> Result<()> {
    if matches!(cfg.exchange.codec, comm::codec::Codec::Sketch(..))
        && cfg.sync != crate::settings::SyncMode::FedAvg
    {
        return Err(TrainError::setting(
            "grad_compression",
            format!(
                "{}: a count sketch is FetchSGD's federated uplink (the server adds the \
                 clients' sketches and recovers the largest coordinates); use it with --sync \
                 fedavg",
                cfg.exchange.codec
            ),
        ));
    }
    if cfg.exchange.codec.is_dgc() {
        if !cfg.exchange.error_feedback {
            return Err(TrainError::setting(
                "error_feedback",
                "dgc:F and okdgc:F accumulate what they did not send (that is DGC); \
                 --error-feedback off does not apply to them",
            ));
        }
        if cfg.exchange.cross_node_only {
            return Err(TrainError::setting(
                "compress_cross_node_only",
                "DGC keeps a velocity of the whole bucket per member; the exchange \
                 across nodes carries one member's slice: not implemented together",
            ));
        }
    }
    if cfg.exchange.adaptive && cfg.exchange.cross_node_only {
        return Err(TrainError::setting(
            "compress_cross_node_only",
            "--grad-compression auto chooses per bucket whether to compress across nodes \
             only; drop --compress-cross-node-only",
        ));
    }
    if cfg.exchange.cross_node_only && matches!(cfg.exchange.codec, comm::codec::Codec::PowerSgd(_))
    {
        return Err(TrainError::setting(
            "compress_cross_node_only",
            "PowerSGD compresses whole matrices, and the exchange across nodes carries one \
             member's slice of the bucket: not implemented together; drop one of them",
        ));
    }
    Ok(())
}

/// Periodic averaging runs one strategy with DP replicas that hold whole optimizer states,
/// exchanges no gradients, and checkpoints and evaluates where the replicas are one.
pub(crate) fn check_sync(cfg: &TrainConfig) -> Result<()> {
    let Some(h) = cfg.sync.every() else {
        return Ok(());
    };
    let refuse = |why: String| Err(TrainError::setting("sync", format!("{}: {why}", cfg.sync)));
    let s = match &cfg.strategy {
        StrategySpec::Fixed(s) => s,
        _ => {
            return refuse(
                "periodic averaging runs one strategy (--strategy), not a hot-switching or \
                 planned schedule"
                    .into(),
            )
        }
    };
    if s.dp < 2 {
        return refuse(format!("{s} has no DP replicas to average"));
    }
    if s.zero != graph::Zero::Off {
        return refuse(format!(
            "{s} shards the optimizer over the DP replicas, which differ between \
             synchronisations; drop the zero suffix"
        ));
    }
    if cfg.exchange != planner::exchange::Exchange::default() {
        return refuse(format!(
            "no gradients are exchanged between synchronisations, so --grad-compression {} / \
             --allreduce {} would do nothing",
            compression_flag(&cfg.exchange),
            cfg.exchange.algorithm
        ));
    }
    if let Some(e) = cfg.checkpoint.as_ref().and_then(|c| c.every) {
        if !e.is_multiple_of(h) {
            return refuse(format!(
                "checkpoints are written where the replicas are one: --checkpoint-every {e} \
                 must be a multiple of {h}"
            ));
        }
    }
    if let Some(e) = cfg.eval.as_ref().and_then(|c| c.every) {
        if !e.is_multiple_of(h) {
            return refuse(format!(
                "evaluation runs where the replicas are one: --eval-every {e} must be a \
                 multiple of {h}"
            ));
        }
    }
    Ok(())
}

/// `--grad-compression`'s value as the user gave it: `auto`, or the codec.
fn compression_flag(e: &planner::exchange::Exchange) -> String {
    if e.adaptive {
        "auto".into()
    } else {
        e.codec.to_string()
    }
}
