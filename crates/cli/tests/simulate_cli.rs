//! `hotspa simulate` as a user calls it.

use std::process::Command;

fn hotspa(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(args)
        .output()
        .expect("run hotspa")
}

#[test]
fn one_setting_as_json_and_as_a_table() {
    let args = [
        "simulate",
        "--cluster",
        "a800x32",
        "--gpus",
        "16",
        "--model",
        "llama2-13b",
        "--dataset",
        "github",
        "--max-len",
        "16384",
        "--global-batch",
        "64",
    ];
    let out = hotspa(&[&args[..], &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["setting"], "llama2-13b/16");
    let (fixed, auto) = (
        v["fixed"]["seconds"].as_f64().unwrap(),
        v["auto"]["seconds"].as_f64().unwrap(),
    );
    assert!(auto > 0.0 && auto <= fixed);
    assert!(v["paper"]["seconds"].as_f64().unwrap() >= auto);
    assert!(v["auto"]["memory_bytes"].as_f64().unwrap() < 80.0 * (1u64 << 30) as f64);
    let out = hotspa(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    for row in ["static", "paper", "auto", "× the static strategy"] {
        assert!(text.contains(row), "{text}");
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    for (args, want) in [
        (vec!["--cluster", "tpu-pod"], "unknown cluster `tpu-pod`"),
        (
            vec!["--gpus", "64"],
            "--gpus 64: the cluster a800x32 has 32 devices",
        ),
        (vec!["--dataset", "wiki"], "unknown dataset `wiki`"),
        (vec!["--model", "gpt-5"], "unknown model `gpt-5`"),
    ] {
        let out = hotspa(&[&["simulate"][..], &args].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
