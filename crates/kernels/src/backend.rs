//! The `Backend` seam (DESIGN §4) and its CPU implementation.

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{check_len, KernelError, Result};
use crate::matmul::{self, GemmSpec};
pub use crate::ops::adamw::AdamW;
pub use crate::ops::attention::AttnShape;
pub use crate::ops::rope::{Rope, RopeScaling, Rotation};
use crate::ops::{adamw, attention, elementwise, embedding, loss, norm, rope, swiglu};
use crate::pool::Shelf;

/// Everything the runtime asks of a device. Buffers hold `f32` (master weights, activations and
/// gradients); lower-precision storage is a cast at the edges. Integer inputs (token ids,
/// positions, sequence offsets) come from the host.
pub trait Backend: Send + Sync {
    /// A device buffer of `f32`.
    type Buffer: Send + Sync;

    /// A short description (`cpu (2 threads)`).
    fn name(&self) -> String;
    /// A zero-filled buffer.
    fn zeros(&self, len: usize) -> Result<Self::Buffer>;
    /// A buffer of `len` values whose contents are unspecified, for an output its op writes in
    /// full (the CPU backend hands back a shelved buffer without clearing it; in debug builds
    /// it fills it with NaN, so that an op that does not write every value shows in every
    /// test). The default is [`Backend::zeros`].
    fn scratch(&self, len: usize) -> Result<Self::Buffer> {
        self.zeros(len)
    }
    /// Hands back a buffer its holder no longer needs, so that a later [`Backend::zeros`] may
    /// reuse its memory (the CPU backend keeps it on a shelf; the default frees it).
    fn recycle(&self, buf: Self::Buffer) {
        drop(buf);
    }
    /// Copies host values to a new buffer.
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer>;
    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>>;
    /// Number of values in a buffer.
    fn len(&self, buf: &Self::Buffer) -> usize;
    /// The buffer's values in place where buffers are host memory (the CPU backend), so that
    /// communication reads them without a copy; `None` on a device (the default).
    fn host_slice<'a>(&self, buf: &'a Self::Buffer) -> Option<&'a [f32]> {
        let _ = buf;
        None
    }
    /// As [`Backend::host_slice`], for writing (a collective reducing in place).
    fn host_slice_mut<'a>(&self, buf: &'a mut Self::Buffer) -> Option<&'a mut [f32]> {
        let _ = buf;
        None
    }
    /// Host values, received or computed by communication, as a buffer: taken over without a
    /// copy where buffers are host memory; uploaded otherwise (the default).
    fn adopt(&self, host: Vec<f32>) -> Result<Self::Buffer> {
        self.upload(&host)
    }
    /// A buffer its holder is done with, as host values: handed over without a copy where
    /// buffers are host memory; downloaded (and the buffer recycled) otherwise.
    fn release_to_host(&self, buf: Self::Buffer) -> Result<Vec<f32>> {
        let host = self.download(&buf)?;
        self.recycle(buf);
        Ok(host)
    }
    /// Waits until every queued kernel has finished (a no-op where kernels run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// See [`GemmSpec`].
    fn gemm(
        &self,
        spec: &GemmSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        c: &mut Self::Buffer,
    ) -> Result<()>;

    /// See [`embedding::forward`].
    fn embedding_forward(
        &self,
        weight: &Self::Buffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// See [`embedding::backward`] (accumulates).
    fn embedding_backward(
        &self,
        grad_out: &Self::Buffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        grad_weight: &mut Self::Buffer,
    ) -> Result<()>;

    /// See [`norm::forward`].
    fn rms_norm_forward(
        &self,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f64,
        y: &mut Self::Buffer,
        rstd: &mut Self::Buffer,
    ) -> Result<()>;
    /// See [`norm::backward`] (accumulates `dweight`).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        dy: &Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        rstd: &Self::Buffer,
        dx: &mut Self::Buffer,
        dweight: &mut Self::Buffer,
    ) -> Result<()>;

    /// See [`rope::apply`] (in place; `inverse` for backward).
    fn rope(&self, x: &mut Self::Buffer, r: &Rotation<'_>) -> Result<()>;

    /// See [`attention::forward`].
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Buffer,
        k: &Self::Buffer,
        v: &Self::Buffer,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        out: &mut Self::Buffer,
        lse: &mut Self::Buffer,
    ) -> Result<()>;
    /// See [`attention::backward`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Self::Buffer,
        q: &Self::Buffer,
        k: &Self::Buffer,
        v: &Self::Buffer,
        out: &Self::Buffer,
        lse: &Self::Buffer,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        dq: &mut Self::Buffer,
        dk: &mut Self::Buffer,
        dv: &mut Self::Buffer,
    ) -> Result<()>;

    /// Runs `work`, causal attention its caller computes on the host outside this backend's
    /// kernels (context parallelism's blocks, [`crate::ops::attention_spans`]), so that a
    /// wrapping backend can account for it as it does for [`Backend::attention_forward`]:
    /// `spans` holds, per block, its sequence's length and the (query, key) pairs it computes.
    /// The default just runs it.
    fn host_attention(
        &self,
        spans: &[HostSpan],
        shape: AttnShape,
        backward: bool,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let _ = (spans, shape, backward);
        work()
    }

    /// See [`swiglu::forward`].
    fn swiglu_forward(
        &self,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// See [`swiglu::backward`].
    fn swiglu_backward(
        &self,
        dout: &Self::Buffer,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        dgate: &mut Self::Buffer,
        dup: &mut Self::Buffer,
    ) -> Result<()>;

    /// See [`loss::forward`]; returns the loss sum over masked rows.
    fn cross_entropy_forward(
        &self,
        logits: &Self::Buffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &mut Self::Buffer,
    ) -> Result<f32>;
    /// See [`loss::backward`].
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &Self::Buffer,
        scale: f32,
        dlogits: &mut Self::Buffer,
    ) -> Result<()>;

    /// `out = a + b`.
    fn add(&self, a: &Self::Buffer, b: &Self::Buffer, out: &mut Self::Buffer) -> Result<()>;
    /// `y += alpha · x`.
    fn axpy(&self, alpha: f32, x: &Self::Buffer, y: &mut Self::Buffer) -> Result<()>;
    /// `dst = src`, of equal lengths. The default replaces `dst` by zeros and adds `src`
    /// ([`Backend::zeros`], [`Backend::axpy`]); the CPU backend copies over its threads.
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<()> {
        let old = std::mem::replace(dst, self.zeros(self.len(dst))?);
        self.recycle(old);
        self.axpy(1.0, src, dst)
    }
    /// `x *= alpha`.
    fn scale(&self, alpha: f32, x: &mut Self::Buffer) -> Result<()>;
    /// `Σ x²` in f64.
    fn sum_squares(&self, x: &Self::Buffer) -> Result<f64>;
    /// Rounds every value through bf16 (the compute copy of an fp32 master weight).
    fn round_bf16(&self, x: &mut Self::Buffer) -> Result<()>;

    /// See [`adamw::step`].
    fn adamw(
        &self,
        cfg: &AdamW,
        step: u64,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        m: &mut Self::Buffer,
        v: &mut Self::Buffer,
    ) -> Result<()>;
}

/// One block of attention computed on the host ([`Backend::host_attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSpan {
    /// Tokens of the sequence the block belongs to.
    pub seq_len: usize,
    /// (Query, key) pairs the block computes (at most `seq_len·(seq_len + 1)/2`).
    pub pairs: usize,
}

/// The CPU backend: f32 on host memory, GEMM from the `gemm` crate, everything else ours, run on
/// a private rayon pool of `threads` threads so that N ranks on one machine can share its cores.
#[derive(Clone)]
pub struct CpuBackend {
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
    shelf: Arc<Shelf>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (at least 1).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hotspa-cpu-{i}"))
            .build()
            .map_err(|e| {
                KernelError::Unavailable(format!("cannot start {threads} threads: {e}"))
            })?;
        Ok(Self {
            threads,
            pool: Arc::new(pool),
            shelf: Arc::default(),
        })
    }

    /// A backend for one of `ranks` ranks sharing this machine: the cores divided evenly.
    pub fn for_ranks(ranks: usize) -> Result<Self> {
        Self::new(available_cores() / ranks.max(1))
    }

    /// Threads this backend uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Rows per parallel piece of a row-wise op over `total` elements in rows of `row`, or
    /// `None` to run it on the calling thread (one thread, or too little work). Each piece is
    /// whole rows, and every row's values are computed exactly as by one thread.
    fn piece_rows(&self, total: usize, row: usize) -> Option<usize> {
        const PIECE: usize = 1 << 14;
        (self.threads > 1 && row > 0 && total >= 2 * PIECE).then(|| (PIECE / row).max(1))
    }
}

/// The number of cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        match self.shelf.take_zeroed(len) {
            Some(v) => Ok(v),
            None => crate::error::try_zeros(len),
        }
    }
    fn scratch(&self, len: usize) -> Result<Vec<f32>> {
        let mut v = match self.shelf.take_unfilled(len) {
            Some(v) => v,
            None => crate::error::try_zeros(len)?,
        };
        if cfg!(debug_assertions) {
            v.fill(f32::NAN);
        }
        Ok(v)
    }
    fn recycle(&self, buf: Vec<f32>) {
        self.shelf.give(buf);
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        // A shelved buffer where one fits: its pages are mapped already.
        if let Some(mut v) = self.shelf.take_unfilled(data.len()) {
            v.copy_from_slice(data);
            return Ok(v);
        }
        let mut v = crate::error::try_zeros(0)?;
        v.try_reserve_exact(data.len())
            .map_err(|_| KernelError::OutOfMemory {
                bytes: std::mem::size_of_val(data),
            })?;
        v.extend_from_slice(data);
        Ok(v)
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        self.upload(buf)
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn host_slice<'a>(&self, buf: &'a Vec<f32>) -> Option<&'a [f32]> {
        Some(buf)
    }
    fn host_slice_mut<'a>(&self, buf: &'a mut Vec<f32>) -> Option<&'a mut [f32]> {
        Some(buf)
    }
    fn adopt(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        Ok(host)
    }
    fn release_to_host(&self, buf: Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf)
    }
    fn gemm(&self, spec: &GemmSpec, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        let t = self.threads;
        self.run(|| matmul::gemm(spec, a, b, c, t))
    }
    fn embedding_forward(
        &self,
        weight: &Vec<f32>,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        embedding::forward(weight, dim, vocab_start, ids, out)
    }
    fn embedding_backward(
        &self,
        grad_out: &Vec<f32>,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        grad_weight: &mut Vec<f32>,
    ) -> Result<()> {
        embedding::backward(grad_out, dim, vocab_start, ids, grad_weight)
    }
    fn rms_norm_forward(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        eps: f64,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        let dim = weight.len();
        match self.piece_rows(x.len(), dim) {
            Some(r) if x.len() == y.len() && dim > 0 && rstd.len() * dim == x.len() => {
                self.run(|| {
                    x.par_chunks(r * dim)
                        .zip(y.par_chunks_mut(r * dim))
                        .zip(rstd.par_chunks_mut(r))
                        .try_for_each(|((x, y), rstd)| norm::forward(x, weight, eps, y, rstd))
                })
            }
            _ => norm::forward(x, weight, eps, y, rstd),
        }
    }
    fn rms_norm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
    ) -> Result<()> {
        let (dim, rows) = (weight.len(), rstd.len());
        let fits = dim > 0
            && dy.len() == rows * dim
            && x.len() == rows * dim
            && dx.len() == rows * dim
            && dweight.len() == dim;
        if !fits || self.piece_rows(dy.len(), dim).is_none() {
            return norm::backward(dy, x, weight, rstd, dx, dweight);
        }
        // The groups over the threads; their weight gradients added in group order, as
        // `norm::backward` adds them.
        let g = norm::GROUP_ROWS * dim;
        let parts: Vec<Vec<f32>> = self.run(|| {
            dy.par_chunks(g)
                .zip(x.par_chunks(g))
                .zip(rstd.par_chunks(norm::GROUP_ROWS))
                .zip(dx.par_chunks_mut(g))
                .map(|(((dy, x), rstd), dx)| norm::group_backward(dy, x, weight, rstd, dx))
                .collect()
        });
        for part in &parts {
            norm::add_part(dweight, part);
        }
        Ok(())
    }
    fn rope(&self, x: &mut Vec<f32>, r: &Rotation<'_>) -> Result<()> {
        let row = r.heads * r.head_dim;
        match self.piece_rows(x.len(), row) {
            Some(rows) if r.positions.len() * row == x.len() => {
                // One table of angles for every piece.
                let table = rope::Angles::dense(r.positions, r.head_dim, r.rope, r.inverse);
                self.run(|| {
                    x.par_chunks_mut(rows * row)
                        .zip(r.positions.par_chunks(rows))
                        .try_for_each(|(x, positions)| {
                            let piece = Rotation { positions, ..*r };
                            rope::apply_with(x, &piece, table.as_ref())
                        })
                })
            }
            _ => rope::apply(x, r),
        }
    }
    fn attention_forward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        self.run(|| attention::forward(q, k, v, cu_seqlens, shape, scale, out, lse))
    }
    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        self.run(|| {
            attention::backward(
                dout, q, k, v, out, lse, cu_seqlens, shape, scale, dq, dk, dv,
            )
        })
    }
    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        match self.piece_rows(out.len(), 1) {
            Some(n) if gate.len() == out.len() && up.len() == out.len() => self.run(|| {
                out.par_chunks_mut(n)
                    .zip(gate.par_chunks(n))
                    .zip(up.par_chunks(n))
                    .try_for_each(|((o, g), u)| swiglu::forward(g, u, o))
            }),
            _ => swiglu::forward(gate, up, out),
        }
    }
    fn swiglu_backward(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        let n = gate.len();
        match self.piece_rows(n, 1) {
            Some(c) if [dout.len(), up.len(), dgate.len(), dup.len()] == [n; 4] => self.run(|| {
                dgate
                    .par_chunks_mut(c)
                    .zip(dup.par_chunks_mut(c))
                    .zip(
                        dout.par_chunks(c)
                            .zip(gate.par_chunks(c))
                            .zip(up.par_chunks(c)),
                    )
                    .try_for_each(|((dg, du), ((d, g), u))| swiglu::backward(d, g, u, dg, du))
            }),
            _ => swiglu::backward(dout, gate, up, dgate, dup),
        }
    }
    fn cross_entropy_forward(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &mut Vec<f32>,
    ) -> Result<f32> {
        let rows = targets.len();
        match self.piece_rows(logits.len(), vocab) {
            Some(r) if logits.len() == rows * vocab && mask.len() == rows && lse.len() == rows => {
                // Rows' log-sum-exps over the threads; the total in row order on this one, so
                // the loss does not depend on the thread count.
                self.run(|| {
                    lse.par_chunks_mut(r)
                        .zip(logits.par_chunks(r * vocab))
                        .for_each(|(l, x)| loss::log_sum_exp(x, vocab, l))
                });
                loss::masked_total(logits, vocab, targets, mask, lse)
            }
            _ => loss::forward(logits, vocab, targets, mask, lse),
        }
    }
    fn cross_entropy_backward(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &Vec<f32>,
        scale: f32,
        dlogits: &mut Vec<f32>,
    ) -> Result<()> {
        let rows = targets.len();
        match self.piece_rows(logits.len(), vocab) {
            Some(r)
                if logits.len() == rows * vocab
                    && dlogits.len() == logits.len()
                    && mask.len() == rows
                    && lse.len() == rows
                    && targets
                        .iter()
                        .zip(mask)
                        .all(|(&t, &m)| !m || (t as usize) < vocab) =>
            {
                self.run(|| {
                    dlogits
                        .par_chunks_mut(r * vocab)
                        .zip(logits.par_chunks(r * vocab))
                        .zip(
                            targets
                                .par_chunks(r)
                                .zip(mask.par_chunks(r))
                                .zip(lse.par_chunks(r)),
                        )
                        .try_for_each(|((d, l), ((t, m), s))| {
                            loss::backward(l, vocab, t, m, s, scale, d)
                        })
                })
            }
            _ => loss::backward(logits, vocab, targets, mask, lse, scale, dlogits),
        }
    }
    fn add(&self, a: &Vec<f32>, b: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        match self.piece_rows(out.len(), 1) {
            Some(n) if a.len() == out.len() && b.len() == out.len() => self.run(|| {
                out.par_chunks_mut(n)
                    .zip(a.par_chunks(n))
                    .zip(b.par_chunks(n))
                    .try_for_each(|((o, a), b)| elementwise::add(a, b, o))
            }),
            _ => elementwise::add(a, b, out),
        }
    }
    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        match self.piece_rows(y.len(), 1) {
            Some(n) if x.len() == y.len() => self.run(|| {
                y.par_chunks_mut(n)
                    .zip(x.par_chunks(n))
                    .try_for_each(|(y, x)| elementwise::axpy(alpha, x, y))
            }),
            _ => elementwise::axpy(alpha, x, y),
        }
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        check_len("copy", "dst", src.len(), dst.len())?;
        match self.piece_rows(dst.len(), 1) {
            Some(n) => self.run(|| {
                dst.par_chunks_mut(n)
                    .zip(src.par_chunks(n))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            }),
            None => dst.copy_from_slice(src),
        }
        Ok(())
    }
    fn scale(&self, alpha: f32, x: &mut Vec<f32>) -> Result<()> {
        elementwise::scale(alpha, x);
        Ok(())
    }
    fn sum_squares(&self, x: &Vec<f32>) -> Result<f64> {
        Ok(elementwise::sum_squares(x))
    }
    fn round_bf16(&self, x: &mut Vec<f32>) -> Result<()> {
        elementwise::round_through_bf16(x);
        Ok(())
    }
    fn adamw(
        &self,
        cfg: &AdamW,
        step: u64,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        let n = param.len();
        match self.piece_rows(n, 1) {
            Some(c) if [grad.len(), m.len(), v.len()] == [n; 3] => self.run(|| {
                param
                    .par_chunks_mut(c)
                    .zip(m.par_chunks_mut(c))
                    .zip(v.par_chunks_mut(c).zip(grad.par_chunks(c)))
                    .try_for_each(|((p, m), (v, g))| adamw::step(cfg, step, p, g, m, v))
            }),
            _ => adamw::step(cfg, step, param, grad, m, v),
        }
    }
}
