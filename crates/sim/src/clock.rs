//! The simulator's clock and its device: a virtual time per rank, advanced by [`SimBackend`] for
//! every kernel the real runtime calls (by the cluster's rates) and by [`crate::SimComm`] for
//! every message (by the cluster's links), so that a real training run on this machine also
//! says how long it would have taken on the simulated cluster.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use kernels::{AttnShape, Backend, GemmSpec, HostSpan, Kernel, Layer, Result};
use planner::Cluster;

/// What the clock's time went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// GEMMs and attention.
    Compute = 0,
    /// Elementwise kernels (norms, RoPE, SwiGLU, adds, embedding, cross-entropy).
    Elementwise = 1,
    /// The optimizer update.
    Optimizer = 2,
    /// Moving bytes over a link.
    Transfer = 3,
    /// Waiting for the other members of a collective or for a message.
    Wait = 4,
}

const PHASES: usize = 5;

/// Seconds by [`Phase`], and the time (the sum).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClockReading {
    /// The rank's virtual time, seconds.
    pub now: f64,
    /// Seconds spent by phase, indexed by `Phase as usize`.
    pub phases: [f64; PHASES],
    /// Kernels run.
    pub kernels: u64,
}

impl ClockReading {
    /// Seconds spent in `p`.
    pub fn phase(&self, p: Phase) -> f64 {
        self.phases[p as usize]
    }

    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &ClockReading) -> ClockReading {
        let mut phases = self.phases;
        for (a, b) in phases.iter_mut().zip(earlier.phases) {
            *a -= b;
        }
        ClockReading {
            now: self.now - earlier.now,
            phases,
            kernels: self.kernels - earlier.kernels,
        }
    }
}

/// One rank's virtual time. Clones share it (the rank's backend and communicators hold one
/// each).
///
/// The thread that creates the clock is the rank's: its kernels and messages run one after
/// another on the main timeline. Communication from another thread of the rank (the runtime's
/// gradient all-reduce overlapped with the backward) runs on a side timeline that starts no
/// earlier than the main one stands when it is called; the main timeline waits for it at its
/// next collective over a group that contains the side group (the optimizer's), not at those
/// over other groups (TP, PP), which may overlap it.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The phases' seconds, then the time.
    main: [AtomicU64; PHASES + 1],
    /// When the side timeline's last operation ends.
    side_end: AtomicU64,
    /// The world ranks of the side timeline's group.
    side_group: Mutex<Vec<usize>>,
    /// Kernels run.
    kernels: AtomicU64,
    /// When this rank's links are free for the next point-to-point message leaving (and
    /// arriving), by class: [same node, cross node].
    egress: [AtomicU64; 2],
    ingress: [AtomicU64; 2],
    owner: ThreadId,
}

impl Default for Clock {
    fn default() -> Self {
        Self(Arc::new(Inner {
            main: Default::default(),
            side_end: AtomicU64::new(0f64.to_bits()),
            side_group: Mutex::new(Vec::new()),
            kernels: AtomicU64::new(0),
            egress: Default::default(),
            ingress: Default::default(),
            owner: std::thread::current().id(),
        }))
    }
}

impl Clock {
    /// A clock at 0, owned by the calling thread.
    pub fn new() -> Self {
        Self::default()
    }

    fn load(&self, i: usize) -> f64 {
        f64::from_bits(self.0.main[i].load(Ordering::Relaxed))
    }

    fn store(&self, i: usize, v: f64) {
        self.0.main[i].store(v.to_bits(), Ordering::Relaxed)
    }

    /// The main timeline's time, seconds.
    pub fn now(&self) -> f64 {
        self.load(PHASES)
    }

    /// Everything at once.
    pub fn read(&self) -> ClockReading {
        let mut phases = [0.0; PHASES];
        for (i, p) in phases.iter_mut().enumerate() {
            *p = self.load(i);
        }
        ClockReading {
            now: self.now(),
            phases,
            kernels: self.0.kernels.load(Ordering::Relaxed),
        }
    }

    /// Spends `secs` on `phase` on the main timeline (only the owning thread advances it).
    pub fn advance(&self, phase: Phase, secs: f64) {
        if secs > 0.0 {
            self.store(PHASES, self.now() + secs);
            let i = phase as usize;
            self.store(i, self.load(i) + secs);
        }
    }

    /// Waits (idle) until `t` if that is later than now.
    pub fn wait_until(&self, t: f64) {
        let now = self.now();
        if t > now {
            self.advance(Phase::Wait, t - now);
        }
    }

    /// A message leaving this rank over a link of class `cross` at `t` that keeps it busy for
    /// `secs`: when it starts to leave (after the messages before it).
    pub(crate) fn egress(&self, cross: bool, t: f64, secs: f64) -> f64 {
        Self::queue(&self.0.egress[usize::from(cross)], t, secs) - secs
    }

    /// A message arriving at this rank over a link of class `cross`, whole at `t` if the link
    /// were free, taking `secs` of it: when it is in (after the messages before it).
    pub(crate) fn ingress(&self, cross: bool, t: f64, secs: f64) -> f64 {
        Self::queue(&self.0.ingress[usize::from(cross)], t - secs, secs)
    }

    /// Starts `secs` of work at the later of `t` and `free`; moves `free` to its end.
    fn queue(free: &AtomicU64, t: f64, secs: f64) -> f64 {
        let start = f64::from_bits(free.load(Ordering::Relaxed)).max(t);
        let end = start + secs;
        free.store(end.to_bits(), Ordering::Relaxed);
        end
    }

    /// Whether the calling thread is the rank's own (the main timeline's).
    pub fn on_main_thread(&self) -> bool {
        std::thread::current().id() == self.0.owner
    }

    /// When the side timeline is free: its last end, or the main time if later.
    pub(crate) fn side_start(&self) -> f64 {
        f64::from_bits(self.0.side_end.load(Ordering::Relaxed)).max(self.now())
    }

    /// Records a side operation over `group` (world ranks) ending at `end`.
    pub(crate) fn side_done(&self, end: f64, group: &[usize]) {
        self.0.side_end.store(end.to_bits(), Ordering::Relaxed);
        let mut g = self.0.side_group.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_slice() != group {
            *g = group.to_vec();
        }
    }

    /// Before a main-timeline collective over `group` (world ranks): waits for the side
    /// timeline when `group` contains its group.
    pub(crate) fn join_side(&self, group: &[usize]) {
        let end = f64::from_bits(self.0.side_end.load(Ordering::Relaxed));
        if end <= self.now() {
            return;
        }
        let g = self.0.side_group.lock().unwrap_or_else(|p| p.into_inner());
        if g.iter().all(|r| group.contains(r)) {
            drop(g);
            self.wait_until(end);
        }
    }
}

/// Cores that the ranks of one process share (thread ranks on one CPU): the cluster's rates
/// were measured with every rank busy, so a kernel that runs while only `k` ranks compute gets
/// `n / max(k, cores)` times their speed. A rank computes unless it is blocked in
/// communication ([`crate::SimComm::sharing`] counts those); `k` is counted as it happens,
/// averaged over the kernel's start and end.
#[derive(Debug)]
pub struct CoreShare {
    blocked: AtomicUsize,
    ranks: usize,
    cores: f64,
    lending: f64,
}

impl CoreShare {
    /// `ranks` ranks on `cores` cores, a blocked rank freeing its core.
    pub fn new(ranks: usize, cores: f64) -> Arc<Self> {
        Self::lending(ranks, cores, 1.0)
    }

    /// `ranks` ranks on `cores` cores, a blocked rank freeing the share `lending` of its core
    /// ([`planner::Cluster::lending`]: a blocked rank counts as `1 − lending` of one that
    /// computes).
    pub fn lending(ranks: usize, cores: f64, lending: f64) -> Arc<Self> {
        Arc::new(Self {
            blocked: AtomicUsize::new(0),
            ranks: ranks.max(1),
            cores: cores.max(1.0),
            lending: lending.clamp(0.0, 1.0),
        })
    }

    fn computing(&self) -> f64 {
        let blocked = self.blocked.load(Ordering::Relaxed).min(self.ranks) as f64;
        (self.ranks as f64 - self.lending * blocked).max(1.0)
    }

    /// Runs `f` as a kernel of this rank; returns its result and the factor on its time.
    fn kernel<T>(&self, f: impl FnOnce() -> T) -> (T, f64) {
        let at_start = self.computing();
        let out = f();
        let k = (at_start + self.computing()) / 2.0;
        (
            out,
            k.max(self.cores).min(self.ranks as f64) / self.ranks as f64,
        )
    }

    /// Runs `f` with this rank counted as blocked (not computing).
    pub(crate) fn blocked<T>(&self, f: impl FnOnce() -> T) -> T {
        self.blocked.fetch_add(1, Ordering::Relaxed);
        let out = f();
        self.blocked.fetch_sub(1, Ordering::Relaxed);
        out
    }
}

/// The per-kernel rates of a cluster's device.
#[derive(Debug, Clone)]
struct Rates {
    cluster: Cluster,
    /// Multiplies compute and elementwise seconds (the profile's calibration).
    scale: f64,
}

impl Rates {
    /// A GEMM of `m × n × k` (`batch` of them), as [`Cluster::gemm_seconds`] times it.
    fn gemm(&self, s: &GemmSpec) -> f64 {
        self.scale * self.cluster.gemm_seconds(s.m, s.n, s.k, s.batch)
    }

    /// Causal attention over `cu` (sequence offsets), forward (a third of
    /// [`Cluster::attention_seconds`]) or backward (two thirds).
    fn attention(&self, cu: &[usize], shape: AttnShape, backward: bool) -> f64 {
        let width = shape.heads * shape.head_dim;
        let both: f64 = cu
            .windows(2)
            .map(|w| self.cluster.attention_seconds(w[1] - w[0], width))
            .sum();
        self.scale * both * if backward { 2.0 / 3.0 } else { 1.0 / 3.0 }
    }

    /// Blocks of attention computed on the host (context parallelism): each block its share of
    /// its sequence's causal pairs of the whole sequence's time, so that the blocks of one
    /// sequence, wherever they run, add up to [`Rates::attention`] of it.
    fn host_attention(&self, spans: &[HostSpan], shape: AttnShape, backward: bool) -> f64 {
        let width = shape.heads * shape.head_dim;
        let both: f64 = spans
            .iter()
            .map(|s| {
                let whole = s.seq_len * (s.seq_len + 1) / 2;
                if whole == 0 {
                    return 0.0;
                }
                self.cluster.attention_seconds(s.seq_len, width) * s.pairs as f64 / whole as f64
            })
            .sum();
        self.scale * both * if backward { 2.0 / 3.0 } else { 1.0 / 3.0 }
    }

    /// An elementwise kernel touching `elems` values of the cluster's activation width
    /// (`elem_bytes`: the bf16 of the GPU presets, as the cost model counts them, though this
    /// runtime computes in f32; 0 where the cluster leaves elementwise kernels out).
    fn elementwise(&self, elems: usize) -> f64 {
        if self.cluster.memory_gbps <= 0.0 {
            return 0.0;
        }
        self.scale * elems as f64 * self.cluster.elem_bytes / (self.cluster.memory_gbps * 1e9)
    }

    /// AdamW over `n` parameters.
    fn adamw(&self, n: usize) -> f64 {
        let c = &self.cluster;
        if c.optimizer_gparams > 0.0 {
            n as f64 / (c.optimizer_gparams * 1e9)
        } else if c.memory_gbps > 0.0 {
            n as f64 * 7.0 * 4.0 / (c.memory_gbps * 1e9)
        } else {
            0.0
        }
    }
}

/// A backend that runs every kernel on `inner` (so results are exact) and advances the rank's
/// [`Clock`] by what the kernel would take on the simulated cluster's device.
pub struct SimBackend<B> {
    inner: B,
    rates: Rates,
    clock: Clock,
    share: Option<Arc<CoreShare>>,
}

impl<B: Backend> SimBackend<B> {
    /// `inner` timed as a device of `cluster`, compute and elementwise seconds multiplied by the
    /// cluster's `clock_scale` (its `compute_scale` where that is 0).
    pub fn new(inner: B, cluster: &Cluster, clock: Clock) -> Self {
        let scale = if cluster.clock_scale > 0.0 {
            cluster.clock_scale
        } else {
            cluster.compute_scale
        };
        Self::with_scale(inner, cluster, clock, scale)
    }

    /// As [`SimBackend::new`] with an explicit scale (1: the kernel rates alone).
    pub fn with_scale(inner: B, cluster: &Cluster, clock: Clock, scale: f64) -> Self {
        Self {
            inner,
            rates: Rates {
                cluster: cluster.clone(),
                scale,
            },
            clock,
            share: None,
        }
    }

    /// Counts this rank's kernels in `share` (every rank of the process holding the same one)
    /// and times them by how many ranks compute at once.
    pub fn sharing(mut self, share: Arc<CoreShare>) -> Self {
        self.share = Some(share);
        self
    }

    /// The rank's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs the kernel `f` and spends `secs` and the cluster's overhead per kernel (scaled by
    /// the sharing of cores) on `phase`.
    fn timed<T>(&self, phase: Phase, secs: f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let (r, factor) = match &self.share {
            Some(share) => share.kernel(f),
            None => (f(), 1.0),
        };
        let overhead = self.rates.cluster.kernel_overhead_us * 1e-6;
        self.clock.advance(phase, (secs + overhead) * factor);
        self.clock.0.kernels.fetch_add(1, Ordering::Relaxed);
        r
    }
}

impl<B: Backend> Layer for SimBackend<B> {
    type Inner = B;

    fn inner(&self) -> &B {
        &self.inner
    }
    fn describe(&self) -> String {
        format!(
            "{} timed as a {} device",
            self.inner.name(),
            self.rates.cluster.name
        )
    }
    fn kernel<T>(&self, kernel: Kernel<'_>, run: impl FnOnce(&B) -> Result<T>) -> Result<T> {
        let (phase, secs) = match kernel {
            Kernel::Gemm(spec) => (Phase::Compute, self.rates.gemm(spec)),
            Kernel::Attention {
                cu_seqlens,
                shape,
                backward,
            } => (
                Phase::Compute,
                self.rates.attention(cu_seqlens, shape, backward),
            ),
            Kernel::HostAttention {
                spans,
                shape,
                backward,
            } => (
                Phase::Compute,
                self.rates.host_attention(spans, shape, backward),
            ),
            Kernel::Elementwise { elems } => (Phase::Elementwise, self.rates.elementwise(elems)),
            Kernel::AdamW { params } => (Phase::Optimizer, self.rates.adamw(params)),
        };
        self.timed(phase, secs, || run(&self.inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::{AdamW, CpuBackend};

    fn cluster() -> Cluster {
        let mut c = crate::presets::cluster("h100x8").unwrap();
        c.memory_gbps = 1000.0;
        c.optimizer_gparams = 2.0;
        c
    }

    #[test]
    fn blocked_ranks_lend_their_share_of_a_core() {
        // 4 ranks on 2 cores, 2 of them blocked: a kernel runs at 2/4 of its time where the
        // blocked free their cores, 3/4 where they free half, all of it where they free none.
        for (lending, want) in [(1.0, 0.5), (0.5, 0.75), (0.0, 1.0)] {
            let share = CoreShare::lending(4, 2.0, lending);
            let factor = share.blocked(|| share.blocked(|| share.kernel(|| ()).1));
            assert_eq!(factor, want, "lending {lending}");
            // Nobody blocked: every rank computes, as the rates were measured.
            assert_eq!(share.kernel(|| ()).1, 1.0);
        }
    }

    #[test]
    fn kernels_advance_the_clock_by_the_cluster_rates_and_compute_the_same() {
        let c = cluster();
        let clock = Clock::new();
        let sim = SimBackend::with_scale(CpuBackend::new(1).unwrap(), &c, clock.clone(), 1.0);
        let cpu = CpuBackend::new(1).unwrap();
        let (m, n, k) = (64, 32, 16);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let spec = GemmSpec::new(m, n, k);
        let (mut c1, mut c2) = (vec![0.0; m * n], vec![0.0; m * n]);
        sim.gemm(&spec, &a, &b, &mut c1).unwrap();
        cpu.gemm(&spec, &a, &b, &mut c2).unwrap();
        assert_eq!(c1, c2);
        // 2·m·n·k FLOPs at the efficiency of 64 tokens × 16 wide, or the operands' and the
        // result's bytes at the memory's bandwidth, whichever is longer (the roofline; this
        // small GEMM is the latter).
        let compute =
            2.0 * (m * n * k) as f64 / (c.peak_tflops * 1e12 * c.gemm_efficiency(64.0, 16.0));
        let memory = ((m * k + k * n + m * n) as f64 * c.elem_bytes) / (c.memory_gbps * 1e9);
        assert!(memory > compute);
        let want = compute.max(memory);
        let got = clock.read();
        assert!(
            (got.now - want).abs() < 1e-15 * want.max(1.0),
            "{got:?} vs {want}"
        );
        assert_eq!(got.phase(Phase::Compute), got.now);
        // Elementwise: bytes (at the cluster's bf16 width) over bandwidth; AdamW: parameters
        // over the optimizer rate.
        let x = vec![1.0f32; 1000];
        let mut y = vec![0.0f32; 1000];
        sim.axpy(2.0, &x, &mut y).unwrap();
        assert_eq!(y[0], 2.0);
        let e = clock.read().phase(Phase::Elementwise);
        assert_eq!(c.elem_bytes, 2.0);
        assert!((e - 3.0 * 2000.0 / 1e12).abs() < 1e-18, "{e}");
        let (mut p, g, mut m1, mut m2) = (x.clone(), x.clone(), y.clone(), y.clone());
        let cfg = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            freeze_variance_after: None,
        };
        sim.adamw(&cfg, 1, &mut p, &g, &mut m1, &mut m2).unwrap();
        assert!((clock.read().phase(Phase::Optimizer) - 1000.0 / 2e9).abs() < 1e-18);
        let r = clock.read();
        let sum: f64 = r.phases.iter().sum();
        assert!((sum - r.now).abs() < 1e-15);
    }

    #[test]
    fn attention_time_grows_with_the_square_of_each_sequence() {
        let c = cluster();
        let r = Rates {
            cluster: c,
            scale: 1.0,
        };
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let one = r.attention(&[0, 100], shape, false);
        let two = r.attention(&[0, 100, 200], shape, false);
        let long = r.attention(&[0, 200], shape, false);
        assert!((two - 2.0 * one).abs() < 1e-18);
        assert!((long - 4.0 * one).abs() < 1e-18);
        assert!((r.attention(&[0, 100], shape, true) - 2.0 * one).abs() < 1e-18);
        // Blocks of a sequence computed on the host (context parallelism) add up to the whole:
        // the 100 tokens in two halves are three blocks of 1275, 2500 and 1275 causal pairs.
        let block = |pairs| HostSpan {
            seq_len: 100,
            pairs,
        };
        let parts: f64 = [1275, 2500, 1275]
            .map(|p| r.host_attention(&[block(p)], shape, false))
            .iter()
            .sum();
        assert!((parts - one).abs() < 1e-18, "{parts} vs {one}");
        let whole = r.host_attention(&[block(5050)], shape, true);
        assert!((whole - 2.0 * one).abs() < 1e-18);
    }

    #[test]
    fn host_attention_runs_its_work_and_advances_the_clock() {
        let c = cluster();
        let clock = Clock::default();
        let be = SimBackend::with_scale(CpuBackend::new(1).unwrap(), &c, clock.clone(), 1.0);
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let spans = [HostSpan {
            seq_len: 64,
            pairs: 2080,
        }];
        let mut ran = 0;
        be.host_attention(&spans, shape, false, &mut || {
            ran += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(ran, 1);
        let want = c.attention_seconds(64, 32) / 3.0 + c.kernel_overhead_us * 1e-6;
        assert!(
            (clock.now() - want).abs() < 1e-15,
            "{} vs {want}",
            clock.now()
        );
    }
}
