//! What the cost model knows of the machines: devices, their speed and memory, and the links.

use serde::{Deserialize, Serialize};

/// A link class: bus bandwidth and per-message latency (α–β).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bandwidth, GB/s.
    pub gbps: f64,
    /// Latency per message, µs.
    pub latency_us: f64,
}

impl Link {
    /// A link of `gbps` GB/s and `latency_us` µs per message.
    pub const fn new(gbps: f64, latency_us: f64) -> Self {
        Link { gbps, latency_us }
    }

    /// Seconds to move `bytes` as `messages` messages.
    pub fn seconds(&self, bytes: f64, messages: f64) -> f64 {
        bytes / (self.gbps * 1e9) + messages * self.latency_us * 1e-6
    }
}

/// GEMM efficiency as a fraction of peak, saturating in both the token count of a micro-batch
/// and the per-device width of the weight: `max · t/(t + half_tokens) · w/(w + half_width)`;
/// attention runs at `attention` of peak.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Efficiency {
    /// The best fraction of peak large GEMMs reach.
    pub max: f64,
    /// Tokens at which a GEMM reaches half of `max` (along the token dim).
    pub half_tokens: f64,
    /// Weight width per device at which a GEMM reaches half of `max`.
    pub half_width: f64,
    /// Fraction of peak of the attention kernels.
    pub attention: f64,
}

impl Efficiency {
    /// GEMMs at up to `max` of peak, half of it at `half_tokens` tokens and at `half_width`
    /// columns per device; attention at `attention` of peak.
    pub const fn new(max: f64, half_tokens: f64, half_width: f64, attention: f64) -> Self {
        Efficiency {
            max,
            half_tokens,
            half_width,
            attention,
        }
    }
}

/// A cluster: identical nodes of identical devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Name, e.g. `a800x32`.
    pub name: String,
    /// Nodes.
    pub nodes: usize,
    /// Devices per node.
    pub devices_per_node: usize,
    /// Dense bf16 peak per device, TFLOP/s.
    pub peak_tflops: f64,
    /// GEMM and attention efficiency.
    pub efficiency: Efficiency,
    /// Memory per device, GiB.
    pub memory_gib: f64,
    /// Links between devices of one node.
    pub same_node: Link,
    /// Links between nodes (per device: a node's share when all its devices send at once).
    pub cross_node: Link,
    /// What one stream between nodes can reach, GB/s, where a node has fewer NICs than devices
    /// (e.g. one 25 Gb/s Ethernet port: 3.125); 0: one NIC per device, so a stream gets
    /// `cross_node.gbps`. A node's total is `cross_node.gbps × devices_per_node` either way.
    #[serde(default)]
    pub nic_gbps: f64,
    /// Bytes per element of activations, gradients and messages: 2 (bf16, the presets) or 4
    /// (f32, this project's CPU runtime).
    #[serde(default = "bf16_bytes")]
    pub elem_bytes: f64,
    /// Memory bandwidth per device for elementwise kernels and the optimizer, GB/s; 0 leaves
    /// them out (GPU presets: fused and small next to the GEMMs).
    #[serde(default)]
    pub memory_gbps: f64,
    /// Optimizer updates per second per device, in billions of parameters (norm, clipping,
    /// AdamW); 0: from `memory_gbps` (7 four-byte elements per parameter), or left out.
    #[serde(default)]
    pub optimizer_gparams: f64,
    /// Cores the devices share (thread ranks on one CPU), 0 for devices of their own: while a
    /// pipeline fills and drains, the idle ranks' cores speed up the busy ones.
    #[serde(default)]
    pub shared_cores: f64,
    /// On shared cores, the share of the speed-up that ranks waiting in a receive give the
    /// computing ones (1: a waiting rank frees its core at once; 0: it holds it, as a thread
    /// that spins does); measured by `hotspa profile` with half the ranks waiting. 1 where not
    /// measured.
    #[serde(default = "one")]
    pub lending: f64,
    /// On shared cores (more devices than `shared_cores`), how long a pipeline stage's rank,
    /// woken by its neighbour's message, waits for a core held by ranks that compute (µs per
    /// stage-boundary message); from `hotspa profile`'s pipeline probe. 0 where not measured.
    #[serde(default)]
    pub handoff_us: f64,
    /// Measured over modelled time of a real forward and backward of the model being planned
    /// (`hotspa profile --model`): what the kernel rates above leave out (executor overhead,
    /// cold caches); multiplies compute and elementwise time. 1 where not measured.
    #[serde(default = "one")]
    pub compute_scale: f64,
    /// The same calibration for the simulator's kernel-by-kernel clock (`sim::SimBackend`,
    /// which times each GEMM by its own shape): measured over clocked time of the same probe.
    /// 0: use `compute_scale`.
    #[serde(default)]
    pub clock_scale: f64,
    /// Host time of every kernel call beyond its work (the executor's dispatch and allocation,
    /// the hand-off to the backend's threads), µs; from `hotspa profile --model`'s two probe
    /// sizes. 0 where not measured (the GPU presets: launches overlap the work).
    #[serde(default)]
    pub kernel_overhead_us: f64,
    /// Measured GEMM rates, `[d0, d1, d2, TFLOP/s]` with the dims ascending (a linear layer's
    /// three training GEMMs of `tokens × width × K` in any roles; `hotspa profile` measures a
    /// grid). Where given, GEMM time comes from this table, interpolated in log space, instead
    /// of the efficiency curve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gemm_table: Vec<[f64; 4]>,
    /// Measured causal attention rates, `[sequence length, TFLOP/s]` (forward and backward of
    /// one sequence, `6·L²·heads·head_dim` FLOPs); where given, attention time comes from it,
    /// interpolated in log space, instead of `efficiency.attention`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention_table: Vec<[f64; 2]>,
}

fn one() -> f64 {
    1.0
}

fn bf16_bytes() -> f64 {
    2.0
}

impl Efficiency {
    /// What GPUs reach with Megatron-class kernels: GEMMs up to ~60 % of peak on large shapes,
    /// half of that at 256 tokens or 256 columns per device; FlashAttention-2 ~45 %.
    pub const GPU: Efficiency = Efficiency::new(0.6, 256.0, 256.0, 0.45);
}

impl Cluster {
    /// `nodes` nodes of `devices_per_node` devices of `peak_tflops` (dense bf16) and
    /// `memory_gib`, joined by `same_node` and `cross_node` links; GPU efficiency
    /// ([`Efficiency::GPU`]), bf16 elements, elementwise kernels and the optimizer left out, no
    /// calibration. Change the other fields by struct update.
    pub fn new(
        name: impl Into<String>,
        nodes: usize,
        devices_per_node: usize,
        peak_tflops: f64,
        memory_gib: f64,
        same_node: Link,
        cross_node: Link,
    ) -> Self {
        Cluster {
            name: name.into(),
            nodes,
            devices_per_node,
            peak_tflops,
            efficiency: Efficiency::GPU,
            memory_gib,
            same_node,
            cross_node,
            nic_gbps: 0.0,
            elem_bytes: bf16_bytes(),
            memory_gbps: 0.0,
            optimizer_gparams: 0.0,
            shared_cores: 0.0,
            lending: 1.0,
            handoff_us: 0.0,
            compute_scale: 1.0,
            clock_scale: 0.0,
            kernel_overhead_us: 0.0,
            gemm_table: Vec::new(),
            attention_table: Vec::new(),
        }
    }

    /// Checks every field: counts at least 1, rates and sizes positive and finite, latencies and
    /// optional rates at least 0; the first fault is named with its range.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |field: &str, v: f64, range: &str| {
            Err(crate::PlanError::Invalid(format!(
                "cluster {}: {field} = {v} is out of range: must be {range}",
                self.name
            )))
        };
        for (field, v) in [
            ("nodes", self.nodes),
            ("devices_per_node", self.devices_per_node),
        ] {
            if v == 0 {
                return bad(field, 0.0, "at least 1");
            }
        }
        let e = &self.efficiency;
        for (field, v) in [
            ("peak_tflops", self.peak_tflops),
            ("memory_gib", self.memory_gib),
            ("elem_bytes", self.elem_bytes),
            ("compute_scale", self.compute_scale),
            ("efficiency.max", e.max),
            ("efficiency.attention", e.attention),
            ("same_node.gbps", self.same_node.gbps),
            ("cross_node.gbps", self.cross_node.gbps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, v, "positive and finite");
            }
        }
        for (field, v) in [
            ("efficiency.half_tokens", e.half_tokens),
            ("efficiency.half_width", e.half_width),
            ("same_node.latency_us", self.same_node.latency_us),
            ("cross_node.latency_us", self.cross_node.latency_us),
            ("memory_gbps", self.memory_gbps),
            ("nic_gbps", self.nic_gbps),
            ("optimizer_gparams", self.optimizer_gparams),
            ("shared_cores", self.shared_cores),
            ("lending", self.lending),
            ("handoff_us", self.handoff_us),
            ("clock_scale", self.clock_scale),
            ("kernel_overhead_us", self.kernel_overhead_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v, "at least 0 and finite");
            }
        }
        if self.lending > 1.0 {
            return bad("lending", self.lending, "between 0 and 1");
        }
        let rows = self.gemm_table.iter().map(|r| r.as_slice());
        for row in rows.chain(self.attention_table.iter().map(|r| r.as_slice())) {
            if let Some(&v) = row.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return bad(
                    "a gemm_table or attention_table entry",
                    v,
                    "positive and finite",
                );
            }
        }
        Ok(())
    }

    /// Every device.
    pub fn devices(&self) -> usize {
        self.nodes * self.devices_per_node
    }

    /// Whether the devices outnumber the cores they share (thread ranks on fewer cores):
    /// there idle pipeline stages lend their cores and a woken stage may wait for one.
    pub fn oversubscribed(&self) -> bool {
        self.shared_cores > 0.0 && self.devices() as f64 > self.shared_cores
    }

    /// Seconds a pipeline stage woken by its neighbour's message waits for a core:
    /// [`Cluster::handoff_us`] where [`Cluster::oversubscribed`], else none.
    pub fn handoff_seconds(&self) -> f64 {
        if self.oversubscribed() {
            self.handoff_us * 1e-6
        } else {
            0.0
        }
    }

    /// The first `n` devices as a cluster of their own (whole nodes first).
    pub fn take(&self, n: usize) -> Cluster {
        let per = self.devices_per_node.min(n).max(1);
        Cluster {
            name: format!("{} ({n} devices)", self.name),
            nodes: n.div_ceil(per),
            devices_per_node: per,
            ..self.clone()
        }
    }

    /// The fraction of peak of a GEMM over `tokens` rows with `width` weight columns per device.
    pub fn gemm_efficiency(&self, tokens: f64, width: f64) -> f64 {
        let e = &self.efficiency;
        let saturate = |x: f64, half: f64| if half > 0.0 { x / (x + half) } else { 1.0 };
        e.max * saturate(tokens, e.half_tokens) * saturate(width, e.half_width)
    }

    /// The fastest a GEMM runs here, FLOP/s: no [`Cluster::gemm_seconds`] is ever faster (the
    /// table's best rate, its interpolation being a weighted geometric mean of its rates, or the
    /// efficiency curve's ceiling).
    pub fn fastest_gemm_flops(&self) -> f64 {
        1e12 * if self.gemm_table.is_empty() {
            self.peak_tflops * self.efficiency.max
        } else {
            self.gemm_table.iter().map(|r| r[3]).fold(0.0, f64::max)
        }
    }

    /// The fastest attention runs here, FLOP/s, as [`Cluster::fastest_gemm_flops`] for
    /// [`Cluster::attention_seconds`].
    pub fn fastest_attention_flops(&self) -> f64 {
        1e12 * if self.attention_table.is_empty() {
            self.peak_tflops * self.efficiency.attention
        } else {
            self.attention_table
                .iter()
                .map(|r| r[1])
                .fold(0.0, f64::max)
        }
    }

    /// Seconds of `batch` GEMMs of `m × n × k` (2·m·n·k FLOPs each), unscaled: from the measured
    /// [`Cluster::gemm_table`] where there is one (by the dims in ascending order, interpolated
    /// in log space, clamped at its edges), else by the efficiency curve with the largest dim as
    /// the tokens and the smallest as the width (a linear layer's roles whenever its micro-batch
    /// has more tokens than the layer is wide, in its forward and both backward GEMMs alike),
    /// and where `memory_gbps` is given never faster than moving its operands and result once
    /// (the roofline).
    pub fn gemm_seconds(&self, m: usize, n: usize, k: usize, batch: usize) -> f64 {
        let mut d = [m as f64, n as f64, k as f64];
        d.sort_by(f64::total_cmp);
        if d[0] == 0.0 || batch == 0 {
            return 0.0;
        }
        let flops = 2.0 * d[0] * d[1] * d[2] * batch as f64;
        match self.table_rate(d) {
            Some(rate) => flops / rate,
            None => {
                let compute = flops / (self.peak_tflops * 1e12 * self.gemm_efficiency(d[2], d[0]));
                // The roofline: a GEMM reads its two operands and writes its result once at
                // least, so it takes no less than their bytes at the memory's bandwidth.
                let memory = if self.memory_gbps > 0.0 {
                    let bytes = (d[0] * d[1] + d[1] * d[2] + d[0] * d[2]) * self.elem_bytes;
                    bytes * batch as f64 / (self.memory_gbps * 1e9)
                } else {
                    0.0
                };
                compute.max(memory)
            }
        }
    }

    /// Seconds of causal attention's forward and backward over one sequence of `len` tokens
    /// with `width` = heads × head_dim on the device (`6·len²·width` FLOPs), unscaled: by the
    /// measured [`Cluster::attention_table`] where there is one (log-interpolated in the length,
    /// clamped at its ends), else at `efficiency.attention` of peak.
    pub fn attention_seconds(&self, len: usize, width: usize) -> f64 {
        let flops = 6.0 * (len as f64).powi(2) * width as f64;
        if flops == 0.0 {
            return 0.0;
        }
        let t = &self.attention_table;
        let rate = if t.is_empty() {
            self.peak_tflops * self.efficiency.attention
        } else {
            let i = t.partition_point(|r| r[0] <= len as f64);
            if i == 0 {
                t[0][1]
            } else if i == t.len() {
                t[t.len() - 1][1]
            } else {
                let (a, b) = (t[i - 1], t[i]);
                let w = ((len as f64).ln() - a[0].ln()) / (b[0].ln() - a[0].ln());
                (a[1].ln() * (1.0 - w) + b[1].ln() * w).exp()
            }
        };
        flops / (rate * 1e12)
    }

    /// FLOP/s of a GEMM with ascending dims `d` from the table (trilinear in log2 of the dims,
    /// geometric in the rate), or `None` without a table.
    fn table_rate(&self, d: [f64; 3]) -> Option<f64> {
        if self.gemm_table.is_empty() {
            return None;
        }
        let mut grid: Vec<f64> = self
            .gemm_table
            .iter()
            .flat_map(|r| [r[0], r[1], r[2]])
            .collect();
        grid.sort_by(f64::total_cmp);
        grid.dedup();
        let rate_at = |c: [f64; 3]| -> Option<f64> {
            let mut c = c;
            c.sort_by(f64::total_cmp);
            self.gemm_table
                .iter()
                .find(|r| r[0] == c[0] && r[1] == c[1] && r[2] == c[2])
                .map(|r| r[3] * 1e12)
                .filter(|&r| r > 0.0)
        };
        // For each dim: the grid points around it and the weight of the upper one.
        let bracket = |x: f64| -> (f64, f64, f64) {
            let first = grid[0];
            let last = grid[grid.len() - 1];
            if x <= first {
                return (first, first, 0.0);
            }
            if x >= last {
                return (last, last, 0.0);
            }
            let i = grid.partition_point(|&g| g <= x);
            let (lo, hi) = (grid[i - 1], grid[i]);
            (lo, hi, (x.log2() - lo.log2()) / (hi.log2() - lo.log2()))
        };
        let b = [bracket(d[0]), bracket(d[1]), bracket(d[2])];
        let (mut sum, mut weights) = (0.0, 0.0);
        for corner in 0..8 {
            let mut c = [0.0; 3];
            let mut w = 1.0;
            for (axis, &(lo, hi, t)) in b.iter().enumerate() {
                let upper = corner >> axis & 1 == 1;
                c[axis] = if upper { hi } else { lo };
                w *= if upper { t } else { 1.0 - t };
            }
            if w > 0.0 {
                if let Some(r) = rate_at(c) {
                    sum += w * r.ln();
                    weights += w;
                }
            }
        }
        (weights > 0.0).then(|| (sum / weights).exp())
    }

    /// The link a group of `span` consecutive devices uses (cross-node when it leaves a node).
    pub fn link(&self, span: usize) -> Link {
        if span <= self.devices_per_node {
            self.same_node
        } else {
            self.cross_node
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let link = Link::new(1.0, 1.0);
        Cluster {
            efficiency: Efficiency::new(0.5, 64.0, 64.0, 0.25),
            elem_bytes: 4.0,
            ..Cluster::new("t", 1, 1, 1.0, 1.0, link, link)
        }
    }

    #[test]
    fn a_lending_beyond_one_is_refused_by_name() {
        let mut c = cluster();
        assert!(c.validate().is_ok());
        c.lending = 1.5;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("lending = 1.5") && e.contains("between 0 and 1"),
            "{e}"
        );
        c.lending = 0.0;
        c.handoff_us = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("handoff_us"));
    }

    #[test]
    fn measured_tables_give_their_rates_at_the_points_and_geometric_means_between() {
        let mut c = cluster();
        // Without tables: the curve (largest dim as tokens, smallest as width).
        let flops = 2.0 * 16.0 * 256.0 * 1024.0;
        let want = flops / (1e12 * c.gemm_efficiency(1024.0, 16.0));
        assert!((c.gemm_seconds(1024, 16, 256, 1) / want - 1.0).abs() < 1e-12);
        assert!((c.gemm_seconds(256, 1024, 16, 2) / (2.0 * want) - 1.0).abs() < 1e-12);
        assert_eq!(c.attention_seconds(100, 64), 6.0 * 1e4 * 64.0 / 0.25e12);
        // A table over dims {16, 64} (every ascending triple) and lengths {64, 256}.
        for (i, d) in [
            [16.0, 16.0, 16.0],
            [16.0, 16.0, 64.0],
            [16.0, 64.0, 64.0],
            [64.0, 64.0, 64.0],
        ]
        .into_iter()
        .enumerate()
        {
            c.gemm_table
                .push([d[0], d[1], d[2], 0.001 * 2f64.powi(i as i32)]);
        }
        c.attention_table = vec![[64.0, 0.01], [256.0, 0.04]];
        let rate = |m: usize, n: usize, k: usize| {
            2.0 * (m * n * k) as f64 / c.gemm_seconds(m, n, k, 1) / 1e12
        };
        assert!(
            (rate(16, 64, 16) - 0.002).abs() < 1e-12,
            "{}",
            rate(16, 64, 16)
        );
        assert!((rate(64, 64, 64) - 0.008).abs() < 1e-12);
        // Halfway (in log2) along one dim: the geometric mean of the two neighbours.
        assert!((rate(16, 16, 32) - (0.001f64 * 0.002).sqrt()).abs() < 1e-12);
        // Beyond the grid: clamped.
        assert!((rate(64, 64, 4096) - 0.008).abs() < 1e-12);
        let att = |l: usize| 6.0 * (l * l * 8) as f64 / c.attention_seconds(l, 8) / 1e12;
        assert!((att(64) - 0.01).abs() < 1e-12);
        assert!((att(128) - 0.02).abs() < 1e-12);
        assert!((att(4096) - 0.04).abs() < 1e-12);
        assert!((att(8) - 0.01).abs() < 1e-12);
    }
}
