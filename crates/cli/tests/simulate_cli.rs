//! `hotspa simulate` as a user calls it.

mod common;

use common::{json_out as json, run as hotspa};

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
    let v = json(&[&args[..], &["--json"]].concat());
    assert_eq!(v["setting"], "llama2-13b/16");
    let (fixed, auto) = (
        v["fixed"]["seconds"].as_f64().unwrap(),
        v["auto"]["seconds"].as_f64().unwrap(),
    );
    assert!(auto > 0.0 && auto <= fixed);
    assert!(v["paper"]["seconds"].as_f64().unwrap() >= auto);
    assert!(v["auto"]["memory_bytes"].as_f64().unwrap() < 80.0 * (1u64 << 30) as f64);
    // Two groups of devices at once: a plan with `|` whose groups take the 16 devices.
    let c = &v["concurrent"]["estimate"];
    let plan = c["plan"].as_str().unwrap();
    assert!(plan.contains(" | "), "{plan}");
    assert!(c["seconds"].as_f64().unwrap() > 0.0);
    let out = hotspa(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    for row in [
        "static",
        "paper",
        "auto",
        "× the static strategy",
        "concurrent",
    ] {
        assert!(text.contains(row), "{text}");
    }
}

/// `--context` adds the static strategy and the plan with CP and recomputation searched; the
/// flag changes what is printed, and the plan with the larger search is never slower.
#[test]
fn context_adds_the_cp_and_recomputation_plans() {
    let args = [
        "simulate",
        "--gpus",
        "8",
        "--max-len",
        "32768",
        "--global-batch",
        "48",
        "--dataset",
        "github",
    ];
    let out = hotspa(&[&args[..], &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["context"].is_null(), "{v}");
    let v = json(&[&args[..], &["--json", "--context"]].concat());
    let (auto, cp) = (
        v["auto"]["seconds"].as_f64().unwrap(),
        v["context"]["auto"]["seconds"].as_f64().unwrap(),
    );
    assert!(cp > 0.0 && cp <= auto + 1e-9, "{v}");
    // The floor under every plan: in the JSON, and printed with the static strategy's
    // distance from it.
    let floor = v["floor_seconds"].as_f64().unwrap();
    assert!(floor > 0.0 && floor <= cp, "{v}");
    let out = hotspa(&[&args[..], &["--context"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("auto+cp") && text.contains("with CP and recomputation searched"),
        "{text}"
    );
    let fixed = v["context"]["fixed"]["seconds"].as_f64().unwrap();
    assert!(
        text.contains(&format!(
            "floor: no plan runs this batch in under {floor:.2} s"
        )) && text.contains(&format!("takes {:.2}× that", fixed / floor)),
        "{text}"
    );
}

/// A corpus past what any strategy holds without CP (`crates-io` at 256K on 8 GPUs): the
/// plain rows say why they are missing instead of the command failing; the plans with CP, the
/// concurrent plan and the search of up to four groups are there, the groups' plan holding
/// every length and never slower than the two groups'.
#[test]
fn a_long_tailed_corpus_past_256k_is_planned_with_cp_and_groups() {
    let args = [
        "simulate",
        "--cluster",
        "h100x8",
        "--gpus",
        "8",
        "--max-len",
        "262144",
        "--global-batch",
        "64",
        "--dataset",
        "crates-io",
        "--context",
    ];
    let v = json(&[&args[..], &["--json"]].concat());
    assert!(
        v["without_context"]
            .as_str()
            .is_some_and(|w| w.contains("fits no strategy")),
        "{v}"
    );
    let groups = &v["groups"]["estimate"];
    let plan = groups["plan"].as_str().unwrap();
    assert!(plan.contains(" | "), "{plan}");
    let (g, two) = (
        groups["seconds"].as_f64().unwrap(),
        v["concurrent"]["estimate"]["seconds"].as_f64().unwrap(),
    );
    assert!(g > 0.0 && g <= two, "{g} vs {two}");
    // Without --context the same setting is refused, naming the length.
    let out = hotspa(&args[..args.len() - 1]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("262144 tokens fits no strategy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&hotspa(&args).stdout).to_string();
    for row in [
        "static     (without CP",
        "static+cp",
        "concurrent",
        "groups",
        "up to 4 groups",
    ] {
        assert!(text.contains(row), "{row}: {text}");
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    for (args, want) in common::cases(
        "
        --cluster tpu-pod => unknown cluster `tpu-pod`
        --gpus 64 => --gpus 64: the cluster a800x32 has 32 devices
        --dataset wiki => unknown dataset `wiki`
        --model gpt-5 => unknown model `gpt-5`
        --grad-compression zip => gradient codec `zip`
        --allreduce star => all-reduce algorithm `star`
        --grad-compression powersgd:2 --compress-cross-node-only => not implemented
        ",
    ) {
        let out = hotspa(&[&["simulate"][..], &args].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// On commodity Ethernet the DP exchange dominates a static step: the table of codecs and
/// algorithms shows which pay (sign, top-k, PowerSGD, the hierarchy), and the chosen exchange
/// changes the plans' estimates.
#[test]
fn the_exchange_table_says_when_compression_pays() {
    let args = [
        "simulate",
        "--cluster",
        "eth8x8",
        "--gpus",
        "32",
        "--model",
        "llama2-7b",
        "--max-len",
        "4096",
        "--global-batch",
        "128",
        "--json",
    ];
    let exact = hotspa(&args);
    assert!(
        exact.status.success(),
        "{}",
        String::from_utf8_lossy(&exact.stderr)
    );
    let exact: serde_json::Value = serde_json::from_slice(&exact.stdout).unwrap();
    assert!(
        exact.get("exchanges").is_none(),
        "no table without an exchange flag"
    );
    let v = json(
        &[
            &args[..],
            &["--grad-compression", "sign", "--allreduce", "auto"],
        ]
        .concat(),
    );
    let fixed = |v: &serde_json::Value| v["fixed"]["seconds"].as_f64().unwrap();
    assert!(
        fixed(&v) < fixed(&exact),
        "sign did not speed up the static strategy"
    );
    let rows = v["exchanges"]["rows"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["exchange"] == name)
            .unwrap_or_else(|| panic!("no row {name}: {rows:?}"))
    };
    let step = |name: &str| row(name)["step_seconds"].as_f64().unwrap();
    let across = |name: &str| row(name)["cost"]["inter_bytes"].as_f64().unwrap();
    // The best static strategy keeps one DP member per node (TP inside): the hierarchy has
    // nothing to gather inside a node, and compressing what crosses pays.
    assert!(step("none, hier") <= step("none, ring"));
    assert!(step("sign, auto") < 0.75 * step("none, ring"));
    assert!(across("sign, auto") < 0.2 * across("none, ring"));
    assert!(across("sign across nodes, auto") < 0.2 * across("none, ring"));
    assert!(across("powersgd:4, auto") < 0.02 * across("none, ring"));
    // The schedules of the same strategy: fifo is the plans' own step; priority is priced
    // where the strategy is pure DP, refused with its reason otherwise; pipeline schedules
    // where it has stages.
    let scheds = v["exchanges"]["schedules"].as_array().unwrap();
    let strategy = v["exchanges"]["strategy"].as_str().unwrap();
    assert_eq!(scheds[0]["schedule"], "--comm-schedule fifo");
    let fifo = scheds[0]["step_seconds"].as_f64().unwrap();
    assert!(
        (fifo - fixed(&v)).abs() <= 1e-9 * fifo,
        "{fifo} vs {}",
        fixed(&v)
    );
    let pure_dp =
        !strategy.contains("tp") && !strategy.contains("pp") && !strategy.contains("zero");
    assert_eq!(
        scheds[1]["step_seconds"].is_null(),
        !pure_dp,
        "{strategy}: {scheds:?}"
    );
    let staged = scheds
        .iter()
        .any(|r| r["schedule"] == "--pipeline-schedule pipedream-2bw");
    assert_eq!(staged, strategy.contains("pp"), "{strategy}: {scheds:?}");
    // The table as text.
    let text = hotspa(
        &args[..args.len() - 1]
            .iter()
            .copied()
            .chain(["--grad-compression", "int8"])
            .collect::<Vec<_>>(),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("gradient exchange of the static strategy")
            && text.contains("← chosen")
            && text.contains("schedules of the static strategy"),
        "{text}"
    );
}

#[test]
fn profile_then_plan_a_training_run_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let profile = d.join("p.toml");
    let model = format!("{root}/examples/tiny-llama");
    let out = hotspa(&[
        "profile",
        "--devices",
        "2",
        "--model",
        &model,
        "--probe-tokens",
        "256",
        "--rounds",
        "2",
        "--out",
        profile.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("probe: DP steps of 256 and 16 tokens per rank")
            && said
                .contains("the fastest of 2 rounds of every measurement kept (the DP step took "),
        "{said}"
    );
    // Pipelines wait for cores only where the ranks share them.
    let shared = std::thread::available_parallelism().map_or(1, |n| n.get()) < 2;
    assert_eq!(
        said.contains("pipeline probe (pp2, 4 micro-batches of 128 tokens)"),
        shared,
        "{said}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&profile).unwrap();
    assert!(text.contains("compute_scale = "), "{text}");
    assert!(
        text.contains("devices_per_node = 2") && text.contains("[efficiency]"),
        "{text}"
    );
    let common = [
        "--model",
        &format!("{root}/examples/tiny-llama"),
        "--data",
        &format!("{root}/crates/kernels/src"),
        "--devices",
        "2",
        "--strategies",
        "dp2:128,tp2:max",
        "--steps",
        "3",
        "--global-batch",
        "8",
        "--max-len",
        "256",
    ]
    .map(String::from);
    let metrics = d.join("m.jsonl");
    let mut train: Vec<String> = vec!["train".into()];
    train.extend(common.iter().cloned());
    train.extend(["--metrics".into(), metrics.display().to_string()]);
    let out = hotspa(&train.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut plan: Vec<String> = vec!["plan".into()];
    plan.extend(common.iter().cloned());
    plan.extend(
        [
            "--profile",
            profile.to_str().unwrap(),
            "--compare",
            metrics.to_str().unwrap(),
            "--json",
        ]
        .map(String::from),
    );
    let v = json(&plan.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(v["rows"].as_array().unwrap().len(), 3);
    assert!(v["rows"][1]["predicted_s"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][1]["measured_s"].as_f64().unwrap() > 0.0);
    assert!(v["median_ratio"].as_f64().unwrap() > 0.0);
    // A profile for another device count is refused.
    plan[6] = "4".into();
    plan[8] = "dp4:128,tp4:max".into();
    let out = hotspa(&plan.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the profile is for 2 devices"));
}

#[test]
fn the_sync_table_compares_architectures_on_topologies() {
    let v = json(&["simulate", "--sync-table", "--model", "llama2-7b", "--json"]);
    let tables = v.as_array().unwrap();
    assert_eq!(tables.len(), 2);
    // llama2-7b: 6.74 G parameters, fp32.
    let bytes = tables[0]["bytes"].as_f64().unwrap();
    assert!((bytes / 4.0 - 6.74e9).abs() < 0.01e9, "{bytes}");
    let columns: Vec<&str> = tables[0]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for want in [
        "fat-tree 8×8 1:1, TCP",
        "fat-tree 8×8 4:1, RDMA",
        "BCube(8,1), RDMA",
        "NVLink",
    ] {
        assert!(
            columns.iter().any(|c| c.contains(want)),
            "{want}: {columns:?}"
        );
    }
    let row = |t: &serde_json::Value, name: &str| -> Vec<f64> {
        t["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["architecture"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}"))["seconds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect()
    };
    // The whole gradient: in-network aggregation is fastest everywhere; a bucket over TCP:
    // the ring's 126 latencies lose to the co-located parameter server's 2.
    let (ina, ring) = (row(&tables[0], "in-network"), row(&tables[0], "ring"));
    assert!(ina.iter().zip(&ring).all(|(a, r)| a < r));
    let (ps, ring) = (
        row(&tables[1], "parameter server (64"),
        row(&tables[1], "ring"),
    );
    assert!(ps[0] < ring[0] / 2.0, "{ps:?} vs {ring:?}");
    let text = hotspa(&["simulate", "--sync-table"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("hierarchical all-reduce") && text.contains("4 MiB bucket"));
}

/// `hotspa plan --sim-cluster C`: the cost model and the simulator's clock of the same run, step
/// by step, with their ratio (the agreement test sweeps every family; this is the command).
#[test]
fn plan_sets_the_cost_model_beside_the_clock() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let rows: Vec<serde_json::Value> = serde_json::from_value(json(&[
        "plan",
        "--model",
        &format!("{root}/examples/tiny-llama"),
        "--data",
        &format!("{root}/crates/kernels/src"),
        "--devices",
        "4",
        "--strategy",
        "tp2pp2",
        "--steps",
        "2",
        "--global-batch",
        "8",
        "--max-len",
        "128",
        "--sim-cluster",
        "a800x32",
        "--json",
    ]))
    .unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let ratio = r["predicted_s"].as_f64().unwrap() / r["clocked_s"].as_f64().unwrap();
        assert!((ratio - 1.0).abs() < 0.15, "{r}");
    }
}

/// `--strategy` estimates one strategy and reports the figures published runs give: the
/// throughput is the batch's tokens over the step, MFU the model FLOPs (counted here from the
/// config, independently of the cost model) over the peak; `--micro-batch-tokens` changes the
/// packing and so the step; a strategy that cannot hold the batch's longest sequence is refused.
#[test]
fn one_strategy_reports_throughput_and_mfu() {
    let dir = tempfile::tempdir().unwrap();
    let lens = dir.path().join("lens.txt");
    std::fs::write(&lens, "4096\n").unwrap();
    let lens = lens.to_str().unwrap();
    let base = [
        "simulate",
        "--cluster",
        "a800x32",
        "--gpus",
        "8",
        "--model",
        "llama2-7b",
        "--dataset",
        lens,
        "--max-len",
        "4096",
        "--global-batch",
        "32",
        "--json",
    ];
    let run = |extra: &[&str]| json(&[&base[..], extra].concat());
    let v = run(&["--strategy", "dp8zero1"]);
    let seconds = v["estimate"]["seconds"].as_f64().unwrap();
    let tps = v["tokens_per_s_per_gpu"].as_f64().unwrap();
    let tokens = 32.0 * 4096.0;
    assert!(((tps * 8.0 * seconds) / tokens - 1.0).abs() < 1e-9, "{v}");
    // LLaMA-2 7B: 6·N per token for the GEMMs (N without the embedding, with the LM head) and
    // causal attention's 6·L·h per token per layer (forward 2·2·L·h/2, backward twice that).
    let (h, layers, inter, vocab) = (4096.0, 32.0, 11008.0, 32000.0);
    let n = layers * (4.0 * h * h + 3.0 * h * inter) + h * vocab;
    let flops = tokens * (6.0 * n + 6.0 * 4096.0 * h * layers);
    let tflops = flops / seconds / 8.0 / 1e12;
    let got = v["model_tflops_per_gpu"].as_f64().unwrap();
    assert!((got / tflops - 1.0).abs() < 0.02, "{got} vs {tflops}");
    let mfu = v["mfu"].as_f64().unwrap();
    assert!(mfu > 0.2 && mfu < 1.0, "{mfu}");
    assert!(
        (mfu * 312.0 / got - 1.0).abs() < 1e-9,
        "A800's bf16 peak is 312 TFLOP/s"
    );
    // One sequence per micro-batch instead of as many as memory holds: a different step.
    let one = run(&["--strategy", "dp8zero1", "--micro-batch-tokens", "4096"]);
    assert_ne!(one["estimate"]["seconds"], v["estimate"]["seconds"]);
    // The table form says the same figures.
    let out = hotspa(&[&base[..base.len() - 1], &["--strategy", "tp8"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tokens/s per GPU") && text.contains("MFU"),
        "{text}"
    );
    // A 64 K-token sequence of LLaMA-2 7B does not fit one A800's memory under DP.
    let long = dir.path().join("long.txt");
    std::fs::write(&long, "65536\n").unwrap();
    let out = hotspa(&common::cmd![
        "simulate --cluster a800x32 --gpus 8 --model llama2-7b",
        "--dataset",
        &long,
        "--max-len 65536 --global-batch 8 --strategy dp8zero1"
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds at most"), "{err}");
    // --micro-batch-tokens without --strategy is refused by clap.
    let out = hotspa(&[&base[..], &["--micro-batch-tokens", "4096"]].concat());
    assert!(!out.status.success());
}

/// `--jobs K`: K copies of the best static strategy sharing the links between nodes; fairly
/// every job slows by what its exchange no longer hides, by priority the first runs as alone.
#[test]
fn jobs_sharing_the_links_between_nodes() {
    let jobs = |k: &'static str| {
        [
            "simulate",
            "--cluster",
            "eth8x8",
            "--gpus",
            "64",
            "--jobs",
            k,
        ]
    };
    let v = json(&[&jobs("2")[..], &["--json"]].concat());
    let alone = v["alone"].as_f64().unwrap();
    let each = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (fair, prio) = (each("fair"), each("priority"));
    assert_eq!((fair.len(), prio.len()), (2, 2));
    // The exchange shows beyond its overlap once it runs at half the link.
    let load = &v["load"];
    let (x, o) = (
        load["exchange"].as_f64().unwrap(),
        load["overlap"].as_f64().unwrap(),
    );
    let want = load["compute"].as_f64().unwrap() + (2.0 * x - o).max(0.0);
    assert!(
        fair.iter().all(|t| (t - want).abs() < 1e-6 * want),
        "{fair:?} vs {want}"
    );
    assert!(fair[0] > alone, "sharing cost nothing: {fair:?} vs {alone}");
    assert!(
        (prio[0] - alone).abs() < 1e-9 * alone,
        "{prio:?} vs {alone}"
    );
    let e = hotspa(&jobs("0"));
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--jobs 0"));
}
