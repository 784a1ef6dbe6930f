//! How the DP replicas of a run stay in step (`--sync`): every step by the gradient exchange
//! (BSP, the default), or by periodic averaging of the weights — local SGD (each replica runs
//! its own AdamW on its share of every batch, and every `H` steps the replicas' weights are
//! averaged) and DiLoCo (Douillard et al. 2023: the same inner steps, then an outer Nesterov
//! step on the averaged change since the last synchronisation).
//!
//! Between synchronisations a replica's gradients are its own: the mean over its own tokens,
//! clipped by its own norm. The AdamW moments stay per replica (as in both papers); the outer
//! momentum is per rank too. Both are part of checkpoints, which are written at
//! synchronisation points only, where every replica holds the same weights.

use comm::{Communicator, ReduceOp};
use kernels::Backend;
use runtime::{Optimizer, RankGroups};

use crate::error::{Result, TrainError};
use crate::settings::SyncMode;

/// DiLoCo's outer step on one tensor: the outer gradient is `anchor − mean` (the replicas'
/// averaged change, sign as a gradient), and `anchor` moves by SGD with Nesterov momentum
/// (PyTorch's `SGD(nesterov=True)`, no dampening): `b ← μ b + Δ`, `anchor ← anchor − η (Δ + μ b)`.
pub fn outer_step(anchor: &mut [f32], mean: &[f32], momentum: &mut [f32], lr: f32, mu: f32) {
    for ((a, &x), b) in anchor.iter_mut().zip(mean).zip(momentum.iter_mut()) {
        let delta = *a - x;
        *b = mu * *b + delta;
        *a -= lr * (delta + mu * *b);
    }
}

/// One rank's side of periodic averaging: the DP group it averages over, the weights at the
/// last synchronisation and DiLoCo's outer momentum.
pub(crate) struct Replicas {
    mode: SyncMode,
    group: Box<dyn Communicator>,
    anchor: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
}

impl Replicas {
    /// Averaging over `group` (the DP replicas), starting from `weights` (the optimizer's
    /// parameters, the same on every replica).
    pub fn new(mode: SyncMode, group: Box<dyn Communicator>, weights: Vec<Vec<f32>>) -> Self {
        let momentum = match mode {
            SyncMode::DiLoCo { .. } => weights.iter().map(|w| vec![0.0; w.len()]).collect(),
            _ => Vec::new(),
        };
        Self {
            mode,
            group,
            anchor: weights,
            momentum,
        }
    }

    /// Whether the replicas synchronise after `step` (counted from 1) of `steps`: every `H`
    /// steps and after the last.
    pub fn due(&self, step: usize, steps: usize) -> bool {
        self.mode
            .every()
            .is_some_and(|h| step.is_multiple_of(h) || step == steps)
    }

    /// The replicas' weights made one: averaged (local SGD), or the outer step from the last
    /// synchronisation's weights along the averaged change (DiLoCo, PyTorch's SGD with
    /// Nesterov: `b ← μ b + Δ`, `θ ← θ − η (Δ + μ b)`). Gossip averages with the ring
    /// neighbours only, unless `everyone` (the end, a checkpoint, an evaluation, a stop).
    pub fn synchronise<B: Backend>(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        groups: &RankGroups,
        everyone: bool,
    ) -> Result<()> {
        let n = self.group.size() as f32;
        let mut weights = opt.params_host(be, groups)?;
        if matches!(self.mode, SyncMode::Gossip { .. }) && !everyone {
            self.gossip(&mut weights)?;
            opt.set_params_host(be, &weights)?;
            return Ok(());
        }
        for (k, w) in weights.iter_mut().enumerate() {
            self.group.all_reduce(w, ReduceOp::Sum)?;
            w.iter_mut().for_each(|x| *x /= n);
            if let SyncMode::DiLoCo {
                outer_lr,
                outer_momentum,
                ..
            } = self.mode
            {
                outer_step(
                    &mut self.anchor[k],
                    w,
                    &mut self.momentum[k],
                    outer_lr as f32,
                    outer_momentum as f32,
                );
                w.copy_from_slice(&self.anchor[k]);
            }
        }
        opt.set_params_host(be, &weights)?;
        self.anchor = weights;
        Ok(())
    }

    /// Every tensor of `weights` averaged with the two ring neighbours' (the distinct members
    /// among left, self and right: with two replicas, both).
    fn gossip(&self, weights: &mut [Vec<f32>]) -> Result<()> {
        let (me, p) = (self.group.rank().0, self.group.size());
        let (left, right) = ((me + p - 1) % p, (me + 1) % p);
        let mut peers = vec![left];
        if right != left {
            peers.push(right);
        }
        peers.retain(|&r| r != me);
        let share = 1.0 / (peers.len() + 1) as f32;
        for w in weights.iter_mut() {
            let mut got: Vec<Vec<f32>> = peers.iter().map(|_| vec![0.0; w.len()]).collect();
            {
                let mut ops: Vec<comm::P2p<'_>> = peers
                    .iter()
                    .map(|&r| comm::P2p::Send {
                        peer: comm::Rank(r),
                        data: w.as_slice(),
                    })
                    .collect();
                ops.extend(
                    peers
                        .iter()
                        .zip(got.iter_mut())
                        .map(|(&r, buf)| comm::P2p::Recv {
                            peer: comm::Rank(r),
                            buf: buf.as_mut_slice(),
                        }),
                );
                self.group.batch(&mut ops)?;
            }
            for (i, x) in w.iter_mut().enumerate() {
                let sum: f32 = *x + got.iter().map(|g| g[i]).sum::<f32>();
                *x = sum * share;
            }
        }
        Ok(())
    }

    /// The global batch's loss from this replica's mean `loss` over its `own` predicted tokens
    /// of the batch's `predicted`: the token-weighted sum over the replicas.
    pub fn weighted_loss(&self, loss: f32, own: usize, predicted: usize) -> Result<f32> {
        let mut l = [loss * own as f32 / predicted.max(1) as f32];
        self.group.all_reduce(&mut l, ReduceOp::Sum)?;
        Ok(l[0])
    }

    /// What this rank keeps between synchronisations for a checkpoint (written at one, so the
    /// weights are the anchor): its AdamW moments, which differ between replicas, and
    /// DiLoCo's outer momentum.
    pub fn state<B: Backend>(
        &self,
        be: &B,
        opt: &Optimizer<B>,
        groups: &RankGroups,
    ) -> Result<Vec<(String, Vec<f32>)>> {
        let mo = opt.state_host(be, groups)?;
        let mut out = Vec::new();
        for (what, parts) in [
            ("exp_avg", mo.exp_avg),
            ("exp_avg_sq", mo.exp_avg_sq),
            ("outer_momentum", self.momentum.clone()),
        ] {
            for (k, p) in parts.into_iter().enumerate() {
                out.push((format!("{what}/{k:05}"), p));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Gives this rank back what [`Replicas::state`] saved (the `sync/` entries of its part of
    /// a checkpoint, the prefix stripped); the checkpoint's step count stays.
    pub fn restore<B: Backend>(
        &mut self,
        be: &B,
        opt: &mut Optimizer<B>,
        state: Vec<(String, Vec<f32>)>,
    ) -> Result<()> {
        let mut parts: [Vec<Vec<f32>>; 3] = Default::default();
        for (name, v) in state {
            let (what, _) = name.split_once('/').unwrap_or((&name, ""));
            let i = match what {
                "exp_avg" => 0,
                "exp_avg_sq" => 1,
                "outer_momentum" => 2,
                _ => {
                    return Err(TrainError::setting(
                        "resume",
                        format!(
                        "the checkpoint's periodic-averaging state has an unknown entry `{name}`"
                    ),
                    ))
                }
            };
            parts[i].push(v);
        }
        let [m, v, b] = parts;
        if !m.is_empty() || !v.is_empty() {
            opt.restore(be, &m, &v, opt.steps())?;
        }
        // A checkpoint without outer momentum (written under bsp or local:H) starts DiLoCo's
        // at zero, as a fresh run does.
        if matches!(self.mode, SyncMode::DiLoCo { .. }) && !b.is_empty() {
            if b.len() != self.momentum.len()
                || b.iter()
                    .zip(&self.momentum)
                    .any(|(x, y)| x.len() != y.len())
            {
                return Err(TrainError::setting(
                    "resume",
                    "the checkpoint's DiLoCo outer momentum does not fit these weights",
                ));
            }
            self.momentum = b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outer_step_is_sgd_with_nesterov_momentum() {
        let (lr, mu) = (0.7f32, 0.9f32);
        let mut anchor = vec![1.0f32, -2.0, 0.5];
        let mut momentum = vec![0.0f32; 3];
        let mut p: Vec<f64> = anchor.iter().map(|&x| x as f64).collect();
        let mut buf: Option<Vec<f64>> = None;
        for round in 0..4 {
            // What the replicas averaged to after their inner steps.
            let mean: Vec<f32> = anchor
                .iter()
                .enumerate()
                .map(|(i, &a)| a - 0.1 * (i as f32 + 1.0) * (round as f32 + 1.0))
                .collect();
            let g: Vec<f64> = p.iter().zip(&mean).map(|(&p, &m)| p - m as f64).collect();
            let b = match buf.take() {
                None => g.clone(),
                Some(b) => b.iter().zip(&g).map(|(b, g)| mu as f64 * b + g).collect(),
            };
            for i in 0..3 {
                p[i] -= lr as f64 * (g[i] + mu as f64 * b[i]);
            }
            buf = Some(b);
            outer_step(&mut anchor, &mean, &mut momentum, lr, mu);
            for i in 0..3 {
                assert!(
                    (anchor[i] as f64 - p[i]).abs() < 1e-5,
                    "round {round}, {i}: {} vs {}",
                    anchor[i],
                    p[i]
                );
            }
        }
    }
}
