//! The simulator's communicator: every call runs on a real communicator (so the data are
//! exact) and moves the ranks' [`Clock`]s as the simulated cluster's links would — a collective
//! starts when its last member arrives and lasts its ring algorithm's α–β time; a message
//! arrives its link's latency plus bytes over bandwidth after it was sent.

use comm::{CollectiveCall, Communicator, Layer, P2p, Rank, Result};
use planner::{Cluster, Link};
use std::sync::Arc;

use crate::clock::{Clock, CoreShare, Phase};

/// A [`Communicator`] that advances a [`Clock`] by the simulated cluster's links.
///
/// Clocks travel with the data: before a collective the members gather their times (two `f32`
/// words per member holding the time's bits) and after every point-to-point
/// message its sender's time follows on the same tag, so the inner communicator carries a few
/// more small messages than the run itself.
pub struct SimComm {
    inner: Box<dyn Communicator>,
    /// The members' world ranks, in group order.
    members: Vec<usize>,
    cluster: Arc<Cluster>,
    clock: Clock,
    share: Option<Arc<CoreShare>>,
}

/// A time as two `f32` words holding its bits (exact).
fn split(t: f64) -> [f32; 2] {
    comm::words::encode_f64(t)
}

fn join(p: &[f32]) -> f64 {
    comm::words::decode_f64(p)
}

impl SimComm {
    /// Wraps `inner` (a group numbered like the simulated cluster's devices: world rank `r` on
    /// node `r / devices_per_node`), moving `clock`.
    pub fn new(inner: Box<dyn Communicator>, cluster: &Cluster, clock: Clock) -> Self {
        Self::wrap(inner, Arc::new(cluster.clone()), clock, None)
    }

    fn wrap(
        inner: Box<dyn Communicator>,
        cluster: Arc<Cluster>,
        clock: Clock,
        share: Option<Arc<CoreShare>>,
    ) -> Self {
        let members = inner.world_ranks().iter().map(|r| r.0).collect();
        Self {
            inner,
            members,
            cluster,
            clock,
            share,
        }
    }

    /// Counts this rank as not computing in `share` while it waits in a call (from its own
    /// thread), for [`crate::SimBackend::sharing`].
    pub fn sharing(mut self, share: Arc<CoreShare>) -> Self {
        self.share = Some(share);
        self
    }

    /// The inner group, with this rank counted as blocked while `f` runs on it.
    fn wait_in<T>(&self, f: impl FnOnce(&dyn Communicator) -> T) -> T {
        match &self.share {
            Some(s) if self.clock.on_main_thread() => s.blocked(|| f(self.inner.as_ref())),
            _ => f(self.inner.as_ref()),
        }
    }

    /// Wraps a borrowed world: a group of all its members, in order.
    pub fn over(world: &dyn Communicator, cluster: &Cluster, clock: Clock) -> Result<Self> {
        let all: Vec<Rank> = (0..world.size()).map(Rank).collect();
        Ok(Self::new(world.sub_group(&all)?, cluster, clock))
    }

    /// The rank's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn node(&self, world_rank: usize) -> usize {
        world_rank / self.cluster.devices_per_node.max(1)
    }

    /// The link of this group (cross-node when its members are on more than one node).
    fn group_link(&self) -> Link {
        let first = self.members.first().map_or(0, |&r| self.node(r));
        if self.members.iter().all(|&r| self.node(r) == first) {
            self.cluster.same_node
        } else {
            self.cluster.cross_node
        }
    }

    /// Whether `peer` is on another node than this member.
    fn crosses(&self, peer: Rank) -> bool {
        let world = |r: usize| self.members.get(r).copied().unwrap_or(0);
        self.node(world(self.inner.rank().0)) != self.node(world(peer.0))
    }

    /// The link between this member and `peer`.
    fn peer_link(&self, peer: Rank) -> Link {
        if self.crosses(peer) {
            self.cluster.cross_node
        } else {
            self.cluster.same_node
        }
    }

    fn bytes(&self, elems: usize) -> f64 {
        elems as f64 * self.cluster.elem_bytes
    }

    /// When this member may start an operation: on the rank's own thread, the main timeline's
    /// time (after waiting for the side timeline if this group contains its group); on another
    /// thread, the side timeline's.
    fn begin(&self) -> (bool, f64) {
        if self.clock.on_main_thread() {
            self.clock.join_side(&self.members);
            (true, self.clock.now())
        } else {
            (false, self.clock.side_start())
        }
    }

    /// Ends an operation that started at `t0` (this member), ends at `end`, and spent its last
    /// `transfer` seconds moving bytes (any earlier time waiting).
    fn finish(&self, main: bool, t0: f64, end: f64, transfer: f64) {
        let transfer = transfer.min(end - t0).max(0.0);
        if main {
            self.clock.wait_until(end - transfer);
            self.clock.advance(Phase::Transfer, transfer);
        } else {
            self.clock.side_done(end.max(t0), &self.members);
        }
    }

    /// A ring all-gather's or reduce-scatter's volume through each link (every member passes on
    /// `n − 1` chunks, the largest bounding each step) and its steps.
    fn ring_of_chunks(&self, counts: &[usize]) -> (f64, usize) {
        let n = self.size().max(1);
        let most = counts.iter().copied().max().unwrap_or(0);
        (((n - 1) * most) as f64, n - 1)
    }

    /// Runs the collective `f` on the inner group: it starts when the last member arrives and
    /// lasts a ring algorithm's time for `volume` elements through every member's link in
    /// `steps` messages.
    fn timed_collective(
        &self,
        secs: f64,
        f: impl FnOnce(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        let (main, t0) = self.begin();
        let n = self.inner.size();
        if n <= 1 {
            return f(self.inner.as_ref());
        }
        let mut all = vec![0.0f32; 2 * n];
        self.wait_in(|c| c.all_gather(&split(t0), &mut all, &vec![2; n]))?;
        let start = all.chunks(2).map(join).fold(t0, f64::max);
        self.wait_in(f)?;
        self.finish(main, t0, start + secs, secs);
        Ok(())
    }

    /// A ring algorithm's time: `volume` elements through every member's link in `steps`
    /// messages, over the group's link (its slowest).
    fn ring_seconds(&self, volume: f64, steps: usize) -> f64 {
        self.group_link()
            .seconds(volume * self.cluster.elem_bytes, steps as f64)
    }

    /// An all-to-all's time for this member: what it sends to (and takes from) members of its
    /// own node and of other nodes moves over the two link classes at once, one message to
    /// each peer.
    fn all_to_all_seconds(&self, send: &[usize], recv: &[usize]) -> f64 {
        let me = self.rank().0;
        let (mut same, mut cross) = ((0usize, 0usize), (0usize, 0usize));
        for j in (0..self.size()).filter(|&j| j != me) {
            let (s, r) = (
                send.get(j).copied().unwrap_or(0),
                recv.get(j).copied().unwrap_or(0),
            );
            let slot = if self.crosses(Rank(j)) {
                &mut cross
            } else {
                &mut same
            };
            slot.0 += s;
            slot.1 += r;
        }
        let peers = self.size().saturating_sub(1) as f64;
        let latency = if cross != (0, 0) {
            self.cluster.cross_node.latency_us
        } else {
            self.cluster.same_node.latency_us
        };
        let bytes = |(s, r): (usize, usize)| self.bytes(s.max(r));
        (bytes(same) / (self.cluster.same_node.gbps * 1e9))
            .max(bytes(cross) / (self.cluster.cross_node.gbps * 1e9))
            + peers * latency * 1e-6
    }
}

impl Layer for SimComm {
    fn inner(&self) -> &dyn Communicator {
        self.inner.as_ref()
    }
    fn inner_mut(&mut self) -> &mut dyn Communicator {
        self.inner.as_mut()
    }
    fn over(&self, inner: Box<dyn Communicator>) -> Self {
        SimComm::wrap(
            inner,
            self.cluster.clone(),
            self.clock.clone(),
            self.share.clone(),
        )
    }
    fn on_collective(
        &self,
        call: CollectiveCall<'_>,
        run: &mut dyn FnMut(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        let n = self.size().max(1);
        let secs = match call {
            CollectiveCall::AllReduce { len } => {
                self.ring_seconds(2.0 * (n - 1) as f64 / n as f64 * len as f64, 2 * (n - 1))
            }
            CollectiveCall::AllGather { counts } | CollectiveCall::ReduceScatter { counts } => {
                let (volume, steps) = self.ring_of_chunks(counts);
                self.ring_seconds(volume, steps)
            }
            CollectiveCall::AllToAll { send, recv } => self.all_to_all_seconds(send, recv),
            // Pipelined along a chain: the bytes once, a latency per hop.
            CollectiveCall::Broadcast { len, .. } => self.ring_seconds(len as f64, n - 1),
            CollectiveCall::Barrier => self.ring_seconds(0.0, 2 * (n - 1)),
        };
        self.timed_collective(secs, |c| run(c))
    }
    fn on_send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        let (main, t0) = self.begin();
        // Buffered: the sender goes on at once, but its messages leave one after another
        // through its link; the stamp is when this one starts to leave.
        let link = self.peer_link(peer);
        let depart = self.clock.egress(
            self.crosses(peer),
            t0,
            self.bytes(data.len()) / (link.gbps * 1e9),
        );
        self.inner.send(data, peer, tag)?;
        self.inner.send(&split(depart), peer, tag)?;
        self.finish(main, t0, t0, 0.0);
        Ok(())
    }
    fn on_recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        let (main, t0) = self.begin();
        let mut sent = [0.0f32; 2];
        self.wait_in(|c| {
            c.recv(buf, peer, tag)?;
            c.recv(&mut sent, peer, tag)
        })?;
        let link = self.peer_link(peer);
        let secs = link.seconds(self.bytes(buf.len()), 1.0);
        // Messages arriving together come in one after another through this member's link;
        // a pipeline stage woken by its neighbour's on shared cores then waits for a core
        // (`Cluster::handoff_us`, as the cost model charges each stage boundary).
        let handoff = if comm::tags::is_pipeline(tag) {
            self.cluster.handoff_seconds()
        } else {
            0.0
        };
        let arrived = self.clock.ingress(
            self.crosses(peer),
            join(&sent) + secs,
            self.bytes(buf.len()) / (link.gbps * 1e9),
        ) + handoff;
        let end = t0.max(arrived);
        self.finish(main, t0, end, secs);
        Ok(())
    }
    fn on_batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        let (main, t0) = self.begin();
        let stamp = split(t0);
        let recvs = ops.iter().filter(|o| matches!(o, P2p::Recv { .. })).count();
        let mut stamps = vec![[0.0f32; 2]; recvs];
        // (peer, elements) of each receive, in posting order.
        let mut received = Vec::with_capacity(recvs);
        let (mut sent_elems, mut recv_elems) = (0usize, 0usize);
        // Elements by link class: [same node, cross node].
        let (mut sent_by, mut recv_by) = ([0usize; 2], [0usize; 2]);
        {
            let mut slots = stamps.iter_mut();
            let mut all: Vec<P2p<'_>> = Vec::with_capacity(2 * ops.len());
            for op in ops.iter_mut() {
                match op {
                    P2p::Send { peer, data } => {
                        sent_elems += data.len();
                        sent_by[usize::from(self.crosses(*peer))] += data.len();
                        all.push(P2p::Send { peer: *peer, data });
                        all.push(P2p::Send {
                            peer: *peer,
                            data: &stamp,
                        });
                    }
                    P2p::Recv { peer, buf } => {
                        recv_elems += buf.len();
                        recv_by[usize::from(self.crosses(*peer))] += buf.len();
                        received.push((*peer, buf.len()));
                        all.push(P2p::Recv { peer: *peer, buf });
                        if let Some(slot) = slots.next() {
                            all.push(P2p::Recv {
                                peer: *peer,
                                buf: slot,
                            });
                        }
                    }
                }
            }
            self.wait_in(|c| c.batch(&mut all))?;
        }
        // Done when this member has pushed and taken its bytes through its links (the bytes
        // for its own node and for other nodes at once, each over its class), and every
        // message has arrived from its sender.
        let own = [false, true]
            .iter()
            .map(|&cross| {
                let (s, r) = (sent_by[usize::from(cross)], recv_by[usize::from(cross)]);
                if s + r == 0 {
                    return 0.0;
                }
                let link = if cross {
                    self.cluster.cross_node
                } else {
                    self.cluster.same_node
                };
                link.seconds(self.bytes(s.max(r)), 1.0)
            })
            .fold(0.0, f64::max);
        let arrivals = received
            .iter()
            .zip(&stamps)
            .map(|(&(peer, elems), s)| {
                join(s) + self.peer_link(peer).seconds(self.bytes(elems), 1.0)
            })
            .fold(f64::NEG_INFINITY, f64::max);
        if sent_elems + recv_elems > 0 {
            self.finish(main, t0, (t0 + own).max(arrivals), own);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::{ReduceOp, ThreadComm};

    fn cluster() -> Cluster {
        let mut c = crate::presets::cluster("h100x8").unwrap();
        c.devices_per_node = 2;
        c.nodes = 2;
        c.same_node = Link::new(1.0, 1.0);
        c.cross_node = Link::new(0.5, 10.0);
        c.elem_bytes = 4.0;
        c
    }

    #[test]
    fn a_collective_starts_with_its_last_member_and_lasts_the_ring_time() {
        let got = ThreadComm::run(4, |w| {
            let c = cluster();
            let clock = Clock::new();
            // Rank r arrives at r ms.
            clock.advance(Phase::Compute, 1e-3 * w.rank().0 as f64);
            let sim = SimComm::over(&w, &c, clock.clone())?;
            let mut buf = vec![w.rank().0 as f32; 1000];
            sim.all_reduce(&mut buf, ReduceOp::Sum)?;
            assert_eq!(buf[0], 6.0);
            // Ranks 0 and 1 share a node.
            let pair = sim.sub_group(&[Rank(w.rank().0 / 2 * 2), Rank(w.rank().0 / 2 * 2 + 1)])?;
            let before = clock.now();
            pair.all_reduce(&mut buf, ReduceOp::Sum)?;
            Ok::<_, comm::CommError>((before, clock.now(), clock.read()))
        })
        .unwrap();
        // 4 ranks over 2 nodes: cross-node ring, 2·3/4 · 4000 B at 0.5 GB/s + 6 × 10 µs.
        let ring = 1.5 * 4000.0 / 0.5e9 + 6.0 * 10e-6;
        for (before, after, r) in &got {
            assert!((before - (3e-3 + ring)).abs() < 1e-12, "{before}");
            // Same node: 2·1/2 · 4000 B at 1 GB/s + 2 × 1 µs.
            assert!((after - before - (4000.0 / 1e9 + 2e-6)).abs() < 1e-12);
            let sum: f64 = r.phases.iter().sum();
            assert!((sum - r.now).abs() < 1e-12);
        }
        // Rank 0 waited 3 ms for rank 3; rank 3 did not wait.
        assert!((got[0].2.phase(Phase::Wait) - 3e-3).abs() < 1e-12);
        assert_eq!(got[3].2.phase(Phase::Wait), 0.0);
    }

    #[test]
    fn a_pipeline_message_on_shared_cores_waits_for_a_core() {
        // 4 devices on 2 shared cores, 500 µs for a woken stage to get one: a pipeline tag
        // pays it, another tag does not; on cores of their own neither does.
        for (shared, tag, want) in [
            (2.0, comm::tags::pipeline(3, false, 0), 500e-6),
            (2.0, 7, 0.0),
            (0.0, comm::tags::pipeline(3, false, 0), 0.0),
        ] {
            let got = ThreadComm::run(2, move |w| {
                let mut c = cluster();
                (c.shared_cores, c.handoff_us) = (shared, 500.0);
                let clock = Clock::new();
                let sim = SimComm::over(&w, &c, clock.clone())?;
                if w.rank().0 == 0 {
                    sim.send(&[1.0; 250], Rank(1), tag)?;
                } else {
                    sim.recv(&mut [0.0; 250], Rank(0), tag)?;
                }
                Ok::<_, comm::CommError>(clock.now())
            })
            .unwrap();
            // Same node: 1000 B at 1 GB/s + 1 µs, then the wait.
            assert!((got[1] - (2e-6 + want)).abs() < 1e-12, "{tag}: {}", got[1]);
        }
    }

    #[test]
    fn a_message_arrives_a_link_time_after_it_was_sent() {
        let got = ThreadComm::run(3, |w| {
            let c = cluster();
            let clock = Clock::new();
            let sim = SimComm::over(&w, &c, clock.clone())?;
            match w.rank().0 {
                0 => {
                    clock.advance(Phase::Compute, 0.5);
                    sim.send(&[1.0; 250], Rank(1), 7)?;
                    sim.batch(&mut [P2p::Send {
                        peer: Rank(2),
                        data: &[2.0; 500],
                    }])?;
                }
                1 => {
                    let mut b = [0.0; 250];
                    sim.recv(&mut b, Rank(0), 7)?;
                    assert_eq!(b[0], 1.0);
                }
                _ => {
                    clock.advance(Phase::Compute, 2.0);
                    let mut b = [0.0; 500];
                    sim.batch(&mut [P2p::Recv {
                        peer: Rank(0),
                        buf: &mut b,
                    }])?;
                    assert_eq!(b[0], 2.0);
                }
            }
            Ok::<_, comm::CommError>(clock.now())
        })
        .unwrap();
        // Rank 1 (same node): sent at 0.5 s, 1000 B at 1 GB/s + 1 µs.
        assert!((got[1] - (0.5 + 1e-6 + 1e-6)).abs() < 1e-12, "{}", got[1]);
        // Rank 2 (other node) was late itself: only its own link time after 2 s.
        assert!(
            (got[2] - (2.0 + 2000.0 / 0.5e9 + 10e-6)).abs() < 1e-12,
            "{}",
            got[2]
        );
        // The sender pushed 2000 B cross-node after its send.
        assert!(
            (got[0] - (0.5 + 2000.0 / 0.5e9 + 10e-6)).abs() < 1e-12,
            "{}",
            got[0]
        );
    }

    #[test]
    fn another_threads_reduction_overlaps_until_a_collective_needs_it() {
        let got = ThreadComm::run(4, |w| {
            let c = cluster();
            let clock = Clock::new();
            let sim = SimComm::over(&w, &c, clock.clone())?;
            let me = w.rank().0;
            // "DP" pairs {0, 2} and {1, 3} (across nodes), "TP" pairs {0, 1} and {2, 3}.
            let dp = sim.sub_group(&[Rank(me % 2), Rank(me % 2 + 2)])?;
            let tp = sim.sub_group(&[Rank(me / 2 * 2), Rank(me / 2 * 2 + 1)])?;
            clock.advance(Phase::Compute, 1.0);
            // A 4 MB reduction on a second thread, launched at 1 s: 4e6 B cross-node takes 8 ms.
            let c2 = clock.clone();
            let side = std::thread::scope(|s| {
                s.spawn(move || {
                    assert!(!c2.on_main_thread());
                    let mut g = vec![1.0f32; 1_000_000];
                    dp.all_reduce(&mut g, ReduceOp::Sum).map(|_| g[0])
                })
                .join()
                .unwrap()
            })?;
            assert_eq!(side, 2.0);
            // The main timeline did not wait for it, and a TP collective does not either.
            assert_eq!(clock.now(), 1.0);
            let mut x = [1.0f32];
            tp.all_reduce(&mut x, ReduceOp::Sum)?;
            let after_tp = clock.now();
            // A world collective does: it contains the DP group.
            sim.all_reduce(&mut x, ReduceOp::Sum)?;
            Ok::<_, comm::CommError>((after_tp, clock.now(), clock.read()))
        })
        .unwrap();
        let reduction = 1.0 + 4e6 / 0.5e9 + 2.0 * 10e-6;
        for (after_tp, after_world, r) in &got {
            assert!(
                (after_tp - (1.0 + 4.0 / 1e9 + 2e-6)).abs() < 1e-12,
                "{after_tp}"
            );
            let world = 1.5 * 4.0 / 0.5e9 + 6.0 * 10e-6;
            assert!(
                (after_world - (reduction + world)).abs() < 1e-12,
                "{after_world}"
            );
            assert!(r.phase(Phase::Wait) > 7e-3);
        }
    }
}
