//! `--comm-schedule priority` on thread ranks: three steps of DP4 whose gradients are summed
//! during the next step, piece by piece in the forward's order, with each step's passes
//! reading the weights through the gate as they are published, against the same three steps
//! on one device; and the pieces go out in the order the forward needs the parameters.

use std::time::Duration;

use comm::{CommKind, Counting};
use graph::Schedule;
use kernels::CpuBackend;
use model::param_specs;
use runtime::stream::{forward_order, pieces, update_by_priority, PriorityUpdate};
use runtime::{pipeline_step, CommSchedule, ExactAllReduce, Gate, RankGroups};

mod common;

const STEPS: usize = 3;

fn batch(s: usize) -> Vec<Vec<u32>> {
    common::sequences(&[19, 5, 2, 40, 9, 3, 13, 7], s)
}

/// One step's passes of `mbs` reading `params`.
fn pass<'p>(
    cpu: &CpuBackend,
    exec: &graph::ExecGraph,
    groups: &mut RankGroups,
    params: impl Into<runtime::ParamView<'p, CpuBackend>>,
    shared: &[bool],
    mbs: &[runtime::MicroBatch],
) -> runtime::Result<runtime::StepGradients<CpuBackend>> {
    pipeline_step(cpu, exec, groups, params, shared, mbs, Schedule::OneFOneB)
}

/// `STEPS` steps of `spec` on `devices` thread ranks; under `priority`, each step's update is
/// summed and applied on a second thread while the next step's passes read the weights through
/// the gate (the last one alone). The global weights, the gradient norms, and the lengths of
/// the first update's summed pieces beside those its forward order gives.
fn train(
    spec: &str,
    devices: usize,
    priority: Option<f64>,
) -> (Vec<Vec<f32>>, Vec<f64>, Vec<usize>, Vec<usize>) {
    let cfg = common::config(2, 2, true, None);
    let (out, mut kept) = common::on_ranks(&cfg, spec, devices, move |world, s2, mut r| {
        let all: Vec<comm::Rank> = (0..s2.dp).map(comm::Rank).collect();
        let mut own = Counting::new(world.sub_group(&all)?);
        if let Some(defer) = priority {
            r.groups.comm_schedule = CommSchedule::Priority;
            r.groups.priority_defer = defer;
            r.groups.bucket_bytes = 700 * 4;
        }
        let mut opt = r.optimizer(f64::INFINITY)?;
        let order = forward_order(&r.exec);
        let (mut norms, mut sent, mut want) = (Vec::new(), Vec::new(), Vec::new());
        // A step's gradients and the first piece of them summed during its backward.
        let mut pending: Option<(Vec<Vec<f32>>, usize)> = None;
        for s in 0..=STEPS {
            let mbs = if s < STEPS {
                common::replica_batches(&batch(s), s2.dp, r.dp_rank)
            } else {
                Vec::new()
            };
            // Step by step, every step; by priority, the first step (no update pending).
            let Some((grads, presummed)) = pending.take() else {
                if s < STEPS {
                    let out = r.pass(opt.params(), &mbs)?;
                    match priority {
                        Some(_) => pending = Some((out.grads, out.presummed.expect("priority"))),
                        None => norms.push(opt.update(&r.cpu, &mut r.groups, out.grads, 1e-2)?),
                    }
                }
                continue;
            };
            if s == 1 {
                let lens: Vec<usize> = grads.iter().map(Vec::len).collect();
                // The update thread sums the pieces before `presummed` (the backward the
                // rest): the lengths of all, then where they split.
                want = pieces(&order, &lens, 700)
                    .iter()
                    .map(|p| p.iter().map(|(_, r)| r.len()).sum())
                    .collect();
                want.push(presummed);
                own.clear();
            }
            let mut lent = opt.lend()?;
            let gate = Gate::new(grads.len(), Duration::from_secs(60));
            let update = PriorityUpdate {
                comm: &mut own,
                agreement: &ExactAllReduce,
                strategy: s2,
                order: &order,
                piece: 700,
                lr: 1e-2,
                presummed,
            };
            let (norm, out) = std::thread::scope(|scope| {
                let (gate, lent, be) = (&gate, &mut lent, &r.cpu);
                let h = scope.spawn(move || update_by_priority(be, lent, grads, gate, update));
                // This step's passes read each weight as soon as it is published.
                let out = (s < STEPS)
                    .then(|| pass(&r.cpu, &r.exec, &mut r.groups, gate, &r.shared, &mbs));
                (h.join().expect("the update thread"), out)
            });
            norms.push(norm?);
            opt.take_back(lent, gate.into_buffers()?);
            if s == 1 {
                sent = own
                    .records()
                    .iter()
                    .filter(|r| r.kind == CommKind::AllReduce)
                    .map(|r| r.bytes / 4)
                    .collect();
            }
            if let Some(out) = out {
                let out = out?;
                pending = Some((out.grads, out.presummed.expect("priority")));
            }
        }
        Ok((
            opt.params_host(&r.cpu, &r.groups)?,
            r.held,
            (norms, sent, want),
        ))
    });
    let (norms, sent, want) = kept.swap_remove(0);
    (out, norms, sent, want)
}

#[test]
fn dp4_by_priority_trains_like_one_device_and_sums_in_forward_order() {
    let (want, want_norms, _, _) = train("dp1", 1, None);
    // The first third of the values summed during the next step, the rest during the last
    // backward; and everything during the next step.
    for (defer, split) in [(1.0 / 3.0, true), (1.0, false)] {
        let (got, norms, sent, mut order) = train("dp4", 4, Some(defer));
        assert_eq!(norms.len(), STEPS);
        for (a, b) in norms.iter().zip(&want_norms) {
            assert!((a - b).abs() <= 1e-5 * b, "gradient norm {a} vs {b}");
        }
        for (k, s) in param_specs(&common::config(2, 2, true, None))
            .iter()
            .enumerate()
        {
            let (worst, _) = common::worst(&got[k], &want[k]);
            assert!(
                worst <= 1e-5,
                "defer {defer}: {} differs by {worst:e} after {STEPS} steps",
                s.name
            );
        }
        // The update thread's pieces went out as the forward order cuts them, the
        // embedding's first, up to where the backward's began.
        let presummed = order.pop().unwrap();
        assert!(order.len() > 2, "{order:?}");
        assert_eq!(
            presummed < order.len(),
            split,
            "{presummed} of {}",
            order.len()
        );
        assert!(presummed > 0);
        assert_eq!(sent, order[..presummed], "defer {defer}");
    }
}
