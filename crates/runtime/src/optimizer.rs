//! The optimizer step of DESIGN §3 on a rank's pieces: global-norm clipping (every element
//! counted once across TP replicas, DP replicas and tied copies), then AdamW (PyTorch semantics,
//! decay on tensors of rank ≥ 2 only), with ZeRO sharding over DP:
//!
//! * ZeRO-1: each DP rank keeps the AdamW moments of a contiguous `1/dp` chunk of every local
//!   piece (flat, chunk semantics), updates that chunk and all-gathers the parameters.
//! * ZeRO-2: as 1, and the gradients are reduce-scattered over DP instead of all-reduced, so a
//!   rank only ever holds its chunk of the reduced gradient.
//! * ZeRO-3: as 2, and a rank only ever stores its chunk of the parameters: the exec graph
//!   all-gathers each one just before its forward use and again before its backward use
//!   (`OpKind::GatherParam`), and frees the gathered piece after its last use.

use std::ops::Range;

use comm::chunk_counts;
use graph::{ExecGraph, Zero};
use kernels::ops::adamw;
use kernels::{AdamW, Backend};

use crate::error::{Result, RuntimeError};
use crate::parallel::RankGroups;

/// AdamW state as whole local pieces, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// First moments, per parameter.
    pub exp_avg: Vec<Vec<f32>>,
    /// Second moments, per parameter.
    pub exp_avg_sq: Vec<Vec<f32>>,
    /// Steps taken.
    pub step: u64,
}

/// One rank's optimizer: AdamW moments (for its ZeRO chunk) and the parameters it owns.
pub struct Optimizer<B: Backend> {
    cfg: AdamW,
    max_grad_norm: f64,
    zero: Zero,
    step: u64,
    /// Per parameter: the flat range of the local piece this rank updates.
    chunks: Vec<Range<usize>>,
    /// Per parameter: element count of the whole local piece.
    lens: Vec<usize>,
    /// What [`Optimizer::lend`] lends.
    state: State<B>,
}

/// AdamW's state of a rank's parameters, per parameter.
struct State<B: Backend> {
    /// Whether weight decay applies (matrices).
    decay: Vec<bool>,
    /// How many ranks of a DP replica hold each element (TP replicas, tied copy).
    weight: Vec<f64>,
    /// AdamW moments on the device (this rank's chunk of each local piece).
    m: Vec<B::Buffer>,
    v: Vec<B::Buffer>,
    /// The parameters as the exec graph binds them: whole local pieces, or under ZeRO-3 this
    /// rank's chunks of them.
    params: Vec<B::Buffer>,
}

impl<B: Backend> State<B> {
    /// AdamW's settings for parameter `k` at learning rate `lr`: `base`'s, without weight
    /// decay where none applies.
    fn adamw(&self, base: &AdamW, k: usize, lr: f64) -> AdamW {
        let decay = self.decay.get(k).copied().unwrap_or(false);
        AdamW {
            lr,
            weight_decay: if decay { base.weight_decay } else { 0.0 },
            ..*base
        }
    }

    fn empty() -> Self {
        State {
            decay: Vec::new(),
            weight: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            params: Vec::new(),
        }
    }
}

impl<B: Backend> Optimizer<B> {
    /// Takes this rank's parameter pieces for `exec`. `shared[k]` marks a parameter also held by
    /// another pipeline stage (a tied embedding), counted once in the gradient norm by stage 0.
    /// `max_grad_norm` may be infinite (no clipping).
    pub fn new(
        backend: &B,
        exec: &ExecGraph,
        groups: &RankGroups,
        params: Vec<B::Buffer>,
        shared: &[bool],
        cfg: AdamW,
        max_grad_norm: f64,
    ) -> Result<Self> {
        let g = &exec.graph;
        let (n, given, flags) = (g.params.len(), params.len(), shared.len());
        if given != n || flags != n {
            let what = format!("{given} parameters and {flags} shared flags for a graph of {n}");
            return Err(RuntimeError::Binding(what));
        }
        let (dp, dp_rank) = (groups.dp.size(), groups.dp.rank().0);
        let zero = exec.strategy.zero;
        let stage = groups.pp.rank().0;
        let mut s = Optimizer {
            cfg,
            max_grad_norm,
            zero,
            step: 0,
            chunks: Vec::new(),
            lens: Vec::new(),
            state: State::empty(),
        };
        for (k, &p) in g.params.iter().enumerate() {
            let len = backend.len(&params[k]);
            let chunk = if zero > Zero::Off {
                dstate::chunk(0..len, dp, dp_rank)
            } else {
                0..len
            };
            s.state.m.push(backend.zeros(chunk.len())?);
            s.state.v.push(backend.zeros(chunk.len())?);
            s.state.decay.push(g.info(p).shape.len() >= 2);
            let replicas = exec.states[p.0].num_replicas() as f64;
            // The last stage's copy of a tied weight is not counted: stage 0 counts it.
            let counted = !(shared[k] && stage != 0);
            s.state
                .weight
                .push(if counted { 1.0 / replicas } else { 0.0 });
            s.lens.push(len);
            s.chunks.push(chunk);
        }
        if zero >= Zero::Parameters {
            for (k, p) in params.iter().enumerate() {
                let chunk = &backend.download(p)?[s.chunks[k].clone()];
                s.state.params.push(backend.upload(chunk)?);
            }
        } else {
            s.state.params = params;
        }
        Ok(s)
    }

    /// Lends the moments and the parameters to a priority update
    /// ([`crate::stream::update_by_priority`]) for one step, which counts it; the optimizer
    /// holds none until [`Optimizer::take_back`]. Needs whole pieces (no ZeRO) and no clipping:
    /// each parameter is updated as soon as its own gradient is summed.
    pub fn lend(&mut self) -> Result<Lent<B>> {
        if self.zero != Zero::Off || self.max_grad_norm.is_finite() {
            return Err(RuntimeError::Binding(format!(
                "a priority update needs whole pieces and no clipping (ZeRO {:?}, clip {})",
                self.zero, self.max_grad_norm
            )));
        }
        self.step += 1;
        Ok(Lent {
            cfg: self.cfg,
            step: self.step,
            state: std::mem::replace(&mut self.state, State::empty()),
        })
    }

    /// Takes back what [`Optimizer::lend`] lent, with the parameters after the step.
    pub fn take_back(&mut self, lent: Lent<B>, params: Vec<B::Buffer>) {
        self.state = State {
            params,
            ..lent.state
        };
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The parameters to bind for a step (under ZeRO-3, this rank's chunks).
    pub fn params(&self) -> &[B::Buffer] {
        &self.state.params
    }

    /// The whole local pieces copied to the host (a checkpoint or a test reads them; ZeRO-3
    /// all-gathers them over DP).
    pub fn params_host(&self, backend: &B, groups: &RankGroups) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.state.params.len());
        for (k, p) in self.state.params.iter().enumerate() {
            let host = backend.download(p)?;
            if self.zero >= Zero::Parameters {
                let counts = chunk_counts(self.lens[k], groups.dp.size());
                let mut full = vec![0.0; self.lens[k]];
                groups.dp.all_gather(&host, &mut full, &counts)?;
                out.push(full);
            } else {
                out.push(host);
            }
        }
        Ok(out)
    }

    /// Replaces the parameters with `host` (whole local pieces, as [`Optimizer::params_host`]
    /// gives them): periodic averaging (local SGD, DiLoCo) sets the replicas' common weights.
    /// Not under ZeRO-3, whose parameters are chunks over DP.
    pub fn set_params_host(&mut self, backend: &B, host: &[Vec<f32>]) -> Result<()> {
        if self.zero >= Zero::Parameters {
            return Err(RuntimeError::Binding(
                "parameters cannot be replaced whole under ZeRO-3".into(),
            ));
        }
        if host.len() != self.lens.len() {
            return Err(RuntimeError::Binding(format!(
                "{} parameters given for {}",
                host.len(),
                self.lens.len()
            )));
        }
        for (k, h) in host.iter().enumerate() {
            if h.len() != self.lens[k] {
                return Err(RuntimeError::Binding(format!(
                    "parameter {k} given {} values, expected {}",
                    h.len(),
                    self.lens[k]
                )));
            }
            self.state.params[k] = backend.upload(h)?;
        }
        Ok(())
    }

    /// The AdamW moments as whole local pieces (gathered over DP under ZeRO) and the step count,
    /// for a checkpoint.
    pub fn state_host(&self, backend: &B, groups: &RankGroups) -> Result<Moments> {
        let dp = groups.dp.size();
        let whole = |parts: &[B::Buffer]| -> Result<Vec<Vec<f32>>> {
            parts
                .iter()
                .enumerate()
                .map(|(k, part)| {
                    let part = backend.download(part)?;
                    if self.zero == Zero::Off {
                        return Ok(part);
                    }
                    let counts = chunk_counts(self.lens[k], dp);
                    let mut full = vec![0.0; self.lens[k]];
                    groups.dp.all_gather(&part, &mut full, &counts)?;
                    Ok(full)
                })
                .collect()
        };
        Ok(Moments {
            exp_avg: whole(&self.state.m)?,
            exp_avg_sq: whole(&self.state.v)?,
            step: self.step,
        })
    }

    /// Restores the moments (whole local pieces, as [`Optimizer::state_host`] gives them) and
    /// the step count, e.g. from a checkpoint written under another strategy.
    pub fn restore(
        &mut self,
        backend: &B,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        step: u64,
    ) -> Result<()> {
        let n = self.lens.len();
        if m.len() != n || v.len() != n {
            let (a, b) = (m.len(), v.len());
            let what = format!("{a} and {b} moments restored for {n} parameters");
            return Err(RuntimeError::Binding(what));
        }
        for k in 0..self.lens.len() {
            if m[k].len() != self.lens[k] || v[k].len() != self.lens[k] {
                return Err(RuntimeError::Binding(format!(
                    "moments of parameter {k} have {} and {} values, expected {}",
                    m[k].len(),
                    v[k].len(),
                    self.lens[k]
                )));
            }
            self.state.m[k] = backend.upload(&m[k][self.chunks[k].clone()])?;
            self.state.v[k] = backend.upload(&v[k][self.chunks[k].clone()])?;
        }
        self.step = step;
        Ok(())
    }

    /// Clips and applies the reduced gradients (whole local pieces for ZeRO ≤ 1, this rank's
    /// chunks for ZeRO ≥ 2, as `step_gradients` returns them) with learning rate `lr`. Returns
    /// the global gradient norm before clipping.
    pub fn update(
        &mut self,
        backend: &B,
        groups: &mut RankGroups,
        grads: Vec<B::Buffer>,
        lr: f64,
    ) -> Result<f64> {
        let sharded = self.zero >= Zero::Gradients;
        let mut grads = grads;
        for (k, gbuf) in grads.iter().enumerate() {
            let got = backend.len(gbuf);
            let want = if sharded {
                self.chunks[k].len()
            } else {
                self.lens[k]
            };
            if got != want {
                return Err(RuntimeError::Binding(format!(
                    "gradient {k} has {got} values, expected {want}"
                )));
            }
        }
        // Global norm: every element once. Sharded gradients are disjoint over DP; replicated
        // ones are counted by DP rank 0 only.
        let dp_counts = sharded || groups.dp.rank().0 == 0;
        let mut total = 0.0f64;
        if dp_counts {
            for (k, gbuf) in grads.iter().enumerate() {
                total += self.state.weight[k] * backend.sum_squares(gbuf)?;
            }
        }
        // Summed in f64 on every rank and over the groups (exact words, added in rank order),
        // rounded to f32 once at the end as on one device.
        total = comm::words::all_sum_f64(groups.tp.comm(), total)?;
        total = comm::words::all_sum_f64(groups.pp.as_ref(), total)?;
        total = comm::words::all_sum_f64(groups.dp.as_ref(), total)?;
        let norm = f64::from(total as f32).sqrt();
        if !norm.is_finite() {
            return Err(RuntimeError::Batch(format!(
                "the gradient norm is {norm}: a loss or gradient is NaN or infinite; the step is skipped and the weights are unchanged"
            )));
        }
        let coef = adamw::clip_coef(norm, self.max_grad_norm);
        self.step += 1;
        let dp = groups.dp.size();
        for (k, g) in grads.iter_mut().enumerate() {
            let cfg = self.state.adamw(&self.cfg, k, lr);
            if coef != 1.0 {
                backend.scale(coef as f32, g)?;
            }
            if self.zero == Zero::Off || self.zero >= Zero::Parameters {
                // The whole buffer is this rank's to update: on the device.
                backend.adamw(
                    &cfg,
                    self.step,
                    &mut self.state.params[k],
                    g,
                    &mut self.state.m[k],
                    &mut self.state.v[k],
                )?;
                continue;
            }
            // ZeRO-1/2: update this rank's chunk on the device (its moments are chunk-sized),
            // then all-gather the piece over DP into the parameter.
            let range = self.chunks[k].clone();
            let mut pc = backend
                .upload(&crate::host::view(backend, &self.state.params[k])?[range.clone()])?;
            let whole_grad;
            let gc: &B::Buffer = if sharded {
                g
            } else {
                whole_grad = backend.upload(&crate::host::view(backend, g)?[range])?;
                &whole_grad
            };
            backend.adamw(
                &cfg,
                self.step,
                &mut pc,
                gc,
                &mut self.state.m[k],
                &mut self.state.v[k],
            )?;
            let counts = chunk_counts(self.lens[k], dp);
            let mine = crate::host::view(backend, &pc)?;
            crate::host::in_place(backend, &mut self.state.params[k], |p| {
                Ok(groups.dp.all_gather(&mine, p, &counts)?)
            })?;
        }
        Ok(norm)
    }
}

/// The optimizer's state during a priority update: the parameters before the step and the
/// moments, updated parameter by parameter.
pub struct Lent<B: Backend> {
    cfg: AdamW,
    step: u64,
    state: State<B>,
}

impl<B: Backend> Lent<B> {
    /// How much parameter `k`'s squares count in the gradient norm (`1 / replicas`).
    pub fn weight(&self, k: usize) -> f64 {
        self.state.weight.get(k).copied().unwrap_or(0.0)
    }

    /// Parameter `k` after this step's AdamW update by the summed gradient `grad` (a new
    /// buffer: the old one may still be read), its moments updated in place.
    pub fn updated(
        &mut self,
        backend: &B,
        k: usize,
        grad: &B::Buffer,
        lr: f64,
    ) -> Result<B::Buffer> {
        let cfg = self.state.adamw(&self.cfg, k, lr);
        let (Some(old), Some(m), Some(v)) = (
            self.state.params.get(k),
            self.state.m.get_mut(k),
            self.state.v.get_mut(k),
        ) else {
            return Err(RuntimeError::Binding(format!(
                "parameter {k} updated, none lent"
            )));
        };
        if backend.len(grad) != backend.len(old) {
            return Err(RuntimeError::Binding(format!(
                "gradient {k} has {} values, expected {}",
                backend.len(grad),
                backend.len(old)
            )));
        }
        let mut new = backend.upload(&crate::host::view(backend, old)?)?;
        backend.adamw(&cfg, self.step, &mut new, grad, m, v)?;
        Ok(new)
    }
}
