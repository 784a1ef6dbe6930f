//! Context parallelism's attention: a packed batch's tokens split over the ranks of a CP group
//! ([`CpSplit`], balanced for causal attention), and the two ways the ranks' queries meet every
//! earlier key ([`CpExchange`]):
//!
//! - **ring** — each rank's keys and values travel around the ring, `cp − 1` hops; every rank
//!   merges the softmax of its queries against each block as it passes (log-sum-exp weights, so
//!   no rank ever holds more than two blocks), and the backward sends the blocks around again
//!   with their `dK`/`dV` accumulating, one last hop taking those home;
//! - **Ulysses** — an all-to-all turns the token split into a head split (every rank holds all
//!   tokens of `heads / cp` query heads and the kv heads they read, a kv head going to every rank
//!   that needs it when there are fewer kv heads than ranks), the whole-sequence kernel runs, and
//!   an all-to-all turns it back (in the backward the kv heads' gradients from the ranks that
//!   shared them are added).
//!
//! Buffers are this rank's rows in the kernels' layouts: `q`, `out` `[local tokens, heads,
//! head_dim]`, `k`, `v` `[local tokens, kv_heads, head_dim]`, `lse` `[heads, local tokens]`.
//! The attention is computed on the host; each block of it goes through a [`HostAttention`]
//! (the executor passes its backend, so that the simulator's clock charges it block by block,
//! between the hops, as it runs).

use comm::{chunk_counts, Communicator, P2p, Rank};
use kernels::ops::attention;
use kernels::ops::attention_spans::{self as spans, Grads, Span};
use kernels::{AttnShape, Backend, HostSpan};

pub use graph::CpExchange;

use crate::error::{Result, RuntimeError};

/// A run of one sequence's tokens on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence (index in `cu_seqlens`).
    pub seq: usize,
    /// Row of the first token in the packed batch.
    pub global: usize,
    /// Position of the first token in its sequence.
    pub pos: usize,
    /// Tokens.
    pub len: usize,
    /// Row of the first token in the rank's local buffers.
    pub local: usize,
}

/// Which tokens of a packed batch each rank of a CP group holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpSplit {
    cu_seqlens: Vec<usize>,
    /// Per rank, its chunks in local order.
    chunks: Vec<Vec<Chunk>>,
}

impl CpSplit {
    /// The load-balanced split for causal attention: every sequence is cut into `2·cp` chunks as
    /// even as possible, and rank `r` takes chunks `r` and `2·cp − 1 − r` (one from the front,
    /// one from the back, so every rank sees about as many (query, key) pairs). A rank's tokens
    /// are its chunks of sequence 0, then of sequence 1, and so on. Sequences shorter than
    /// `2·cp` leave some chunks empty.
    pub fn balanced(cu_seqlens: &[usize], cp: usize) -> Result<Self> {
        if cp == 0 {
            return Err(RuntimeError::Context("a CP group of 0 ranks".into()));
        }
        if cu_seqlens.first() != Some(&0) || cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
            return Err(RuntimeError::Context(format!(
                "cu_seqlens must start at 0 and never decrease, got {cu_seqlens:?}"
            )));
        }
        let mut chunks = vec![Vec::new(); cp];
        let mut fill = vec![0usize; cp];
        for (seq, w) in cu_seqlens.windows(2).enumerate() {
            let counts = chunk_counts(w[1] - w[0], 2 * cp);
            let starts: Vec<usize> = counts
                .iter()
                .scan(0, |acc, &c| {
                    let s = *acc;
                    *acc += c;
                    Some(s)
                })
                .collect();
            for r in 0..cp {
                for c in [r, 2 * cp - 1 - r] {
                    if counts[c] == 0 {
                        continue;
                    }
                    chunks[r].push(Chunk {
                        seq,
                        global: w[0] + starts[c],
                        pos: starts[c],
                        len: counts[c],
                        local: fill[r],
                    });
                    fill[r] += counts[c];
                }
            }
        }
        Ok(Self {
            cu_seqlens: cu_seqlens.to_vec(),
            chunks,
        })
    }

    /// Ranks of the group.
    pub fn cp(&self) -> usize {
        self.chunks.len()
    }

    /// Tokens of the whole batch.
    pub fn tokens(&self) -> usize {
        self.cu_seqlens.last().copied().unwrap_or(0)
    }

    /// The packed batch's sequence boundaries.
    pub fn cu_seqlens(&self) -> &[usize] {
        &self.cu_seqlens
    }

    /// Rank `rank`'s chunks in local order.
    pub fn chunks(&self, rank: usize) -> &[Chunk] {
        &self.chunks[rank]
    }

    /// Tokens rank `rank` holds.
    pub fn local_tokens(&self, rank: usize) -> usize {
        self.chunks[rank].iter().map(|c| c.len).sum()
    }

    /// The packed-batch row of every local token of `rank`, in local order.
    pub fn global_rows(&self, rank: usize) -> Vec<usize> {
        self.chunks[rank]
            .iter()
            .flat_map(|c| c.global..c.global + c.len)
            .collect()
    }

    /// Every local token's position in its sequence (what RoPE rotates it by).
    pub fn positions(&self, rank: usize) -> Vec<usize> {
        self.chunks[rank]
            .iter()
            .flat_map(|c| c.pos..c.pos + c.len)
            .collect()
    }

    /// Rank `rank`'s rows of a `[tokens, row]` buffer of the whole batch.
    pub fn take(&self, rank: usize, full: &[f32], row: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.local_tokens(rank) * row);
        for c in &self.chunks[rank] {
            out.extend_from_slice(&full[c.global * row..(c.global + c.len) * row]);
        }
        out
    }

    /// Writes rank `rank`'s rows back into a `[tokens, row]` buffer of the whole batch.
    pub fn put(&self, rank: usize, local: &[f32], row: usize, full: &mut [f32]) {
        for c in &self.chunks[rank] {
            full[c.global * row..(c.global + c.len) * row]
                .copy_from_slice(&local[c.local * row..(c.local + c.len) * row]);
        }
    }

    /// The spans between `q_rank`'s queries and `k_rank`'s keys (both in their local rows) that
    /// the causal mask lets anything through.
    pub fn spans(&self, q_rank: usize, k_rank: usize) -> Vec<Span> {
        self.spans_of_sequences(q_rank, k_rank)
            .map(|(_, s)| s)
            .collect()
    }

    /// [`CpSplit::spans`] as the work they are: each its sequence's length and its pairs.
    pub fn host_spans(&self, q_rank: usize, k_rank: usize) -> Vec<HostSpan> {
        self.spans_of_sequences(q_rank, k_rank)
            .map(|(seq, s)| HostSpan {
                seq_len: self.cu_seqlens[seq + 1] - self.cu_seqlens[seq],
                pairs: s.pairs(),
            })
            .collect()
    }

    /// Every sequence's whole causal attention, as [`HostSpan`]s (Ulysses' kernel).
    fn whole_sequences(&self) -> Vec<HostSpan> {
        self.cu_seqlens
            .windows(2)
            .map(|w| HostSpan {
                seq_len: w[1] - w[0],
                pairs: (w[1] - w[0]) * (w[1] - w[0] + 1) / 2,
            })
            .collect()
    }

    fn spans_of_sequences(
        &self,
        q_rank: usize,
        k_rank: usize,
    ) -> impl Iterator<Item = (usize, Span)> + '_ {
        self.chunks[q_rank].iter().flat_map(move |a| {
            self.chunks[k_rank]
                .iter()
                .filter(move |b| b.seq == a.seq)
                .map(move |b| {
                    let s = Span {
                        q_start: a.local,
                        q_len: a.len,
                        q_pos: a.pos,
                        k_start: b.local,
                        k_len: b.len,
                        k_pos: b.pos,
                    };
                    (a.seq, s)
                })
                .filter(|(_, s)| s.visible())
        })
    }

    /// (Query, key) pairs each rank computes: how even the split is.
    pub fn pairs_per_rank(&self) -> Vec<usize> {
        (0..self.cp())
            .map(|r| {
                (0..self.cp())
                    .flat_map(|o| self.spans(r, o))
                    .map(|s| s.pairs())
                    .sum()
            })
            .collect()
    }
}

/// Runs the blocks of attention a CP rank computes on the host, and accounts for them: a
/// backend's [`Backend::host_attention`] (the simulator's clock charges them), or
/// [`Unaccounted`].
pub trait HostAttention {
    /// Runs `work`, the attention of `spans` under `shape` (forward or backward).
    fn run(
        &self,
        spans: &[HostSpan],
        shape: AttnShape,
        backward: bool,
        work: &mut dyn FnMut() -> kernels::Result<()>,
    ) -> kernels::Result<()>;
}

impl<B: Backend> HostAttention for B {
    fn run(
        &self,
        spans: &[HostSpan],
        shape: AttnShape,
        backward: bool,
        work: &mut dyn FnMut() -> kernels::Result<()>,
    ) -> kernels::Result<()> {
        self.host_attention(spans, shape, backward, work)
    }
}

/// Runs the blocks and accounts for nothing (what [`CpAttention::new`] starts with).
pub struct Unaccounted;

impl HostAttention for Unaccounted {
    fn run(
        &self,
        _: &[HostSpan],
        _: AttnShape,
        _: bool,
        work: &mut dyn FnMut() -> kernels::Result<()>,
    ) -> kernels::Result<()> {
        work()
    }
}

fn check_group(comm: &dyn Communicator, split: &CpSplit) -> Result<usize> {
    if comm.size() != split.cp() {
        return Err(RuntimeError::Context(format!(
            "the split is over {} ranks, the CP group has {}",
            split.cp(),
            comm.size()
        )));
    }
    Ok(comm.rank().0)
}

/// Causal attention over a CP group: this rank's queries attend to every earlier key of their
/// sequences, wherever those keys are, by the group's `exchange`; each host-side block of
/// attention runs through `host` (a backend that accounts for it, or [`Unaccounted`]).
///
/// ```
/// use comm::{Communicator, ThreadComm};
/// use kernels::AttnShape;
/// use runtime::context::{CpAttention, CpExchange, CpSplit};
///
/// let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 4 };
/// let lse = ThreadComm::run(2, move |comm| {
///     let split = CpSplit::balanced(&[0, 6], 2)?; // one sequence of 6 tokens over 2 ranks
///     let n = split.local_tokens(comm.rank().0);
///     let (q, kv) = (vec![0.5f32; n * 8], vec![0.25f32; n * 4]);
///     let attn = CpAttention::new(&comm, CpExchange::Ring, &split, shape, 0.5);
///     let (out, lse) = attn.forward(&q, &kv, &kv)?;
///     assert_eq!(out.len(), n * 8);
///     Ok::<_, runtime::RuntimeError>(lse)
/// })?;
/// assert_eq!(lse.len(), 2);
/// # Ok::<(), runtime::RuntimeError>(())
/// ```
#[derive(Clone, Copy)]
pub struct CpAttention<'a> {
    host: &'a dyn HostAttention,
    comm: &'a dyn Communicator,
    exchange: CpExchange,
    split: &'a CpSplit,
    shape: AttnShape,
    scale: f32,
}

impl<'a> CpAttention<'a> {
    /// Attention of `shape` (this rank's heads) scaled by `scale`, over `comm` (the CP group, as
    /// many ranks as `split` has parts) by `exchange`; host-side blocks accounted for by nobody.
    pub fn new(
        comm: &'a dyn Communicator,
        exchange: CpExchange,
        split: &'a CpSplit,
        shape: AttnShape,
        scale: f32,
    ) -> Self {
        CpAttention {
            host: &Unaccounted,
            comm,
            exchange,
            split,
            shape,
            scale,
        }
    }

    /// The same attention with each host-side block run through `host`.
    pub fn through(self, host: &'a dyn HostAttention) -> Self {
        CpAttention { host, ..self }
    }

    /// This rank's index in the group and its token count, checked against the split.
    fn me(&self) -> Result<(usize, usize)> {
        let me = check_group(self.comm, self.split)?;
        Ok((me, self.split.local_tokens(me)))
    }

    /// The attention output and log-sum-exp of this rank's queries (`q`, `k`, `v`: this rank's
    /// tokens, row-major by head).
    pub fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (me, n) = self.me()?;
        let sh = self.shape;
        check_rows("q", q, n, sh.heads * sh.head_dim)?;
        check_rows("k", k, n, sh.kv_heads * sh.head_dim)?;
        check_rows("v", v, n, sh.kv_heads * sh.head_dim)?;
        let x = Inputs { q, k, v };
        match self.exchange {
            CpExchange::Ring => self.ring_forward(me, &x),
            CpExchange::Ulysses => self.ulysses_forward(me, &x),
        }
    }

    /// The gradients of [`CpAttention::forward`] with respect to this rank's `q`, `k`, `v`, from
    /// the output's gradient and what the forward saw and gave.
    pub fn backward(&self, saved: &Saved) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (me, n) = self.me()?;
        let sh = self.shape;
        let qrow = sh.heads * sh.head_dim;
        check_rows("dout", saved.dout, n, qrow)?;
        check_rows("q", saved.q, n, qrow)?;
        check_rows("out", saved.out, n, qrow)?;
        check_rows("lse", saved.lse, n, sh.heads)?;
        check_rows("k", saved.k, n, sh.kv_heads * sh.head_dim)?;
        check_rows("v", saved.v, n, sh.kv_heads * sh.head_dim)?;
        match self.exchange {
            CpExchange::Ring => self.ring_backward(me, saved),
            CpExchange::Ulysses => self.ulysses_backward(me, saved),
        }
    }
}

/// This rank's queries, keys and values.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

fn check_rows(what: &str, buf: &[f32], rows: usize, row: usize) -> Result<()> {
    if buf.len() != rows * row {
        return Err(RuntimeError::Context(format!(
            "{what} holds {} values, this rank's {rows} tokens need {}",
            buf.len(),
            rows * row
        )));
    }
    Ok(())
}

/// What [`CpAttention::backward`] needs: the output's gradient, the forward's inputs and what
/// it gave, all this rank's tokens.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    /// The gradient of the output.
    pub dout: &'a [f32],
    /// The queries.
    pub q: &'a [f32],
    /// The keys.
    pub k: &'a [f32],
    /// The values.
    pub v: &'a [f32],
    /// The forward's output.
    pub out: &'a [f32],
    /// The forward's log-sum-exp.
    pub lse: &'a [f32],
}

/// Sends `send` to the next rank of the ring and receives the previous rank's into `recv`.
fn shift(comm: &dyn Communicator, me: usize, send: &[f32], recv: &mut [f32]) -> Result<()> {
    let cp = comm.size();
    let mut ops = [
        P2p::Send {
            peer: Rank((me + 1) % cp),
            data: send,
        },
        P2p::Recv {
            peer: Rank((me + cp - 1) % cp),
            buf: recv,
        },
    ];
    comm.batch(&mut ops)?;
    Ok(())
}

impl CpAttention<'_> {
    fn ring_forward(&self, me: usize, x: &Inputs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (host, comm, split, shape, scale) =
            (self.host, self.comm, self.split, self.shape, self.scale);
        let (q, k, v) = (x.q, x.k, x.v);
        let cp = split.cp();
        let kv_row = shape.kv_heads * shape.head_dim;
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![f32::NEG_INFINITY; shape.heads * split.local_tokens(me)];
        // The block in hand: the keys then the values of its owner's tokens.
        let mut block = [k, v].concat();
        for step in 0..cp {
            let owner = (me + cp - step) % cp;
            let half = split.local_tokens(owner) * kv_row;
            let (bk, bv) = block.split_at(half);
            host.run(&split.host_spans(me, owner), shape, false, &mut || {
                spans::forward(
                    q,
                    bk,
                    bv,
                    &split.spans(me, owner),
                    shape,
                    scale,
                    &mut out,
                    &mut lse,
                )
            })?;
            if step + 1 < cp {
                let next = (owner + cp - 1) % cp;
                let mut incoming = vec![0.0; 2 * split.local_tokens(next) * kv_row];
                shift(comm, me, &block, &mut incoming)?;
                block = incoming;
            }
        }
        Ok((out, lse))
    }
}

impl CpAttention<'_> {
    fn ring_backward(&self, me: usize, x: &Saved<'_>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (host, comm, split, shape, scale) =
            (self.host, self.comm, self.split, self.shape, self.scale);
        let cp = split.cp();
        let kv_row = shape.kv_heads * shape.head_dim;
        let delta = spans::delta(x.dout, x.out, shape)?;
        let mut dq = vec![0.0; x.q.len()];
        // The block in hand: keys, values, and the dK, dV gathered for them so far.
        let mut block = [x.k, x.v, &vec![0.0; 2 * x.k.len()]].concat();
        for step in 0..cp {
            let owner = (me + cp - step) % cp;
            let quarter = split.local_tokens(owner) * kv_row;
            let (kv, grads) = block.split_at_mut(2 * quarter);
            let (bk, bv) = kv.split_at(quarter);
            let (dk, dv) = grads.split_at_mut(quarter);
            let g = Grads {
                dout: x.dout,
                q: x.q,
                k: bk,
                v: bv,
                lse: x.lse,
                delta: &delta,
            };
            host.run(&split.host_spans(me, owner), shape, true, &mut || {
                spans::backward(&g, &split.spans(me, owner), shape, scale, &mut dq, dk, dv)
            })?;
            if step + 1 < cp {
                let next = (owner + cp - 1) % cp;
                let mut incoming = vec![0.0; 4 * split.local_tokens(next) * kv_row];
                shift(comm, me, &block, &mut incoming)?;
                block = incoming;
            }
        }
        // The block in hand belongs to the next rank; its dK, dV go home, ours come from behind.
        let n = x.k.len();
        let grads = if cp > 1 {
            let owner = (me + 1) % cp;
            let quarter = split.local_tokens(owner) * kv_row;
            let mut mine = vec![0.0; 2 * n];
            shift(comm, me, &block[2 * quarter..], &mut mine)?;
            mine
        } else {
            block.split_off(2 * n)
        };
        let (dk, dv) = grads.split_at(n);
        Ok((dq, dk.to_vec(), dv.to_vec()))
    }
}

/// Who holds which heads under Ulysses: query heads `r·hc..(r+1)·hc` and kv heads
/// `kv[r].0..kv[r].1` on rank `r`.
struct HeadSplit {
    /// Query heads per rank.
    hc: usize,
    /// Query and key/value heads in all.
    h: usize,
    g: usize,
    /// The query and key/value heads of each rank.
    q: Vec<(usize, usize)>,
    kv: Vec<(usize, usize)>,
}

impl HeadSplit {
    fn new(shape: AttnShape, cp: usize) -> Result<Self> {
        let (h, g) = (shape.heads, shape.kv_heads);
        if !h.is_multiple_of(cp) || !(g.is_multiple_of(cp) || cp.is_multiple_of(g)) {
            return Err(RuntimeError::Context(format!(
                "Ulysses over {cp} ranks needs the {h} query heads to divide by {cp} and the \
                 {g} kv heads to divide by {cp} or {cp} by them; use ring attention"
            )));
        }
        let hc = h / cp;
        let rep = h / g;
        let kv = (0..cp)
            .map(|r| (r * hc / rep, ((r + 1) * hc - 1) / rep + 1))
            .collect();
        let q = (0..cp).map(|r| (r * hc, (r + 1) * hc)).collect();
        Ok(Self { hc, h, g, q, kv })
    }

    /// The layout of a tensor of every query head (`d` values each).
    fn queries(&self, d: usize) -> Heads<'_> {
        Heads {
            heads: self.h,
            d,
            ranges: &self.q,
        }
    }

    /// The layout of a tensor of every key/value head.
    fn keys(&self, d: usize) -> Heads<'_> {
        Heads {
            heads: self.g,
            d,
            ranges: &self.kv,
        }
    }

    fn shape(&self, r: usize, head_dim: usize) -> AttnShape {
        AttnShape {
            heads: self.hc,
            kv_heads: self.kv[r].1 - self.kv[r].0,
            head_dim,
        }
    }
}

/// Ulysses' exchange between this rank's tokens and its heads over the CP group.
struct Ulysses<'a> {
    comm: &'a dyn Communicator,
    split: &'a CpSplit,
    me: usize,
}

/// How a tensor's rows are laid out for [`Ulysses`]: `heads` heads of `d` values each, rank
/// `r` taking heads `ranges[r]`.
#[derive(Clone, Copy)]
struct Heads<'a> {
    heads: usize,
    d: usize,
    ranges: &'a [(usize, usize)],
}

impl Ulysses<'_> {
    /// All-to-all from this rank's tokens × every head to every token × the heads `ranges[me]`:
    /// `local` is `[local tokens, heads, d]`; the result `[tokens, ranges[me] heads, d]` in packed
    /// batch order.
    fn to_heads(&self, local: &[f32], layout: Heads<'_>) -> Result<Vec<f32>> {
        let (comm, split, me) = (self.comm, self.split, self.me);
        let Heads { heads, d, ranges } = layout;
        let cp = split.cp();
        let n = split.local_tokens(me);
        let mut send = Vec::new();
        let mut send_counts = Vec::with_capacity(cp);
        for &(a, b) in ranges {
            for t in 0..n {
                send.extend_from_slice(&local[(t * heads + a) * d..(t * heads + b) * d]);
            }
            send_counts.push(n * (b - a) * d);
        }
        let (a, b) = ranges[me];
        let w = (b - a) * d;
        let recv_counts: Vec<usize> = (0..cp).map(|r| split.local_tokens(r) * w).collect();
        let mut recv = vec![0.0; recv_counts.iter().sum()];
        comm.all_to_all(&send, &send_counts, &mut recv, &recv_counts)?;
        let mut full = vec![0.0; split.tokens() * w];
        let mut off = 0;
        for (r, count) in recv_counts.iter().enumerate() {
            split.put(r, &recv[off..off + count], w, &mut full);
            off += count;
        }
        Ok(full)
    }

    /// The way back: `full` is `[tokens, ranges[me] heads, d]`; returns this rank's
    /// `[local tokens, heads, d]`, adding what several ranks send for the same head.
    fn to_tokens(&self, full: &[f32], layout: Heads<'_>) -> Result<Vec<f32>> {
        let (comm, split, me) = (self.comm, self.split, self.me);
        let Heads { heads, d, ranges } = layout;
        let cp = split.cp();
        let (a, b) = ranges[me];
        let w = (b - a) * d;
        let mut send = Vec::with_capacity(full.len());
        let mut send_counts = Vec::with_capacity(cp);
        for r in 0..cp {
            let part = split.take(r, full, w);
            send_counts.push(part.len());
            send.extend(part);
        }
        let n = split.local_tokens(me);
        let recv_counts: Vec<usize> = ranges.iter().map(|&(a, b)| n * (b - a) * d).collect();
        let mut recv = vec![0.0; recv_counts.iter().sum()];
        comm.all_to_all(&send, &send_counts, &mut recv, &recv_counts)?;
        let mut local = vec![0.0; n * heads * d];
        let mut off = 0;
        for &(a, b) in ranges {
            let w = (b - a) * d;
            for t in 0..n {
                let src = &recv[off + t * w..off + (t + 1) * w];
                for (x, y) in local[(t * heads + a) * d..(t * heads + b) * d]
                    .iter_mut()
                    .zip(src)
                {
                    *x += y;
                }
            }
            off += n * w;
        }
        Ok(local)
    }
}

/// `[heads, tokens]` ↔ `[tokens, heads]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

impl CpAttention<'_> {
    fn ulysses_forward(&self, me: usize, x: &Inputs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (host, comm, split, shape, scale) =
            (self.host, self.comm, self.split, self.shape, self.scale);
        let (q, k, v) = (x.q, x.k, x.v);
        let hs = HeadSplit::new(shape, split.cp())?;
        let d = shape.head_dim;
        let u = Ulysses { comm, split, me };
        let (qh, kvh) = (hs.queries(d), hs.keys(d));
        let (fq, fk, fv) = (u.to_heads(q, qh)?, u.to_heads(k, kvh)?, u.to_heads(v, kvh)?);
        let mine = hs.shape(me, d);
        let t = split.tokens();
        let (mut fo, mut fl) = (vec![0.0; fq.len()], vec![0.0; hs.hc * t]);
        host.run(&split.whole_sequences(), mine, false, &mut || {
            attention::forward(
                &fq,
                &fk,
                &fv,
                split.cu_seqlens(),
                mine,
                scale,
                &mut fo,
                &mut fl,
            )
        })?;
        let out = u.to_tokens(&fo, qh)?;
        let lse = u.to_tokens(&transpose(&fl, hs.hc, t), hs.queries(1))?;
        let n = split.local_tokens(me);
        Ok((out, transpose(&lse, n, shape.heads)))
    }
}

impl CpAttention<'_> {
    fn ulysses_backward(&self, me: usize, x: &Saved<'_>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (host, comm, split, shape, scale) =
            (self.host, self.comm, self.split, self.shape, self.scale);
        let hs = HeadSplit::new(shape, split.cp())?;
        let d = shape.head_dim;
        let h = shape.heads;
        let n = split.local_tokens(me);
        let u = Ulysses { comm, split, me };
        let (qh, kvh) = (hs.queries(d), hs.keys(d));
        let (fdo, fq, fo) = (
            u.to_heads(x.dout, qh)?,
            u.to_heads(x.q, qh)?,
            u.to_heads(x.out, qh)?,
        );
        let fl = u.to_heads(&transpose(x.lse, h, n), hs.queries(1))?;
        let (fk, fv) = (u.to_heads(x.k, kvh)?, u.to_heads(x.v, kvh)?);
        let t = split.tokens();
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; fq.len()],
            vec![0.0; fk.len()],
            vec![0.0; fv.len()],
        );
        let lse = transpose(&fl, t, hs.hc);
        host.run(&split.whole_sequences(), hs.shape(me, d), true, &mut || {
            attention::backward(
                &fdo,
                &fq,
                &fk,
                &fv,
                &fo,
                &lse,
                split.cu_seqlens(),
                hs.shape(me, d),
                scale,
                &mut dq,
                &mut dk,
                &mut dv,
            )
        })?;
        Ok((
            u.to_tokens(&dq, qh)?,
            u.to_tokens(&dk, kvh)?,
            u.to_tokens(&dv, kvh)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balanced_split_covers_every_token_once_and_evens_the_pairs() {
        let cu = [0, 1, 9, 1009, 1013];
        for cp in 1..=4 {
            let s = CpSplit::balanced(&cu, cp).unwrap();
            let mut rows: Vec<usize> = (0..cp).flat_map(|r| s.global_rows(r)).collect();
            rows.sort();
            assert_eq!(rows, (0..1013).collect::<Vec<_>>());
            let pairs = s.pairs_per_rank();
            let total: usize = [1usize, 8, 1000, 4].iter().map(|l| l * (l + 1) / 2).sum();
            assert_eq!(pairs.iter().sum::<usize>(), total);
            // Front and back chunks: the busiest rank within 1% of the mean (the long sequence
            // dominates); a contiguous split would give rank cp−1 about (2cp−1)/cp of it.
            let max = *pairs.iter().max().unwrap() as f64;
            assert!(max <= 1.01 * total as f64 / cp as f64, "cp {cp}: {pairs:?}");
        }
        assert_eq!(
            CpSplit::balanced(&[0, 10], 2).unwrap().positions(0),
            vec![0, 1, 2, 9] // chunks of 3, 3, 3, 1 (DState chunking)
        );
    }

    #[test]
    fn ulysses_refuses_heads_it_cannot_split() {
        let shape = |heads, kv_heads| AttnShape {
            heads,
            kv_heads,
            head_dim: 4,
        };
        assert!(HeadSplit::new(shape(8, 2), 4).is_ok());
        assert!(HeadSplit::new(shape(8, 1), 4).is_ok());
        let e = HeadSplit::new(shape(6, 3), 2).err().unwrap().to_string();
        assert!(e.contains("3 kv heads") && e.contains("ring"), "{e}");
        assert!(HeadSplit::new(shape(6, 6), 4).is_err());
    }
}
