//! No byte outside hotspa's own outputs is ever removed or changed: random layouts of inputs,
//! outputs and symlinks (outputs on, in, around and beside the inputs, through links, over
//! each other, forced or not), each trained for a step, every file that was there before
//! checked afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model::{LlamaConfig, Weights};
use proptest::prelude::*;
use train::{Checkpointing, DataSource, Init, TrainConfig};

mod common;

/// Every regular file under `root` (not following symlinks), with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// Where the paths of a case may point (relative to the case's root).
const PLACES: [&str; 26] = [
    "x",
    "lx",
    "x/sub",
    "x/d.jsonl",
    "lx/d.jsonl",
    "x/notes.txt",
    "m",
    "lm",
    "lm/out",
    "m/config.json",
    "m/README.md",
    "docs",
    "docs/out",
    "ldocs/a.txt",
    "keep.txt",
    ".",
    "lroot",
    "out",
    "out/sub",
    "prev",
    "prev.jsonl",
    "mixed",
    "out2",
    "new/deep",
    "lroot/out3",
    "prev",
];

/// A tree of a user's files, with symlinks, and earlier outputs of hotspa's (`prev`,
/// `prev.jsonl`, and `mixed`: hotspa's folder with a file of the user's added).
fn lay_out(root: &Path, model: &LlamaConfig) {
    let w = |p: &str, b: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
    };
    let seqs = common::sequences(8, &[3, 5, 9]);
    let lines: String = seqs
        .iter()
        .map(|s| format!("{{\"input_ids\": {s:?}}}\n"))
        .collect();
    w("x/d.jsonl", lines.as_bytes());
    w("x/notes.txt", b"the user's notes");
    w("m/config.json", common::CONFIG.as_bytes());
    w("m/README.md", b"about the model");
    w("docs/a.txt", b"a text document of the user's");
    w("docs/b.txt", b"another one");
    w("keep.txt", b"keep me");
    let opts = model::SaveOptions::default();
    let weights = Weights::random(model, 1);
    model::save_folder(&root.join("prev"), model, &weights, &opts).unwrap();
    model::save_folder(&root.join("mixed"), model, &weights, &opts).unwrap();
    w("mixed/mine.txt", b"the user's file in hotspa's folder");
    w(
        "prev.jsonl",
        br#"{"step":1,"loss":2.0,"grad_norm":1.0,"lr":0.001,"tokens":8,"seconds":0.1,"tokens_per_s":80.0,"peak_bytes":10}
"#,
    );
    #[cfg(unix)]
    for (link, to) in [("lx", "x"), ("lm", "m"), ("ldocs", "docs"), ("lroot", ".")] {
        std::os::unix::fs::symlink(root.join(to), root.join(link)).unwrap();
    }
}

/// hotspa's own earlier outputs: the only files a forced run may replace.
fn hotspas(p: &Path, root: &Path) -> bool {
    let rel = p.strip_prefix(root).unwrap();
    rel.starts_with("prev") && !rel.starts_with("prev.jsonl")
        || rel == Path::new("prev.jsonl")
        || (rel.starts_with("mixed") && rel != Path::new("mixed/mine.txt"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_byte_of_anyone_else_is_removed_or_changed(
        data_dir in any::<bool>(),
        model_dir in any::<bool>(),
        save in proptest::option::of((0..PLACES.len(), any::<bool>())),
        metrics in proptest::option::of(0..PLACES.len()),
        checkpoint in proptest::option::of(0..PLACES.len()),
        force in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let model = LlamaConfig::from_json(common::CONFIG, Path::new("config.json")).unwrap();
        lay_out(root, &model);
        let before = snapshot(root);
        let data = if data_dir {
            DataSource::Path(root.join("docs"))
        } else {
            DataSource::Path(root.join("lx/d.jsonl"))
        };
        let mut cfg = TrainConfig::new(model.clone(), data);
        cfg.model_path = Some(if model_dir { root.join("lm") } else { root.join("m/config.json") });
        cfg.init = Init::Weights(std::sync::Arc::new(Weights::random(&model, 3)));
        cfg.steps = 1;
        cfg.global_batch = 4;
        cfg.max_len = Some(32);
        cfg.force = force;
        cfg.save = save.map(|(i, single)| {
            let p = root.join(PLACES[i]);
            if single { p.with_extension("safetensors") } else { p }
        });
        cfg.metrics = metrics.map(|i| root.join(PLACES[i]));
        cfg.checkpoint = checkpoint.map(|i| Checkpointing {
            dir: root.join(PLACES[i]),
            every: None,
            keep_last: 1,
        });
        let result = train::run(&cfg, &mut train::NoSink);
        for (path, bytes) in &before {
            if hotspas(path, root) {
                continue;
            }
            let now = std::fs::read(path);
            prop_assert!(
                now.as_ref().is_ok_and(|b| b == bytes),
                "{} was removed or changed (save {:?}, metrics {:?}, checkpoints {:?}, force {force}: {:?})",
                path.display(), cfg.save, cfg.metrics, cfg.checkpoint.as_ref().map(|c| &c.dir),
                result.as_ref().err().map(|e| e.to_string())
            );
        }
        if result.is_ok() {
            if let Some(s) = &cfg.save {
                prop_assert!(s.exists(), "{} not written", s.display());
            }
            if let Some(m) = &cfg.metrics {
                prop_assert!(m.is_file(), "{} not written", m.display());
            }
        }
    }
}

#[test]
fn a_forced_save_replaces_hotspas_own_folder_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = LlamaConfig::from_json(common::CONFIG, Path::new("config.json")).unwrap();
    lay_out(root, &model);
    let mut cfg = TrainConfig::new(model.clone(), DataSource::Path(root.join("x/d.jsonl")));
    cfg.init = Init::Weights(std::sync::Arc::new(Weights::random(&model, 3)));
    cfg.steps = 1;
    cfg.global_batch = 4;
    cfg.max_len = Some(32);
    cfg.save = Some(root.join("prev"));
    let e = train::run(&cfg, &mut train::NoSink)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another run's model") && e.contains("--force"),
        "{e}"
    );
    cfg.force = true;
    let out = train::run(&cfg, &mut train::NoSink).unwrap();
    let back = Weights::load(&model, &root.join("prev")).unwrap();
    assert_eq!(&back, out.weights.as_ref().unwrap());
    // No leftovers of the swap beside it.
    let names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    // hotspa's folder with a file of the user's in it is not replaced, forced or not.
    cfg.save = Some(root.join("mixed"));
    let e = train::run(&cfg, &mut train::NoSink)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not write (mine.txt)"), "{e}");
}
