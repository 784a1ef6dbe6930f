//! The benchmarks run as a user would call them, with tiny sizes, and print one JSON object.

mod common;

use common::{json_out as json, run as hotspa};

#[test]
fn bench_gemm_json() {
    let v = json(&common::cmd![
        "bench gemm --shapes 33x17x65 --seconds 0.01 --json"
    ]);
    assert_eq!(v["bench"], "gemm");
    let row = &v["rows"][0];
    assert_eq!(row["m"], 33);
    assert!(row["ours_gflops"].as_f64().unwrap() > 0.0);
    assert!(v["machine"]["peak_gflops"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_attention_json() {
    let v = json(&common::cmd![
        "bench attention --tokens 100 --heads 4 --kv-heads 2",
        "--seconds 0.01 --json"
    ]);
    assert_eq!(v["rows"][0]["tokens"], 100);
    assert!(v["rows"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `--cp N` adds ring and Ulysses over N thread ranks; Ulysses only where the heads divide.
#[test]
fn bench_attention_cp_times_ring_and_ulysses() {
    let run = |heads: &str, kv: &str| {
        json(&[
            "bench",
            "attention",
            "--tokens",
            "100",
            "--heads",
            heads,
            "--kv-heads",
            kv,
            "--seconds",
            "0.01",
            "--cp",
            "2",
            "--json",
        ])
    };
    let v = run("4", "2");
    assert_eq!(v["cp"], 2);
    assert!(v["rows"][0]["ring_ms"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][0]["ulysses_ms"].as_f64().unwrap() > 0.0);
    let v = run("6", "3");
    assert!(v["rows"][0]["ring_ms"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][0]["ulysses_ms"].is_null(), "{v}");
    // Without --cp, no context-parallel timing.
    let v = json(&common::cmd![
        "bench attention --tokens 64 --seconds 0.01 --json"
    ]);
    assert!(
        v["cp"].is_null() && v["rows"][0]["ring_ms"].is_null(),
        "{v}"
    );
}

#[test]
fn bench_comm_json_and_unknown_backend() {
    let v = json(&common::cmd!["bench comm --devices 3 --sizes-mib 1 --json"]);
    assert_eq!(v["devices"], 3);
    assert_eq!(v["rows"].as_array().unwrap().len(), 5);
    let out = hotspa(&["bench", "comm", "--backend", "gloo"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use thread or mpi"), "{err}");
    if !cfg!(feature = "mpi") {
        let out = hotspa(&["bench", "comm", "--backend", "mpi"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("built without the `mpi` feature"), "{err}");
    }
}

#[test]
fn bad_shapes_are_clear_errors() {
    let out = hotspa(&["bench", "gemm", "--shapes", "12x3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shape `12x3` is not MxNxK"));
}

#[test]
fn graph_prints_exec_graphs_and_refuses_what_is_not_built() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"vocab_size": 32, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}"#,
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let out = hotspa(&["graph", "--model", model]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("param %1 model.layers.0.self_attn.q_proj.weight[8, 8]"),
        "{text}"
    );
    assert!(text.contains("= attention_grad("), "{text}");
    let out = hotspa(&[
        "graph",
        "--model",
        model,
        "--strategy",
        "dp2tp2",
        "--devices",
        "8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dp2 × tp2 × pp1 = 4 devices, but there are 8"),
        "{err}"
    );
    let out = hotspa(&[
        "graph",
        "--model",
        model,
        "--strategy",
        "tp2sp",
        "--devices",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("= reduce-scatter@tp.axis0("), "{text}");
    assert!(text.contains("= all-gather@tp.axis0("), "{text}");
    let out = hotspa(&[
        "graph",
        "--model",
        model,
        "--strategy",
        "tp2pp2",
        "--devices",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 pipeline stages but only 1 layers"), "{err}");
}

/// `bench step --backend cpu`: the default 3.4 M model's step with tokens/s against this
/// machine's peak and the time of every op kind; micro-batches change the calls per op.
#[test]
fn bench_step_on_the_cpu_breaks_the_step_down_by_op() {
    let run = |micro: &str| {
        json(&[
            "bench",
            "step",
            "--backend",
            "cpu",
            "--sequences",
            "2",
            "--seq-len",
            "48",
            "--steps",
            "3",
            "--micro-batch",
            micro,
            "--json",
        ])
    };
    let v = run("2");
    // 2 × 512·256 (embedding, head) + 4 × (4·256² + 3·256·688 + 2·256) + 256.
    assert_eq!(v["params"], 3_426_560, "{v}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["peak_gflops"], v["machine"]["peak_gflops"], "{v}");
    let calls = |v: &serde_json::Value, op: &str| {
        v["profile"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["op"] == op)
            .unwrap_or_else(|| panic!("no {op} in {v}"))["calls"]
            .as_u64()
            .unwrap()
    };
    let share: f64 = v["profile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["share"].as_f64().unwrap())
        .sum();
    assert!(share > 0.0 && share <= 1.0 + 1e-9, "{share}");
    // One micro-batch of two sequences per step, then two of one: twice the embedding calls.
    let one = calls(&v, "Embedding");
    assert_eq!(calls(&run("1"), "Embedding"), 2 * one);
}
