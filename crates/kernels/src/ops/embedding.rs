//! Token embedding lookup and its scatter-add backward, vocab-parallel ready.

use crate::error::{check_len, Result};
use crate::real::Real;

/// `out[t, :] = weight[ids[t] - vocab_start, :]` for ids inside this shard's rows
/// `vocab_start .. vocab_start + rows`, zeros for the others (a vocab-parallel shard; the full
/// table is `vocab_start = 0`). `weight` is rows×dim, `out` is ids.len()×dim.
pub fn forward<T: Real>(
    weight: &[T],
    dim: usize,
    vocab_start: usize,
    ids: &[u32],
    out: &mut [T],
) -> Result<()> {
    check_len("embedding", "out", ids.len() * dim, out.len())?;
    let rows = weight.len().checked_div(dim).unwrap_or(0);
    check_len("embedding", "weight", rows * dim, weight.len())?;
    for (t, &id) in ids.iter().enumerate() {
        let dst = &mut out[t * dim..(t + 1) * dim];
        let id = id as usize;
        if id >= vocab_start && id < vocab_start + rows {
            let r = id - vocab_start;
            dst.copy_from_slice(&weight[r * dim..(r + 1) * dim]);
        } else {
            dst.fill(T::zero());
        }
    }
    Ok(())
}

/// `grad_weight[ids[t] - vocab_start, :] += grad_out[t, :]` for ids inside the shard.
pub fn backward<T: Real>(
    grad_out: &[T],
    dim: usize,
    vocab_start: usize,
    ids: &[u32],
    grad_weight: &mut [T],
) -> Result<()> {
    check_len(
        "embedding_backward",
        "grad_out",
        ids.len() * dim,
        grad_out.len(),
    )?;
    let rows = grad_weight.len().checked_div(dim).unwrap_or(0);
    check_len(
        "embedding_backward",
        "grad_weight",
        rows * dim,
        grad_weight.len(),
    )?;
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab_start && id < vocab_start + rows {
            let r = id - vocab_start;
            for (g, &d) in grad_weight[r * dim..(r + 1) * dim]
                .iter_mut()
                .zip(&grad_out[t * dim..(t + 1) * dim])
            {
                *g += d;
            }
        }
    }
    Ok(())
}
