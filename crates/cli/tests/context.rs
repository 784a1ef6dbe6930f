//! Context parallelism and recomputation as a user runs them: `--strategy dp2cp2` and a hot
//! schedule with a CP strategy save the single-device weights, `--recompute` lowers the peak
//! bytes and changes nothing else, `hotspa graph` prints the exchange, and what is not built for
//! them is refused by name.

use std::path::Path;

use model::{LlamaConfig, Weights};

mod common;

use common::hotspa;

/// 24 documents of 5 to 120 tokens (long-tailed) and initial weights.
fn setup(dir: &Path) {
    common::affine_docs(dir, 24, |i| [5, 9, 120, 17, 3, 60][i % 6], |i| i);
    common::init_weights(dir);
}

/// Three steps under `how` (strategy flags): the saved weights and what the run printed.
fn train(dir: &Path, name: &str, devices: &str, how: &[&str]) -> (Weights, String) {
    let save = format!("{name}.safetensors");
    let mut args = common::train_args(&[
        "--init",
        "init.safetensors",
        "--devices",
        devices,
        "--global-batch",
        "8",
        "--steps",
        "3",
        "--save",
        &save,
        // Calls of one test write the same name in turn.
        "--force",
    ]);
    args.extend(how);
    let o = hotspa(dir, &args);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{how:?}: {e}");
    let w = Weights::load(&LlamaConfig::load(dir).unwrap(), &dir.join(&save)).unwrap();
    (w, e)
}

#[test]
fn cp_strategies_and_a_cp_schedule_save_the_single_device_weights() {
    let d = &common::Scratch::new(setup);
    let (one, _) = train(d, "one", "1", &["--strategy", "dp1"]);
    for (name, how) in [
        ("dp2cp2", ["--strategy", "dp2cp2"]),
        ("cp4ulysses", ["--strategy", "cp4ulysses"]),
        ("hot", ["--strategies", "dp4:16,tp2cp2:max"]),
    ] {
        let (got, _) = train(d, name, "4", &how);
        let (tensor, worst) = got.worst_difference(&one);
        assert!(worst <= 1e-5, "{name}: {tensor} differs by {worst:e}");
    }
}

/// A calibration of 4 devices so short of memory that no DP × TP × PP strategy holds the
/// 120-token documents (the roomiest about 98 tokens), while recomputing or CP ones do.
const TIGHT_GIB: f64 = 0.00017;

#[test]
fn plan_context_lets_the_planner_choose_cp_and_recomputation() {
    let d = &common::Scratch::new(setup);
    std::fs::write(
        d.join("tight.toml"),
        common::small_profile("tight", TIGHT_GIB, 0.2),
    )
    .unwrap();
    let (one, _) = train(d, "one", "1", &["--strategy", "dp1"]);
    let auto = ["--strategies", "auto", "--profile", "tight.toml"];
    // Without the flag: refused before the first step, naming the way out.
    let mut args = common::train_args(&["--devices", "4"]);
    args.extend(auto);
    let o = hotspa(d, &args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("120 tokens fits no strategy")
            && e.contains("--plan-context"),
        "{e}"
    );
    let mut how = auto.to_vec();
    how.extend(["--plan-context", "--metrics", "m.jsonl"]);
    let (got, _) = train(d, "auto", "4", &how);
    let (tensor, worst) = got.worst_difference(&one);
    assert!(
        worst <= 1e-5,
        "auto with --plan-context: {tensor} differs by {worst:e}"
    );
    let metrics = std::fs::read_to_string(d.join("m.jsonl")).unwrap();
    let plans: Vec<String> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["plan"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(plans.len(), 3);
    // The batches with a 120-token document (the first two) train it recomputing or with CP.
    let long_bucket = |p: &str| {
        let buckets = p.split(" (weights").next().unwrap_or_default();
        let last = buckets.rsplit(',').next().unwrap_or_default();
        last.contains('+') || last.contains("cp")
    };
    for p in &plans[..2] {
        assert!(long_bucket(p), "{p}");
    }
    // `hotspa plan --context` sets the same search's plan beside a given strategy's; without
    // it the automatic plan finds no strategy for the batches.
    let plan = |extra: &[&str]| {
        let mut args = common::cmd![
            "plan --model . --data data.jsonl --devices 4",
            "--global-batch 8 --steps 3 --strategy tp4+full --profile",
            "tight.toml --json"
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        hotspa(d, &args)
    };
    let o = plan(&[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("not searched"), "{e}");
    let o = plan(&["--context"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let auto = v["auto"].as_str().unwrap();
    assert!(long_bucket(auto), "{auto}");
}

/// The simulator's clock charges a CP rank's attention (computed on the host, block by block)
/// and times its exchange, and changes nothing of the run: on a cluster whose attention is a
/// thousand times slower, a CP step's simulated compute grows by far more than the rest of the
/// step could account for; the weights are the unclocked run's, bit for bit.
#[test]
fn the_simulated_clock_times_cp_attention() {
    let d = &common::Scratch::new(setup);
    let fast = common::small_profile("tight", 1.0, 0.2);
    std::fs::write(d.join("fast.toml"), &fast).unwrap();
    std::fs::write(
        d.join("slow.toml"),
        fast.replace("attention = 0.2", "attention = 0.0002"),
    )
    .unwrap();
    let compute = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(d.join(name))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v["simulated"]["transfer"].as_f64().unwrap() > 0.0, "{v}");
                v["simulated"]["compute"].as_f64().unwrap()
            })
            .collect()
    };
    for strategy in ["dp2cp2", "cp4ulysses"] {
        let (plain, _) = train(d, "plain", "4", &["--strategy", strategy]);
        for cluster in ["fast", "slow"] {
            let (timed, _) = train(
                d,
                cluster,
                "4",
                &[
                    "--strategy",
                    strategy,
                    "--sim-cluster",
                    &format!("{cluster}.toml"),
                    "--metrics",
                    &format!("{cluster}.jsonl"),
                ],
            );
            assert_eq!(
                timed.worst_difference(&plain).1,
                0.0,
                "{strategy} {cluster}"
            );
        }
        let (f, s) = (compute("fast.jsonl"), compute("slow.jsonl"));
        for (a, b) in f.iter().zip(&s) {
            assert!(*a > 0.0 && *b > 10.0 * a, "{strategy}: {a} vs {b}");
        }
    }
}

#[test]
fn graph_prints_the_exchange() {
    let d = &common::Scratch::new(setup);
    for (spec, devices, needle) in [
        ("dp2cp2", "4", "K,V -> ring (1 hop(s)"),
        ("cp4ulysses", "4", "all-to-all -> heads [S(1)×4]@cp"),
    ] {
        let o = hotspa(
            d,
            &[
                "graph",
                "--model",
                ".",
                "--strategy",
                spec,
                "--devices",
                devices,
            ],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains(needle), "{spec}: {out}");
        assert!(out.contains("# DP replicas (dp"), "{spec}: {out}");
    }
    // Recomputation shows as the forward ops cloned into the backward.
    let o = hotspa(
        d,
        &common::cmd!["graph --model . --strategy tp2+full --devices 2"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("recompute(model.layers.1.mlp.act)"), "{out}");
    let o = hotspa(
        d,
        &common::cmd!["graph --model . --strategy tp2+full,tp2 --devices 2"],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("print tp2+full alone"),
        "{e}"
    );
}

#[test]
fn what_is_not_built_for_cp_is_refused_by_name() {
    let d = &common::Scratch::new(setup);
    let base = common::train_args(&["--devices", "4", "--global-batch", "8", "--steps", "1"]);
    for (extra, needle) in common::cases(
        "
        --strategy cp2 => dp1 × cp2 × tp1 × pp1 = 2 devices, but there are 4
        --strategy cp4ulysses5 => takes no degree
        --strategy dp4ring => need cp > 1
        --strategy dp4 --plan-context => --plan-context widens the search of --strategies auto
        --strategy dp4 --plan-concurrent => --plan-concurrent widens the search of --strategies auto
        --strategy dp4 --profile a800x32 => --profile is the planner's calibration for --strategies auto
        --strategy cp2tp2ulysses =>
        ",
    ) {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(&extra);
        let o = hotspa(d, &args);
        let e = String::from_utf8_lossy(&o.stderr);
        if needle.is_empty() {
            // tp2cp2ulysses: 2 heads per TP rank over a CP group of 2 divide; it runs.
            assert!(o.status.success(), "{extra:?}: {e}");
            continue;
        }
        assert!(!o.status.success(), "{extra:?} ran");
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
}

/// The peak bytes per rank a run reports.
fn peaks(stderr: &str) -> Vec<usize> {
    let line = stderr
        .lines()
        .find(|l| l.contains("peak activation+gradient bytes per rank"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let list = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
    list.split(", ").map(|x| x.parse().unwrap()).collect()
}

#[test]
fn recompute_lowers_the_peak_and_keeps_the_weights() {
    let d = &common::Scratch::new(setup);
    let run = |name: &str, how: &[&str]| {
        let (w, e) = train(d, name, "2", how);
        (peaks(&e), w, e)
    };
    let (none, w0, _) = run("none", &["--strategy", "cp2"]);
    let (sel, w1, _) = run("sel", &["--strategy", "cp2", "--recompute", "selective"]);
    let (full, w2, _) = run("full", &["--strategy", "cp2", "--recompute", "full"]);
    assert!(
        full[0] < sel[0] && sel[0] < none[0],
        "{none:?} {sel:?} {full:?}"
    );
    assert_eq!(w0.worst_difference(&w1).1, 0.0);
    assert_eq!(w0.worst_difference(&w2).1, 0.0);
    // A strategy's own mode wins over --recompute; the others take the flag's.
    let (_, _, e) = run(
        "hot",
        &[
            "--strategies",
            "dp2:16,cp2+selective:max",
            "--recompute",
            "full",
        ],
    );
    assert!(e.contains("dp2+full") && e.contains("cp2+selective"), "{e}");
    for (extra, needle) in common::cases(
        "
        --strategy dp2 --recompute half => --recompute half: use none
        --strategy dp2+partial => `+partial`: recomputation is
        --strategies auto --recompute full => the planner chooses recomputation itself
        ",
    ) {
        let mut args = common::train_args(&["--devices", "2"]);
        args.extend(&extra);
        let o = hotspa(d, &args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(needle), "{extra:?}: {e}");
    }
}
