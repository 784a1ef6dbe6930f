//! What the library's integration tests share: a tiny GQA model, sequences of lengths that
//! cycle through a long-tailed list, and a three-step run of them from fixed weights.

#![allow(dead_code)] // each test file uses its part

use std::path::Path;
use std::sync::Arc;

use model::{LlamaConfig, Weights};
use train::{DataSource, Init, StrategySpec, TrainConfig};

/// A 2-layer LLaMA of width 16 over 40 token ids (GQA, untied embeddings).
pub const CONFIG: &str = r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 22, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}"#;

/// `count` sequences whose lengths cycle through `lengths` (2-token ones predict one token).
pub fn sequences(count: u32, lengths: &[u32]) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| {
            let n = lengths[i as usize % lengths.len()];
            (0..n).map(|j| (i * 7 + j * j + 3 * j) % 40).collect()
        })
        .collect()
}

/// Three steps of 8 sequences of `seqs` under `strategy` on `devices` thread ranks, from the
/// weights seed 3 draws, micro-batches of at most `micro_batch_tokens`, lr 3e-3, in order.
pub fn config(
    devices: usize,
    strategy: StrategySpec,
    seqs: Vec<Vec<u32>>,
    micro_batch_tokens: usize,
) -> TrainConfig {
    let model = LlamaConfig::from_json(CONFIG, Path::new("config.json")).unwrap();
    let init = Arc::new(Weights::random(&model, 3));
    let mut cfg = TrainConfig::new(model, DataSource::Sequences(seqs));
    cfg.init = Init::Weights(init);
    cfg.devices = devices;
    cfg.strategy = strategy;
    cfg.global_batch = 8;
    cfg.micro_batch_tokens = vec![micro_batch_tokens];
    cfg.steps = 3;
    cfg.lr.peak = 3e-3;
    cfg.shuffle = false;
    cfg
}

/// Step by step, `got` is `want`'s run: the same number of steps, the losses within 1e-5, the
/// gradient norms within `norm_tol` of each other (relative, at least 1), the same tokens.
pub fn same_steps(
    got: &[train::StepMetrics],
    want: &[train::StepMetrics],
    what: &str,
    norm_tol: f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (a, b) in got.iter().zip(want) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "{what}: step {} loss {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() < norm_tol * b.grad_norm.max(1.0),
            "{what}: step {} gradient norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
        assert_eq!(a.tokens, b.tokens, "{what}: step {} tokens", a.step);
    }
}
