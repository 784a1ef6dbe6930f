//! `hotspa` under `mpirun` (Open MPI): the communicator suite on MpiComm, 4-process training
//! bitwise equal to 4 thread ranks, and faults (a killed or a stopped process). Needs a build
//! with `--features mpi` and `mpirun` on the PATH (`.ci/run` installs Debian's OpenMPI):
//! `cargo nextest run -p hotspa --features mpi --test mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

fn hotspa() -> &'static str {
    env!("CARGO_BIN_EXE_hotspa")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .current_dir(root());
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `hotspa ARGS` on `devices` thread ranks in the repository's root, which must succeed: its
/// output.
fn on_threads<S: AsRef<std::ffi::OsStr>>(devices: usize, args: &[S]) -> String {
    let o = Command::new(hotspa())
        .args(args)
        .args(["--devices", &devices.to_string()])
        .current_dir(root())
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    out
}

/// `hotspa ARGS` on `np` processes under mpirun, which must succeed: its output.
fn on_mpi<S: AsRef<std::ffi::OsStr>>(np: usize, args: &[S]) -> String {
    let o = mpirun(np).arg(hotspa()).args(args).output().unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    out
}

/// Whether the files `a` and `b` in `dir` hold the same bytes.
fn same_bytes(dir: &Path, a: &str, b: &str) -> bool {
    std::fs::read(dir.join(a)).unwrap() == std::fs::read(dir.join(b)).unwrap()
}

/// The training flags shared by the thread and the MPI runs.
fn train_args<S: AsRef<str>>(dir: &Path, name: &str, extra: &[S]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        "examples/tiny-llama",
        "--data",
        "crates/kernels/src",
        "--global-batch",
        "8",
        "--max-len",
        "256",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.as_ref().to_string()));
    v.push("--save".into());
    v.push(dir.join(name).display().to_string());
    v
}

#[test]
fn conformance_on_1_to_4_processes() {
    for np in 1..=4 {
        let o = mpirun(np)
            .args([hotspa(), "conformance", "--backend", "mpi"])
            .output()
            .expect("mpirun (install OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
        let out = text(&o);
        assert!(o.status.success(), "{np} processes:\n{out}");
        let passed = format!(
            "{} communicator checks passed",
            comm::conformance::CHECKS.len()
        );
        assert_eq!(out.matches(&passed).count(), np, "{out}");
    }
}

#[test]
fn four_processes_train_bitwise_like_four_threads() {
    let dir = tempfile::tempdir().unwrap();
    for (k, schedule) in [
        vec!["--strategy", "dp2tp2", "--steps", "3"],
        "--strategies dp4:64,dp2tp2zero2:128,tp2pp2:max --steps 4"
            .split(' ')
            .collect(),
        // The gradient exchange: codecs with their residuals, the other algorithms.
        "--strategy dp4 --steps 3 --grad-compression int8 --allreduce rhd"
            .split(' ')
            .collect(),
        "--strategies dp4:64,dp2tp2:max --steps 3 --grad-compression powersgd:2 --allreduce tree"
            .split(' ')
            .collect(),
        "--strategy dp4zero2 --steps 3 --grad-compression topk:0.1"
            .split(' ')
            .collect(),
        // Ok-Topk's all-to-alls of uneven counts (top-k's and DGC's selections); 1-bit Adam's
        // momentum after its warm-up.
        "--strategy dp4 --steps 3 --grad-compression oktopk:0.1"
            .split(' ')
            .collect(),
        "--strategy dp4 --steps 3 --grad-compression okdgc:0.1"
            .split(' ')
            .collect(),
        // Priority scheduling: the update summed during the next step, on a thread of its own.
        "--strategy dp4 --steps 3 --comm-schedule priority --grad-clip inf"
            .split(' ')
            .collect(),
        "--strategy dp4 --steps 4 --optimizer onebit-adam --onebit-warmup 2"
            .split(' ')
            .collect(),
        // PipeDream-2BW: micro-batches in flight from one step into the next.
        "--strategy tp2pp2 --steps 3 --pipeline-schedule pipedream-2bw"
            .split(' ')
            .collect(),
        // Context parallelism: the ring's blocks and Ulysses' all-to-alls between processes.
        vec!["--strategy", "dp2cp2", "--steps", "3"],
        vec!["--strategies", "dp4:64,cp2tp2ulysses:max", "--steps", "3"],
        // Concurrent groups, one of them switching, one with context parallelism.
        vec!["--strategies", "dp2:64 | tp2:max", "--steps", "3"],
        vec!["--strategies", "dp2:64,tp2:128 | cp2:max", "--steps", "3"],
        // Periodic averaging: DiLoCo's replicas across TP groups.
        vec!["--strategy", "dp2tp2", "--steps", "5", "--sync", "diloco:2"],
        // Federated averaging: sampled clients with sub-models, their average an all-reduce.
        "--strategy dp4 --steps 2 --sync fedavg --fed-clients 6 --fed-fraction 0.5 --fed-dropout 0.25 --fed-local-steps 2"
            .split(' ')
            .collect(),
    ]
    .iter()
    .enumerate()
    {
        // The second also runs on the simulator's clock (an A800 cluster).
        let timed = |name: &str| -> Vec<String> {
            let mut v = schedule.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            if k == 1 {
                let m = dir
                    .path()
                    .join(format!("{name}.jsonl"))
                    .display()
                    .to_string();
                v.extend([
                    "--sim-cluster".into(),
                    "a800x32".into(),
                    "--metrics".into(),
                    m,
                ]);
            }
            v
        };
        let (threads, mpi) = (
            format!("threads{k}.safetensors"),
            format!("mpi{k}.safetensors"),
        );
        on_threads(4, &train_args(dir.path(), &threads, &timed("threads")));
        let out = on_mpi(4, &train_args(dir.path(), &mpi, &timed("mpi")));
        assert!(out.contains("one MPI process each"), "{out}");
        assert!(
            same_bytes(dir.path(), &threads, &mpi),
            "{schedule:?}: MPI weights differ from the thread run"
        );
        if k == 1 {
            // The clock's time matches too, but for where the overlapped gradient reduction's
            // side timeline starts (when its thread picks the bucket up).
            let sim = |name: &str| -> Vec<f64> {
                common::records(&dir.path().join(format!("{name}.jsonl")))
                    .iter()
                    .map(|v| v["simulated_seconds"].as_f64().unwrap())
                    .collect()
            };
            let (t, m) = (sim("threads"), sim("mpi"));
            assert_eq!(t.len(), 4);
            for (x, y) in t.iter().zip(&m) {
                assert!(
                    *x > 0.0 && (x - y).abs() <= 0.05 * x,
                    "threads {t:?} vs MPI {m:?}"
                );
            }
        }
    }
}

/// `--strategies auto --plan-concurrent` under mpirun: where the planner's cluster makes
/// attention slow (a file of the kind `hotspa profile` writes) and the documents are short but
/// for a few, it runs steps as concurrent groups of processes, bitwise as on threads.
#[test]
fn planned_concurrent_groups_run_as_processes_like_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
 "hidden_size": 16, "intermediate_size": 22, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "tie_word_embeddings": false, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("slow.toml"),
        common::small_profile("slow-attention", 0.001, 0.0005),
    )
    .unwrap();
    let lens = [3usize, 9, 2, 5, 14, 3, 9, 2, 30, 5, 14, 3, 9, 2, 5, 3];
    let docs: String = (0..24)
        .map(|i| {
            let n = lens[i % lens.len()].saturating_sub(1).max(1);
            let t: String = (0..n)
                .map(|j| char::from(b'a' + ((i * 7 + j * j + 3 * j) % 26) as u8))
                .collect();
            format!("{{\"text\": \"{t}\"}}\n")
        })
        .collect();
    std::fs::write(d.join("docs.jsonl"), docs).unwrap();
    let args = |name: &str| -> Vec<String> {
        let p = |f: &str| d.join(f).display().to_string();
        [
            "train",
            "--model",
            &p("config.json"),
            "--data",
            &p("docs.jsonl"),
            "--global-batch",
            "8",
            "--micro-batch-tokens",
            "64",
            "--shuffle",
            "off",
            "--steps",
            "3",
            "--strategies",
            "auto",
            "--plan-concurrent",
            "--profile",
            &p("slow.toml"),
            "--save",
            &p(&format!("{name}.safetensors")),
            "--metrics",
            &p(&format!("{name}.jsonl")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    on_threads(4, &args("threads"));
    let out = on_mpi(4, &args("mpi"));
    assert!(out.contains("one MPI process each"), "{out}");
    let plans = |name: &str| -> Vec<String> {
        common::records(&d.join(format!("{name}.jsonl")))
            .iter()
            .map(|v| v["plan"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let (t, m) = (plans("threads"), plans("mpi"));
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.iter().all(|p| p.contains(" | ")), "{t:?}");
    assert_eq!(t, m);
    assert!(
        same_bytes(d, "threads.safetensors", "mpi.safetensors"),
        "MPI weights differ from the thread run"
    );
}

/// The parameter server's ranks are processes too: BSP on 2 servers and 3 workers is bitwise
/// the thread run (servers add the pushes in worker order), and ASP, whose servers take
/// pushes from whichever worker comes first (`recv_any` over MPI), trains every step.
#[test]
fn the_parameter_server_runs_as_processes() {
    let dir = tempfile::tempdir().unwrap();
    let ps = ["--strategy", "dp3", "--steps", "3", "--ps-servers", "2"];
    on_threads(3, &train_args(dir.path(), "threads.safetensors", &ps));
    let out = on_mpi(5, &train_args(dir.path(), "mpi.safetensors", &ps));
    assert!(out.contains("2 parameter server(s)"), "{out}");
    assert!(
        same_bytes(dir.path(), "threads.safetensors", "mpi.safetensors"),
        "BSP on the parameter server: MPI weights differ from threads"
    );
    let metrics = dir.path().join("asp.jsonl");
    let m = metrics.display().to_string();
    let asp = "--strategy dp3 --steps 4 --sync asp --ps-servers 2 --metrics";
    let asp: Vec<&str> = asp.split(' ').chain([m.as_str()]).collect();
    on_mpi(5, &train_args(dir.path(), "asp.safetensors", &asp));
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    assert!(
        lines.lines().all(|l| l.contains("\"ps_updates\":3")),
        "{lines}"
    );
}

#[test]
fn a_conflicting_device_count_is_an_error() {
    let o = mpirun(2)
        .args([
            hotspa(),
            "train",
            "--model",
            "examples/tiny-llama",
            "--data",
            "crates/kernels/src",
            "--devices",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--devices 3 conflicts with the MPI world of 2 processes"),
        "{}",
        text(&o)
    );
}

/// The pid of MPI world rank `rank` among processes whose command line contains `marker`.
fn pid_of_rank(marker: &str, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(marker) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts `hotspa train` (the shared flags, `strategy`, 100,000 steps and `flag path`) on `np`
/// processes, `mpirun_args` given to mpirun, and waits until `ready` holds and rank `rank` is
/// running (found by `path` in its command line; at most 120 s): the job and that rank's pid.
fn start_long_run(
    mpirun: &mut Command,
    dir: &Path,
    strategy: &str,
    (flag, path): (&str, &Path),
    rank: usize,
    ready: impl Fn() -> bool,
) -> (std::process::Child, u32) {
    let mut args = train_args(dir, "never.safetensors", &["--strategy", strategy]);
    args.extend(["--steps", "100000", flag].map(String::from));
    args.push(path.display().to_string());
    let mut child = mpirun
        .arg(hotspa())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = path.display().to_string();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if ready() {
            if let Some(pid) = pid_of_rank(&marker, rank) {
                return (child, pid);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!("the run did not get going:\n{}", text(&out));
}

/// Starts a long 4-process run, sends `signal` to rank 2 once training is under way, and
/// checks that the job failed within 60 s of it: its output.
fn fault(signal: i32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let steps = || {
        std::fs::read_to_string(&metrics)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let (child, pid) = start_long_run(
        mpirun(4).env("HOTSPA_COMM_TIMEOUT_SECS", "5"),
        dir.path(),
        "dp2tp2",
        ("--metrics", &metrics),
        2,
        || steps() >= 2,
    );
    assert!(common::signal(pid, signal));
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    // A stopped process is killed by mpirun's abort; make sure nothing is left either way.
    let _ = common::signal(pid, libc::SIGKILL);
    let text = text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{text}");
    text
}

#[test]
fn a_killed_process_ends_the_job_naming_its_rank() {
    let text = fault(libc::SIGKILL);
    assert!(
        text.contains("process rank 2") || text.contains("rank 2 never arrived"),
        "{text}"
    );
}

#[test]
fn a_stopped_process_is_named_by_the_others_within_the_timeout() {
    let text = fault(libc::SIGSTOP);
    assert!(
        text.contains("the process of rank 2 does not answer at all"),
        "{text}"
    );
}

#[test]
fn checkpoints_move_between_mpi_and_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hot = ["--strategies", "dp4:64,dp2tp2:max"];
    let threads = |extra: &[&str], save: &str| {
        on_threads(4, &train_args(d, save, &[&hot[..], extra].concat()));
    };
    let mpi = |extra: &[&str], save: &str| {
        on_mpi(4, &train_args(d, save, &[&hot[..], extra].concat()));
    };
    let (ck1, ck2) = (
        d.join("ck1").display().to_string(),
        d.join("ck2").display().to_string(),
    );
    threads(&["--steps", "4"], "full.safetensors");
    mpi(
        &["--steps", "2", "--checkpoint-dir", &ck1],
        "half1.safetensors",
    );
    threads(&["--steps", "4", "--resume", &ck1], "a.safetensors");
    threads(
        &["--steps", "2", "--checkpoint-dir", &ck2],
        "half2.safetensors",
    );
    mpi(&["--steps", "4", "--resume", &ck2], "b.safetensors");
    for name in ["a.safetensors", "b.safetensors"] {
        assert!(
            same_bytes(d, name, "full.safetensors"),
            "{name}: resumed across backends differs from the uninterrupted run"
        );
    }
}

/// A check that fails on rank 0 only (an output only rank 0 writes) stops every rank at once
/// with rank 0's reason — not after the communication timeout, blaming rank 0.
#[test]
fn a_check_failing_on_one_rank_stops_every_rank_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_file = dir.path().join("a-folder");
    std::fs::create_dir_all(&not_a_file).unwrap();
    let mut args = train_args(dir.path(), "w.safetensors", &["--steps", "2"]);
    args.extend(["--metrics".into(), not_a_file.display().to_string()]);
    let t = Instant::now();
    let o = mpirun(4).arg(hotspa()).args(&args).output().unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{:?}: {out}",
        t.elapsed()
    );
    assert!(out.contains("is a directory; give a file name"), "{out}");
    assert!(
        out.contains("rank 0: stopped every MPI rank before the first step"),
        "{out}"
    );
    assert!(!out.contains("dead or stopped"), "{out}");
}

/// Ranks launched with different settings (here one rank's --lr, through a wrapper) stop
/// before the first step naming the setting and the ranks, instead of training an
/// inconsistent model.
#[test]
fn ranks_with_different_settings_stop_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let args = train_args(dir.path(), "w.safetensors", &["--steps", "2"]);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec {h} {a} --lr 1e-3; else exec {h} {a}; fi",
        h = hotspa(),
        a = quoted.join(" ")
    );
    let o = mpirun(2).args(["sh", "-c", &script]).output().unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("launched with different settings")
            && out.contains("lr: 0.0003 on rank(s) [0], 0.001 on rank(s) [1]"),
        "{out}"
    );
    assert!(!dir.path().join("w.safetensors").exists());
}

/// SIGTERM to mpirun reaches the ranks as SIGTERM and, 1 s later by default, SIGKILL: a run
/// that needs longer to save says so when it starts; launched with a longer window, the signal
/// leaves a checkpoint and the run says where.
#[test]
fn a_signal_through_mpirun_leaves_a_checkpoint_within_the_kill_window() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let start = Instant::now();
    let (child, _) = start_long_run(
        mpirun(2).args(["--mca", "odls_base_sigkill_timeout", "10"]),
        dir.path(),
        "dp2",
        ("--checkpoint-dir", &ck),
        1,
        || start.elapsed() >= Duration::from_secs(3),
    );
    let pid = child.id();
    assert!(common::signal(pid, libc::SIGTERM));
    let o = child.wait_with_output().unwrap();
    let out = text(&o);
    assert!(ck.join("latest").is_file(), "no checkpoint:\n{out}");
    assert!(out.contains("stopped by a signal after step"), "{out}");
    assert!(out.contains("checkpoint written to"), "{out}");
    // The default window (1 s) is said to be too short for a checkpoint of a bigger model.
    let big = dir.path().join("big.json");
    std::fs::write(
        &big,
        r#"{"vocab_size": 256, "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": 8, "num_attention_heads": 8}"#,
    )
    .unwrap();
    let mut child = mpirun(2)
        .arg(hotspa())
        .args([
            "train",
            "--model",
            big.to_str().unwrap(),
            "--data",
            "crates/kernels/src",
            "--steps",
            "1",
            "--global-batch",
            "2",
            "--max-len",
            "32",
            "--checkpoint-dir",
            dir.path().join("ck2").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Said before the first step; the run is not needed past it.
    use std::io::BufRead;
    let said = std::io::BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("odls_base_sigkill_timeout"));
    let _ = common::signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let said = said.unwrap_or_default();
    assert!(
        said.contains("a signal leaves the ranks 1 s before Open MPI kills them"),
        "{said}"
    );
}
