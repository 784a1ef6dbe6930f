//! Training through the library on thread ranks: every static strategy, every hot-switching
//! schedule and the planner's per-step plans end with the single-device weights (DESIGN §3:
//! the gradient that reaches the optimizer is the gradient of the global batch's loss, whatever
//! the strategies, bucketing and switches).

use std::sync::Arc;

use model::Weights;
use planner::{Cluster, Efficiency, Link, Plan};
use train::{AutoPlanning, NoSink, StrategySpec, TrainConfig, TrainOutcome};

mod common;

/// 24 sequences whose lengths cycle 3, 9, 2, 30, 5, 14 (the 2-token ones are kept: one
/// prediction each).
fn config(devices: usize, strategy: StrategySpec) -> TrainConfig {
    common::config(
        devices,
        strategy,
        common::sequences(24, &[3, 9, 2, 30, 5, 14]),
        32,
    )
}

fn run(cfg: &TrainConfig) -> TrainOutcome {
    train::run(cfg, &mut NoSink).unwrap_or_else(|e| panic!("{:?}: {e}", cfg.strategy))
}

fn weights(out: &TrainOutcome) -> &Weights {
    out.weights
        .as_ref()
        .expect("thread ranks return the weights")
}

/// Every weight of `got` within `tol` of `want`, naming the tensor that differs most.
fn assert_close(got: &Weights, want: &Weights, tol: f32, what: &str) {
    let (name, worst) = got.worst_difference(want);
    assert!(worst <= tol, "{what}: {name} differs by {worst:e}");
}

fn single() -> TrainOutcome {
    run(&config(
        1,
        StrategySpec::Fixed(graph::Strategy::parse("dp1", 1).unwrap()),
    ))
}

#[test]
fn static_strategies_end_with_the_single_device_weights() {
    let reference = single();
    let init = Weights::random(
        &config(1, StrategySpec::Fixed(graph::Strategy::single())).model,
        3,
    );
    assert_ne!(weights(&reference), &init, "training changed nothing");
    assert_eq!(reference.steps.len(), 3);
    for spec in ["dp4", "tp4", "dp2tp2", "tp2pp2", "dp4zero3"] {
        let s = graph::Strategy::parse(spec, 4).unwrap();
        let out = run(&config(4, StrategySpec::Fixed(s)));
        assert_close(weights(&out), weights(&reference), 1e-5, spec);
        // The same batches: the same losses, to f32 summation order.
        common::same_steps(&out.steps, &reference.steps, spec, 1e-4);
    }
}

#[test]
fn hot_switching_schedules_end_with_the_single_device_weights() {
    let reference = single();
    // Every schedule below splits each batch; the middle bucket of the fourth never gets a
    // sequence; ZeRO-1/2/3 on both sides of the switches, ZeRO-3 as the instantiation too.
    for (schedule, inst) in [
        ("dp4:4,dp2tp2:16,tp2pp2:max", "tp2pp2"),
        ("tp4sp:10,dp4zero1:max", "tp4sp"),
        ("dp2pp2:6,tp4:max", "tp4"),
        ("dp4:5,dp2tp2:8,tp4:max", "tp4"),
        ("dp4zero3:5,dp2tp2zero2:16,tp2pp2:max", "dp4zero3"),
        ("dp4zero2:12,dp2zero3tp2:max", "dp2tp2zero3"),
    ] {
        let plan = Plan::parse(schedule, 4).unwrap();
        assert_eq!(plan.inst.to_string(), inst, "{schedule}");
        let out = run(&config(4, StrategySpec::Hot(plan)));
        assert_eq!(out.inst.to_string(), inst);
        assert_close(weights(&out), weights(&reference), 1e-5, schedule);
        for m in &out.steps {
            let hot = m.hot.as_ref().expect("hot switching reports its switches");
            assert!(
                hot.switch_bytes > 0,
                "{schedule}: step {} switched nothing",
                m.step
            );
            assert!(!hot.strategy_seconds.is_empty());
        }
    }
}

/// Concurrent groups (`|`): the devices split into groups training their share of each
/// batch at the same time, each group's gradients switched home to the instantiation and
/// summed there; the update is the single device's. The data's lengths are 2–30: the bounds
/// below split every batch between the groups.
#[test]
fn concurrent_groups_end_with_the_single_device_weights() {
    let reference = single();
    for (schedule, inst) in [
        ("dp2:5 | tp2:max", "dp2tp2"),
        // A group switching between DP and TP beside one running context parallelism.
        ("dp2:5,tp2:14 | cp2:max", "dp2tp2"),
        // A pipeline in a group, groups of unequal size, and ZeRO-3 in a group.
        ("dp2:3 | pp2:max", "dp2pp2"),
        ("dp1:3 | dp3:max", "dp4"),
        ("dp2zero3:9 | tp2:max", "dp4zero3"),
        // Three groups, as the planner's search gives them: each sequence under its group's
        // CP degree (none for the short ones).
        ("dp1:3 | dp1:9 | cp2:max", "dp4"),
        ("dp1:4 | tp2:12 | dp1:max", "dp2tp2"),
        // No group's devices divide the run's: the weights held over DP with the optimizer's
        // state sharded (on 5 devices).
        ("dp3:5 | tp2:max", "dp5zero1"),
    ] {
        let devices = if schedule.starts_with("dp3") { 5 } else { 4 };
        let plan = Plan::parse(schedule, devices).unwrap();
        assert_eq!(plan.inst.to_string(), inst, "{schedule}");
        let out = run(&config(devices, StrategySpec::Hot(plan)));
        assert_close(weights(&out), weights(&reference), 1e-5, schedule);
        common::same_steps(&out.steps, &reference.steps, schedule, 1e-4);
        for m in &out.steps {
            let hot = m
                .hot
                .as_ref()
                .expect("concurrent groups report their switches");
            assert!(
                hot.switch_bytes > 0,
                "{schedule}: step {} switched nothing",
                m.step
            );
        }
    }
}

/// A calibration under which the planner must switch: so little memory that DP4 holds only
/// ~20 tokens per micro-batch (the data has sequences of 30), TP4 ~120.
fn small_cluster() -> Cluster {
    let link = Link::new(5.0, 20.0);
    Cluster {
        efficiency: Efficiency::new(1.0, 32.0, 32.0, 0.2),
        elem_bytes: 4.0,
        memory_gbps: 10.0,
        ..Cluster::new("test", 1, 4, 0.05, 0.0000654, link, link)
    }
}

#[test]
fn planned_steps_end_with_the_single_device_weights() {
    let reference = single();
    let out = run(&config(
        4,
        StrategySpec::Auto(Box::new(AutoPlanning::new(small_cluster()))),
    ));
    assert_close(weights(&out), weights(&reference), 1e-5, "auto");
    for m in &out.steps {
        let plan = m.plan.as_ref().expect("planned steps report their plan");
        // The 30-token sequences cannot run under dp4 here: every plan switches.
        assert!(plan.plan.contains(','), "{}", plan.plan);
        assert!(plan.planning_seconds < m.seconds);
        assert!(m.hot.as_ref().is_some_and(|h| h.switch_bytes > 0));
    }
}

/// `--plan-concurrent`: where attention is slow and one replica would otherwise train a long
/// sequence alone while the others wait, the planner runs the step as concurrent groups
/// (`dp1:2 | dp3zero1:max`, `dp2zero1:16 | tp2sp:max`) with the run's instantiation strategy
/// holding the weights; the update is still the single device's. Without the flag the same
/// batches run time-multiplexed.
#[test]
fn planned_concurrent_groups_end_with_the_single_device_weights() {
    let seqs = common::sequences(24, &[3, 9, 2, 5, 14, 3, 9, 2, 30, 5, 14, 3, 9, 2, 5, 3]);
    let link = Link::new(5.0, 20.0);
    let cluster = Cluster {
        efficiency: Efficiency::new(1.0, 32.0, 32.0, 0.0005),
        elem_bytes: 4.0,
        memory_gbps: 10.0,
        ..Cluster::new("test", 1, 4, 0.05, 0.001, link, link)
    };
    let cfg = |devices, concurrent| {
        common::config(
            devices,
            if devices == 1 {
                StrategySpec::Fixed(graph::Strategy::single())
            } else {
                StrategySpec::Auto(Box::new(AutoPlanning {
                    cluster: cluster.clone(),
                    context: false,
                    concurrent,
                }))
            },
            seqs.clone(),
            64,
        )
    };
    let reference = run(&cfg(1, false));
    let plans = |out: &TrainOutcome| -> Vec<String> {
        out.steps
            .iter()
            .map(|m| m.plan.as_ref().expect("planned").plan.clone())
            .collect()
    };
    let out = run(&cfg(4, true));
    assert_close(weights(&out), weights(&reference), 1e-5, "auto, concurrent");
    common::same_steps(&out.steps, &reference.steps, "auto, concurrent", 1e-4);
    let with = plans(&out);
    assert!(with.iter().all(|p| p.contains(" | ")), "{with:?}");
    let without = plans(&run(&cfg(4, false)));
    assert!(without.iter().all(|p| !p.contains(" | ")), "{without:?}");
}

#[test]
fn the_plan_cache_keeps_the_last_plans_only() {
    use comm::{CommError, ThreadComm};
    use train::{PlannedRunner, StepInput, StepRunner};
    // Batches of different shapes give different plans; a cache of two keeps the last two.
    let cfg = config(
        4,
        StrategySpec::Auto(Box::new(AutoPlanning::new(small_cluster()))),
    );
    let planner = Arc::new(train::planner(&cfg, small_cluster()));
    let lens0: Vec<usize> = (0..8).map(|i| [3, 9, 2, 30][i % 4]).collect();
    let (plan, _) = planner.auto(&lens0).unwrap();
    let inst = plan.inst.clone();
    let batches: Vec<Vec<Vec<u32>>> = [
        vec![3usize, 9, 2, 30, 5, 14, 3, 9],
        vec![3, 3, 3, 3, 3, 3, 3, 3],
        vec![30, 30, 30, 30, 2, 2, 2, 2],
        vec![3, 9, 2, 30, 5, 14, 3, 9],
    ]
    .iter()
    .map(|lens| lens.iter().map(|&n| vec![1u32; n]).collect())
    .collect();
    let model = cfg.model.clone();
    let kept = ThreadComm::run(4, move |world| -> Result<Vec<Vec<String>>, CommError> {
        let fail = |e: train::TrainError| CommError::Unavailable(e.to_string());
        let be = kernels::CpuBackend::new(1).map_err(|e| CommError::Unavailable(e.to_string()))?;
        let me = comm::Communicator::rank(&world).0;
        let exec = model::rank_exec(&model, &inst, me)
            .map_err(|e| CommError::Unavailable(e.to_string()))?;
        let mut groups = runtime::RankGroups::new(&world, &inst)
            .map_err(|e| CommError::Unavailable(e.to_string()))?;
        let w = Weights::random(&model, 1);
        let (_, _, tp) = inst.coords(me);
        let rp = model::rank_params(&model, &exec, &w, tp)
            .map_err(|e| CommError::Unavailable(e.to_string()))?;
        let opt = runtime::Optimizer::new(
            &be,
            &exec,
            &groups,
            rp.params.clone(),
            &rp.shared,
            kernels::AdamW {
                lr: 1e-3,
                beta2: 0.95,
                weight_decay: 0.0,
                ..Default::default()
            },
            1.0,
        )
        .map_err(|e| CommError::Unavailable(e.to_string()))?;
        let setup = train::HotSetup {
            cfg: model.clone(),
            devices_per_node: 4,
            agreement: groups.agreement.clone(),
            schedule: graph::Schedule::OneFOneB,
            buckets: train::BucketSizer::Fixed(4 << 20),
        };
        let packing = data::Packing::InOrder { budget: 32 };
        let mut runner = PlannedRunner::new(planner.clone(), inst.clone(), packing, setup, 2);
        let mut seen = Vec::new();
        for batch in &batches {
            let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
            StepRunner::<kernels::CpuBackend>::gradients(
                &mut runner,
                StepInput {
                    backend: &be,
                    world: &world,
                    optimizer: &opt,
                    groups: &mut groups,
                    batch,
                    loss_scale: 1.0 / predicted as f32,
                    gate: None,
                },
            )
            .map_err(fail)?;
            seen.push(runner.cached().iter().map(|s| s.to_string()).collect());
        }
        Ok(seen)
    })
    .unwrap();
    let seen = &kept[0];
    assert!(seen.iter().all(|k| k.len() <= 2), "{seen:?}");
    // The first and the last batch are the same: the same plan, most recently used.
    assert_eq!(seen[0].last(), seen[3].last());
    let distinct: std::collections::BTreeSet<&String> = seen.iter().flatten().collect();
    assert!(
        distinct.len() >= 2,
        "the batches should plan differently: {seen:?}"
    );
}

/// With context parallelism and recomputation in the search ([`train::AutoPlanning::context`])
/// the planner trains batches that no DP × TP × PP strategy holds — a 60-token sequence on 8
/// devices whose memory gives the roomiest of those (tp4pp2) about 46 tokens — and the weights
/// still end as the single device's. Without it the run is refused before the first step.
#[test]
fn planning_with_context_parallelism_trains_what_no_plain_strategy_holds() {
    let seqs = common::sequences(24, &[3, 9, 2, 60, 5, 14]);
    let cfg = |devices, strategy| common::config(devices, strategy, seqs.clone(), 64);
    let reference = run(&cfg(
        1,
        StrategySpec::Fixed(graph::Strategy::parse("dp1", 1).unwrap()),
    ));
    let mut cluster = small_cluster();
    cluster.nodes = 2;
    cluster.memory_gib = 0.00003;
    let plain = cfg(
        8,
        StrategySpec::Auto(Box::new(AutoPlanning::new(cluster.clone()))),
    );
    let e = train::run(&plain, &mut NoSink).unwrap_err().to_string();
    assert!(
        e.contains("sequence of 60 tokens") && e.contains("--plan-context"),
        "{e}"
    );
    // The same where the first batch fits and a later one does not: the step that meets the
    // sequence names the flag too (all ranks fail alike, none hangs).
    let later = common::config(
        8,
        StrategySpec::Auto(Box::new(AutoPlanning::new(cluster.clone()))),
        common::sequences(24, &[3, 9, 2, 5, 14, 3, 9, 2, 60, 5, 14, 3, 9, 2, 5, 3]),
        64,
    );
    let e = train::run(&later, &mut NoSink).unwrap_err().to_string();
    assert!(
        e.contains("sequence of 60 tokens") && e.contains("--plan-context"),
        "{e}"
    );
    let out = run(&cfg(
        8,
        StrategySpec::Auto(Box::new(AutoPlanning {
            cluster,
            context: true,
            concurrent: false,
        })),
    ));
    assert_close(weights(&out), weights(&reference), 1e-5, "auto with CP");
    assert_eq!(out.steps.len(), 3);
    for m in &out.steps {
        let plan = &m
            .plan
            .as_ref()
            .expect("planned steps report their plan")
            .plan;
        // Every batch has a 60-token sequence: a CP or recomputing strategy takes it.
        let buckets = plan.split(" (weights").next().unwrap_or_default();
        let bucket = buckets.rsplit(',').next().unwrap_or_default();
        assert!(bucket.contains("cp") || bucket.contains('+'), "{plan}");
    }
}
