//! `hotspa train` as a user runs it: the same training under different strategies saves the same
//! weights; bad input is a clear error.

use std::path::Path;
use std::process::Command;

use model::{LlamaConfig, Weights};

mod common;

use common::run as hotspa;

const CONFIG: &str = r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 22, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}"#;

fn setup(dir: &Path) {
    common::mixed_docs(dir, CONFIG, 24, &[3, 9, 2, 30, 5, 14], 40);
    common::init_weights(dir);
}

fn train(dir: &Path, devices: &str, strategy: &str, out: &str) -> Weights {
    let d = dir.to_str().unwrap();
    let save = dir.join(out);
    let mut args = base_args(d, devices, strategy);
    for a in [
        "--steps",
        "3",
        "--lr",
        "3e-3",
        "--lr-schedule",
        "constant",
        "--beta1",
        "0.9",
        "--beta2",
        "0.95",
        "--eps",
        "1e-8",
        "--weight-decay",
        "0.1",
        "--grad-clip",
        "1.0",
        "--shuffle",
        "off",
        "--save",
        save.to_str().unwrap(),
    ] {
        args.push(a.to_string());
    }
    args.extend(["--metrics".to_string(), format!("{d}/{out}.metrics.jsonl")]);
    let o = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        o.status.success(),
        "{strategy}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join(format!("{out}.metrics.jsonl"))).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in [
            "step",
            "loss",
            "grad_norm",
            "lr",
            "tokens",
            "seconds",
            "peak_bytes",
        ] {
            assert!(v.get(key).is_some(), "metrics lack {key}: {line}");
        }
    }
    Weights::load(&LlamaConfig::load(dir).unwrap(), &save).unwrap()
}

/// Every weight of `got` within `tol` of `want`, naming the tensor that differs most.
fn assert_weights_close(got: &Weights, want: &Weights, tol: f32, what: &str) {
    let (name, worst) = got.worst_difference(want);
    assert!(worst <= tol, "{what}: {name} differs by {worst:e}");
}

// Every strategy and schedule against single-device training, in process through the library:
// crates/train/tests/equivalence.rs. Here the flags' path, once each.

#[test]
fn a_strategy_and_a_hot_schedule_save_the_single_device_weights() {
    let dir = common::Scratch::new(setup);
    let reference = train(dir.path(), "1", "dp1", "single.safetensors");
    let init = Weights::load(
        &LlamaConfig::load(dir.path()).unwrap(),
        &dir.path().join("init.safetensors"),
    )
    .unwrap();
    assert_ne!(reference, init, "training changed nothing");
    let got = train(dir.path(), "4", "tp2pp2", "tp2pp2.safetensors");
    assert_weights_close(&got, &reference, 1e-5, "tp2pp2");
    // Sequence lengths cycle 3, 9, 2, 30, 5, 14: the schedule splits each batch.
    let schedule = "dp4zero3:5,dp2tp2zero2:16,tp2pp2:max";
    let got = train(dir.path(), "4", schedule, "hot.safetensors");
    assert_weights_close(&got, &reference, 1e-5, schedule);
    // Concurrent groups: two devices train the sequences up to 5 tokens under dp2 while the
    // other two train the rest under tp2.
    let concurrent = "dp2:5 | tp2:max";
    let got = train(dir.path(), "4", concurrent, "concurrent.safetensors");
    assert_weights_close(&got, &reference, 1e-5, concurrent);
    let metrics =
        std::fs::read_to_string(dir.path().join("hot.safetensors.metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["strategy_seconds", "switch_seconds", "switch_bytes"] {
            assert!(v.get(key).is_some(), "metrics lack {key}: {line}");
        }
    }
}

/// A calibration under which the planner must switch: so little memory that DP4 holds only
/// ~20 tokens per micro-batch (the data has sequences of 30), TP4 ~120.
const SMALL_GIB: f64 = 0.0000654;

#[test]
fn automatic_planning_saves_the_single_device_weights() {
    let d = &common::Scratch::new(setup);
    std::fs::write(
        d.join("profile.toml"),
        common::small_profile("test", SMALL_GIB, 0.2),
    )
    .unwrap();
    let reference = train(d, "1", "dp1", "single.safetensors");
    let mut args = base_args(d.to_str().unwrap(), "4", "auto");
    args[9] = "--strategies".into();
    args.extend(
        [
            "--profile",
            d.join("profile.toml").to_str().unwrap(),
            "--steps",
            "3",
            "--lr",
            "3e-3",
            "--shuffle",
            "off",
            "--save",
            d.join("auto.safetensors").to_str().unwrap(),
            "--metrics",
            d.join("auto.jsonl").to_str().unwrap(),
        ]
        .map(String::from),
    );
    let o = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = Weights::load(&LlamaConfig::load(d).unwrap(), &d.join("auto.safetensors")).unwrap();
    assert_weights_close(&got, &reference, 1e-5, "auto");
    let metrics = std::fs::read_to_string(d.join("auto.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let plan = v["plan"].as_str().unwrap();
        // The 30-token sequences cannot run under dp4 here: every plan switches.
        assert!(plan.contains(','), "{plan}");
        assert!(v["planning_seconds"].as_f64().unwrap() < v["seconds"].as_f64().unwrap());
        assert!(v["switch_bytes"].as_u64().unwrap() > 0, "{line}");
    }
    // Without a profile, auto is refused with the way to make one.
    let mut bad = base_args(d.to_str().unwrap(), "4", "auto");
    bad[9] = "--strategies".into();
    let o = hotspa(&bad.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("hotspa profile --devices 4"));
}

/// `hotspa train` with `args` and `extra`, saving to `out`; the weights and the metrics lines.
fn train_with(
    d: &Path,
    args: &[String],
    extra: &[&str],
    out: &str,
) -> (Weights, Vec<serde_json::Value>) {
    let mut args = args.to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--save",
            d.join(out).to_str().unwrap(),
            "--metrics",
            d.join(format!("{out}.jsonl")).to_str().unwrap(),
            // Each output may replace the one an earlier call of this test wrote.
            "--force",
        ]
        .map(String::from),
    );
    let o = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let w = Weights::load(&LlamaConfig::load(d).unwrap(), &d.join(out)).unwrap();
    let lines = std::fs::read_to_string(d.join(format!("{out}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (w, lines)
}

#[test]
fn the_simulators_clock_times_a_real_run_without_changing_it() {
    let d = &common::Scratch::new(setup);
    std::fs::write(
        d.join("profile.toml"),
        common::small_profile("test", SMALL_GIB, 0.2),
    )
    .unwrap();
    let profile = d.join("profile.toml");
    for schedule in ["dp4:5,dp2tp2:8,tp2pp2:max", "tp2pp2"] {
        let args = train_args(d.to_str().unwrap(), "4", schedule, "3");
        let (plain, _) = train_with(d, &args, &[], "plain.safetensors");
        for cluster in ["a800x32", profile.to_str().unwrap()] {
            let (timed, metrics) =
                train_with(d, &args, &["--sim-cluster", cluster], "timed.safetensors");
            // The same kernels and messages in the same order: the same weights, bit for bit.
            assert_weights_close(&timed, &plain, 0.0, cluster);
            for v in &metrics {
                let sim = v["simulated_seconds"].as_f64().unwrap();
                let parts: f64 = ["compute", "elementwise", "optimizer", "transfer", "wait"]
                    .iter()
                    .map(|k| v["simulated"][k].as_f64().unwrap())
                    .sum();
                assert!(sim > 0.0 && (parts - sim).abs() < 1e-5, "{v}");
                assert!(v["simulated"]["compute"].as_f64().unwrap() > 0.0, "{v}");
                if cluster == "a800x32" {
                    // An A800 runs this 3-layer toy faster than two shared cores do (its
                    // step is mostly the simulated links' latency, so not by much).
                    assert!(sim < v["seconds"].as_f64().unwrap(), "{v}");
                } else {
                    // A pipeline waits for its other stage.
                    assert!(v["simulated"]["wait"].as_f64().unwrap() > 0.0, "{v}");
                }
            }
        }
    }
    // A cluster with fewer devices than the run, and an unknown name, are refused.
    std::fs::write(
        d.join("two.toml"),
        common::small_profile("test", SMALL_GIB, 0.2)
            .replace("devices_per_node = 4", "devices_per_node = 2"),
    )
    .unwrap();
    for (cluster, want) in [
        (
            d.join("two.toml").to_str().unwrap().to_string(),
            "has 2 devices, fewer than --devices 4",
        ),
        ("a900x8".to_string(), "use a800x32, h100x8"),
    ] {
        let mut args = base_args(d.to_str().unwrap(), "4", "dp4");
        args.extend(["--sim-cluster".to_string(), cluster]);
        let o = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let data = format!("{d}/data.jsonl");
    let err = |args: &[&str]| {
        let o = hotspa(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(err(&["train"]).contains("pass --model"));
    assert!(err(&[
        "train",
        "--model",
        d,
        "--data",
        &data,
        "--devices",
        "8",
        "--strategy",
        "dp2tp2"
    ])
    .contains("dp2 × tp2 × pp1 = 4 devices, but there are 8"));
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 99]}\n",
    )
    .unwrap();
    assert!(
        err(&["train", "--model", d, "--data", &format!("{d}/bad.jsonl")])
            .contains("bad.jsonl:2: input_ids[1] = 99 is outside the vocabulary of 40")
    );
    let e = err(&["train", "--model", d, "--data", &data, "--resume", d]);
    assert!(e.contains("resuming from") && e.contains("latest"), "{e}");
    std::fs::write(dir.path().join("trunc.safetensors"), b"\x10\x00\x00").unwrap();
    assert!(err(&[
        "train",
        "--model",
        d,
        "--data",
        &data,
        "--init",
        &format!("{d}/trunc.safetensors")
    ])
    .contains("trunc.safetensors: not a valid safetensors file"));
    // Hot-switching schedules: too-long sequences, bad lists, unsupported ZeRO stages.
    let hot = |schedule: &str| {
        err(&[
            "train",
            "--model",
            d,
            "--data",
            &data,
            "--devices",
            "4",
            "--strategies",
            schedule,
        ])
    };
    let e = hot("dp4:4,tp4:16");
    assert!(
        e.contains("30 tokens") && e.contains("longer than every strategy"),
        "{e}"
    );
    assert!(hot("dp4:16,tp4:8").contains("lengths must increase"));
    assert!(hot("dp4:max,tp4:8").contains("only the last strategy may be `max`"));
    assert!(hot("dp4:8,tp4").contains("is not STRATEGY:MAXLEN"));
    assert!(hot("dp2:8,tp4:max").contains("dp2 × tp1 × pp1 = 2 devices, but there are 4"));
}

/// The flags every training run of these tests shares: model, initial weights, data, devices,
/// strategy, batch and micro-batch size.
fn base_args(d: &str, devices: &str, strategy: &str) -> Vec<String> {
    [
        "train",
        "--model",
        d,
        "--init",
        &format!("{d}/init.safetensors"),
        "--data",
        &format!("{d}/data.jsonl"),
        "--devices",
        devices,
        // A `STRATEGY:MAXLEN,…` list is a hot-switching schedule.
        if strategy.contains(':') {
            "--strategies"
        } else {
            "--strategy"
        },
        strategy,
        "--global-batch",
        "8",
        "--micro-batch-tokens",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn train_args(d: &str, devices: &str, strategy: &str, steps: &str) -> Vec<String> {
    let mut args = base_args(d, devices, strategy);
    for a in [
        "--steps",
        steps,
        "--lr",
        "3e-3",
        "--lr-schedule",
        "cosine",
        "--warmup",
        "2",
        "--shuffle",
        "on",
        "--seed",
        "4",
    ] {
        args.push(a.to_string());
    }
    args
}

/// `args` continuing from the checkpoint directory `ck` (a resumed run takes its weights from
/// the checkpoint, so `--init` goes).
fn resumed(args: Vec<String>, ck: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--init" {
            it.next();
        } else {
            out.push(a);
        }
    }
    out.extend(["--resume".to_string(), ck.to_string()]);
    out
}

fn run_ok(args: &[String]) {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = hotspa(&refs);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `--packing`: balanced (the default) deals each strategy's sequences by work, in-order
/// round-robin in batch order; both train the same weights, but the replicas' shares differ.
#[test]
fn packing_deals_by_work_or_in_order_and_both_train_the_same() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let cfg = LlamaConfig::load(dir.path()).unwrap();
    let mut peaks = Vec::new();
    let mut weights = Vec::new();
    for packing in ["balanced", "in-order"] {
        let save = format!("{d}/{packing}.safetensors");
        let mut args = train_args(d, "2", "dp2", "2");
        args.extend([
            "--packing".into(),
            packing.into(),
            "--save".into(),
            save.clone(),
        ]);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = hotspa(&refs);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{packing}: {out}");
        let line = out
            .lines()
            .find(|l| l.contains("bytes per rank"))
            .unwrap_or_else(|| panic!("{packing}: no peak line in {out}"))
            .to_string();
        peaks.push(
            line.split("per rank:")
                .nth(1)
                .unwrap_or_default()
                .to_string(),
        );
        weights.push(Weights::load(&cfg, std::path::Path::new(&save)).unwrap());
    }
    // Lengths cycle 3, 9, 2, 30, 5, 14: in batch order one replica gets the long ones.
    assert_ne!(
        peaks[0], peaks[1],
        "the two packings dealt alike: {peaks:?}"
    );
    assert_weights_close(&weights[0], &weights[1], 1e-5, "balanced vs in-order");
    let mut args = train_args(d, "2", "dp2", "2");
    args.extend(["--packing".into(), "sorted".into()]);
    let bad = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("packing") && err.contains("in-order"),
        "{err}"
    );
}

/// `--bucket-mb`: tiny buckets pay a latency each on the simulated cluster's clock, the
/// weights stay the single run's (to f32 summation order); `auto` sizes them by the α–β model
/// and says so; a bad size is refused by name.
#[test]
fn bucket_size_changes_the_clock_not_the_weights() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let cfg = LlamaConfig::load(dir.path()).unwrap();
    let mut clocked = Vec::new();
    let mut weights = Vec::new();
    for mb in ["0.001", "4", "auto"] {
        let save = format!("{d}/b{mb}.safetensors");
        let metrics = format!("{d}/b{mb}.jsonl");
        let mut args = train_args(d, "4", "dp4", "2");
        args.extend(
            [
                "--bucket-mb",
                mb,
                "--sim-cluster",
                "a800x32",
                "--save",
                &save,
                "--metrics",
                &metrics,
            ]
            .map(String::from),
        );
        let o = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{mb}: {out}");
        assert_eq!(
            out.contains("gradient buckets (auto"),
            mb == "auto",
            "{mb}: {out}"
        );
        let t: f64 = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["simulated_seconds"]
                    .as_f64()
                    .unwrap()
            })
            .sum();
        clocked.push(t);
        weights.push(Weights::load(&cfg, std::path::Path::new(&save)).unwrap());
    }
    assert!(
        clocked[0] > 1.5 * clocked[1],
        "1 KiB buckets {clocked:?} cost no more latency"
    );
    for w in &weights[1..] {
        assert_weights_close(w, &weights[0], 1e-5, "bucket sizes");
    }
    let mut args = train_args(d, "4", "dp4", "2");
    args.extend(["--bucket-mb".into(), "0".into()]);
    let bad = hotspa(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("bucket_mb"), "{err}");
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let cfg = LlamaConfig::load(dir.path()).unwrap();
    // Uninterrupted: 6 steps.
    let mut a = train_args(d, "4", "dp2tp2", "6");
    a.extend(["--save".into(), format!("{d}/a.safetensors")]);
    run_ok(&a);
    // 3 steps, checkpoint, then 3 more from the checkpoint: bitwise the same under the same strategy.
    let mut b = train_args(d, "4", "dp2tp2", "3");
    b.extend(["--checkpoint-dir".into(), format!("{d}/ck")]);
    run_ok(&b);
    let mut c = resumed(train_args(d, "4", "dp2tp2", "6"), &format!("{d}/ck"));
    c.extend(["--save".into(), format!("{d}/c.safetensors")]);
    run_ok(&c);
    let (wa, wc) = (
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        std::fs::read(dir.path().join("c.safetensors")).unwrap(),
    );
    assert!(
        wa == wc,
        "resume under the same strategy is not bitwise identical"
    );
    // Resumed under other strategies and device counts: the same weights up to f32 summation order.
    let reference = Weights::load(&cfg, &dir.path().join("a.safetensors")).unwrap();
    for (devices, strategy) in [
        ("2", "tp2"),
        ("4", "tp2pp2"),
        ("1", "dp1"),
        ("4", "dp4zero3"),
    ] {
        let mut r = resumed(train_args(d, devices, strategy, "6"), &format!("{d}/ck"));
        r.extend([
            "--save".into(),
            format!("{d}/r.safetensors"),
            "--force".into(),
        ]);
        run_ok(&r);
        let got = Weights::load(&cfg, &dir.path().join("r.safetensors")).unwrap();
        assert_weights_close(&got, &reference, 1e-5, &format!("resumed under {strategy}"));
    }
    // Hot switching: checkpointed and resumed under the same schedule, bitwise the same.
    let schedule = "dp4:4,dp2tp2:16,tp2pp2:max";
    let mut a = train_args(d, "4", schedule, "6");
    a.extend(["--save".into(), format!("{d}/ha.safetensors")]);
    run_ok(&a);
    let mut b = train_args(d, "4", schedule, "3");
    b.extend(["--checkpoint-dir".into(), format!("{d}/hck")]);
    run_ok(&b);
    let mut c = resumed(train_args(d, "4", schedule, "6"), &format!("{d}/hck"));
    c.extend(["--save".into(), format!("{d}/hc.safetensors")]);
    run_ok(&c);
    assert!(
        std::fs::read(dir.path().join("ha.safetensors")).unwrap()
            == std::fs::read(dir.path().join("hc.safetensors")).unwrap(),
        "resume under the same hot-switching schedule is not bitwise identical"
    );
}

/// `--pipeline-schedule pipedream-2bw` on tp2pp2: the first step trains like 1F1B and the next
/// ones on one-step-old weights (`weight_staleness` 1; the runtime's own test checks the update
/// rule against one device); a checkpoint flushes the pipeline, so resuming from it is bitwise
/// the uninterrupted run that checkpointed there; what it cannot run is refused by name.
#[test]
fn pipedream_2bw_trains_one_step_late_and_resumes_from_its_flushes() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let p = |f: &str| format!("{d}/{f}");
    let run = |name: &str, steps: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let mut a = train_args(d, "4", "tp2pp2", steps);
        a.extend(["--metrics".into(), p(&format!("{name}.jsonl"))]);
        a.extend(["--save".into(), p(&format!("{name}.safetensors"))]);
        match extra.iter().position(|&e| e == "--resume") {
            Some(k) => {
                a.extend(extra[..k].iter().map(|s| s.to_string()));
                a = resumed(a, extra[k + 1]);
            }
            None => a.extend(extra.iter().map(|s| s.to_string())),
        }
        run_ok(&a);
        common::records(Path::new(&p(&format!("{name}.jsonl"))))
    };
    let two_bw = ["--pipeline-schedule", "pipedream-2bw"];
    let flushed = run("flushed", "6", &[]);
    let late = run("late", "6", &two_bw);
    let stale: Vec<u64> = late
        .iter()
        .map(|m| m["weight_staleness"].as_u64().unwrap())
        .collect();
    assert_eq!(stale, [0, 1, 1, 1, 1, 1]);
    assert!(flushed[0].get("weight_staleness").is_none());
    let loss = |m: &serde_json::Value| m["loss"].as_f64().unwrap();
    assert!(
        (loss(&flushed[0]) - loss(&late[0])).abs() < 1e-6,
        "the first step reads W(0) in both"
    );
    assert!(
        (loss(&flushed[1]) - loss(&late[1])).abs() > 1e-6,
        "the second reads W(0), not W(1)"
    );
    let (a, b) = (
        std::fs::read(p("flushed.safetensors")).unwrap(),
        std::fs::read(p("late.safetensors")).unwrap(),
    );
    assert!(a != b, "2BW trained the weights of the flushed schedule");
    // Flushed after every step (a checkpoint each), nothing is late: the 1F1B run, bitwise.
    let each = run(
        "each",
        "6",
        &[
            &two_bw[..],
            &["--checkpoint-every", "1", "--checkpoint-dir", &p("ck1")],
        ]
        .concat(),
    );
    assert!(each.iter().all(|m| m["weight_staleness"] == 0));
    assert!(
        std::fs::read(p("each.safetensors")).unwrap() == a,
        "2BW flushed every step is not the 1F1B run"
    );
    // A checkpoint every 3 steps flushes at step 3; resuming there continues the same run.
    let every = run(
        "every",
        "6",
        &[
            &two_bw[..],
            &["--checkpoint-every", "3", "--checkpoint-dir", &p("ck")],
        ]
        .concat(),
    );
    let stale: Vec<u64> = every
        .iter()
        .map(|m| m["weight_staleness"].as_u64().unwrap())
        .collect();
    assert_eq!(stale, [0, 1, 1, 0, 1, 1]);
    run(
        "first",
        "3",
        &[&two_bw[..], &["--checkpoint-dir", &p("ck3")]].concat(),
    );
    run(
        "rest",
        "6",
        &[&two_bw[..], &["--resume", &p("ck3")]].concat(),
    );
    assert!(
        std::fs::read(p("every.safetensors")).unwrap()
            == std::fs::read(p("rest.safetensors")).unwrap(),
        "resuming a 2BW run is not bitwise the run that flushed there"
    );
    // Refused by name.
    for (strategy, extra, says) in [
        (
            "dp4",
            vec![],
            "applies only to strategies with pipeline stages",
        ),
        ("dp4:8,tp2pp2:max", vec![], "use --strategy"),
        ("dp2pp2zero3", vec![], "ZeRO-3"),
        ("dp2pp2", vec!["--sync", "local:2"], "--sync local:2"),
        ("tp2pp2", vec!["--optimizer", "onebit-adam"], "onebit-adam"),
    ] {
        let mut a = train_args(d, "4", strategy, "2");
        a.extend(two_bw.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        let o = hotspa(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{strategy} {extra:?}: {err}"
        );
    }
    // A replica with no micro-batch in some step, found before the first step.
    let data = p("data.jsonl");
    let o = hotspa(&common::cmd![
        "train --model",
        Path::new(d),
        "--data",
        Path::new(&data),
        "--devices 4 --strategy dp2pp2 --pipeline-schedule pipedream-2bw --global-batch 1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("step 1 gives a replica 0")
            && !err.contains("step     1/"),
        "{err}"
    );
}

#[test]
fn corrupt_checkpoints_are_refused_naming_the_file() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let mut b = train_args(d, "1", "dp1", "2");
    b.extend(["--checkpoint-dir".into(), format!("{d}/ck")]);
    run_ok(&b);
    let file = dir.path().join("ck/step-00000002/exp_avg.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let r = resumed(train_args(d, "1", "dp1", "4"), &format!("{d}/ck"));
    let refs: Vec<&str> = r.iter().map(|s| s.as_str()).collect();
    let o = hotspa(&refs);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exp_avg.safetensors") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn kill_9_during_checkpoint_writes_leaves_the_previous_one_loadable() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let cfg = LlamaConfig::load(dir.path()).unwrap();
    let mut args = train_args(d, "2", "dp2", "100000");
    args.extend([
        "--checkpoint-dir".into(),
        format!("{d}/ck"),
        "--checkpoint-every".into(),
        "1".into(),
    ]);
    for delay_ms in [300u64, 450, 700, 1100] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hotspa"))
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if dir.path().join("ck/latest").exists() {
            let ck = model::Checkpoint::load(&dir.path().join("ck"), &cfg)
                .unwrap_or_else(|e| panic!("after kill -9 at {delay_ms} ms: {e}"));
            assert!(ck.step >= 1);
        }
    }
    assert!(
        dir.path().join("ck/latest").exists(),
        "no checkpoint was ever written"
    );
}

#[test]
fn plot_draws_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.jsonl");
    let lines: String = (1..=5)
        .map(|s| {
            format!(
                "{{\"step\": {s}, \"loss\": {}, \"tokens\": 100, \"seconds\": 0.5}}\n",
                6.0 - s as f64 * 0.5
            )
        })
        .collect();
    std::fs::write(&m, lines).unwrap();
    let svg = dir.path().join("p.svg");
    let o = hotspa(&["plot", m.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("polyline") && text.contains("tokens/s"),
        "{text}"
    );
    let png = dir.path().join("p.png");
    let o = hotspa(&["plot", m.to_str().unwrap(), "-o", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    // Several runs overlay, loss against measured and simulated time, and the wire bytes.
    let m2 = dir.path().join("int8.jsonl");
    let lines: String = (1..=5)
        .map(|s| {
            format!(
                "{{\"step\": {s}, \"loss\": {}, \"tokens\": 100, \"seconds\": 0.25, \
                 \"simulated_seconds\": 2.0, \"wire_intra_node_bytes\": 3000000, \
                 \"wire_inter_node_bytes\": 1000000}}\n",
                6.0 - s as f64 * 0.4
            )
        })
        .collect();
    std::fs::write(&m2, lines).unwrap();
    // The earlier plot is replaced only when asked; a file of anyone else's, or the metrics
    // file itself, never.
    let o = hotspa(&["plot", m.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --force"));
    let mine = dir.path().join("mine.svg");
    std::fs::write(&mine, "<svg>the user's drawing</svg>").unwrap();
    let o = hotspa(&common::cmd!["plot", &m, "-o", &mine, "--force"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a plot hotspa drew"));
    assert_eq!(
        std::fs::read_to_string(&mine).unwrap(),
        "<svg>the user's drawing</svg>"
    );
    let o = hotspa(&common::cmd!["plot", &m, "-o", &m, "--force"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the metrics file"));
    let o = hotspa(&common::cmd!["plot", &m, "-o", &png, "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = hotspa(&common::cmd!["plot", &m, &m2, "-o", &svg, "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    for want in [
        "m: loss",
        "int8: loss",
        "loss against time",
        "measured seconds",
        "loss against time on the simulated cluster",
        "bytes on the wire per step",
        "int8: MB across nodes",
    ] {
        assert!(text.contains(want), "no {want:?} in the overlay");
    }
    let o = hotspa(&[
        "plot",
        m.to_str().unwrap(),
        "-o",
        dir.path().join("p.jpg").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("write a .svg or .png file"));
    std::fs::write(&m, "{\"step\": 1}\n").unwrap();
    let o = hotspa(&common::cmd!["plot", &m, "-o", &svg, "--force"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("m.jsonl:1: no numeric \"loss\""));
}

#[test]
fn the_default_run_needs_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .arg("train")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("run it from the repository root"));
}

/// A default run refused before its first step leaves no folder behind (it had written only
/// the config it made); the refusal is the settings' own.
#[test]
fn a_refused_default_run_leaves_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("README.md"), "# a project\n").unwrap();
    std::fs::create_dir_all(d.join("crates/a")).unwrap();
    for i in 0..5 {
        std::fs::write(
            d.join(format!("crates/a/f{i}.rs")),
            "fn main() {}\n".repeat(40),
        )
        .unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(["train", "--default-run", "--steps", "8"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("10 steps of warm-up in a run of 8"), "{err}");
    assert!(err.contains("nothing trained"), "{err}");
    let left: Vec<_> = std::fs::read_dir(d.join("runs")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The embedded default run, as the README's quick start runs it (docs/training.md) (about 3 minutes):
/// `cargo test --release -p hotspa --test train_cli -- --ignored default_run`.
#[test]
#[ignore]
fn default_run_trains_on_the_project_with_a_falling_loss() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .arg("train")
        .current_dir(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let dir = err
        .lines()
        .find_map(|l| l.strip_prefix("run written to "))
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let dir = root.join(dir);
    let losses = common::losses(&dir.join("metrics.jsonl"));
    assert!(
        losses.last().unwrap() < &(losses[0] - 2.0),
        "loss {} -> {}",
        losses[0],
        losses.last().unwrap()
    );
    for f in [
        "config.json",
        "model/model.safetensors",
        "model/hotspa-manifest.json",
        "plot.svg",
        "checkpoints/latest",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The issue's contract check: the same training written independently (numpy LLaMA in HF
/// conventions, gradients by the `autograd` package, AdamW and clipping from PyTorch's
/// documentation, float64; `tests/reference/llama_autograd.py`) ends with the same weights, to
/// 1e-5 (the issue asks 1e-4; measured ≤ 7e-7; 1e-5 also catches a missing weight decay).
/// Needs python3 with numpy, autograd and safetensors, which `scripts/test.sh` installs.
#[test]
fn matches_an_independent_autograd_implementation() {
    let dir = common::Scratch::new(setup);
    let d = dir.path().to_str().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_autograd.py");
    let reference = dir.path().join("reference.safetensors");
    let o = Command::new("python3")
        .arg(&script)
        .args([
            &format!("{d}/config.json"),
            &format!("{d}/init.safetensors"),
            &format!("{d}/data.jsonl"),
        ])
        .arg(&reference)
        .args(["8", "3", "3e-3", "0.9", "0.95", "1e-8", "0.1", "1.0"])
        .output()
        .expect(
            "python3 with numpy, autograd and safetensors must be on PATH (scripts/test.sh makes one under target/test-venv)",
        );
    assert!(
        o.status.success(),
        "the reference failed (pip install numpy autograd safetensors): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cfg = LlamaConfig::load(dir.path()).unwrap();
    let want = Weights::load(&cfg, &reference).unwrap();
    for (devices, strategy) in [
        ("1", "dp1"),
        ("4", "dp4"),
        ("4", "tp4"),
        ("4", "dp2tp2"),
        ("4", "tp2pp2"),
        ("4", "dp4:8,tp2pp2:max"),
    ] {
        let got = train(
            dir.path(),
            devices,
            strategy,
            &format!("{}.safetensors", strategy.replace([':', ','], "_")),
        );
        let what = format!("{strategy} against the independent implementation");
        assert_weights_close(&got, &want, 1e-5, &what);
    }
}
