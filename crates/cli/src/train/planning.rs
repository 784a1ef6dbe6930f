//! What the planner needs of a training command: `hotspa plan`'s inputs and the planner of
//! `--strategies auto`.

use anyhow::{bail, Context, Result};
use data::Dataset;
use graph::Strategy;
use model::LlamaConfig;

use super::Args;

/// What `hotspa plan` needs of a training command line: the model, the strategy or hot
/// schedule, the micro-batch budget and the lengths of every step's global batch (the same
/// batches `hotspa train` would draw).
pub(crate) struct PlanInputs {
    pub cfg: LlamaConfig,
    pub devices: usize,
    pub strategy: Strategy,
    pub hot: Option<crate::hot::HotSchedule>,
    pub micro_batch_tokens: usize,
    pub steps: Vec<Vec<usize>>,
}

impl Args {
    /// `--profile`.
    pub(crate) fn profile(&self) -> Option<&std::path::Path> {
        self.profile.as_deref()
    }
}

pub(crate) fn plan_inputs(args: &Args) -> Result<PlanInputs> {
    let model = args
        .model
        .as_ref()
        .context("pass --model <config.json|dir> and --data <file.jsonl|dir>")?;
    let data = args.data.as_ref().context("pass --data <file.jsonl|dir>")?;
    let devices = args.devices.max(1);
    let cfg = LlamaConfig::load(model)?;
    let shuffle = match args.shuffle.as_str() {
        "on" => Some(args.seed),
        "off" => None,
        other => bail!("--shuffle {other}: use on or off"),
    };
    let hot = match &args.strategies {
        Some(spec) => Some(crate::hot::HotSchedule::parse(spec, devices)?),
        None => None,
    };
    let strategy = match &hot {
        Some(h) => h.entries[h.inst].0.clone(),
        None => Strategy::parse(
            args.strategy.as_deref().unwrap_or(&format!("dp{devices}")),
            devices,
        )?,
    };
    let max_len = args.max_len.unwrap_or(cfg.max_position_embeddings);
    let ds = Dataset::load(data, cfg.vocab_size, max_len)?;
    let steps = (0..args.steps)
        .map(|s| {
            ds.batch(s, args.global_batch, shuffle)
                .iter()
                .map(|q| q.len())
                .collect()
        })
        .collect();
    Ok(PlanInputs {
        cfg,
        devices,
        strategy,
        hot,
        micro_batch_tokens: args.micro_batch_tokens[0],
        steps,
    })
}

/// The planner of `--strategies auto` from the calibration `profile`, and the instantiation
/// strategy it picks for the run's `first` batch (lengths).
pub(super) fn auto_planner(
    args: &Args,
    cfg: &LlamaConfig,
    profile: &std::path::Path,
    first: &[usize],
) -> Result<(planner::Planner, Strategy)> {
    let cluster = sim::presets::cluster_or_file(&profile.display().to_string())
        .with_context(|| format!("--profile {}", profile.display()))?;
    anyhow::ensure!(
        cluster.devices() == args.devices,
        "--profile {} is for {} devices, the run has {} (run `hotspa profile --devices {}`)",
        profile.display(),
        cluster.devices(),
        args.devices,
        args.devices
    );
    let mut cost = planner::CostModel::new(cluster, cfg.clone());
    cost.packing = planner::Packing::InOrder {
        budget: args.micro_batch_tokens[0],
    };
    let p = planner::Planner::new(cost);
    let (plan, _) = p.auto(first)?;
    Ok((p, plan.inst))
}
