//! `hotspa simulate`: a cluster setting by the cost model — the best static strategy, the
//! HotSPa paper's hand-picked plan, and our automatic plan — or the paper's whole grid.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use serde::Serialize;
use sim::{Report, Scenario};

#[derive(ClapArgs)]
pub struct Args {
    /// A cluster preset (a800x32, h100x8) or a TOML file with its fields.
    #[arg(long, default_value = "a800x32")]
    cluster: String,
    /// Devices used (the cluster's first ones, node by node).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// A model preset (llama2-7b, llama2-13b, llama-32b) or an HF config.json.
    #[arg(long, default_value = "llama2-7b")]
    model: String,
    /// A dataset preset (commoncrawl, github) or a file of whitespace-separated lengths.
    #[arg(long, default_value = "commoncrawl")]
    dataset: String,
    /// Documents are cut to this many tokens.
    #[arg(long, default_value_t = 32768)]
    max_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 512)]
    global_batch: usize,
    /// Seed of the sampled lengths.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The paper's grid ({7B/8, 7B/16, 13B/8, 13B/16, 32B/32} × {4K, 8K, 16K, 32K} ×
    /// {commoncrawl, github} on a800x32) as one table.
    #[arg(long)]
    paper: bool,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Grid {
    global_batch: usize,
    rows: Vec<Report>,
}

fn gib(b: f64) -> String {
    format!("{:.1}", b / (1u64 << 30) as f64)
}

fn one(r: &Report) {
    println!(
        "{} on {} tokens ({} sequences cut at {}), {}",
        r.setting,
        r.tokens,
        r.auto.sequences.iter().sum::<usize>(),
        r.max_len,
        r.dataset
    );
    println!(
        "{:<8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7}  plan",
        "", "step s", "compute", "tp", "bubble", "pp", "dp", "switch", "tokens/s", "GiB"
    );
    let rows: [(&str, Option<&planner::Estimate>); 3] = [
        ("static", Some(&r.fixed)),
        ("paper", r.paper.as_ref()),
        ("auto", Some(&r.auto)),
    ];
    for (name, e) in rows {
        let Some(e) = e else {
            println!("{name:<8} (no hand-picked plan for this setting, or it does not fit)");
            continue;
        };
        let b = &e.breakdown;
        println!(
            "{:<8} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.0} {:>7}  {}",
            name,
            e.seconds,
            b.compute,
            b.tp_comm,
            b.bubble,
            b.pp_comm,
            b.dp_reduce,
            b.switch,
            e.tokens_per_s,
            gib(e.memory_bytes),
            e.plan
        );
    }
    println!(
        "auto: {:.2}× the static strategy{}; planned in {:.2} s",
        r.speedup_over_static,
        r.speedup_over_paper
            .map(|x| format!(", {x:.2}× the paper's plan"))
            .unwrap_or_default(),
        r.planning_seconds
    );
}

pub fn run(args: Args) -> Result<()> {
    if args.paper {
        let rows = sim::paper_grid(args.global_batch, args.seed)?;
        let grid = Grid {
            global_batch: args.global_batch,
            rows,
        };
        return crate::output::emit(args.json, &grid, |g| {
            println!(
                "HotSPa's settings on a800x32, {} sequences per step; step seconds by the cost model",
                g.global_batch
            );
            println!(
                "{:<14} {:>6} {:<12} {:>8} {:>8} {:>8} {:>10} {:>10}  auto plan",
                "setting", "max", "dataset", "static", "paper", "auto", "vs static", "vs paper"
            );
            for r in &g.rows {
                println!(
                    "{:<14} {:>6} {:<12} {:>8.2} {:>8} {:>8.2} {:>9.2}× {:>10}  {}",
                    r.setting,
                    r.max_len,
                    r.dataset,
                    r.fixed.seconds,
                    r.paper
                        .as_ref()
                        .map_or("-".into(), |p| format!("{:.2}", p.seconds)),
                    r.auto.seconds,
                    r.speedup_over_static,
                    r.speedup_over_paper
                        .map_or("-".into(), |x| format!("{x:.2}×")),
                    r.auto.plan
                );
            }
        });
    }
    let cluster = sim::presets::cluster_or_file(&args.cluster)
        .with_context(|| format!("--cluster {}", args.cluster))?;
    let r = sim::simulate(&Scenario {
        cluster,
        gpus: args.gpus,
        model: args.model,
        dataset: args.dataset,
        max_len: args.max_len,
        global_batch: args.global_batch,
        seed: args.seed,
    })?;
    crate::output::emit(args.json, &r, one)
}
