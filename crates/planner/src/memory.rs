//! The memory model of this project's own runtime: the activation and gradient bytes one rank
//! holds, from its exec graph's liveness — every op allocates its outputs (this rank's pieces
//! under the strategy's DStates) and a tensor is freed after its last reader, as the executor
//! does — and, for a pipeline stage under 1F1B, the passes in flight.

use graph::{ExecGraph, Graph};
use graph::{Schedule, Slot};

use crate::error::{PlanError, Result};

/// Bytes one rank's pass over one micro-batch holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassMemory {
    /// The most bytes during the forward ops.
    pub forward_peak: usize,
    /// Bytes still held after the forward (saved for the backward).
    pub after_forward: usize,
    /// The most bytes during the backward ops.
    pub backward_peak: usize,
}

fn local_bytes(
    exec: &ExecGraph,
    tp_rank: usize,
    tokens: usize,
    t: graph::TensorId,
) -> Result<usize> {
    let g: &Graph = &exec.graph;
    let shape = g.info(t).resolve(tokens);
    let n = exec.states[t.0]
        .piece(tp_rank, &shape)
        .map_err(|e| PlanError::Invalid(format!("{}: {e}", g.info(t).name)))?
        .region
        .volume();
    Ok(n * std::mem::size_of::<f32>())
}

/// The bytes TP rank `tp_rank` holds running `exec` on a micro-batch of `tokens` tokens.
pub fn pass_memory(exec: &ExecGraph, tp_rank: usize, tokens: usize) -> Result<PassMemory> {
    let g = &exec.graph;
    let n = g.tensors.len();
    let mut last_use = vec![None; n];
    for (i, op) in g.ops.iter().enumerate() {
        for &t in &op.inputs {
            last_use[t.0] = Some(i);
        }
    }
    let mut keep = vec![false; n];
    if let Some(l) = g.loss {
        keep[l.0] = true;
    }
    for &(_, gr) in g.grads.iter().chain(&g.input_grads) {
        keep[gr.0] = true;
    }
    for &o in &g.outputs {
        keep[o.0] = true;
    }
    let mut held = vec![0usize; n];
    let mut live = 0usize;
    for &t in &g.inputs {
        held[t.0] = local_bytes(exec, tp_rank, tokens, t)?;
        live += held[t.0];
    }
    let forward_ops = g.num_forward_ops();
    let mut out = PassMemory::default();
    let mut peak = live;
    for (i, op) in g.ops.iter().enumerate() {
        if i == forward_ops {
            out.forward_peak = peak;
            out.after_forward = live;
            for &t in &g.output_grads {
                held[t.0] = local_bytes(exec, tp_rank, tokens, t)?;
                live += held[t.0];
            }
            peak = live;
        }
        for &t in &op.outputs {
            held[t.0] = local_bytes(exec, tp_rank, tokens, t)?;
            live += held[t.0];
        }
        peak = peak.max(live);
        for &t in op.inputs.iter().chain(&op.outputs) {
            let dead = match last_use[t.0] {
                Some(l) => l == i,
                None => op.outputs.contains(&t),
            };
            if dead && !keep[t.0] {
                live -= held[t.0];
                held[t.0] = 0;
            }
        }
    }
    if forward_ops >= g.ops.len() {
        out.forward_peak = peak;
        out.after_forward = live;
    } else {
        out.backward_peak = peak;
    }
    Ok(out)
}

/// The peak bytes of pipeline stage `stage` of `stages` running micro-batches of `tokens`
/// under `schedule`: the passes between their forward and backward hold their saved bytes while
/// another runs a phase, in the schedule's order (one stage: one pass at a time; under
/// PipeDream-2BW the last step's passes still in flight count too).
pub fn stage_peak(
    exec: &ExecGraph,
    tp_rank: usize,
    tokens: &[usize],
    schedule: Schedule,
    stage: usize,
    stages: usize,
) -> Result<usize> {
    // PipeDream-2BW carries the last step's micro-batches into this one: two steps back to
    // back under 1F1B cover the crossing.
    let steps = if schedule.flushless() { 2 } else { 1 };
    let per: Vec<PassMemory> = tokens
        .repeat(steps)
        .iter()
        .map(|&t| pass_memory(exec, tp_rank, t))
        .collect::<Result<_>>()?;
    let mut in_flight = vec![false; per.len()];
    let mut peak = 0;
    for slot in schedule.slots(stage, stages, per.len()) {
        let (i, backward) = match slot {
            Slot::F(i) => (i, false),
            Slot::B(i) => (i, true),
        };
        in_flight[i] = false;
        let others: usize = per
            .iter()
            .zip(&in_flight)
            .filter(|(_, f)| **f)
            .map(|(p, _)| p.after_forward)
            .sum();
        let phase_peak = if backward {
            per[i].backward_peak
        } else {
            per[i].forward_peak
        };
        peak = peak.max(others + phase_peak);
        in_flight[i] = !backward;
    }
    Ok(peak)
}
