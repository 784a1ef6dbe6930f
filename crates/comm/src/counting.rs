//! A wrapper that records every call and its payload, for tests that assert communication.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::communicator::{Communicator, P2p, Rank};
use crate::error::Result;
use crate::layer::{CollectiveCall, Layer};

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

impl Layer for Counting {
    fn inner(&self) -> &dyn Communicator {
        self.inner.as_ref()
    }
    fn inner_mut(&mut self) -> &mut dyn Communicator {
        self.inner.as_mut()
    }
    fn over(&self, inner: Box<dyn Communicator>) -> Self {
        Counting {
            inner,
            log: self.log.clone(),
        }
    }
    fn on_collective(
        &self,
        call: CollectiveCall<'_>,
        run: &mut dyn FnMut(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        let kind = match call {
            CollectiveCall::AllReduce { .. } => CommKind::AllReduce,
            CollectiveCall::AllGather { .. } => CommKind::AllGather,
            CollectiveCall::ReduceScatter { .. } => CommKind::ReduceScatter,
            CollectiveCall::AllToAll { .. } => CommKind::AllToAll,
            CollectiveCall::Broadcast { .. } => CommKind::Broadcast,
            CollectiveCall::Barrier => CommKind::Barrier,
        };
        self.record(kind, call.payload());
        run(self.inner.as_ref())
    }
    fn on_send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        self.record(CommKind::Send, data.len());
        self.inner.send(data, peer, tag)
    }
    fn on_recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        self.record(CommKind::Recv, buf.len());
        self.inner.recv(buf, peer, tag)
    }
    fn on_recv_any(&self, buf: &mut [f32], tag: u32) -> Result<Rank> {
        self.record(CommKind::Recv, buf.len());
        self.inner.recv_any(buf, tag)
    }
    fn on_batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
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
}
