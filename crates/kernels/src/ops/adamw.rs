//! AdamW with PyTorch semantics (DESIGN §3) and global-norm clipping.

use crate::error::{check_len, Result};
use crate::real::Real;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (pass 0 for tensors of rank < 2, such as norm weights).
    pub weight_decay: f64,
    /// After this step the second moment stays as it was (1-bit Adam's frozen variance, Tang
    /// et al. 2021): `v` is no longer updated and its bias correction stays at this step's.
    /// `None`: plain AdamW.
    pub freeze_variance_after: Option<u64>,
}

impl AdamW {
    /// The second moment's decay in effect at `step` (1-based) and `√(1 − β2^t)`, `t` the step
    /// or, once the variance is frozen, the step it froze at. A frozen variance decays by
    /// exactly 1 (so `v ← 1·v + 0·g²` leaves it bit for bit).
    pub fn second_moment(&self, step: u64) -> (f64, f64) {
        let t = step.max(1);
        match self.freeze_variance_after {
            Some(frozen) if t > frozen => (1.0, bias_sqrt(self.beta2, frozen.max(1))),
            _ => (self.beta2, bias_sqrt(self.beta2, t)),
        }
    }
}

fn bias_sqrt(beta2: f64, t: u64) -> f64 {
    (1.0 - beta2.powi(t.min(i32::MAX as u64) as i32)).sqrt()
}

impl Default for AdamW {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            freeze_variance_after: None,
        }
    }
}

/// One update at `step` (1-based), as `torch.optim.AdamW`:
/// `p ← p(1 − lr·wd)`, `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
/// `p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + eps)`; with a frozen variance
/// ([`AdamW::freeze_variance_after`]) `v` stays and `t` in `√(1−β2^t)` is the step it froze at.
pub fn step<T: Real>(
    cfg: &AdamW,
    step: u64,
    param: &mut [T],
    grad: &[T],
    m: &mut [T],
    v: &mut [T],
) -> Result<()> {
    let n = param.len();
    check_len("adamw", "grad", n, grad.len())?;
    check_len("adamw", "exp_avg", n, m.len())?;
    check_len("adamw", "exp_avg_sq", n, v.len())?;
    let t = step.max(1) as i32;
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let (beta2, bc2_sqrt) = cfg.second_moment(step);
    let decay = T::of(1.0 - cfg.lr * cfg.weight_decay);
    let (b1, b2) = (T::of(cfg.beta1), T::of(beta2));
    let step_size = T::of(cfg.lr / bc1);
    let (eps, bc2_sqrt) = (T::of(cfg.eps), T::of(bc2_sqrt));
    for i in 0..n {
        let g = grad[i];
        param[i] *= decay;
        m[i] = b1 * m[i] + (T::one() - b1) * g;
        v[i] = b2 * v[i] + (T::one() - b2) * g * g;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        param[i] -= step_size * m[i] / denom;
    }
    Ok(())
}

/// The clipping coefficient `min(1, max_norm / (norm + 1e-6))` of DESIGN §3.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three plain steps, then two with the variance frozen after step 3: `v` stays bit for bit,
    /// and each frozen step is `p ← p(1−lr·wd) − lr/(1−β1^t) · m / (√v₃/√(1−β2³) + ε)` with the
    /// momentum still updated, computed here in f64 by hand.
    #[test]
    fn a_frozen_variance_stays_and_keeps_the_bias_correction_of_its_step() {
        let plain = AdamW {
            lr: 1e-2,
            weight_decay: 0.1,
            beta2: 0.95,
            ..AdamW::default()
        };
        let frozen = AdamW {
            freeze_variance_after: Some(3),
            ..plain
        };
        let n = 5;
        let grads = |t: u64| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + 1.0) * 0.3 - 0.7) * (1.0 + 0.25 * t as f32))
                .collect()
        };
        let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        for t in 1..=3 {
            step(&frozen, t, &mut p, &grads(t), &mut m, &mut v).unwrap();
        }
        // Up to the freeze, frozen and plain agree bit for bit.
        let (mut q, mut mq, mut vq) = (vec![0.5f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        for t in 1..=3 {
            step(&plain, t, &mut q, &grads(t), &mut mq, &mut vq).unwrap();
        }
        assert_eq!((&p, &m, &v), (&q, &mq, &vq));
        let v3 = v.clone();
        let bc2 = (1.0 - 0.95f64.powi(3)).sqrt();
        for t in 4..=5u64 {
            let g = grads(t);
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let mi = 0.9 * f64::from(m[i]) + 0.1 * f64::from(g[i]);
                    let denom = f64::from(v3[i]).sqrt() / bc2 + 1e-8;
                    f64::from(p[i]) * (1.0 - 1e-3)
                        - 1e-2 / (1.0 - 0.9f64.powi(t as i32)) * mi / denom
                })
                .collect();
            step(&frozen, t, &mut p, &g, &mut m, &mut v).unwrap();
            assert_eq!(v, v3, "the variance moved at step {t}");
            for (got, want) in p.iter().zip(&want) {
                assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
        // The plain optimizer's variance does move.
        step(&plain, 4, &mut q, &grads(4), &mut mq, &mut vq).unwrap();
        assert_ne!(vq, v3);
    }
}
