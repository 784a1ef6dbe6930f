//! hotspa against Hugging Face transformers itself: models saved by `save_pretrained`
//! (transformers 5: `rope_parameters`; the older `rope_theta`/`rope_scaling` form; `llama3` and
//! `linear` RoPE scaling; sharded), their RoPE frequencies and the loss of a fixed batch as
//! transformers computed them (`tests/golden/make_golden.py` made the files; `golden.json` has
//! the versions). hotspa's loss must agree to 1e-5.

use std::path::{Path, PathBuf};

use kernels::{Backend, CpuBackend};
use model::{build_graph, load_weights, save_folder, Dtype, LlamaConfig, SaveOptions, Weights};
use runtime::{run, MicroBatch};

fn golden() -> (PathBuf, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

/// hotspa's loss of `batch` (every predicted token once) for the model in `dir`.
fn loss(cfg: &LlamaConfig, w: &Weights, batch: &[Vec<u32>]) -> f64 {
    let mut g = build_graph(cfg).unwrap();
    graph::backward(&mut g).unwrap();
    let cpu = CpuBackend::new(1).unwrap();
    let params: Vec<Vec<f32>> = w.stored().iter().map(|p| cpu.upload(p).unwrap()).collect();
    let predicted: usize = batch.iter().map(|s| s.len() - 1).sum();
    let mb = MicroBatch::pack(batch, 1.0 / predicted as f32).unwrap();
    f64::from(run(&cpu, &g, &params, &mb).unwrap().loss)
}

fn batch(g: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(g["batch"].clone()).unwrap()
}

#[test]
fn transformers_models_give_transformers_losses_and_frequencies() {
    let (dir, g) = golden();
    let b = batch(&g);
    for name in ["tiny", "theta500k", "llama3", "linear", "sharded"] {
        let path = dir.join(name);
        let cfg = LlamaConfig::load(&path).unwrap();
        let want = &g["models"][name];
        // RoPE: transformers' inv_freq (float32), ours in f64.
        let freqs: Vec<f64> = cfg.rope().inv_freq::<f64>(cfg.head_dim());
        let theirs: Vec<f64> = serde_json::from_value(want["inv_freq"].clone()).unwrap();
        assert_eq!(freqs.len(), theirs.len(), "{name}");
        for (a, b) in freqs.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{name}: inv_freq {a} vs {b}"
            );
        }
        let (w, dtype) = load_weights(&cfg, &path).unwrap();
        assert_eq!(dtype, Dtype::F32);
        let got = loss(&cfg, &w, &b);
        let want = want["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-5,
            "{name}: loss {got} vs transformers {want}"
        );
    }
    // Each scaling reads as what it is.
    let llama3 = LlamaConfig::load(&dir.join("llama3")).unwrap();
    assert!(matches!(
        llama3.rope().scaling,
        kernels::RopeScaling::Llama3 { .. }
    ));
    let linear = LlamaConfig::load(&dir.join("linear")).unwrap();
    assert_eq!(
        linear.rope().scaling,
        kernels::RopeScaling::Linear { factor: 2.0 }
    );
    let theta = LlamaConfig::load(&dir.join("theta500k")).unwrap();
    assert_eq!(theta.rope_theta, 500000.0);
}

#[test]
fn sharded_and_single_files_hold_the_same_weights() {
    let (dir, _) = golden();
    let cfg = LlamaConfig::load(&dir.join("tiny")).unwrap();
    let single = Weights::load(&cfg, &dir.join("tiny")).unwrap();
    let sharded = Weights::load(&cfg, &dir.join("sharded")).unwrap();
    assert_eq!(single, sharded);
}

#[test]
fn saved_folders_read_back_in_every_dtype_and_shard_size() {
    let (dir, g) = golden();
    let cfg = LlamaConfig::load(&dir.join("tiny")).unwrap();
    let w = Weights::load(&cfg, &dir.join("tiny")).unwrap();
    let out = tempfile::tempdir().unwrap();
    for (dtype, shard_bytes) in [
        (Dtype::F32, usize::MAX),
        (Dtype::F32, 20_000),
        (Dtype::Bf16, 30_000),
        (Dtype::F16, usize::MAX),
    ] {
        let at = out.path().join(format!("{dtype}-{shard_bytes}"));
        let opts = SaveOptions {
            dtype,
            shard_bytes,
            extra_files: vec![
                model::CarriedFile::read(&dir.join("tokenizer/tokenizer.json")).unwrap(),
            ],
        };
        save_folder(&at, &cfg, &w, &opts).unwrap();
        assert_eq!(
            at.join("model.safetensors.index.json").is_file(),
            shard_bytes < 80_000
        );
        assert!(at.join("tokenizer.json").is_file() && at.join("generation_config.json").is_file());
        // The config reads back as the same model; the weights as the dtype rounds them.
        let back = LlamaConfig::load(&at).unwrap();
        assert!(back.same_model(&cfg) && back.eos_token_id == cfg.eos_token_id);
        let (r, d) = load_weights(&back, &at).unwrap();
        assert_eq!(d, dtype);
        let (_, worst) = r.worst_difference(&w);
        let tol = match dtype {
            Dtype::F32 => 0.0,
            Dtype::Bf16 => 2e-3,
            Dtype::F16 => 1e-4,
        };
        assert!(worst <= tol, "{dtype}: {worst}");
        let l = loss(&back, &r, &batch(&g));
        let want = g["models"]["tiny"]["loss"].as_f64().unwrap();
        assert!((l - want).abs() < if dtype == Dtype::F32 { 1e-5 } else { 1e-2 });
    }
    // A folder is not written over unless hotspa wrote all of it: save_folder replaces only a
    // missing or empty directory, or one whose every entry its manifest lists.
    let busy = out.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"1").unwrap();
    let e = save_folder(&busy, &cfg, &w, &SaveOptions::default()).unwrap_err();
    assert!(e.to_string().contains("was not written by hotspa"), "{e}");
    assert!(busy.join("x").is_file());
    let ours = out.path().join("ours");
    save_folder(&ours, &cfg, &w, &SaveOptions::default()).unwrap();
    save_folder(&ours, &cfg, &w, &SaveOptions::default()).unwrap();
    std::fs::write(ours.join("notes.txt"), b"mine").unwrap();
    let e = save_folder(&ours, &cfg, &w, &SaveOptions::default()).unwrap_err();
    assert!(e.to_string().contains("did not write (notes.txt)"), "{e}");
    assert_eq!(std::fs::read(ours.join("notes.txt")).unwrap(), b"mine");
    // A saved folder's weights are verified against its manifest when loaded.
    std::fs::remove_file(ours.join("notes.txt")).unwrap();
    let (_, _, checked) = model::load_weights_checked(&cfg, &ours).unwrap();
    assert!(
        matches!(checked, model::Checksums::Verified { files: 2, .. }),
        "{checked:?}"
    );
    let st = ours.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x40;
    std::fs::write(&st, bytes).unwrap();
    let e = load_weights(&cfg, &ours).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
}

#[test]
fn broken_shard_indexes_are_refused_naming_the_file() {
    let (dir, _) = golden();
    let cfg = LlamaConfig::load(&dir.join("tiny")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = out.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(dir.join("sharded")).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let gone = copy("gone");
    std::fs::remove_file(gone.join("model-00002-of-00005.safetensors")).unwrap();
    let e = Weights::load(&cfg, &gone).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00005.safetensors"), "{e}");
    let escape = copy("escape");
    let index = escape.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replacen("model-00001-of-00005", "../model-00001-of-00005", 1),
    )
    .unwrap();
    let e = Weights::load(&cfg, &escape).unwrap_err().to_string();
    assert!(e.contains("not a file name in this folder"), "{e}");
}

#[test]
fn generation_with_a_kv_cache_matches_transformers() {
    let (dir, g) = golden();
    let cfg = LlamaConfig::load(&dir.join("tiny")).unwrap();
    let w = Weights::load(&cfg, &dir.join("tiny")).unwrap();
    let gen = &g["generate"];
    // Token by token through the cache: every position's logits as transformers' full forward.
    let seq: Vec<u32> = serde_json::from_value(gen["sequence"].clone()).unwrap();
    let want: Vec<Vec<f64>> = serde_json::from_value(gen["logits"].clone()).unwrap();
    let mut dec = model::Generator::new(&cfg, &w).unwrap();
    for (t, row) in seq.iter().zip(&want) {
        let got = dec.step(*t).unwrap();
        for (a, b) in got.iter().zip(row) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4,
                "position {}: {a} vs {b}",
                dec.len()
            );
        }
    }
    // The prompt's prefill in one pass: the last position's logits as transformers', and the
    // cache it leaves goes on as transformers' forward does.
    let close = |got: &[f32], row: &[f64], at: usize| {
        for (a, b) in got.iter().zip(row) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4,
                "prefill, position {at}: {a} vs {b}"
            );
        }
    };
    for cut in [2, seq.len() / 2, seq.len() - 1] {
        let mut dec = model::Generator::new(&cfg, &w).unwrap();
        close(&dec.prefill(&seq[..cut]).unwrap(), &want[cut - 1], cut);
        assert_eq!(dec.len(), cut);
        close(&dec.step(seq[cut]).unwrap(), &want[cut], cut + 1);
    }
    // Greedy continuation: transformers' generate(do_sample=False).
    let prompt: Vec<u32> = serde_json::from_value(gen["prompt"].clone()).unwrap();
    let greedy: Vec<u32> = serde_json::from_value(gen["greedy"].clone()).unwrap();
    let mut streamed = Vec::new();
    let stop = cfg
        .eos_token_id
        .as_ref()
        .map(|e| e.ids())
        .unwrap_or_default();
    let got = model::generate(
        &cfg,
        &w,
        &prompt,
        greedy.len(),
        &model::Sampling::greedy(),
        &stop,
        &mut |t| {
            streamed.push(t);
            true
        },
    )
    .unwrap();
    assert_eq!(got, greedy);
    assert_eq!(streamed, greedy);
    // Sampling is reproducible from the seed, and differs between seeds.
    let s = |seed| model::Sampling {
        temperature: 1.0,
        top_k: 20,
        top_p: 0.9,
        seed,
    };
    let run = |seed| model::generate(&cfg, &w, &prompt, 8, &s(seed), &[], &mut |_| true).unwrap();
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    assert!(model::generate(
        &cfg,
        &w,
        &[],
        4,
        &model::Sampling::greedy(),
        &[],
        &mut |_| true
    )
    .is_err());
}
