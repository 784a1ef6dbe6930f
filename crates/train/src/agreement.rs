//! Under `mpirun`, the processes agree before the first step or stop together: every rank's
//! pre-flight verdict is shared (a check that fails on one rank — an output only rank 0 writes,
//! a data file missing on one node — stops every rank at once with that rank's reason, instead
//! of leaving the others to time out blaming it), and every rank's effective settings (flags,
//! model config, data and initial weights by content, strategy, seeds, codecs) are compared: a
//! difference stops every rank naming the setting and the ranks.

use std::collections::BTreeMap;

use comm::{words, Communicator};

use crate::error::{Result, TrainError};

/// The settings every rank must share, as one JSON object: `record` (a checkpoint's record of
/// the run) without the paths that may differ between nodes, and `extra` fields.
pub fn comparable(
    mut record: serde_json::Value,
    extra: &[(&str, serde_json::Value)],
) -> serde_json::Value {
    if let Some(o) = record.as_object_mut() {
        for path in ["data", "model", "init", "tokenizer"] {
            o.remove(path);
        }
        for (k, v) in extra {
            o.insert((*k).to_string(), v.clone());
        }
    }
    record
}

/// A cheap fingerprint of weights: every tensor's shape and a strided sample of its values
/// (each 997th, and the first and last 64), bit for bit. Two different weight files differ in it
/// beyond doubt; it costs a few reads per megabyte, not a hash of gigabytes.
pub fn weights_fingerprint(w: &model::Weights) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in w.tensors() {
        h.update((t.len() as u64).to_le_bytes());
        let n = t.len();
        let head = t.iter().take(64);
        let tail = t.iter().skip(n.saturating_sub(64));
        let strided = t.iter().step_by(997);
        for v in head.chain(tail).chain(strided) {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// Bytes as 64-bit words (the last zero-padded), their count first.
fn to_words(bytes: &[u8]) -> Vec<u64> {
    let mut out = vec![bytes.len() as u64];
    out.extend(bytes.chunks(8).map(|c| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    }));
    out
}

fn from_words(w: &[u64]) -> Vec<u8> {
    let n = w.first().copied().unwrap_or(0) as usize;
    let mut out: Vec<u8> = w.iter().skip(1).flat_map(|x| x.to_le_bytes()).collect();
    out.truncate(n);
    out
}

/// Every member's `bytes`, in rank order.
fn all_gather_bytes(world: &dyn Communicator, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mine = to_words(bytes);
    let lens = words::all_gather(world, mine.len() as u64)?;
    let counts: Vec<usize> = lens.iter().map(|&l| 2 * l as usize).collect();
    let mut all = vec![0.0f32; counts.iter().sum()];
    world.all_gather(&words::encode(&mine), &mut all, &counts)?;
    let mut out = Vec::with_capacity(counts.len());
    let mut at = 0;
    for c in counts {
        out.push(from_words(&words::decode(&all[at..at + c])?));
        at += c;
    }
    Ok(out)
}

/// Shares this rank's pre-flight verdict (and, when it passed, its `settings`) with every
/// other: all ranks return `local` when every rank passed with the same settings, else every
/// rank returns an error naming the first failing rank and its reason, or the settings that
/// differ and the ranks that have them. Every rank must call it once, at the same point.
pub fn agree<T>(
    world: &dyn Communicator,
    local: Result<T>,
    settings: impl FnOnce(&T) -> serde_json::Value,
) -> Result<T> {
    let me = world.rank().0;
    let (verdict, text) = match &local {
        Ok(v) => (0u8, serde_json::to_string(&settings(v)).unwrap_or_default()),
        Err(e) => (1u8, e.to_string()),
    };
    let mut msg = vec![verdict];
    msg.extend_from_slice(text.as_bytes());
    let all = all_gather_bytes(world, &msg)?;
    if let Some((r, m)) = all.iter().enumerate().find(|(_, m)| m.first() == Some(&1)) {
        if r == me {
            return local;
        }
        return Err(TrainError::Rank {
            rank: r,
            reason: format!(
                "stopped every MPI rank before the first step: {}",
                String::from_utf8_lossy(&m[1..])
            ),
        });
    }
    let parsed: Vec<BTreeMap<String, serde_json::Value>> = all
        .iter()
        .map(|m| serde_json::from_slice(&m[1..]).unwrap_or_default())
        .collect();
    let mut differ = Vec::new();
    let keys: std::collections::BTreeSet<&String> = parsed.iter().flat_map(|p| p.keys()).collect();
    for k in keys {
        let mut by_value: Vec<(String, Vec<usize>)> = Vec::new();
        for (r, p) in parsed.iter().enumerate() {
            let v = p.get(k).map_or("(absent)".to_string(), |v| v.to_string());
            match by_value.iter_mut().find(|(x, _)| *x == v) {
                Some((_, ranks)) => ranks.push(r),
                None => by_value.push((v, vec![r])),
            }
        }
        if by_value.len() > 1 {
            let parts: Vec<String> = by_value
                .iter()
                .map(|(v, ranks)| format!("{v} on rank(s) {ranks:?}"))
                .collect();
            differ.push(format!("{k}: {}", parts.join(", ")));
        }
    }
    if !differ.is_empty() {
        return Err(TrainError::setting(
            "mpi",
            format!(
                "the MPI ranks were launched with different settings — {}; every rank must run \
                 the same flags, model and data (by content)",
                differ.join("; ")
            ),
        ));
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::ThreadComm;

    #[test]
    fn a_failing_rank_stops_all_and_different_settings_are_named() {
        // Rank 2 fails its checks: every rank stops with its reason.
        let out = ThreadComm::run(4, |c| -> Result<String> {
            let local: Result<u32> = if c.rank().0 == 2 {
                Err(TrainError::setting("metrics", "m.jsonl is a directory"))
            } else {
                Ok(1)
            };
            Ok(match agree(&c, local, |_| serde_json::json!({"lr": 1})) {
                Ok(_) => "ok".into(),
                Err(e) => e.to_string(),
            })
        })
        .unwrap();
        assert_eq!(out[2], "metrics: m.jsonl is a directory");
        for r in [0, 1, 3] {
            assert!(
                out[r].starts_with("rank 2: stopped every MPI rank before the first step: metrics: m.jsonl is a directory"),
                "{}",
                out[r]
            );
        }
        // Rank 1 has another learning rate: every rank names it.
        let out = ThreadComm::run(3, |c| -> Result<String> {
            let lr = if c.rank().0 == 1 { 0.001 } else { 0.0003 };
            Ok(
                match agree(&c, Ok(()), |_| serde_json::json!({"lr": lr, "steps": 5})) {
                    Ok(()) => "ok".into(),
                    Err(e) => e.to_string(),
                },
            )
        })
        .unwrap();
        for o in &out {
            assert!(
                o.contains("lr: 0.0003 on rank(s) [0, 2], 0.001 on rank(s) [1]")
                    && !o.contains("steps"),
                "{o}"
            );
        }
        // The same everywhere: each rank keeps its own value.
        let out = ThreadComm::run(2, |c| {
            agree(&c, Ok(c.rank().0), |_| serde_json::json!({"a": 1}))
        })
        .unwrap();
        assert_eq!(out, vec![0, 1]);
    }
}
