//! `hotspa train`: flags to a [`train::TrainConfig`], a progress bar (or one line per step when
//! not on a terminal), and the run's summary. The training itself is the `train` library's.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use train::{Sink, StepMetrics};

use crate::flags::TrainFlags;
use crate::output::seconds;

mod default_run;

/// The exit status after SIGINT or SIGTERM stopped a run (128 + SIGINT, as shells report it).
pub const INTERRUPTED: i32 = 130;

/// `hotspa train`; `given` names the flags on the command line. With none at all, or with
/// `--default-run`, the embedded default run (changed by the flags given).
pub fn run(flags: TrainFlags, given: &[String]) -> Result<()> {
    if given.is_empty() || flags.default_run {
        if flags.model.is_some() || flags.data.is_some() {
            anyhow::bail!(
                "--default-run trains the embedded model on this project's files: drop --model and --data"
            );
        }
        return default_run::default_run(flags, given);
    }
    train(&flags).map(|_| ())
}

/// A flag that the first SIGINT or SIGTERM sets (the run stops after its current step, or gives
/// up on a rank that does not get there: `train::watchdog::stop_grace`); a second one ends the
/// process at once with [`INTERRUPTED`]. Both are said on stderr.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let flag = Arc::new(AtomicBool::new(false));
    // Counted in the handler itself: two signals in quick succession are two.
    let count = Arc::new(AtomicUsize::new(0));
    for (signal, first, again) in [
        (
            SIGINT,
            &b"\nSIGINT: stopping after the current step (checkpoint and --save as configured); a second signal exits at once\n"[..],
            &b"\nSIGINT again: exiting at once; nothing more is saved (the last checkpoint stays loadable)\n"[..],
        ),
        (
            SIGTERM,
            &b"\nSIGTERM: stopping after the current step (checkpoint and --save as configured); a second signal exits at once\n"[..],
            &b"\nSIGTERM again: exiting at once; nothing more is saved (the last checkpoint stays loadable)\n"[..],
        ),
    ] {
        let (flag, count) = (flag.clone(), count.clone());
        // SAFETY: the handler only touches atomics, write(2) and _exit(2), all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                let say = |m: &[u8]| {
                    libc::write(2, m.as_ptr().cast(), m.len());
                };
                if count.fetch_add(1, Ordering::SeqCst) == 0 {
                    flag.store(true, Ordering::SeqCst);
                    say(first);
                } else {
                    say(again);
                    signal_hook::low_level::exit(INTERRUPTED);
                }
            })?;
        }
    }
    Ok(flag)
}

/// Trains as `flags` say, with progress on stderr and a summary at the end; exits with
/// [`INTERRUPTED`] when a signal stopped the run (after its checkpoint and weights are written).
pub fn train(flags: &TrainFlags) -> Result<train::TrainOutcome> {
    // (`hotspa plan` shares these flags and reads --profile with any strategy.)
    if flags.profile.is_some() && flags.strategies.as_deref() != Some("auto") {
        anyhow::bail!(
            "--profile is the planner's calibration for --strategies auto (and `hotspa plan`); \
             with a given strategy it would change nothing: drop it (--sim-cluster FILE times a \
             run on a profile's cluster)"
        );
    }
    let mut cfg = flags.config()?;
    cfg.stop = Some(stop_on_signals()?);
    let mut progress = Progress::new(cfg.steps);
    let out = match train::run(&cfg, &mut progress) {
        Err(e @ train::TrainError::Interrupted { .. }) => {
            progress.bar.finish_and_clear();
            eprintln!("{e}");
            std::process::exit(INTERRUPTED);
        }
        r => r?,
    };
    progress.bar.finish_and_clear();
    if let Some(step) = out.stopped_at {
        if out.weights.is_some() {
            eprintln!(
                "stopped by a signal after step {step} of {}{}{}",
                cfg.steps,
                out.checkpoints.last().map_or(String::new(), |c| format!(
                    "; checkpoint written to {}",
                    c.display()
                )),
                cfg.save.as_ref().map_or(String::new(), |p| format!(
                    "; weights written to {}",
                    p.display()
                ))
            );
        }
        std::process::exit(INTERRUPTED);
    }
    let Some(_) = &out.weights else {
        // Another MPI rank than 0: rank 0 reports.
        return Ok(out);
    };
    eprintln!(
        "done: {} steps in {:.2} s, {:.0} tokens/s; peak activation+gradient bytes per rank: {:?}",
        out.steps.len(),
        out.seconds,
        out.tokens_per_s(),
        out.peak_bytes
    );
    // Federated averaging: clients and bytes per round.
    let rounds: Vec<&train::FedMetrics> = out.steps.iter().filter_map(|m| m.fed.as_ref()).collect();
    if !rounds.is_empty() {
        let k = rounds.len() as f64;
        let mean =
            |f: fn(&train::FedMetrics) -> u64| rounds.iter().map(|r| f(r) as f64).sum::<f64>() / k;
        eprintln!(
            "federated: {:.1} clients per round; per round {:.2} MB up (the clients' updates), {:.2} MB down",
            mean(|r| r.fed_clients),
            mean(|r| r.fed_up_bytes) / 1e6,
            mean(|r| r.fed_down_bytes) / 1e6
        );
    }
    // The parameter server: who trained how much, on how stale parameters.
    if !out.worker_steps.is_empty() {
        let workers = out.worker_steps.iter().map(|s| s.worker).max().unwrap_or(0) + 1;
        let mut shares = vec![0usize; workers];
        for s in &out.worker_steps {
            shares[s.worker] += 1;
        }
        let stale: Vec<u64> = out.worker_steps.iter().map(|s| s.staleness).collect();
        eprintln!(
            "parameter server: shares trained per worker {shares:?}; staleness (updates between \
             a worker's pull and its push) mean {:.1}, max {}",
            stale.iter().sum::<u64>() as f64 / stale.len() as f64,
            stale.iter().max().unwrap_or(&0)
        );
    }
    // Hot switching: where the time went, over the whole run.
    let mut per: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
    let (mut switch_s, mut switch_b) = (0.0, 0u64);
    for h in out.steps.iter().filter_map(|m| m.hot.as_ref()) {
        for (s, t) in &h.strategy_seconds {
            let e = per.entry(s.as_str()).or_default();
            e.0 += t;
            e.1 += 1;
        }
        switch_s += h.switch_seconds;
        switch_b += h.switch_bytes;
    }
    if !per.is_empty() {
        let parts: Vec<String> = per
            .iter()
            .map(|(s, (t, n))| format!("{s} {t:.1} s in {n} steps"))
            .collect();
        eprintln!(
            "strategies: {}; switches {switch_s:.1} s, {:.1} MB moved",
            parts.join(", "),
            switch_b as f64 / 1e6
        );
    }
    // Bytes on the wire per step, by link class.
    let wired: Vec<&train::WireMetrics> =
        out.steps.iter().filter_map(|m| m.wire.as_ref()).collect();
    if !wired.is_empty() {
        let k = wired.len() as f64;
        let intra = wired
            .iter()
            .map(|w| w.wire_intra_node_bytes as f64)
            .sum::<f64>()
            / k;
        let inter = wired
            .iter()
            .map(|w| w.wire_inter_node_bytes as f64)
            .sum::<f64>()
            / k;
        eprintln!(
            "on the wire: {:.2} MB per step inside nodes, {:.2} MB across nodes (all ranks; {})",
            intra / 1e6,
            inter / 1e6,
            match (cfg.sync, cfg.ps) {
                (s, Some(ps)) => format!(
                    "pushes to and replies from {} parameter server(s), {}, {s}",
                    ps.servers, ps.placement
                ),
                (train::SyncMode::Bsp, None) => match cfg.optimizer {
                    train::OptimizerKind::AdamW => format!("gradient exchange: {}", cfg.exchange),
                    o => format!(
                        "{o}: gradients summed exactly, then the momentum by 1-bit sign with \
                         error feedback; the per-step figures are in --metrics"
                    ),
                },
                (s, None) => format!("no gradient exchange; weights synchronised by {s}"),
            }
        );
    }
    // The simulated time per step, after the first (warm-up).
    let timed: Vec<(f64, f64)> = out
        .steps
        .iter()
        .filter(|m| m.step > out.start_step as u64 + 1)
        .filter_map(|m| {
            m.simulated
                .as_ref()
                .map(|s| (m.seconds, s.simulated_seconds))
        })
        .collect();
    if let (Some(c), false) = (&cfg.simulate, timed.is_empty()) {
        let k = timed.len() as f64;
        eprintln!(
            "simulated on {}: {} per step (steps after the first; measured here {:.4} s, with the clocks' own messages)",
            c.name,
            seconds(timed.iter().map(|t| t.1).sum::<f64>() / k),
            timed.iter().map(|t| t.0).sum::<f64>() / k
        );
    }
    if runtime::profile::enabled() {
        eprintln!(
            "time per op kind (HOTSPA_PROFILE=1; every op waited for):\n{}",
            runtime::profile::report()
        );
    }
    if let Some(p) = &cfg.save {
        eprintln!("weights written to {}", p.display());
    }
    if let Some(p) = &cfg.metrics {
        eprintln!("metrics written to {}", p.display());
    }
    Ok(out)
}

/// The progress bar on a terminal, one line per step otherwise.
struct Progress {
    bar: ProgressBar,
    steps: usize,
}

impl Progress {
    fn new(steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self { bar, steps }
    }
}

impl Sink for Progress {
    fn start(&mut self, step: usize, _: usize) {
        self.bar.set_position(step as u64);
    }
    fn notice(&mut self, text: &str) {
        self.bar.suspend(|| eprintln!("{text}"));
    }
    fn step(&mut self, m: &StepMetrics) -> train::Result<()> {
        if let Some(e) = &m.eval {
            let line = format!(
                "step {:>5}: held-out loss {:.4}, perplexity {:.2}",
                m.step, e.eval_loss, e.eval_perplexity
            );
            self.bar.suspend(|| eprintln!("{line}"));
        }
        if !self.bar.is_hidden() {
            self.bar.set_message(format!(
                "loss {:.4}  {:.0} tokens/s{}",
                m.loss,
                m.tokens_per_s,
                hot_note(m)
            ));
            self.bar.set_position(m.step);
            return Ok(());
        }
        // Not a terminal (a log, CI): one line per step instead of the bar. A step whose loss
        // or norm never came (the run failed while they were pending) says so, not NaN.
        let known = |v: f64, digits: usize| match v.is_nan() {
            true => "— (not reached)".to_string(),
            false => format!("{v:.digits$}"),
        };
        eprintln!(
            "step {:>5}/{}  loss {}  grad_norm {}  lr {:.2e}  {:.0} tokens/s{}",
            m.step,
            self.steps,
            known(f64::from(m.loss), 4),
            known(m.grad_norm, 3),
            m.lr,
            m.tokens_per_s,
            hot_note(m)
        );
        Ok(())
    }
    fn checkpoint(&mut self, _: u64, dir: &std::path::Path) {
        self.bar
            .suspend(|| eprintln!("checkpoint written to {}", dir.display()));
    }
}

/// The hot-switching part of a step line: time per strategy and in switches, bytes switched;
/// the simulated time.
fn hot_note(m: &StepMetrics) -> String {
    let sim = m.simulated.as_ref().map_or(String::new(), |s| {
        format!("  simulated {}", seconds(s.simulated_seconds))
    });
    let Some(h) = &m.hot else {
        return sim;
    };
    let parts: Vec<String> = h
        .strategy_seconds
        .iter()
        .map(|(k, s)| format!("{k} {s:.3}s"))
        .collect();
    format!(
        "  [{}; switch {:.3}s {:.1} MB]{sim}",
        parts.join(", "),
        h.switch_seconds,
        h.switch_bytes as f64 / 1e6
    )
}
