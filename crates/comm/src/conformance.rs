//! The conformance suite every `Communicator` must pass (thread, MPI, NCCL), written against the
//! trait only. Every check computes its expected values from rank and size alone, so it runs
//! unchanged across threads or processes. Run [`run_all`] on every rank of a world of 1–8 ranks.

use std::time::{Duration, Instant};

use crate::allreduce::{self, Algorithm, Hierarchy};
use crate::codec::{self, Codec};
use crate::communicator::{chunk_counts, offsets, Communicator, P2p, Rank, ReduceOp};
use crate::error::CommError;

/// A check: a name and a function run on every rank.
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// The check; `Err` says what differed.
    pub run: fn(&mut dyn Communicator) -> Result<(), String>,
}

/// Every check, in the order [`run_all`] runs them (the missing-rank check last: it leaves
/// unmatched messages behind on purpose, in a sub-group of its own).
pub const CHECKS: &[Check] = &[
    Check {
        name: "identity",
        run: identity,
    },
    Check {
        name: "all_reduce_sum",
        run: all_reduce_sum,
    },
    Check {
        name: "all_reduce_max",
        run: all_reduce_max,
    },
    Check {
        name: "all_gather_uneven",
        run: all_gather_uneven,
    },
    Check {
        name: "reduce_scatter_uneven",
        run: reduce_scatter_uneven,
    },
    Check {
        name: "all_to_all_uneven",
        run: all_to_all_uneven,
    },
    Check {
        name: "broadcast_every_root",
        run: broadcast_every_root,
    },
    Check {
        name: "send_recv_tags",
        run: send_recv_tags,
    },
    Check {
        name: "recv_from_any",
        run: recv_from_any,
    },
    Check {
        name: "batch_adversarial_orders",
        run: batch_adversarial_orders,
    },
    Check {
        name: "sub_groups",
        run: sub_groups,
    },
    Check {
        name: "barrier",
        run: barrier,
    },
    Check {
        name: "all_reduce_algorithms",
        run: all_reduce_algorithms,
    },
    Check {
        name: "all_reduce_algorithms_sub_group",
        run: all_reduce_algorithms_sub_group,
    },
    Check {
        name: "hierarchical_all_reduce",
        run: hierarchical_all_reduce,
    },
    Check {
        name: "compressed_all_reduce",
        run: compressed_all_reduce,
    },
    Check {
        name: "window_reads_every_member",
        run: window_reads_every_member,
    },
    Check {
        name: "missing_rank_times_out",
        run: missing_rank_times_out,
    },
];

/// Runs every check on this rank; the first failure is returned with the check's name.
pub fn run_all(comm: &mut dyn Communicator) -> Result<(), String> {
    for c in CHECKS {
        (c.run)(comm).map_err(|e| format!("rank {}: {}: {e}", comm.rank(), c.name))?;
    }
    Ok(())
}

fn value(rank: usize, i: usize) -> f32 {
    ((rank * 31 + i * 7) % 97) as f32 - 48.0
}

fn err(e: CommError) -> String {
    e.to_string()
}

fn expect_eq(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        Err(format!(
            "{what}: got {} values, expected {}; first difference at {at:?}",
            got.len(),
            want.len()
        ))
    }
}

fn identity(c: &mut dyn Communicator) -> Result<(), String> {
    if c.rank().0 >= c.size() || c.world_ranks().len() != c.size() {
        return Err(format!(
            "rank {} of size {} is inconsistent",
            c.rank(),
            c.size()
        ));
    }
    Ok(())
}

fn all_reduce_sum(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    // 200,003 elements: the thread ring's chunks go in several pipelined pieces.
    for len in [0, 1, 7, 3 * p + 1, 1000, 200_003] {
        let mut buf: Vec<f32> = (0..len).map(|i| value(me, i)).collect();
        c.all_reduce(&mut buf, ReduceOp::Sum).map_err(err)?;
        let want: Vec<f32> = (0..len)
            .map(|i| (0..p).map(|r| value(r, i)).sum())
            .collect();
        expect_eq(&format!("sum of {len}"), &buf, &want)?;
    }
    Ok(())
}

fn all_reduce_max(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let mut buf: Vec<f32> = (0..37).map(|i| value(me, i)).collect();
    c.all_reduce(&mut buf, ReduceOp::Max).map_err(err)?;
    let want: Vec<f32> = (0..37)
        .map(|i| (0..p).map(|r| value(r, i)).fold(f32::MIN, f32::max))
        .collect();
    expect_eq("max", &buf, &want)
}

fn all_gather_uneven(c: &mut dyn Communicator) -> Result<(), String> {
    let p = c.size();
    all_gather_counts(c, &(0..p).map(|j| (j * 3 + 1) % 5).collect::<Vec<_>>())
}

fn all_gather_counts(c: &mut dyn Communicator, counts: &[usize]) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let send: Vec<f32> = (0..counts[me]).map(|i| value(me, i)).collect();
    let mut recv = vec![f32::NAN; counts.iter().sum()];
    c.all_gather(&send, &mut recv, counts).map_err(err)?;
    let want: Vec<f32> = (0..p)
        .flat_map(|j| (0..counts[j]).map(move |i| value(j, i)))
        .collect();
    expect_eq("gathered", &recv, &want)
}

fn reduce_scatter_uneven(c: &mut dyn Communicator) -> Result<(), String> {
    let p = c.size();
    reduce_scatter_counts(c, &(0..p).map(|j| (j * 2 + 3) % 4).collect::<Vec<_>>())?;
    // Chunks of several pipelined pieces each, of different lengths.
    let large: Vec<usize> = (0..p).map(|j| 70_000 + 60_000 * (j % 3)).collect();
    reduce_scatter_counts(c, &large)?;
    all_gather_counts(c, &large)
}

fn reduce_scatter_counts(c: &mut dyn Communicator, counts: &[usize]) -> Result<(), String> {
    let me = c.rank().0;
    let p = c.size();
    let total: usize = counts.iter().sum();
    let send: Vec<f32> = (0..total).map(|i| value(me, i)).collect();
    let mut recv = vec![f32::NAN; counts[me]];
    c.reduce_scatter(&send, &mut recv, counts, ReduceOp::Sum)
        .map_err(err)?;
    let off = offsets(counts);
    let want: Vec<f32> = (off[me]..off[me + 1])
        .map(|i| (0..p).map(|r| value(r, i)).sum())
        .collect();
    expect_eq("scattered", &recv, &want)
}

/// Each member exposes two slices; where the communicator shares memory, each reads the
/// slices of every member and checks them; where it does not, `read` must not run.
fn window_reads_every_member(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let first: Vec<f32> = (0..me + 3).map(|i| value(me, i)).collect();
    let second: Vec<f32> = (0..2 * me).map(|i| value(me + 100, i)).collect();
    let mut seen: Vec<Vec<f32>> = Vec::new();
    let mut calls = 0;
    let shared = c
        .window(&[&first, &second], &mut |exposed| {
            calls += 1;
            for j in 0..p {
                for k in 0..2 {
                    seen.push(
                        exposed
                            .get(Rank(j), k)
                            .map(<[f32]>::to_vec)
                            .unwrap_or_default(),
                    );
                }
            }
            seen.push(vec![exposed.get(Rank(0), 2).map_or(0.0, |_| 1.0)]);
        })
        .map_err(err)?;
    if !shared {
        return if calls == 0 {
            Ok(())
        } else {
            Err("window said no shared memory but ran read".into())
        };
    }
    if calls != 1 {
        return Err(format!("read ran {calls} times"));
    }
    for j in 0..p {
        let want0: Vec<f32> = (0..j + 3).map(|i| value(j, i)).collect();
        let want1: Vec<f32> = (0..2 * j).map(|i| value(j + 100, i)).collect();
        expect_eq(&format!("rank {j}'s first slice"), &seen[2 * j], &want0)?;
        expect_eq(
            &format!("rank {j}'s second slice"),
            &seen[2 * j + 1],
            &want1,
        )?;
    }
    expect_eq("a slice nobody exposed", &seen[2 * p], &[0.0])
}

fn a2a_count(from: usize, to: usize) -> usize {
    (from + 2 * to + 1) % 4
}

fn all_to_all_uneven(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let send_counts: Vec<usize> = (0..p).map(|j| a2a_count(me, j)).collect();
    let recv_counts: Vec<usize> = (0..p).map(|j| a2a_count(j, me)).collect();
    let send: Vec<f32> = (0..p)
        .flat_map(|j| (0..a2a_count(me, j)).map(move |k| value(me * 10 + j, k)))
        .collect();
    let mut recv = vec![f32::NAN; recv_counts.iter().sum()];
    c.all_to_all(&send, &send_counts, &mut recv, &recv_counts)
        .map_err(err)?;
    let want: Vec<f32> = (0..p)
        .flat_map(|j| (0..a2a_count(j, me)).map(move |k| value(j * 10 + me, k)))
        .collect();
    expect_eq("exchanged", &recv, &want)
}

fn broadcast_every_root(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    for root in 0..p {
        let mut buf: Vec<f32> = (0..13)
            .map(|i| if me == root { value(root, i) } else { f32::NAN })
            .collect();
        c.broadcast(&mut buf, Rank(root)).map_err(err)?;
        let want: Vec<f32> = (0..13).map(|i| value(root, i)).collect();
        expect_eq(&format!("broadcast from {root}"), &buf, &want)?;
    }
    Ok(())
}

fn send_recv_tags(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    if p == 1 {
        return Ok(());
    }
    let (next, prev) = ((me + 1) % p, (me + p - 1) % p);
    let a: Vec<f32> = (0..5).map(|i| value(me, i)).collect();
    let b: Vec<f32> = (0..3).map(|i| value(me + 100, i)).collect();
    c.send(&a, Rank(next), 1).map_err(err)?;
    c.send(&b, Rank(next), 2).map_err(err)?;
    // Receive in the opposite tag order: tags, not arrival, match.
    let mut rb = vec![0.0; 3];
    let mut ra = vec![0.0; 5];
    c.recv(&mut rb, Rank(prev), 2).map_err(err)?;
    c.recv(&mut ra, Rank(prev), 1).map_err(err)?;
    expect_eq(
        "tag 2",
        &rb,
        &(0..3).map(|i| value(prev + 100, i)).collect::<Vec<_>>(),
    )?;
    expect_eq(
        "tag 1",
        &ra,
        &(0..5).map(|i| value(prev, i)).collect::<Vec<_>>(),
    )?;
    c.barrier().map_err(err)
}

/// Every rank but 0 sends two messages to rank 0, which takes them from whoever sent first:
/// it must see each sender twice, its two messages in order, and name the sender right. A
/// communicator without `recv_any` (NCCL) says so, and rank 0 then takes them in rank order.
fn recv_from_any(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    if me != 0 {
        for k in 0..2 {
            let m: Vec<f32> = (0..4).map(|i| value(me + 10 * k, i)).collect();
            c.send(&m, Rank(0), 7).map_err(err)?;
        }
        return c.barrier().map_err(err);
    }
    let mut seen = vec![0usize; p];
    for _ in 0..2 * (p - 1) {
        let mut buf = vec![0.0; 4];
        let from = match c.recv_any(&mut buf, 7) {
            Ok(r) => r.0,
            Err(CommError::Unavailable(_)) => {
                let r = 1 + seen[1..].iter().position(|&n| n < 2).unwrap_or(0);
                c.recv(&mut buf, Rank(r), 7).map_err(err)?;
                r
            }
            Err(e) => return Err(err(e)),
        };
        if from == 0 || from >= p {
            return Err(format!("recv_any named rank {from} of {p}"));
        }
        let k = seen[from];
        let want: Vec<f32> = (0..4).map(|i| value(from + 10 * k, i)).collect();
        expect_eq(&format!("message {k} of rank {from}"), &buf, &want)?;
        seen[from] += 1;
    }
    c.barrier().map_err(err)
}

fn pair_len(from: usize, to: usize, k: usize) -> usize {
    (from * 3 + to + k * 2) % 6
}

fn batch_adversarial_orders(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let peers: Vec<usize> = (0..p).filter(|&j| j != me).collect();
    // Sends: message k to every peer before message k+1 to any, peers rotated by rank.
    let rot = if peers.is_empty() {
        0
    } else {
        me % peers.len()
    };
    let sends: Vec<(usize, Vec<f32>)> = (0..2)
        .flat_map(|k| {
            let peers = &peers;
            (0..peers.len()).map(move |i| {
                let j = peers[(i + rot) % peers.len()];
                (
                    j,
                    (0..pair_len(me, j, k))
                        .map(|x| value(me * 7 + j + k, x))
                        .collect(),
                )
            })
        })
        .collect();
    // Receives: posted before the sends, in reverse peer order, both messages of a peer in a row.
    // Messages of one pair match in posting order, as in MPI.
    let mut recvs: Vec<(usize, usize, Vec<f32>)> = peers
        .iter()
        .rev()
        .flat_map(|&j| (0..2).map(move |k| (j, k, vec![f32::NAN; pair_len(j, me, k)])))
        .collect();
    let mut ops: Vec<P2p<'_>> = Vec::new();
    for (j, _, buf) in recvs.iter_mut() {
        ops.push(P2p::Recv {
            peer: Rank(*j),
            buf,
        });
    }
    for (j, data) in &sends {
        ops.push(P2p::Send {
            peer: Rank(*j),
            data,
        });
    }
    c.batch(&mut ops).map_err(err)?;
    for (j, k, got) in &recvs {
        let want: Vec<f32> = (0..pair_len(*j, me, *k))
            .map(|x| value(j * 7 + me + k, x))
            .collect();
        expect_eq(&format!("batch message {k} from {j}"), got, &want)?;
    }
    c.barrier().map_err(err)
}

fn sub_groups(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    // Even and odd ranks, listed in reverse order so group ranks differ from parent ranks.
    let members: Vec<Rank> = (0..p).rev().filter(|r| r % 2 == me % 2).map(Rank).collect();
    let sub = c.sub_group(&members).map_err(err)?;
    let pos = members
        .iter()
        .position(|&r| r.0 == me)
        .unwrap_or(usize::MAX);
    if sub.rank().0 != pos || sub.size() != members.len() {
        return Err(format!(
            "sub-group rank {} size {}, expected {pos} {}",
            sub.rank(),
            sub.size(),
            members.len()
        ));
    }
    let mut buf = vec![me as f32, 1.0];
    sub.all_reduce(&mut buf, ReduceOp::Sum).map_err(err)?;
    let want = [
        members.iter().map(|r| r.0 as f32).sum::<f32>(),
        members.len() as f32,
    ];
    expect_eq("sub-group sum", &buf, &want)?;
    // A sub-group of the sub-group: its first ceil(n/2) members.
    let half: Vec<Rank> = (0..members.len().div_ceil(2)).map(Rank).collect();
    if sub.rank().0 < half.len() {
        let subsub = sub.sub_group(&half).map_err(err)?;
        let mut b = vec![1.0];
        subsub.all_reduce(&mut b, ReduceOp::Sum).map_err(err)?;
        expect_eq("nested sum", &b, &[half.len() as f32])?;
    }
    // Asking for a group without this rank is refused.
    if p > 1 {
        let others: Vec<Rank> = (0..p).filter(|&r| r != me).map(Rank).collect();
        if c.sub_group(&others).is_ok() {
            return Err("a sub-group that excludes the caller was accepted".into());
        }
    }
    c.barrier().map_err(err)
}

fn barrier(c: &mut dyn Communicator) -> Result<(), String> {
    for _ in 0..3 {
        c.barrier().map_err(err)?;
    }
    Ok(())
}

/// Every algorithm of [`crate::allreduce`] (the hierarchical one over the members' real nodes)
/// sums and maxes exactly, uneven lengths included, on `c`.
fn algorithms_on(c: &dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let hier = Hierarchy::new(c, &c.member_nodes()).ok();
    for algo in Algorithm::ALL {
        // 200,003 elements: the thread ring's chunks go in several pipelined pieces.
        for len in [0, 1, 7, 3 * p + 1, 1000, 200_003] {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let mut buf: Vec<f32> = (0..len).map(|i| value(me, i)).collect();
                match (&hier, algo) {
                    (Some(h), Algorithm::Hierarchical) => {
                        h.all_reduce(&mut buf, op, Algorithm::Ring)
                    }
                    _ => allreduce::all_reduce(c, &mut buf, op, algo),
                }
                .map_err(err)?;
                let want: Vec<f32> = (0..len)
                    .map(|i| {
                        let v = (0..p).map(|r| value(r, i));
                        match op {
                            ReduceOp::Sum => v.sum(),
                            ReduceOp::Max => v.fold(f32::MIN, f32::max),
                        }
                    })
                    .collect();
                expect_eq(&format!("{algo} {op:?} of {len}"), &buf, &want)?;
            }
        }
    }
    Ok(())
}

fn all_reduce_algorithms(c: &mut dyn Communicator) -> Result<(), String> {
    algorithms_on(c)?;
    c.barrier().map_err(err)
}

fn all_reduce_algorithms_sub_group(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    // Even and odd ranks, in reverse order (group ranks differ from the parent's).
    let members: Vec<Rank> = (0..p).rev().filter(|r| r % 2 == me % 2).map(Rank).collect();
    let sub = c.sub_group(&members).map_err(err)?;
    algorithms_on(sub.as_ref())?;
    c.barrier().map_err(err)
}

/// The two-level all-reduce over made-up node layouts: consecutive pairs, and (on 4 or more
/// ranks) the even and the odd ranks as two nodes; an unequal layout is refused.
fn hierarchical_all_reduce(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let mut layouts: Vec<Vec<usize>> = vec![vec![0; p], (0..p).collect()];
    if p % 2 == 0 {
        layouts.push((0..p).map(|r| r / 2).collect());
    }
    if p >= 4 && p % 2 == 0 {
        layouts.push((0..p).map(|r| r % 2).collect());
    }
    for nodes in layouts {
        let h = Hierarchy::new(c, &nodes).map_err(err)?;
        for len in [0, 1, 5, 2 * p + 3, 999] {
            for across in [
                Algorithm::Ring,
                Algorithm::HalvingDoubling,
                Algorithm::DoubleTree,
            ] {
                let mut buf: Vec<f32> = (0..len).map(|i| value(me, i)).collect();
                h.all_reduce(&mut buf, ReduceOp::Sum, across).map_err(err)?;
                let want: Vec<f32> = (0..len)
                    .map(|i| (0..p).map(|r| value(r, i)).sum())
                    .collect();
                expect_eq(
                    &format!("nodes {nodes:?}, {across} across, {len}"),
                    &buf,
                    &want,
                )?;
            }
        }
    }
    if p >= 3 {
        let uneven: Vec<usize> = (0..p).map(|r| usize::from(r == 0)).collect();
        if Hierarchy::new(c, &uneven).is_ok() {
            return Err(format!("nodes {uneven:?} (unequal) were accepted"));
        }
    }
    c.barrier().map_err(err)
}

/// Every codec's all-reduce leaves bitwise the same values on every member (checked against
/// member 0's by broadcast), and the lossless-enough ones land near the exact sum.
fn compressed_all_reduce(c: &mut dyn Communicator) -> Result<(), String> {
    let (me, p) = (c.rank().0, c.size());
    let len = 700;
    let grad = |r: usize| -> Vec<f32> { (0..len).map(|i| value(r, i) / 64.0).collect() };
    let exact: Vec<f32> = (0..len).map(|i| (0..p).map(|r| grad(r)[i]).sum()).collect();
    for codec in [
        Codec::Bf16,
        Codec::Fp16,
        Codec::Int8,
        Codec::Sign,
        Codec::Qsgd(8),
        Codec::TopK(0.05),
        Codec::OkTopK(0.05),
        Codec::RandK(0.05),
        Codec::Dgc(0.05),
        Codec::OkDgc(0.05),
    ] {
        let mut buf = grad(me);
        let mut worker = vec![0.0; len];
        let mut server = vec![0.0; chunk_counts(len, p)[me]];
        match codec {
            Codec::TopK(_) => codec::all_reduce_top_k(c, &mut buf, codec, Some(&mut worker)),
            Codec::OkTopK(_) => {
                crate::sparse::all_reduce_top_k_balanced(c, &mut buf, codec, Some(&mut worker))
            }
            Codec::Dgc(f) | Codec::OkDgc(f) => crate::dgc::all_reduce_dgc(
                c,
                &mut buf,
                crate::dgc::Dgc {
                    velocity: &mut vec![0.0; len],
                    accumulated: &mut worker,
                    momentum: 0.9,
                    density: f,
                    clip: Some(1.0),
                    balanced: matches!(codec, Codec::OkDgc(_)),
                },
            ),
            Codec::RandK(_) => codec::all_reduce_random_k(
                c,
                &mut buf,
                codec,
                11,
                Some(&mut worker),
                Algorithm::Ring,
            ),
            _ => codec::all_reduce_dense(c, &mut buf, codec, Some(&mut worker), Some(&mut server)),
        }
        .map_err(err)?;
        let mut first = buf.clone();
        c.broadcast(&mut first, Rank(0)).map_err(err)?;
        if first
            .iter()
            .zip(&buf)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(format!(
                "{codec}: this member's result differs from member 0's"
            ));
        }
        // bf16 and fp16 keep 8 and 11 bits; the values are multiples of 1/64 below 1.
        let tol = match codec {
            Codec::Bf16 => 2f32.powi(-8) * 2.0 * p as f32,
            Codec::Fp16 => 2f32.powi(-11) * 2.0 * p as f32,
            _ => f32::INFINITY,
        };
        if let Some(i) = (0..len).find(|&i| (buf[i] - exact[i]).abs() > tol) {
            return Err(format!(
                "{codec}: value {i} is {} for an exact {}",
                buf[i], exact[i]
            ));
        }
    }
    c.barrier().map_err(err)
}

fn missing_rank_times_out(c: &mut dyn Communicator) -> Result<(), String> {
    let p = c.size();
    if p < 2 {
        return Ok(());
    }
    let all: Vec<Rank> = (0..p).map(Rank).collect();
    let mut sub = c.sub_group(&all).map_err(err)?;
    let missing = sub.world_ranks()[p - 1];
    if sub.rank().0 == p - 1 {
        return Ok(()); // never arrives
    }
    let limit = Duration::from_millis(300);
    sub.set_timeout(limit);
    let start = Instant::now();
    let mut buf = vec![1.0; 10];
    match sub.all_reduce(&mut buf, ReduceOp::Sum) {
        Ok(()) => Err("all_reduce succeeded without the last rank".into()),
        Err(CommError::Timeout { detail, .. }) => {
            let took = start.elapsed();
            if took > limit * 4 + Duration::from_secs(2) {
                return Err(format!(
                    "took {took:?} to time out with a {limit:?} timeout"
                ));
            }
            if detail.contains(&format!("rank {missing} never arrived")) {
                Ok(())
            } else {
                Err(format!("timeout does not name rank {missing}: {detail}"))
            }
        }
        Err(e) => Err(format!(
            "expected a timeout naming rank {missing}, got: {e}"
        )),
    }
}
