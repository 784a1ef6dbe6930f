//! A sparse all-reduce whose bytes per member do not grow with the members: the balanced
//! exchange of Ok-Topk (Li & Hoefler, PPoPP 2022). The index space is cut into one region per
//! member; each member sends its selected (index, value) pairs to the owners of their regions
//! (a sparse reduce-scatter: one all-to-all), each owner adds what it received and keeps the
//! largest of its region's sums, as many as its share of the budget, and every member
//! all-gathers the kept sums. A member sends at most `k` pairs and receives about `k` back, where
//! gathering every member's pairs (`codec::all_reduce_top_k`) receives `(N − 1)·k`.
//!
//! What is selected is the global top of the summed selections, so a value a member sent may
//! not survive its owner's selection: the member's residual keeps it (error feedback), as
//! Ok-Topk's do. The regions are equal and fixed; Ok-Topk re-balances their boundaries from time
//! to time by where the large values fall, which this does not.
//!
//! ```
//! use comm::{codec::Codec, sparse, Communicator, ThreadComm};
//!
//! let out = ThreadComm::run(4, |c| -> comm::Result<Vec<f32>> {
//!     let r = c.rank().0 as f32;
//!     // Member r's largest value is at 10·r; position 1 is large on every member.
//!     let mut g: Vec<f32> = (0..40).map(|i| if i == 10 * r as usize { 5.0 } else { 0.01 * i as f32 }).collect();
//!     g[1] = 3.0;
//!     let mut residual = vec![0.0; 40];
//!     sparse::all_reduce_top_k_balanced(&c, &mut g, Codec::TopK(0.05), Some(&mut residual))?;
//!     Ok(g)
//! })?;
//! // Everyone ends with the same sparse sum; position 1 (3.0 on all four) is in it.
//! assert!(out.iter().all(|g| g == &out[0]));
//! assert_eq!(out[0][1], 12.0);
//! # Ok::<(), comm::CommError>(())
//! ```

use crate::codec::{add_residual, top_k, Codec};
use crate::communicator::offsets;
use crate::{chunk_counts, words, CommError, Communicator, Result};

/// The balanced sparse all-reduce of `buf` keeping `codec.keep(len)` values: `residual` (added
/// first) then holds everything this member's share of the result does not carry.
pub fn all_reduce_top_k_balanced(
    c: &dyn Communicator,
    buf: &mut [f32],
    codec: Codec,
    residual: Option<&mut [f32]>,
) -> Result<()> {
    let mut residual = residual;
    add_residual(buf, residual.as_deref_mut())?;
    let k = codec.keep(buf.len());
    balanced_top_k(c, buf, k, residual).map(|_| ())
}

/// [`all_reduce_top_k_balanced`] of `buf` as it is (any residual already added), keeping `k`
/// values: `residual` is overwritten with `buf`'s values but those this member sent that the
/// result carries; returns those positions.
pub(crate) fn balanced_top_k(
    c: &dyn Communicator,
    buf: &mut [f32],
    k: usize,
    residual: Option<&mut [f32]>,
) -> Result<Vec<u32>> {
    let (n, len) = (c.size(), buf.len());
    if let Some(r) = &residual {
        if r.len() != len {
            return Err(CommError::Length {
                op: "balanced top-k all_reduce",
                what: "residual",
                expected: len,
                got: r.len(),
            });
        }
    }
    let regions = chunk_counts(len, n);
    // n + 1 bounds: region j is starts[j]..starts[j + 1].
    let starts = offsets(&regions);
    let owner = |i: usize| starts[..n].partition_point(|&s| s <= i) - 1;
    // This member's selection, in index order, cut by region owner: [indices…, values…] each.
    let mut mine = top_k(buf, k);
    mine.sort_unstable();
    let mut per_owner = vec![0usize; n];
    for &i in &mine {
        per_owner[owner(i as usize)] += 1;
    }
    let mut send = Vec::with_capacity(2 * mine.len());
    let mut at = 0;
    for &m in &per_owner {
        let part = &mine[at..at + m];
        send.extend(part.iter().map(|&i| f32::from_bits(i)));
        send.extend(part.iter().map(|&i| buf[i as usize]));
        at += m;
    }
    // How many pairs each owner receives from each member.
    let counts_out: Vec<f32> = per_owner
        .iter()
        .flat_map(|&m| words::encode(&[m as u64]))
        .collect();
    let mut counts_in = vec![0.0; 2 * n];
    c.all_to_all(&counts_out, &vec![2; n], &mut counts_in, &vec![2; n])?;
    let from: Vec<usize> = words::decode(&counts_in)?
        .into_iter()
        .map(|m| m as usize)
        .collect();
    let send_counts: Vec<usize> = per_owner.iter().map(|&m| 2 * m).collect();
    let recv_counts: Vec<usize> = from.iter().map(|&m| 2 * m).collect();
    let mut got = vec![0.0; recv_counts.iter().sum()];
    c.all_to_all(&send, &send_counts, &mut got, &recv_counts)?;
    // This member's region: the members' pairs added in rank order.
    let me = c.rank().0;
    let (lo, width) = (starts[me], regions[me]);
    let mut sum = vec![0.0f32; width];
    let mut touched = vec![false; width];
    let mut at = 0;
    for &m in &from {
        let (ix, vals) = got[at..at + 2 * m].split_at(m);
        for (&i, &v) in ix.iter().zip(vals) {
            let i = i.to_bits() as usize;
            let slot = i
                .checked_sub(lo)
                .filter(|&j| j < width)
                .ok_or(CommError::Length {
                    op: "balanced top-k all_reduce",
                    what: "index",
                    expected: width,
                    got: i,
                })?;
            sum[slot] += v;
            touched[slot] = true;
        }
        at += 2 * m;
    }
    // The largest of the region's sums, its share of the budget.
    let share = (k * width).div_ceil(len.max(1));
    let nonzero: Vec<usize> = (0..width).filter(|&j| touched[j]).collect();
    let dense: Vec<f32> = nonzero.iter().map(|&j| sum[j]).collect();
    let mut keep: Vec<u32> = top_k(&dense, share.min(dense.len()))
        .into_iter()
        .map(|x| (nonzero[x as usize] + lo) as u32)
        .collect();
    keep.sort_unstable();
    let mut payload: Vec<f32> = keep.iter().map(|&i| f32::from_bits(i)).collect();
    payload.extend(keep.iter().map(|&i| sum[i as usize - lo]));
    // Every region's kept sums, to every member.
    let sizes: Vec<usize> = words::all_gather(c, payload.len() as u64)?
        .into_iter()
        .map(|s| s as usize)
        .collect();
    let mut all = vec![0.0; sizes.iter().sum()];
    c.all_gather(&payload, &mut all, &sizes)?;
    let before: Vec<f32> = buf.to_vec();
    buf.fill(0.0);
    let mut kept = vec![false; len];
    let mut at = 0;
    for &s in &sizes {
        let (ix, vals) = all[at..at + s].split_at(s / 2);
        for (&i, &v) in ix.iter().zip(vals) {
            let i = i.to_bits() as usize;
            let slot = buf.get_mut(i).ok_or(CommError::Length {
                op: "balanced top-k all_reduce",
                what: "index",
                expected: len,
                got: i,
            })?;
            *slot = v;
            kept[i] = true;
        }
        at += s;
    }
    // What this member sent and the result carries leaves its residual; everything else stays.
    let carried: Vec<u32> = mine.into_iter().filter(|&i| kept[i as usize]).collect();
    if let Some(r) = residual {
        r.copy_from_slice(&before);
        for &i in &carried {
            r[i as usize] = 0.0;
        }
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadComm;

    fn grad(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let big = if (i * 7 + rank).is_multiple_of(13) {
                    2.0
                } else {
                    0.1
                };
                big * (((i * 37 + rank * 11) % 101) as f32 * 0.013 - 0.6)
            })
            .collect()
    }

    /// The result is the top of the sums of the members' selections, region by region, and
    /// what each member holds back plus what arrived adds up to the exact sum.
    #[test]
    fn it_keeps_the_largest_sums_and_the_residuals_hold_the_rest() {
        let (n, len, f) = (4, 203, 0.1);
        let out = ThreadComm::run(n, move |c| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut g = grad(c.rank().0, len);
            let mut r = vec![0.0; len];
            all_reduce_top_k_balanced(&c, &mut g, Codec::TopK(f), Some(&mut r))?;
            Ok((g, r))
        })
        .unwrap();
        let k = Codec::TopK(f).keep(len);
        // By hand: each member's top k, their sums, each region's top share.
        let mut sums = vec![0.0f32; len];
        let mut sent = vec![false; len];
        for rank in 0..n {
            let g = grad(rank, len);
            for i in top_k(&g, k) {
                sums[i as usize] += g[i as usize];
                sent[i as usize] = true;
            }
        }
        let regions = chunk_counts(len, n);
        let mut want = vec![0.0f32; len];
        let mut lo = 0;
        for &w in &regions {
            let mut cand: Vec<usize> = (lo..lo + w).filter(|&i| sent[i]).collect();
            cand.sort_by(|&a, &b| sums[b].abs().total_cmp(&sums[a].abs()).then(a.cmp(&b)));
            for &i in cand.iter().take((k * w).div_ceil(len)) {
                want[i] = sums[i];
            }
            lo += w;
        }
        for (g, _) in &out {
            assert_eq!(g, &out[0].0, "the members disagree");
        }
        for (i, (got, want)) in out[0].0.iter().zip(&want).enumerate() {
            assert!((got - want).abs() < 1e-6, "at {i}: {got} vs {want}");
        }
        // Conservation: the result plus every residual is the exact sum.
        for i in 0..len {
            let exact: f32 = (0..n).map(|r| grad(r, len)[i]).sum();
            let held: f32 = out.iter().map(|(_, r)| r[i]).sum();
            assert!((out[0].0[i] + held - exact).abs() < 1e-5, "at {i}");
        }
    }

    /// A member sends at most its k pairs and about k more in the all-gather, whatever the
    /// members: at 2, 4 and 8 members the mean bytes a member sends stay within 2.5·k pairs
    /// (plus the counts), where gathering every member's pairs grows as (N − 1)·k.
    #[test]
    fn its_bytes_per_member_do_not_grow_with_the_members() {
        use crate::wire::{Wire, WireMeter};
        use std::sync::Arc;
        let (len, f) = (4096, 0.01);
        let k = Codec::TopK(f).keep(len);
        let mean_bytes = |n: usize, balanced: bool| -> f64 {
            let meter = Arc::new(WireMeter::default());
            let m = meter.clone();
            ThreadComm::run(n, move |c| -> Result<()> {
                let w = Wire::new(Box::new(c), Arc::new(vec![0; n]), m.clone());
                let mut g = grad(w.rank().0, len);
                if balanced {
                    all_reduce_top_k_balanced(&w, &mut g, Codec::TopK(f), None)
                } else {
                    crate::codec::all_reduce_top_k(&w, &mut g, Codec::TopK(f), None)
                }
            })
            .unwrap();
            meter.read().total() as f64 / n as f64
        };
        let pair = 8.0;
        for n in [2usize, 4, 8] {
            let (balanced, gathered) = (mean_bytes(n, true), mean_bytes(n, false));
            assert!(
                balanced <= 2.5 * k as f64 * pair + 16.0 * n as f64,
                "{n} members: {balanced} bytes a member, k = {k}"
            );
            assert!(
                (gathered - (n - 1) as f64 * k as f64 * pair).abs() < 1.0,
                "{n} members: the gather sent {gathered}"
            );
            if n == 8 {
                assert!(balanced < 0.4 * gathered, "{balanced} vs {gathered}");
            }
        }
    }
}
