//! Pipeline parallelism: one stage's exec graph run over the micro-batches of a step under a
//! GPipe or 1F1B schedule, activations and their gradients sent between neighbouring stages.

use std::fmt;
use std::str::FromStr;

use comm::{Rank, ReduceOp};
use graph::ExecGraph;
use kernels::Backend;

use crate::batch::MicroBatch;
use crate::error::{Result, RuntimeError};
use crate::executor::Pass;
use crate::parallel::{reduce_over_dp, RankGroups, StepGradients};

/// The order in which a stage runs the forward (F) and backward (B) passes of its micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// All forwards, then all backwards: every micro-batch's activations live at once.
    GPipe,
    /// One forward, one backward (PipeDream-flush): at most `stages - stage` micro-batches in
    /// flight on a stage.
    #[default]
    OneFOneB,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
        })
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            _ => Err(format!("unknown pipeline schedule `{s}` (gpipe or 1f1b)")),
        }
    }
}

/// A step of a stage: forward or backward of micro-batch `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward of micro-batch `i`.
    F(usize),
    /// Backward of micro-batch `i`.
    B(usize),
}

impl Schedule {
    /// The phases stage `stage` of `stages` runs for `m` micro-batches.
    pub fn phases(self, stage: usize, stages: usize, m: usize) -> Vec<Phase> {
        match self {
            Schedule::GPipe => (0..m).map(Phase::F).chain((0..m).map(Phase::B)).collect(),
            Schedule::OneFOneB => {
                let warmup = (stages - stage - 1).min(m);
                let mut out: Vec<Phase> = (0..warmup).map(Phase::F).collect();
                for i in 0..m - warmup {
                    out.push(Phase::F(warmup + i));
                    out.push(Phase::B(i));
                }
                out.extend((m - warmup..m).map(Phase::B));
                out
            }
        }
    }
}

fn tag(mb: usize, backward: bool, k: usize) -> u32 {
    ((mb * 2 + usize::from(backward)) * 8 + k) as u32
}

/// Runs this rank's stage over the micro-batches of its DP replica under `schedule`, then sums
/// the gradients of `shared` parameters (a tied embedding held by the first and the last stage)
/// across those two stages and all-reduces every gradient over DP. `exec` is this stage's exec
/// graph; every stage of a pipeline must get the same micro-batches.
pub fn pipeline_step<B: Backend>(
    backend: &B,
    exec: &ExecGraph,
    groups: &mut RankGroups,
    params: &[B::Buffer],
    shared: &[bool],
    micro_batches: &[MicroBatch],
    schedule: Schedule,
) -> Result<StepGradients<B>> {
    let stages = groups.pp.size();
    let stage = groups.pp.rank().0;
    let g = &exec.graph;
    if shared.len() != params.len() {
        return Err(RuntimeError::Binding(format!(
            "{} shared flags for {} parameters",
            shared.len(),
            params.len()
        )));
    }
    let has_input = !g.inputs.is_empty();
    let has_output = !g.outputs.is_empty();
    if (stage > 0) != has_input || (stage + 1 < stages) != has_output {
        return Err(RuntimeError::Binding(format!(
            "stage {stage} of {stages} got a graph with {} input(s) and {} output(s)",
            g.inputs.len(),
            g.outputs.len()
        )));
    }
    let tp_rank = groups.tp.rank();
    let mut passes: Vec<Option<Pass<'_, B>>> = (0..micro_batches.len()).map(|_| None).collect();
    let mut loss = 0.0f32;
    let mut peak_bytes = 0usize;
    let mut grads: Option<Vec<B::Buffer>> = None;
    for phase in schedule.phases(stage, stages, micro_batches.len()) {
        match phase {
            Phase::F(i) => {
                let mb = &micro_batches[i];
                let mut inputs = Vec::with_capacity(g.inputs.len());
                for (k, &x) in g.inputs.iter().enumerate() {
                    let n = local_len(exec, x, tp_rank, mb)?;
                    let mut buf = vec![0.0; n];
                    groups
                        .pp
                        .recv(&mut buf, Rank(stage - 1), tag(i, false, k))?;
                    inputs.push(backend.upload(&buf)?);
                }
                let mut pass = Pass::new(
                    backend,
                    g,
                    Some((&exec.states, tp_rank)),
                    params,
                    mb,
                    inputs,
                )?;
                pass.forward(Some(&mut groups.tp))?;
                for (k, out) in pass.outputs()?.iter().enumerate() {
                    groups.pp.send(out, Rank(stage + 1), tag(i, false, k))?;
                }
                passes[i] = Some(pass);
            }
            Phase::B(i) => {
                let mb = &micro_batches[i];
                let mut pass = passes[i].take().ok_or_else(|| {
                    RuntimeError::Binding(format!("backward of micro-batch {i} before its forward"))
                })?;
                let mut seeds = Vec::with_capacity(g.output_grads.len());
                for (k, &x) in g.output_grads.iter().enumerate() {
                    let n = local_len(exec, x, tp_rank, mb)?;
                    let mut buf = vec![0.0; n];
                    groups.pp.recv(&mut buf, Rank(stage + 1), tag(i, true, k))?;
                    seeds.push(backend.upload(&buf)?);
                }
                pass.backward(Some(&mut groups.tp), seeds)?;
                let out = pass.finish()?;
                for (k, gx) in out.input_grads.iter().enumerate() {
                    groups
                        .pp
                        .send(&backend.download(gx)?, Rank(stage - 1), tag(i, true, k))?;
                }
                loss += out.loss;
                peak_bytes = peak_bytes.max(out.peak_bytes);
                match grads.as_mut() {
                    None => grads = Some(out.grads),
                    Some(acc) => {
                        for (a, gr) in acc.iter_mut().zip(&out.grads) {
                            backend.axpy(1.0, gr, a)?;
                        }
                    }
                }
            }
        }
    }
    let mut grads = match grads {
        Some(g) => g,
        None => params
            .iter()
            .map(|p| backend.zeros(backend.len(p)))
            .collect::<std::result::Result<_, _>>()?,
    };
    // Tied weights: the first and the last stage each hold a copy and half the gradient.
    if stages > 1 && shared.iter().any(|&s| s) && (stage == 0 || stage + 1 == stages) {
        let pair = groups.pp.sub_group(&[Rank(0), Rank(stages - 1)])?;
        for (gr, _) in grads.iter_mut().zip(shared).filter(|(_, &s)| s) {
            let mut host = backend.download(gr)?;
            pair.all_reduce(&mut host, ReduceOp::Sum)?;
            *gr = backend.upload(&host)?;
        }
    }
    let mut l = [loss];
    if stages > 1 {
        groups.pp.all_reduce(&mut l, ReduceOp::Sum)?;
    }
    reduce_over_dp(backend, groups, &mut grads, exec.strategy.zero)?;
    if groups.dp.size() > 1 {
        groups.dp.all_reduce(&mut l, ReduceOp::Sum)?;
    }
    Ok(StepGradients {
        loss: l[0],
        grads,
        peak_bytes,
    })
}

fn local_len(
    exec: &ExecGraph,
    x: graph::TensorId,
    tp_rank: usize,
    mb: &MicroBatch,
) -> Result<usize> {
    let shape = exec.graph.info(x).resolve(mb.tokens());
    Ok(exec.states[x.0].piece(tp_rank, &shape)?.region.volume())
}
