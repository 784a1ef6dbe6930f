//! `hotspa simulate`: a cluster setting by the cost model — the best static strategy, the
//! HotSPa paper's hand-picked plan, and our automatic plan — or the paper's whole grid.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use comm::allreduce::Algorithm;
use planner::exchange::{AlgorithmChoice, Exchange};
use serde::Serialize;
use sim::{Report, Scenario};

#[derive(ClapArgs)]
pub struct Args {
    /// A cluster preset (a800x32, h100x8, h100x128, h100x1024, eth8x8) or a TOML file with its
    /// fields.
    #[arg(long, default_value = "a800x32")]
    cluster: String,
    /// Devices used (the cluster's first ones, node by node).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// A model preset (llama2-7b, llama2-13b, llama-32b) or an HF config.json.
    #[arg(long, default_value = "llama2-7b")]
    model: String,
    /// A dataset preset (commoncrawl, github: the HotSPa paper's shapes; crates-io: a real
    /// corpus with a tail past 1M tokens) or a file of whitespace-separated lengths.
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
    /// Also search context parallelism (CP 2–8, ring or Ulysses) and activation recomputation:
    /// the best static strategy and the automatic plan with them, beside those without (always
    /// on with --paper).
    #[arg(long)]
    context: bool,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// The DP gradient codec the plans are costed with (as `train --grad-compression`); with
    /// any of these four flags, a table of every codec and algorithm for the static strategy's
    /// gradients follows, saying which pay on this cluster.
    #[arg(long, default_value = "none")]
    grad_compression: String,
    /// on or off (as `train --error-feedback`; changes bytes and time not at all, the loss
    /// the simulator does not model).
    #[arg(long, default_value = "on")]
    error_feedback: String,
    /// Compress only across nodes (as `train --compress-cross-node-only`).
    #[arg(long)]
    compress_cross_node_only: bool,
    /// The all-reduce algorithm (as `train --allreduce`).
    #[arg(long, default_value = "ring")]
    allreduce: String,
    /// Estimate this one strategy (as `train --strategy`, e.g. dp16zero3+full) on the batch
    /// instead of searching: its step, tokens/s per GPU, model TFLOP/s per GPU and MFU — what
    /// published training throughputs are checked against (docs/cost-model.md).
    #[arg(long)]
    strategy: Option<String>,
    /// With --strategy: micro-batches of at most this many tokens, in batch order (default: as
    /// many as memory holds).
    #[arg(long, requires = "strategy")]
    micro_batch_tokens: Option<usize>,
    /// Instead: one synchronisation of --model's fp32 gradients by parameter server, ring,
    /// hierarchical all-reduce and in-network aggregation on a fat-tree (1:1 and 4:1), BCube
    /// and one NVLink node, over TCP, RDMA and NVLink (the survey's Table 4 by the α–β model).
    #[arg(long)]
    sync_table: bool,
    /// Instead: N jobs like this one (its best static strategy) whose DP exchanges share the
    /// links between nodes (one NIC per node, or one oversubscribed switch): each job's step
    /// alone, with the link shared fairly, and by priority in job order.
    #[arg(long)]
    jobs: Option<usize>,
}

/// The codecs and algorithms the exchange table compares.
const TABLE_CODECS: [&str; 12] = [
    "none",
    "bf16",
    "fp16",
    "int8",
    "sign",
    "qsgd:15",
    "topk:0.01",
    "oktopk:0.01",
    "dgc:0.01",
    "okdgc:0.01",
    "randk:0.01",
    "powersgd:4",
];

fn exchange_table(r: &sim::ExchangeReport, chosen: &str) {
    println!(
        "\ngradient exchange of the static strategy {} ({:.0} M values per member, {} members, {} per node):",
        r.strategy,
        r.values / 1e6,
        r.members,
        r.per_node
    );
    println!(
        "{:<30} {:>7} {:>9} {:>9} {:>11} {:>11} {:>8}",
        "exchange", "algo", "dp s", "step s", "GB in node", "GB across", "vs ring"
    );
    let base = r.rows.first().map_or(1.0, |x| x.step_seconds);
    for row in &r.rows {
        println!(
            "{:<30} {:>7} {:>9.3} {:>9.3} {:>11.2} {:>11.2} {:>7.3}×{}",
            row.exchange,
            row.algorithm,
            row.cost.seconds,
            row.step_seconds,
            row.cost.intra_bytes / 1e9,
            row.cost.inter_bytes / 1e9,
            base / row.step_seconds,
            if row.exchange == chosen || (chosen == "auto:" && row.exchange.starts_with("auto:")) {
                "  ← chosen"
            } else {
                ""
            }
        );
    }
    println!(
        "(bytes: all members together; step: the static strategy with that exchange; a codec's \
         effect on the loss is not modelled — see docs/communication.md's measured table; \
         dgc:F at its final density; --optimizer onebit-adam after its warm-up exchanges as \
         `sign` over the whole group does)"
    );
    println!("\nschedules of the static strategy {}:", r.strategy);
    println!("{:<36} {:>9} {:>11}", "schedule", "step s", "vs default");
    let base = r.schedules.first().and_then(|x| x.step_seconds);
    for row in &r.schedules {
        match (row.step_seconds, base) {
            (Some(t), Some(b)) => println!(
                "{:<36} {t:>9.3} {:>10.3}×{}",
                row.schedule,
                b / t,
                if row.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", row.note)
                }
            ),
            _ => println!(
                "{:<36} {:>9} {:>11}  ({})",
                row.schedule, "—", "—", row.note
            ),
        }
    }
}

#[derive(Serialize)]
struct Grid {
    global_batch: usize,
    rows: Vec<Report>,
    /// LLaMA 32B on 32 GPUs, CommonCrawl at 32K, by global batch.
    by_batch: Vec<Report>,
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
        "{:<10} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7}  plan",
        "", "step s", "compute", "tp", "bubble", "pp", "dp", "switch", "tokens/s", "GiB"
    );
    let baseline = |b: sim::baselines::Baseline| {
        r.baselines
            .iter()
            .find(|x| x.system == b)
            .map(|x| &x.estimate)
    };
    let rows: Vec<(&str, Option<&planner::Estimate>)> = [
        ("megatron", baseline(sim::baselines::Baseline::MegatronLm)),
        ("deepspeed", baseline(sim::baselines::Baseline::DeepSpeed)),
        ("static", Some(&r.fixed)),
        ("paper", r.paper.as_ref()),
        ("auto", Some(&r.auto)),
    ]
    .into_iter()
    .chain(
        r.context
            .iter()
            .flat_map(|c| [("static+cp", Some(&c.fixed)), ("auto+cp", Some(&c.auto))]),
    )
    .chain([
        ("concurrent", r.concurrent.as_ref().map(|c| &c.estimate)),
        ("groups", r.groups.as_ref().map(|c| &c.estimate)),
    ])
    .collect();
    for (name, e) in rows {
        if let (Some(why), "static" | "paper" | "auto") = (&r.without_context, name) {
            println!("{name:<10} (without CP or recomputation: {why})");
            continue;
        }
        let Some(e) = e else {
            println!(
                "{name:<10} ({})",
                if name == "paper" {
                    "no hand-picked plan for this setting, or it does not fit"
                } else if name == "concurrent" || name == "groups" {
                    "no split of the devices into groups holds the batch"
                } else {
                    "no configuration holds a sample of the context length"
                }
            );
            continue;
        };
        let b = &e.breakdown;
        println!(
            "{:<10} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.0} {:>7}  {}",
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
    if r.without_context.is_none() {
        println!(
            "auto: {:.2}× the static strategy{}; planned in {:.2} s",
            r.speedup_over_static,
            r.speedup_over_paper
                .map(|x| format!(", {x:.2}× the paper's plan"))
                .unwrap_or_default(),
            r.planning_seconds
        );
    }
    if let Some(t) = r.paper_longest_switch {
        println!(
            "the paper's plan's longest single switch: {}",
            crate::output::seconds(t)
        );
    }
    if let Some(c) = &r.context {
        println!(
            "with CP and recomputation searched: auto+cp {:.2}× static+cp{}; planned in {:.2} s",
            c.speedup_over_static,
            if r.without_context.is_none() {
                format!(", {:.2}× auto", c.speedup_over_plain)
            } else {
                String::new()
            },
            c.planning_seconds
        );
    }
    if let Some(c) = &r.concurrent {
        println!(
            "concurrent (two groups of devices at once{}): {:.2}× the static strategy{}; planned in {:.2} s",
            if r.context.is_some() { ", CP and recomputation in the groups" } else { "" },
            c.speedup_over_static,
            if r.context.is_some() { " with CP" } else { "" },
            c.planning_seconds
        );
    }
    if let Some(c) = &r.groups {
        println!(
            "groups (up to {} groups of devices at once, each on a range of lengths{}): {:.2}× the static strategy{}; planned in {:.2} s",
            planner::MAX_GROUPS,
            if r.context.is_some() {
                ", each sequence under its group's CP degree"
            } else {
                ""
            },
            c.speedup_over_static,
            if r.context.is_some() { " with CP" } else { "" },
            c.planning_seconds
        );
    }
    floor(r);
    for b in [
        sim::baselines::Baseline::MegatronLm,
        sim::baselines::Baseline::DeepSpeed,
    ] {
        if let Some((auto, paper)) = r.speedup_over(b) {
            println!(
                "{b} as the paper ran it (samples of {} tokens, attention across each, one strategy): auto {auto:.2}×{}",
                r.max_len,
                paper.map(|p| format!(", the paper's plan {p:.2}×")).unwrap_or_default()
            );
        }
    }
}

/// `--sync-table`: the survey's comparison for one model's gradients.
/// `--jobs K`: K copies of the scenario's best static strategy sharing the links between nodes.
fn jobs(scenario: &Scenario, k: usize, json: bool) -> Result<()> {
    if k == 0 {
        anyhow::bail!("--jobs 0 is out of range: must be at least 1");
    }
    let (strategy, load) = sim::job_load(scenario)?;
    let loads = vec![load; k];
    let steps = 200;
    #[derive(Serialize)]
    struct Sharing {
        strategy: String,
        load: sim::sharing::JobLoad,
        alone: f64,
        fair: Vec<f64>,
        priority: Vec<f64>,
    }
    let out = Sharing {
        strategy,
        load,
        alone: load.alone(),
        fair: sim::sharing::share(&loads, sim::sharing::Policy::Fair, steps),
        priority: sim::sharing::share(&loads, sim::sharing::Policy::Priority, steps),
    };
    crate::output::emit(json, &out, |o| {
        println!(
            "{k} jobs of {} sharing the links between nodes: a step computes {:.3} s, its DP \
             exchange takes {:.3} s alone of which {:.3} s hide under the backward",
            o.strategy, o.load.compute, o.load.exchange, o.load.overlap
        );
        println!("alone: {:.3} s a step", o.alone);
        for (name, t) in [("fair", &o.fair), ("priority", &o.priority)] {
            let each: Vec<String> = t
                .iter()
                .map(|s| format!("{s:.3} s ({:.2}×)", s / o.alone))
                .collect();
            println!("{name:<9} {}", each.join(", "));
        }
        println!(
            "(mean over each job's first {steps} steps; fair: equal shares of the link while \
             several exchange; priority: job 1 first, then 2, …; crates/sim/src/sharing.rs)"
        );
    })
}

fn sync_table(args: &Args) -> Result<()> {
    let cfg = model::LlamaConfig::preset_or_load(&args.model)
        .with_context(|| format!("--model {}", args.model))?;
    let params: usize = model::param_specs(&cfg).iter().map(|p| p.numel()).sum();
    // The whole gradient at once, and one bucket of the size the runtime reduces at a time.
    let tables = vec![
        sim::topology::sync_table(4.0 * params as f64),
        sim::topology::sync_table(4.0 * 1024.0 * 1024.0),
    ];
    crate::output::emit(args.json, &tables, |tables| {
        for (k, t) in tables.iter().enumerate() {
            if k == 0 {
                println!(
                    "one synchronisation of {}'s fp32 gradients ({:.1} GB per worker), seconds by the α–β model",
                    args.model,
                    t.bytes / 1e9
                );
            } else {
                println!("\none 4 MiB bucket (what the runtime reduces at a time), milliseconds");
            }
            print!("{:<40}", "architecture");
            for (c, w) in t.columns.iter().zip(&t.workers) {
                print!(" {:>24}", format!("{c} ({w})"));
            }
            println!();
            for r in &t.rows {
                print!("{:<40}", r.architecture);
                for s in &r.seconds {
                    let s = s.map(|s| if k == 0 { s } else { s * 1e3 });
                    print!(" {:>24}", s.map_or("-".into(), |s| format!("{s:.3}")));
                }
                println!();
            }
        }
        println!(
            "(fat-tree 8 racks × 8 servers, BCube(8,1) 64 servers with 2 NICs, 100 Gb/s NICs; \
             TCP α 30 µs at 70% of line rate, RDMA α 3 µs at 95%, NVLink α 2 µs at 300 GB/s; \
             pushes and pulls pipelined, links full duplex; formulas in crates/sim/src/topology.rs)"
        );
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.sync_table {
        return sync_table(&args);
    }
    if args.paper {
        let rows = sim::paper_grid(args.global_batch, args.seed, true)?;
        let grid = Grid {
            global_batch: args.global_batch,
            rows,
            by_batch: sim::batch_sweep(args.seed)?,
        };
        return crate::output::emit(args.json, &grid, |g| {
            println!(
                "HotSPa's settings on a800x32, {} sequences per step; step seconds by the cost model",
                g.global_batch
            );
            use sim::baselines::Baseline::{DeepSpeed, MegatronLm};
            println!(
                "{:<14} {:>6} {:<12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}  auto plan | auto+cp plan",
                "setting", "max", "dataset", "Megatron", "DeepSpd", "static", "paper", "auto",
                "auto+cp", "pap/Meg", "pap/DS", "auto/Meg", "auto/DS", "st/auto"
            );
            let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}×"));
            let secs = |r: &sim::Report, b| {
                r.baselines
                    .iter()
                    .find(|e| e.system == b)
                    .map_or("-".to_string(), |e| format!("{:.2}", e.estimate.seconds))
            };
            for r in &g.rows {
                let c = r.context.as_ref();
                let (meg, ds) = (r.speedup_over(MegatronLm), r.speedup_over(DeepSpeed));
                println!(
                    "{:<14} {:>6} {:<12} {:>9} {:>9} {:>8.2} {:>8} {:>8.2} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8.2}×  {} | {}",
                    r.setting,
                    r.max_len,
                    r.dataset,
                    secs(r, MegatronLm),
                    secs(r, DeepSpeed),
                    r.fixed.seconds,
                    r.paper
                        .as_ref()
                        .map_or("-".into(), |p| format!("{:.2}", p.seconds)),
                    r.auto.seconds,
                    c.map_or("-".into(), |c| format!("{:.2}", c.auto.seconds)),
                    x(meg.and_then(|m| m.1)),
                    x(ds.and_then(|d| d.1)),
                    x(meg.map(|m| m.0)),
                    x(ds.map(|d| d.0)),
                    r.speedup_over_static,
                    r.auto.plan,
                    c.map_or("-".into(), |c| c.auto.plan.clone())
                );
            }
            // The paper's headline figures beside the grid's maxima, per dataset.
            for (dataset, meg_paper, ds_paper) in [("commoncrawl", 2.99, 5.0), ("github", 1.5, 2.6)]
            {
                let best = |b, pick: fn((f64, Option<f64>)) -> Option<f64>| {
                    g.rows
                        .iter()
                        .filter(|r| r.dataset == dataset)
                        .filter_map(|r| r.speedup_over(b).and_then(pick))
                        .fold(0.0f64, f64::max)
                };
                println!(
                    "{dataset}: the paper's plan over Megatron-LM up to {:.2}× (the paper measured up to {meg_paper}×), over DeepSpeed up to {:.2}× (paper: {ds_paper}×); our automatic plan up to {:.2}× and {:.2}×",
                    best(MegatronLm, |s| s.1),
                    best(DeepSpeed, |s| s.1),
                    best(MegatronLm, |s| Some(s.0)),
                    best(DeepSpeed, |s| Some(s.0)),
                );
            }
            // The paper's other claims: one switch under 1 s (32B on 32 GPUs), and the gain
            // growing with the global batch.
            let longest = g
                .rows
                .iter()
                .filter_map(|r| r.paper_longest_switch.map(|t| (t, r)))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((t, r)) = longest {
                println!(
                    "one hot switch of the paper's plans: at most {} ({} at {}; the paper: under 1 s for 32B on 32 GPUs)",
                    crate::output::seconds(t),
                    r.setting,
                    r.max_len
                );
            }
            println!("by global batch (llama-32b/32, commoncrawl, 32K): sequences, auto/Megatron, auto/DeepSpeed, paper/Megatron, auto/static");
            for r in &g.by_batch {
                let (meg, ds) = (r.speedup_over(MegatronLm), r.speedup_over(DeepSpeed));
                println!(
                    "  {:>5} {:>8} {:>8} {:>8} {:>7.2}×",
                    r.sequences,
                    x(meg.map(|m| m.0)),
                    x(ds.map(|d| d.0)),
                    x(meg.and_then(|m| m.1)),
                    r.speedup_over_static
                );
            }
            println!(
                "(Megatron-LM, DeepSpeed: as the paper ran them, sequences packed into samples of \
                 the context length with attention across each sample, one static strategy — \
                 crates/sim/src/baselines.rs has each assumption and its source; static, paper, \
                 auto: hotspa, variable-length attention within each document; +cp: context \
                 parallelism and recomputation in the search)"
            );
        });
    }
    let cluster = sim::presets::cluster_or_file(&args.cluster)
        .with_context(|| format!("--cluster {}", args.cluster))?;
    let exchange = crate::flags::exchange_of(
        &args.grad_compression,
        &args.error_feedback,
        args.compress_cross_node_only,
        &args.allreduce,
    )?;
    if exchange.adaptive && exchange.cross_node_only {
        anyhow::bail!(
            "--grad-compression auto chooses per bucket whether to compress across nodes only; \
             drop --compress-cross-node-only"
        );
    }
    if exchange.cross_node_only && matches!(exchange.codec, comm::codec::Codec::PowerSgd(_)) {
        anyhow::bail!(
            "--compress-cross-node-only with PowerSGD is not implemented (train refuses it too)"
        );
    }
    let scenario = Scenario {
        cluster,
        gpus: args.gpus,
        model: args.model,
        dataset: args.dataset,
        max_len: args.max_len,
        global_batch: args.global_batch,
        seed: args.seed,
        exchange,
    };
    if let Some(k) = args.jobs {
        return jobs(&scenario, k, args.json);
    }
    if let Some(spec) = &args.strategy {
        let e = sim::one_strategy(&scenario, spec, args.micro_batch_tokens)?;
        return crate::output::emit(args.json, &e, |e| {
            println!(
                "{} on {} devices of {}: {} per step, {:.0} tokens/s per GPU, {:.0} model TFLOP/s per GPU, MFU {:.1} %",
                e.strategy,
                e.gpus,
                e.cluster,
                crate::output::seconds(e.estimate.seconds),
                e.tokens_per_s_per_gpu,
                e.model_tflops_per_gpu,
                100.0 * e.mfu
            );
            let b = &e.estimate.breakdown;
            println!(
                "  compute {:.3} s, tp {:.3}, bubble {:.3}, pp {:.3}, dp {:.3}, elementwise {:.3}, optimizer {:.3}, sync {:.3}",
                b.compute, b.tp_comm, b.bubble, b.pp_comm, b.dp_reduce, b.elementwise, b.optimizer, b.sync
            );
        });
    }
    let r = if args.context {
        sim::simulate_with_context(&scenario)?
    } else {
        sim::simulate(&scenario)?
    };
    if exchange == Exchange::default() {
        return crate::output::emit(args.json, &r, one);
    }
    // Every codec with the chosen algorithm, every exact algorithm, and the chosen exchange.
    let mut candidates: Vec<Exchange> = Algorithm::ALL
        .iter()
        .map(|&a| Exchange {
            algorithm: AlgorithmChoice::Fixed(a),
            ..Exchange::default()
        })
        .collect();
    candidates.push(Exchange {
        algorithm: AlgorithmChoice::Auto,
        ..Exchange::default()
    });
    for c in TABLE_CODECS.iter().skip(1) {
        let codec: comm::codec::Codec = c.parse()?;
        // PowerSGD and DGC across nodes only are not implemented (train refuses them).
        let crosses: &[bool] = if matches!(
            codec,
            comm::codec::Codec::PowerSgd(_)
                | comm::codec::Codec::Dgc(_)
                | comm::codec::Codec::OkDgc(_)
        ) {
            &[false]
        } else {
            &[false, true]
        };
        for &cross in crosses {
            candidates.push(Exchange {
                codec,
                cross_node_only: cross,
                adaptive: false,
                ..exchange
            });
        }
    }
    if !candidates.contains(&exchange) {
        candidates.push(exchange);
    }
    let table = sim::exchanges(&scenario, &candidates)?;
    #[derive(Serialize)]
    struct Both<'a> {
        #[serde(flatten)]
        report: &'a Report,
        exchanges: &'a sim::ExchangeReport,
    }
    let both = Both {
        report: &r,
        exchanges: &table,
    };
    // `auto`'s row is named by what it chose.
    let chosen = if exchange.adaptive {
        "auto:".to_string()
    } else {
        exchange.to_string()
    };
    crate::output::emit(args.json, &both, |b| {
        one(b.report);
        exchange_table(b.exchanges, &chosen);
    })
}

/// The floor under every plan, and how far above it the static strategy and the fastest plan
/// of the report run.
fn floor(r: &sim::Report) {
    if r.floor_seconds <= 0.0 {
        return;
    }
    let fixed = r.context.as_ref().map_or(&r.fixed, |c| &c.fixed);
    let best = [Some(&r.auto), r.context.as_ref().map(|c| &c.auto)]
        .into_iter()
        .chain([&r.concurrent, &r.groups].map(|c| c.as_ref().map(|c| &c.estimate)))
        .flatten()
        .map(|e| e.seconds)
        .fold(fixed.seconds, f64::min);
    println!(
        "floor: no plan runs this batch in under {:.2} s on these devices (its model FLOPs at the \
         fastest kernel rates, every device busy); the static strategy{} takes {:.2}× that (no plan \
         can be faster than it by more), the fastest plan above {:.2}×",
        r.floor_seconds,
        if r.context.is_some() { " with CP" } else { "" },
        fixed.seconds / r.floor_seconds,
        best / r.floor_seconds,
    );
}
