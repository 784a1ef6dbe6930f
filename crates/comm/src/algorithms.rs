//! The collectives, once, over any FIFO message transport: rings for reduce-scatter and
//! all-gather (all-reduce is both), direct all-to-all, flat broadcast, a dissemination barrier,
//! and batched groups that post their sends first. `ThreadComm` and `MpiComm` both run these, so
//! they add the same numbers in the same order: a run gives bitwise the same result on either.

use crate::communicator::{chunk_counts, offsets, P2p, Rank, ReduceOp};
use crate::error::{check_len, CommError, Result};

/// Which stream of messages between two members a message belongs to. Messages of one channel
/// from one sender arrive in the order they were posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Channel {
    /// Point-to-point with a user tag.
    User(u32),
    /// The `n`-th collective of the group.
    Collective(u64),
    /// Batched groups.
    Batch,
}

/// Buffered FIFO messages between the members of one group.
pub(crate) trait Transport {
    /// World ranks of the members, in group order.
    fn members(&self) -> &[usize];
    /// This member's index in the group.
    fn me(&self) -> usize;
    /// Sends `data` to world rank `dst` without waiting for it to be received.
    fn post(&self, dst: usize, channel: Channel, data: &[f32]) -> Result<()>;
    /// Waits for the next message from world rank `src` on `channel`; `what` names the
    /// operation for errors.
    fn take(&self, src: usize, channel: Channel, what: &dyn Fn() -> String) -> Result<Vec<f32>>;
    /// Waits for the next message on `channel` from any member: the sender's world rank and
    /// the message.
    fn take_any(&self, channel: Channel, what: &dyn Fn() -> String) -> Result<(usize, Vec<f32>)>;
    /// Enters the next collective: its channel and sequence number.
    fn enter(&self) -> (Channel, u64);
    /// Hands a received buffer back for reuse.
    fn recycle(&self, _buf: Vec<f32>) {}
    /// The largest message a ring step sends at once: a longer chunk goes in pieces of this
    /// many elements, pipelined (unlimited by default).
    fn pipeline_elems(&self) -> usize {
        usize::MAX
    }
    /// A scratch buffer of `n` elements with arbitrary contents (possibly a reused buffer).
    fn scratch_len(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }

    /// Describes the `seq`-th collective `name` for errors.
    fn describe(&self, name: &str, seq: u64) -> String {
        format!("{name} #{seq} on world ranks {:?}", self.members())
    }

    /// The world rank of member `r`.
    fn world_rank_of(&self, r: Rank, op: &'static str) -> Result<usize> {
        self.members()
            .get(r.0)
            .copied()
            .ok_or(CommError::InvalidRank {
                op,
                rank: r,
                size: self.members().len(),
            })
    }
}

fn next<T: Transport + ?Sized>(t: &T) -> usize {
    let m = t.members();
    m[(t.me() + 1) % m.len()]
}

fn prev<T: Transport + ?Sized>(t: &T) -> usize {
    let m = t.members();
    m[(t.me() + m.len() - 1) % m.len()]
}

/// Messages of at most `piece` elements covering `range` (one empty message for an empty range).
fn pieces(
    range: std::ops::Range<usize>,
    piece: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let piece = piece.max(1);
    let n = (range.end - range.start).div_ceil(piece).max(1);
    (0..n).map(move |k| {
        let a = (range.start + k * piece).min(range.end);
        a..(a + piece).min(range.end)
    })
}

/// One ring step, pipelined: `send` goes to the next member in pieces of at most
/// [`Transport::pipeline_elems`], and each piece of the `recv_len` elements from the previous
/// member is handed to `land` (its range within those elements, the values) as it arrives, one
/// piece ahead of the sends. Small pieces stay in the cache between the sender's copy and the
/// receiver's use, and the two overlap.
fn ring_step<T: Transport + ?Sized>(
    t: &T,
    ch: Channel,
    send: &[f32],
    recv_len: usize,
    name: &'static str,
    what: &dyn Fn() -> String,
    mut land: impl FnMut(std::ops::Range<usize>, &[f32]),
) -> Result<()> {
    let piece = t.pipeline_elems();
    let mut out = pieces(0..send.len(), piece);
    if let Some(r) = out.next() {
        t.post(next(t), ch, &send[r])?;
    }
    for r in pieces(0..recv_len, piece) {
        if let Some(s) = out.next() {
            t.post(next(t), ch, &send[s])?;
        }
        let m = t.take(prev(t), ch, what)?;
        check_len(name, "ring message", r.end - r.start, m.len())?;
        land(r, &m);
        t.recycle(m);
    }
    for s in out {
        t.post(next(t), ch, &send[s])?;
    }
    Ok(())
}

/// Chunk `a` of `buf` to read and chunk `b` to write (`a` and `b` do not overlap).
fn read_and_write(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if a.start >= b.end {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    } else {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    }
}

/// Ring reduce-scatter in place over `buf` split by `counts`: on return, chunk `me` of `buf`
/// holds the reduced values (the other chunks hold partial sums).
fn ring_reduce_scatter<T: Transport + ?Sized>(
    t: &T,
    buf: &mut [f32],
    counts: &[usize],
    op: ReduceOp,
    name: &'static str,
) -> Result<()> {
    ring_pass(t, buf, counts, name, 1, |dst, m| op.apply(dst, m))
}

/// Ring all-gather: chunk `me` of `buf` is this rank's; on return every chunk is filled.
fn ring_all_gather<T: Transport + ?Sized>(
    t: &T,
    buf: &mut [f32],
    counts: &[usize],
    name: &'static str,
) -> Result<()> {
    ring_pass(t, buf, counts, name, 0, |dst, m| dst.copy_from_slice(m))
}

/// The `p − 1` steps of a ring over `buf`'s chunks (`counts`): at step `s` this rank sends
/// chunk `me − s − lag` to the next rank and `merge`s what the previous one sends into chunk
/// `me − s − lag − 1` (indices mod `p`).
fn ring_pass<T: Transport + ?Sized>(
    t: &T,
    buf: &mut [f32],
    counts: &[usize],
    name: &'static str,
    lag: usize,
    mut merge: impl FnMut(&mut [f32], &[f32]),
) -> Result<()> {
    let (p, me) = (t.members().len(), t.me());
    let (ch, seq) = t.enter();
    let off = offsets(counts);
    let what = || t.describe(name, seq);
    for s in 0..p.saturating_sub(1) {
        let send = (me + 2 * p - s - lag) % p;
        let recv = (send + p - 1) % p;
        let (out, dst) = read_and_write(buf, off[send]..off[send + 1], off[recv]..off[recv + 1]);
        ring_step(t, ch, out, dst.len(), name, &what, |r, m| {
            merge(&mut dst[r], m)
        })?;
    }
    Ok(())
}

pub(crate) fn all_reduce<T: Transport + ?Sized>(
    t: &T,
    buf: &mut [f32],
    op: ReduceOp,
) -> Result<()> {
    let p = t.members().len();
    if p == 1 {
        return Ok(());
    }
    let counts = chunk_counts(buf.len(), p);
    ring_reduce_scatter(t, buf, &counts, op, "all_reduce")?;
    ring_all_gather(t, buf, &counts, "all_reduce")
}

pub(crate) fn all_gather<T: Transport + ?Sized>(
    t: &T,
    send: &[f32],
    recv: &mut [f32],
    counts: &[usize],
) -> Result<()> {
    let (p, me) = (t.members().len(), t.me());
    check_len("all_gather", "counts", p, counts.len())?;
    check_len("all_gather", "send", counts[me], send.len())?;
    check_len("all_gather", "recv", counts.iter().sum(), recv.len())?;
    let off = offsets(counts);
    recv[off[me]..off[me + 1]].copy_from_slice(send);
    ring_all_gather(t, recv, counts, "all_gather")
}

pub(crate) fn reduce_scatter<T: Transport + ?Sized>(
    t: &T,
    send: &[f32],
    recv: &mut [f32],
    counts: &[usize],
    op: ReduceOp,
) -> Result<()> {
    let (p, me) = (t.members().len(), t.me());
    check_len("reduce_scatter", "counts", p, counts.len())?;
    check_len("reduce_scatter", "send", counts.iter().sum(), send.len())?;
    check_len("reduce_scatter", "recv", counts[me], recv.len())?;
    // The same ring as `ring_reduce_scatter`, out of place: each step's partial sums go to a
    // chunk-sized buffer (two, alternating), the last step's straight into `recv`, so that
    // nothing copies the whole of `send`.
    let off = offsets(counts);
    let (ch, seq) = t.enter();
    let what = || t.describe("reduce_scatter", seq);
    if p == 1 {
        recv.copy_from_slice(send);
        return Ok(());
    }
    let widest = counts.iter().copied().max().unwrap_or(0);
    let (mut a, mut b) = if p > 2 {
        (t.scratch_len(widest), t.scratch_len(widest))
    } else {
        (Vec::new(), Vec::new())
    };
    for s in 0..p - 1 {
        let sent = (me + 2 * p - s - 1) % p;
        let got = (me + 2 * p - s - 2) % p;
        let out: &[f32] = if s == 0 {
            &send[off[sent]..off[sent + 1]]
        } else {
            &a[..counts[sent]]
        };
        let own = &send[off[got]..off[got + 1]];
        let dst: &mut [f32] = if s == p - 2 {
            &mut *recv
        } else {
            &mut b[..counts[got]]
        };
        ring_step(t, ch, out, own.len(), "reduce_scatter", &what, |r, m| {
            dst[r.clone()].copy_from_slice(&own[r.clone()]);
            op.apply(&mut dst[r], m)
        })?;
        std::mem::swap(&mut a, &mut b);
    }
    t.recycle(a);
    t.recycle(b);
    Ok(())
}

pub(crate) fn all_to_all<T: Transport + ?Sized>(
    t: &T,
    send: &[f32],
    send_counts: &[usize],
    recv: &mut [f32],
    recv_counts: &[usize],
) -> Result<()> {
    let (p, me) = (t.members().len(), t.me());
    check_len("all_to_all", "send_counts", p, send_counts.len())?;
    check_len("all_to_all", "recv_counts", p, recv_counts.len())?;
    check_len("all_to_all", "send", send_counts.iter().sum(), send.len())?;
    check_len("all_to_all", "recv", recv_counts.iter().sum(), recv.len())?;
    let (ch, seq) = t.enter();
    let (so, ro) = (offsets(send_counts), offsets(recv_counts));
    for j in 0..p {
        if j != me {
            t.post(t.members()[j], ch, &send[so[j]..so[j + 1]])?;
        }
    }
    recv[ro[me]..ro[me + 1]].copy_from_slice(&send[so[me]..so[me + 1]]);
    let what = || t.describe("all_to_all", seq);
    for j in 0..p {
        if j != me {
            let m = t.take(t.members()[j], ch, &what)?;
            check_len("all_to_all", "message", recv_counts[j], m.len())?;
            recv[ro[j]..ro[j + 1]].copy_from_slice(&m);
            t.recycle(m);
        }
    }
    Ok(())
}

pub(crate) fn broadcast<T: Transport + ?Sized>(t: &T, buf: &mut [f32], root: Rank) -> Result<()> {
    let root_w = t.world_rank_of(root, "broadcast")?;
    let (ch, seq) = t.enter();
    if root.0 == t.me() {
        for (j, &w) in t.members().iter().enumerate() {
            if j != t.me() {
                t.post(w, ch, buf)?;
            }
        }
    } else {
        let m = t.take(root_w, ch, &|| t.describe("broadcast", seq))?;
        check_len("broadcast", "buf", m.len(), buf.len())?;
        buf.copy_from_slice(&m);
        t.recycle(m);
    }
    Ok(())
}

pub(crate) fn send<T: Transport + ?Sized>(t: &T, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
    let w = t.world_rank_of(peer, "send")?;
    t.post(w, Channel::User(tag), data)
}

pub(crate) fn recv_any<T: Transport + ?Sized>(t: &T, buf: &mut [f32], tag: u32) -> Result<Rank> {
    let (w, m) = t.take_any(Channel::User(tag), &|| {
        format!("recv from any rank (tag {tag})")
    })?;
    check_len("recv_any", "buf", m.len(), buf.len())?;
    buf.copy_from_slice(&m);
    t.recycle(m);
    let r = t
        .members()
        .iter()
        .position(|&x| x == w)
        .unwrap_or(usize::MAX);
    Ok(Rank(r))
}

pub(crate) fn recv<T: Transport + ?Sized>(
    t: &T,
    buf: &mut [f32],
    peer: Rank,
    tag: u32,
) -> Result<()> {
    let w = t.world_rank_of(peer, "recv")?;
    // Every message names world ranks.
    let m = t.take(w, Channel::User(tag), &|| {
        format!("recv from rank {w} (tag {tag})")
    })?;
    check_len("recv", "buf", m.len(), buf.len())?;
    buf.copy_from_slice(&m);
    t.recycle(m);
    Ok(())
}

pub(crate) fn batch<T: Transport + ?Sized>(t: &T, ops: &mut [P2p<'_>]) -> Result<()> {
    for op in ops.iter() {
        if let P2p::Send { peer, data } = op {
            let w = t.world_rank_of(*peer, "batch send")?;
            t.post(w, Channel::Batch, data)?;
        }
    }
    for op in ops.iter_mut() {
        if let P2p::Recv { peer, buf } = op {
            let w = t.world_rank_of(*peer, "batch recv")?;
            let m = t.take(w, Channel::Batch, &|| format!("batched recv from rank {w}"))?;
            check_len("batch", "recv buf", m.len(), buf.len())?;
            buf.copy_from_slice(&m);
            t.recycle(m);
        }
    }
    Ok(())
}

/// Dissemination barrier: ⌈log2 p⌉ rounds.
pub(crate) fn barrier<T: Transport + ?Sized>(t: &T) -> Result<()> {
    let (p, me) = (t.members().len(), t.me());
    let (ch, seq) = t.enter();
    let what = || t.describe("barrier", seq);
    let mut dist = 1;
    while dist < p {
        t.post(t.members()[(me + dist) % p], ch, &[])?;
        t.take(t.members()[(me + p - dist) % p], ch, &what)?;
        dist *= 2;
    }
    Ok(())
}

/// The [`Communicator`](crate::Communicator) methods that are these algorithms over the
/// implementing type's [`Transport`]: everything but identity, timeouts and sub-groups.
macro_rules! collectives_over_transport {
    () => {
        fn all_reduce(&self, buf: &mut [f32], op: crate::ReduceOp) -> crate::Result<()> {
            crate::algorithms::all_reduce(self, buf, op)
        }

        fn all_gather(
            &self,
            send: &[f32],
            recv: &mut [f32],
            counts: &[usize],
        ) -> crate::Result<()> {
            crate::algorithms::all_gather(self, send, recv, counts)
        }

        fn reduce_scatter(
            &self,
            send: &[f32],
            recv: &mut [f32],
            counts: &[usize],
            op: crate::ReduceOp,
        ) -> crate::Result<()> {
            crate::algorithms::reduce_scatter(self, send, recv, counts, op)
        }

        fn all_to_all(
            &self,
            send: &[f32],
            send_counts: &[usize],
            recv: &mut [f32],
            recv_counts: &[usize],
        ) -> crate::Result<()> {
            crate::algorithms::all_to_all(self, send, send_counts, recv, recv_counts)
        }

        fn broadcast(&self, buf: &mut [f32], root: crate::Rank) -> crate::Result<()> {
            crate::algorithms::broadcast(self, buf, root)
        }

        fn send(&self, data: &[f32], peer: crate::Rank, tag: u32) -> crate::Result<()> {
            crate::algorithms::send(self, data, peer, tag)
        }

        fn recv(&self, buf: &mut [f32], peer: crate::Rank, tag: u32) -> crate::Result<()> {
            crate::algorithms::recv(self, buf, peer, tag)
        }

        fn recv_any(&self, buf: &mut [f32], tag: u32) -> crate::Result<crate::Rank> {
            crate::algorithms::recv_any(self, buf, tag)
        }

        fn batch(&self, ops: &mut [crate::P2p<'_>]) -> crate::Result<()> {
            crate::algorithms::batch(self, ops)
        }

        fn barrier(&self) -> crate::Result<()> {
            crate::algorithms::barrier(self)
        }
    };
}
pub(crate) use collectives_over_transport;
