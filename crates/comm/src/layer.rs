//! Communicators that wrap another one ([`crate::Counting`], the simulator's clocked
//! communicator): a [`Layer`] says what it adds around the calls it cares about, and the
//! blanket implementation forwards everything else, so no wrapper writes the trait out again.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use comm::{CollectiveCall, Communicator, Layer, ReduceOp, ThreadComm, CommError};
//!
//! /// Counts the collectives its members call.
//! struct Tally(Box<dyn Communicator>, Arc<AtomicUsize>);
//! impl Layer for Tally {
//!     fn inner(&self) -> &dyn Communicator { self.0.as_ref() }
//!     fn inner_mut(&mut self) -> &mut dyn Communicator { self.0.as_mut() }
//!     fn over(&self, inner: Box<dyn Communicator>) -> Self { Tally(inner, self.1.clone()) }
//!     fn on_collective(
//!         &self,
//!         _: CollectiveCall<'_>,
//!         run: &mut dyn FnMut(&dyn Communicator) -> comm::Result<()>,
//!     ) -> comm::Result<()> {
//!         self.1.fetch_add(1, Ordering::Relaxed);
//!         run(self.inner())
//!     }
//! }
//!
//! let n = Arc::new(AtomicUsize::new(0));
//! let n2 = n.clone();
//! ThreadComm::run(2, move |c| -> Result<(), CommError> {
//!     let t = Tally(Box::new(c), n2.clone());
//!     let mut x = [1.0f32];
//!     t.all_reduce(&mut x, ReduceOp::Sum)?;
//!     t.barrier()
//! })?;
//! assert_eq!(n.load(Ordering::Relaxed), 4);
//! # Ok::<(), CommError>(())
//! ```

use std::time::Duration;

use crate::communicator::{Communicator, P2p, Rank, ReduceOp};
use crate::error::Result;

/// A collective as a [`Layer`] sees it before it runs: its kind and sizes (in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveCall<'a> {
    /// `all_reduce` of `len` values.
    AllReduce {
        /// Values reduced.
        len: usize,
    },
    /// `all_gather` with these per-rank counts.
    AllGather {
        /// Values from each rank.
        counts: &'a [usize],
    },
    /// `reduce_scatter` with these per-rank counts.
    ReduceScatter {
        /// Values left on each rank.
        counts: &'a [usize],
    },
    /// `all_to_all` with these per-peer counts.
    AllToAll {
        /// Values this member sends to each rank.
        send: &'a [usize],
        /// Values this member receives from each rank.
        recv: &'a [usize],
    },
    /// `broadcast` of `len` values.
    Broadcast {
        /// Values broadcast.
        len: usize,
        /// The member they come from.
        root: Rank,
    },
    /// `barrier`.
    Barrier,
}

impl CollectiveCall<'_> {
    /// The values the call moves as [`crate::CommRecord`] counts them: the buffer of an
    /// all-reduce or broadcast, the whole gathered or scattered buffer, an all-to-all's send
    /// buffer.
    pub fn payload(&self) -> usize {
        match *self {
            CollectiveCall::AllReduce { len } | CollectiveCall::Broadcast { len, .. } => len,
            CollectiveCall::AllGather { counts } | CollectiveCall::ReduceScatter { counts } => {
                counts.iter().sum()
            }
            CollectiveCall::AllToAll { send, .. } => send.iter().sum(),
            CollectiveCall::Barrier => 0,
        }
    }
}

/// What a wrapping communicator adds to an inner one. Every method it does not override
/// forwards to [`Layer::inner`]; sub-groups are the inner communicator's, wrapped by
/// [`Layer::over`]. (The hooks are named `on_…` so that they never shadow the
/// [`Communicator`] methods of the same call.)
pub trait Layer: Send + Sized + 'static {
    /// The wrapped communicator.
    fn inner(&self) -> &dyn Communicator;
    /// The wrapped communicator, to change its timeout.
    fn inner_mut(&mut self) -> &mut dyn Communicator;
    /// The same layer (sharing whatever state it shares) over `inner`, a sub-group.
    fn over(&self, inner: Box<dyn Communicator>) -> Self;

    /// Runs the collective `call` through `run`, which performs it on the communicator it is
    /// given (normally [`Layer::inner`]).
    fn on_collective(
        &self,
        call: CollectiveCall<'_>,
        run: &mut dyn FnMut(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        let _ = call;
        run(self.inner())
    }
    /// See [`Communicator::member_nodes`].
    fn on_member_nodes(&self) -> Vec<usize> {
        self.inner().member_nodes()
    }
    /// See [`Communicator::send`].
    fn on_send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        self.inner().send(data, peer, tag)
    }
    /// See [`Communicator::recv`].
    fn on_recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        self.inner().recv(buf, peer, tag)
    }
    /// See [`Communicator::recv_any`].
    fn on_recv_any(&self, buf: &mut [f32], tag: u32) -> Result<Rank> {
        self.inner().recv_any(buf, tag)
    }
    /// See [`Communicator::batch`].
    fn on_batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        self.inner().batch(ops)
    }
}

impl<L: Layer> Communicator for L {
    fn rank(&self) -> Rank {
        self.inner().rank()
    }
    fn size(&self) -> usize {
        self.inner().size()
    }
    fn world_ranks(&self) -> Vec<Rank> {
        self.inner().world_ranks()
    }
    fn member_nodes(&self) -> Vec<usize> {
        Layer::on_member_nodes(self)
    }
    fn timeout(&self) -> Duration {
        self.inner().timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner_mut().set_timeout(timeout)
    }
    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.over(self.inner().sub_group(members)?)))
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let call = CollectiveCall::AllReduce { len: buf.len() };
        Layer::on_collective(self, call, &mut |c| c.all_reduce(buf, op))
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) -> Result<()> {
        let call = CollectiveCall::AllGather { counts };
        Layer::on_collective(self, call, &mut |c| c.all_gather(send, recv, counts))
    }
    fn reduce_scatter(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let call = CollectiveCall::ReduceScatter { counts };
        Layer::on_collective(self, call, &mut |c| {
            c.reduce_scatter(send, recv, counts, op)
        })
    }
    fn all_to_all(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        let call = CollectiveCall::AllToAll {
            send: send_counts,
            recv: recv_counts,
        };
        Layer::on_collective(self, call, &mut |c| {
            c.all_to_all(send, send_counts, recv, recv_counts)
        })
    }
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        let call = CollectiveCall::Broadcast {
            len: buf.len(),
            root,
        };
        Layer::on_collective(self, call, &mut |c| c.broadcast(buf, root))
    }
    fn send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        Layer::on_send(self, data, peer, tag)
    }
    fn recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        Layer::on_recv(self, buf, peer, tag)
    }
    fn recv_any(&self, buf: &mut [f32], tag: u32) -> Result<Rank> {
        Layer::on_recv_any(self, buf, tag)
    }
    fn batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        Layer::on_batch(self, ops)
    }
    fn barrier(&self) -> Result<()> {
        Layer::on_collective(self, CollectiveCall::Barrier, &mut |c| c.barrier())
    }
}
