//! Cluster simulation (DESIGN §2.5): a cluster (presets `a800x32`, `h100x8`, or TOML), a model
//! (presets `llama2-7b`, `llama2-13b`, `llama-32b`), a dataset of sequence lengths (presets
//! `commoncrawl`, `github`, or a file), and for one global batch the estimate of (a) the best
//! static strategy that holds the longest sequence, (b) the HotSPa paper's hand-picked buckets
//! and strategies, (c) our automatic plan — all by the `planner` cost model.
//!
//! The simulator's clock also drives the real runtime: [`SimBackend`] and [`SimComm`] run every
//! kernel and message for real and advance a virtual [`Clock`] per rank by the cluster's rates
//! and links, so `hotspa train --sim-cluster C` trains exactly as usual and also reports what
//! each step would take on `C` (with this machine's profile as `C`, a prediction to check
//! against the measured step).
//!
//! ```
//! let s = sim::Scenario {
//!     cluster: sim::presets::cluster("a800x32")?,
//!     gpus: 8,
//!     model: "llama2-7b".into(),
//!     dataset: "commoncrawl".into(),
//!     max_len: 8192,
//!     global_batch: 64,
//!     seed: 1,
//!     exchange: Default::default(),
//! };
//! let r = sim::simulate(&s)?;
//! assert!(r.auto.seconds <= r.fixed.seconds);
//! assert!(r.paper.as_ref().is_some_and(|p| r.auto.seconds <= p.seconds));
//! # Ok::<(), sim::SimError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

pub mod baselines;
mod clock;
mod error;
mod network;
pub mod presets;
pub mod sharing;
pub mod topology;

use graph::{Strategy, Zero};
use model::LlamaConfig;
use planner::exchange::{Exchange, ExchangeCost};
use planner::{CostModel, Estimate, Plan, Planner};
use serde::Serialize;

pub use clock::{Clock, ClockReading, CoreShare, Phase, SimBackend};
pub use error::{Result, SimError};
pub use network::SimComm;

/// One simulated setting.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The cluster (only its first `gpus` devices are used).
    pub cluster: planner::Cluster,
    /// Devices used.
    pub gpus: usize,
    /// A model preset or config.
    pub model: String,
    /// A dataset preset or a file of lengths.
    pub dataset: String,
    /// Documents are cut to this length.
    pub max_len: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// Seed of the sampled lengths.
    pub seed: u64,
    /// How DP replicas exchange gradients.
    pub exchange: Exchange,
}

/// The three plans of one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `model/gpus`, e.g. `llama2-7b/8`.
    pub setting: String,
    /// The dataset.
    pub dataset: String,
    /// Longest length.
    pub max_len: usize,
    /// Sequences in the batch.
    pub sequences: usize,
    /// Tokens in the batch.
    pub tokens: usize,
    /// (a) the best static strategy.
    pub fixed: Estimate,
    /// (b) the paper's hand-picked plan (the faster of its 3- and 4-bucket tables), when the
    /// paper has one for this model and device count and it fits.
    pub paper: Option<Estimate>,
    /// (c) the automatic plan.
    pub auto: Estimate,
    /// Planning time of (c), seconds.
    pub planning_seconds: f64,
    /// (a) / (c).
    pub speedup_over_static: f64,
    /// (b) / (c).
    pub speedup_over_paper: Option<f64>,
    /// The longest single switch of (b) (between its instantiation strategy and a bucket's,
    /// or two buckets'), seconds: the paper reports one hot switch under 1 s for 32B on 32 GPUs.
    pub paper_longest_switch: Option<f64>,
    /// (a) and (c) again with context parallelism and recomputation in the search, when asked.
    pub context: Option<ContextPlans>,
    /// Megatron-LM and DeepSpeed as the paper ran them ([`baselines`]), when they hold a
    /// sample of the context length.
    pub baselines: Vec<baselines::BaselineEstimate>,
    /// Two groups of devices training at the same time ([`Planner::concurrent`]; with CP and
    /// recomputation in the groups' candidates when the context plans are asked for): `None`
    /// in the paper's grid, or where no split holds the batch.
    pub concurrent: Option<ConcurrentPlan>,
    /// Up to [`planner::MAX_GROUPS`] groups of devices training at the same time, each on the
    /// sequences of a range of lengths under its own strategy (with CP in the candidates, each
    /// sequence under its group's CP degree: [`Planner::concurrent_groups`]); `None` as
    /// `concurrent`.
    pub groups: Option<ConcurrentPlan>,
    /// Why the plain plans (`fixed`, `auto`, `paper`) are the context search's: no strategy
    /// without CP or recomputation holds the batch (`None` where they are the plain search's).
    pub without_context: Option<String>,
    /// No plan runs the batch faster than this, seconds: its model FLOPs at the fastest rates
    /// the cluster's kernels reach, every device busy all the time
    /// ([`CostModel::least_device_seconds`] over the devices) — what the plans leave on the
    /// table.
    pub floor_seconds: f64,
}

/// The best concurrent plan of a setting.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrentPlan {
    /// Its estimate (the plan, e.g. `dp2tp4spzero1:2048 | tp8pp2sp:max`).
    pub estimate: Estimate,
    /// The search's time, seconds.
    pub planning_seconds: f64,
    /// The best static strategy of the same search space over this plan.
    pub speedup_over_static: f64,
}

/// The best concurrent plan for `lens` by `planner` of two groups, against the static
/// strategy's `fixed` seconds.
fn concurrent_plan(
    planner: &Planner,
    lens: &[usize],
    fixed: f64,
) -> Result<Option<ConcurrentPlan>> {
    let t0 = std::time::Instant::now();
    Ok(planner
        .concurrent(lens)?
        .map(|(_, estimate)| ConcurrentPlan {
            speedup_over_static: fixed / estimate.seconds,
            planning_seconds: t0.elapsed().as_secs_f64(),
            estimate,
        }))
}

/// The best plan of up to [`planner::MAX_GROUPS`] concurrent groups for `lens` (the two-group
/// plans among them: never slower than [`concurrent_plan`]'s), against the static strategy's
/// `fixed` seconds.
fn groups_plan(planner: &Planner, lens: &[usize], fixed: f64) -> Result<Option<ConcurrentPlan>> {
    let t0 = std::time::Instant::now();
    let found = planner.concurrent_groups(lens, planner::MAX_GROUPS)?;
    let planning_seconds = t0.elapsed().as_secs_f64();
    Ok(found.map(|(_, estimate)| ConcurrentPlan {
        speedup_over_static: fixed / estimate.seconds,
        planning_seconds,
        estimate,
    }))
}

impl Report {
    /// A baseline's seconds over the automatic plan's (and over the paper's plan's), for
    /// `system`.
    pub fn speedup_over(&self, system: baselines::Baseline) -> Option<(f64, Option<f64>)> {
        let b = self.baselines.iter().find(|b| b.system == system)?;
        Some((
            b.estimate.seconds / self.auto.seconds,
            self.paper.as_ref().map(|p| b.estimate.seconds / p.seconds),
        ))
    }
}

/// The best static strategy and the automatic plan when the candidates also vary the CP degree,
/// ring or Ulysses, and recomputation.
#[derive(Debug, Clone, Serialize)]
pub struct ContextPlans {
    /// The best static strategy (which may use CP and recomputation).
    pub fixed: Estimate,
    /// The automatic plan.
    pub auto: Estimate,
    /// Planning time of the automatic plan, seconds.
    pub planning_seconds: f64,
    /// `fixed / auto`: per-length strategies over the best single one, both with CP.
    pub speedup_over_static: f64,
    /// The plain (c) over this automatic plan: what CP and recomputation add.
    pub speedup_over_plain: f64,
}

/// `[dp, tp, pp]`.
type Dims = [usize; 3];

/// HotSPa's hand-picked `(dp, tp, pp)` per bucket at 32K, longest bucket first: three buckets
/// (16K,32K] / (4K,16K] / (0,4K] and four buckets (16K,32K] / (8K,16K] / (4K,8K] / (0,4K].
fn paper_table(model: &str, gpus: usize) -> Option<([Dims; 3], [Dims; 4])> {
    Some(match (model, gpus) {
        ("llama2-7b", 8) => (
            [[1, 4, 2], [2, 2, 2], [8, 1, 1]],
            [[1, 4, 2], [2, 2, 2], [4, 2, 1], [8, 1, 1]],
        ),
        ("llama2-7b", 16) => (
            [[2, 4, 2], [4, 4, 1], [16, 1, 1]],
            [[2, 4, 2], [4, 4, 1], [8, 2, 1], [16, 1, 1]],
        ),
        ("llama2-13b", 8) => (
            [[1, 8, 1], [1, 4, 2], [4, 2, 1]],
            [[1, 8, 1], [1, 4, 2], [2, 2, 2], [4, 2, 1]],
        ),
        ("llama2-13b", 16) => (
            [[2, 8, 1], [4, 4, 1], [8, 2, 1]],
            [[2, 8, 1], [4, 4, 1], [4, 2, 2], [8, 2, 1]],
        ),
        ("llama-32b", 32) => (
            [[1, 16, 2], [2, 8, 2], [4, 2, 4]],
            [[1, 16, 2], [2, 8, 2], [4, 4, 2], [4, 2, 4]],
        ),
        _ => return None,
    })
}

/// A strategy of the paper's tables: SP with TP, the optimizer distributed over DP (ZeRO-1).
fn strategy([dp, tp, pp]: [usize; 3]) -> Strategy {
    Strategy {
        dp,
        cp: 1,
        cp_exchange: graph::CpExchange::Ring,
        recompute: graph::Recompute::None,
        tp,
        pp,
        sp: tp > 1,
        zero: if dp > 1 { Zero::Optimizer } else { Zero::Off },
    }
}

/// The paper's plans for `model` on `gpus` devices cut at `max_len` (smaller maxima drop the top
/// buckets; the last bucket ends at `max_len`); the instantiation strategy is the one with the
/// least model state per device (the most TP × PP).
pub fn paper_plans(model: &str, gpus: usize, max_len: usize) -> Vec<Plan> {
    let Some((three, four)) = paper_table(model, gpus) else {
        return Vec::new();
    };
    let build = |edges: &[usize], table: &[[usize; 3]]| {
        // `edges` and `table` ascending.
        let mut buckets = Vec::new();
        for (&e, &t) in edges.iter().zip(table) {
            let top = e.min(max_len);
            buckets.push((top, strategy(t)));
            if top == max_len {
                break;
            }
        }
        let inst = buckets
            .iter()
            .map(|(_, s)| s.clone())
            .max_by_key(|s| s.tp * s.pp)
            .unwrap_or_else(|| strategy(table[0]));
        Plan::new(buckets, inst)
    };
    let mut t3: Vec<[usize; 3]> = three.to_vec();
    t3.reverse();
    let mut t4: Vec<[usize; 3]> = four.to_vec();
    t4.reverse();
    vec![
        build(&[4096, 16384, 32768], &t3),
        build(&[4096, 8192, 16384, 32768], &t4),
    ]
}

/// One strategy's estimate of a setting, with the figures published training runs report.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyEstimate {
    /// The strategy.
    pub strategy: String,
    /// The cluster.
    pub cluster: String,
    /// Devices.
    pub gpus: usize,
    /// The estimate of a step.
    pub estimate: Estimate,
    /// Tokens per second per device.
    pub tokens_per_s_per_gpu: f64,
    /// Model FLOPs (the GEMMs' `6·N` per token and causal attention's) per second per device,
    /// in TFLOP/s; recomputation not counted.
    pub model_tflops_per_gpu: f64,
    /// `model_tflops_per_gpu` over the device's dense peak.
    pub mfu: f64,
}

/// `spec` (a strategy over `s.gpus` devices) on the setting's batch, micro-batches of at most
/// `micro_batch_tokens` (default: as many as memory holds): its estimate, refused by name where
/// it does not hold the longest sequence.
pub fn one_strategy(
    s: &Scenario,
    spec: &str,
    micro_batch_tokens: Option<usize>,
) -> Result<StrategyEstimate> {
    check_gpus(s)?;
    let mut planner = planner_of(s, model_of(s)?);
    if let Some(budget) = micro_batch_tokens {
        planner.cost.packing = data::Packing::InOrder { budget };
    }
    let strategy =
        Strategy::parse(spec, s.gpus).map_err(|e| SimError::Invalid(format!("--strategy {e}")))?;
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let longest = lens.iter().copied().max().unwrap_or(0);
    let cap = planner.cost.capacity(&strategy, &strategy);
    if cap < longest {
        return Err(SimError::Invalid(format!(
            "{strategy} holds at most {cap} tokens per micro-batch on {} (memory), the batch has a sequence of {longest}",
            s.cluster.name
        )));
    }
    let estimate = planner
        .evaluate(&Plan::single(strategy.clone()), &lens)
        .map_err(|e| SimError::Invalid(e.to_string()))?;
    let (gemm, attention) = planner.cost.flops(&lens);
    let per_gpu = |x: f64| x / estimate.seconds / s.gpus as f64;
    let tflops = per_gpu(gemm + attention) / 1e12;
    Ok(StrategyEstimate {
        strategy: strategy.to_string(),
        cluster: s.cluster.name.clone(),
        gpus: s.gpus,
        tokens_per_s_per_gpu: per_gpu(lens.iter().sum::<usize>() as f64),
        model_tflops_per_gpu: tflops,
        mfu: tflops / s.cluster.peak_tflops,
        estimate,
    })
}

/// Runs one setting.
pub fn simulate(s: &Scenario) -> Result<Report> {
    check_gpus(s)?;
    let planner = planner_of(s, model_of(s)?);
    let mut r = report(&planner, s)?;
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    r.concurrent = concurrent_plan(&planner, &lens, r.fixed.seconds)?;
    r.groups = groups_plan(&planner, &lens, r.fixed.seconds)?;
    Ok(r)
}

fn check_gpus(s: &Scenario) -> Result<()> {
    if s.gpus == 0 || s.gpus > s.cluster.devices() {
        return Err(SimError::Invalid(format!(
            "--gpus {}: the cluster {} has {} devices",
            s.gpus,
            s.cluster.name,
            s.cluster.devices()
        )));
    }
    Ok(())
}

/// [`simulate`] with the [`ContextPlans`] too.
pub fn simulate_with_context(s: &Scenario) -> Result<Report> {
    check_gpus(s)?;
    let cfg = model_of(s)?;
    let mut ctx = planner_of(s, cfg.clone());
    ctx.context = true;
    let mut r = report_with_context(&planner_of(s, cfg), &ctx, s)?;
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let fixed = r
        .context
        .as_ref()
        .map_or(r.fixed.seconds, |c| c.fixed.seconds);
    r.concurrent = concurrent_plan(&ctx, &lens, fixed)?;
    r.groups = groups_plan(&ctx, &lens, fixed)?;
    Ok(r)
}

/// [`report`], adding the plans `ctx` (a planner with [`Planner::context`]) finds.
pub fn report_with_context(planner: &Planner, ctx: &Planner, s: &Scenario) -> Result<Report> {
    // Contexts no strategy holds without CP or recomputation: the plain rows are the context
    // search's own, and say so.
    let mut r = match report(planner, s) {
        Err(SimError::Plan(e @ planner::PlanError::TooLong { .. })) => Report {
            without_context: Some(e.to_string()),
            ..report(ctx, s)?
        },
        other => other?,
    };
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let (_, fixed) = ctx.best_static(&lens)?;
    let t0 = std::time::Instant::now();
    let (_, auto) = ctx.auto(&lens)?;
    r.context = Some(ContextPlans {
        speedup_over_static: fixed.seconds / auto.seconds,
        speedup_over_plain: r.auto.seconds / auto.seconds,
        planning_seconds: t0.elapsed().as_secs_f64(),
        fixed,
        auto,
    });
    Ok(r)
}

fn planner_of(s: &Scenario, cfg: LlamaConfig) -> Planner {
    let mut cost = CostModel::new(s.cluster.take(s.gpus), cfg);
    cost.exchange = s.exchange;
    Planner::new(cost)
}

fn model_of(s: &Scenario) -> Result<LlamaConfig> {
    LlamaConfig::preset_or_load(&s.model).map_err(|_| SimError::UnknownPreset {
        what: "model",
        name: s.model.clone(),
        known: "llama2-7b, llama2-13b, llama-32b".into(),
    })
}

/// One way of exchanging the gradients of the static strategy.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeRow {
    /// The exchange, e.g. `int8, auto`.
    pub exchange: String,
    /// How it moves the data: the all-reduce algorithm of an exact sum (what `auto` chose for
    /// the whole gradient), random-k's values and PowerSGD's factors; `a2a+ag` (a dense codec's
    /// all-to-all and all-gather), `ag` (top-k's all-gather), `2-level` (exact in nodes, the
    /// codec across).
    pub algorithm: String,
    /// Its cost per step.
    pub cost: ExchangeCost,
    /// The static strategy's step with this exchange, seconds.
    pub step_seconds: f64,
}

/// The gradient exchange of a setting's best static strategy, several ways.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeReport {
    /// The static strategy.
    pub strategy: String,
    /// Gradient values one DP member exchanges per step.
    pub values: f64,
    /// DP members, and how many share a node.
    pub members: usize,
    /// Members of one DP group on a node.
    pub per_node: usize,
    /// One row per exchange, in the order given.
    pub rows: Vec<ExchangeRow>,
    /// The same strategy under each communication and pipeline schedule.
    pub schedules: Vec<ScheduleRow>,
}

/// The static strategy's step under one schedule (the exchange as the scenario gives it).
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleRow {
    /// The flag and its value, e.g. `--comm-schedule priority`.
    pub schedule: String,
    /// The step, seconds; `None` where the strategy cannot run under it (see `note`).
    pub step_seconds: Option<f64>,
    /// Why not, or what else changes (PipeDream-2BW's one-step-old weights).
    pub note: String,
}

/// The static `plan` on `lens` under every schedule: the gradient reduction by fifo or by
/// priority (pure DP without ZeRO only), and with pipeline stages 1F1B, GPipe and
/// PipeDream-2BW.
fn schedules(planner: &Planner, plan: &planner::Plan, lens: &[usize]) -> Vec<ScheduleRow> {
    use graph::Schedule;
    let s = &plan.inst;
    let under = |f: &dyn Fn(&mut CostModel)| -> Option<f64> {
        let mut cost = planner.cost.clone();
        f(&mut cost);
        Planner::new(cost)
            .evaluate(plan, lens)
            .ok()
            .map(|e| e.seconds)
    };
    let mut rows = vec![ScheduleRow {
        schedule: "--comm-schedule fifo".into(),
        step_seconds: under(&|_| {}),
        note: String::new(),
    }];
    let mut prio = planner.cost.clone();
    prio.priority = true;
    rows.push(if prio.by_priority(s) {
        ScheduleRow {
            schedule: "--comm-schedule priority".into(),
            step_seconds: under(&|c| c.priority = true),
            note: String::new(),
        }
    } else {
        ScheduleRow {
            schedule: "--comm-schedule priority".into(),
            step_seconds: None,
            note: "pure DP without ZeRO only".into(),
        }
    });
    if s.pp > 1 {
        for (sched, note) in [
            (Schedule::OneFOneB, ""),
            (Schedule::GPipe, ""),
            (Schedule::TwoBw, "one-step-old weights"),
        ] {
            let ok = sched != Schedule::TwoBw || s.zero < graph::Zero::Parameters;
            rows.push(ScheduleRow {
                schedule: format!("--pipeline-schedule {sched}"),
                step_seconds: if ok {
                    under(&|c| c.schedule = sched)
                } else {
                    None
                },
                note: if ok {
                    note.into()
                } else {
                    "not with ZeRO-3".into()
                },
            });
        }
    }
    rows
}

/// The best static strategy of `s` as a job sharing the links between nodes with others
/// ([`sharing`]): its step's compute, its DP exchange's seconds alone, and how much of the
/// exchange the backward hides (the exchange's seconds less what shows in the step).
pub fn job_load(s: &Scenario) -> Result<(String, sharing::JobLoad)> {
    let planner = planner_of(s, model_of(s)?);
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let (plan, est) = planner.best_static(&lens)?;
    let exchange = planner.cost.dp_exchange(&plan.inst).seconds;
    let shows = est.breakdown.dp_reduce.min(exchange);
    Ok((
        plan.inst.to_string(),
        sharing::JobLoad {
            compute: est.seconds - shows,
            exchange,
            overlap: exchange - shows,
        },
    ))
}

/// Each of `exchanges` for the gradients of the best static strategy of `s` (chosen under
/// `s.exchange`): when a codec or an algorithm pays on this cluster.
pub fn exchanges(s: &Scenario, exchanges: &[Exchange]) -> Result<ExchangeReport> {
    let planner = planner_of(s, model_of(s)?);
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let (plan, fixed) = planner.best_static(&lens)?;
    let strategy = plan.inst.clone();
    let base = fixed.seconds - fixed.breakdown.dp_reduce;
    let values = planner.cost.params() / (strategy.tp * strategy.pp) as f64;
    let shape = planner.cost.dp_shape(&strategy);
    let rows = exchanges
        .iter()
        .map(|given| {
            let mut cost = planner.cost.clone();
            cost.exchange = *given;
            let c = cost.dp_exchange(&strategy);
            // `auto`'s choice for the whole gradient, as one bucket.
            let e = &given.adapt(&cost.cluster, values, shape);
            use comm::codec::Codec;
            let exact = e
                .algorithm_for(&cost.cluster, values * cost.cluster.elem_bytes, shape)
                .to_string();
            let algorithm = match e.codec {
                _ if e.cross_node_only && e.codec != Codec::None => "2-level".to_string(),
                Codec::None | Codec::RandK(_) | Codec::PowerSgd(_) => exact,
                Codec::TopK(_) | Codec::Dgc(_) => "ag".to_string(),
                _ => "a2a+ag".to_string(),
            };
            ExchangeRow {
                exchange: if given.adaptive {
                    format!("auto: {}", e.codec_label())
                } else {
                    e.to_string()
                },
                algorithm,
                cost: c,
                step_seconds: base + c.seconds,
            }
        })
        .collect();
    Ok(ExchangeReport {
        strategy: strategy.to_string(),
        values,
        members: shape.members,
        per_node: shape.per_node,
        rows,
        schedules: schedules(&planner, &plan, &lens),
    })
}

/// Runs one setting with a planner that may be shared between settings of one model and
/// device count (its switch-time cache then serves them all).
pub fn report(planner: &Planner, s: &Scenario) -> Result<Report> {
    let lens = presets::lengths(&s.dataset, s.global_batch, s.max_len, s.seed)?;
    let (_, fixed) = planner.best_static(&lens)?;
    let t0 = std::time::Instant::now();
    let (_, auto) = planner.auto(&lens)?;
    let planning_seconds = t0.elapsed().as_secs_f64();
    let paper = paper_plans(&s.model, s.gpus, s.max_len)
        .into_iter()
        .filter_map(|p| planner.evaluate(&p, &lens).ok().map(|e| (p, e)))
        .min_by(|a, b| a.1.seconds.total_cmp(&b.1.seconds));
    let paper_longest_switch = match &paper {
        Some((p, _)) => Some(longest_switch(planner, p)?),
        None => None,
    };
    let paper = paper.map(|(_, e)| e);
    Ok(Report {
        setting: format!("{}/{}", s.model, s.gpus),
        dataset: s.dataset.clone(),
        max_len: s.max_len,
        sequences: lens.len(),
        tokens: lens.iter().sum(),
        speedup_over_static: fixed.seconds / auto.seconds,
        speedup_over_paper: paper.as_ref().map(|p| p.seconds / auto.seconds),
        paper_longest_switch,
        fixed,
        paper,
        auto,
        planning_seconds,
        context: None,
        concurrent: None,
        groups: None,
        without_context: None,
        floor_seconds: lens
            .iter()
            .map(|&l| planner.cost.least_device_seconds(l))
            .sum::<f64>()
            / s.gpus.max(1) as f64,
        baselines: [
            baselines::Baseline::MegatronLm,
            baselines::Baseline::DeepSpeed,
        ]
        .into_iter()
        .filter_map(|b| baselines::baseline(b, &planner.cost, &lens, s.max_len).ok())
        .collect(),
    })
}

/// The longest single switch between any two of `plan`'s layouts (its instantiation strategy's
/// and its buckets'), seconds.
pub fn longest_switch(planner: &Planner, plan: &Plan) -> Result<f64> {
    let layouts: Vec<&Strategy> = std::iter::once(&plan.inst)
        .chain(plan.buckets.iter().map(|(_, s)| s))
        .collect();
    let mut longest = 0.0f64;
    for a in &layouts {
        for b in &layouts {
            let t = planner
                .switch_seconds(a, b)
                .map_err(|e| SimError::Invalid(e.to_string()))?;
            longest = longest.max(t);
        }
    }
    Ok(longest)
}

/// The paper's grid: {7B/8, 7B/16, 13B/8, 13B/16, 32B/32} × {4K, 8K, 16K, 32K} ×
/// {commoncrawl, github} on `a800x32`, `global_batch` sequences per step; with `context` each
/// setting also gets its [`ContextPlans`].
pub fn paper_grid(global_batch: usize, seed: u64, context: bool) -> Result<Vec<Report>> {
    let cluster = presets::cluster("a800x32")?;
    let mut out = Vec::new();
    for (model, gpus) in [
        ("llama2-7b", 8),
        ("llama2-7b", 16),
        ("llama2-13b", 8),
        ("llama2-13b", 16),
        ("llama-32b", 32),
    ] {
        let cfg = LlamaConfig::preset(model)
            .ok_or_else(|| SimError::Invalid(format!("no preset {model}")))?;
        let planner = Planner::new(CostModel::new(cluster.take(gpus), cfg.clone()));
        let mut ctx = Planner::new(CostModel::new(cluster.take(gpus), cfg));
        ctx.context = true;
        for max_len in [4096, 8192, 16384, 32768] {
            for dataset in presets::PAPER_DATASETS {
                let scenario = Scenario {
                    cluster: cluster.clone(),
                    gpus,
                    model: model.into(),
                    dataset: dataset.into(),
                    max_len,
                    global_batch,
                    seed,
                    exchange: Exchange::default(),
                };
                out.push(if context {
                    report_with_context(&planner, &ctx, &scenario)?
                } else {
                    report(&planner, &scenario)?
                });
            }
        }
    }
    Ok(out)
}

/// The global batches of [`batch_sweep`].
pub const SWEPT_BATCHES: [usize; 4] = [128, 256, 512, 1024];

/// The paper's claim that the gain grows with the global batch (fewer pipeline bubbles in the
/// long buckets), checked on its largest setting: LLaMA 32B on 32 GPUs, CommonCrawl at 32K, for
/// each of [`SWEPT_BATCHES`].
pub fn batch_sweep(seed: u64) -> Result<Vec<Report>> {
    let cluster = presets::cluster("a800x32")?;
    let cfg = LlamaConfig::preset("llama-32b")
        .ok_or_else(|| SimError::Invalid("no preset llama-32b".into()))?;
    let planner = Planner::new(CostModel::new(cluster.take(32), cfg));
    SWEPT_BATCHES
        .iter()
        .map(|&global_batch| {
            report(
                &planner,
                &Scenario {
                    cluster: cluster.clone(),
                    gpus: 32,
                    model: "llama-32b".into(),
                    dataset: "commoncrawl".into(),
                    max_len: 32768,
                    global_batch,
                    seed,
                    exchange: Exchange::default(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_switch_is_the_slowest_pair_of_layouts() {
        let cluster = presets::cluster("a800x32").unwrap();
        let cfg = LlamaConfig::preset("llama2-7b").unwrap();
        let planner = Planner::new(CostModel::new(cluster.take(8), cfg));
        let dp = Strategy::parse("dp8zero1", 8).unwrap();
        let tp = Strategy::parse("dp2tp4sp", 8).unwrap();
        assert_eq!(
            longest_switch(&planner, &Plan::single(dp.clone())).unwrap(),
            0.0
        );
        let plan = Plan::new(vec![(4096, dp.clone()), (8192, tp.clone())], dp.clone());
        let want = planner
            .switch_seconds(&dp, &tp)
            .unwrap()
            .max(planner.switch_seconds(&tp, &dp).unwrap());
        assert!(want > 0.0);
        assert_eq!(longest_switch(&planner, &plan).unwrap(), want);
    }

    #[test]
    fn paper_plans_drop_the_top_buckets_below_32k() {
        let plans = paper_plans("llama2-7b", 8, 8192);
        let four = &plans[1];
        let got: Vec<(usize, String)> = four
            .buckets
            .iter()
            .map(|(e, s)| (*e, s.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (4096, "dp8zero1".to_string()),
                (8192, "dp4tp2spzero1".to_string())
            ]
        );
        assert_eq!(four.inst.to_string(), "dp4tp2spzero1");
        assert_eq!(plans[0].buckets.len(), 2);
        assert_eq!(plans[0].buckets[1].0, 8192);
        assert!(paper_plans("llama2-7b", 4, 8192).is_empty());
    }

    #[test]
    fn datasets_are_long_tailed_and_cut() {
        let cc = presets::lengths("commoncrawl", 4000, 32768, 3).unwrap();
        let gh = presets::lengths("github", 4000, 32768, 3).unwrap();
        assert!(cc.iter().all(|&l| (2..=32768).contains(&l)));
        let above =
            |v: &[usize], t: usize| v.iter().filter(|&&l| l > t).count() as f64 / v.len() as f64;
        assert!(above(&cc, 4096) > 0.04 && above(&cc, 4096) < 0.13);
        assert!(above(&gh, 16384) > above(&cc, 16384));
        assert_eq!(cc, presets::lengths("commoncrawl", 4000, 32768, 3).unwrap());
        let e = presets::lengths("wiki", 4, 10, 0).unwrap_err().to_string();
        assert!(e.contains("use commoncrawl, github"), "{e}");
    }

    #[test]
    fn files_of_lengths_and_clusters_are_checked() {
        let dir = std::env::temp_dir().join(format!("hotspa-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("lens.txt");
        std::fs::write(&f, "100 200\n300 x\n").unwrap();
        let e = presets::lengths(f.to_str().unwrap(), 4, 1000, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: `x` is not a length"), "{e}");
        std::fs::write(&f, "100 5000\n").unwrap();
        assert_eq!(
            presets::lengths(f.to_str().unwrap(), 3, 1000, 0).unwrap(),
            vec![100, 1000, 100]
        );
        let c = dir.join("c.toml");
        let preset = presets::cluster("h100x8").unwrap();
        let text = format!(
            "name = \"mine\"\nnodes = 2\ndevices_per_node = 4\npeak_tflops = 100.0\nmemory_gib = 40.0\n\
             [efficiency]\nmax = 0.5\nhalf_tokens = 128.0\nhalf_width = 128.0\nattention = 0.3\n\
             [same_node]\ngbps = 100.0\nlatency_us = 2.0\n[cross_node]\ngbps = {}\nlatency_us = 9.0\n",
            preset.cross_node.gbps
        );
        std::fs::write(&c, text).unwrap();
        let got = presets::cluster_or_file(c.to_str().unwrap()).unwrap();
        assert_eq!(got.devices(), 8);
        std::fs::write(&c, "name = \"x\"\nnodes = 0\n").unwrap();
        let e = presets::cluster_or_file(c.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With CP and recomputation searched, the plans are never slower than without (the search
    /// space only grows) and the static strategy and the plan both fit.
    #[test]
    fn searching_context_parallelism_never_loses() {
        let s = Scenario {
            cluster: presets::cluster("a800x32").unwrap(),
            gpus: 8,
            model: "llama2-7b".into(),
            dataset: "github".into(),
            max_len: 32768,
            global_batch: 96,
            seed: 2,
            exchange: Exchange::default(),
        };
        let r = simulate_with_context(&s).unwrap();
        let c = r.context.as_ref().unwrap();
        assert!(c.fixed.seconds <= r.fixed.seconds + 1e-9, "{r:?}");
        assert!(c.auto.seconds <= r.auto.seconds + 1e-9, "{r:?}");
        assert!(c.auto.seconds <= c.fixed.seconds + 1e-9, "{r:?}");
        // The floor is under every plan and not far under the best (a bound of nothing would
        // be 0; one at a tenth of the plans would say little).
        let all = [&r.fixed, &r.auto, &c.fixed, &c.auto];
        assert!(r.floor_seconds > 0.0, "{r:?}");
        for e in all {
            assert!(
                r.floor_seconds <= e.seconds,
                "{} < {}",
                e.seconds,
                r.floor_seconds
            );
            assert!(e.seconds < 10.0 * r.floor_seconds, "{r:?}");
        }
    }

    #[test]
    fn the_automatic_plan_is_never_slower_than_the_papers_in_the_grid() {
        for r in paper_grid(96, 2, false).unwrap() {
            assert!(r.auto.seconds <= r.fixed.seconds + 1e-9, "{r:?}");
            if let Some(p) = &r.paper {
                assert!(
                    r.auto.seconds <= p.seconds + 1e-9,
                    "{} {} {}: auto {} vs paper {}",
                    r.setting,
                    r.max_len,
                    r.dataset,
                    r.auto.seconds,
                    p.seconds
                );
            }
        }
    }
}
