//! All-reduce algorithms beside the communicator's ring, written over its point-to-point calls so
//! that every communicator (threads, MPI, the simulator's) runs them: recursive halving and
//! doubling (Rabenseifner: reduce-scatter by halving, all-gather by doubling, extra ranks of a
//! non-power-of-two group folded in first), a double binary tree (two trees, each reducing and
//! broadcasting half the buffer, a rank interior in one and a leaf in the other, as NCCL's), and
//! the hierarchical two-level all-reduce (reduce-scatter inside a node, all-reduce across nodes,
//! all-gather inside). Each reduces in a fixed order, so results are the same run to run.
//!
//! ```
//! use comm::allreduce::{all_reduce, Algorithm};
//! use comm::{Communicator, ReduceOp, ThreadComm, CommError};
//!
//! let out = ThreadComm::run(5, |c| -> Result<Vec<f32>, CommError> {
//!     let mut buf = vec![c.rank().0 as f32; 7];
//!     all_reduce(&c, &mut buf, ReduceOp::Sum, Algorithm::HalvingDoubling)?;
//!     Ok(buf)
//! })?;
//! assert!(out.iter().all(|b| b == &vec![10.0; 7]));
//! # Ok::<(), CommError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::communicator::{chunk_counts, offsets, Communicator, P2p, Rank, ReduceOp};
use crate::error::{CommError, Result};
use crate::tags;

/// An all-reduce algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The communicator's own ring (reduce-scatter, then all-gather).
    Ring,
    /// Recursive halving and doubling.
    HalvingDoubling,
    /// Two binary trees over halves of the buffer.
    DoubleTree,
    /// Reduce-scatter inside nodes, all-reduce across them, all-gather inside (see
    /// [`Hierarchy`]; without one, the ring).
    Hierarchical,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Ring,
        Algorithm::HalvingDoubling,
        Algorithm::DoubleTree,
        Algorithm::Hierarchical,
    ];
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Ring => "ring",
            Algorithm::HalvingDoubling => "rhd",
            Algorithm::DoubleTree => "tree",
            Algorithm::Hierarchical => "hier",
        })
    }
}

impl FromStr for Algorithm {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ring" => Ok(Algorithm::Ring),
            "rhd" => Ok(Algorithm::HalvingDoubling),
            "tree" => Ok(Algorithm::DoubleTree),
            "hier" => Ok(Algorithm::Hierarchical),
            other => Err(CommError::Parse {
                what: "all-reduce algorithm",
                input: other.into(),
                expected: "use ring, rhd, tree or hier".into(),
            }),
        }
    }
}

/// All-reduces `buf` over `c` with `algo` (the hierarchical one without a [`Hierarchy`] is the
/// ring).
pub fn all_reduce(
    c: &dyn Communicator,
    buf: &mut [f32],
    op: ReduceOp,
    algo: Algorithm,
) -> Result<()> {
    match algo {
        Algorithm::Ring | Algorithm::Hierarchical => c.all_reduce(buf, op),
        Algorithm::HalvingDoubling => halving_doubling(c, buf, op),
        Algorithm::DoubleTree => double_tree(c, buf, op),
    }
}

fn exchange(c: &dyn Communicator, peer: usize, send: &[f32], recv: &mut [f32]) -> Result<()> {
    // Both partners send first: a batch, so that a communicator whose sends wait for the
    // receiver cannot deadlock.
    c.batch(&mut [
        P2p::Send {
            peer: Rank(peer),
            data: send,
        },
        P2p::Recv {
            peer: Rank(peer),
            buf: recv,
        },
    ])
}

/// Rabenseifner's all-reduce.
fn halving_doubling(c: &dyn Communicator, buf: &mut [f32], op: ReduceOp) -> Result<()> {
    let (n, me) = (c.size(), c.rank().0);
    if n <= 1 {
        return Ok(());
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - p;
    // Fold: among the first 2·extra ranks, even ones hand their buffer to the odd one above.
    let mut tmp = vec![0.0f32; buf.len()];
    let virtual_rank = if me < 2 * extra {
        if me % 2 == 0 {
            c.send(buf, Rank(me + 1), tags::ALLREDUCE)?;
            None
        } else {
            c.recv(&mut tmp, Rank(me - 1), tags::ALLREDUCE)?;
            // Lower rank's values first, as everywhere below.
            for (b, t) in buf.iter_mut().zip(&tmp) {
                let x = *b;
                *b = *t;
                op.apply(std::slice::from_mut(b), std::slice::from_ref(&x));
            }
            Some(me / 2)
        }
    } else {
        Some(me - extra)
    };
    let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
    if let Some(v) = virtual_rank {
        let off = offsets(&chunk_counts(buf.len(), p));
        let span = |lo: usize, hi: usize| off[lo]..off[hi];
        // Reduce-scatter by recursive halving over chunk ranges.
        let (mut lo, mut hi) = (0usize, p);
        let mut steps = Vec::new();
        let mut d = p / 2;
        while d >= 1 {
            let partner = v ^ d;
            let mid = (lo + hi) / 2;
            let (keep, give) = if v & d == 0 {
                ((lo, mid), (mid, hi))
            } else {
                ((mid, hi), (lo, mid))
            };
            let (k, g) = (span(keep.0, keep.1), span(give.0, give.1));
            let mut got = vec![0.0f32; k.len()];
            exchange(c, real(partner), &buf[g], &mut got)?;
            // The lower virtual rank's values first.
            let mine = buf[k.clone()].to_vec();
            let (first, second) = if v < partner {
                (&mine, &got)
            } else {
                (&got, &mine)
            };
            let dst = &mut buf[k];
            dst.copy_from_slice(first);
            op.apply(dst, second);
            steps.push((partner, keep, give));
            lo = keep.0;
            hi = keep.1;
            d /= 2;
        }
        // All-gather by recursive doubling, the same pairs in reverse.
        for (partner, keep, give) in steps.into_iter().rev() {
            let (k, g) = (span(keep.0, keep.1), span(give.0, give.1));
            let mut got = vec![0.0f32; g.len()];
            let mine = buf[k].to_vec();
            exchange(c, real(partner), &mine, &mut got)?;
            buf[g].copy_from_slice(&got);
        }
    }
    // Unfold: the odd ranks hand the result back.
    if me < 2 * extra {
        if me % 2 == 0 {
            c.recv(buf, Rank(me + 1), tags::ALLREDUCE)?;
        } else {
            c.send(buf, Rank(me - 1), tags::ALLREDUCE)?;
        }
    }
    Ok(())
}

/// In-order binary tree over `n` positions: parent and children of position `i` (the double
/// binary tree's, here and in the planner's model of it).
pub fn tree_links(i: usize, n: usize) -> (Option<usize>, Vec<usize>) {
    let parent = (i > 0).then(|| (i - 1) / 2);
    let children = [2 * i + 1, 2 * i + 2]
        .into_iter()
        .filter(|&k| k < n)
        .collect();
    (parent, children)
}

/// Two binary trees: the first half of the buffer on the tree over ranks in order, the second on
/// the same tree over ranks in reverse order, so a rank is interior in one and (mostly) a leaf in
/// the other. Reduce up (own values, then the children in order), broadcast down.
fn double_tree(c: &dyn Communicator, buf: &mut [f32], op: ReduceOp) -> Result<()> {
    let (n, me) = (c.size(), c.rank().0);
    if n <= 1 {
        return Ok(());
    }
    let half = buf.len().div_ceil(2);
    let (a, b) = buf.split_at_mut(half);
    let rank_of = |tree: usize, pos: usize| if tree == 0 { pos } else { n - 1 - pos };
    let pos_of = |tree: usize| if tree == 0 { me } else { n - 1 - me };
    for (tree, part) in [(0usize, &mut *a), (1, &mut *b)] {
        let (parent, children) = tree_links(pos_of(tree), n);
        for ch in children {
            let mut got = vec![0.0f32; part.len()];
            c.recv(&mut got, Rank(rank_of(tree, ch)), tags::ALLREDUCE)?;
            op.apply(part, &got);
        }
        if let Some(p) = parent {
            c.send(part, Rank(rank_of(tree, p)), tags::ALLREDUCE)?;
        }
    }
    for (tree, part) in [(0usize, a), (1, b)] {
        let (parent, children) = tree_links(pos_of(tree), n);
        if let Some(p) = parent {
            c.recv(part, Rank(rank_of(tree, p)), tags::ALLREDUCE_DOWN)?;
        }
        for ch in children {
            c.send(part, Rank(rank_of(tree, ch)), tags::ALLREDUCE_DOWN)?;
        }
    }
    Ok(())
}

/// The two levels of a group spread over nodes: the members on this member's node, and the
/// members with this member's place on every node.
pub struct Hierarchy {
    /// Members of this node, in group order.
    pub intra: Box<dyn Communicator>,
    /// One member per node (the same local index), in node order.
    pub inter: Box<dyn Communicator>,
}

impl Hierarchy {
    /// Splits `c` by `nodes` (the node of each member, in group order, e.g.
    /// [`Communicator::member_nodes`]); every node must hold as many members. Every member calls
    /// it.
    pub fn new(c: &dyn Communicator, nodes: &[usize]) -> Result<Self> {
        crate::error::check_len("hierarchy", "nodes", c.size(), nodes.len())?;
        let me = c.rank().0;
        let mine: Vec<Rank> = (0..nodes.len())
            .filter(|&r| nodes[r] == nodes[me])
            .map(Rank)
            .collect();
        let local = mine.iter().position(|r| r.0 == me).unwrap_or(0);
        let mut distinct: Vec<usize> = nodes.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let per: Vec<Vec<Rank>> = distinct
            .iter()
            .map(|&nd| {
                (0..nodes.len())
                    .filter(|&r| nodes[r] == nd)
                    .map(Rank)
                    .collect()
            })
            .collect();
        if per.iter().any(|v| v.len() != mine.len()) {
            return Err(CommError::InvalidGroup(format!(
                "a hierarchical all-reduce needs as many members on every node; the group's nodes are {nodes:?}"
            )));
        }
        let across: Vec<Rank> = per.iter().map(|v| v[local]).collect();
        Ok(Self {
            intra: c.sub_group(&mine)?,
            inter: c.sub_group(&across)?,
        })
    }

    /// Reduce-scatter inside the node, all-reduce of this member's chunk across nodes with
    /// `across` (normally the ring), all-gather inside the node.
    pub fn all_reduce(&self, buf: &mut [f32], op: ReduceOp, across: Algorithm) -> Result<()> {
        let counts = chunk_counts(buf.len(), self.intra.size());
        let me = self.intra.rank().0;
        let mut chunk = vec![0.0f32; counts[me]];
        self.intra.reduce_scatter(buf, &mut chunk, &counts, op)?;
        all_reduce(self.inter.as_ref(), &mut chunk, op, across)?;
        self.intra.all_gather(&chunk, buf, &counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadComm;

    fn value(rank: usize, i: usize) -> f32 {
        ((rank * 31 + i * 7) % 97) as f32 - 48.0
    }

    #[test]
    fn every_algorithm_sums_exactly_on_1_to_8_ranks_with_uneven_lengths() {
        for n in 1..=8 {
            let out = ThreadComm::run(n, move |c| -> Result<Vec<Vec<f32>>> {
                let me = c.rank().0;
                let pairs: Vec<usize> = (0..n).map(|r| r / 2).collect();
                let h = Hierarchy::new(&c, &pairs).or_else(|_| Hierarchy::new(&c, &[0; 8][..n]))?;
                let mut all = Vec::new();
                for len in [0, 1, 3, 7, 2 * n + 1, 1000] {
                    for algo in Algorithm::ALL {
                        let mut buf: Vec<f32> = (0..len).map(|i| value(me, i)).collect();
                        match algo {
                            Algorithm::Hierarchical => {
                                h.all_reduce(&mut buf, ReduceOp::Sum, Algorithm::Ring)?
                            }
                            a => all_reduce(&c, &mut buf, ReduceOp::Sum, a)?,
                        }
                        all.push(buf);
                    }
                }
                Ok(all)
            })
            .unwrap();
            let mut k = 0;
            for len in [0, 1, 3, 7, 2 * n + 1, 1000] {
                let want: Vec<f32> = (0..len)
                    .map(|i| (0..n).map(|r| value(r, i)).sum())
                    .collect();
                for algo in Algorithm::ALL {
                    for (r, got) in out.iter().enumerate() {
                        assert_eq!(got[k], want, "{algo} on {n} ranks, rank {r}, length {len}");
                    }
                    k += 1;
                }
            }
        }
    }

    #[test]
    fn results_are_the_same_run_to_run_and_on_every_rank() {
        // Non-integer values: the order of the additions shows.
        let run = || {
            ThreadComm::run(6, |c| -> Result<Vec<Vec<f32>>> {
                let me = c.rank().0;
                let mut out = Vec::new();
                for algo in [Algorithm::HalvingDoubling, Algorithm::DoubleTree] {
                    let mut buf: Vec<f32> =
                        (0..101).map(|i| (me * 13 + i) as f32 * 0.1234567).collect();
                    all_reduce(&c, &mut buf, ReduceOp::Sum, algo)?;
                    out.push(buf);
                }
                Ok(out)
            })
            .unwrap()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.iter().all(|x| x == &a[0]), "ranks disagree");
    }
}
