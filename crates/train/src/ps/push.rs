//! A push's gradient slice on the wire: exact, or through a codec of the gradient-exchange
//! issue (`--grad-compression`), with the worker's error-feedback residual per slice.

use comm::codec::{self, Codec};

use super::{unword, word};
use crate::error::{Result, TrainError};

/// Values of the payload of a slice of `len` gradients under `codec`.
pub(crate) fn payload_len(codec: Codec, len: usize) -> usize {
    match codec {
        Codec::TopK(_) => 2 * codec.keep(len),
        Codec::RandK(_) => codec.keep(len),
        c => c.encoded_words(len),
    }
}

/// The seed of random-k's indices for share `share`'s slice `slice` (both ends know it).
fn seed(run_seed: u64, share: usize, slice: usize) -> u64 {
    run_seed ^ ((share as u64) << 20) ^ (slice as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Appends the payload of `x` to `out`; with a `residual`, `x` gets it added first and keeps
/// what the codec left out (error feedback).
pub(crate) fn encode(
    codec: Codec,
    x: &[f32],
    residual: Option<&mut Vec<f32>>,
    run_seed: u64,
    share: usize,
    slice: usize,
    out: &mut Vec<f32>,
) {
    let mut v = x.to_vec();
    if let Some(r) = &residual {
        v.iter_mut().zip(r.iter()).for_each(|(a, b)| *a += b);
    }
    let start = out.len();
    match codec {
        Codec::None => out.extend_from_slice(&v),
        Codec::TopK(_) => {
            let idx = codec::top_k(&v, codec.keep(v.len()));
            out.extend(idx.iter().map(|&i| word(i)));
            out.extend(idx.iter().map(|&i| v[i as usize]));
        }
        Codec::RandK(_) => {
            let idx = codec::random_k(v.len(), codec.keep(v.len()), seed(run_seed, share, slice));
            out.extend(idx.iter().map(|&i| v[i as usize]));
        }
        c => c.encode(&v, out),
    }
    if let Some(r) = residual {
        // What arrives, subtracted from what was meant.
        let mut sent = vec![0.0f32; v.len()];
        // The payload was made here for this length.
        let _ = decode(codec, &out[start..], run_seed, share, slice, &mut sent);
        for ((r, a), s) in r.iter_mut().zip(&v).zip(&sent) {
            *r = a - s;
        }
    }
}

/// Decodes a payload into `out` (overwritten).
pub(crate) fn decode(
    codec: Codec,
    payload: &[f32],
    run_seed: u64,
    share: usize,
    slice: usize,
    out: &mut [f32],
) -> Result<()> {
    out.fill(0.0);
    let bad = || TrainError::Rank {
        rank: 0,
        reason: format!("a push's payload does not fit {codec}"),
    };
    match codec {
        Codec::None => out.copy_from_slice(payload),
        Codec::TopK(_) => {
            let k = payload.len() / 2;
            for (&i, &v) in payload[..k].iter().zip(&payload[k..]) {
                *out.get_mut(unword(i) as usize).ok_or_else(bad)? = v;
            }
        }
        Codec::RandK(_) => {
            let idx = codec::random_k(out.len(), payload.len(), seed(run_seed, share, slice));
            for (&i, &v) in idx.iter().zip(payload) {
                out[i as usize] = v;
            }
        }
        c => c.decode_add(payload, out).map_err(|_| bad())?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_error_feedback_keeps_the_rest() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for codec in [
            Codec::None,
            Codec::Bf16,
            Codec::Int8,
            Codec::Sign,
            Codec::TopK(0.1),
            Codec::RandK(0.1),
        ] {
            let mut out = Vec::new();
            let mut residual = vec![0.0f32; x.len()];
            encode(codec, &x, Some(&mut residual), 7, 3, 1, &mut out);
            assert_eq!(out.len(), payload_len(codec, x.len()), "{codec}");
            let mut got = vec![0.0f32; x.len()];
            decode(codec, &out, 7, 3, 1, &mut got).unwrap();
            // Sent plus kept back is what was meant.
            for i in 0..x.len() {
                assert!((got[i] + residual[i] - x[i]).abs() < 1e-5, "{codec} at {i}");
            }
            if codec == Codec::None {
                assert_eq!(got, x);
            } else {
                assert!(residual.iter().any(|&r| r != 0.0), "{codec} lost nothing?");
            }
        }
    }
}
