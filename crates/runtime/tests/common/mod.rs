//! What the runtime's multi-rank tests share: a tiny LLaMA (vocabulary 23, hidden 16, MLP 22,
//! 4 heads: none a multiple of every TP degree) and long-tailed token sequences.

#![allow(dead_code)]

use std::path::Path;

use model::LlamaConfig;
use runtime::MicroBatch;

/// The tiny LLaMA with `layers` layers, `kv` KV heads, tied embeddings or not, and RMSNorm's
/// epsilon (`None`: HF's default).
pub fn config(layers: usize, kv: usize, tied: bool, eps: Option<f64>) -> LlamaConfig {
    let eps = eps.map_or(String::new(), |e| format!(r#", "rms_norm_eps": {e:e}"#));
    let json = format!(
        r#"{{"vocab_size": 23, "hidden_size": 16, "intermediate_size": 22,
            "num_hidden_layers": {layers}, "num_attention_heads": 4, "num_key_value_heads": {kv},
            "tie_word_embeddings": {tied}{eps}}}"#
    );
    LlamaConfig::from_json(&json, Path::new("test")).unwrap()
}

/// Sequences of `lens` tokens (ids below 23), varied by `salt`.
pub fn sequences(lens: &[usize], salt: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((i * 7 + k * 5 + salt * 11 + i * i) % 23) as u32)
                .collect()
        })
        .collect()
}

/// The micro-batches of DP replica `d` of `dp`: `seqs` dealt round-robin, packed two by two.
pub fn micro_batches(seqs: &[Vec<u32>], dp: usize, d: usize, scale: f32) -> Vec<MicroBatch> {
    let mine: Vec<Vec<u32>> = seqs.iter().skip(d).step_by(dp).cloned().collect();
    mine.chunks(2)
        .map(|c| MicroBatch::pack(c, scale).unwrap())
        .collect()
}

/// The largest absolute difference between `got` and `want`, and the largest `|want|`.
pub fn worst(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (worst, scale)
}
