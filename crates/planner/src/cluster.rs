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
    /// Links between nodes (per device).
    pub cross_node: Link,
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
    /// Measured over modelled time of a real forward and backward of the model being planned
    /// (`hotspa profile --model`): what the kernel rates above leave out (executor overhead,
    /// cold caches); multiplies compute and elementwise time. 1 where not measured.
    #[serde(default = "one")]
    pub compute_scale: f64,
}

fn one() -> f64 {
    1.0
}

fn bf16_bytes() -> f64 {
    2.0
}

impl Cluster {
    /// Every device.
    pub fn devices(&self) -> usize {
        self.nodes * self.devices_per_node
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
        e.max * tokens / (tokens + e.half_tokens) * width / (width + e.half_width)
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
