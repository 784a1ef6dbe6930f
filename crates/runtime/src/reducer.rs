//! The gradients' reduction over data parallelism, as a step ends: buckets of about
//! `bucket_bytes` all-reduced on a thread of their own while the last backward still runs (the
//! DDP scheme), a reduce-scatter per tensor under ZeRO-2/3, and the tied embedding's two halves
//! summed across the first and the last stage.

use std::sync::mpsc;

use comm::{Communicator, Rank, ReduceOp};
use graph::{ExecGraph, Strategy};
use kernels::Backend;

use crate::agreement::{BucketKey, GradientAgreement};
use crate::error::{Result, RuntimeError};
use crate::parallel::RankGroups;
use crate::tp::TpGroup;

/// The shape of this TP rank's piece of every parameter, in binding order.
pub(crate) fn param_shapes(exec: &ExecGraph, tp_rank: usize) -> Result<Vec<Vec<usize>>> {
    exec.graph
        .params
        .iter()
        .map(|&p| {
            let shape = exec.graph.info(p).resolve(0);
            Ok(exec.states[p.0].piece(tp_rank, &shape)?.region.shape())
        })
        .collect()
}

/// ZeRO-2/3: sums every gradient over DP by a reduce-scatter that leaves this rank its flat
/// `1/dp` chunk of each local piece (the gradients of ZeRO ≤ 1 are reduced in buckets while the
/// backward runs).
pub(crate) fn reduce_scatter_over_dp<B: Backend>(
    backend: &B,
    groups: &RankGroups,
    exec: &ExecGraph,
    grads: &mut [B::Buffer],
) -> Result<()> {
    let strategy = &exec.strategy;
    let dp = groups.dp.size();
    if dp == 1 {
        return Ok(());
    }
    let shapes = param_shapes(exec, groups.tp.rank())?;
    for (index, g) in grads.iter_mut().enumerate() {
        let host = crate::host::view(backend, g)?;
        let counts = comm::chunk_counts(host.len(), dp);
        let mut mine = vec![0.0; counts[groups.dp.rank().0]];
        let key = BucketKey {
            strategy,
            index,
            shapes: shapes.get(index..index + 1).unwrap_or(&[]),
        };
        groups
            .agreement
            .reduce_scatter(groups.dp.as_ref(), key, &host, &mut mine, &counts)?;
        drop(host);
        let mine = crate::host::adopt(backend, mine)?;
        backend.recycle(std::mem::replace(g, mine));
    }
    Ok(())
}

/// Sums every gradient over DP at once (below ZeRO-2; ZeRO-2/3 reduce-scatter in
/// [`reduce_scatter_over_dp`]), in the buckets and under the keys the DDP scheme sends while the
/// backward runs, so a codec with state per bucket sees the same buckets either way.
pub(crate) fn reduce_over_dp_now<B: Backend>(
    backend: &B,
    groups: &RankGroups,
    exec: &ExecGraph,
    grads: &mut [B::Buffer],
) -> Result<()> {
    if groups.dp.size() == 1 || exec.strategy.zero >= graph::Zero::Gradients {
        return Ok(());
    }
    let lens = grads.iter().map(|g| backend.len(g)).collect();
    let buckets = plan_buckets(exec, lens, groups.bucket_bytes);
    let shapes = param_shapes(exec, groups.tp.rank())?;
    let mut reduced = Vec::with_capacity(buckets.len());
    for (index, bucket) in buckets.iter().enumerate() {
        let mut flat = Vec::new();
        for &k in bucket {
            flat.extend_from_slice(&crate::host::view(backend, &grads[k])?);
        }
        let bucket_shapes: Vec<Vec<usize>> = bucket.iter().map(|&k| shapes[k].clone()).collect();
        let key = BucketKey {
            strategy: &exec.strategy,
            index,
            shapes: &bucket_shapes,
        };
        groups
            .agreement
            .all_reduce(groups.dp_grads.as_ref(), key, &mut flat)?;
        reduced.push(flat);
    }
    unflatten_buckets(backend, &buckets, &reduced, grads)
}

/// The reduction thread's loop: every flat bucket from `rx` agreed over `comm` by `agreement`,
/// each result sent back on `rtx`; it ends when `rx` closes or a reduction fails.
pub(crate) fn reduce_buckets(
    comm: &dyn Communicator,
    agreement: &dyn GradientAgreement,
    strategy: &Strategy,
    bucket_shapes: &[Vec<Vec<usize>>],
    rx: mpsc::Receiver<Vec<f32>>,
    rtx: mpsc::Sender<Result<Vec<f32>>>,
) {
    for (index, mut b) in rx.into_iter().enumerate() {
        let key = BucketKey {
            strategy,
            index,
            shapes: bucket_shapes.get(index).map_or(&[][..], |s| &s[..]),
        };
        let r = agreement.all_reduce(comm, key, &mut b).map(|_| b);
        let failed = r.is_err();
        if rtx.send(r).is_err() || failed {
            break;
        }
    }
}

/// The sender of a step's buckets to [`overlapped`]'s reducing thread.
pub(crate) type BucketSender = mpsc::Sender<Vec<f32>>;

/// Runs `work` (a step's slots, given the TP and pipeline groups) beside a thread that agrees
/// on each flat bucket `work` sends (in `bucket_shapes`' order, under the groups' agreement and
/// keys) over the groups' `dp_grads` as soon as it is complete; `work`'s result and the reduced
/// buckets in order. With no buckets, `work` alone (it gets no sender).
pub(crate) fn overlapped<R>(
    groups: &mut RankGroups,
    strategy: &Strategy,
    bucket_shapes: &[Vec<Vec<usize>>],
    work: impl FnOnce(Option<&BucketSender>, &mut TpGroup, &dyn Communicator) -> Result<R>,
) -> Result<(R, Vec<Vec<f32>>)> {
    let RankGroups {
        tp,
        pp,
        dp_grads,
        agreement,
        ..
    } = groups;
    let (dp_grads, agreement, pp) = (dp_grads.as_mut(), agreement.as_ref(), pp.as_ref());
    if bucket_shapes.is_empty() {
        return Ok((work(None, tp, pp)?, Vec::new()));
    }
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Vec<f32>>();
        let (rtx, rrx) = mpsc::channel::<Result<Vec<f32>>>();
        let worker = scope
            .spawn(move || reduce_buckets(&*dp_grads, agreement, strategy, bucket_shapes, rx, rtx));
        let done = work(Some(&tx), tp, pp);
        drop(tx);
        // The worker ends when the channel closes or a reduction fails.
        let mut out = Vec::with_capacity(bucket_shapes.len());
        for r in rrx.iter() {
            out.push(r?);
        }
        let done = done?;
        if worker.join().is_err() {
            return Err(RuntimeError::Binding(
                "the gradient-reduction thread panicked".into(),
            ));
        }
        if out.len() != bucket_shapes.len() {
            return Err(RuntimeError::Binding(format!(
                "{} of {} gradient buckets were reduced",
                out.len(),
                bucket_shapes.len()
            )));
        }
        Ok((done, out))
    })
}

/// Every reduced flat bucket cut back into the gradients of its members.
pub(crate) fn unflatten_buckets<B: Backend>(
    backend: &B,
    buckets: &[Vec<usize>],
    reduced: &[Vec<f32>],
    grads: &mut [B::Buffer],
) -> Result<()> {
    for (bucket, flat) in buckets.iter().zip(reduced) {
        let mut off = 0;
        for &k in bucket {
            let n = backend.len(&grads[k]);
            let summed = backend.upload(&flat[off..off + n])?;
            backend.recycle(std::mem::replace(&mut grads[k], summed));
            off += n;
        }
    }
    Ok(())
}

/// Tied weights: the first and the last stage each hold a copy of a `shared` parameter and
/// half its gradient; both get the sum.
pub(crate) fn sum_tied<B: Backend>(
    backend: &B,
    groups: &RankGroups,
    shared: &[bool],
    grads: &mut [B::Buffer],
) -> Result<()> {
    let (stages, stage) = (groups.pp.size(), groups.pp.rank().0);
    if stages > 1 && shared.iter().any(|&s| s) && (stage == 0 || stage + 1 == stages) {
        let pair = groups.pp.sub_group(&[Rank(0), Rank(stages - 1)])?;
        for (gr, _) in grads.iter_mut().zip(shared).filter(|(_, &s)| s) {
            crate::host::in_place(backend, gr, |h| Ok(pair.all_reduce(h, ReduceOp::Sum)?))?;
        }
    }
    Ok(())
}

/// Parameter indices grouped into buckets of about `bucket_bytes`, in the order their gradients
/// become final in the backward (the order of the ops producing them), identical on every DP
/// rank.
pub(crate) fn plan_buckets(
    exec: &ExecGraph,
    lens: Vec<usize>,
    bucket_bytes: usize,
) -> Vec<Vec<usize>> {
    let g = &exec.graph;
    let order =
        crate::stream::by_first_op(g, g.grads.len(), |o, k| o.outputs.contains(&g.grads[k].1));
    let limit = (bucket_bytes / std::mem::size_of::<f32>()).max(1);
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut size = 0;
    for k in order {
        if buckets.is_empty() || size >= limit {
            buckets.push(Vec::new());
            size = 0;
        }
        size += lens[k];
        if let Some(b) = buckets.last_mut() {
            b.push(k);
        }
    }
    buckets
}

/// Collects final gradients and sends each bucket, flattened, once all its members are in.
pub(crate) struct BucketFeeder<'a> {
    buckets: &'a [Vec<usize>],
    pending: Vec<Option<Vec<f32>>>,
    next: usize,
}

impl<'a> BucketFeeder<'a> {
    pub fn new(buckets: &'a [Vec<usize>], params: usize) -> Self {
        Self {
            buckets,
            pending: vec![None; params],
            next: 0,
        }
    }
}

/// The reduction thread's sender, which a feed needs (an invariant: a feed exists exactly
/// when the thread does).
fn sender(tx: Option<&mpsc::Sender<Vec<f32>>>) -> Result<&mpsc::Sender<Vec<f32>>> {
    tx.ok_or_else(|| RuntimeError::Binding("a gradient bucket with no reduction thread".into()))
}

/// Each bucket's parameters' shapes (`shapes`: every parameter's), as the agreement's keys
/// name them.
pub(crate) fn bucket_shapes(buckets: &[Vec<usize>], shapes: &[Vec<usize>]) -> Vec<Vec<Vec<usize>>> {
    buckets
        .iter()
        .map(|b| b.iter().map(|&k| shapes[k].clone()).collect())
        .collect()
}

/// What hands a step's final gradients to the reduction thread: the DDP buckets, or the
/// priority schedule's pieces summed during the backward.
pub(crate) trait GradFeed {
    /// Parameter `k`'s final gradient (host values); sends what became complete.
    fn ready(&mut self, k: usize, grad: Vec<f32>, tx: &mpsc::Sender<Vec<f32>>) -> Result<()>;

    /// Parameter `k`'s gradient of the step's last micro-batch, `grad`, is final: with the
    /// earlier micro-batches' sum `acc` (none for the first) it is the step's.
    fn last<B: Backend>(
        &mut self,
        backend: &B,
        acc: Option<&Vec<B::Buffer>>,
        k: usize,
        grad: &B::Buffer,
        tx: Option<&mpsc::Sender<Vec<f32>>>,
    ) -> Result<()>
    where
        Self: Sized,
    {
        let mut host = backend.download(grad)?;
        if let Some(acc) = acc {
            for (h, a) in host
                .iter_mut()
                .zip(crate::host::view(backend, &acc[k])?.iter())
            {
                *h += a;
            }
        }
        self.ready(k, host, sender(tx)?)
    }

    /// A replica with no data this step: zeros for every parameter (of `lens` values).
    fn nothing(&mut self, lens: &[usize], tx: Option<&mpsc::Sender<Vec<f32>>>) -> Result<()>
    where
        Self: Sized,
    {
        let tx = sender(tx)?;
        for (k, &n) in lens.iter().enumerate() {
            self.ready(k, vec![0.0; n], tx)?;
        }
        Ok(())
    }
}

/// The priority schedule's pieces from `from` on ([`crate::stream::pieces`] of the forward's
/// order), sent last first — the order the backward finishes them — each once every value of it
/// is final.
pub(crate) struct PieceFeeder<'a> {
    pieces: &'a [Vec<(usize, std::ops::Range<usize>)>],
    from: usize,
    sent: usize,
    host: Vec<Option<Vec<f32>>>,
}

impl<'a> PieceFeeder<'a> {
    pub fn new(
        pieces: &'a [Vec<(usize, std::ops::Range<usize>)>],
        from: usize,
        params: usize,
    ) -> Self {
        Self {
            pieces,
            from,
            sent: 0,
            host: vec![None; params],
        }
    }
}

impl GradFeed for PieceFeeder<'_> {
    fn ready(&mut self, k: usize, grad: Vec<f32>, tx: &mpsc::Sender<Vec<f32>>) -> Result<()> {
        self.host[k] = Some(grad);
        while self.from + self.sent < self.pieces.len() {
            let piece = &self.pieces[self.pieces.len() - 1 - self.sent];
            if !piece.iter().all(|(k, _)| self.host[*k].is_some()) {
                break;
            }
            let mut flat = Vec::with_capacity(piece.iter().map(|(_, r)| r.len()).sum());
            for (k, r) in piece {
                flat.extend_from_slice(&self.host[*k].as_deref().unwrap_or_default()[r.clone()]);
            }
            tx.send(flat).map_err(|_| {
                RuntimeError::Binding("the gradient-reduction thread stopped early".into())
            })?;
            self.sent += 1;
        }
        Ok(())
    }
}

impl GradFeed for BucketFeeder<'_> {
    fn ready(&mut self, k: usize, grad: Vec<f32>, tx: &mpsc::Sender<Vec<f32>>) -> Result<()> {
        self.pending[k] = Some(grad);
        while let Some(b) = self.buckets.get(self.next) {
            if !b.iter().all(|&m| self.pending[m].is_some()) {
                break;
            }
            // One allocation of the bucket's size (growing it value by value would copy it
            // again at every doubling); a one-parameter bucket is its gradient as it came.
            let flat = if let [m] = b[..] {
                self.pending[m].take().unwrap_or_default()
            } else {
                let len = b.iter().flat_map(|&m| &self.pending[m]).map(Vec::len).sum();
                let mut flat = Vec::with_capacity(len);
                for &m in b {
                    flat.extend(self.pending[m].take().unwrap_or_default());
                }
                flat
            };
            tx.send(flat).map_err(|_| {
                RuntimeError::Binding("the gradient-reduction thread stopped early".into())
            })?;
            self.next += 1;
        }
        Ok(())
    }
}

/// Whichever feed a step's last backward hands its gradients to.
pub(crate) enum Feeder<'a> {
    /// The DDP buckets (fifo).
    Buckets(BucketFeeder<'a>),
    /// The pieces summed during the backward (priority).
    Pieces(PieceFeeder<'a>),
}

impl GradFeed for Feeder<'_> {
    fn ready(&mut self, k: usize, grad: Vec<f32>, tx: &mpsc::Sender<Vec<f32>>) -> Result<()> {
        match self {
            Feeder::Buckets(b) => b.ready(k, grad, tx),
            Feeder::Pieces(p) => p.ready(k, grad, tx),
        }
    }
}
