//! A run owns what it writes and nothing else: outputs over, in or around the inputs or each
//! other are refused before the first step, `--force` replaces only hotspa's own earlier
//! outputs, every output is locked, and every load of a checkpoint or saved model is verified.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

fn hotspa<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    common::hotspa(dir, args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Refused before any step, with `needle` in the first line of the message.
fn refused(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "succeeded, expected `{needle}`:\n{e}");
    let first = e.lines().find(|l| l.starts_with("Error")).unwrap_or("");
    assert!(
        first.contains(needle),
        "expected `{needle}` on the error's first line:\n{e}"
    );
    assert!(!e.contains("step     1/"), "a step ran:\n{e}");
}

fn setup(d: &Path) {
    common::affine_docs(d, 16, |i| 4 + i % 9, |i| i);
    std::fs::create_dir_all(d.join("x")).unwrap();
    std::fs::copy(d.join("data.jsonl"), d.join("x/d.jsonl")).unwrap();
}

/// `train --model config.json --data x/d.jsonl` (2 steps unless `extra` says) and `extra`, in `d`.
fn train<S: AsRef<std::ffi::OsStr>>(d: &Path, extra: &[S]) -> Output {
    let mut args = common::cmd![
        "train --model config.json --data x/d.jsonl",
        "--global-batch 4"
    ];
    if !extra.iter().any(|a| a.as_ref() == "--steps") {
        args.extend(common::cmd!["--steps 2"]);
    }
    args.extend(extra.iter().map(|a| a.as_ref().to_os_string()));
    hotspa(d, &args)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

#[test]
fn outputs_over_inputs_or_each_other_are_refused_and_nothing_is_lost() {
    let d = &common::Scratch::new(setup);
    let data = std::fs::read(d.join("x/d.jsonl")).unwrap();
    // The folder holding the training data, forced: the data stays.
    refused(
        &train(d, &["--save", "x", "--force"]),
        "save: --save x holds the input --data x/d.jsonl",
    );
    refused(
        &train(d, &["--metrics", "x/d.jsonl", "--force"]),
        "is the same path as the input --data",
    );
    // Through a symlink, the same.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("x"), d.join("lx")).unwrap();
        refused(&train(d, &["--save", "lx", "--force"]), "holds the input");
    }
    assert_eq!(std::fs::read(d.join("x/d.jsonl")).unwrap(), data);
    // Outputs inside each other.
    refused(
        &train(d, &["--save", "r", "--force", "--checkpoint-dir", "r/ck"]),
        "--checkpoint-dir r/ck and --save r overlap",
    );
    refused(
        &train(d, &["--save", "r", "--metrics", "r/metrics.jsonl"]),
        "--metrics r/metrics.jsonl and --save r overlap",
    );
    // A run with checkpoints, then one resumed in place that would also save over them.
    ok(&train(
        d,
        &["--checkpoint-dir", "ck", "--checkpoint-every", "1"],
    ));
    let history = std::fs::read_dir(d.join("ck")).unwrap().count();
    refused(
        &train(
            d,
            &common::cmd![
                "--steps 4 --resume ck --checkpoint-dir ck --save ck",
                "--force"
            ],
        ),
        "overlap",
    );
    assert_eq!(std::fs::read_dir(d.join("ck")).unwrap().count(), history);
    // Resumed in place (and its model config taken from the checkpoint): allowed.
    ok(&hotspa(
        d,
        &common::cmd![
            "train --data x/d.jsonl --steps 3 --global-batch 4",
            "--resume ck --checkpoint-dir ck"
        ],
    ));
    assert!(d.join("ck/step-00000003/state.json").is_file());
    // A data folder never receives an output (it would be read as data next time).
    std::fs::create_dir_all(d.join("texts")).unwrap();
    std::fs::write(
        d.join("texts/a.txt"),
        "some text to train on, a few words long",
    )
    .unwrap();
    refused(
        &hotspa(
            d,
            &common::cmd![
                "train --model config.json --data texts --metrics",
                "texts/m.jsonl"
            ],
        ),
        "is inside the input --data texts",
    );
}

#[test]
fn force_replaces_only_hotspas_own_outputs() {
    let d = &common::Scratch::new(setup);
    // A file of the user's is never overwritten, forced or not.
    std::fs::write(d.join("notes.jsonl"), "my notes\n").unwrap();
    refused(
        &train(d, &["--metrics", "notes.jsonl", "--force"]),
        "is not a metrics file of hotspa's",
    );
    std::fs::write(d.join("w.safetensors"), "not weights").unwrap();
    refused(
        &train(d, &["--save", "w.safetensors", "--force"]),
        "is not a weights file hotspa wrote",
    );
    assert_eq!(
        std::fs::read_to_string(d.join("notes.jsonl")).unwrap(),
        "my notes\n"
    );
    // hotspa's own: refused without --force, replaced with it.
    ok(&train(d, &["--metrics", "m.jsonl", "--save", "out"]));
    refused(&train(d, &["--metrics", "m.jsonl"]), "pass --force");
    refused(&train(d, &["--save", "out"]), "pass --force");
    ok(&train(
        d,
        &common::cmd!["--metrics m.jsonl --save out --force --steps 3"],
    ));
    let lines = std::fs::read_to_string(d.join("m.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
    // A file of the user's put into hotspa's folder makes it the user's.
    std::fs::write(d.join("out/README.md"), "my model card").unwrap();
    refused(
        &train(d, &["--save", "out", "--force"]),
        "did not write (README.md)",
    );
    assert!(d.join("out/README.md").is_file() && d.join("out/model.safetensors").is_file());
    // A folder without hotspa's manifest is never replaced.
    std::fs::create_dir_all(d.join("theirs")).unwrap();
    std::fs::write(d.join("theirs/config.json"), "{}").unwrap();
    refused(
        &train(d, &["--save", "theirs", "--force"]),
        "was not written by hotspa",
    );
}

#[test]
fn an_output_in_use_by_another_run_is_refused() {
    let d = &common::Scratch::new(setup);
    let mut long = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(common::cmd![
            "train --model config.json --data x/d.jsonl --steps",
            "100000 --global-batch 4 --metrics busy.jsonl --save busy"
        ])
        .current_dir(d)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::metadata(d.join("busy.jsonl")).map_or(true, |m| m.len() == 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the first run wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(
        &train(d, &["--metrics", "busy.jsonl", "--force"]),
        "busy.jsonl is being written by another run",
    );
    refused(
        &train(d, &["--save", "busy", "--force"]),
        "is being written by another run",
    );
    long.kill().unwrap();
    long.wait().unwrap();
}

#[test]
fn every_load_of_a_checkpoint_is_verified() {
    let d = &common::Scratch::new(setup);
    ok(&train(d, &["--checkpoint-dir", "ck", "--save", "out"]));
    let step = d.join("ck/step-00000002");
    // Intact: every command says what it verified.
    let o = hotspa(
        d,
        &common::cmd![
            "generate --model ck --prompt ab --max-new-tokens 2",
            "--tokenizer bytes"
        ],
    );
    // (The byte tokenizer's 256 ids exceed this model's 64: refused, after the checks.)
    assert!(stderr(&o).contains("tokenizer"), "{}", stderr(&o));
    let o = train(d, &["--init", "ck/step-00000002"]);
    ok(&o);
    assert!(stderr(&o).contains("verified against"), "{}", stderr(&o));
    let o = train(d, &["--init", "out"]);
    assert!(
        stderr(&o).contains("hotspa-manifest.json"),
        "{}",
        stderr(&o)
    );
    // One flipped byte in the weights: refused by eval, --init and --model alike.
    let st = step.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x10;
    std::fs::write(&st, bytes).unwrap();
    for args in [
        vec!["eval", "--model", "ck", "--data", "x/d.jsonl"],
        vec!["eval", "--model", "ck/step-00000002", "--data", "x/d.jsonl"],
    ] {
        let o = hotspa(d, &args);
        assert!(!o.status.success(), "{args:?} loaded a corrupt checkpoint");
        assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    }
    refused(
        &train(d, &["--init", "ck/step-00000002"]),
        "checksum mismatch",
    );
    let o = hotspa(
        d,
        &common::cmd!["train --model ck/step-00000002 --data x/d.jsonl"],
    );
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    // A plain folder says it has nothing to verify against.
    let plain = d.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(d.join("out").join(f), plain.join(f)).unwrap();
    }
    let o = train(d, &["--init", "plain"]);
    ok(&o);
    assert!(stderr(&o).contains("no checksums"), "{}", stderr(&o));
}
