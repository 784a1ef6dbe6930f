//! A wrapper that records every call and its payload, for tests that assert communication.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::communicator::{Communicator, P2p, Rank, ReduceOp};
use crate::error::Result;

/// The kind of a recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommKind {
    /// `all_reduce`.
    AllReduce,
    /// `all_gather`.
    AllGather,
    /// `reduce_scatter`.
    ReduceScatter,
    /// `all_to_all`.
    AllToAll,
    /// `broadcast`.
    Broadcast,
    /// `send`.
    Send,
    /// `recv`.
    Recv,
    /// `batch`.
    Batch,
    /// `barrier`.
    Barrier,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommRecord {
    /// What was called.
    pub kind: CommKind,
    /// The size of the group it ran on.
    pub group_size: usize,
    /// Payload bytes: the buffer for all-reduce and broadcast, the full gathered or scattered
    /// buffer for all-gather and reduce-scatter, the send buffer for all-to-all, and the bytes
    /// sent (or received, for `recv`) by this rank for point-to-point and batches.
    pub bytes: usize,
}

impl fmt::Display for CommRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}×{} {}B", self.kind, self.group_size, self.bytes)
    }
}

/// Records the calls made through it (and through its sub-groups) into a shared log.
pub struct Counting {
    inner: Box<dyn Communicator>,
    log: Arc<Mutex<Vec<CommRecord>>>,
}

impl Counting {
    /// Wraps `inner` with a new, empty log.
    pub fn new(inner: Box<dyn Communicator>) -> Self {
        Self {
            inner,
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The records so far (this handle and its sub-groups).
    pub fn records(&self) -> Vec<CommRecord> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the records so far.
    pub fn clear(&self) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn record(&self, kind: CommKind, elems: usize) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(CommRecord {
                kind,
                group_size: self.inner.size(),
                bytes: elems * std::mem::size_of::<f32>(),
            });
    }
}

impl Communicator for Counting {
    fn rank(&self) -> Rank {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn world_ranks(&self) -> Vec<Rank> {
        self.inner.world_ranks()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(Counting {
            inner: self.inner.sub_group(members)?,
            log: self.log.clone(),
        }))
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.record(CommKind::AllReduce, buf.len());
        self.inner.all_reduce(buf, op)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) -> Result<()> {
        self.record(CommKind::AllGather, recv.len());
        self.inner.all_gather(send, recv, counts)
    }
    fn reduce_scatter(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.record(CommKind::ReduceScatter, send.len());
        self.inner.reduce_scatter(send, recv, counts, op)
    }
    fn all_to_all(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.record(CommKind::AllToAll, send.len());
        self.inner.all_to_all(send, send_counts, recv, recv_counts)
    }
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        self.record(CommKind::Broadcast, buf.len());
        self.inner.broadcast(buf, root)
    }
    fn send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        self.record(CommKind::Send, data.len());
        self.inner.send(data, peer, tag)
    }
    fn recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        self.record(CommKind::Recv, buf.len());
        self.inner.recv(buf, peer, tag)
    }
    fn batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        let sent = ops
            .iter()
            .map(|o| match o {
                P2p::Send { data, .. } => data.len(),
                P2p::Recv { .. } => 0,
            })
            .sum();
        self.record(CommKind::Batch, sent);
        self.inner.batch(ops)
    }
    fn barrier(&self) -> Result<()> {
        self.record(CommKind::Barrier, 0);
        self.inner.barrier()
    }
}
