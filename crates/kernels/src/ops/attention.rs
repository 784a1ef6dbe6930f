//! Causal attention with grouped-query heads over packed variable-length sequences, computed
//! blockwise with an online softmax (FlashAttention-2's algorithm): no T×T matrix is ever
//! materialised, only `BLOCK×BLOCK` tiles. Work is spread over (sequence, head) pairs with rayon.
//!
//! Layouts: `q`, `out`, `dq` are `[tokens, heads, head_dim]`; `k`, `v`, `dk`, `dv` are
//! `[tokens, kv_heads, head_dim]`; `lse` is `[heads, tokens]`. `cu_seqlens` holds the cumulative
//! sequence lengths `0 = c0 ≤ c1 ≤ … ≤ cS = tokens`; token `t` of sequence `s` attends to tokens
//! `c_s ..= t` only. Query head `h` reads kv head `h / (heads / kv_heads)`.

use rayon::prelude::*;

use crate::error::{check_len, invalid, Result};
use crate::matmul::{matmul, MatMut, MatRef};
use crate::real::Real;

/// Tile edge (query rows and key columns per tile).
pub const BLOCK: usize = 64;

/// Head layout of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Dimension of every head.
    pub head_dim: usize,
}

impl AttnShape {
    pub(crate) fn check(
        &self,
        op: &'static str,
        cu_seqlens: &[usize],
        q: usize,
        k: usize,
        v: usize,
    ) -> Result<usize> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(
                op,
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            ));
        }
        let tokens = *cu_seqlens.last().unwrap_or(&0);
        if cu_seqlens.first() != Some(&0) || cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
            return Err(invalid(
                op,
                format!("cu_seqlens must start at 0 and never decrease, got {cu_seqlens:?}"),
            ));
        }
        check_len(op, "q", tokens * self.heads * self.head_dim, q)?;
        check_len(op, "k", tokens * self.kv_heads * self.head_dim, k)?;
        check_len(op, "v", tokens * self.kv_heads * self.head_dim, v)?;
        Ok(tokens)
    }
}

struct Seq {
    start: usize,
    len: usize,
}

fn sequences(cu_seqlens: &[usize]) -> Vec<Seq> {
    cu_seqlens
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| Seq {
            start: w[0],
            len: w[1] - w[0],
        })
        .collect()
}

/// Forward: writes `out` and the log-sum-exp of every (head, token) row of scores.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens: &[usize],
    shape: AttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) -> Result<()> {
    let tokens = shape.check("attention", cu_seqlens, q.len(), k.len(), v.len())?;
    check_len("attention", "out", q.len(), out.len())?;
    check_len("attention", "lse", shape.heads * tokens, lse.len())?;
    let seqs = sequences(cu_seqlens);
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..shape.heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Result<(Vec<T>, Vec<T>)>> = tasks
        .par_iter()
        .map(|&(s, h)| forward_task(q, k, v, &seqs[s], h, shape, scale))
        .collect();
    let d = shape.head_dim;
    for (&(s, h), r) in tasks.iter().zip(results) {
        let (o, l) = r?;
        let seq = &seqs[s];
        for i in 0..seq.len {
            let t = seq.start + i;
            out[(t * shape.heads + h) * d..(t * shape.heads + h + 1) * d]
                .copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[h * tokens + t] = l[i];
        }
    }
    Ok(())
}

fn forward_task<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    seq: &Seq,
    h: usize,
    shape: AttnShape,
    scale: T,
) -> Result<(Vec<T>, Vec<T>)> {
    let d = shape.head_dim;
    let g = h / (shape.heads / shape.kv_heads);
    let (qrs, krs) = (shape.heads * d, shape.kv_heads * d);
    let len = seq.len;
    let mut o = vec![T::zero(); len * d];
    let mut lse = vec![T::zero(); len];
    let mut tile = vec![T::zero(); BLOCK * BLOCK];
    let mut m = [T::zero(); BLOCK];
    let mut l = [T::zero(); BLOCK];
    for i0 in (0..len).step_by(BLOCK) {
        let br = BLOCK.min(len - i0);
        m[..br].fill(T::neg_infinity());
        l[..br].fill(T::zero());
        // Key blocks up to the diagonal; block starts are aligned, so j0 ≤ i0 and every row has
        // at least one unmasked column in every block it visits.
        for j0 in (0..i0 + br).step_by(BLOCK) {
            let bc = BLOCK.min(len - j0);
            matmul(
                br,
                bc,
                d,
                MatMut {
                    data: &mut tile,
                    offset: 0,
                    rs: bc,
                    cs: 1,
                },
                MatRef {
                    data: q,
                    offset: (seq.start + i0) * qrs + h * d,
                    rs: qrs,
                    cs: 1,
                },
                MatRef {
                    data: k,
                    offset: (seq.start + j0) * krs + g * d,
                    rs: 1,
                    cs: krs,
                },
                scale,
                T::zero(),
                1,
            )?;
            for r in 0..br {
                let row = i0 + r;
                let visible = (row + 1 - j0).min(bc);
                let srow = &mut tile[r * bc..(r + 1) * bc];
                let bmax = srow[..visible]
                    .iter()
                    .fold(T::neg_infinity(), |a, &b| a.max(b));
                let m_new = m[r].max(bmax);
                let alpha = (m[r] - m_new).exp();
                let mut sum = T::zero();
                for (c, s) in srow.iter_mut().enumerate() {
                    *s = if c < visible {
                        (*s - m_new).exp()
                    } else {
                        T::zero()
                    };
                    sum += *s;
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
                for x in &mut o[(i0 + r) * d..(i0 + r + 1) * d] {
                    *x *= alpha;
                }
            }
            matmul(
                br,
                d,
                bc,
                MatMut {
                    data: &mut o,
                    offset: i0 * d,
                    rs: d,
                    cs: 1,
                },
                MatRef {
                    data: &tile,
                    offset: 0,
                    rs: bc,
                    cs: 1,
                },
                MatRef {
                    data: v,
                    offset: (seq.start + j0) * krs + g * d,
                    rs: krs,
                    cs: 1,
                },
                T::one(),
                T::one(),
                1,
            )?;
        }
        for r in 0..br {
            let inv = l[r].recip();
            for x in &mut o[(i0 + r) * d..(i0 + r + 1) * d] {
                *x *= inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
    }
    Ok((o, lse))
}

/// Gradients of [`forward`], recomputing the score tiles from `lse`: writes `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    cu_seqlens: &[usize],
    shape: AttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    let tokens = shape.check("attention_backward", cu_seqlens, q.len(), k.len(), v.len())?;
    check_len("attention_backward", "dout", q.len(), dout.len())?;
    check_len("attention_backward", "out", q.len(), out.len())?;
    check_len("attention_backward", "lse", shape.heads * tokens, lse.len())?;
    check_len("attention_backward", "dq", q.len(), dq.len())?;
    check_len("attention_backward", "dk", k.len(), dk.len())?;
    check_len("attention_backward", "dv", v.len(), dv.len())?;
    let seqs = sequences(cu_seqlens);
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..shape.kv_heads).map(move |g| (s, g)))
        .collect();
    let inputs = BwdInputs {
        dout,
        q,
        k,
        v,
        out,
        lse,
        tokens,
        shape,
        scale,
    };
    let results: Vec<Result<BwdOut<T>>> = tasks
        .par_iter()
        .map(|&(s, g)| backward_task(&inputs, &seqs[s], g))
        .collect();
    dq.fill(T::zero());
    dk.fill(T::zero());
    dv.fill(T::zero());
    let d = shape.head_dim;
    let rep = shape.heads / shape.kv_heads;
    for (&(s, g), r) in tasks.iter().zip(results) {
        let res = r?;
        let seq = &seqs[s];
        for i in 0..seq.len {
            let t = seq.start + i;
            let kv = (t * shape.kv_heads + g) * d;
            dk[kv..kv + d].copy_from_slice(&res.dk[i * d..(i + 1) * d]);
            dv[kv..kv + d].copy_from_slice(&res.dv[i * d..(i + 1) * d]);
            for hh in 0..rep {
                let h = g * rep + hh;
                let qo = (t * shape.heads + h) * d;
                let src = (hh * seq.len + i) * d;
                dq[qo..qo + d].copy_from_slice(&res.dq[src..src + d]);
            }
        }
    }
    Ok(())
}

fn tile<T>(data: &mut [T], bc: usize) -> MatMut<'_, T> {
    MatMut {
        data,
        offset: 0,
        rs: bc,
        cs: 1,
    }
}

struct BwdInputs<'a, T> {
    dout: &'a [T],
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a [T],
    lse: &'a [T],
    tokens: usize,
    shape: AttnShape,
    scale: T,
}

struct BwdOut<T> {
    /// `[rep, len, d]` for the query heads of the group.
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

fn backward_task<T: Real>(x: &BwdInputs<'_, T>, seq: &Seq, g: usize) -> Result<BwdOut<T>> {
    let shape = x.shape;
    let d = shape.head_dim;
    let rep = shape.heads / shape.kv_heads;
    let (qrs, krs) = (shape.heads * d, shape.kv_heads * d);
    let len = seq.len;
    let mut dq = vec![T::zero(); rep * len * d];
    let mut dk = vec![T::zero(); len * d];
    let mut dv = vec![T::zero(); len * d];
    // delta[hh, r] = Σ dO·O for each query row.
    let mut delta = vec![T::zero(); rep * len];
    for hh in 0..rep {
        let h = g * rep + hh;
        for r in 0..len {
            let off = (seq.start + r) * qrs + h * d;
            delta[hh * len + r] = (0..d).map(|e| x.dout[off + e] * x.out[off + e]).sum();
        }
    }
    let mut p = vec![T::zero(); BLOCK * BLOCK];
    let mut ds = vec![T::zero(); BLOCK * BLOCK];
    for j0 in (0..len).step_by(BLOCK) {
        let bc = BLOCK.min(len - j0);
        let kj = (seq.start + j0) * krs + g * d;
        for hh in 0..rep {
            let h = g * rep + hh;
            for i0 in (j0..len).step_by(BLOCK) {
                let br = BLOCK.min(len - i0);
                let qi = (seq.start + i0) * qrs + h * d;
                let q_i = MatRef {
                    data: x.q,
                    offset: qi,
                    rs: qrs,
                    cs: 1,
                };
                let do_i = MatRef {
                    data: x.dout,
                    offset: qi,
                    rs: qrs,
                    cs: 1,
                };
                let k_j = MatRef {
                    data: x.k,
                    offset: kj,
                    rs: krs,
                    cs: 1,
                };
                let k_j_t = MatRef {
                    data: x.k,
                    offset: kj,
                    rs: 1,
                    cs: krs,
                };
                let v_j_t = MatRef {
                    data: x.v,
                    offset: kj,
                    rs: 1,
                    cs: krs,
                };
                // P = exp(scale·Q Kᵀ − lse), causal-masked.
                matmul(
                    br,
                    bc,
                    d,
                    tile(&mut p, bc),
                    q_i,
                    k_j_t,
                    x.scale,
                    T::zero(),
                    1,
                )?;
                for r in 0..br {
                    let row = i0 + r;
                    let l = x.lse[h * x.tokens + seq.start + row];
                    for c in 0..bc {
                        let e = &mut p[r * bc + c];
                        *e = if j0 + c <= row {
                            (*e - l).exp()
                        } else {
                            T::zero()
                        };
                    }
                }
                // dV_j += Pᵀ dO_i
                let p_t = MatRef {
                    data: &p,
                    offset: 0,
                    rs: 1,
                    cs: bc,
                };
                let dv_j = MatMut {
                    data: &mut dv,
                    offset: j0 * d,
                    rs: d,
                    cs: 1,
                };
                matmul(bc, d, br, dv_j, p_t, do_i, T::one(), T::one(), 1)?;
                // dP = dO_i V_jᵀ, then dS = P ∘ (dP − delta).
                matmul(
                    br,
                    bc,
                    d,
                    tile(&mut ds, bc),
                    do_i,
                    v_j_t,
                    T::one(),
                    T::zero(),
                    1,
                )?;
                for r in 0..br {
                    let dl = delta[hh * len + i0 + r];
                    for c in 0..bc {
                        ds[r * bc + c] = p[r * bc + c] * (ds[r * bc + c] - dl);
                    }
                }
                let ds_ref = MatRef {
                    data: &ds,
                    offset: 0,
                    rs: bc,
                    cs: 1,
                };
                let ds_t = MatRef {
                    data: &ds,
                    offset: 0,
                    rs: 1,
                    cs: bc,
                };
                // dQ_i += scale · dS K_j ; dK_j += scale · dSᵀ Q_i
                let dq_i = MatMut {
                    data: &mut dq,
                    offset: (hh * len + i0) * d,
                    rs: d,
                    cs: 1,
                };
                matmul(br, d, bc, dq_i, ds_ref, k_j, x.scale, T::one(), 1)?;
                let dk_j = MatMut {
                    data: &mut dk,
                    offset: j0 * d,
                    rs: d,
                    cs: 1,
                };
                matmul(bc, d, br, dk_j, ds_t, q_i, x.scale, T::one(), 1)?;
            }
        }
    }
    Ok(BwdOut { dq, dk, dv })
}
