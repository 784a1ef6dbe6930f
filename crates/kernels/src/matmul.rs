//! GEMM through the `gemm` crate: a bounds-checked strided wrapper, and the BLAS-style
//! (row-major, transpose flags, batched) entry point the backend exposes.

use gemm::Parallelism;

use crate::error::{check_len, invalid, Result};
use crate::real::Real;

/// A read-only strided matrix view: element `(i, j)` is `data[offset + i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    /// Backing storage.
    pub data: &'a [T],
    /// Index of element (0, 0).
    pub offset: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

/// A mutable strided matrix view.
pub struct MatMut<'a, T> {
    /// Backing storage.
    pub data: &'a mut [T],
    /// Index of element (0, 0).
    pub offset: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

fn fits(len: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || offset + (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst = alpha · lhs · rhs + beta · dst` with `lhs` m×k and `rhs` k×n, on `threads` threads of
/// the current rayon pool (1 = this thread only). Every view is bounds-checked first.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut<'_, T>,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    alpha: T,
    beta: T,
    threads: usize,
) -> Result<()> {
    if !fits(dst.data.len(), dst.offset, m, n, dst.rs, dst.cs) {
        return Err(invalid(
            "gemm",
            format!("dst view {m}×{n} overruns its buffer"),
        ));
    }
    if !fits(lhs.data.len(), lhs.offset, m, k, lhs.rs, lhs.cs) {
        return Err(invalid(
            "gemm",
            format!("lhs view {m}×{k} overruns its buffer"),
        ));
    }
    if !fits(rhs.data.len(), rhs.offset, k, n, rhs.rs, rhs.cs) {
        return Err(invalid(
            "gemm",
            format!("rhs view {k}×{n} overruns its buffer"),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = &mut dst.data[dst.offset + i * dst.rs + j * dst.cs];
                *x = if beta == T::zero() {
                    T::zero()
                } else {
                    beta * *x
                };
            }
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every view was checked above to stay inside its slice for the m×n, m×k and k×n
    // extents, `dst` is a unique borrow, and `T` is f32 or f64 (sealed), which `gemm` supports.
    // `gemm` computes dst := alpha·dst + beta·lhs·rhs, hence the swapped scalars.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr().add(dst.offset),
            dst.cs as isize,
            dst.rs as isize,
            beta != T::zero(),
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// A (batched) row-major GEMM: `C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]`, where `op`
/// transposes when the flag is set, op(A) is m×k, op(B) is k×n, and every matrix is packed
/// (leading dim = its stored column count). Batch `b` starts at `b·m·k`, `b·k·n`, `b·m·n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmSpec {
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored k×m and used transposed.
    pub trans_a: bool,
    /// B is stored n×k and used transposed.
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the previous C (0 overwrites, without reading C).
    pub beta: f32,
    /// Number of independent products.
    pub batch: usize,
}

impl GemmSpec {
    /// A single `C = op(A)·op(B)`.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
        }
    }
    /// Sets the transpose flags.
    pub fn trans(mut self, a: bool, b: bool) -> Self {
        self.trans_a = a;
        self.trans_b = b;
        self
    }
    /// Sets alpha and beta.
    pub fn scale(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }
    /// Sets the batch count.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
    /// Floating-point operations of the whole call (2·m·n·k per batch).
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.batch) as f64
    }
}

/// Runs `spec` on packed row-major buffers with elements of type `T`.
pub fn gemm<T: Real>(spec: &GemmSpec, a: &[T], b: &[T], c: &mut [T], threads: usize) -> Result<()> {
    let GemmSpec { m, n, k, batch, .. } = *spec;
    check_len("gemm", "A", batch * m * k, a.len())?;
    check_len("gemm", "B", batch * k * n, b.len())?;
    check_len("gemm", "C", batch * m * n, c.len())?;
    let (a_rs, a_cs) = if spec.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if spec.trans_b { (1, k) } else { (n, 1) };
    for i in 0..batch {
        matmul(
            m,
            n,
            k,
            MatMut {
                data: c,
                offset: i * m * n,
                rs: n,
                cs: 1,
            },
            MatRef {
                data: a,
                offset: i * m * k,
                rs: a_rs,
                cs: a_cs,
            },
            MatRef {
                data: b,
                offset: i * k * n,
                rs: b_rs,
                cs: b_cs,
            },
            T::of(spec.alpha as f64),
            T::of(spec.beta as f64),
            threads,
        )?;
    }
    Ok(())
}
