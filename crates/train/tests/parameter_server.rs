//! The parameter server on thread ranks: BSP on it is the all-reduce run, SSP keeps every
//! worker within its staleness bound of the slowest (an ASP run with the same straggler does
//! not), and ASP gets through the same samples sooner than BSP when one worker is slow.

use model::Weights;
use train::{
    NoSink, ParamServers, Placement, SlowRank, StrategySpec, SyncMode, TrainConfig, TrainOutcome,
    WorkerStep,
};

mod common;

/// 64 sequences whose lengths cycle 3, 9, 2, 30, 5, 14, dp over every worker.
fn config(workers: usize, servers: Option<usize>, sync: SyncMode) -> TrainConfig {
    let strategy =
        StrategySpec::Fixed(graph::Strategy::parse(&format!("dp{workers}"), workers).unwrap());
    let seqs = common::sequences(64, &[3, 9, 2, 30, 5, 14]);
    let mut cfg = common::config(workers, strategy, seqs, 32);
    cfg.sync = sync;
    cfg.ps = servers.map(|servers| ParamServers {
        servers,
        placement: Placement::Dedicated,
    });
    cfg
}

fn run(cfg: &TrainConfig) -> TrainOutcome {
    train::run(cfg, &mut NoSink).unwrap_or_else(|e| panic!("{} {:?}: {e}", cfg.sync, cfg.ps))
}

fn weights(out: &TrainOutcome) -> &Weights {
    out.weights
        .as_ref()
        .expect("thread ranks return the weights")
}

#[test]
fn bsp_on_the_parameter_server_is_the_all_reduce_run() {
    let reference = run(&config(4, None, SyncMode::Bsp));
    for (servers, placement) in [(1, Placement::Dedicated), (3, Placement::CoLocated)] {
        let mut cfg = config(4, Some(servers), SyncMode::Bsp);
        cfg.ps = Some(ParamServers { servers, placement });
        let out = run(&cfg);
        let (name, worst) = weights(&out).worst_difference(weights(&reference));
        assert!(
            worst <= 1e-5,
            "{servers} servers: {name} differs by {worst:e}"
        );
        assert_eq!(out.steps.len(), 3);
        common::same_steps(
            &out.steps,
            &reference.steps,
            &format!("{servers} servers"),
            1e-4,
        );
        // Every worker took every step, each with the current parameters.
        assert_eq!(out.worker_steps.len(), 12);
        assert!(out.worker_steps.iter().all(|s| s.staleness == 0));
    }
    let init = Weights::random(&config(1, None, SyncMode::Bsp).model, 3);
    assert!(
        weights(&reference).worst_difference(&init).1 > 1e-4,
        "training changed nothing"
    );
}

/// The most steps any worker began ahead of the slowest one's completed steps, from the
/// workers' own timestamps: when worker `w` starts its step `c` (having completed `c − 1`),
/// the slowest has completed the fewest steps of any worker still running at that moment.
fn most_ahead(steps: &[WorkerStep], workers: usize) -> usize {
    let mut worst = 0;
    for s in steps {
        let slowest = (0..workers)
            .filter(|&w| w != s.worker)
            .filter_map(|w| {
                let mine: Vec<&WorkerStep> = steps.iter().filter(|x| x.worker == w).collect();
                // A worker that has already taken its last step no longer holds anyone back.
                let last = mine.iter().map(|x| x.finished_s).fold(0.0, f64::max);
                if last < s.started_s {
                    return None;
                }
                Some(mine.iter().filter(|x| x.finished_s <= s.started_s).count())
            })
            .min();
        if let Some(slowest) = slowest {
            worst = worst.max((s.step - 1).saturating_sub(slowest));
        }
    }
    worst
}

fn straggling(sync: SyncMode, steps: usize) -> TrainOutcome {
    let mut cfg = config(4, Some(1), sync);
    cfg.steps = steps;
    cfg.slow_ranks = vec![SlowRank {
        rank: 3,
        factor: 4.0,
    }];
    run(&cfg)
}

#[test]
fn ssp_keeps_every_worker_within_its_bound_and_asp_does_not() {
    let bound = 2;
    let ssp = straggling(SyncMode::Ssp { staleness: bound }, 12);
    let asp = straggling(SyncMode::Asp, 12);
    for out in [&ssp, &asp] {
        // Every share of the 12 × 4 was trained once.
        let mut shares: Vec<usize> = out.worker_steps.iter().map(|s| s.share).collect();
        shares.sort();
        assert_eq!(shares, (0..48).collect::<Vec<_>>());
        assert_eq!(out.steps.len(), 12);
    }
    let (s, a) = (
        most_ahead(&ssp.worker_steps, 4),
        most_ahead(&asp.worker_steps, 4),
    );
    assert!(
        s <= bound,
        "SSP let a worker run {s} steps ahead (bound {bound})"
    );
    assert!(
        a > bound,
        "ASP with a 4× straggler stayed within {a} steps: the check cannot fail"
    );
    // The straggler took fewer shares than the others under both.
    let count = |o: &TrainOutcome, w| o.worker_steps.iter().filter(|s| s.worker == w).count();
    // (Thread ranks on two busy cores do not share the work evenly among the fast workers.)
    let busiest = (0..3).map(|w| count(&asp, w)).max().unwrap_or(0);
    assert!(
        count(&asp, 3) < busiest,
        "the straggler took as many shares as the busiest"
    );
}

#[test]
fn asp_gets_through_the_samples_sooner_than_bsp_with_a_straggler() {
    // 32 steps: ASP ends when the straggler's last share does, and its first share (one-time
    // costs, slowed 4×) alone lasted about as long as 8 steps of BSP — with 8 steps a third of
    // the runs had ASP no faster (0.14–0.16 s against 0.15–0.17), with 32 none in 14 (≈ 0.3×).
    let steps = 32;
    let bsp = straggling(SyncMode::Bsp, steps);
    let asp = straggling(SyncMode::Asp, steps);
    assert_eq!(bsp.worker_steps.len(), 4 * steps);
    assert_eq!(asp.worker_steps.len(), 4 * steps);
    let loss = |o: &TrainOutcome| o.steps.last().map(|m| m.loss).unwrap_or(f32::NAN);
    eprintln!(
        "{} worker steps: BSP {:.3} s (loss {:.4}), ASP {:.3} s (loss {:.4})",
        4 * steps,
        bsp.seconds,
        loss(&bsp),
        asp.seconds,
        loss(&asp)
    );
    assert!(
        asp.seconds < 0.8 * bsp.seconds,
        "ASP {:.3} s vs BSP {:.3} s",
        asp.seconds,
        bsp.seconds
    );
}
