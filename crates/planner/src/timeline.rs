//! The order of a step's work in time, as the runtime runs it: a pipeline's slots (each stage's
//! forwards and backwards in its schedule's order, each waiting for its input from the
//! neighbouring stage over the link between them) and the DP reduction's buckets on their own
//! thread (each started when its gradients are final on every replica, one after another). The
//! costs of the pieces are the cost model's; this module only orders them, so that what
//! overlaps in the runtime overlaps here and nothing else does.

use graph::{Schedule, Slot};

/// One micro-batch's forward or backward on one stage, by part (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pass {
    /// GEMMs and attention (and what recomputation runs again).
    pub compute: f64,
    /// TP/SP collectives and context parallelism's exchange.
    pub tp_comm: f64,
    /// Elementwise kernels and the kernels' overhead.
    pub elementwise: f64,
    /// ZeRO-3's parameter all-gathers over DP.
    pub gathers: f64,
}

impl Pass {
    /// The pass's seconds.
    pub fn total(&self) -> f64 {
        self.compute + self.tp_comm + self.elementwise + self.gathers
    }

    /// Component-wise sum.
    pub fn add(&mut self, o: &Pass) {
        self.compute += o.compute;
        self.tp_comm += o.tp_comm;
        self.elementwise += o.elementwise;
        self.gathers += o.gathers;
    }
}

/// One replica's pipeline over a step.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRun {
    /// When each stage ends its last slot.
    pub end: Vec<f64>,
    /// Each stage's last backward: (start, end); `None` without micro-batches.
    pub last_backward: Vec<Option<(f64, f64)>>,
    /// Each stage's passes summed.
    pub work: Vec<Pass>,
}

impl PipelineRun {
    /// When the last stage ends.
    pub fn makespan(&self) -> f64 {
        self.end.iter().copied().fold(0.0, f64::max)
    }
}

/// A message between two stages: its time on the link (latency and bytes) and the part of it
/// the link is busy (the bytes), during which the next message on the same link waits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hop {
    /// Seconds from leaving to arriving.
    pub seconds: f64,
    /// Seconds the link is occupied.
    pub busy: f64,
}

/// Runs `stages` stages (`fwd[k][i]`, `bwd[k][i]`: stage `k`'s passes of micro-batch `i`) in
/// `schedule`'s slot order; a forward on stage `k > 0` waits for micro-batch `i`'s activations
/// from stage `k − 1`, a backward on stage `k` below the last for its gradient from stage
/// `k + 1`, each message `hop[boundary][i]` over the link between them. Sends are buffered: a
/// stage never waits for its own send, but the messages over one link in one direction leave
/// one after another.
pub fn pipeline(
    schedule: Schedule,
    fwd: &[Vec<Pass>],
    bwd: &[Vec<Pass>],
    hop: &[Vec<Hop>],
) -> PipelineRun {
    let p = fwd.len();
    let m = fwd.first().map_or(0, Vec::len);
    let slots: Vec<Vec<Slot>> = (0..p).map(|k| schedule.slots(k, p, m)).collect();
    let mut clock = vec![0.0f64; p];
    let mut next = vec![0usize; p];
    let mut f_end = vec![vec![None::<f64>; m]; p];
    let mut b_end = vec![vec![None::<f64>; m]; p];
    // When each message arrives, and when each boundary's link is free, by direction.
    let mut f_arrive = vec![vec![None::<f64>; m]; p];
    let mut b_arrive = vec![vec![None::<f64>; m]; p];
    let mut down_free = vec![0.0f64; p];
    let mut up_free = vec![0.0f64; p];
    let mut last_backward = vec![None; p];
    let mut work = vec![Pass::default(); p];
    loop {
        let mut moved = false;
        for k in 0..p {
            while let Some(&slot) = slots[k].get(next[k]) {
                let (ready, pass) = match slot {
                    Slot::F(i) => {
                        let ready = if k == 0 { Some(0.0) } else { f_arrive[k][i] };
                        (ready, fwd[k][i])
                    }
                    Slot::B(i) => {
                        let ready = if k + 1 == p {
                            f_end[k][i]
                        } else {
                            b_arrive[k][i]
                        };
                        (ready, bwd[k][i])
                    }
                };
                let Some(ready) = ready else {
                    break;
                };
                let start = clock[k].max(ready);
                clock[k] = start + pass.total();
                work[k].add(&pass);
                match slot {
                    Slot::F(i) => {
                        f_end[k][i] = Some(clock[k]);
                        if k + 1 < p {
                            let h = hop[k][i];
                            let leave = clock[k].max(down_free[k]);
                            down_free[k] = leave + h.busy;
                            f_arrive[k + 1][i] = Some(leave + h.seconds);
                        }
                    }
                    Slot::B(i) => {
                        b_end[k][i] = Some(clock[k]);
                        last_backward[k] = Some((start, clock[k]));
                        if k > 0 {
                            let h = hop[k - 1][i];
                            let leave = clock[k].max(up_free[k - 1]);
                            up_free[k - 1] = leave + h.busy;
                            b_arrive[k - 1][i] = Some(leave + h.seconds);
                        }
                    }
                }
                next[k] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    PipelineRun {
        end: clock,
        last_backward,
        work,
    }
}

/// PipeDream-2BW's step: steps of the same micro-batches follow each other with no flush (1F1B
/// over their micro-batches back to back, as the runtime's `Stashing` runs them), so a step
/// adds the pipeline's period, not its fill and drain. Returns the makespan one more step adds
/// (three steps' less one step's, halved) and the one step's run (its work and order).
pub fn steady(fwd: &[Vec<Pass>], bwd: &[Vec<Pass>], hop: &[Vec<Hop>]) -> (f64, PipelineRun) {
    fn thrice<T: Copy>(v: &[Vec<T>]) -> Vec<Vec<T>> {
        v.iter().map(|s| s.repeat(3)).collect()
    }
    let one = pipeline(Schedule::OneFOneB, fwd, bwd, hop);
    let three = pipeline(Schedule::OneFOneB, &thrice(fwd), &thrice(bwd), &thrice(hop));
    ((three.makespan() - one.makespan()) / 2.0, one)
}

/// The DP reduction's buckets on their own thread: bucket `j` (in the order gradients become
/// final) is handed over when the last replica has it (`ready[j]`, each replica's time) and
/// runs after the bucket before it for `seconds[j]`. Returns when the last one ends.
pub fn buckets(ready: &[f64], seconds: &[f64]) -> f64 {
    let mut end = 0.0f64;
    for (r, s) in ready.iter().zip(seconds) {
        end = end.max(*r) + s;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(t: f64) -> Pass {
        Pass {
            compute: t,
            ..Pass::default()
        }
    }

    #[test]
    fn without_a_flush_a_step_costs_the_busiest_stage_not_the_fill() {
        // Four stages of 1 s forwards and 2 s backwards, eight micro-batches: 1F1B pays
        // (m + p - 1) * 3 s; a step of 2BW only m * 3 s, the busiest stage's work.
        let f = vec![vec![pass(1.0); 8]; 4];
        let b = vec![vec![pass(2.0); 8]; 4];
        let hops = vec![vec![Hop::default(); 8]; 3];
        let flushed = pipeline(Schedule::OneFOneB, &f, &b, &hops).makespan();
        assert!((flushed - 33.0).abs() < 1e-9, "{flushed}");
        let (period, one) = steady(&f, &b, &hops);
        assert!((period - 24.0).abs() < 1e-9, "{period}");
        assert_eq!(one.makespan(), flushed);
    }

    #[test]
    fn a_pipeline_fills_and_drains_and_a_slow_hop_stretches_it() {
        // 2 stages, 3 micro-batches, forward 1, backward 2, no hop: 1F1B's makespan is
        // (m + p − 1) · (f + b) = 4 · 3 = 12.
        let f = vec![vec![pass(1.0); 3]; 2];
        let b = vec![vec![pass(2.0); 3]; 2];
        let none = [vec![Hop::default(); 3]];
        let run = pipeline(Schedule::OneFOneB, &f, &b, &none);
        assert_eq!(run.makespan(), 12.0);
        assert_eq!(run.work[0].total(), 9.0);
        assert_eq!(run.last_backward[0], Some((10.0, 12.0)));
        // GPipe ends at the same time here.
        let g = pipeline(Schedule::GPipe, &f, &b, &none);
        assert_eq!(g.makespan(), 12.0);
        // A hop of 5 each way between the stages: each micro-batch's round trip adds 10 before
        // stage 0 can run its backward.
        let hop = Hop {
            seconds: 5.0,
            busy: 4.0,
        };
        let slow = pipeline(Schedule::OneFOneB, &f, &b, &[vec![hop; 3]]);
        assert!(slow.makespan() > 12.0 + 10.0, "{}", slow.makespan());
        // GPipe's three forwards leave one after another over the busy link: the third arrives
        // at 3 + 2·4 + 5 = 16 at the earliest, not at 3 + 5.
        let g = pipeline(Schedule::GPipe, &f, &b, &[vec![hop; 3]]);
        assert!(g.makespan() >= 16.0 + 1.0 + 6.0, "{}", g.makespan());
        // One stage: the passes one after another.
        let one = pipeline(Schedule::OneFOneB, &f[..1], &b[..1], &[]);
        assert_eq!(one.makespan(), 9.0);
    }

    #[test]
    fn buckets_overlap_what_comes_before_them() {
        // Ready at 1, 2, 3; each takes 0.5: the last ends at 3.5.
        assert_eq!(buckets(&[1.0, 2.0, 3.0], &[0.5; 3]), 3.5);
        // Each takes 2: they queue, 1 + 6 = 7.
        assert_eq!(buckets(&[1.0, 2.0, 3.0], &[2.0; 3]), 7.0);
    }
}
