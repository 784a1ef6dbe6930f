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
    log_sum_exp(logits, vocab, lse);
    masked_total(logits, vocab, targets, mask, lse)
}

/// Every row's log-sum-exp (`lse.len()` rows of `vocab` logits; lengths checked by the
/// caller). Rows are independent, so any split of them gives the same values.
pub fn log_sum_exp<T: Real>(logits: &[T], vocab: usize, lse: &mut [T]) {
    let mut tmp = vec![T::zero(); vocab];
    for (row, l) in logits.chunks_exact(vocab).zip(lse.iter_mut()) {
        let max = T::max_of(row);
        tmp.copy_from_slice(row);
        *l = max + T::exp_sum(&mut tmp, max).ln();
    }
}

/// `Σ lse − logits[row, target]` over the masked rows, in row order, from [`log_sum_exp`]'s
/// values (lengths checked by the caller).
pub fn masked_total<T: Real>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    mask: &[bool],
    lse: &[T],
) -> Result<T> {
    let mut total = T::zero();
    for (r, ((&t, &m), &l)) in targets.iter().zip(mask).zip(lse).enumerate() {
        if m {
            let t = t as usize;
            if t >= vocab {
                return Err(invalid(
                    "cross_entropy",
                    format!("row {r}: target {t} is outside the vocabulary of {vocab}"),
                ));
            }
            total += l - logits[r * vocab + t];
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
