//! Causal attention with grouped-query heads over packed variable-length sequences, computed
//! blockwise with an online softmax (FlashAttention-2's algorithm): no T×T matrix is ever
//! materialised, only `BLOCK×BLOCK` tiles. Work is spread over (sequence, head) pairs with rayon
//! (the tiles are [`super::attention_spans`]' with one span per sequence).
//!
//! Layouts: `q`, `out`, `dq` are `[tokens, heads, head_dim]`; `k`, `v`, `dk`, `dv` are
//! `[tokens, kv_heads, head_dim]`; `lse` is `[heads, tokens]`. `cu_seqlens` holds the cumulative
//! sequence lengths `0 = c0 ≤ c1 ≤ … ≤ cS = tokens`; token `t` of sequence `s` attends to tokens
//! `c_s ..= t` only. Query head `h` reads kv head `h / (heads / kv_heads)`.

pub use super::attention_shape::{AttnShape, BLOCK};
use super::attention_spans::{self, Grads, Span};
use crate::error::{check_len, Result};
use crate::real::Real;

/// One span per sequence: every query row of it against every key row of it.
fn whole_sequences(cu_seqlens: &[usize]) -> Vec<Span> {
    cu_seqlens
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| Span {
            q_start: w[0],
            q_len: w[1] - w[0],
            q_pos: 0,
            k_start: w[0],
            k_len: w[1] - w[0],
            k_pos: 0,
        })
        .collect()
}

/// Forward: writes `out` and the log-sum-exp of every (head, token) row of scores. The tiles
/// are [`attention_spans`]' with one span per sequence, so that context parallelism's pieces
/// and the whole sequence share one kernel.
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
    out.fill(T::zero());
    lse.fill(T::neg_infinity());
    let spans = whole_sequences(cu_seqlens);
    attention_spans::forward(q, k, v, &spans, shape, scale, out, lse)
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
    dq.fill(T::zero());
    dk.fill(T::zero());
    dv.fill(T::zero());
    let delta = attention_spans::delta(dout, out, shape)?;
    let x = Grads {
        dout,
        q,
        k,
        v,
        lse,
        delta: &delta,
    };
    attention_spans::backward(&x, &whole_sequences(cu_seqlens), shape, scale, dq, dk, dv)
}
