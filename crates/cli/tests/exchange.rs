//! The gradient exchange flags as a user runs them: `--grad-compression none` is bitwise the
//! default, every other setting changes what runs (and says so in the wire bytes), the exact
//! algorithms land within f32 rounding of the ring, residuals survive a checkpoint bitwise, and
//! bad values are refused by name.

use std::path::Path;
use std::process::Command;

use model::{LlamaConfig, Weights};

mod common;

fn setup(dir: &Path) {
    common::mixed_docs(dir, common::SMALL_CONFIG, 32, &[5, 9, 12, 30, 7, 14], 64);
    common::init_weights(dir);
}

struct Run {
    weights: Weights,
    metrics: Vec<serde_json::Value>,
    stderr: String,
}

/// Trains 4 steps of DP4 with `extra` flags; the saved weights and the metrics.
fn train(dir: &Path, name: &str, extra: &[&str]) -> Run {
    let save = dir.join(format!("{name}.safetensors"));
    let metrics = dir.join(format!("{name}.jsonl"));
    let mut args = common::train_on(dir);
    if !extra.contains(&"--resume") {
        // (A resumed run starts from the checkpoint's weights.)
        args.extend(common::cmd!["--init", &dir.join("init.safetensors")]);
    }
    args.extend(common::cmd![
        "--devices 4 --strategy dp4 --global-batch 8 --steps 4 --lr 1e-2 --save",
        &save,
        "--metrics",
        &metrics
    ]);
    args.extend(extra.iter().map(Into::into));
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{name}: {stderr}");
    let metrics = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Run {
        weights: Weights::load(&LlamaConfig::load(dir).unwrap(), &save).unwrap(),
        metrics,
        stderr,
    }
}

fn wire(r: &Run, key: &str) -> u64 {
    r.metrics.iter().map(|m| m[key].as_u64().unwrap()).sum()
}

fn refused(dir: &Path, extra: &[&str]) -> String {
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "train",
        "--model",
        d,
        "--data",
        &format!("{d}/data.jsonl"),
        "--devices",
        "4",
        "--steps",
        "1",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(&args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!o.status.success(), "{extra:?} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn none_is_bitwise_the_default_and_every_setting_changes_what_runs() {
    let d = &common::Scratch::new(setup);
    let plain = train(d, "plain", &[]);
    let none = train(
        d,
        "none",
        &["--grad-compression", "none", "--allreduce", "ring"],
    );
    assert!(
        none.weights == plain.weights,
        "--grad-compression none is not bitwise the default"
    );
    let losses = |r: &Run| -> Vec<f64> {
        r.metrics
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&none), losses(&plain));
    let exact_bytes = wire(&plain, "wire_intra_node_bytes");
    assert!(exact_bytes > 0);
    assert_eq!(
        wire(&plain, "wire_inter_node_bytes"),
        0,
        "one node: nothing crosses"
    );

    // Exact algorithms: another order of the same additions, within f32 rounding of the ring;
    // rhd and tree are not the ring bit for bit (so they ran).
    for algo in ["rhd", "tree", "auto"] {
        let r = train(d, algo, &["--allreduce", algo]);
        let (name, worst) = r.weights.worst_difference(&plain.weights);
        assert!(
            worst < 1e-5,
            "--allreduce {algo}: {name} differs by {worst:e}"
        );
        if algo != "auto" {
            assert!(
                r.weights != plain.weights,
                "--allreduce {algo} ran the ring"
            );
        }
    }
    // Two nodes of two: the hierarchy sends across nodes only the cross-node phase.
    let ring2 = train(d, "ring2", &["--devices-per-node", "2"]);
    let hier2 = train(
        d,
        "hier2",
        &["--devices-per-node", "2", "--allreduce", "hier"],
    );
    assert!(wire(&ring2, "wire_inter_node_bytes") > 0);
    let (name, worst) = hier2.weights.worst_difference(&plain.weights);
    assert!(worst < 1e-5, "hier: {name} differs by {worst:e}");
    assert!(
        wire(&hier2, "wire_inter_node_bytes") < wire(&ring2, "wire_inter_node_bytes"),
        "hier {} vs ring {} bytes across nodes",
        wire(&hier2, "wire_inter_node_bytes"),
        wire(&ring2, "wire_inter_node_bytes")
    );

    // Codecs: lossy (not bitwise), close for bf16 (AdamW turns tiny gradient differences into
    // lr-sized steps, so the losses are compared, not the weights), fewer bytes on the wire.
    let bf16 = train(d, "bf16", &["--grad-compression", "bf16"]);
    assert!(bf16.weights != plain.weights, "bf16 is exact");
    for (a, b) in losses(&bf16).iter().zip(losses(&plain)) {
        assert!((a - b).abs() < 0.01 * b, "bf16 loss {a} vs exact {b}");
    }
    let int8 = train(d, "int8", &["--grad-compression", "int8"]);
    let int8_off = train(
        d,
        "int8off",
        &["--grad-compression", "int8", "--error-feedback", "off"],
    );
    assert!(
        int8.weights != int8_off.weights,
        "--error-feedback changed nothing"
    );
    for (r, name) in [(&bf16, "bf16"), (&int8, "int8")] {
        assert!(
            wire(r, "wire_intra_node_bytes") < exact_bytes,
            "{name} sent {} bytes, exact {exact_bytes}",
            wire(r, "wire_intra_node_bytes")
        );
    }
    // QSGD with 4 levels: 4 bits a value (8 to a word) and a norm per 256, below int8's bytes.
    let qsgd = train(d, "qsgd", &["--grad-compression", "qsgd:4"]);
    assert!(
        wire(&qsgd, "wire_intra_node_bytes") < wire(&int8, "wire_intra_node_bytes"),
        "qsgd:4 sent {} bytes, int8 {}",
        wire(&qsgd, "wire_intra_node_bytes"),
        wire(&int8, "wire_intra_node_bytes")
    );
    let mut sparse = Vec::new();
    for codec in [
        "sign",
        "topk:0.05",
        "oktopk:0.05",
        "randk:0.1",
        "powersgd:2",
        "fp16",
        "qsgd:4",
        "dgc:0.05",
        "okdgc:0.05",
    ] {
        let r = train(d, codec, &["--grad-compression", codec]);
        assert!(r.weights != plain.weights, "{codec} changed nothing");
        assert!(r
            .metrics
            .iter()
            .all(|m| m["loss"].as_f64().unwrap().is_finite()));
        if codec.contains("topk") || codec.contains("dgc") {
            sparse.push(r);
        }
    }
    // Ok-Topk's balanced exchange: another selection (the top of the sums) than top-k's
    // gather, in fewer bytes (about 2k pairs a member against (N − 1)·k = 3k at 4).
    // DGC's selection by the same exchange likewise.
    for (gather, balanced) in [(&sparse[0], &sparse[1]), (&sparse[2], &sparse[3])] {
        assert!(
            balanced.weights != gather.weights,
            "the balanced exchange ran the gather"
        );
        assert!(
            wire(balanced, "wire_intra_node_bytes") < wire(gather, "wire_intra_node_bytes"),
            "balanced sent {} bytes, gathered {}",
            wire(balanced, "wire_intra_node_bytes"),
            wire(gather, "wire_intra_node_bytes")
        );
    }
    // Only across nodes: two nodes of two, exact inside; fewer bytes cross than flat int8.
    let flat = train(
        d,
        "flat",
        &["--devices-per-node", "2", "--grad-compression", "int8"],
    );
    let cross = train(
        d,
        "cross",
        &[
            "--devices-per-node",
            "2",
            "--grad-compression",
            "int8",
            "--compress-cross-node-only",
        ],
    );
    assert!(
        cross.weights != flat.weights,
        "cross-node-only changed nothing"
    );
    assert!(wire(&cross, "wire_inter_node_bytes") < wire(&flat, "wire_inter_node_bytes"));
    // On one node, cross-node-only compresses nothing, and says so.
    let one = train(
        d,
        "one",
        &["--grad-compression", "int8", "--compress-cross-node-only"],
    );
    assert!(one.weights == plain.weights, "one node: not exact");
    assert!(
        one.stderr.contains("every rank is on one node"),
        "{}",
        one.stderr
    );
}

#[test]
fn residuals_survive_a_checkpoint_and_resume_is_bitwise() {
    let d = &common::Scratch::new(setup);
    let codec = ["--grad-compression", "int8"];
    let whole = train(d, "whole", &codec);
    let ck = d.join("ck");
    let ck = ck.to_str().unwrap();
    let mut first = codec.to_vec();
    first.extend(["--checkpoint-dir", ck, "--checkpoint-every", "2"]);
    train(d, "first", &first);
    let step2 = format!("{ck}/step-00000002");
    assert!(Path::new(&step2).join("run_state.safetensors").is_file());
    let mut resumed = codec.to_vec();
    resumed.extend(["--resume", &step2]);
    let second = train(d, "second", &resumed);
    assert!(
        second.weights == whole.weights,
        "resuming lost the residuals"
    );
    // Resuming without compression reports what the checkpoint's state is not used for.
    let exact = train(d, "exact", &["--resume", &step2]);
    assert!(
        exact.stderr.contains("gradient-exchange state")
            && exact.stderr.contains("grad_compression"),
        "{}",
        exact.stderr
    );
}

#[test]
fn bad_exchange_settings_are_refused_by_name() {
    let d = &common::Scratch::new(setup);
    for (flags, says) in common::cases(
        "
        --grad-compression topk:2 => topk:2
        --grad-compression int4 => int4
        --grad-compression qsgd:0 => qsgd:0
        --grad-compression oktopk:0 => oktopk:0
        --grad-compression auto --compress-cross-node-only => compress_cross_node_only
        --grad-compression dgc:0 => dgc:0
        --grad-compression okdgc:0 => okdgc:0
        --grad-compression okdgc:0.01 --error-feedback off => error_feedback
        --grad-compression dgc:0.01 --error-feedback off => error_feedback
        --allreduce fast => fast
        --error-feedback maybe => --error-feedback maybe
        --grad-compression powersgd:2 --compress-cross-node-only => compress_cross_node_only
        --devices-per-node 3 => devices_per_node
        --optimizer lion => --optimizer lion
        --onebit-warmup 3 => --optimizer onebit-adam
        --optimizer onebit-adam --onebit-warmup 0 => onebit_warmup
        --optimizer onebit-adam --grad-compression int8 => grad_compression
        --optimizer onebit-adam --error-feedback off => error_feedback
        --optimizer onebit-adam --strategies dp4:16,dp2tp2:max => hot, concurrent or planned
        --optimizer onebit-adam --sync local:2 => another synchronisation model
        ",
    ) {
        let e = refused(d, &flags);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
}

#[test]
fn onebit_adam_is_adamw_through_its_warm_up_then_sends_a_bit_a_value_and_resumes_bitwise() {
    let d = &common::Scratch::new(setup);
    // No clipping, so that the warm-up is AdamW's step exactly (under 1-bit Adam each member
    // clips its own gradient, not the sum).
    let adamw = train(d, "adamw", &["--grad-clip", "inf"]);
    let onebit = |warmup: &'static str| -> Vec<&'static str> {
        vec![
            "--grad-clip",
            "inf",
            "--optimizer",
            "onebit-adam",
            "--onebit-warmup",
            warmup,
        ]
    };
    let warm = train(d, "warm", &onebit("4"));
    assert!(
        warm.weights == adamw.weights,
        "4 steps inside the warm-up are not AdamW's"
    );
    let one = train(d, "one", &onebit("2"));
    assert!(
        one.weights != adamw.weights,
        "the 1-bit stage changed nothing"
    );
    let per_step = |r: &Run| -> Vec<(f64, u64)> {
        r.metrics
            .iter()
            .map(|m| {
                (
                    m["loss"].as_f64().unwrap(),
                    m["wire_intra_node_bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (exact, compressed) = (per_step(&adamw), per_step(&one));
    // Steps 1-2 exact (the same losses and bytes); the loss of step 3 still comes from exact
    // updates; steps 3-4 send the momentum at about a bit a value instead of 32.
    assert_eq!(
        exact[..3].iter().map(|e| e.0).collect::<Vec<_>>(),
        compressed[..3].iter().map(|e| e.0).collect::<Vec<_>>()
    );
    assert_eq!(exact[0].1, compressed[0].1);
    for step in 2..4 {
        let ratio = compressed[step].1 as f64 / exact[step].1 as f64;
        assert!(ratio < 0.1, "step {}: {ratio} of the exact bytes", step + 1);
    }
    assert!(
        one.stderr.contains("onebit-adam (exact for 2 steps)"),
        "{}",
        one.stderr
    );
    // The momentum, the step count and both residuals go into the checkpoint.
    let ck = d.join("onebit-ck");
    let ck = ck.to_str().unwrap();
    let mut first = onebit("2");
    first.extend(["--checkpoint-dir", ck, "--checkpoint-every", "3"]);
    train(d, "onebit-first", &first);
    let step3 = format!("{ck}/step-00000003");
    let mut resumed = onebit("2");
    resumed.extend(["--resume", &step3]);
    let second = train(d, "onebit-second", &resumed);
    assert!(
        second.weights == one.weights,
        "resuming lost 1-bit Adam's state"
    );
}

/// `--grad-compression auto` as a user meets it: on fast links every bucket stays exact (the
/// weights are bitwise the default's), on a slow link between nodes the large buckets are
/// compressed across nodes only, fewer bytes cross, and each step's metrics say what was chosen.
#[test]
fn auto_compresses_only_where_the_links_are_slow_and_says_what_it_chose() {
    let d = &common::Scratch::new(setup);
    let cluster = |name: &str, cross_gbps: f64| -> String {
        let path = d.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nnodes = 2\ndevices_per_node = 2\npeak_tflops = 1.0\n\
                 memory_gib = 80.0\nmemory_gbps = 100.0\n[efficiency]\nmax = 0.5\n\
                 half_tokens = 0.0\nhalf_width = 0.0\nattention = 0.3\n[same_node]\ngbps = 100.0\n\
                 latency_us = 5.0\n[cross_node]\ngbps = {cross_gbps}\nlatency_us = 10.0\n"
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let (fast, slow) = (cluster("fast", 100.0), cluster("slow", 0.001));
    let plain = train(d, "plain-2n", &["--devices-per-node", "2"]);
    let auto = |name: &str, file: &str| {
        train(
            d,
            name,
            &[
                "--devices-per-node",
                "2",
                "--grad-compression",
                "auto",
                "--sim-cluster",
                file,
            ],
        )
    };
    let choices = |r: &Run| -> Vec<String> {
        r.metrics
            .iter()
            .map(|m| {
                m["exchange_choices"]
                    .as_str()
                    .unwrap_or("missing")
                    .to_string()
            })
            .collect()
    };
    let on_fast = auto("auto-fast", &fast);
    assert!(on_fast.weights == plain.weights, "fast links: not exact");
    assert!(
        choices(&on_fast).iter().all(|c| c.starts_with("none ×")),
        "{:?}",
        choices(&on_fast)
    );
    let on_slow = auto("auto-slow", &slow);
    assert!(
        on_slow.weights != plain.weights,
        "slow links: nothing compressed"
    );
    assert!(
        choices(&on_slow).iter().all(|c| c.contains("across nodes")),
        "{:?}",
        choices(&on_slow)
    );
    assert!(
        wire(&on_slow, "wire_inter_node_bytes") < wire(&plain, "wire_inter_node_bytes"),
        "auto sent {} bytes across nodes, exact {}",
        wire(&on_slow, "wire_inter_node_bytes"),
        wire(&plain, "wire_inter_node_bytes")
    );
    assert!(
        on_slow.stderr.contains("auto (per bucket"),
        "{}",
        on_slow.stderr
    );
}

/// `--comm-schedule priority`: DP4 whose gradients are summed during the next step, the first
/// layers first, trains like the step-by-step exchange (the same losses and norms, weights
/// within 1e-5 after 4 steps; the runtime's own test checks the order against one device), and
/// what it cannot do is refused by name.
#[test]
fn priority_scheduling_trains_like_fifo_and_refuses_what_it_cannot() {
    let d = &common::Scratch::new(setup);
    let fifo = train(d, "fifo", &["--grad-clip", "inf"]);
    let prio = train(
        d,
        "prio",
        &[
            "--grad-clip",
            "inf",
            "--comm-schedule",
            "priority",
            "--bucket-mb",
            "0.01",
        ],
    );
    assert_eq!(fifo.metrics.len(), prio.metrics.len());
    for (a, b) in fifo.metrics.iter().zip(&prio.metrics) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{key}: {x} vs {y}"
            );
        }
    }
    for (k, (t, u)) in fifo
        .weights
        .tensors()
        .iter()
        .zip(prio.weights.tensors())
        .enumerate()
    {
        let worst = t
            .iter()
            .zip(u)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "tensor {k} differs by {worst:e}");
    }
    // Priority's own settings, then what each case adds.
    let prio = ["--comm-schedule", "priority", "--grad-clip", "inf"];
    let with = |rest: &[&'static str]| -> Vec<&'static str> { [&prio[..], rest].concat() };
    for (flags, says) in [
        (vec!["--comm-schedule", "lifo"], "--comm-schedule"),
        (prio[..2].to_vec(), "--grad-clip inf"),
        (with(&["--strategy", "dp2tp2"]), "pure data parallelism"),
        (with(&["--strategy", "dp4zero1"]), "no ZeRO"),
        (
            with(&["--strategies", "dp4:8,dp2tp2:max"]),
            "use --strategy",
        ),
        (
            with(&["--grad-compression", "int8"]),
            "not implemented with it",
        ),
    ] {
        let e = refused(d, &flags);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
}
