//! Property tests of the DState algebra. The collectives of the transition table are simulated
//! here on plain row-major arrays (concatenate, chunk, sum), independently of the crate's region
//! arithmetic, and must reproduce the crate's own `distribute` of the destination exactly.

use dstate::{
    assemble, distribute, intersect, transition, Axis, Collective, DState, DStateError,
    DeviceGroup, Distribution, Placement,
};
use proptest::prelude::*;

fn arb_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..8, 1..=3)
}

fn arb_placement(rank: usize) -> impl Strategy<Value = Placement> {
    prop_oneof![
        (0..rank).prop_map(Placement::Split),
        Just(Placement::Duplicate),
        Just(Placement::Partial),
    ]
}

fn arb_state(rank: usize) -> impl Strategy<Value = DState> {
    prop::collection::vec((arb_placement(rank), 1usize..=3), 0..=3).prop_map(|axes| {
        DState::new(
            axes.into_iter()
                .map(|(placement, degree)| Axis { placement, degree })
                .collect(),
        )
        .unwrap()
    })
}

fn arb_case() -> impl Strategy<Value = (Vec<usize>, DState, DState)> {
    arb_shape().prop_flat_map(|shape| {
        let r = shape.len();
        (Just(shape), arb_state(r), arb_state(r))
    })
}

/// A deterministic integer tensor (integers keep every sum exact).
fn tensor(shape: &[usize], seed: u64) -> Vec<i64> {
    let n: usize = shape.iter().product();
    (0..n as u64)
        .map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 201) as i64 - 100)
        .collect()
}

// ---- an independent row-major array toolkit for the collective simulation ----

#[derive(Clone, Debug, PartialEq)]
struct Arr {
    shape: Vec<usize>,
    data: Vec<i64>,
}

fn multi_index(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d].max(1);
        flat /= shape[d].max(1);
    }
    idx
}

fn flat_index(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

fn concat(parts: &[Arr], dim: usize) -> Arr {
    let mut shape = parts[0].shape.clone();
    shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
    let n: usize = shape.iter().product();
    let mut data = vec![0; n];
    for (flat, slot) in data.iter_mut().enumerate() {
        let mut idx = multi_index(flat, &shape);
        let mut k = 0;
        while idx[dim] >= parts[k].shape[dim] {
            idx[dim] -= parts[k].shape[dim];
            k += 1;
        }
        *slot = parts[k].data[flat_index(&idx, &parts[k].shape)];
    }
    Arr { shape, data }
}

/// Chunk `j` of `k` along `dim`, every chunk ceil(n/k) long except trailing ones.
fn chunk_of(a: &Arr, dim: usize, k: usize, j: usize) -> Arr {
    let n = a.shape[dim];
    let size = n.div_ceil(k);
    let start = (j * size).min(n);
    let end = ((j + 1) * size).min(n);
    let mut shape = a.shape.clone();
    shape[dim] = end - start;
    let data = (0..shape.iter().product::<usize>())
        .map(|flat| {
            let mut idx = multi_index(flat, &shape);
            idx[dim] += start;
            a.data[flat_index(&idx, &a.shape)]
        })
        .collect();
    Arr { shape, data }
}

fn sum(parts: &[Arr]) -> Arr {
    let mut out = parts[0].clone();
    for p in &parts[1..] {
        for (o, v) in out.data.iter_mut().zip(&p.data) {
            *o += v;
        }
    }
    out
}

/// Runs the collective along `axis` on every device's local array.
fn simulate(state: &DState, axis: usize, c: Collective, locals: &[Arr]) -> Vec<Arr> {
    let degree = state.axes()[axis].degree;
    (0..state.size())
        .map(|i| {
            let coords = state.coords(i).unwrap();
            let me = coords[axis];
            let members: Vec<&Arr> = (0..degree)
                .map(|j| {
                    let mut c2 = coords.clone();
                    c2[axis] = j;
                    &locals[state.index_of(&c2)]
                })
                .collect();
            let owned: Vec<Arr> = members.iter().map(|a| (*a).clone()).collect();
            match c {
                Collective::Identity => locals[i].clone(),
                Collective::AllReduce => sum(&owned),
                Collective::ReduceScatter { dim } => chunk_of(&sum(&owned), dim, degree, me),
                Collective::AllGather { dim } => concat(&owned, dim),
                Collective::LocalSlice { dim } => chunk_of(&locals[i], dim, degree, me),
                Collective::AllToAll { from_dim, to_dim } => {
                    let received: Vec<Arr> = owned
                        .iter()
                        .map(|a| chunk_of(a, to_dim, degree, me))
                        .collect();
                    concat(&received, from_dim)
                }
                Collective::LocalZero => {
                    let mut a = locals[i].clone();
                    if me != 0 {
                        a.data.iter_mut().for_each(|v| *v = 0);
                    }
                    a
                }
            }
        })
        .collect()
}

/// Locals of `state` where the partial parts are arbitrary integers summing to `x`.
fn random_partial_locals(x: &[i64], shape: &[usize], state: &DState, seed: u64) -> Vec<Arr> {
    let parts = state.num_parts();
    let mut part_tensors: Vec<Vec<i64>> =
        (1..parts).map(|p| tensor(shape, seed + p as u64)).collect();
    let mut first = x.to_vec();
    for t in &part_tensors {
        for (f, v) in first.iter_mut().zip(t) {
            *f -= v;
        }
    }
    part_tensors.insert(0, first);
    (0..state.size())
        .map(|i| {
            let piece = state.piece(i, shape).unwrap();
            let src = &part_tensors[piece.part.unwrap_or(0)];
            Arr {
                shape: piece.region.shape(),
                data: dstate::extract(src, shape, &piece.region).unwrap(),
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn pieces_tile_once_per_replica_and_part((shape, s, _t) in arb_case()) {
        let n: usize = shape.iter().product();
        let mut count = vec![vec![vec![0u32; n]; s.num_parts()]; s.num_replicas()];
        let ones = vec![1i64; n];
        for i in 0..s.size() {
            let p = s.piece(i, &shape).unwrap();
            // Every piece's region is inside the tensor.
            prop_assert!(dstate::Region::full(&shape).contains(&p.region));
            let local = dstate::extract(&ones, &shape, &p.region).unwrap();
            prop_assert_eq!(local.len(), p.region.volume());
            let mut flat = vec![0u32; n];
            let idx: Vec<i64> = (0..n as i64).collect();
            for &k in &dstate::extract(&idx, &shape, &p.region).unwrap() {
                flat[k as usize] += 1;
            }
            for (c, f) in count[p.replica][p.part.unwrap_or(0)].iter_mut().zip(flat) {
                *c += f;
            }
        }
        for per_replica in &count {
            for per_part in per_replica {
                prop_assert!(per_part.iter().all(|&c| c == 1), "{:?} on {:?}", s, shape);
            }
        }
    }

    #[test]
    fn partial_parts_sum_to_the_whole((shape, s, _t) in arb_case(), seed in 0u64..1000) {
        let x = tensor(&shape, seed);
        let locals = distribute(&x, &shape, &s).unwrap();
        prop_assert_eq!(assemble(&locals, &shape, &s).unwrap(), x.clone());
        let random: Vec<Vec<i64>> = random_partial_locals(&x, &shape, &s, seed)
            .into_iter().map(|a| a.data).collect();
        prop_assert_eq!(assemble(&random, &shape, &s).unwrap(), x);
    }

    #[test]
    fn intersections_cover_every_element_once(
        (shape, a, b) in arb_case(), off_a in 0usize..4, off_b in 0usize..4,
    ) {
        let da = Distribution::new(DeviceGroup::range(off_a, a.size()).unwrap(), a.clone()).unwrap();
        let db = Distribution::new(DeviceGroup::range(off_b, b.size()).unwrap(), b.clone()).unwrap();
        let slices = intersect(&da, &db, &shape).unwrap();
        let n: usize = shape.iter().product();
        let idx: Vec<i64> = (0..n as i64).collect();
        let mut count = vec![0u32; n];
        for sl in &slices {
            for &k in &dstate::extract(&idx, &shape, &sl.region).unwrap() {
                count[k as usize] += 1;
            }
            // Owners and needers are exactly the devices whose pieces contain the slice.
            for (dist, holders) in [(&da, &sl.owners), (&db, &sl.needers)] {
                let expect: Vec<_> = dist.pieces(&shape).unwrap().into_iter()
                    .filter(|(_, p)| p.region.contains(&sl.region))
                    .map(|(d, _)| d).collect();
                let got: Vec<_> = holders.iter().map(|h| h.device).collect();
                prop_assert_eq!(got, expect);
            }
        }
        prop_assert!(count.iter().all(|&c| c == 1));
    }

    #[test]
    fn one_axis_transitions_run_as_their_collective(
        shape in arb_shape(), seed in 0u64..1000,
        axes in prop::collection::vec((0usize..3, 1usize..=3), 1..=3),
        which in 0usize..3, new_kind in 0usize..5,
    ) {
        let rank = shape.len();
        let to_placement = |k: usize| match k % 3 {
            0 => Placement::Split(k / 3 % rank),
            1 => Placement::Duplicate,
            _ => Placement::Partial,
        };
        let from = DState::new(axes.iter().map(|&(k, d)| Axis {
            placement: to_placement(k + 3 * (d % rank)), degree: d }).collect()).unwrap();
        let axis = which % axes.len();
        let mut to_axes = from.axes().to_vec();
        to_axes[axis].placement = match new_kind {
            0 | 1 => Placement::Split(new_kind % rank),
            2 => Placement::Split((seed as usize) % rank),
            3 => Placement::Duplicate,
            _ => Placement::Partial,
        };
        let to = DState::new(to_axes).unwrap();
        let x = tensor(&shape, seed);
        match transition(&from, &to) {
            Ok(t) => {
                let locals = random_partial_locals(&x, &shape, &from, seed);
                let out = simulate(&from, axis, t.collective, &locals);
                // Every result has the destination's local shape.
                for (i, a) in out.iter().enumerate() {
                    prop_assert_eq!(&a.shape, &to.local_shape(i, &shape).unwrap());
                }
                let data: Vec<Vec<i64>> = out.iter().map(|a| a.data.clone()).collect();
                prop_assert_eq!(assemble(&data, &shape, &to).unwrap(), x.clone(),
                    "{} ", t);
                if to.num_parts() == 1 {
                    prop_assert_eq!(data, distribute(&x, &shape, &to).unwrap(), "{}", t);
                }
            }
            Err(DStateError::NoCollective { .. }) => {
                prop_assert!(matches!(
                    (from.axes()[axis].placement, to.axes()[axis].placement),
                    (Placement::Split(_), Placement::Partial)
                ));
            }
            Err(DStateError::InnerSplitConflict { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
