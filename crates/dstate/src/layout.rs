//! Moving values between a full row-major tensor and the local pieces of a DState.

use std::ops::AddAssign;

use crate::error::{DStateError, Result};
use crate::region::Region;
use crate::state::DState;

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Calls `f(full_offset, local_offset, run)` for every contiguous run of `region` inside a
/// row-major tensor of `shape`, where the local buffer is the region's own row-major layout.
fn for_each_run(shape: &[usize], region: &Region, mut f: impl FnMut(usize, usize, usize)) {
    if region.is_empty() {
        return;
    }
    if shape.is_empty() {
        f(0, 0, 1);
        return;
    }
    let st = strides(shape);
    let rshape = region.shape();
    let last = shape.len() - 1;
    let run = rshape[last];
    let outer: usize = rshape[..last].iter().product();
    let mut idx = vec![0usize; last];
    for row in 0..outer {
        let full: usize = (0..last)
            .map(|d| (region.ranges[d].start + idx[d]) * st[d])
            .sum::<usize>()
            + region.ranges[last].start;
        f(full, row * run, run);
        for d in (0..last).rev() {
            idx[d] += 1;
            if idx[d] < rshape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(DStateError::LengthMismatch {
            what: what.to_string(),
            expected,
            got,
        })
    }
}

/// Appends `region` of a row-major tensor of `shape` to `out` (row-major), without a temporary.
pub fn extract_into<T: Copy>(
    full: &[T],
    shape: &[usize],
    region: &Region,
    out: &mut Vec<T>,
) -> Result<()> {
    check_len("full tensor", shape.iter().product(), full.len())?;
    out.reserve(region.volume());
    for_each_run(shape, region, |f, _, n| {
        out.extend_from_slice(&full[f..f + n])
    });
    Ok(())
}

/// Copies `from` of the row-major `src` (of `src_shape`) into `to` of the row-major `dst` (of
/// `dst_shape`); the two regions must have the same shape.
pub fn copy_region<T: Copy>(
    src: &[T],
    src_shape: &[usize],
    from: &Region,
    dst: &mut [T],
    dst_shape: &[usize],
    to: &Region,
) -> Result<()> {
    check_len("source tensor", src_shape.iter().product(), src.len())?;
    check_len("destination tensor", dst_shape.iter().product(), dst.len())?;
    if from.shape() != to.shape() {
        return Err(crate::error::DStateError::LengthMismatch {
            what: format!(
                "copy from a region of shape {:?} into one of shape",
                from.shape()
            ),
            expected: from.volume(),
            got: to.volume(),
        });
    }
    let mut runs = Vec::new();
    for_each_run(src_shape, from, |f, _, n| runs.push((f, n)));
    let mut k = 0;
    for_each_run(dst_shape, to, |f, _, n| {
        let (s, m) = runs[k];
        debug_assert_eq!(m, n);
        dst[f..f + n].copy_from_slice(&src[s..s + n]);
        k += 1;
    });
    Ok(())
}

/// Copies `region` out of a row-major tensor of `shape` into a new row-major buffer.
pub fn extract<T: Copy>(full: &[T], shape: &[usize], region: &Region) -> Result<Vec<T>> {
    check_len("full tensor", shape.iter().product(), full.len())?;
    let mut out = Vec::with_capacity(region.volume());
    for_each_run(shape, region, |f, _, n| {
        out.extend_from_slice(&full[f..f + n])
    });
    Ok(out)
}

/// Writes the row-major `local` buffer into `region` of a row-major tensor of `shape`.
pub fn insert<T: Copy>(
    full: &mut [T],
    shape: &[usize],
    region: &Region,
    local: &[T],
) -> Result<()> {
    check_len("full tensor", shape.iter().product(), full.len())?;
    check_len("local piece", region.volume(), local.len())?;
    for_each_run(shape, region, |f, l, n| {
        full[f..f + n].copy_from_slice(&local[l..l + n])
    });
    Ok(())
}

/// The local buffers of every device index under `state`. Partial axes follow `D → P`: the
/// devices of part 0 hold the values, the others zeros.
pub fn distribute<T: Copy + Default>(
    full: &[T],
    shape: &[usize],
    state: &DState,
) -> Result<Vec<Vec<T>>> {
    (0..state.size())
        .map(|i| {
            let piece = state.piece(i, shape)?;
            if piece.part.unwrap_or(0) == 0 {
                extract(full, shape, &piece.region)
            } else {
                Ok(vec![T::default(); piece.region.volume()])
            }
        })
        .collect()
}

/// The full tensor from the local buffers of every device index: replica 0 of every part is
/// written and the parts are summed. Replicas other than 0 are not read.
pub fn assemble<T: Copy + Default + AddAssign>(
    locals: &[Vec<T>],
    shape: &[usize],
    state: &DState,
) -> Result<Vec<T>> {
    check_len("number of local pieces", state.size(), locals.len())?;
    let mut full = vec![T::default(); shape.iter().product()];
    for (i, local) in locals.iter().enumerate() {
        let piece = state.piece(i, shape)?;
        check_len("local piece", piece.region.volume(), local.len())?;
        if piece.replica != 0 {
            continue;
        }
        for_each_run(shape, &piece.region, |f, l, n| {
            for k in 0..n {
                full[f + k] += local[l + k];
            }
        });
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_insert_roundtrip() {
        let shape = [3, 4];
        let full: Vec<i32> = (0..12).collect();
        let r = Region {
            ranges: vec![1..3, 1..3],
        };
        let piece = extract(&full, &shape, &r).unwrap();
        assert_eq!(piece, vec![5, 6, 9, 10]);
        let mut back = vec![0; 12];
        insert(&mut back, &shape, &r, &piece).unwrap();
        assert_eq!(back[5], 5);
        assert_eq!(back[10], 10);
        assert_eq!(back[0], 0);
        assert!(extract(&full, &[5], &r).is_err());
    }
}
