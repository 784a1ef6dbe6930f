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
    pub max_len: usize,
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
        max_len,
        steps,
    })
}

/// The planner of `--strategies auto` from the calibration `profile`, and the instantiation
/// strategy it picks on the run's first batch.
pub(super) fn auto_planner(
    args: &Args,
    cfg: &LlamaConfig,
    profile: &std::path::Path,
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
    let inp = plan_inputs_steps(args, cfg, 1)?;
    let first = inp.first().cloned().unwrap_or_default();
    let (plan, _) = p.auto(&first)?;
    let inst = plan.inst;
    Ok((p, inst))
}

/// The lengths of the first `steps` global batches of the run (starting at its first step).
fn plan_inputs_steps(args: &Args, cfg: &LlamaConfig, steps: usize) -> Result<Vec<Vec<usize>>> {
    let shuffle = match args.shuffle.as_str() {
        "on" => Some(args.seed),
        _ => None,
    };
    let max_len = args.max_len.unwrap_or(cfg.max_position_embeddings);
    let ds = match (&args.data_files, &args.data) {
        (Some(files), _) => Dataset::from_text_files(files, max_len)?,
        (None, Some(p)) => Dataset::load(p, cfg.vocab_size, max_len)?,
        (None, None) => bail!("no training data"),
    };
    Ok((0..steps)
        .map(|s| {
            ds.batch(s, args.global_batch, shuffle)
                .iter()
                .map(|q| q.len())
                .collect()
        })
        .collect())
}
