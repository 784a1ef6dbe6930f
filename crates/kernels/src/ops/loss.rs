//! Softmax cross-entropy over the vocabulary with a mask of predicted positions.

use crate::error::{check_len, invalid, Result};
use crate::real::Real;

/// Sum over masked rows of `lse(row) − logits[row, target]`; writes every row's log-sum-exp
/// (kept for backward). `logits` is rows×vocab; a masked row's target must be `< vocab`.
pub fn forward<T: Real>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    mask: &[bool],
    lse: &mut [T],
) -> Result<T> {
    let rows = targets.len();
    check_len("cross_entropy", "logits", rows * vocab, logits.len())?;
    check_len("cross_entropy", "mask", rows, mask.len())?;
    check_len("cross_entropy", "lse", rows, lse.len())?;
    let mut total = T::zero();
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let sum: T = row.iter().map(|&v| (v - max).exp()).sum();
        lse[r] = max + sum.ln();
        if mask[r] {
            let t = targets[r] as usize;
            if t >= vocab {
                return Err(invalid(
                    "cross_entropy",
                    format!("row {r}: target {t} is outside the vocabulary of {vocab}"),
                ));
            }
            total += lse[r] - row[t];
        }
    }
    Ok(total)
}

/// `dlogits = scale · (softmax − onehot(target))` on masked rows, 0 elsewhere.
pub fn backward<T: Real>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    mask: &[bool],
    lse: &[T],
    scale: T,
    dlogits: &mut [T],
) -> Result<()> {
    let rows = targets.len();
    check_len(
        "cross_entropy_backward",
        "logits",
        rows * vocab,
        logits.len(),
    )?;
    check_len(
        "cross_entropy_backward",
        "dlogits",
        rows * vocab,
        dlogits.len(),
    )?;
    check_len("cross_entropy_backward", "mask", rows, mask.len())?;
    check_len("cross_entropy_backward", "lse", rows, lse.len())?;
    for r in 0..rows {
        let d = &mut dlogits[r * vocab..(r + 1) * vocab];
        if !mask[r] {
            d.fill(T::zero());
            continue;
        }
        for (o, &v) in d.iter_mut().zip(&logits[r * vocab..(r + 1) * vocab]) {
            *o = v - lse[r];
        }
        T::exp_in_place(d);
        for o in d.iter_mut() {
            *o *= scale;
        }
        let t = targets[r] as usize;
        if t >= vocab {
            return Err(invalid(
                "cross_entropy_backward",
                format!("row {r}: target {t} is outside the vocabulary of {vocab}"),
            ));
        }
        d[t] -= scale;
    }
    Ok(())
}
