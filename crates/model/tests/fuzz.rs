//! The parsers of files users bring — `config.json`, safetensors weights, a checkpoint's
//! `state.json` — on arbitrary and mutated bytes: never a panic, always a result, every error
//! with a message. Cases: `HOTSPA_FUZZ_CASES` (default 256 each; the CI runs the default).

use std::path::Path;

use model::{Checkpoint, LlamaConfig, Weights};
use proptest::prelude::*;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
  "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2,
  "head_dim": 4, "hidden_act": "silu", "hidden_size": 8, "initializer_range": 0.02,
  "intermediate_size": 12, "max_position_embeddings": 64, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 1,
  "num_key_value_heads": 1, "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
  "tie_word_embeddings": false, "transformers_version": "5.24.0", "use_cache": true,
  "vocab_size": 16}"#;

fn cases() -> u32 {
    std::env::var("HOTSPA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn cfg() -> LlamaConfig {
    LlamaConfig::from_json(CONFIG, Path::new("config.json")).unwrap()
}

/// `bytes` with the mutations applied: (position, new byte) overwrites, then a cut.
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let n = bytes.len().max(1);
    for &(at, b) in flips {
        if let Some(x) = bytes.get_mut(at % n) {
            *x = b;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (n + 1));
    }
    bytes
}

/// JSON values to put in a config's fields.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[a-z_]{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!({"rope_type": "llama3", "factor": 8.0})),
        Just(serde_json::json!([1, 2])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn config_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = LlamaConfig::from_json(&text, Path::new("c.json")) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn mutated_configs_are_read_or_refused(
        edits in proptest::collection::vec(("[a-z_]{1,24}", json_value(), any::<bool>()), 0..6)
    ) {
        let mut v: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
        let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        for (k, val, existing) in edits {
            let key = if existing { keys[k.len() % keys.len()].clone() } else { k };
            v.as_object_mut().unwrap().insert(key, val);
        }
        match LlamaConfig::from_json(&v.to_string(), Path::new("c.json")) {
            Ok(c) => prop_assert!(c.validate().is_ok()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn mutated_weights_files_are_read_or_refused(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        Weights::random(&cfg(), 1).save(&path).unwrap();
        let bytes = mutate(std::fs::read(&path).unwrap(), &flips, cut);
        std::fs::write(&path, &bytes).unwrap();
        match Weights::load(&cfg(), &path) {
            Ok(w) => prop_assert!(w.tensors().iter().flatten().all(|x| x.is_finite())),
            Err(e) => prop_assert!(e.to_string().contains("w.safetensors"), "{}", e),
        }
    }

    #[test]
    fn mutated_checkpoint_states_are_read_or_refused(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let w = Weights::random(&cfg(), 2);
        let ck = Checkpoint {
            step: 7,
            weights: w.clone(),
            exp_avg: w.clone(),
            exp_avg_sq: w,
            run: serde_json::json!({"seed": 1}),
            state: [("rank0/x".to_string(), vec![1.0, 2.0])].into(),
        };
        let at = ck.save(dir.path(), &cfg()).unwrap();
        let state = at.join("state.json");
        let bytes = mutate(std::fs::read(&state).unwrap(), &flips, cut);
        std::fs::write(&state, &bytes).unwrap();
        if let Err(e) = Checkpoint::load(dir.path(), &cfg()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
