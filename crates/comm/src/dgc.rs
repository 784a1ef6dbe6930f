//! Deep Gradient Compression (Lin et al. 2018) as an all-reduce: [`all_reduce_dgc`] with its
//! per-member state ([`Dgc`]) and sparsity warm-up ([`dgc_density`]); the selected values travel
//! by an all-gather of pairs ([`crate::codec::Codec::Dgc`]) or by Ok-Topk's balanced sparse
//! all-reduce ([`crate::codec::Codec::OkDgc`], [`crate::sparse`]).

use crate::codec::{clip_local, gather_pairs, top_k, Codec};
use crate::communicator::Communicator;
use crate::error::{CommError, Result};

/// The state DGC keeps per member and bucket between steps, and its settings.
pub struct Dgc<'a> {
    /// The velocity `u` (momentum correction).
    pub velocity: &'a mut [f32],
    /// The accumulated, not yet sent values `v`.
    pub accumulated: &'a mut [f32],
    /// The momentum of the velocity (the paper's `m`, 0.9).
    pub momentum: f32,
    /// The fraction of the values sent this step (the warm-up's, [`dgc_density`]).
    pub density: f64,
    /// The global clipping threshold, if any: each member clips its own gradient to
    /// `clip / √members` first (local gradient clipping).
    pub clip: Option<f32>,
    /// Exchanged by the balanced sparse all-reduce ([`Codec::OkDgc`]) instead of an
    /// all-gather of every member's pairs.
    pub balanced: bool,
}

/// Steps per stage of DGC's warm-up as hotspa runs it (the paper's stages are epochs).
pub const WARMUP_STAGE: u64 = 25;

/// DGC's sparsity warm-up (Lin et al. 2018, §3.3: 75 %, 93.75 %, 98.4375 %, 99.6 %, 99.9 % over
/// the first epochs): the fraction sent at `step` (from 0) quarters every `stage` steps from
/// a quarter down to `fraction`.
pub fn dgc_density(fraction: f64, step: u64, stage: u64) -> f64 {
    let quarterings = 1 + step / stage.max(1);
    0.25f64.powi(quarterings.min(64) as i32).max(fraction)
}

/// Deep Gradient Compression's all-reduce (Lin et al. 2018, Algorithm 1 with §3.2's
/// corrections): the member's gradient in `buf` is clipped to `clip / √members` (when a clip
/// is given), accumulated into the velocity (`u ← m·u + g`) and the velocity into the unsent
/// values (`v ← v + u`); the largest `density` of `v` by magnitude travel as (index, value)
/// pairs, and where they were taken both `v` and `u` are cleared (momentum factor masking).
/// `buf` ends as the sum of every member's sent values, added in rank order.
pub fn all_reduce_dgc(c: &dyn Communicator, buf: &mut [f32], d: Dgc<'_>) -> Result<()> {
    let len = buf.len();
    for (what, got) in [
        ("velocity", d.velocity.len()),
        ("accumulated", d.accumulated.len()),
    ] {
        if got != len {
            return Err(CommError::Length {
                op: "dgc all_reduce",
                what,
                expected: len,
                got,
            });
        }
    }
    if let Some(clip) = d.clip {
        clip_local(buf, clip, c.size());
    }
    for ((g, u), v) in buf
        .iter()
        .zip(d.velocity.iter_mut())
        .zip(d.accumulated.iter_mut())
    {
        *u = d.momentum * *u + g;
        *v += *u;
    }
    let k = Codec::Dgc(d.density).keep(len);
    if d.balanced {
        // The accumulation competes as a whole; what the result does not carry stays in it.
        buf.copy_from_slice(d.accumulated);
        let carried = crate::sparse::balanced_top_k(c, buf, k, Some(&mut *d.accumulated))?;
        for i in carried {
            d.velocity[i as usize] = 0.0;
        }
        return Ok(());
    }
    let idx = top_k(d.accumulated, k);
    let values: Vec<f32> = idx.iter().map(|&i| d.accumulated[i as usize]).collect();
    for &i in &idx {
        d.accumulated[i as usize] = 0.0;
        d.velocity[i as usize] = 0.0;
    }
    gather_pairs(c, buf, &idx, &values, "dgc all_reduce")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::grad;
    use crate::ThreadComm;

    #[test]
    fn dgc_is_algorithm_1_with_its_corrections() {
        let (n, len, steps, m, clip) = (3usize, 40usize, 6usize, 0.9f32, 0.8f32);
        // Distinct magnitudes: the selection has no ties to break.
        let g = move |r: usize, t: usize| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    let k = (i * 31 + r * 7 + t * 13) % 97;
                    (k as f32 + 1.0 + i as f32 / 1000.0) / 200.0
                        * if k.is_multiple_of(2) { 1.0 } else { -1.0 }
                })
                .collect()
        };
        let density = |t: usize| dgc_density(0.05, t as u64, 2);
        // The reference, sequentially.
        let mut u = vec![vec![0.0f32; len]; n];
        let mut v = vec![vec![0.0f32; len]; n];
        let mut want = Vec::new();
        for t in 0..steps {
            let mut sum = vec![0.0f32; len];
            let mut sent: Vec<Vec<(usize, f32)>> = Vec::new();
            for r in 0..n {
                let mut x = g(r, t);
                let norm = x
                    .iter()
                    .map(|&a| f64::from(a) * f64::from(a))
                    .sum::<f64>()
                    .sqrt();
                let limit = f64::from(clip) / (n as f64).sqrt();
                if norm > limit {
                    let s = (limit / norm) as f32;
                    x.iter_mut().for_each(|a| *a *= s);
                }
                for i in 0..len {
                    u[r][i] = m * u[r][i] + x[i];
                    v[r][i] += u[r][i];
                }
                let k = ((density(t) * len as f64).ceil() as usize).clamp(1, len);
                let mut order: Vec<usize> = (0..len).collect();
                order.sort_by(|&a, &b| v[r][b].abs().total_cmp(&v[r][a].abs()));
                let mut mine: Vec<(usize, f32)> =
                    order[..k].iter().map(|&i| (i, v[r][i])).collect();
                mine.sort_by_key(|p| p.0);
                for &(i, _) in &mine {
                    v[r][i] = 0.0;
                    u[r][i] = 0.0;
                }
                sent.push(mine);
            }
            for mine in &sent {
                for &(i, x) in mine {
                    sum[i] += x;
                }
            }
            want.push(sum);
        }
        // Per member: the sums of every step, the velocity and the accumulation.
        type Run = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let got = ThreadComm::run(n, move |c| -> Result<Run> {
            let me = c.rank().0;
            let (mut vel, mut acc) = (vec![0.0; len], vec![0.0; len]);
            let mut sums = Vec::new();
            for t in 0..steps {
                let mut buf = g(me, t);
                all_reduce_dgc(
                    &c,
                    &mut buf,
                    Dgc {
                        velocity: &mut vel,
                        accumulated: &mut acc,
                        momentum: m,
                        density: density(t),
                        clip: Some(clip),
                        balanced: false,
                    },
                )?;
                sums.push(buf);
            }
            Ok((sums, vel, acc))
        })
        .unwrap();
        for (r, (sums, vel, acc)) in got.iter().enumerate() {
            for (t, (a, b)) in sums.iter().zip(&want).enumerate() {
                // The same values, added in rank order.
                assert_eq!(a, b, "member {r}, step {t}");
            }
            assert_eq!(vel, &u[r], "member {r}'s velocity");
            assert_eq!(acc, &v[r], "member {r}'s accumulation");
        }
        // The warm-up: a quarter, then quartered every stage, down to the fraction.
        assert_eq!(dgc_density(0.001, 0, 25), 0.25);
        assert_eq!(dgc_density(0.001, 24, 25), 0.25);
        assert_eq!(dgc_density(0.001, 25, 25), 0.0625);
        assert_eq!(dgc_density(0.001, 100, 25), 0.001);
        assert_eq!(dgc_density(0.5, 0, 25), 0.5);
        // A wrong state length is an error, not a panic.
        let err = ThreadComm::run(1, |c| {
            all_reduce_dgc(
                &c,
                &mut [1.0, 2.0],
                Dgc {
                    velocity: &mut [0.0],
                    accumulated: &mut [0.0, 0.0],
                    momentum: 0.9,
                    density: 0.5,
                    clip: None,
                    balanced: false,
                },
            )
        });
        assert!(err.is_err());
        assert_eq!("dgc:0.1%".parse::<Codec>().unwrap(), Codec::Dgc(0.001));
        assert_eq!(Codec::Dgc(0.001).to_string(), "dgc:0.001");
        assert_eq!("okdgc:1%".parse::<Codec>().unwrap(), Codec::OkDgc(0.01));
    }

    /// DGC by the balanced exchange loses nothing: every accumulated value is either in the
    /// result or still with its sender, and a velocity is cleared exactly where its value left
    /// (its bytes are the balanced all-reduce's, tested in [`crate::sparse`]).
    #[test]
    fn balanced_dgc_keeps_what_the_result_does_not_carry() {
        let len = 997;
        for n in [2, 4, 8] {
            let out = ThreadComm::run(n, move |c| -> Result<_> {
                let me = c.rank().0;
                let g = grad(me, len);
                let (mut velocity, mut accumulated) = (vec![0.0; len], vec![0.0; len]);
                // A first step builds an accumulation; the second is checked.
                for _ in 0..2 {
                    let before: Vec<f32> = accumulated
                        .iter()
                        .zip(&velocity)
                        .zip(&g)
                        .map(|((v, u), g)| v + (0.9 * u + g))
                        .collect();
                    let mut buf = g.clone();
                    all_reduce_dgc(
                        &c,
                        &mut buf,
                        Dgc {
                            velocity: &mut velocity,
                            accumulated: &mut accumulated,
                            momentum: 0.9,
                            density: 0.05,
                            clip: None,
                            balanced: true,
                        },
                    )?;
                    if accumulated.iter().all(|&v| v == 0.0) {
                        continue;
                    }
                    return Ok((before, buf, accumulated.clone(), velocity.clone()));
                }
                unreachable!("an accumulation of 997 values sent at 5 % is never empty")
            })
            .unwrap();
            for i in 0..len {
                let total: f64 = out.iter().map(|o| f64::from(o.0[i])).sum();
                let kept: f64 = out.iter().map(|o| f64::from(o.2[i])).sum();
                let carried = f64::from(out[0].1[i]);
                assert!(
                    (carried + kept - total).abs() < 1e-5,
                    "{n} members, value {i}: {carried} carried + {kept} kept != {total}"
                );
                for o in &out {
                    let left = o.0[i] != 0.0 && o.2[i] == 0.0;
                    assert_eq!(o.3[i] == 0.0, left, "velocity {i}");
                }
            }
        }
    }
}
