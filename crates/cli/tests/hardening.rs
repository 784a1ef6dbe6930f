//! `hotspa train` against the mistakes and faults of a hostile but realistic user: nothing is
//! lost, nothing hangs, nothing is silently accepted. One test per class of mistake.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

const CONFIG: &str = r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 22, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}"#;

fn hotspa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hotspa"))
}

/// `hotspa train --model MODEL --data DATA` (folders or files).
fn train_cmd(model: &Path, data: &Path) -> Command {
    let mut c = hotspa();
    c.args(common::cmd!["train --model", model, "--data", data]);
    c
}

/// Starts `c` with its standard error piped and reads it until a line starts with `until`:
/// the child and the rest of its lines.
fn started(
    c: &mut Command,
    until: &str,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
) {
    let mut child = c.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        if l.starts_with(until) {
            break;
        }
    }
    (child, lines)
}

fn setup(dir: &Path) {
    common::mixed_docs(dir, CONFIG, 24, &[3, 9, 2, 30, 5, 14], 40);
}

/// `train --model D --data D/data.jsonl --global-batch 8 --micro-batch-tokens 32` (unless
/// `extra` gives a global batch) and `extra`.
fn train<S: AsRef<std::ffi::OsStr>>(d: &Path, extra: &[S]) -> Output {
    let mut c = train_cmd(d, &d.join("data.jsonl"));
    if !extra.iter().any(|a| a.as_ref() == "--global-batch") {
        c.args(["--global-batch", "8", "--micro-batch-tokens", "32"]);
    }
    c.args(extra).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `hotspa plot METRICS -o OUT` and `extra`.
fn plot(metrics: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = hotspa();
    c.args(common::cmd!["plot", metrics, "-o", out]);
    c.args(extra).output().unwrap()
}

/// The run failed before its first step, with `needle` in the message.
fn refused(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "succeeded, expected `{needle}`:\n{e}");
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(needle), "expected `{needle}` in:\n{e}");
    assert!(
        !e.contains("step     1/"),
        "a step ran before the refusal:\n{e}"
    );
}

#[test]
fn outputs_are_checked_before_the_first_step() {
    let d = &common::Scratch::new(setup);
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    refused(&train(d, &["--save", &p(d)]), "save: ");
    refused(&train(d, &["--save", "/dev/null"]), "is a character device");
    assert!(!Path::new("/dev/null").is_file(), "/dev/null was replaced");
    refused(
        &train(d, &["--checkpoint-dir", &p(&file.join("ck"))]),
        "cannot create the directory",
    );
    refused(
        &train(d, &["--checkpoint-dir", &p(&file)]),
        "is a file, not a directory",
    );
    refused(&train(d, &["--metrics", &p(d)]), "metrics: ");
}

#[test]
fn checkpoint_directories_are_owned() {
    let d = &common::Scratch::new(setup);
    let ck = d.join("ck");
    let cks = ck.to_str().unwrap();
    let m = d.join("m.jsonl");
    let ms = m.to_str().unwrap();
    // Retention: every step checkpointed, the last two kept.
    let retain = common::cmd![
        "--steps 4 --checkpoint-every 1 --keep-last 2 --checkpoint-dir",
        cks,
        "--metrics",
        ms
    ];
    common::stderr_ok(&train(d, &retain));
    let mut steps: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-00000003", "step-00000004"]);
    // A new run into it is refused; forced, it starts over.
    refused(
        &train(d, &["--steps", "2", "--checkpoint-dir", cks]),
        "already holds 2 checkpoint(s)",
    );
    // Resume appends to the metrics: the killed run's partial last line goes, the rest stays.
    let mut text = std::fs::read_to_string(&m).unwrap();
    text.push_str("{\"step\": 5, \"lo");
    std::fs::write(&m, text).unwrap();
    let resume = common::cmd![
        "--steps 6 --resume",
        cks,
        "--checkpoint-dir",
        cks,
        "--metrics",
        ms
    ];
    common::stderr_ok(&train(d, &resume));
    let steps: Vec<u64> = common::records(&m)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Settings that move the data position are refused on resume (unless forced); changed
    // optimizer settings are listed.
    let o = train(d, &["--steps", "8", "--resume", cks, "--seed", "9"]);
    refused(&o, "seed: 0 → 9");
    let o = train(d, &["--steps", "8", "--resume", cks, "--global-batch", "4"]);
    refused(&o, "global_batch: 8 → 4");
    let e = common::stderr_ok(&train(
        d,
        &["--steps", "8", "--resume", cks, "--lr", "1e-3"],
    ));
    assert!(
        e.contains("resuming with changed settings: steps: 6 → 8; lr: 0.0003 → 0.001"),
        "{e}"
    );
    common::stderr_ok(&train(
        d,
        &common::cmd!["--steps 8 --seed 9 --force --resume", cks],
    ));
    refused(
        &train(d, &["--steps", "8", "--resume", cks, "--init", ms]),
        "drop --init",
    );
    // Two runs on one directory: the second is refused while the first lives.
    let ck2 = d.join("ck2");
    // (Its standard error stays open: a closed pipe would end it at its next line.)
    let (mut first, _stderr) = started(
        train_cmd(d, &d.join("data.jsonl"))
            .args(common::cmd!["--steps 100000 --checkpoint-dir", &ck2]),
        "step ",
    );
    let o = train(d, &common::cmd!["--steps 2 --force --checkpoint-dir", &ck2]);
    refused(&o, "is in use by another run");
    first.kill().unwrap();
    first.wait().unwrap();
}

/// Runs `train` with `args` (`common::cmd!`) and `env`: (seconds to exit, output).
fn timed(d: &Path, args: Vec<OsString>, env: &[(&str, &str)]) -> (Duration, Output) {
    let t = Instant::now();
    let mut c = train_cmd(d, &d.join("data.jsonl"));
    c.args(common::cmd!["--global-batch 8 --micro-batch-tokens 32"])
        .args(args);
    let o = c.envs(env.iter().copied()).output().unwrap();
    (t.elapsed(), o)
}

/// [`timed`] with `HOTSPA_FAULT=fault` (and a 2 s communication timeout unless the fault is a
/// panic), which must fail within `limit`: its standard error.
fn fails_within(d: &Path, args: Vec<OsString>, fault: &str, limit: Duration) -> String {
    let mut env = vec![("HOTSPA_FAULT", fault)];
    if !fault.starts_with("panic") {
        env.push(("HOTSPA_COMM_TIMEOUT_SECS", "2"));
    }
    let (t, o) = timed(d, args, &env);
    let e = stderr(&o);
    assert!(!o.status.success() && t < limit, "{fault}: took {t:?}: {e}");
    e
}

#[test]
fn a_frozen_rank_ends_the_run_in_bounded_time() {
    let d = &common::Scratch::new(setup);
    // Rank 2 of 4 freezes at step 2: the others time out (2 s) and the process ends, named
    // at the timeout, ended a few seconds later (not at twice the timeout).
    let secs = Duration::from_secs;
    let line = "--devices 4 --strategy dp2tp2 --steps 5";
    let e = fails_within(d, common::cmd![line], "freeze:2:2", secs(12));
    assert!(e.contains("rank 2"), "{e}");
    // Down a pipeline the first to give up waits on a rank that itself waits: the frozen one
    // (the last stage) is the one named, in world ranks.
    let line = "--devices 4 --strategy pp2dp2 --steps 5";
    let e = fails_within(d, common::cmd![line], "freeze:3:2", secs(12));
    assert!(e.contains("Error: rank 3: made no progress"), "{e}");
    // Under the priority schedule the next step's forward waits for the frozen rank's share of
    // the update: the exchange's timeout names it, not the wait for the weights.
    let prio = "--devices 4 --strategy dp4 --steps 5 --grad-clip inf --comm-schedule priority";
    let e = fails_within(d, common::cmd![prio], "freeze:2:3", secs(12));
    assert!(e.contains("Error: rank 2: made no progress"), "{e}");
    // Alone (nobody to time out waiting for it): the watchdog names it after the timeout plus
    // a margin (2 + 10 s).
    let e = fails_within(d, common::cmd!["--steps 5"], "freeze:0:2", secs(30));
    assert!(
        e.contains("rank 0: made no progress for") && e.contains("step 2"),
        "{e}"
    );
    // A panicking rank ends it at once.
    let e = fails_within(
        d,
        common::cmd!["--devices 2 --steps 5"],
        "panic:1:2",
        secs(20),
    );
    assert!(e.contains("rank 1 panicked"), "{e}");
}

/// A rank that fails while a step's update (priority) or gradients (PipeDream-2BW) are still
/// pending: the step keeps its line with what was known (`null` for the rest), and the file is
/// still hotspa's own (`--force` replaces it).
#[test]
fn a_failure_keeps_the_pending_steps_line() {
    let d = &common::Scratch::new(setup);
    let metrics = d.join("m.jsonl");
    let m = metrics.to_str().unwrap();
    for (flags, unknown) in [
        (
            "--strategy dp2 --comm-schedule priority --grad-clip inf",
            "grad_norm",
        ),
        ("--strategy pp2 --pipeline-schedule pipedream-2bw", "loss"),
    ] {
        let line = common::cmd![flags, "--devices 2 --steps 5 --force --metrics", m];
        let e = fails_within(d, line, "panic:1:3", Duration::from_secs(60));
        assert!(e.contains("rank 1 panicked"), "{e}");
        // The log says what never came, not NaN.
        assert!(e.contains("— (not reached)"), "{e}");
        let lines = common::records(&metrics);
        assert_eq!(lines.len(), 2, "{flags}: {lines:?}");
        assert!(lines[1][unknown].is_null(), "{flags}: {}", lines[1]);
        assert!(lines[1]["tokens"].as_u64().unwrap() > 0);
        // `hotspa plot` draws what is known and says what it leaves out.
        let svg = d.join("m.svg");
        common::stderr_ok(&plot(&metrics, &svg, &["--force"]));
    }
}

#[cfg(unix)]
#[test]
fn a_signal_stops_after_the_step_and_keeps_the_work() {
    let d = &common::Scratch::new(setup);
    let ck = d.join("ck");
    let save = d.join("w.safetensors");
    let data = d.join("data.jsonl");
    let (mut child, lines) = started(
        train_cmd(d, &data).args(common::cmd![
            "--steps 100000 --devices 2 --checkpoint-dir",
            &ck,
            "--save",
            &save
        ]),
        "step     3/",
    );
    let t = Instant::now();
    assert!(common::signal(child.id(), libc::SIGINT));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(t.elapsed() < Duration::from_secs(20));
    let last = rest
        .iter()
        .find(|l| l.starts_with("stopped by a signal"))
        .unwrap();
    let latest = std::fs::read_to_string(ck.join("latest")).unwrap();
    assert!(last.contains(&latest), "{last} / {latest}");
    assert!(save.is_file(), "{rest:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    // A second signal ends the run at once, whatever it was doing (here: waiting for a rank
    // frozen at step 3, so the first cannot finish the step).
    let (mut child, mut lines) = started(
        stuck(train_cmd(d, &data).args(common::cmd!["--steps 100000 --devices 2"])),
        "step     2/",
    );
    let t = Instant::now();
    // (Two signals sent before the first is delivered are one: the second follows the first's
    // message.)
    let int = || assert!(common::signal(child.id(), libc::SIGINT));
    int();
    while let Some(Ok(l)) = lines.next() {
        if l.starts_with("SIGINT: stopping") {
            break;
        }
    }
    int();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        rest.iter()
            .any(|l| l.contains("SIGINT again: exiting at once")),
        "{rest:?}"
    );
}

/// `c` with rank 1 frozen at step 3 and the communication timeout far away (600 s).
fn stuck(c: &mut Command) -> &mut Command {
    c.env("HOTSPA_FAULT", "freeze:1:3")
        .env("HOTSPA_COMM_TIMEOUT_SECS", "600")
}

/// A signal while a rank is stuck (frozen at step 3, the communication timeout far away): the
/// run still ends within the stop's grace (three times the longest step and 10 s), says which
/// rank kept it from saving and what was saved before, and exits with 130.
#[cfg(unix)]
#[test]
fn a_signal_ends_a_run_whose_rank_is_stuck() {
    let d = &common::Scratch::new(setup);
    let line = common::cmd![
        "--steps 100000 --devices 2 --checkpoint-every 1 --checkpoint-dir",
        &d.join("ck")
    ];
    let (mut child, lines) = started(
        stuck(train_cmd(d, &d.join("data.jsonl")).args(line)),
        "step     2/",
    );
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert!(common::signal(child.id(), libc::SIGTERM));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "{:?}: {rest:?}",
        t.elapsed()
    );
    let said = rest.join("\n");
    assert!(
        said.contains("stopped by a signal, but rank 1 has made no progress")
            && said.contains("nothing was saved after the last checkpoint")
            && said.contains("step-00000002"),
        "{said}"
    );
}

#[test]
fn resources_are_checked_before_allocating() {
    let d = &common::Scratch::new(setup);
    let big = d.join("7b");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(
        big.join("config.json"),
        r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32}"#,
    )
    .unwrap();
    let o = train_cmd(&big, &d.join("data.jsonl")).output().unwrap();
    refused(&o, "is available by the machine's available memory");
    refused(&train(d, &["--devices", "1000"]), "1000 thread ranks");
    refused(
        &train(d, &["--global-batch", "1000000000"]),
        "is available by",
    );
    // A 134 M model (2.5 GiB of weights, gradients and moments) under `ulimit -v 2 GB`: refused
    // naming the limit, not aborted by the allocator.
    let mid = d.join("134m");
    std::fs::create_dir_all(&mid).unwrap();
    std::fs::write(
        mid.join("config.json"),
        r#"{"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512}"#,
    )
    .unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v 2000000 && exec {} train --model {} --data {}",
            env!("CARGO_BIN_EXE_hotspa"),
            mid.display(),
            d.join("data.jsonl").display()
        ))
        .output()
        .unwrap();
    refused(&o, "is available by RLIMIT_AS (ulimit -v)");
}

/// The same model inside a memory cgroup (v1 or v2) limited to 1.5 GB: refused naming the
/// cgroup's limit. Needs a writable cgroup hierarchy (root on a machine that has one); says so
/// and skips otherwise.
#[test]
fn a_memory_cgroups_limit_is_honoured() {
    let d = &common::Scratch::new(setup);
    std::fs::write(
        d.join("134m.json"),
        r#"{"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512}"#,
    )
    .unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let candidates = [
        own.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| (format!("/sys/fs/cgroup{p}"), "memory.max")),
        own.lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .map(|p| (format!("/sys/fs/cgroup/memory{p}"), "memory.limit_in_bytes")),
    ];
    let name = format!("hotspa-test-{}", std::process::id());
    let made = candidates.into_iter().flatten().find_map(|(parent, file)| {
        let cg = Path::new(&parent).join(&name);
        std::fs::create_dir(&cg).ok()?;
        // A real cgroup comes with its control files (not a plain directory on a tmpfs).
        if !cg.join(file).exists() || std::fs::write(cg.join(file), "1500000000").is_err() {
            let _ = std::fs::remove_dir(&cg);
            return None;
        }
        Some(cg)
    });
    let Some(cg) = made else {
        eprintln!("skipped: no writable memory cgroup here (needs root and a cgroup hierarchy)");
        return;
    };
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} train --model {} --data {}",
            cg.display(),
            env!("CARGO_BIN_EXE_hotspa"),
            d.join("134m.json").display(),
            d.join("data.jsonl").display()
        ))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&cg);
    refused(&o, "is available by the memory cgroup's limit");
}

/// A disk too small for the final weights or a checkpoint: refused before the first step with
/// the figures. Needs to mount a 1 MiB tmpfs (root); says so and skips otherwise.
#[test]
fn a_disk_too_small_for_the_outputs_is_refused_up_front() {
    let d = &common::Scratch::new(setup);
    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    // 0.5 M parameters: 2 MiB of f32 weights.
    std::fs::write(
        d.join("half-m.json"),
        r#"{"vocab_size": 40, "hidden_size": 128, "intermediate_size": 344,
            "num_hidden_layers": 4, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let run = |extra: Vec<OsString>| {
        train_cmd(&d.join("half-m.json"), &d.join("data.jsonl"))
            .args(["--steps", "1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(common::cmd!["--save", &small.join("w.safetensors")]);
    let o2 = run(common::cmd!["--checkpoint-dir", &small.join("ck")]);
    let _ = Command::new("umount").arg(&small).status();
    refused(&o, "save: the disk holding it has 1.00 MiB free");
    refused(&o2, "checkpoint_dir: the disk holding it has");
}

/// Each line of `table` (`FLAGS => MESSAGE`): `train` with those flags is [`refused`] with
/// that message.
fn refused_each(d: &Path, table: &str) {
    for (flags, needle) in common::cases(table) {
        refused(&train(d, &flags), needle);
    }
}

#[test]
fn numbers_are_refused_by_range() {
    let d = &common::Scratch::new(setup);
    refused_each(
        d,
        "
        --grad-clip=-1 => grad_clip: -1 is out of range: must be positive
        --grad-clip 0 => grad_clip: 0 is out of range
        --lr=-3e-3 => lr: -0.003 is out of range: must be positive and finite
        --lr -1 => lr: -1 is out of range
        --lr nan => lr: NaN is out of range
        --beta1 2 => beta1: 2 is out of range: must be in [0, 1)
        --eps 0 => eps: 0 is out of range
        --max-len 0 => max_len: 0 is out of range: must be at least 2
        --devices 0 => --devices 0 is out of range
        --micro-batch-tokens 0 => micro_batch_tokens: 0 is out of range
        --lr-schedule cosine --min-lr 1 => min_lr: 1 is out of range
        ",
    );
}

/// Settings that parse and are in range but cannot train, or change nothing, each refused by
/// name before the first step.
#[test]
fn settings_that_cannot_train_are_refused() {
    let d = &common::Scratch::new(setup);
    // (`--lr -1e-3`: a negative number after a space is a number.)
    refused_each(
        d,
        "
        --weight-decay 1e9 => weight_decay: 1000000000 × --lr 0.0003 = 300000 ≥ 1
        --lr 1e30 => is out of range: AdamW moves every weight
        --lr 2 => lr: 2 is out of range
        --lr -1e-3 => lr: -0.001 is out of range
        --weight-decay -1e-2 => weight_decay: -0.01 is out of range
        --min-lr -1 => --min-lr applies only with --lr-schedule cosine
        --lr-schedule cosine --min-lr -1 => min_lr: -1 is out of range
        --warmup 1000 --steps 2 => warmup: 1000 steps of warm-up in a run of 2
        --devices 2 --sync fedavg --fed-clients 0 => --fed-clients 0 is out of range
        --devices 2 --sync fedavg --fed-batch 0 => fed_batch: 0 is out of range
        --devices 2 --ps-servers 1 --slow-rank 1:2 --slow-rank 1:3 => slow_rank: rank 1 is given twice
        --keep-last 2 => --keep-last applies only with --checkpoint-dir
        --save-dtype bf16 => --save-dtype applies only with --save
        --gemm-precision f32 => --gemm-precision applies only with --device cuda
        --devices 2 --pipeline-schedule gpipe => --pipeline-schedule gpipe applies only to strategies with pipeline stages
        --devices 2 --strategies dp2:0,tp2:max => `dp2:0`: a bucket of sequences up to 0 tokens stays empty
        ",
    );
    // The flag a refusal names works where it applies.
    let o = train(
        d,
        &[
            "--devices",
            "2",
            "--strategy",
            "pp2",
            "--pipeline-schedule",
            "gpipe",
            "--steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A model config that cannot be: no positions, an end-of-sequence id outside the vocabulary.
    for (field, needle) in [
        (
            r#""max_position_embeddings": 0"#,
            "max_position_embeddings must be positive",
        ),
        (
            r#""eos_token_id": 999"#,
            "eos_token_id 999 is outside the vocabulary (vocab_size 40)",
        ),
        (
            r#""bos_token_id": 40"#,
            "bos_token_id 40 is outside the vocabulary",
        ),
    ] {
        let bad = CONFIG.replacen('{', &format!("{{{field}, "), 1);
        std::fs::write(d.join("bad.json"), bad).unwrap();
        let o = train_cmd(&d.join("bad.json"), &d.join("data.jsonl"))
            .output()
            .unwrap();
        refused(&o, needle);
    }
}

#[test]
fn cluster_files_and_timeouts_are_refused_by_name() {
    let d = &common::Scratch::new(setup);
    // A cluster file with a negative bandwidth is refused by name.
    let bad = toml_cluster().replace("gbps = 400.0", "gbps = -400.0");
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let o = hotspa()
        .args(["simulate", "--cluster"])
        .arg(d.join("bad.toml"))
        .args(["--gpus", "8", "--model", "llama2-7b"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("same_node.gbps = -400 is out of range"),
        "{e}"
    );
    // The communication timeout is checked, not quietly replaced by the default.
    for bad in ["0", "-1", "abc", "inf"] {
        let (_, o) = timed(
            d,
            common::cmd!["--steps 1"],
            &[("HOTSPA_COMM_TIMEOUT_SECS", bad)],
        );
        refused(
            &o,
            &format!("HOTSPA_COMM_TIMEOUT_SECS `{bad}`: give a positive"),
        );
    }
    let (_, o) = timed(
        d,
        common::cmd!["--steps 1"],
        &[("HOTSPA_COMM_TIMEOUT_SECS", "0.5")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

fn toml_cluster() -> String {
    "name = \"x\"\nnodes = 1\ndevices_per_node = 8\npeak_tflops = 312.0\nmemory_gib = 80.0\n\
     [efficiency]\nmax = 0.6\nhalf_tokens = 256.0\nhalf_width = 256.0\nattention = 0.45\n\
     [same_node]\ngbps = 400.0\nlatency_us = 5.0\n[cross_node]\ngbps = 200.0\nlatency_us = 10.0\n"
        .into()
}

#[test]
fn inputs_that_mean_something_else_are_refused() {
    let d = &common::Scratch::new(setup);
    for (field, needle) in [
        (
            r#""architectures": ["MistralForCausalLM"]"#,
            "architectures [\"MistralForCausalLM\"]: not a LLaMA-family model",
        ),
        (
            r#""model_type": "gpt2""#,
            "model_type \"gpt2\": not a LLaMA-family model",
        ),
        (r#""sliding_window": 4096"#, "field(s) sliding_window"),
        (
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
            "rope_type \"yarn\"",
        ),
        (r#""attention_dropout": 0.1"#, "attention_dropout 0.1"),
    ] {
        let other = d.join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(
            other.join("config.json"),
            CONFIG.replace("\"vocab_size\"", &format!("{field}, \"vocab_size\"")),
        )
        .unwrap();
        refused(
            &train_cmd(&other, &d.join("data.jsonl")).output().unwrap(),
            needle,
        );
    }
    // A GPT-2 config (none of LLaMA's fields) is named as another model first, not as fields
    // missing.
    let gpt2 = d.join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768,
            "n_layer": 12, "n_head": 12, "vocab_size": 50257}"#,
    )
    .unwrap();
    let o = train_cmd(&gpt2, &d.join("data.jsonl")).output().unwrap();
    refused(&o, "model_type \"gpt2\": not a LLaMA-family model");
}

/// What a file is, named by what it is: one text file as `--data` trains as text (JSON Lines
/// is still told by its content), a Megatron half without the other is named, a broken
/// checkpoint `state.json` is a JSON fault.
#[test]
fn inputs_are_read_as_what_they_are() {
    let d = &common::Scratch::new(setup);
    std::fs::write(
        d.join("notes.txt"),
        "a plain text file, trained on as one document ".repeat(20),
    )
    .unwrap();
    std::fs::write(d.join("bytes.json"), CONFIG.replace("40", "256")).unwrap();
    let o = train_cmd(&d.join("bytes.json"), &d.join("notes.txt"))
        .args(["--steps", "1", "--max-len", "64"])
        .output()
        .unwrap();
    let e = common::stderr_ok(&o);
    assert!(e.contains("15 sequences"), "{e}");
    // JSON Lines under another name is still JSON Lines.
    std::fs::copy(d.join("data.jsonl"), d.join("data.txt")).unwrap();
    let o = train(d, &["--steps", "1"]);
    let by_name = stderr(&o);
    let o = train_cmd(d, &d.join("data.txt"))
        .args(common::cmd![
            "--global-batch 8 --micro-batch-tokens 32 --steps 1"
        ])
        .output()
        .unwrap();
    common::stderr_ok(&o);
    let line = |e: &str| {
        e.lines()
            .find(|l| l.starts_with("step     1/"))
            .map(|l| l[..30].to_string())
    };
    assert_eq!(line(&stderr(&o)), line(&by_name));
    // Half a Megatron dataset.
    std::fs::write(d.join("corpus.idx"), b"MMIDIDX\x00\x00").unwrap();
    let o = train_cmd(d, &d.join("corpus.idx")).output().unwrap();
    refused(&o, "its other half");
    assert!(
        stderr(&o).contains("corpus.bin, is missing"),
        "{}",
        stderr(&o)
    );
    // A checkpoint whose state.json is broken JSON: a JSON fault, not a safetensors one.
    let ck = d.join("ck");
    assert!(train(
        d,
        &["--steps", "1", "--checkpoint-dir", ck.to_str().unwrap()]
    )
    .status
    .success());
    std::fs::write(ck.join("step-00000001/state.json"), "{\"step\": 1, \"sha").unwrap();
    let o = train(d, &["--steps", "2", "--resume", ck.to_str().unwrap()]);
    refused(&o, "malformed");
    assert!(
        stderr(&o).contains("state.json: malformed") && !stderr(&o).contains("safetensors"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_metrics_file_cut_short_plots_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = d.join("m.jsonl");
    std::fs::write(
        &m,
        "{\"step\": 1, \"loss\": 5.0, \"tokens\": 10, \"seconds\": 1.0}\n\
         {\"step\": 2, \"loss\": 4.0, \"tokens\": 10, \"seconds\": 1.0}\n{\"step\": 3, \"lo",
    )
    .unwrap();
    let e = common::stderr_ok(&plot(&m, &d.join("p.svg"), &[]));
    assert!(e.contains("the last line is cut short"), "{e}");
    // Garbage in the middle is an error naming the line.
    std::fs::write(&m, "{\"step\": 1, \"loss\": 5.0, \"tokens_per_s\": 1}\nxx\n{\"step\": 2, \"loss\": 5.0, \"tokens_per_s\": 1}\n").unwrap();
    let o = plot(&m, &d.join("p.svg"), &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("m.jsonl:2: not a metrics line"),
        "{}",
        stderr(&o)
    );
}

/// Data that trains past what the model was made for is said before the first step: sequences
/// beyond `max_position_embeddings` (a larger `--max-len`), a global batch larger than the
/// dataset (steps repeat sequences); neither is said when it does not happen.
#[test]
fn positions_past_the_config_and_a_batch_larger_than_the_data_are_said() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let config = CONFIG.replace(
        "\"vocab_size\"",
        "\"max_position_embeddings\": 16, \"vocab_size\"",
    );
    std::fs::write(d.path().join("config.json"), config).unwrap();
    let plain = train(d.path(), &["--steps", "1"]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert!(!stderr(&plain).contains("max_position_embeddings"));
    assert!(!stderr(&plain).contains("larger than the dataset"));
    // The longest record has 30 tokens; max_position_embeddings is 16.
    let long = train(d.path(), &["--steps", "1", "--max-len", "64"]);
    assert!(long.status.success(), "{}", stderr(&long));
    assert!(
        stderr(&long).contains(
            "--max-len 64: sequences of up to 30 tokens train at positions past the model's \
             max_position_embeddings (16)"
        ),
        "{}",
        stderr(&long)
    );
    let big = train(d.path(), &["--steps", "1", "--global-batch", "100"]);
    assert!(big.status.success(), "{}", stderr(&big));
    assert!(
        stderr(&big).contains("the global batch (100) is larger than the dataset (28 sequences)")
    );
}
