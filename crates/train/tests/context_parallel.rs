//! Context parallelism and activation recomputation through the library on thread ranks: CP
//! strategies (ring and Ulysses, with DP, TP and PP beside them), each without and with
//! selective and full recomputation, and hot schedules switching between a DP and a CP strategy
//! end three AdamW steps with the single-device weights, on long-tailed packed batches.

use planner::Plan;
use train::{NoSink, StrategySpec, TrainConfig, TrainOutcome};

mod common;

/// 24 sequences, long-tailed: lengths cycle 3, 9, 2, 70, 5, 14, 160, 6 (2-token ones included:
/// shorter than the 2·cp chunks a CP group cuts them in).
fn config(devices: usize, strategy: StrategySpec) -> TrainConfig {
    let seqs = common::sequences(24, &[3, 9, 2, 70, 5, 14, 160, 6]);
    common::config(devices, strategy, seqs, 200)
}

fn run(cfg: &TrainConfig) -> TrainOutcome {
    train::run(cfg, &mut NoSink).unwrap_or_else(|e| panic!("{:?}: {e}", cfg.strategy))
}

fn check(out: &TrainOutcome, reference: &TrainOutcome, what: &str) {
    let (got, want) = (
        out.weights.as_ref().unwrap(),
        reference.weights.as_ref().unwrap(),
    );
    let (name, worst) = got.worst_difference(want);
    assert!(worst <= 1e-5, "{what}: {name} differs by {worst:e}");
    common::same_steps(&out.steps, &reference.steps, what, 1e-5);
}

fn single() -> TrainOutcome {
    run(&config(1, StrategySpec::Fixed(graph::Strategy::single())))
}

#[test]
fn cp_strategies_end_with_the_single_device_weights() {
    let reference = single();
    for (spec, n) in [
        ("cp2", 2),
        ("cp4", 4),
        ("dp2cp2", 4),
        ("tp2cp2", 4),
        ("cp2pp2", 4),
        ("cp2ulysses", 2),
        ("cp4ulysses", 4),
        ("dp2cp2ulysses", 4),
        ("tp2cp2ulysses", 4),
        ("cp2pp2ulysses", 4),
        ("cp4zero2", 4),
    ] {
        let s = graph::Strategy::parse(spec, n).unwrap();
        let plain = run(&config(n, StrategySpec::Fixed(s)));
        check(&plain, &reference, spec);
        // Recomputation runs the same kernels on the same inputs: bitwise the same run.
        for mode in ["selective", "full"] {
            let with = format!("{spec}+{mode}");
            let s = graph::Strategy::parse(&with, n).unwrap();
            let out = run(&config(n, StrategySpec::Fixed(s)));
            check(&out, &reference, &with);
            let (tensor, worst) = out
                .weights
                .as_ref()
                .unwrap()
                .worst_difference(plain.weights.as_ref().unwrap());
            assert_eq!(worst, 0.0, "{with}: {tensor} differs from {spec}'s");
        }
    }
}

#[test]
fn hot_schedules_switch_between_dp_and_cp_inside_a_step() {
    let reference = single();
    for schedule in [
        "dp4:10,cp4:max",
        "dp4:20,dp2cp2ulysses:max",
        "cp2tp2:10,dp4zero1:max",
        "dp4+selective:10,cp4+full:max",
        "tp2pp2+full:10,dp2cp2ulysses+selective:max",
    ] {
        let plan = Plan::parse(schedule, 4).unwrap();
        let out = run(&config(4, StrategySpec::Hot(plan)));
        check(&out, &reference, schedule);
        for m in &out.steps {
            let hot = m.hot.as_ref().expect("hot switching reports its switches");
            assert_eq!(hot.strategy_seconds.len(), 2, "{schedule}: step {}", m.step);
        }
    }
}
