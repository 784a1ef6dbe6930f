//! Bytes on the wire by link class: a [`Layer`] that counts what its member sends to members on
//! its own node and to members on other nodes, and that tells the group where its members run
//! (so threads of one process can stand for several nodes).
//!
//! Collectives are counted as this crate's ring algorithms send them (a ring all-reduce of `n`
//! values on `p` members sends `2(p−1)/p·n` values to the next member, an all-to-all each
//! peer's part, a broadcast the buffer from the root to every other member); point-to-point
//! messages and batches exactly. The all-reduce algorithms of [`crate::allreduce`] and the
//! compressed exchanges of [`crate::codec`] are built from those calls and are counted by them.
//!
//! ```
//! use std::sync::Arc;
//! use comm::wire::{Wire, WireMeter};
//! use comm::{Communicator, ReduceOp, ThreadComm, CommError};
//!
//! let meter = Arc::new(WireMeter::default());
//! let m = meter.clone();
//! ThreadComm::run(4, move |c| -> Result<(), CommError> {
//!     // Two nodes of two ranks.
//!     let w = Wire::new(Box::new(c), Arc::new(vec![0, 0, 1, 1]), m.clone());
//!     assert_eq!(w.member_nodes(), vec![0, 0, 1, 1]);
//!     let mut x = vec![1.0f32; 400];
//!     w.all_reduce(&mut x, ReduceOp::Sum)
//! })?;
//! // Each rank sends 2·3/4·400 values to the next; ranks 1 and 3 cross to the other node.
//! let b = meter.read();
//! assert_eq!((b.intra_node, b.inter_node), (2 * 600 * 4, 2 * 600 * 4));
//! # Ok::<(), CommError>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::communicator::{chunk_counts, Communicator, P2p, Rank};
use crate::error::Result;
use crate::layer::{CollectiveCall, Layer};

/// Bytes sent, by link class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// To members on the sender's node.
    pub intra_node: u64,
    /// To members on other nodes.
    pub inter_node: u64,
}

impl WireBytes {
    /// Both classes.
    pub fn total(&self) -> u64 {
        self.intra_node + self.inter_node
    }
}

/// Shared counters of the bytes some members sent.
#[derive(Debug, Default)]
pub struct WireMeter {
    intra: AtomicU64,
    inter: AtomicU64,
}

impl WireMeter {
    /// What was sent so far.
    pub fn read(&self) -> WireBytes {
        WireBytes {
            intra_node: self.intra.load(Ordering::Relaxed),
            inter_node: self.inter.load(Ordering::Relaxed),
        }
    }

    /// What was sent since the last `take` (the counters restart at zero).
    pub fn take(&self) -> WireBytes {
        WireBytes {
            intra_node: self.intra.swap(0, Ordering::Relaxed),
            inter_node: self.inter.swap(0, Ordering::Relaxed),
        }
    }
}

/// A communicator that counts the bytes its member sends into a [`WireMeter`].
pub struct Wire {
    inner: Box<dyn Communicator>,
    /// The node of every world rank.
    nodes: Arc<Vec<usize>>,
    meter: Arc<WireMeter>,
    /// The members' world ranks, in group order.
    members: Vec<usize>,
}

impl Wire {
    /// Wraps `inner`; `nodes[w]` is the node of world rank `w` (world ranks beyond it count as
    /// node 0).
    pub fn new(
        inner: Box<dyn Communicator>,
        nodes: Arc<Vec<usize>>,
        meter: Arc<WireMeter>,
    ) -> Self {
        let members = inner.world_ranks().iter().map(|r| r.0).collect();
        Self {
            inner,
            nodes,
            meter,
            members,
        }
    }

    fn node(&self, world: usize) -> usize {
        self.nodes.get(world).copied().unwrap_or(0)
    }

    /// Counts `values` `f32`s sent to member `to`.
    fn count(&self, to: usize, values: usize) {
        let (Some(&me), Some(&peer)) =
            (self.members.get(self.inner.rank().0), self.members.get(to))
        else {
            return;
        };
        let bytes = (values * std::mem::size_of::<f32>()) as u64;
        if self.node(me) == self.node(peer) {
            self.meter.intra.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.meter.inter.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl Layer for Wire {
    fn inner(&self) -> &dyn Communicator {
        self.inner.as_ref()
    }
    fn inner_mut(&mut self) -> &mut dyn Communicator {
        self.inner.as_mut()
    }
    fn over(&self, inner: Box<dyn Communicator>) -> Self {
        Wire::new(inner, self.nodes.clone(), self.meter.clone())
    }

    fn on_member_nodes(&self) -> Vec<usize> {
        self.members.iter().map(|&w| self.node(w)).collect()
    }

    fn on_collective(
        &self,
        call: CollectiveCall<'_>,
        run: &mut dyn FnMut(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        run(self.inner())?;
        let (p, me) = (self.inner.size(), self.inner.rank().0);
        if p <= 1 {
            return Ok(());
        }
        let next = (me + 1) % p;
        // A ring reduce-scatter sends every chunk but this member's; a ring all-gather every
        // chunk but the next member's.
        let all = |c: &[usize]| c.iter().sum::<usize>();
        match call {
            CollectiveCall::AllReduce { len } => {
                let c = chunk_counts(len, p);
                self.count(next, 2 * all(&c) - c[me] - c[next]);
            }
            CollectiveCall::AllGather { counts } => self.count(next, all(counts) - counts[next]),
            CollectiveCall::ReduceScatter { counts } => self.count(next, all(counts) - counts[me]),
            CollectiveCall::AllToAll { send, .. } => {
                for (j, &n) in send.iter().enumerate().filter(|&(j, _)| j != me) {
                    self.count(j, n);
                }
            }
            CollectiveCall::Broadcast { len, root } => {
                if root.0 == me {
                    for j in (0..p).filter(|&j| j != me) {
                        self.count(j, len);
                    }
                }
            }
            CollectiveCall::Barrier => {}
        }
        Ok(())
    }

    fn on_send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        self.inner.send(data, peer, tag)?;
        self.count(peer.0, data.len());
        Ok(())
    }

    fn on_batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        self.inner.batch(ops)?;
        for op in ops.iter() {
            if let P2p::Send { peer, data } = op {
                self.count(peer.0, data.len());
            }
        }
        Ok(())
    }
}
