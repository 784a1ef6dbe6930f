//! `hotspa plan`: the cost model's estimate of a training command — the same flags as
//! `hotspa train` — calibrated by `hotspa profile`, with the best static strategy and the
//! automatic plan for its batches, and (`--compare`) the prediction against a run's metrics.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use planner::Planner;
use serde::Serialize;

#[derive(ClapArgs)]
pub struct PlanArgs {
    /// The flags of `hotspa train`, `--profile` (the calibration from `hotspa profile
    /// --devices N`) required.
    #[command(flatten)]
    train: crate::flags::TrainFlags,
    /// A `--metrics` file of the same run: predicted against measured step seconds.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// The best static strategy and the automatic plan beside the run's also search context
    /// parallelism and recomputation (what `hotspa train --strategies auto --plan-context`
    /// plans).
    #[arg(long)]
    context: bool,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StepRow {
    step: usize,
    tokens: usize,
    predicted_s: f64,
    measured_s: Option<f64>,
    breakdown: planner::Breakdown,
}

#[derive(Serialize)]
struct Report {
    plan: String,
    rows: Vec<StepRow>,
    /// Median over steps of predicted / measured (steps after the first).
    median_ratio: Option<f64>,
    /// Mean predicted and measured seconds over steps after the first.
    mean_predicted_s: f64,
    mean_measured_s: Option<f64>,
    best_static: String,
    best_static_s: f64,
    auto: String,
    auto_s: f64,
    planning_s: f64,
}

/// `hotspa plan --sim-cluster C`: the run timed by the cost model and by the simulator's clock
/// (the same run, every kernel and message) on cluster `C`, step by step.
fn against_the_clock(args: &PlanArgs) -> Result<()> {
    let mut flags = args.train.clone();
    let name = flags.sim_cluster.take().unwrap_or_default();
    let cfg = flags.config()?;
    let devices = cfg.devices;
    let cluster =
        sim::presets::cluster_or_file(&name).with_context(|| format!("--sim-cluster {name}"))?;
    let rows = train::clock_against_model(&cfg, &cluster)?;
    crate::output::emit(args.json, &rows, |rows| {
        println!(
            "{} on {} ({devices} devices): the cost model against the simulator's clock",
            train::plan_of(&cfg)
                .map(|p| p.to_string())
                .unwrap_or_default(),
            cluster.take(devices).name
        );
        println!(
            "{:>5} {:>12} {:>12} {:>7}",
            "step", "model s", "clock s", "ratio"
        );
        for r in rows {
            println!(
                "{:>5} {:>12.6} {:>12.6} {:>7.3}",
                r.step,
                r.predicted_s,
                r.clocked_s,
                r.predicted_s / r.clocked_s
            );
        }
    })
}

pub fn run(args: PlanArgs) -> Result<()> {
    if args.train.sim_cluster.is_some() {
        anyhow::ensure!(
            args.compare.is_none() && !args.context,
            "--sim-cluster compares the cost model with the simulator's clock on that cluster; \
             --compare and --context belong to the estimate against --profile"
        );
        return against_the_clock(&args);
    }
    let devices = args.train.device_count()?;
    let profile = args.train.profile.as_ref().with_context(|| {
        format!("pass --profile FILE (write one with `hotspa profile --devices {devices}`)")
    })?;
    let cluster = sim::presets::cluster_or_file(&profile.display().to_string())
        .with_context(|| format!("--profile {}", profile.display()))?;
    anyhow::ensure!(
        cluster.devices() == devices,
        "the profile is for {} devices, the run has {devices} (run `hotspa profile --devices {devices}`)",
        cluster.devices(),
    );
    let cfg = args.train.config()?;
    let plan = train::plan_of(&cfg)
        .context("hotspa plan estimates a given strategy or schedule, not --strategies auto")?;
    let steps = train::batch_lengths(&cfg)?;
    let mut planner = Planner::new(train::cost_model(&cfg, cluster));
    let measured: Vec<f64> = match &args.compare {
        Some(p) => train::read_metrics(p)?.iter().map(|m| m.seconds).collect(),
        None => Vec::new(),
    };
    let mut rows = Vec::new();
    for (k, lens) in steps.iter().enumerate() {
        let e = planner.evaluate(&plan, lens)?;
        rows.push(StepRow {
            step: k + 1,
            tokens: lens.iter().sum(),
            predicted_s: e.seconds,
            measured_s: measured.get(k).copied(),
            breakdown: e.breakdown,
        });
    }
    // The first step pays one-time costs (allocation, thread start): leave it out.
    let rest: Vec<&StepRow> = rows.iter().skip(usize::from(rows.len() > 1)).collect();
    let mut ratios: Vec<f64> = rest
        .iter()
        .filter_map(|r| r.measured_s.map(|m| r.predicted_s / m))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let all: Vec<usize> = steps.concat();
    // Chosen for all the batches at once, estimated step by step as the run's plan is.
    planner.context = args.context;
    let (bs_plan, _) = planner.best_static(&all)?;
    let t0 = std::time::Instant::now();
    let (auto_plan, _) = planner.auto(&all)?;
    let per_step = |p: &planner::Plan| -> Result<f64> {
        let mut t = 0.0;
        for lens in &steps {
            t += planner.evaluate(p, lens)?.seconds;
        }
        Ok(t / steps.len().max(1) as f64)
    };
    let planning_s = t0.elapsed().as_secs_f64();
    let report = Report {
        plan: plan.to_string(),
        median_ratio: (!ratios.is_empty()).then(|| ratios[ratios.len() / 2]),
        mean_predicted_s: mean(rest.iter().map(|r| r.predicted_s).collect()),
        mean_measured_s: (!measured.is_empty())
            .then(|| mean(rest.iter().filter_map(|r| r.measured_s).collect())),
        rows,
        best_static: bs_plan.to_string(),
        best_static_s: per_step(&bs_plan)?,
        auto: auto_plan.to_string(),
        auto_s: per_step(&auto_plan)?,
        planning_s,
    };
    crate::output::emit(args.json, &report, |r| {
        println!("plan {}", r.plan);
        println!(
            "{:>5} {:>8} {:>12} {:>12} {:>7}",
            "step", "tokens", "predicted s", "measured s", "ratio"
        );
        for row in &r.rows {
            println!(
                "{:>5} {:>8} {:>12.4} {:>12} {:>7}",
                row.step,
                row.tokens,
                row.predicted_s,
                row.measured_s.map_or("-".into(), |m| format!("{m:.4}")),
                row.measured_s
                    .map_or("-".into(), |m| format!("{:.2}", row.predicted_s / m))
            );
        }
        if let (Some(m), Some(ratio)) = (r.mean_measured_s, r.median_ratio) {
            println!(
                "steps 2..: mean predicted {:.4} s, measured {:.4} s ({:+.1}%), median ratio {:.2}",
                r.mean_predicted_s,
                m,
                (r.mean_predicted_s / m - 1.0) * 100.0,
                ratio
            );
        }
        println!(
            "over these batches: best static {} at {:.4} s/step; automatic plan {} at {:.4} s/step (planned in {:.2} s)",
            r.best_static, r.best_static_s, r.auto, r.auto_s, r.planning_s
        );
    })
}
