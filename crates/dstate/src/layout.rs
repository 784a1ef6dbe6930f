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

/// Calls `f(full_offset, local_offset, run)` for every maximal contiguous run of `region`
/// inside a row-major tensor of `shape`, where the local buffer is the region's own row-major
/// layout. Trailing dims the region spans whole merge into one run, so a region split on dim 0
/// only (a row block) is a single run.
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
    // `k`: the outermost dim of the run; every dim after it is spanned whole.
    let mut k = shape.len() - 1;
    while k > 0 && region.ranges[k].start == 0 && region.ranges[k].end == shape[k] {
        k -= 1;
    }
    let run = rshape[k] * st[k];
    let outer: usize = rshape[..k].iter().product();
    let mut idx = vec![0usize; k];
    for row in 0..outer {
        let full: usize = (0..k)
            .map(|d| (region.ranges[d].start + idx[d]) * st[d])
            .sum::<usize>()
            + region.ranges[k].start * st[k];
        f(full, row * run, run);
        for d in (0..k).rev() {
            idx[d] += 1;
            if idx[d] < rshape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// How many contiguous runs `region` occupies in a row-major tensor of `shape` (1 for a block
/// of whole rows; what packing it into a message costs in separate copies).
pub fn runs(shape: &[usize], region: &Region) -> usize {
    let mut n = 0;
    for_each_run(shape, region, |_, _, _| n += 1);
    n
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
    copy_region_with(src, src_shape, from, dst, dst_shape, to, |d, s| {
        d.copy_from_slice(s)
    })
}

/// [`copy_region`] with the copy of each contiguous run done by `copy(dst run, src run)` (equal
/// lengths): a caller may stream large copies past the cache.
pub fn copy_region_with<T: Copy>(
    src: &[T],
    src_shape: &[usize],
    from: &Region,
    dst: &mut [T],
    dst_shape: &[usize],
    to: &Region,
    mut copy: impl FnMut(&mut [T], &[T]),
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
    // Both walks cover the region's own row-major order; their runs may merge differently
    // (a region whole along trailing dims of one tensor but not of the other), so each
    // destination run takes the source runs it overlaps.
    let mut runs = Vec::new();
    for_each_run(src_shape, from, |f, l, n| runs.push((f, l, n)));
    let mut k = 0;
    for_each_run(dst_shape, to, |f, l, n| {
        let mut done = 0;
        while done < n {
            let (s, sl, m) = runs[k];
            let at = l + done - sl; // position inside source run k
            let take = (m - at).min(n - done);
            copy(
                &mut dst[f + done..f + done + take],
                &src[s + at..s + at + take],
            );
            done += take;
            if at + take == m {
                k += 1;
            }
        }
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

    #[test]
    fn whole_trailing_dims_merge_into_one_run() {
        let r = |ranges: Vec<std::ops::Range<usize>>| Region { ranges };
        assert_eq!(runs(&[6, 4], &r(vec![2..5, 0..4])), 1);
        assert_eq!(runs(&[6, 4], &r(vec![2..5, 0..2])), 3);
        assert_eq!(runs(&[2, 3, 4], &r(vec![0..2, 1..3, 0..4])), 2);
        assert_eq!(runs(&[2, 3, 4], &r(vec![0..2, 0..3, 0..4])), 1);
        assert_eq!(runs(&[2, 3, 4], &r(vec![0..2, 0..3, 1..2])), 6);
    }

    #[test]
    fn copy_between_tensors_whose_runs_merge_differently() {
        // Rows 1..3 of a [4, 3] tensor (one run) into columns 2..5 of a [2, 6] tensor (two
        // runs), and back, against an element-by-element copy.
        let src: Vec<i32> = (0..12).collect();
        let from = Region {
            ranges: vec![1..3, 0..3],
        };
        let to = Region {
            ranges: vec![0..2, 2..5],
        };
        let mut dst = vec![-1; 12];
        copy_region(&src, &[4, 3], &from, &mut dst, &[2, 6], &to).unwrap();
        assert_eq!(dst, vec![-1, -1, 3, 4, 5, -1, -1, -1, 6, 7, 8, -1]);
        let mut back = vec![0; 12];
        copy_region(&dst, &[2, 6], &to, &mut back, &[4, 3], &from).unwrap();
        assert_eq!(&back[3..9], &src[3..9]);
        assert!(back[..3].iter().chain(&back[9..]).all(|&v| v == 0));
    }
}
