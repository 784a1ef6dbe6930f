//! Executing plans between random DState pairs (over random device groups) on thread ranks
//! reproduces the destination layout exactly, with either sender rule; no plan beats the lower
//! bound, and both rules move the same bytes over each link class.

use std::sync::Arc;

use comm::{CommError, Communicator, Counting, ThreadComm};
use dstate::{extract, Axis, DState, DeviceGroup, DeviceId, Distribution, Placement};
use proptest::prelude::*;
use switch::{
    execute, lower_bound, plan, source_pieces, LinkClass, Method, TensorSwitch, Topology,
};

fn arb_state(rank: usize, max_devices: usize) -> impl Strategy<Value = DState> {
    prop::collection::vec((prop::option::of(0..rank), 1usize..=3), 0..=3)
        .prop_filter("fits the world", move |axes| {
            axes.iter().map(|a| a.1).product::<usize>() <= max_devices
        })
        .prop_map(|axes| {
            DState::new(
                axes.into_iter()
                    .map(|(d, degree)| Axis {
                        placement: d.map_or(Placement::Duplicate, Placement::Split),
                        degree,
                    })
                    .collect(),
            )
            .unwrap()
        })
}

/// A distribution of `state` over a random subset of `0..world`, in random order.
fn place(state: DState, world: usize, seed: u64) -> Distribution {
    let mut ids: Vec<usize> = (0..world).collect();
    let mut s = seed;
    for i in (1..ids.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ids.swap(i, (s >> 33) as usize % (i + 1));
    }
    let group =
        DeviceGroup::new(ids[..state.size()].iter().map(|&i| DeviceId(i)).collect()).unwrap();
    Distribution::new(group, state).unwrap()
}

fn arb_case() -> impl Strategy<Value = (usize, usize, Vec<usize>, DState, DState, u64, u64)> {
    (
        2usize..=6,
        1usize..=4,
        prop::collection::vec(1usize..=7, 1..=3),
    )
        .prop_flat_map(|(world, dpn, shape)| {
            let r = shape.len();
            (
                Just(world),
                Just(dpn),
                Just(shape),
                arb_state(r, world),
                arb_state(r, world),
                any::<u64>(),
                any::<u64>(),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn plans_reproduce_the_destination_exactly(
        (world, dpn, shape, s, d, seed_a, seed_b) in arb_case()
    ) {
        let src = place(s, world, seed_a);
        let dst = place(d, world, seed_b);
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| (i as f32) * 1.5 - 3.0).collect();
        let tensors = vec![
            TensorSwitch { name: "a".into(), shape: shape.clone(), src: src.clone(), dst: dst.clone() },
            // The reverse switch in the same plan: several tensors fuse into one buffer per pair.
            TensorSwitch { name: "b".into(), shape: shape.clone(), src: dst.clone(), dst: src.clone() },
        ];
        let topo = Topology::new(dpn);
        let lb = lower_bound(&tensors, topo).unwrap();
        let mut moved = Vec::new();
        for method in [Method::Greedy, Method::Exact] {
            let p = Arc::new(plan(&tensors, topo, method).unwrap());
            let load = p.load();
            // The planner's cost-only path moves what the ordered plan moves.
            let t = switch::traffic(&tensors, topo, method).unwrap();
            prop_assert_eq!(&t.load, &load);
            prop_assert_eq!(t.moved, p.moved());
            prop_assert_eq!(t.pairs.len(), p.messages());
            prop_assert_eq!(&t, &p.traffic());
            for c in LinkClass::ALL {
                let (recv, send) = lb[c.index()];
                prop_assert!(load.max_recv(c) >= recv);
                prop_assert!(load.max_send(c) as f64 >= send - 1e-6);
            }
            moved.push([0, 1].map(|c| load.send[c].values().sum::<usize>()));
            // Thread ranks copy out of each other's memory (a window); behind a counting
            // layer they send fused messages instead. Both must give the destination exactly.
            for shared in [true, false] {
            let (p2, x2) = (p.clone(), x.clone());
            let got = ThreadComm::run(world, move |c| {
                let me = DeviceId(c.rank().0);
                let mine = source_pieces(&p2, me, &[x2.clone(), x2.clone()]).unwrap();
                let c: Box<dyn Communicator> =
                    if shared { Box::new(c) } else { Box::new(Counting::new(Box::new(c))) };
                Ok::<_, CommError>(execute(&p2, c.as_ref(), &mine).unwrap())
            }).unwrap();
            for (rank, pieces) in got.iter().enumerate() {
                for (t, piece) in tensors.iter().zip(pieces) {
                    let want = t.dst.piece_of(DeviceId(rank), &shape).unwrap();
                    match (want, piece) {
                        (None, None) => {}
                        (Some(w), Some((region, values))) => {
                            prop_assert_eq!(&w.region, region);
                            prop_assert_eq!(values, &extract(&x, &shape, &w.region).unwrap(), "{} on device {}", method, rank);
                        }
                        (w, g) => prop_assert!(false, "device {rank}: wanted {w:?}, got {g:?}"),
                    }
                }
            }
            }
        }
        prop_assert_eq!(moved[0], moved[1]);
    }
}

#[test]
fn a_plan_from_a_state_to_itself_moves_nothing() {
    let group = DeviceGroup::range(0, 4).unwrap();
    let st = DState::new(vec![Axis::split(1, 2), Axis::dup(2)]).unwrap();
    let d = Distribution::new(group, st).unwrap();
    let t = TensorSwitch {
        name: "w".into(),
        shape: vec![6, 8],
        src: d.clone(),
        dst: d,
    };
    let p = plan(&[t], Topology::new(2), Method::Exact).unwrap();
    assert!(p.transfers.is_empty());
    assert_eq!(p.local.len(), 4);
}

#[test]
fn the_exact_rule_splits_a_slice_between_its_owners() {
    // 8×3 replicated on devices 0 and 1, needed whole by device 2 alone.
    let src = Distribution::new(
        DeviceGroup::range(0, 2).unwrap(),
        DState::new(vec![Axis::dup(2)]).unwrap(),
    )
    .unwrap();
    let dst = Distribution::new(
        DeviceGroup::new(vec![DeviceId(2)]).unwrap(),
        DState::new(vec![]).unwrap(),
    )
    .unwrap();
    let t = TensorSwitch {
        name: "w".into(),
        shape: vec![8, 3],
        src,
        dst,
    };
    let topo = Topology::new(4);
    let greedy = plan(std::slice::from_ref(&t), topo, Method::Greedy).unwrap();
    let exact = Arc::new(plan(std::slice::from_ref(&t), topo, Method::Exact).unwrap());
    assert_eq!(greedy.load().max_send(LinkClass::SameNode), 24);
    assert_eq!(exact.load().max_send(LinkClass::SameNode), 12);
    assert_eq!(exact.transfers.len(), 2);
    let lb = lower_bound(&[t], topo).unwrap()[LinkClass::SameNode.index()];
    assert_eq!(lb.0, 24); // device 2 must receive everything
    assert!((lb.1 - 12.0).abs() < 1e-6);
    let x: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let (p2, x2) = (exact.clone(), x.clone());
    let got = ThreadComm::run(3, move |c| {
        let mine = source_pieces(&p2, DeviceId(c.rank().0), std::slice::from_ref(&x2)).unwrap();
        Ok::<_, CommError>(execute(&p2, &c, &mine).unwrap())
    })
    .unwrap();
    assert_eq!(got[2][0].as_ref().unwrap().1, x);
    assert!(got[0][0].is_none());
}
