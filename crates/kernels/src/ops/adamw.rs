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
        }
    }
}

/// One update at `step` (1-based), as `torch.optim.AdamW`:
/// `p ← p(1 − lr·wd)`, `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
/// `p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + eps)`.
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
    let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
    let decay = T::of(1.0 - cfg.lr * cfg.weight_decay);
    let (b1, b2) = (T::of(cfg.beta1), T::of(cfg.beta2));
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
