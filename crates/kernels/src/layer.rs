//! Backends that wrap another one (the simulator's clocked backend, a profiler): a [`Layer`]
//! says what it does around each kernel, told what the kernel is by a [`Kernel`], and the blanket
//! implementation forwards every call, so no wrapper writes the trait out again.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use kernels::{Backend, CpuBackend, Kernel, Layer};
//!
//! /// Adds up the elements the elementwise kernels read and write.
//! struct Traffic(CpuBackend, AtomicUsize);
//! impl Layer for Traffic {
//!     type Inner = CpuBackend;
//!     fn inner(&self) -> &CpuBackend { &self.0 }
//!     fn kernel<T>(&self, k: Kernel<'_>, run: impl FnOnce(&CpuBackend) -> kernels::Result<T>)
//!         -> kernels::Result<T> {
//!         if let Kernel::Elementwise { elems } = k {
//!             self.1.fetch_add(elems, Ordering::Relaxed);
//!         }
//!         run(&self.0)
//!     }
//! }
//!
//! let t = Traffic(CpuBackend::new(1)?, AtomicUsize::new(0));
//! let x = t.upload(&[1.0, 2.0])?;
//! let mut y = t.zeros(2)?;
//! t.axpy(3.0, &x, &mut y)?; // reads x and y, writes y
//! assert_eq!(t.download(&y)?, vec![3.0, 6.0]);
//! assert_eq!(t.1.load(Ordering::Relaxed), 6);
//! # Ok::<(), kernels::KernelError>(())
//! ```

use crate::backend::{AdamW, AttnShape, Backend, HostSpan, Rotation};
use crate::error::Result;
use crate::matmul::GemmSpec;

/// What a kernel is, as a [`Layer`] sees it before it runs.
#[derive(Debug, Clone, Copy)]
pub enum Kernel<'a> {
    /// A (batched) GEMM.
    Gemm(&'a GemmSpec),
    /// Causal attention over packed sequences, forward or backward.
    Attention {
        /// Cumulative sequence lengths.
        cu_seqlens: &'a [usize],
        /// Heads and head dim.
        shape: AttnShape,
        /// The backward (twice the forward's work).
        backward: bool,
    },
    /// Causal attention between blocks of sequences computed on the host by the caller
    /// ([`Backend::host_attention`]), forward or backward.
    HostAttention {
        /// Per block, its sequence's length and its (query, key) pairs.
        spans: &'a [HostSpan],
        /// Heads and head dim.
        shape: AttnShape,
        /// The backward (twice the forward's work).
        backward: bool,
    },
    /// A memory-bound kernel (norms, RoPE, SwiGLU, embedding, cross-entropy, adds, casts):
    /// the f32 elements it reads and writes.
    Elementwise {
        /// Elements read plus elements written.
        elems: usize,
    },
    /// The AdamW update of `params` parameters.
    AdamW {
        /// Parameters updated.
        params: usize,
    },
}

/// What a wrapping backend adds to an inner one. Buffers are the inner backend's; allocation,
/// copies and `synchronize` go straight through.
pub trait Layer: Send + Sync {
    /// The backend doing the work.
    type Inner: Backend;
    /// It.
    fn inner(&self) -> &Self::Inner;
    /// A short description (default: the inner backend's); the backend's `name`.
    fn describe(&self) -> String {
        self.inner().name()
    }
    /// Runs `run` (the kernel on the inner backend); `kernel` says what it is.
    fn kernel<T>(
        &self,
        kernel: Kernel<'_>,
        run: impl FnOnce(&Self::Inner) -> Result<T>,
    ) -> Result<T>;
}

impl<L: Layer> Backend for L {
    type Buffer = <L::Inner as Backend>::Buffer;

    fn name(&self) -> String {
        self.describe()
    }
    fn zeros(&self, len: usize) -> Result<Self::Buffer> {
        self.inner().zeros(len)
    }
    fn scratch(&self, len: usize) -> Result<Self::Buffer> {
        self.inner().scratch(len)
    }
    fn recycle(&self, buf: Self::Buffer) {
        self.inner().recycle(buf)
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer> {
        self.inner().upload(data)
    }
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>> {
        self.inner().download(buf)
    }
    fn len(&self, buf: &Self::Buffer) -> usize {
        self.inner().len(buf)
    }
    fn host_slice<'a>(&self, buf: &'a Self::Buffer) -> Option<&'a [f32]> {
        self.inner().host_slice(buf)
    }
    fn host_slice_mut<'a>(&self, buf: &'a mut Self::Buffer) -> Option<&'a mut [f32]> {
        self.inner().host_slice_mut(buf)
    }
    fn adopt(&self, host: Vec<f32>) -> Result<Self::Buffer> {
        self.inner().adopt(host)
    }
    fn release_to_host(&self, buf: Self::Buffer) -> Result<Vec<f32>> {
        self.inner().release_to_host(buf)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner().synchronize()
    }
    fn gemm(
        &self,
        spec: &GemmSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        c: &mut Self::Buffer,
    ) -> Result<()> {
        self.kernel(Kernel::Gemm(spec), |i| i.gemm(spec, a, b, c))
    }
    fn embedding_forward(
        &self,
        weight: &Self::Buffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        out: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 2 * ids.len() * dim;
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.embedding_forward(weight, dim, vocab_start, ids, out)
        })
    }
    fn embedding_backward(
        &self,
        grad_out: &Self::Buffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        grad_weight: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 3 * ids.len() * dim;
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.embedding_backward(grad_out, dim, vocab_start, ids, grad_weight)
        })
    }
    fn rms_norm_forward(
        &self,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f64,
        y: &mut Self::Buffer,
        rstd: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 2 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.rms_norm_forward(x, weight, eps, y, rstd)
        })
    }
    fn rms_norm_backward(
        &self,
        dy: &Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        rstd: &Self::Buffer,
        dx: &mut Self::Buffer,
        dweight: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 3 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.rms_norm_backward(dy, x, weight, rstd, dx, dweight)
        })
    }
    fn rope(&self, x: &mut Self::Buffer, r: &Rotation<'_>) -> Result<()> {
        let elems = 2 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| i.rope(x, r))
    }
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
    ) -> Result<()> {
        let kernel = Kernel::Attention {
            cu_seqlens,
            shape,
            backward: false,
        };
        self.kernel(kernel, |i| {
            i.attention_forward(q, k, v, cu_seqlens, shape, scale, out, lse)
        })
    }
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
    ) -> Result<()> {
        let kernel = Kernel::Attention {
            cu_seqlens,
            shape,
            backward: true,
        };
        self.kernel(kernel, |i| {
            i.attention_backward(
                dout, q, k, v, out, lse, cu_seqlens, shape, scale, dq, dk, dv,
            )
        })
    }
    fn swiglu_forward(
        &self,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 3 * self.len(gate);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.swiglu_forward(gate, up, out)
        })
    }
    fn swiglu_backward(
        &self,
        dout: &Self::Buffer,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        dgate: &mut Self::Buffer,
        dup: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 5 * self.len(gate);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.swiglu_backward(dout, gate, up, dgate, dup)
        })
    }
    fn cross_entropy_forward(
        &self,
        logits: &Self::Buffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &mut Self::Buffer,
    ) -> Result<f32> {
        let elems = self.len(logits);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.cross_entropy_forward(logits, vocab, targets, mask, lse)
        })
    }
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &Self::Buffer,
        scale: f32,
        dlogits: &mut Self::Buffer,
    ) -> Result<()> {
        let elems = 2 * self.len(logits);
        self.kernel(Kernel::Elementwise { elems }, |i| {
            i.cross_entropy_backward(logits, vocab, targets, mask, lse, scale, dlogits)
        })
    }
    fn add(&self, a: &Self::Buffer, b: &Self::Buffer, out: &mut Self::Buffer) -> Result<()> {
        let elems = 3 * self.len(a);
        self.kernel(Kernel::Elementwise { elems }, |i| i.add(a, b, out))
    }
    fn axpy(&self, alpha: f32, x: &Self::Buffer, y: &mut Self::Buffer) -> Result<()> {
        let elems = 3 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| i.axpy(alpha, x, y))
    }
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<()> {
        let elems = 2 * self.len(src);
        self.kernel(Kernel::Elementwise { elems }, |i| i.copy(src, dst))
    }
    fn scale(&self, alpha: f32, x: &mut Self::Buffer) -> Result<()> {
        let elems = 2 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| i.scale(alpha, x))
    }
    fn sum_squares(&self, x: &Self::Buffer) -> Result<f64> {
        let elems = self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| i.sum_squares(x))
    }
    fn round_bf16(&self, x: &mut Self::Buffer) -> Result<()> {
        let elems = 2 * self.len(x);
        self.kernel(Kernel::Elementwise { elems }, |i| i.round_bf16(x))
    }
    fn host_attention(
        &self,
        spans: &[HostSpan],
        shape: AttnShape,
        backward: bool,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let kernel = Kernel::HostAttention {
            spans,
            shape,
            backward,
        };
        self.kernel(kernel, |_| work())
    }
    fn adamw(
        &self,
        cfg: &AdamW,
        step: u64,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        m: &mut Self::Buffer,
        v: &mut Self::Buffer,
    ) -> Result<()> {
        let params = self.len(param);
        self.kernel(Kernel::AdamW { params }, |i| {
            i.adamw(cfg, step, param, grad, m, v)
        })
    }
}
