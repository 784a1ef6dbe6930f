//! Cluster presets, cluster files (TOML) and sequence-length distributions.

use std::path::Path;

use planner::{Cluster, Link};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

use crate::error::{Result, SimError};

/// The cluster presets.
pub const CLUSTERS: [&str; 5] = ["a800x32", "h100x8", "h100x128", "h100x1024", "eth8x8"];

/// The dataset presets.
pub const DATASETS: [&str; 3] = ["commoncrawl", "github", "crates-io"];

/// The datasets of the HotSPa paper's grid (the first of [`DATASETS`]).
pub const PAPER_DATASETS: [&str; 2] = ["commoncrawl", "github"];

/// The `crates-io` corpus: one document per `.rs` file of the crates.io packages in this
/// workspace's Cargo.lock, its bytes (hotspa's byte-level tokens); written by
/// `scripts/lengths-crates-io.sh`.
const CRATES_IO: &str = include_str!("../data/crates-io.txt");

/// The device figures the presets take from published component measurements
/// (docs/cost-model.md §3 has each source): the dense BF16 peak (datasheet), the best GEMM rate
/// measured over shapes (MAMF: S. Bekman, *Machine Learning Engineering*,
/// compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS comparison table", BF16:
/// A100 SXM 271.2 of 312 TFLOP/s, H100 SXM 794.5 of 989), the HBM bandwidth (datasheet; every
/// GEMM is at least its operands' bytes, elementwise kernels and the optimizer are their bytes),
/// and NCCL's bus bandwidth on NVLink: the line rate less NCCL's protocol overhead of about 20 %
/// (S. Jeaugey, NVIDIA, nccl-tests issue 212: "450GB/s is the line rate. With the protocol
/// overhead (~20%) NCCL can get an effective NVLink bandwidth of 370GB/s" on H100).
/// Attention comes from FlashAttention-2's measured rate by sequence length: on H100
/// [`H100_FLASH_ATTENTION_2`], on A100 (and A800, the same chip) [`A100_FLASH_ATTENTION_2`].
pub struct Device {
    /// Dense BF16 peak, TFLOP/s.
    pub peak_tflops: f64,
    /// MAMF over the peak.
    pub gemm_max: f64,
    /// HBM bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// NVLink bandwidth per direction (line rate), GB/s.
    pub nvlink_gbps: f64,
    /// Measured attention rates by sequence length, `[length, forward, backward]` in TFLOP/s
    /// as FlashAttention's papers count them (see [`H100_FLASH_ATTENTION_2`]); empty: the
    /// assumed `Efficiency::GPU.attention` of peak.
    pub attention: &'static [[f64; 3]],
}

/// FlashAttention-2 on H100 SXM5 80GB, BF16, head dim 128, by sequence length: `[length,
/// forward TFLOP/s with the causal mask, backward TFLOP/s]`, read off Shah et al.,
/// *FlashAttention-3* (arXiv 2407.08608, 2024), Fig. 4 (forward, causal) and Fig. 5 (backward;
/// that figure's runs are without the mask, the only backward it gives for head dim 128). The
/// paper counts `4·L²·d` forward FLOPs per head (half with the mask) and 2.5× that backward.
/// FlashAttention-2 rather than -3: the stacks of the runs we check against (PyTorch SDPA,
/// Megatron-LM's of 2023–24) ran it.
pub const H100_FLASH_ATTENTION_2: [[f64; 3]; 6] = [
    [512.0, 191.0, 214.0],
    [1024.0, 260.0, 260.0],
    [2048.0, 298.0, 291.0],
    [4096.0, 319.0, 310.0],
    [8192.0, 333.0, 318.0],
    [16384.0, 335.0, 322.0],
];

/// FlashAttention-2 on A100 SXM4 80GB, FP16/BF16, head dimension 128, with the causal mask,
/// forward and backward together (TFLOP/s as FlashAttention counts them: `3.5 × 2·L²·d` per
/// head), by sequence length 512 … 16K: 99, 133, 155, 173, 182, 189 — read off the
/// flash-attention repository's README, "A100" benchmark, `assets/flash2_a100_fwd_bwd_benchmark.png`
/// panel (d) (the FlashAttention-2 paper's Fig. 4(d), Dao 2023, arXiv 2307.08691; hidden size
/// 2048, batch 16K tokens / length). Only the sum is published per length, so it stands for
/// both passes: [`attention_table`] gives `6 / (7/R) = 6R/7`, the sum's own rate in the cost
/// model's FLOPs, whatever the split.
pub const A100_FLASH_ATTENTION_2: [[f64; 3]; 6] = [
    [512.0, 99.0, 99.0],
    [1024.0, 133.0, 133.0],
    [2048.0, 155.0, 155.0],
    [4096.0, 173.0, 173.0],
    [8192.0, 182.0, 182.0],
    [16384.0, 189.0, 189.0],
];

/// `[length, TFLOP/s]` rows for [`Cluster::attention_table`] from `[length, forward, backward]`
/// rows counted as FlashAttention's papers count them: the causal forward is `2·L²·d` FLOPs
/// per head and its backward 2.5× that (`5·L²·d`, recomputing the scores), while the cost
/// model counts `6·L²·d` (a backward of twice the forward), so the rate is `6 / (2/f + 5/b)`.
pub fn attention_table(rows: &[[f64; 3]]) -> Vec<[f64; 2]> {
    rows.iter()
        .map(|&[len, fwd, bwd]| [len, 6.0 / (2.0 / fwd + 5.0 / bwd)])
        .collect()
}

/// NCCL's share of an NVLink's line rate: 370 of 450 GB/s on H100 (the quote above).
pub const NCCL_NVLINK_SHARE: f64 = 370.0 / 450.0;

/// A100-SXM4-80GB: 312 TFLOP/s, MAMF 271.2, HBM2e 2,039 GB/s, NVLink 3 600 GB/s bidirectional.
pub const A100: Device = Device {
    peak_tflops: 312.0,
    gemm_max: 271.2 / 312.0,
    hbm_gbps: 2039.0,
    memory_gib: 80.0,
    nvlink_gbps: 300.0,
    attention: &A100_FLASH_ATTENTION_2,
};

/// A800-SXM4-80GB: an A100 whose NVLink is cut to 400 GB/s bidirectional.
pub const A800: Device = Device {
    nvlink_gbps: 200.0,
    ..A100
};

/// H100-SXM5-80GB: 989 TFLOP/s, MAMF 794.5, HBM3 3,350 GB/s, NVLink 4 900 GB/s bidirectional.
pub const H100: Device = Device {
    peak_tflops: 989.0,
    gemm_max: 794.5 / 989.0,
    hbm_gbps: 3350.0,
    memory_gib: 80.0,
    nvlink_gbps: 450.0,
    attention: &H100_FLASH_ATTENTION_2,
};

impl Device {
    /// `nodes × per_node` of these devices, NVLink inside a node at NCCL's share of its line
    /// rate, `cross` between nodes (per device), GEMMs at the MAMF with the roofline of the HBM,
    /// attention at its measured rates where there are some.
    pub fn cluster(&self, name: &str, nodes: usize, per_node: usize, cross: Link) -> Cluster {
        Cluster {
            efficiency: planner::Efficiency::new(
                self.gemm_max,
                0.0,
                0.0,
                planner::Efficiency::GPU.attention,
            ),
            memory_gbps: self.hbm_gbps,
            attention_table: attention_table(self.attention),
            ..Cluster::new(
                name,
                nodes,
                per_node,
                self.peak_tflops,
                self.memory_gib,
                Link::new(self.nvlink_gbps * NCCL_NVLINK_SHARE, 5.0),
                cross,
            )
        }
    }
}

/// A preset by name: `a800x32` (HotSPa's testbed: 4 nodes × 8 A800-80G, NVLink 400 GB/s
/// bidirectional, InfiniBand 200 GB/s per node — 25 GB/s per device), `h100x8` (one node of 8
/// H100-80G; 400 Gb/s per device to other nodes), `h100x128` and `h100x1024` (16 and 128 such
/// nodes: one 400 Gb/s NIC per GPU, a non-blocking fabric assumed) or `eth8x8` (commodity
/// Ethernet: 8 nodes × 8
/// A100-80G, one 25 Gb/s port per node — 3.125 GB/s for one stream, 0.39 GB/s per device when
/// all eight send — and 30 µs TCP latency). Device figures: [`Device`].
pub fn cluster(name: &str) -> Result<Cluster> {
    let link = |gbps: f64, latency_us: f64| Link { gbps, latency_us };
    match name {
        "a800x32" => Ok(A800.cluster(name, 4, 8, link(200.0 / 8.0, 10.0))),
        "h100x8" => Ok(H100.cluster(name, 1, 8, link(50.0, 8.0))),
        "h100x128" => Ok(H100.cluster(name, 16, 8, link(50.0, 8.0))),
        "h100x1024" => Ok(H100.cluster(name, 128, 8, link(50.0, 8.0))),
        "eth8x8" => Ok(Cluster {
            nic_gbps: 25.0 / 8.0,
            ..A100.cluster(name, 8, 8, link(25.0 / 8.0 / 8.0, 30.0))
        }),
        other => Err(SimError::UnknownPreset {
            what: "cluster",
            name: other.into(),
            known: CLUSTERS.join(", "),
        }),
    }
}

/// A preset name, or a TOML file with the fields of [`Cluster`].
pub fn cluster_or_file(name: &str) -> Result<Cluster> {
    if CLUSTERS.contains(&name) {
        return cluster(name);
    }
    let path = Path::new(name);
    if !path.exists() {
        return cluster(name);
    }
    let text = std::fs::read_to_string(path).map_err(|e| SimError::File {
        path: name.into(),
        reason: e.to_string(),
    })?;
    let c: Cluster = toml::from_str(&text).map_err(|e| SimError::File {
        path: name.into(),
        reason: e.to_string(),
    })?;
    c.validate().map_err(|e| SimError::File {
        path: name.into(),
        reason: e.to_string(),
    })?;
    Ok(c)
}

/// `n` sequence lengths of `dataset` (a preset, or a file of whitespace-separated lengths used
/// in turn, lines starting with `#` comments), each cut to `max_len` as a data loader cuts
/// documents, at least 2.
///
/// `crates-io` is a real corpus with a tail to two million tokens: the 8,900 `.rs` files of the
/// 255 crates.io packages this workspace locks, one document each, in bytes (median 3,823, 1 %
/// above 205K, 38 above 256K, 15 above 512K, 3 above 1M, the longest 2,233,085), drawn
/// uniformly with replacement by `seed`.
///
/// The presets are long-tailed log-normal shapes read off the length CDFs of CommonCrawl and
/// GitHub in the HotSPa paper (Ge et al., SOSP 2024, Fig. 2), not the data itself:
/// `commoncrawl` has median 1,000 tokens and σ = 1.0 (8 % above 4K, 0.3 % above 16K), `github`
/// median 1,500 and σ = 1.4 (24 % above 4K, 4.5 % above 16K).
pub fn lengths(dataset: &str, n: usize, max_len: usize, seed: u64) -> Result<Vec<usize>> {
    let cut = |l: f64| (l.round() as usize).clamp(2, max_len.max(2));
    let (median, sigma): (f64, f64) = match dataset {
        "commoncrawl" => (1000.0, 1.0),
        "github" => (1500.0, 1.4),
        "crates-io" => {
            let all = parse_lengths(CRATES_IO, "crates-io")?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            return Ok((0..n)
                .map(|_| cut(all[rng.random_range(0..all.len())] as f64))
                .collect());
        }
        path if Path::new(path).exists() => {
            let text = std::fs::read_to_string(path).map_err(|e| SimError::File {
                path: path.into(),
                reason: e.to_string(),
            })?;
            let all = parse_lengths(&text, path)?;
            return Ok((0..n).map(|i| cut(all[i % all.len()] as f64)).collect());
        }
        other => {
            return Err(SimError::UnknownPreset {
                what: "dataset",
                name: other.into(),
                known: DATASETS.join(", "),
            })
        }
    };
    // Positive finite parameters: the distribution always exists.
    let dist = LogNormal::new(median.ln(), sigma).map_err(|e| SimError::Invalid(e.to_string()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..n).map(|_| cut(dist.sample(&mut rng))).collect())
}

/// The whitespace-separated lengths of `text` (from `path`), lines starting with `#` skipped.
fn parse_lengths(text: &str, path: &str) -> Result<Vec<usize>> {
    let mut all = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for w in line.split_whitespace() {
            let l: usize = w.parse().map_err(|_| SimError::File {
                path: path.into(),
                reason: format!("line {}: `{w}` is not a length", i + 1),
            })?;
            all.push(l);
        }
    }
    if all.is_empty() {
        return Err(SimError::File {
            path: path.into(),
            reason: "no lengths".into(),
        });
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled corpus is what its script wrote and what the docs say of it; drawn by seed,
    /// cut at the context length.
    #[test]
    fn the_crates_io_corpus_reaches_past_a_million_tokens() {
        let all = parse_lengths(CRATES_IO, "crates-io").unwrap();
        assert_eq!(all.len(), 8900);
        assert!(all.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(all[all.len() / 2], 3823);
        assert_eq!(all.iter().filter(|&&l| l > 262_144).count(), 38);
        assert_eq!(all.iter().filter(|&&l| l > 1 << 20).count(), 3);
        assert_eq!(all.last(), Some(&2_233_085));
        let a = lengths("crates-io", 4096, 1 << 20, 7).unwrap();
        assert_eq!(a, lengths("crates-io", 4096, 1 << 20, 7).unwrap());
        assert_ne!(a, lengths("crates-io", 4096, 1 << 20, 8).unwrap());
        assert!(a.iter().all(|&l| (2..=1 << 20).contains(&l)));
        // 4,096 draws from 8,900 documents of which 38 exceed 256K: about 17 of them.
        let long = a.iter().filter(|&&l| l > 262_144).count();
        assert!((5..=40).contains(&long), "{long}");
        // A comment line is skipped; anything else that is not a length is refused by line.
        assert_eq!(parse_lengths("# x\n3 4\n", "f").unwrap(), [3, 4]);
        assert!(parse_lengths("3\nx\n", "f")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
    }

    #[test]
    fn every_preset_is_known_by_name_and_the_h100_clusters_scale_by_nodes() {
        for name in CLUSTERS {
            assert_eq!(cluster(name).unwrap().name, name);
        }
        let (one, many, most) = (
            cluster("h100x8").unwrap(),
            cluster("h100x128").unwrap(),
            cluster("h100x1024").unwrap(),
        );
        assert_eq!(
            (many.nodes, many.devices(), most.devices()),
            (16, 128, 1024)
        );
        // The same node and links, 400 Gb/s per GPU across nodes.
        assert_eq!(many.cross_node.gbps, 50.0);
        assert_eq!(
            (many.same_node.gbps, many.peak_tflops, most.cross_node.gbps),
            (one.same_node.gbps, one.peak_tflops, one.cross_node.gbps)
        );
        assert!(cluster("h100x16")
            .unwrap_err()
            .to_string()
            .contains("h100x128"));
    }

    #[test]
    fn attention_is_flash_attention_2_as_measured_and_the_cluster_files_agree() {
        let t = attention_table(&H100_FLASH_ATTENTION_2);
        // By hand at 1K, where forward and backward both ran at 260 TFLOP/s: 7 of the paper's
        // FLOP units took the time the model's 6 take, so the model's rate is 6/7 of 260.
        assert!((t[1][1] - 260.0 * 6.0 / 7.0).abs() < 1e-9);
        let h100 = cluster("h100x8").unwrap();
        assert_eq!(h100.attention_table, t);
        // 8K tokens, one head of 128: (2/333 + 5/318)·L²·d seconds per 10¹² FLOP units.
        let s = h100.attention_seconds(8192, 128);
        let by_hand = (2.0 / 333.0 + 5.0 / 318.0) * 8192f64.powi(2) * 128.0 / 1e12;
        assert!((s / by_hand - 1.0).abs() < 1e-12, "{s} vs {by_hand}");
        // A100/A800: the forward and backward together, 173 TFLOP/s at 4K as FlashAttention
        // counts (7·L²·d per head): 6/7 of it as the model counts.
        let a800 = cluster("a800x32").unwrap();
        assert_eq!(
            a800.attention_table,
            attention_table(&A100_FLASH_ATTENTION_2)
        );
        let s = a800.attention_seconds(4096, 128);
        let by_hand = 7.0 * 4096f64.powi(2) * 128.0 / 173e12;
        assert!((s / by_hand - 1.0).abs() < 1e-12, "{s} vs {by_hand}");
        // The cluster files carry the same tables (to the printed 0.1 TFLOP/s).
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/validation/");
        let a100 = attention_table(&A100_FLASH_ATTENTION_2);
        for (file, t) in [
            ("h100-meta.toml", &t),
            ("h200x4.toml", &t),
            ("a100-vela.toml", &a100),
        ] {
            let c = cluster_or_file(&format!("{dir}{file}")).unwrap();
            assert_eq!(c.attention_table.len(), t.len(), "{file}");
            for (a, b) in c.attention_table.iter().zip(t) {
                assert!(
                    a[0] == b[0] && (a[1] - b[1]).abs() < 0.05,
                    "{file}: {a:?} vs {b:?}"
                );
            }
        }
    }
}
