//! Cluster presets, cluster files (TOML) and sequence-length distributions.

use std::path::Path;

use planner::{Cluster, Link};
use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal};

use crate::error::{Result, SimError};

/// The cluster presets.
pub const CLUSTERS: [&str; 3] = ["a800x32", "h100x8", "eth8x8"];

/// The dataset presets.
pub const DATASETS: [&str; 2] = ["commoncrawl", "github"];

/// A preset by name: `a800x32` (HotSPa's testbed: 4 nodes × 8 A800-80G, NVLink 400 GB/s,
/// 200 GB/s between nodes), `h100x8` (one node of 8 H100-80G, NVLink 900 GB/s) or `eth8x8`
/// (commodity Ethernet: 8 nodes × 8 A100-80G, NVLink 300 GB/s inside a node, one 25 Gb/s port
/// per node — 3.125 GB/s for one stream, 0.39 GB/s per device when all eight send — and 30 µs
/// TCP latency).
pub fn cluster(name: &str) -> Result<Cluster> {
    let link = |gbps: f64, latency_us: f64| Link { gbps, latency_us };
    match name {
        "a800x32" => Ok(Cluster::new(
            name,
            4,
            8,
            312.0,
            80.0,
            link(400.0, 5.0),
            link(200.0, 10.0),
        )),
        "h100x8" => Ok(Cluster::new(
            name,
            1,
            8,
            989.0,
            80.0,
            link(900.0, 3.0),
            link(400.0, 8.0),
        )),
        "eth8x8" => Ok(Cluster {
            nic_gbps: 25.0 / 8.0,
            ..Cluster::new(
                name,
                8,
                8,
                312.0,
                80.0,
                link(300.0, 5.0),
                link(25.0 / 8.0 / 8.0, 30.0),
            )
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
/// in turn), each cut to `max_len` as a data loader cuts documents, at least 2.
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
        path if Path::new(path).exists() => {
            let text = std::fs::read_to_string(path).map_err(|e| SimError::File {
                path: path.into(),
                reason: e.to_string(),
            })?;
            let mut all = Vec::new();
            for (i, line) in text.lines().enumerate() {
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
