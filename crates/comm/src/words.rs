//! Integers and `f64` over a communicator that moves `f32`: every `u64` (or `f64`) travels as its
//! exact bits, two `f32` words each (a communicator copies values, it never computes on a
//! point-to-point message or an all-gather), and reductions of them are done on the host after
//! an all-gather, never in `f32`.
//!
//! ```
//! use comm::{words, Communicator, ThreadComm, CommError};
//!
//! let max = ThreadComm::run(3, |c| -> Result<u64, CommError> {
//!     words::all_max(&c, (1u64 << 40) + c.rank().0 as u64)
//! })?;
//! assert_eq!(max, vec![(1u64 << 40) + 2; 3]);
//! let w = words::encode(&[u64::MAX, 7]);
//! assert_eq!(words::decode(&w)?, vec![u64::MAX, 7]);
//! # Ok::<(), CommError>(())
//! ```

use crate::communicator::{Communicator, Rank};
use crate::error::{CommError, Result};

/// `values` as two `f32` words each (the high and the low 32 bits, bit for bit).
pub fn encode(values: &[u64]) -> Vec<f32> {
    values
        .iter()
        .flat_map(|&v| [f32::from_bits((v >> 32) as u32), f32::from_bits(v as u32)])
        .collect()
}

/// The inverse of [`encode`]; an odd number of words is an error.
pub fn decode(words: &[f32]) -> Result<Vec<u64>> {
    if !words.len().is_multiple_of(2) {
        return Err(CommError::InvalidGroup(format!(
            "{} words cannot hold whole 64-bit integers",
            words.len()
        )));
    }
    Ok(words
        .chunks(2)
        .map(|w| (u64::from(w[0].to_bits()) << 32) | u64::from(w[1].to_bits()))
        .collect())
}

/// `t`'s bits as two `f32` words.
pub fn encode_f64(t: f64) -> [f32; 2] {
    let v = t.to_bits();
    [f32::from_bits((v >> 32) as u32), f32::from_bits(v as u32)]
}

/// The `f64` of [`encode_f64`]'s words (the first two of `w`; 0 if there are fewer).
pub fn decode_f64(w: &[f32]) -> f64 {
    match w {
        [hi, lo, ..] => f64::from_bits((u64::from(hi.to_bits()) << 32) | u64::from(lo.to_bits())),
        _ => 0.0,
    }
}

/// Every member's `value`, in rank order, bit for bit.
pub fn all_gather_f64(c: &dyn Communicator, value: f64) -> Result<Vec<f64>> {
    let n = c.size();
    let mut all = vec![0.0f32; 2 * n];
    c.all_gather(&encode_f64(value), &mut all, &vec![2; n])?;
    Ok(all.chunks(2).map(decode_f64).collect())
}

/// Sends `values` to `peer` with `tag`.
pub fn send(c: &dyn Communicator, values: &[u64], peer: Rank, tag: u32) -> Result<()> {
    c.send(&encode(values), peer, tag)
}

/// Receives exactly `n` integers from `peer` with `tag`.
pub fn recv(c: &dyn Communicator, n: usize, peer: Rank, tag: u32) -> Result<Vec<u64>> {
    let mut buf = vec![0.0f32; 2 * n];
    c.recv(&mut buf, peer, tag)?;
    decode(&buf)
}

/// Every member's `value`, in rank order.
pub fn all_gather(c: &dyn Communicator, value: u64) -> Result<Vec<u64>> {
    let n = c.size();
    let mut all = vec![0.0f32; 2 * n];
    c.all_gather(&encode(&[value]), &mut all, &vec![2; n])?;
    decode(&all)
}

/// The sums over the members of each of `values` (every member passes as many), exactly
/// (wrapping on overflow).
pub fn all_sum(c: &dyn Communicator, values: &[u64]) -> Result<Vec<u64>> {
    let n = c.size();
    let k = values.len();
    let mut all = vec![0.0f32; 2 * k * n];
    c.all_gather(&encode(values), &mut all, &vec![2 * k; n])?;
    let every = decode(&all)?;
    Ok((0..k)
        .map(|i| {
            (0..n)
                .map(|r| every[r * k + i])
                .fold(0u64, u64::wrapping_add)
        })
        .collect())
}

/// The sum of every member's `value`, added in rank order on every member (so every member
/// gets the same bits).
pub fn all_sum_f64(c: &dyn Communicator, value: f64) -> Result<f64> {
    Ok(all_gather_f64(c, value)?.into_iter().sum())
}

/// The largest of every member's `value`, exactly.
pub fn all_max(c: &dyn Communicator, value: u64) -> Result<u64> {
    Ok(all_gather(c, value)?.into_iter().max().unwrap_or(value))
}
