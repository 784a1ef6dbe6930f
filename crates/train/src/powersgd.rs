//! PowerSGD (Vogels et al., NeurIPS 2019): each gradient matrix `M` (rows × cols) is sent as a
//! rank-`r` product `P Qᵀ` from one step of subspace iteration, warm-started from the previous
//! step's `Q`. Two small all-reduces per bucket: the `P`s (with the tensors sent exactly —
//! vectors and matrices too small to gain — appended), then the `Q`s.
//!
//! With error feedback each member keeps `M − P̂ P̂ᵀ M` (its own matrix minus its projection on
//! the shared basis `P̂`); the projections add up to what every member decodes, so the members'
//! residuals add up to exactly what the sum left out.

use comm::allreduce::{self, Algorithm};
use comm::{Communicator, ReduceOp};

use runtime::{Result, RuntimeError};

/// One tensor of a bucket: where it lies in the flat buffer and, when compressed, its shape.
struct Piece {
    offset: usize,
    len: usize,
    /// `(rows, cols)` for a compressed matrix.
    matrix: Option<(usize, usize)>,
}

/// Splits a bucket by `shapes`: a tensor of two or more dims is a matrix of its first dim by
/// the rest, compressed when `(rows + cols)·r < rows·cols`.
fn pieces(shapes: &[Vec<usize>], len: usize, r: usize) -> Result<Vec<Piece>> {
    let mut out = Vec::with_capacity(shapes.len());
    let mut offset = 0;
    for s in shapes {
        let n: usize = s.iter().product();
        let matrix = match s.as_slice() {
            [rows, rest @ ..] if !rest.is_empty() => {
                let cols: usize = rest.iter().product();
                ((rows + cols) * r < rows * cols).then_some((*rows, cols))
            }
            _ => None,
        };
        out.push(Piece {
            offset,
            len: n,
            matrix,
        });
        offset += n;
    }
    if offset != len {
        return Err(RuntimeError::Agreement(format!(
            "PowerSGD: the bucket's tensor shapes {shapes:?} hold {offset} values, the bucket {len}"
        )));
    }
    Ok(out)
}

/// Standard normal values from `seed` (SplitMix64 and Box–Muller: the same on every member).
fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut draws = comm::codec::splitmix_stream(seed);
    let mut uniform = || (draws.next().unwrap_or(0) >> 11) as f64 / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (u, v) = (uniform().max(1e-300), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// `m` (rows × cols, row-major) times `q` (cols × r): rows × r.
fn times(m: &[f32], rows: usize, cols: usize, q: &[f32], r: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; rows * r];
    for i in 0..rows {
        let row = &m[i * cols..(i + 1) * cols];
        let out = &mut p[i * r..(i + 1) * r];
        for (j, &x) in row.iter().enumerate() {
            let qj = &q[j * r..(j + 1) * r];
            for k in 0..r {
                out[k] += x * qj[k];
            }
        }
    }
    p
}

/// `mᵀ` (cols × rows) times `p` (rows × r): cols × r.
fn times_transposed(m: &[f32], rows: usize, cols: usize, p: &[f32], r: usize) -> Vec<f32> {
    let mut q = vec![0.0f32; cols * r];
    for i in 0..rows {
        let row = &m[i * cols..(i + 1) * cols];
        let pi = &p[i * r..(i + 1) * r];
        for (j, &x) in row.iter().enumerate() {
            let out = &mut q[j * r..(j + 1) * r];
            for k in 0..r {
                out[k] += x * pi[k];
            }
        }
    }
    q
}

/// Orthonormalises the `r` columns of `p` (rows × r) in place by modified Gram–Schmidt. A
/// column with nothing left but rounding (the matrix has lower rank) becomes zero rather than a
/// unit vector of rounding noise, which would not be orthogonal to the others.
fn orthonormalise(p: &mut [f32], rows: usize, r: usize) {
    for k in 0..r {
        let before = (0..rows)
            .map(|i| p[i * r + k] * p[i * r + k])
            .sum::<f32>()
            .sqrt();
        for prev in 0..k {
            let dot: f32 = (0..rows).map(|i| p[i * r + k] * p[i * r + prev]).sum();
            for i in 0..rows {
                p[i * r + k] -= dot * p[i * r + prev];
            }
        }
        let norm = (0..rows)
            .map(|i| p[i * r + k] * p[i * r + k])
            .sum::<f32>()
            .sqrt();
        let inv = if norm > 1e-4 * before && norm > 0.0 {
            1.0 / norm
        } else {
            0.0
        };
        for i in 0..rows {
            p[i * r + k] *= inv;
        }
    }
}

/// What PowerSGD keeps per bucket between steps.
pub struct PowerSgdState<'a> {
    /// The `Q` of every compressed matrix, concatenated (empty before the first step).
    pub q: &'a mut Vec<f32>,
    /// This member's residual (with error feedback).
    pub residual: Option<&'a mut [f32]>,
    /// Seeds the first `Q`s (the same on every member).
    pub seed: u64,
}

/// Sums `buf` (a bucket of tensors of `shapes`) over `c` by rank-`r` PowerSGD; every member
/// ends with the same values.
pub fn all_reduce(
    c: &dyn Communicator,
    buf: &mut [f32],
    shapes: &[Vec<usize>],
    r: usize,
    state: PowerSgdState<'_>,
    algo: &dyn Fn(usize) -> Algorithm,
) -> Result<()> {
    let PowerSgdState {
        q: qs,
        mut residual,
        seed,
    } = state;
    let parts = pieces(shapes, buf.len(), r)?;
    if let Some(res) = residual.as_deref_mut() {
        if res.len() != buf.len() {
            return Err(RuntimeError::Agreement(format!(
                "PowerSGD residual of {} values for a bucket of {}",
                res.len(),
                buf.len()
            )));
        }
        buf.iter_mut().zip(res.iter()).for_each(|(b, e)| *b += e);
    }
    let q_len: usize = parts
        .iter()
        .filter_map(|p| p.matrix.map(|(_, cols)| cols * r))
        .sum();
    if qs.is_empty() {
        *qs = normals(q_len, seed);
    } else if qs.len() != q_len {
        return Err(RuntimeError::Agreement(format!(
            "PowerSGD warm start holds {} values, the bucket's matrices need {q_len}",
            qs.len()
        )));
    }
    // First all-reduce: every P = M Q, then the tensors sent exactly.
    let mut first = Vec::new();
    let mut q_off = 0;
    for p in &parts {
        if let Some((rows, cols)) = p.matrix {
            let m = &buf[p.offset..p.offset + p.len];
            first.extend(times(m, rows, cols, &qs[q_off..q_off + cols * r], r));
            q_off += cols * r;
        }
    }
    let p_len = first.len();
    for p in parts.iter().filter(|p| p.matrix.is_none()) {
        first.extend_from_slice(&buf[p.offset..p.offset + p.len]);
    }
    let a = algo(4 * first.len());
    allreduce::all_reduce(c, &mut first, ReduceOp::Sum, a)?;
    // Orthonormal bases, then this member's Q = Mᵀ P̂ (and its residual).
    let mut second = Vec::with_capacity(q_len);
    let mut p_off = 0;
    for p in &parts {
        if let Some((rows, cols)) = p.matrix {
            let basis = &mut first[p_off..p_off + rows * r];
            orthonormalise(basis, rows, r);
            let m = &buf[p.offset..p.offset + p.len];
            let q = times_transposed(m, rows, cols, basis, r);
            if let Some(res) = residual.as_deref_mut() {
                let res = &mut res[p.offset..p.offset + p.len];
                for i in 0..rows {
                    for j in 0..cols {
                        let approx: f32 = (0..r).map(|k| basis[i * r + k] * q[j * r + k]).sum();
                        res[i * cols + j] = m[i * cols + j] - approx;
                    }
                }
            }
            second.extend(q);
            p_off += rows * r;
        }
    }
    let a = algo(4 * second.len());
    allreduce::all_reduce(c, &mut second, ReduceOp::Sum, a)?;
    // Decode: P̂ Qᵀ for the matrices, the exact sums for the rest.
    let (mut p_off, mut q_off, mut plain) = (0, 0, p_len);
    for p in &parts {
        let out = &mut buf[p.offset..p.offset + p.len];
        match p.matrix {
            Some((rows, cols)) => {
                let basis = &first[p_off..p_off + rows * r];
                let q = &second[q_off..q_off + cols * r];
                for i in 0..rows {
                    for j in 0..cols {
                        out[i * cols + j] = (0..r).map(|k| basis[i * r + k] * q[j * r + k]).sum();
                    }
                }
                p_off += rows * r;
                q_off += cols * r;
            }
            None => {
                out.copy_from_slice(&first[plain..plain + p.len]);
                if let Some(res) = residual.as_deref_mut() {
                    res[p.offset..p.offset + p.len].fill(0.0);
                }
                plain += p.len;
            }
        }
    }
    // Warm start: the summed Q.
    *qs = second;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::ThreadComm;

    #[test]
    fn a_low_rank_sum_comes_back_exactly_and_vectors_travel_exactly() {
        // Each member's matrix is rank 1 in the same column space: the sum is rank 1, so a
        // rank-2 PowerSGD step recovers it (up to rounding); the vector is summed exactly.
        let (rows, cols, r) = (12, 10, 2);
        let out = ThreadComm::run(3, move |c| -> Result<Vec<f32>> {
            let me = c.rank().0 as f32 + 1.0;
            let mut buf: Vec<f32> = (0..rows * cols)
                .map(move |x| {
                    let (i, j) = (x / cols, x % cols);
                    (i as f32 - 5.0) * (me * j as f32 + 1.0) * 0.01
                })
                .collect();
            buf.extend([me, -me, 0.5]);
            let mut q = Vec::new();
            all_reduce(
                &c,
                &mut buf,
                &[vec![rows, cols], vec![3]],
                r,
                PowerSgdState {
                    q: &mut q,
                    residual: None,
                    seed: 9,
                },
                &|_| Algorithm::Ring,
            )?;
            Ok(buf)
        })
        .unwrap();
        assert!(out.iter().all(|b| b == &out[0]), "members disagree");
        for (x, &got) in out[0].iter().enumerate().take(rows * cols) {
            let (i, j) = (x / cols, x % cols);
            let want: f32 = (1..=3)
                .map(|m| (i as f32 - 5.0) * (m as f32 * j as f32 + 1.0) * 0.01)
                .sum();
            assert!((got - want).abs() < 1e-4, "{x}: {got} vs {want}");
        }
        assert_eq!(&out[0][rows * cols..], &[6.0, -6.0, 1.5]);
    }

    #[test]
    fn residuals_add_up_to_what_the_sum_left_out() {
        let (rows, cols, r) = (16, 16, 1);
        let grads = move |m: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|x| (((x * 7 + m * 13) % 23) as f32 - 11.0) * 0.1)
                .collect()
        };
        let out = ThreadComm::run(2, move |c| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut buf = grads(c.rank().0);
            let mut res = vec![0.0; rows * cols];
            let mut q = Vec::new();
            all_reduce(
                &c,
                &mut buf,
                &[vec![rows, cols]],
                r,
                PowerSgdState {
                    q: &mut q,
                    residual: Some(&mut res),
                    seed: 1,
                },
                &|_| Algorithm::HalvingDoubling,
            )?;
            Ok((buf, res))
        })
        .unwrap();
        for x in 0..rows * cols {
            let exact = grads(0)[x] + grads(1)[x];
            let back = out[0].0[x] + out[0].1[x] + out[1].1[x];
            assert!((back - exact).abs() < 1e-4, "{x}: {back} vs {exact}");
        }
        // Rank 1 of a full-rank sum leaves something out.
        assert!(out[0].1.iter().any(|e| e.abs() > 0.01));
    }
}
