//! Causal attention between *blocks* of a sequence that need not be contiguous or on one rank:
//! the pieces context parallelism computes. A [`Span`] pairs some query rows with some key rows
//! of the same sequence, each at its position in the sequence; key `j` is visible to query `i`
//! when `k_pos + j ≤ q_pos + i`. The forward *merges* each span's softmax into running
//! `out`/`lse` accumulators (log-sum-exp weights, as ring attention does across blocks), so a
//! query's keys may arrive in any number of spans, from any number of buffers, in any order. The
//! backward takes the final `lse` and `delta = Σ dO·O` of every query row (FlashAttention-2's
//! decomposition) and *adds* the span's share of `dq`, `dk`, `dv`.
//!
//! Layouts as in [`super::attention`]: `q`, `out`, `dq`, `dout` `[q_tokens, heads, head_dim]`;
//! `k`, `v`, `dk`, `dv` `[k_tokens, kv_heads, head_dim]`; `lse`, `delta` `[heads, q_tokens]`.
//! Tiles are `Q_BLOCK` query rows by `FWD_KEYS` key columns in the forward and `Q_BLOCK` by
//! [`BLOCK`] in the backward, and go through the same GEMM as the whole-sequence kernel.

use rayon::prelude::*;

use super::attention_shape::{AttnShape, BLOCK};

/// Query rows per GEMM: several key-block tiles tall, so that each GEMM call does more work
/// (the head dimension, the GEMMs' inner size, is small).
const Q_BLOCK: usize = 4 * BLOCK;
/// Key columns per forward tile: longer rows spread the softmax's per-row work (the row's
/// reductions, the output rescale) over more scores.
const FWD_KEYS: usize = 2 * BLOCK;
use crate::error::{check_len, invalid, Result};
use crate::matmul::{matmul, MatMut, MatRef};
use crate::real::Real;
use crate::tile::{Running, ScoreTile};

/// Query rows `q_start..q_start + q_len` of the query buffer (positions `q_pos..`) against key
/// rows `k_start..k_start + k_len` of the key buffer (positions `k_pos..`), of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First query row in the query buffer.
    pub q_start: usize,
    /// Query rows.
    pub q_len: usize,
    /// Position in its sequence of the first query row.
    pub q_pos: usize,
    /// First key row in the key buffer.
    pub k_start: usize,
    /// Key rows.
    pub k_len: usize,
    /// Position in its sequence of the first key row.
    pub k_pos: usize,
}

impl Span {
    /// Whether any key is visible to any query (otherwise the span adds nothing).
    pub fn visible(&self) -> bool {
        self.q_len > 0 && self.k_len > 0 && self.k_pos < self.q_pos + self.q_len
    }

    /// Keys visible to query row `i` among key rows `j0..j0 + bc` (a prefix of them).
    fn visible_in(&self, i: usize, j0: usize, bc: usize) -> usize {
        (self.q_pos + i + 1).saturating_sub(self.k_pos + j0).min(bc)
    }

    /// The first query row that sees key row `j` (`q_len` or more when none does).
    fn first_row_seeing(&self, j: usize) -> usize {
        (self.k_pos + j).saturating_sub(self.q_pos)
    }

    /// Number of (query, key) pairs the mask lets through.
    pub fn pairs(&self) -> usize {
        (0..self.q_len)
            .map(|i| self.visible_in(i, 0, self.k_len))
            .sum()
    }
}

fn check_spans(op: &'static str, spans: &[Span], q_tokens: usize, k_tokens: usize) -> Result<()> {
    for s in spans {
        if s.q_start + s.q_len > q_tokens || s.k_start + s.k_len > k_tokens {
            return Err(invalid(
                op,
                format!("{s:?} reaches past {q_tokens} query or {k_tokens} key rows"),
            ));
        }
    }
    Ok(())
}

fn tokens_of(op: &'static str, what: &str, len: usize, row: usize) -> Result<usize> {
    if row == 0 || !len.is_multiple_of(row) {
        return Err(invalid(
            op,
            format!("{what} holds {len} values, not a multiple of {row}"),
        ));
    }
    Ok(len / row)
}

/// Merges the softmax of every span into `out`/`lse`. Start from `out = 0`, `lse = −∞`; rows
/// no span reaches keep them.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    spans: &[Span],
    shape: AttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) -> Result<()> {
    const OP: &str = "attention_spans";
    shape.check_heads(OP)?;
    let d = shape.head_dim;
    let q_tokens = tokens_of(OP, "q", q.len(), shape.heads * d)?;
    let k_tokens = tokens_of(OP, "k", k.len(), shape.kv_heads * d)?;
    check_len(OP, "v", k.len(), v.len())?;
    check_len(OP, "out", q.len(), out.len())?;
    check_len(OP, "lse", shape.heads * q_tokens, lse.len())?;
    check_spans(OP, spans, q_tokens, k_tokens)?;
    let tasks: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .filter(|(_, s)| s.visible())
        .flat_map(|(i, _)| (0..shape.heads).map(move |h| (i, h)))
        .collect();
    let parts: Vec<Result<(Vec<T>, Vec<T>)>> = tasks
        .par_iter()
        .map(|&(s, h)| forward_task(q, k, v, &spans[s], h, shape, scale))
        .collect();
    for (&(s, h), part) in tasks.iter().zip(parts) {
        let (o, l) = part?;
        let span = &spans[s];
        for i in 0..span.q_len {
            let t = span.q_start + i;
            let dst = &mut out[(t * shape.heads + h) * d..(t * shape.heads + h + 1) * d];
            merge(
                dst,
                &mut lse[h * q_tokens + t],
                &o[i * d..(i + 1) * d],
                l[i],
            );
        }
    }
    Ok(())
}

/// Folds a normalised partial row `(o, l)` into the accumulated `(acc, lse)`.
fn merge<T: Real>(acc: &mut [T], lse: &mut T, o: &[T], l: T) {
    if l == T::neg_infinity() {
        return;
    }
    if *lse == T::neg_infinity() {
        acc.copy_from_slice(o);
        *lse = l;
        return;
    }
    let m = lse.max(l);
    let (wa, wo) = ((*lse - m).exp(), (l - m).exp());
    let sum = wa + wo;
    let (wa, wo) = (wa / sum, wo / sum);
    for (a, &x) in acc.iter_mut().zip(o) {
        *a = *a * wa + x * wo;
    }
    *lse = m + sum.ln();
}

fn forward_task<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    span: &Span,
    h: usize,
    shape: AttnShape,
    scale: T,
) -> Result<(Vec<T>, Vec<T>)> {
    let d = shape.head_dim;
    let g = h / (shape.heads / shape.kv_heads);
    let (qrs, krs) = (shape.heads * d, shape.kv_heads * d);
    let (len, klen) = (span.q_len, span.k_len);
    let mut o = vec![T::zero(); len * d];
    let mut lse = vec![T::neg_infinity(); len];
    let mut tile = vec![T::zero(); Q_BLOCK * FWD_KEYS];
    let mut m = [T::zero(); Q_BLOCK];
    let mut l = [T::zero(); Q_BLOCK];
    let mut visible = [0; Q_BLOCK];
    for i0 in (0..len).step_by(Q_BLOCK) {
        let br = Q_BLOCK.min(len - i0);
        m[..br].fill(T::neg_infinity());
        l[..br].fill(T::zero());
        for j0 in (0..klen).step_by(FWD_KEYS) {
            // Rows before `first` see none of this key block; when no row does, no later
            // block is seen either.
            let first = span.first_row_seeing(j0).max(i0);
            if first >= i0 + br {
                break;
            }
            let (bc, rows) = (FWD_KEYS.min(klen - j0), i0 + br - first);
            matmul(
                rows,
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
                    offset: (span.q_start + first) * qrs + h * d,
                    rs: qrs,
                    cs: 1,
                },
                MatRef {
                    data: k,
                    offset: (span.k_start + j0) * krs + g * d,
                    rs: 1,
                    cs: krs,
                },
                scale,
                T::zero(),
                1,
            )?;
            // Masked scores as −∞: their exponentials are 0, which leaves the sum as it is,
            // and whole rows keep the vector loops free of scalar remainders.
            for (r, v) in visible[..rows].iter_mut().enumerate() {
                *v = span.visible_in(first + r, j0, bc);
            }
            let a = first - i0;
            T::online_softmax(
                ScoreTile {
                    scores: &mut tile,
                    bc,
                    visible: &visible[..rows],
                },
                Running {
                    m: &mut m[a..a + rows],
                    l: &mut l[a..a + rows],
                    o: &mut o[first * d..(first + rows) * d],
                    d,
                },
            );
            matmul(
                rows,
                d,
                bc,
                MatMut {
                    data: &mut o,
                    offset: first * d,
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
                    offset: (span.k_start + j0) * krs + g * d,
                    rs: krs,
                    cs: 1,
                },
                T::one(),
                T::one(),
                1,
            )?;
        }
        for a in 0..br {
            if l[a] == T::zero() {
                continue;
            }
            let inv = l[a].recip();
            for x in &mut o[(i0 + a) * d..(i0 + a + 1) * d] {
                *x *= inv;
            }
            lse[i0 + a] = m[a] + l[a].ln();
        }
    }
    Ok((o, lse))
}

/// `delta[h, t] = Σ dout·out` of every query row: what [`backward`] needs beside the final `lse`.
pub fn delta<T: Real>(dout: &[T], out: &[T], shape: AttnShape) -> Result<Vec<T>> {
    const OP: &str = "attention_spans_delta";
    check_len(OP, "out", dout.len(), out.len())?;
    let d = shape.head_dim;
    let tokens = tokens_of(OP, "dout", dout.len(), shape.heads * d)?;
    let mut delta = vec![T::zero(); shape.heads * tokens];
    for t in 0..tokens {
        for h in 0..shape.heads {
            let off = (t * shape.heads + h) * d;
            delta[h * tokens + t] = (0..d).map(|e| dout[off + e] * out[off + e]).sum();
        }
    }
    Ok(delta)
}

/// The inputs of [`backward`] that every span reads.
pub struct Grads<'a, T> {
    /// Gradient of the attention output, `[q_tokens, heads, head_dim]`.
    pub dout: &'a [T],
    /// Queries.
    pub q: &'a [T],
    /// Keys of the key buffer.
    pub k: &'a [T],
    /// Values of the key buffer.
    pub v: &'a [T],
    /// Final log-sum-exp of every query row, `[heads, q_tokens]`.
    pub lse: &'a [T],
    /// [`delta`] of every query row.
    pub delta: &'a [T],
}

/// Adds every span's share of the gradients to `dq` (query buffer) and `dk`, `dv` (key buffer).
pub fn backward<T: Real>(
    x: &Grads<'_, T>,
    spans: &[Span],
    shape: AttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    const OP: &str = "attention_spans_backward";
    shape.check_heads(OP)?;
    let d = shape.head_dim;
    let q_tokens = tokens_of(OP, "q", x.q.len(), shape.heads * d)?;
    let k_tokens = tokens_of(OP, "k", x.k.len(), shape.kv_heads * d)?;
    check_len(OP, "v", x.k.len(), x.v.len())?;
    check_len(OP, "dout", x.q.len(), x.dout.len())?;
    check_len(OP, "lse", shape.heads * q_tokens, x.lse.len())?;
    check_len(OP, "delta", shape.heads * q_tokens, x.delta.len())?;
    check_len(OP, "dq", x.q.len(), dq.len())?;
    check_len(OP, "dk", x.k.len(), dk.len())?;
    check_len(OP, "dv", x.k.len(), dv.len())?;
    check_spans(OP, spans, q_tokens, k_tokens)?;
    let tasks: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .filter(|(_, s)| s.visible())
        .flat_map(|(i, _)| (0..shape.kv_heads).map(move |g| (i, g)))
        .collect();
    let parts: Vec<Result<SpanGrads<T>>> = tasks
        .par_iter()
        .map(|&(s, g)| backward_task(x, &spans[s], g, q_tokens, shape, scale))
        .collect();
    let rep = shape.heads / shape.kv_heads;
    for (&(s, g), part) in tasks.iter().zip(parts) {
        let p = part?;
        let span = &spans[s];
        for j in 0..span.k_len {
            let kv = ((span.k_start + j) * shape.kv_heads + g) * d;
            for e in 0..d {
                dk[kv + e] += p.dk[j * d + e];
                dv[kv + e] += p.dv[j * d + e];
            }
        }
        for i in 0..span.q_len {
            for hh in 0..rep {
                let qo = ((span.q_start + i) * shape.heads + g * rep + hh) * d;
                let src = (hh * span.q_len + i) * d;
                for e in 0..d {
                    dq[qo + e] += p.dq[src + e];
                }
            }
        }
    }
    Ok(())
}

fn mat<T>(data: &[T], offset: usize, rs: usize, cs: usize) -> MatRef<'_, T> {
    MatRef {
        data,
        offset,
        rs,
        cs,
    }
}

struct SpanGrads<T> {
    /// `[rep, q_len, d]` for the query heads of the group.
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

fn backward_task<T: Real>(
    x: &Grads<'_, T>,
    span: &Span,
    g: usize,
    q_tokens: usize,
    shape: AttnShape,
    scale: T,
) -> Result<SpanGrads<T>> {
    let d = shape.head_dim;
    let rep = shape.heads / shape.kv_heads;
    let (qrs, krs) = (shape.heads * d, shape.kv_heads * d);
    let (len, klen) = (span.q_len, span.k_len);
    let mut dq = vec![T::zero(); rep * len * d];
    let mut dk = vec![T::zero(); klen * d];
    let mut dv = vec![T::zero(); klen * d];
    let mut p = vec![T::zero(); Q_BLOCK * BLOCK];
    let mut ds = vec![T::zero(); Q_BLOCK * BLOCK];
    let mut visible = [0; Q_BLOCK];
    for j0 in (0..klen).step_by(BLOCK) {
        let bc = BLOCK.min(klen - j0);
        let kj = (span.k_start + j0) * krs + g * d;
        // Only rows from `first` on see this key block.
        let first = span.first_row_seeing(j0);
        for hh in 0..rep {
            let h = g * rep + hh;
            for i0 in (first..len).step_by(Q_BLOCK) {
                let rows = Q_BLOCK.min(len - i0);
                let qi = (span.q_start + i0) * qrs + h * d;
                // P = exp(scale·Q Kᵀ − lse), masked.
                matmul(
                    rows,
                    bc,
                    d,
                    MatMut {
                        data: &mut p,
                        offset: 0,
                        rs: bc,
                        cs: 1,
                    },
                    mat(x.q, qi, qrs, 1),
                    mat(x.k, kj, 1, krs),
                    scale,
                    T::zero(),
                    1,
                )?;
                for (r, v) in visible[..rows].iter_mut().enumerate() {
                    *v = span.visible_in(i0 + r, j0, bc);
                }
                let lse = &x.lse[h * q_tokens + span.q_start + i0..][..rows];
                T::softmax_probs(&mut p, bc, &visible[..rows], lse);
                // dV_j += Pᵀ dO_i
                matmul(
                    bc,
                    d,
                    rows,
                    MatMut {
                        data: &mut dv,
                        offset: j0 * d,
                        rs: d,
                        cs: 1,
                    },
                    mat(&p, 0, 1, bc),
                    mat(x.dout, qi, qrs, 1),
                    T::one(),
                    T::one(),
                    1,
                )?;
                // dP = dO_i V_jᵀ, then dS = P ∘ (dP − delta).
                matmul(
                    rows,
                    bc,
                    d,
                    MatMut {
                        data: &mut ds,
                        offset: 0,
                        rs: bc,
                        cs: 1,
                    },
                    mat(x.dout, qi, qrs, 1),
                    mat(x.v, kj, 1, krs),
                    T::one(),
                    T::zero(),
                    1,
                )?;
                let dl = &x.delta[h * q_tokens + span.q_start + i0..][..rows];
                T::softmax_grad(&mut ds, &p, bc, dl);
                // dQ_i += scale · dS K_j ; dK_j += scale · dSᵀ Q_i
                matmul(
                    rows,
                    d,
                    bc,
                    MatMut {
                        data: &mut dq,
                        offset: (hh * len + i0) * d,
                        rs: d,
                        cs: 1,
                    },
                    mat(&ds, 0, bc, 1),
                    mat(x.k, kj, krs, 1),
                    scale,
                    T::one(),
                    1,
                )?;
                matmul(
                    bc,
                    d,
                    rows,
                    MatMut {
                        data: &mut dk,
                        offset: j0 * d,
                        rs: d,
                        cs: 1,
                    },
                    mat(&ds, 0, 1, bc),
                    mat(x.q, qi, qrs, 1),
                    scale,
                    T::one(),
                    1,
                )?;
            }
        }
    }
    Ok(SpanGrads { dq, dk, dv })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention;

    fn rand(n: usize, seed: u64) -> Vec<f64> {
        crate::conformance::xorshift(seed)
            .take(n)
            .map(|x| (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
            .collect()
    }

    /// One sequence cut into uneven pieces, every (query piece, key piece) pair a span taken in
    /// a scrambled order, equals the whole-sequence kernel: forward and backward.
    #[test]
    fn pieces_in_any_order_make_the_whole_sequence() {
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let len = 340;
        let (qn, kn) = (len * shape.heads * 8, len * shape.kv_heads * 8);
        let (q, k, v, dout) = (rand(qn, 1), rand(kn, 2), rand(kn, 3), rand(qn, 4));
        let scale = 0.3;
        let cu = [0, len];
        let (mut o, mut l) = (vec![0.0; qn], vec![0.0; shape.heads * len]);
        attention::forward(&q, &k, &v, &cu, shape, scale, &mut o, &mut l).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
        attention::backward(
            &dout, &q, &k, &v, &o, &l, &cu, shape, scale, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();

        // Pieces shorter and longer than the kernel's query chunk (256 rows).
        let cuts = [0, 7, 70, 71, 339, 340];
        let mut spans = Vec::new();
        for a in cuts.windows(2) {
            for b in cuts.windows(2).rev() {
                let s = Span {
                    q_start: a[0],
                    q_len: a[1] - a[0],
                    q_pos: a[0],
                    k_start: b[0],
                    k_len: b[1] - b[0],
                    k_pos: b[0],
                };
                spans.push(s);
            }
        }
        spans.rotate_left(5);
        let (mut o2, mut l2) = (vec![0.0; qn], vec![f64::NEG_INFINITY; shape.heads * len]);
        forward(&q, &k, &v, &spans, shape, scale, &mut o2, &mut l2).unwrap();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&o, &o2) && close(&l, &l2));
        let dl = delta(&dout, &o2, shape).unwrap();
        let (mut dq2, mut dk2, mut dv2) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
        let x = Grads {
            dout: &dout,
            q: &q,
            k: &k,
            v: &v,
            lse: &l2,
            delta: &dl,
        };
        backward(&x, &spans, shape, scale, &mut dq2, &mut dk2, &mut dv2).unwrap();
        assert!(close(&dq, &dq2) && close(&dk, &dk2) && close(&dv, &dv2));
        // The spans above the diagonal add nothing; counting pairs sees the causal triangle.
        let pairs: usize = spans.iter().map(Span::pairs).sum();
        assert_eq!(pairs, len * (len + 1) / 2);
    }

    #[test]
    fn spans_past_their_buffers_are_refused() {
        let shape = AttnShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
        };
        let s = Span {
            q_start: 0,
            q_len: 3,
            q_pos: 0,
            k_start: 0,
            k_len: 3,
            k_pos: 0,
        };
        let (q, mut o, mut l) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 2]);
        let e = forward(&q, &q, &q, &[s], shape, 1.0, &mut o, &mut l).unwrap_err();
        assert!(e.to_string().contains("reaches past"), "{e}");
    }
}
