//! What a run reports: one [`StepMetrics`] per step, sent to [`Sink`]s (a JSONL file, a line
//! per step on any writer, the CLI's progress bar).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One optimizer step, as rank 0 saw it. Serialised as one JSON object per line; the optional
/// parts add their fields at the top level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based step.
    pub step: u64,
    /// Loss of the global batch (mean over its predicted tokens); NaN (`null` in JSON) for a
    /// step whose gradients never came back (a run that failed under PipeDream-2BW).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f32,
    /// Global gradient norm before clipping; NaN (`null`) where the step's update never ran
    /// (a run that failed with it pending).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// The step's learning rate.
    pub lr: f64,
    /// Tokens of the global batch.
    pub tokens: u64,
    /// Wall seconds of the step.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_s: f64,
    /// The most activation and gradient bytes any rank held at once during the step.
    pub peak_bytes: u64,
    /// With automatic planning: the step's plan.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanMetrics>,
    /// With hot switching: time per strategy and in switches.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub hot: Option<HotMetrics>,
    /// With the simulator's clock: the step's time on the simulated cluster.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedMetrics>,
    /// At an evaluation step: the held-out loss after the update.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalMetrics>,
    /// Bytes the ranks sent during the step, by link class (absent in files of older runs).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub wire: Option<WireMetrics>,
    /// Under the parameter server: the step's updates and messages.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub ps: Option<PsMetrics>,
    /// Under federated averaging: the round's clients and bytes up and down.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub fed: Option<FedMetrics>,
    /// Under `--grad-compression auto`: what each bucket's exchange was, counted (e.g. `none
    /// ×3, int8 across nodes ×2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_choices: Option<String>,
    /// Under `--pipeline-schedule pipedream-2bw`: updates applied between the weights this
    /// step's gradient was computed on and the weights it updated (1, or 0 after a flush).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_staleness: Option<u64>,
}

/// A number, or NaN where JSON has `null` (which is how serde_json writes NaN).
fn nan_if_null<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + num_nan::Nan,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_else(T::nan))
}

/// The floats that have a NaN.
mod num_nan {
    pub trait Nan {
        fn nan() -> Self;
    }
    impl Nan for f32 {
        fn nan() -> Self {
            f32::NAN
        }
    }
    impl Nan for f64 {
        fn nan() -> Self {
            f64::NAN
        }
    }
}

/// A step under the parameter server (under ASP and SSP: `W` updates, one per worker share).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PsMetrics {
    /// Updates the servers applied.
    pub ps_updates: u64,
    /// Bytes the workers pushed (gradients and headers).
    pub ps_push_bytes: u64,
    /// Bytes the servers sent back (parameters and headers).
    pub ps_pull_bytes: u64,
    /// The most updates of other workers that landed between a worker's pull and its push.
    pub ps_max_staleness: u64,
}

/// Bytes on the wire in a step: every rank's sends (gradient exchange, TP and pipeline
/// traffic, switches, the step's bookkeeping), to ranks on its own node and to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireMetrics {
    /// To ranks on the sender's node.
    pub wire_intra_node_bytes: u64,
    /// To ranks on other nodes.
    pub wire_inter_node_bytes: u64,
}

/// The held-out loss after a step's update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean loss per predicted token of the held-out data.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub eval_perplexity: f64,
}

/// The planner's choice for a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanMetrics {
    /// The plan, e.g. `dp4:128,tp4:max (weights in tp4)`.
    pub plan: String,
    /// Seconds spent planning the step.
    pub planning_seconds: f64,
    /// The cost model's estimate of the step.
    pub predicted_seconds: f64,
}

/// Hot switching in a step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HotMetrics {
    /// Seconds spent training under each strategy (switches excluded), by strategy.
    pub strategy_seconds: BTreeMap<String, f64>,
    /// Seconds spent switching parameters and gradients.
    pub switch_seconds: f64,
    /// Bytes the switches moved (all ranks together).
    pub switch_bytes: u64,
}

/// The simulated cluster's time of a step, by phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimulatedMetrics {
    /// The whole step.
    pub simulated_seconds: f64,
    /// Kernels world rank 0 ran in the step.
    #[serde(default)]
    pub simulated_kernels: u64,
    /// By phase.
    pub simulated: SimulatedPhases,
}

/// Simulated seconds by what they were spent on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SimulatedPhases {
    /// GEMMs and attention.
    pub compute: f64,
    /// Memory-bound kernels.
    pub elementwise: f64,
    /// The optimizer update.
    pub optimizer: f64,
    /// Moving bytes over links.
    pub transfer: f64,
    /// Waiting for other ranks.
    pub wait: f64,
}

/// Where a run's reports go. Every method has a default that ignores the report.
pub trait Sink {
    /// The run begins at `step` (0, or a resumed checkpoint's) of `steps` (world rank 0 only).
    fn start(&mut self, step: usize, steps: usize) {
        let _ = (step, steps);
    }
    /// A line about the run's setup or progress ("resuming from … at step 40").
    fn notice(&mut self, text: &str) {
        let _ = text;
    }
    /// A step's metrics (world rank 0 only).
    fn step(&mut self, metrics: &StepMetrics) -> Result<()> {
        let _ = metrics;
        Ok(())
    }
    /// A checkpoint was written to `dir` after `step` steps.
    fn checkpoint(&mut self, step: u64, dir: &Path) {
        let _ = (step, dir);
    }
}

/// Ignores everything.
pub struct NoSink;

impl Sink for NoSink {}

/// One JSON object per step on a writer (a file, stdout).
pub struct JsonLines<W: Write> {
    out: W,
    what: PathBuf,
}

impl JsonLines<std::io::BufWriter<std::fs::File>> {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(TrainError::io(path))?;
        Ok(Self {
            out: std::io::BufWriter::new(file),
            what: path.to_path_buf(),
        })
    }
}

impl JsonLines<std::io::BufWriter<std::fs::File>> {
    /// Continues `path` after a resume from step `step`: keeps its lines up to that step (a
    /// partial last line of a killed run, and the steps after the checkpoint, are dropped),
    /// then appends. Returns the sink and how many lines were dropped.
    pub fn resume(path: &Path, step: u64) -> Result<(Self, usize)> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TrainError::io(path)(e)),
        };
        let mut kept = String::new();
        let mut dropped = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<StepMetrics>(line) {
                Ok(m) if m.step <= step => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => dropped += 1,
            }
        }
        model::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(TrainError::io(path))?;
        Ok((
            Self {
                out: std::io::BufWriter::new(file),
                what: path.to_path_buf(),
            },
            dropped,
        ))
    }
}

impl JsonLines<std::io::Stdout> {
    /// Lines on standard output.
    pub fn stdout() -> Self {
        Self {
            out: std::io::stdout(),
            what: PathBuf::from("(stdout)"),
        }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn step(&mut self, metrics: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics).map_err(|e| TrainError::Io {
            path: self.what.clone(),
            source: std::io::Error::other(e),
        })?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(TrainError::io(&self.what))
    }
}

/// Sends every report to each of several sinks.
pub struct Fanout<'a>(pub Vec<&'a mut dyn Sink>);

impl Sink for Fanout<'_> {
    fn start(&mut self, step: usize, steps: usize) {
        for s in &mut self.0 {
            s.start(step, steps);
        }
    }
    fn notice(&mut self, text: &str) {
        for s in &mut self.0 {
            s.notice(text);
        }
    }
    fn step(&mut self, metrics: &StepMetrics) -> Result<()> {
        for s in &mut self.0 {
            s.step(metrics)?;
        }
        Ok(())
    }
    fn checkpoint(&mut self, step: u64, dir: &Path) {
        for s in &mut self.0 {
            s.checkpoint(step, dir);
        }
    }
}

/// Every step of a metrics file, in order.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                TrainError::setting(
                    "metrics",
                    format!(
                        "{}:{}: not a metrics line of hotspa train: {e}",
                        path.display(),
                        i + 1
                    ),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_loss_or_norm_is_written_null_and_read_back_nan() {
        let m = StepMetrics {
            step: 2,
            loss: f32::NAN,
            grad_norm: f64::NAN,
            ..Default::default()
        };
        let line = serde_json::to_string(&m).unwrap();
        assert!(line.contains(r#""loss":null,"grad_norm":null"#), "{line}");
        let back: StepMetrics = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan() && back.grad_norm.is_nan() && back.step == 2);
    }

    #[test]
    fn a_line_round_trips_with_its_optional_parts_flat() {
        let mut m = StepMetrics {
            step: 3,
            loss: 5.25,
            grad_norm: 0.5,
            lr: 1e-3,
            tokens: 100,
            seconds: 0.25,
            tokens_per_s: 400.0,
            peak_bytes: (1 << 40) + 3,
            ..Default::default()
        };
        let line = serde_json::to_string(&m).unwrap();
        assert!(
            !line.contains("switch_seconds") && !line.contains("null"),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<StepMetrics>(&line).unwrap(), m);
        m.hot = Some(HotMetrics {
            strategy_seconds: [("dp4".to_string(), 0.1)].into(),
            switch_seconds: 0.05,
            switch_bytes: 4096,
        });
        let line = serde_json::to_string(&m).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["switch_bytes"], 4096);
        assert_eq!(v["strategy_seconds"]["dp4"], 0.1);
        assert_eq!(v["peak_bytes"], (1u64 << 40) + 3);
        assert_eq!(serde_json::from_str::<StepMetrics>(&line).unwrap(), m);
        m.wire = Some(WireMetrics {
            wire_intra_node_bytes: 10,
            wire_inter_node_bytes: 1 << 41,
        });
        let line = serde_json::to_string(&m).unwrap();
        assert!(
            line.contains(r#""wire_inter_node_bytes":2199023255552"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<StepMetrics>(&line).unwrap(), m);
    }
}

/// One round as rank 0 reports it (flattened into the step's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FedMetrics {
    /// Clients that trained and reported this round.
    pub fed_clients: u64,
    /// Sampled clients that dropped out of this round (`--fed-dropout-clients`).
    #[serde(default)]
    pub fed_dropped: u64,
    /// Bytes the clients uploaded (their updates, after the codec and Federated Dropout).
    pub fed_up_bytes: u64,
    /// Bytes the server sent them (the global model, or the sub-model each keeps).
    pub fed_down_bytes: u64,
}

/// One worker step under the parameter server, as the worker saw it (thread ranks report
/// every worker's; under MPI a process reports its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStep {
    /// The worker (world rank).
    pub worker: usize,
    /// Its own step count, from 1.
    pub step: usize,
    /// The share of the data it trained: DP part `share mod W` of global batch `share / W`.
    pub share: usize,
    /// Seconds from the run's start when it began computing (after its parameters arrived).
    pub started_s: f64,
    /// When it had its gradients and began pushing them.
    pub finished_s: f64,
    /// Its loss: the mean over its share's tokens (BSP: its part of the global batch's mean).
    pub loss: f32,
    /// Updates of other workers that server 0 applied between this worker's pull and its push
    /// (0 under BSP).
    pub staleness: u64,
}
