//! The `Communicator` seam (DESIGN §4): collectives, point-to-point and batched groups over a
//! group of ranks, with sub-groups.

use std::fmt;
use std::time::Duration;

use crate::error::{CommError, Result};

/// A rank: a member's index in a communicator's group (or in the world, where stated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank(pub usize);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The reduction of `all_reduce` and `reduce_scatter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise maximum.
    Max,
}

impl ReduceOp {
    pub(crate) fn apply(self, acc: &mut [f32], x: &[f32]) {
        match self {
            ReduceOp::Sum => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
            ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)),
        }
    }
}

/// One operation of a batched group.
#[derive(Debug)]
pub enum P2p<'a> {
    /// Send `data` to `peer`.
    Send {
        /// Destination (group numbering).
        peer: Rank,
        /// Values to send.
        data: &'a [f32],
    },
    /// Receive exactly `buf.len()` values from `peer`.
    Recv {
        /// Source (group numbering).
        peer: Rank,
        /// Where the values go.
        buf: &'a mut [f32],
    },
}

/// Collective and point-to-point communication among the ranks of one group.
///
/// Every member must call the collectives of a group in the same order. Uneven sizes are allowed
/// wherever counts are passed (`counts[j]` belongs to rank `j`), following DState chunk semantics.
/// Messages between two ranks with the same tag (or inside batched groups) arrive in the order
/// they were posted. Every blocking call fails after [`Communicator::timeout`] with an error that
/// names the operation and the missing rank, and fails promptly when another rank has failed.
pub trait Communicator: Send {
    /// This member's rank in the group.
    fn rank(&self) -> Rank;
    /// Number of members.
    fn size(&self) -> usize;
    /// The members' ranks in the world communicator, in group order.
    fn world_ranks(&self) -> Vec<Rank>;
    /// The node of every member, in group order: members with the same number share a machine
    /// (numbers count nodes of the world, not of the group). Threads of one process all share
    /// one; MPI says where its processes run.
    fn member_nodes(&self) -> Vec<usize> {
        vec![0; self.size()]
    }
    /// How long a blocking call waits for a peer.
    fn timeout(&self) -> Duration;
    /// Changes the timeout of this handle.
    fn set_timeout(&mut self, timeout: Duration);

    /// A communicator over `members` (ranks of this group, in the new group's order). Called by
    /// the members only, all with the same list.
    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>>;

    /// Reduces `buf` across the group in place; every member gets the result.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// Concatenates every member's `send` (`counts[j]` values from rank `j`) into `recv`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) -> Result<()>;
    /// Reduces the members' `send` buffers (all `Σ counts` long) and leaves chunk `rank` (of
    /// `counts[rank]` values) in `recv`.
    fn reduce_scatter(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()>;
    /// Sends `send_counts[j]` consecutive values of `send` to rank `j` and receives
    /// `recv_counts[j]` values from rank `j` into consecutive parts of `recv`.
    fn all_to_all(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()>;
    /// Copies `root`'s `buf` into every member's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()>;
    /// Sends `data` to `peer` with `tag`. May return before the peer receives.
    fn send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()>;
    /// Receives exactly `buf.len()` values from `peer` with `tag`.
    fn recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()>;
    /// Receives exactly `buf.len()` values with `tag` from whichever member sent first, and
    /// says who (a parameter server's loop). Messages of one sender still arrive in order.
    fn recv_any(&self, buf: &mut [f32], tag: u32) -> Result<Rank> {
        let _ = (buf, tag);
        Err(CommError::Unavailable(
            "this communicator cannot receive from any rank (recv_any)".into(),
        ))
    }
    /// Runs a group of sends and receives that progress together: no deadlock whatever order
    /// they were posted in on each rank.
    fn batch(&self, ops: &mut [P2p<'_>]) -> Result<()>;
    /// Returns once every member has called it.
    fn barrier(&self) -> Result<()>;

    /// A one-sided exchange between members that share an address space (MPI's window with
    /// fences): every member exposes `slices`, `read` then runs once on each member with every
    /// member's exposed slices (it copies what it needs straight out of them), and no member
    /// returns — and so frees or writes its slices — before every member has finished reading.
    /// `read` must not communicate. Returns `Ok(false)`, running nothing, where the members do
    /// not share memory (MPI processes, and wrapping communicators that account for traffic):
    /// the caller then sends messages instead. A collective: every member calls it in turn.
    fn window(&self, slices: &[&[f32]], read: &mut dyn FnMut(&Exposed<'_>)) -> Result<bool> {
        let _ = (slices, read);
        Ok(false)
    }
}

/// Every member's slices exposed in a [`Communicator::window`], readable while `read` runs.
pub struct Exposed<'a> {
    pub(crate) members: Vec<Vec<&'a [f32]>>,
}

impl<'a> Exposed<'a> {
    /// Slice `index` exposed by `member` (a rank of the group), if it exposed that many.
    pub fn get(&self, member: Rank, index: usize) -> Option<&'a [f32]> {
        self.members.get(member.0)?.get(index).copied()
    }
}

/// A sub-group's members as world ranks and this member's index in it, from `members` (ranks
/// of a group whose world ranks are `parent`, this member being `me` there); errors for ranks
/// outside the group, duplicates, or a caller not among them.
pub(crate) fn sub_group_members(
    parent: &[usize],
    me: usize,
    members: &[Rank],
) -> Result<(Vec<usize>, usize)> {
    let mut world = Vec::with_capacity(members.len());
    for &m in members {
        let w = parent.get(m.0).copied().ok_or_else(|| {
            CommError::InvalidGroup(format!("rank {m} is not in a group of {}", parent.len()))
        })?;
        if world.contains(&w) {
            return Err(CommError::InvalidGroup(format!("rank {m} is listed twice")));
        }
        world.push(w);
    }
    let index = members
        .iter()
        .position(|&m| m.0 == me)
        .ok_or_else(|| CommError::InvalidGroup(format!("rank {me} is not among {members:?}")))?;
    Ok((world, index))
}

/// How many times each member list has been made a sub-group under one parent: the n-th
/// creation of the same list gets the same id on every member, without communication.
#[derive(Default)]
pub(crate) struct SubGroups(std::sync::Mutex<std::collections::HashMap<Vec<usize>, u64>>);

impl SubGroups {
    /// Counts one more creation of `world_members`; its number, from 1.
    pub(crate) fn next(&self, world_members: &[usize]) -> u64 {
        let mut subs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = subs.entry(world_members.to_vec()).or_insert(0);
        *c += 1;
        *c
    }
}

/// The prefix sums of `counts` (`offsets[j]..offsets[j+1]` is rank `j`'s part).
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    o.push(0);
    for c in counts {
        o.push(o.last().copied().unwrap_or(0) + c);
    }
    o
}

/// Even counts for `len` values over `parts` ranks, with DState chunk semantics (`ceil` pieces,
/// trailing ones smaller or empty).
pub fn chunk_counts(len: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| dstate::chunk(0..len, parts, i).len())
        .collect()
}

/// Implements [`Communicator`] for a stub type `$t(Never)` of a build without its feature:
/// no value exists, so no method can run.
#[allow(unused_macros)]
macro_rules! uninhabited_communicator {
    ($t:ty) => {
        impl crate::Communicator for $t {
            fn rank(&self) -> crate::Rank {
                match self.0 {}
            }
            fn size(&self) -> usize {
                match self.0 {}
            }
            fn world_ranks(&self) -> Vec<crate::Rank> {
                match self.0 {}
            }
            fn timeout(&self) -> std::time::Duration {
                match self.0 {}
            }
            fn set_timeout(&mut self, _: std::time::Duration) {
                match self.0 {}
            }
            fn sub_group(&self, _: &[crate::Rank]) -> crate::Result<Box<dyn crate::Communicator>> {
                match self.0 {}
            }
            fn all_reduce(&self, _: &mut [f32], _: crate::ReduceOp) -> crate::Result<()> {
                match self.0 {}
            }
            fn all_gather(&self, _: &[f32], _: &mut [f32], _: &[usize]) -> crate::Result<()> {
                match self.0 {}
            }
            fn reduce_scatter(
                &self,
                _: &[f32],
                _: &mut [f32],
                _: &[usize],
                _: crate::ReduceOp,
            ) -> crate::Result<()> {
                match self.0 {}
            }
            fn all_to_all(
                &self,
                _: &[f32],
                _: &[usize],
                _: &mut [f32],
                _: &[usize],
            ) -> crate::Result<()> {
                match self.0 {}
            }
            fn broadcast(&self, _: &mut [f32], _: crate::Rank) -> crate::Result<()> {
                match self.0 {}
            }
            fn send(&self, _: &[f32], _: crate::Rank, _: u32) -> crate::Result<()> {
                match self.0 {}
            }
            fn recv(&self, _: &mut [f32], _: crate::Rank, _: u32) -> crate::Result<()> {
                match self.0 {}
            }
            fn batch(&self, _: &mut [crate::P2p<'_>]) -> crate::Result<()> {
                match self.0 {}
            }
            fn barrier(&self) -> crate::Result<()> {
                match self.0 {}
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use uninhabited_communicator;
