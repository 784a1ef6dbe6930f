//! What a run asks of the machine, checked before anything large is allocated: the memory it
//! needs by the runtime's memory model against what the machine has, and thread ranks against
//! the cores.

use graph::Strategy;
use model::LlamaConfig;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Thread ranks per core beyond which a run is refused: they would only take turns.
pub const RANKS_PER_CORE: usize = 8;

/// The bytes a run needs at most in this process, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryNeed {
    /// The whole model in host memory while the ranks start (twice: weights and, resuming, the
    /// checkpoint's moments too).
    pub host_model: f64,
    /// Every rank's pieces of the weights, gradients and AdamW moments, and the copies hot
    /// switching makes.
    pub model_state: f64,
    /// Every rank's activations and gradients in flight (the runtime's memory model).
    pub activations: f64,
    /// Every rank's copy of the global batch and its micro-batches.
    pub batches: f64,
    /// A checkpoint's pieces collected and reassembled on rank 0.
    pub checkpoint: f64,
}

impl MemoryNeed {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.host_model + self.model_state + self.activations + self.batches + self.checkpoint
    }
}

/// The memory this process has to give: `MemAvailable` (Linux), or `None` where unknown.
pub fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

/// Every parameter of `cfg`.
fn params(cfg: &LlamaConfig) -> f64 {
    model::param_specs(cfg)
        .iter()
        .map(|s| s.numel() as f64)
        .sum()
}

/// What `cfg` needs with `ranks` of its ranks in this process running `strategies` (the
/// optimizer's being `inst`); `resuming` adds the checkpoint's moments.
pub fn memory_need(
    cfg: &TrainConfig,
    inst: &Strategy,
    strategies: &[&Strategy],
    ranks: usize,
    resuming: bool,
) -> Result<MemoryNeed> {
    let p = params(&cfg.model);
    let per_rank_state = |s: &Strategy| {
        // fp32 weights and gradients (ZeRO-3/2 shard them), fp32 moments (ZeRO-1 shards them).
        p * planner::state_bytes_per_param(4.0, s, inst)
    };
    let inst_state = per_rank_state(inst);
    // Other strategies of a hot schedule hold their weights and gradients while they run,
    // plus host copies of the parameters in their layout.
    let others: f64 = strategies
        .iter()
        .filter(|s| **s != inst)
        .map(|s| 3.0 * 4.0 * p / (s.tp * s.pp) as f64)
        .fold(0.0, f64::max);
    let budget_tokens = |i: usize| -> usize {
        let most = cfg.global_batch.saturating_mul(cfg.max_len());
        cfg.budget(i).min(most).max(cfg.max_len().min(most))
    };
    let mut activations = 0.0f64;
    for (i, s) in strategies.iter().enumerate() {
        // A CP rank holds its part of the micro-batch, about 1/cp of it for long sequences but
        // up to all of it for many short ones (a sequence's 2·cp chunks round up): the whole
        // micro-batch bounds it.
        let tokens = budget_tokens(i);
        // The first stage holds the most under 1F1B: `pp` passes in flight.
        let exec = model::rank_exec(&cfg.model, s, 0)?;
        let peak = planner::stage_peak(
            &exec,
            0,
            &vec![tokens; s.pp],
            cfg.pipeline_schedule,
            0,
            s.pp,
        )?;
        activations = activations.max(peak as f64);
    }
    let batch = cfg.global_batch as f64 * cfg.max_len() as f64 * 4.0 * 4.0;
    let ranks = ranks as f64;
    Ok(MemoryNeed {
        host_model: 4.0 * p * if resuming { 3.0 } else { 1.0 },
        model_state: ranks * (inst_state + others),
        activations: ranks * activations,
        batches: ranks * batch,
        checkpoint: if cfg.checkpoint.is_some() || cfg.save.is_some() {
            2.0 * 4.0 * p * if cfg.checkpoint.is_some() { 3.0 } else { 1.0 }
        } else {
            0.0
        },
    })
}

/// Refuses a run whose memory need exceeds what the machine has available, both numbers and
/// the parts in the message. Only the CPU's memory is checked (a GPU's is not yet).
pub fn check_memory(need: &MemoryNeed, available: Option<f64>) -> Result<()> {
    let Some(have) = available else {
        return Ok(());
    };
    if need.total() <= have {
        return Ok(());
    }
    Err(TrainError::setting(
        "devices",
        format!(
            "the run needs about {} of memory (the model in host memory {}, every rank's weights, \
             gradients and optimizer state {}, activations {}, batches {}, checkpoint assembly {}) \
             but this machine has {} available; use a smaller model, fewer devices in this \
             process, a smaller --micro-batch-tokens or --global-batch",
            gib(need.total()),
            gib(need.host_model),
            gib(need.model_state),
            gib(need.activations),
            gib(need.batches),
            gib(need.checkpoint),
            gib(have)
        ),
    ))
}

/// Refuses more thread ranks than [`RANKS_PER_CORE`] per core.
pub fn check_threads(ranks: usize, cores: usize) -> Result<()> {
    let most = RANKS_PER_CORE * cores.max(1);
    if ranks > most {
        return Err(TrainError::setting(
            "devices",
            format!(
                "{ranks} thread ranks on {cores} core(s): at most {most} ({RANKS_PER_CORE} per core) \
                 run in one process; use fewer, or one process per rank under mpirun"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataSource;

    #[test]
    fn a_7b_model_needs_more_than_this_kind_of_machine_has() {
        let model = LlamaConfig::preset("llama2-7b").unwrap();
        let cfg = TrainConfig::new(model, DataSource::Sequences(vec![vec![1, 2]]));
        let s = Strategy::single();
        let need = memory_need(&cfg, &s, &[&s], 1, false).unwrap();
        // 6.7 B parameters: 27 GB of host weights alone, ~108 GB with gradients and moments.
        assert!(
            need.host_model > 26e9 && need.model_state > 100e9,
            "{need:?}"
        );
        let e = check_memory(&need, Some(23e9)).unwrap_err().to_string();
        assert!(e.contains("this machine has 21.42 GiB available"), "{e}");
        assert!(check_memory(&need, Some(1e13)).is_ok());
        assert!(check_memory(&need, None).is_ok());
        assert!(check_threads(16, 2).is_ok());
        let e = check_threads(1000, 2).unwrap_err().to_string();
        assert!(e.contains("at most 16"), "{e}");
    }
}
