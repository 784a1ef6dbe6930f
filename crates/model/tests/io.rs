//! Config parsing and safetensors I/O, checked against files written by hand in the safetensors
//! layout (8-byte little-endian header length, JSON header, raw little-endian data), not through
//! the crate under test.

use std::path::Path;

use model::{param_specs, LlamaConfig, ModelError, Weights};

const TINY: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "vocab_size": 32, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
  "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 128, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "bos_token_id": 1
}"#;

fn tiny() -> LlamaConfig {
    LlamaConfig::from_json(TINY, Path::new("tiny.json")).unwrap()
}

/// A safetensors file written by hand: `tensors` are (name, dtype, shape, raw bytes).
fn handmade(tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, b) in tensors {
        out.extend(b);
    }
    out
}

#[test]
fn config_reads_hf_fields_and_defaults() {
    let c = tiny();
    assert_eq!((c.kv_heads(), c.head_dim(), c.rope_theta), (1, 4, 500000.0));
    let minimal = LlamaConfig::from_json(
        r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        Path::new("c.json"),
    )
    .unwrap();
    assert_eq!(minimal.kv_heads(), 2);
    assert_eq!(minimal.rms_norm_eps, 1e-6);
    assert_eq!(minimal.rope_theta, 10000.0);
    assert!(!minimal.tie_word_embeddings);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), TINY).unwrap();
    assert_eq!(LlamaConfig::load(dir.path()).unwrap(), c);
}

#[test]
fn config_errors_name_the_fault() {
    let e = LlamaConfig::from_json(
        r#"{"hidden_size": 8, "num_attention_heads": 2}"#,
        Path::new("m/config.json"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "m/config.json: config lacks required field(s): vocab_size, intermediate_size, num_hidden_layers"
    );
    let e = LlamaConfig::from_json("{not json", Path::new("x.json")).unwrap_err();
    assert!(matches!(e, ModelError::ConfigSyntax { .. }), "{e}");
    let e = LlamaConfig::from_json(
        &TINY.replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 3"),
        Path::new("x"),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of num_key_value_heads 3"),
        "{e}"
    );
    let e = LlamaConfig::from_json(
        &TINY.replace(
            "\"bos_token_id\": 1",
            "\"rope_scaling\": {\"type\": \"linear\"}",
        ),
        Path::new("x"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("rope_scaling"), "{e}");
    let e = LlamaConfig::load(Path::new("/nonexistent/dir/config.json")).unwrap_err();
    assert!(
        e.to_string().starts_with("/nonexistent/dir/config.json: "),
        "{e}"
    );
}

#[test]
fn catalogue_matches_hf_llama() {
    let c = tiny();
    let specs = param_specs(&c);
    assert_eq!(specs.len(), 1 + 2 * 9 + 2);
    assert_eq!(specs[0].name, "model.embed_tokens.weight");
    assert_eq!(specs[4].name, "model.layers.0.self_attn.o_proj.weight");
    assert_eq!(specs[4].shape, vec![8, 8]);
    assert_eq!(specs[7].name, "model.layers.0.mlp.down_proj.weight");
    assert_eq!(specs[7].shape, vec![8, 12]);
    assert_eq!(specs.last().unwrap().name, "lm_head.weight");
    assert!(!specs[8].weight_decay() && specs[8].name.ends_with("input_layernorm.weight"));
    let mut tied = c.clone();
    tied.tie_word_embeddings = true;
    assert_eq!(param_specs(&tied).last().unwrap().name, "model.norm.weight");
}

#[test]
fn save_then_load_is_exact_and_hf_shaped() {
    let c = tiny();
    let w = Weights::random(&c, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    w.save(&path).unwrap();
    w.save(&path).unwrap(); // overwriting is fine
    assert_eq!(Weights::load(&c, &path).unwrap(), w);
    // Read the header ourselves: HF names, F32, HF's format metadata.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(
        header["model.layers.1.self_attn.k_proj.weight"]["dtype"],
        "F32"
    );
    assert_eq!(
        header["model.layers.1.self_attn.k_proj.weight"]["shape"],
        serde_json::json!([4, 8])
    );
    // Nothing but the file is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Random init: norm weights 1, the rest ~N(0, 0.02), reproducible from the seed.
    assert!(w
        .get("model.norm.weight")
        .unwrap()
        .iter()
        .all(|&v| v == 1.0));
    let e = w.get("model.embed_tokens.weight").unwrap();
    let std = (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.004, "std {std}");
    assert_eq!(Weights::random(&c, 7), w);
    assert_ne!(Weights::random(&c, 8), w);
}

#[test]
fn bf16_and_f16_files_load_and_extras_are_handled_like_hf() {
    let c = tiny();
    let specs = param_specs(&c);
    let mut tensors = Vec::new();
    for (k, s) in specs.iter().enumerate() {
        let (dtype, bytes): (&str, Vec<u8>) = if k % 2 == 0 {
            // bf16 of 1 + k/8 … written as raw bits: value = (k as f32 / 8 + 1).
            let v = half::bf16::from_f32(1.0 + k as f32 / 8.0);
            (
                "BF16",
                (0..s.numel()).flat_map(|_| v.to_le_bytes()).collect(),
            )
        } else {
            let v = half::f16::from_f32(-0.5 - k as f32 / 16.0);
            (
                "F16",
                (0..s.numel()).flat_map(|_| v.to_le_bytes()).collect(),
            )
        };
        tensors.push((s.name.clone(), dtype, s.shape.clone(), bytes));
    }
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        "F32",
        vec![2],
        vec![0; 8],
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, handmade(&tensors)).unwrap();
    let w = Weights::load(&c, &path).unwrap();
    for (k, s) in specs.iter().enumerate() {
        let want = if k % 2 == 0 {
            1.0 + k as f32 / 8.0
        } else {
            -0.5 - k as f32 / 16.0
        };
        assert!(
            w.get(&s.name).unwrap().iter().all(|&v| v == want),
            "{}",
            s.name
        );
    }
    // An unknown tensor is refused, naming it.
    tensors.push((
        "model.layers.9.mlp.extra".into(),
        "F32",
        vec![1],
        vec![0; 4],
    ));
    std::fs::write(&path, handmade(&tensors)).unwrap();
    let e = Weights::load(&c, &path).unwrap_err();
    assert!(
        e.to_string()
            .contains("unexpected tensor(s) for this config: model.layers.9.mlp.extra"),
        "{e}"
    );
}

#[test]
fn bad_files_are_refused_naming_file_and_fault() {
    let c = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    Weights::random(&c, 1).save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();

    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let e = Weights::load(&c, &path).unwrap_err();
    assert!(matches!(e, ModelError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: not a valid safetensors file", path.display())),
        "{e}"
    );

    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(
        Weights::load(&c, &path),
        Err(ModelError::Corrupt { .. })
    ));

    // Each case: every tensor as the config wants it, one thing broken, the message naming it.
    let specs = param_specs(&c);
    type Handmade = Vec<(String, &'static str, Vec<usize>, Vec<u8>)>;
    type Break<'a> = &'a dyn Fn(&mut Handmade);
    let cases: [(Break, &str); 3] = [
        (
            &|t| {
                t.remove(3);
            },
            "missing tensor(s): model.layers.0.self_attn.v_proj.weight",
        ),
        (
            &|t| t[1].2 = vec![4, 16],
            "q_proj.weight: shape [4, 16], the config needs [8, 8]",
        ),
        (
            &|t| t[2].3[..4].copy_from_slice(&f32::NAN.to_le_bytes()),
            "k_proj.weight: value NaN at index 0 is not finite",
        ),
    ];
    for (break_it, says) in cases {
        let mut tensors: Handmade = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    "F32",
                    s.shape.clone(),
                    vec![0u8; 4 * s.numel()],
                )
            })
            .collect();
        break_it(&mut tensors);
        std::fs::write(&path, handmade(&tensors)).unwrap();
        let e = Weights::load(&c, &path).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
}
