//! Real models and data in and out, as a user runs them: a model folder saved by transformers
//! (`crates/model/tests/golden/`), its tokenizer and weights used by default, `hotspa eval`
//! giving transformers' loss, a saved folder read back, generation, held-out evaluation during
//! a run, and every flag changing what runs.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/golden")
}

use common::run as hotspa;

fn ok(o: Output) -> (String, String) {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.lines().last().unwrap()).unwrap()
}

/// The fixed batch of the goldens as JSONL `input_ids` records.
fn batch_jsonl(dir: &Path) -> PathBuf {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("golden.json")).unwrap())
            .unwrap();
    let mut text = String::new();
    for seq in g["batch"].as_array().unwrap() {
        text += &serde_json::json!({ "input_ids": seq }).to_string();
        text.push('\n');
    }
    let p = dir.join("batch.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn texts(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for t in [
        "hot switching moves the weights between strategies inside one step",
        "Short sequences train under DP, long ones under TP.",
        "the loss is the sum over every sequence and position",
        "parallelism hot switching: inside one training step",
    ] {
        text += &serde_json::json!({ "text": t }).to_string();
        text.push('\n');
    }
    let p = dir.join("texts.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn eval_gives_transformers_loss_under_any_strategy() {
    let d = tempfile::tempdir().unwrap();
    let data = batch_jsonl(d.path());
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("golden.json")).unwrap())
            .unwrap();
    for name in ["tiny", "llama3", "sharded"] {
        let want = g["models"][name]["loss"].as_f64().unwrap();
        for (devices, strategy) in [("1", "dp1"), ("4", "dp2tp2"), ("2", "pp2")] {
            let model = golden().join(name);
            let (out, err) = ok(hotspa(&[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--devices",
                devices,
                "--strategy",
                strategy,
                "--json",
            ]));
            let got = json(&out)["loss"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "{name} {strategy}: {got} vs {want}\n{err}"
            );
        }
    }
    // A folder without weights, and random weights, are refused.
    let bare = d.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(golden().join("tiny/config.json"), bare.join("config.json")).unwrap();
    let o = hotspa(&common::cmd!["eval --model", &bare, "--data", &data]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds no weights"));
}

#[test]
fn a_model_folder_brings_its_weights_and_tokenizer_and_a_run_saves_one() {
    let d = tempfile::tempdir().unwrap();
    let data = texts(d.path());
    let tiny = golden().join("tiny");
    let out = d.path().join("out");
    let m = d.path().join("m.jsonl");
    let held = batch_jsonl(d.path());
    let (_, err) = ok(hotspa(&common::cmd![
        "train --model",
        &tiny,
        "--data",
        &data,
        "--steps 4 --global-batch 2 --save",
        &out,
        "--save-dtype bf16 --metrics",
        &m,
        "--eval-data",
        &held,
        "--eval-every 2"
    ]));
    assert!(
        err.contains(&format!(
            "initial weights from {} (f32; no checksums to verify",
            tiny.display()
        )),
        "{err}"
    );
    assert!(err.contains("held-out loss"), "{err}");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(cfg["rope_parameters"]["rope_type"], "default");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&m)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<u64> = lines
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![2, 4]);
    // The saved folder is a model folder: eval reads it (bf16 weights, its tokenizer).
    let (o, _) = ok(hotspa(&common::cmd![
        "eval --model",
        &out,
        "--data",
        &data,
        "--json"
    ]));
    assert!(json(&o)["loss"].as_f64().unwrap().is_finite());
    // Saving into it again is refused before training, and so is a too-small vocabulary.
    let o = hotspa(&common::cmd![
        "train --model",
        &tiny,
        "--data",
        &data,
        "--save",
        &out
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("holds another run's model") && e.contains("--force"),
        "{e}"
    );
}

/// `hotspa train` on the golden folder with `extra`: the first step's tokens and loss.
fn first_step(d: &Path, extra: &[&str]) -> (u64, f64, String) {
    let data = texts(d);
    let tiny = golden().join("tiny");
    let m = d.join(format!(
        "m{}.jsonl",
        extra.join("_").replace(['-', '/', '.'], "")
    ));
    let mut args = common::cmd![
        "train --model",
        &tiny,
        "--data",
        &data,
        "--steps 1 --global-batch 4 --shuffle off --metrics",
        &m
    ];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    let (_, err) = ok(hotspa(&args));
    let v = json(&std::fs::read_to_string(&m).unwrap());
    (
        v["tokens"].as_u64().unwrap(),
        v["loss"].as_f64().unwrap(),
        err,
    )
}

#[test]
fn every_model_and_data_flag_changes_what_runs() {
    let d = tempfile::tempdir().unwrap();
    let (tokens, loss, _) = first_step(d.path(), &[]);
    // --append-eos: one more token per document.
    let (t, _, _) = first_step(d.path(), &["--append-eos"]);
    assert_eq!(t, tokens + 4);
    // --init random: other weights, another loss.
    let (_, l, err) = first_step(d.path(), &["--init", "random"]);
    assert!(
        (l - loss).abs() > 1e-3
            && err.contains("initial weights: random")
            && !err.contains("initial weights from"),
        "{l} {loss}"
    );
    // --tokenizer bytes: byte ids (refused here: the model's vocabulary is 96).
    let o = hotspa(&[
        "train",
        "--model",
        golden().join("tiny").to_str().unwrap(),
        "--data",
        texts(d.path()).to_str().unwrap(),
        "--tokenizer",
        "bytes",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("text is byte-tokenized (256 ids) but the model's vocabulary is 96"));
    // --tokenizer PATH: the same tokenizer given explicitly gives the same tokens.
    let tok = golden().join("tokenizer/tokenizer.json");
    let (t, l, _) = first_step(d.path(), &["--tokenizer", tok.to_str().unwrap()]);
    assert_eq!((t, l), (tokens, loss));
    // --init FOLDER: another model's weights.
    let (_, l, _) = first_step(
        d.path(),
        &["--init", golden().join("theta500k").to_str().unwrap()],
    );
    assert!((l - loss).abs() > 1e-3);
}

#[test]
fn generate_continues_a_prompt_reproducibly() {
    let tiny = golden().join("tiny");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            tiny.to_str().unwrap(),
            "--prompt",
            "hot switching",
            "--max-new-tokens",
            "6",
        ];
        args.extend(extra);
        ok(hotspa(&args)).0
    };
    let greedy = run(&[]);
    assert!(greedy.starts_with("hot switching"), "{greedy}");
    assert_eq!(greedy, run(&[]));
    let a = run(&["--temperature", "1.0", "--seed", "1"]);
    assert_eq!(a, run(&["--temperature", "1.0", "--seed", "1"]));
    assert_ne!(
        a,
        run(&["--temperature", "1.0", "--seed", "2", "--top-k", "50"])
    );
    // Out-of-range flags are refused by their names before anything is printed.
    for (flag, value, needle) in [
        ("--temperature", "-1", "--temperature -1 is out of range"),
        (
            "--top-p",
            "0",
            "--top-p 0 is out of range: must be in (0, 1]",
        ),
    ] {
        let o = hotspa(&[
            "generate",
            "--model",
            tiny.to_str().unwrap(),
            "--prompt",
            "x",
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{err}");
        assert!(o.stdout.is_empty() && !o.status.success());
    }
    // Past max_position_embeddings (64 here): only when asked, with a note saying so.
    let note = "beyond the model's max_position_embeddings (64)";
    let six = ["--max-new-tokens", "6", "--past-max-positions"];
    assert!(!generated(&tiny, "hot", &six).1.contains(note));
    let long = "hot switching ".repeat(8);
    assert!(generated(&tiny, &long, &six).1.contains(note));
}

/// `hotspa generate --model MODEL --prompt PROMPT` and `extra`: stdout and stderr (it must
/// succeed).
fn generated(model: &Path, prompt: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
    ];
    args.extend(extra);
    ok(hotspa(&args))
}

/// [`generated`]'s text for the prompt "hot switching".
fn continued(model: &Path, extra: &[&str]) -> String {
    generated(model, "hot switching", extra).0
}

/// The model folder's generation_config.json gives the defaults transformers' generate() takes
/// from it (sampling, its settings, stop ids, length); a flag overrides it, `none` drops it,
/// and a field that would change the tokens without being implemented is refused by name.
#[test]
fn generate_follows_the_model_folders_generation_config() {
    let tiny = golden().join("tiny");
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(&tiny).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    let six = ["--max-new-tokens", "6"];
    let greedy = continued(&tiny, &six);
    let set = |json: &str| std::fs::write(m.join("generation_config.json"), json).unwrap();
    set(r#"{"do_sample": true, "temperature": 1.0, "top_k": 0, "eos_token_id": 2}"#);
    let sampled = continued(&m, &["--max-new-tokens", "6", "--seed", "3"]);
    assert_eq!(
        sampled,
        continued(
            &tiny,
            &[
                "--max-new-tokens",
                "6",
                "--seed",
                "3",
                "--temperature",
                "1",
                "--top-k",
                "0"
            ]
        )
    );
    assert_ne!(sampled, greedy);
    // The same file given by path, for a folder without one of its own.
    let file = d.path().join("sample.json");
    std::fs::copy(m.join("generation_config.json"), &file).unwrap();
    let by_path = [
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--generation-config",
        file.to_str().unwrap(),
    ];
    assert_eq!(continued(&tiny, &by_path), sampled);
    assert_eq!(
        continued(&m, &["--max-new-tokens", "6", "--temperature", "0"]),
        greedy
    );
    assert_eq!(
        continued(
            &m,
            &["--max-new-tokens", "6", "--generation-config", "none"]
        ),
        greedy
    );
    // Its length, and its stop ids (here every id: nothing new is printed).
    set(r#"{"max_new_tokens": 2}"#);
    assert_eq!(
        continued(&m, &[]),
        continued(&tiny, &["--max-new-tokens", "2"])
    );
    let all: Vec<String> = (0..96).map(|i| i.to_string()).collect();
    set(&format!(r#"{{"eos_token_id": [{}]}}"#, all.join(", ")));
    assert_eq!(continued(&m, &six).trim_end(), "hot switching");
    // A repetition penalty is not implemented: refused, unless the file is set aside.
    set(r#"{"repetition_penalty": 1.1}"#);
    let o = hotspa(&["generate", "--model", m.to_str().unwrap(), "--prompt", "x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(
                "generation_config.json: `repetition_penalty` = 1.1 changes the generated tokens"
            ),
        "{err}"
    );
    assert_eq!(
        continued(
            &m,
            &["--max-new-tokens", "6", "--generation-config", "none"]
        ),
        greedy
    );
}

/// A model folder's generation_config.json travels with the weights into the saved folder and
/// the checkpoints, as transformers' save_pretrained keeps it (not rebuilt from config.json,
/// which would drop its sampling settings and stop ids).
#[test]
fn a_saved_folder_keeps_the_generation_config_and_a_checkpoint_reads_as_its_latest_step() {
    let d = tempfile::tempdir().unwrap();
    let data = texts(d.path());
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for f in std::fs::read_dir(golden().join("tiny")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    let gen =
        r#"{"bos_token_id": 1, "do_sample": true, "eos_token_id": [2, 5], "temperature": 0.7}"#;
    std::fs::write(src.join("generation_config.json"), gen).unwrap();
    let (out, ck) = (d.path().join("out"), d.path().join("ck"));
    ok(hotspa(&common::cmd![
        "train --model",
        &src,
        "--data",
        &data,
        "--steps 2 --global-batch 2 --save",
        &out,
        "--checkpoint-dir",
        &ck,
        "--checkpoint-every 2"
    ]));
    for dir in [out, ck.join("step-00000002")] {
        let kept = std::fs::read_to_string(dir.join("generation_config.json")).unwrap();
        assert_eq!(kept, gen, "{}", dir.display());
    }
    // The checkpoint directory, or its `latest`, stands for its latest step folder.
    let step = ck.join("step-00000002");
    let eval = |model: &Path| {
        ok(hotspa(&common::cmd![
            "eval --model",
            &model,
            "--data",
            &data,
            "--json"
        ]))
    };
    let (want, _) = eval(&step);
    for model in [ck.clone(), ck.join("latest")] {
        let (got, err) = eval(&model);
        assert_eq!(got, want);
        assert!(err.contains("the checkpoint's latest step"), "{err}");
    }
}

/// A model folder whose weights are a PyTorch pickle (or TensorFlow, Flax) is refused by train,
/// eval and generate, naming the file and how to convert it — never trained from random weights
/// in its place; random weights are said whenever they are used.
#[test]
fn weights_in_another_format_are_refused_and_random_weights_said() {
    let d = tempfile::tempdir().unwrap();
    let data = texts(d.path());
    let m = d.path().join("pt");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(golden().join("tiny").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("pytorch_model.bin"), b"not read").unwrap();
    let (ms, ds) = (m.to_str().unwrap(), data.to_str().unwrap());
    for args in [
        vec!["train", "--model", ms, "--data", ds, "--steps", "1"],
        vec!["eval", "--model", ms, "--data", ds],
        vec!["generate", "--model", ms, "--prompt", "x"],
        vec![
            "train", "--model", ms, "--data", ds, "--steps", "1", "--init", ms,
        ],
    ] {
        let o = hotspa(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains("holds pytorch_model.bin but no model.safetensors")
                && err.contains("save_pretrained"),
            "{args:?}: {err}"
        );
    }
    let (_, err) = ok(hotspa(&[
        "train", "--model", ms, "--data", ds, "--steps", "1", "--init", "random",
    ]));
    assert!(
        err.contains("initial weights: random (normal with std 0.02"),
        "{err}"
    );
}

/// New tokens stop at the model's max_position_embeddings (64 here) unless asked to go on: a
/// default budget is cut there with a note, an explicit one past it is refused, and
/// `--past-max-positions` goes on. A stop id outside the vocabulary is refused.
#[test]
fn generation_stays_within_the_models_positions() {
    let tiny = golden().join("tiny");
    let d = tempfile::tempdir().unwrap();
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hot switching",
        ];
        args.extend(extra);
        hotspa(&args)
    };
    let o = run(&tiny, &["--max-new-tokens", "100000000000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("past the model's max_position_embeddings (64)")
            && err.contains("--past-max-positions"),
        "{err}"
    );
    let o = run(&tiny, &["--ignore-eos"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("note: at most"), "{err}");
    let o = run(
        &tiny,
        &[
            "--ignore-eos",
            "--max-new-tokens",
            "70",
            "--past-max-positions",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("beyond the model's max_position_embeddings"),
        "{err}"
    );
    // A stop id the model cannot produce.
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(&tiny).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        m.join("generation_config.json"),
        r#"{"eos_token_id": [2, 500]}"#,
    )
    .unwrap();
    let o = run(&m, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("end-of-sequence id 500") && err.contains("outside"),
        "{err}"
    );
}
