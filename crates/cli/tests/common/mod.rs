//! What several integration tests share: a small model's config and learnable data.

#![allow(dead_code)] // each test file uses its part

use std::path::Path;
use std::process::{Command, Output};

/// Runs `hotspa ARGS` in `dir` (backtraces off, so errors read as a user sees them).
pub fn hotspa<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// `hotspa ARGS` in the current folder (backtraces off).
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run hotspa")
}

/// `hotspa ARGS`, which must succeed: its standard output read as one JSON value.
pub fn json_out<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value on stdout")
}

/// The records of a metrics file: one JSON object per step.
pub fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The loss of every step in a metrics file.
pub fn losses(path: &Path) -> Vec<f64> {
    records(path)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

/// A cluster file of the kind `hotspa profile` writes: one node of 4 slow devices (0.05
/// TFLOP/s, 10 GB/s memory, 5 GB/s links) holding `memory_gib` each, attention at `attention`
/// of the GEMMs' efficiency.
pub fn small_profile(name: &str, memory_gib: f64, attention: f64) -> String {
    format!(
        "name = \"{name}\"\nnodes = 1\ndevices_per_node = 4\npeak_tflops = 0.05\n\
         memory_gib = {memory_gib}\nelem_bytes = 4\nmemory_gbps = 10.0\n[efficiency]\nmax = 1.0\n\
         half_tokens = 32\nhalf_width = 32\nattention = {attention}\n[same_node]\ngbps = 5.0\n\
         latency_us = 20.0\n[cross_node]\ngbps = 5.0\nlatency_us = 20.0\n"
    )
}

/// A 2-layer LLaMA of width 32 over 64 token ids (GQA, untied embeddings).
pub const SMALL_CONFIG: &str = r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}"#;

/// Writes `SMALL_CONFIG` and `docs` documents as `data.jsonl` into `dir`: document `i` has
/// `len(i)` tokens of the affine recurrence `x ← (m·x + 7) mod 64` with `m` one of 1, 3, 5, so
/// the next token is learnable from the current one and the multiplier.
pub fn affine_docs(
    dir: &Path,
    docs: usize,
    len: impl Fn(usize) -> usize,
    m_of: impl Fn(usize) -> usize,
) {
    std::fs::write(dir.join("config.json"), SMALL_CONFIG).unwrap();
    let mut lines = String::new();
    for i in 0..docs {
        let m = [1, 3, 5][m_of(i) % 3];
        let mut x = (i * 37 + 11) % 64;
        let mut ids = vec![x.to_string()];
        for _ in 1..len(i) {
            x = (x * m + 7) % 64;
            ids.push(x.to_string());
        }
        lines += &format!("{{\"input_ids\": [{}]}}\n", ids.join(", "));
    }
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
}

/// Sends `signal` (e.g. `libc::SIGINT`) to process `pid`, as `kill` would (without needing the
/// `kill` program, which a minimal system lacks); whether it was delivered.
pub fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// Writes `config` as `config.json` and `docs` documents as `data.jsonl` into `dir`: document
/// `i` has `lens[i % lens.len()]` tokens, token `j` being `(7i + j² + 3j) mod vocab` (mixed, not
/// learnable: for tests of what runs rather than of what is learnt).
pub fn mixed_docs(dir: &Path, config: &str, docs: u32, lens: &[u32], vocab: u32) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut lines = String::new();
    for i in 0..docs {
        let n = lens[i as usize % lens.len()];
        let ids: Vec<String> = (0..n)
            .map(|j| ((i * 7 + j * j + 3 * j) % vocab).to_string())
            .collect();
        lines += &format!("{{\"input_ids\": [{}]}}\n", ids.join(", "));
    }
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
}

/// Random weights (seed 3) for the config in `dir`, as `init.safetensors` (`--init`).
pub fn init_weights(dir: &Path) {
    let cfg = model::LlamaConfig::load(dir).unwrap();
    model::Weights::random(&cfg, 3)
        .save(&dir.join("init.safetensors"))
        .unwrap();
}

/// A scratch folder prepared by `setup`, removed when dropped.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    /// A new folder, `setup` run on it.
    pub fn new(setup: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        Scratch(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A scratch folder reads as its path (`let d = &Scratch::new(setup); d.join("x")`).
impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

/// `train --model . --data data.jsonl` (run in the folder `mixed_docs` or `affine_docs` wrote)
/// followed by `extra`.
pub fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--model", ".", "--data", "data.jsonl"];
    args.extend_from_slice(extra);
    args
}

/// The words of `line`, split at white space (`train_args(&words("--steps 4 --sync asp"))`).
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// The cases of a table written one per line as `FLAGS => MESSAGE` (blank lines skipped; the
/// message may be empty): the flags split at white space, and the message.
pub fn cases(table: &str) -> Vec<(Vec<&str>, &str)> {
    table
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (flags, says) = l.split_once("=>").expect("FLAGS => MESSAGE");
            (words(flags), says.trim())
        })
        .collect()
}

/// The standard error of a run that must have succeeded (it is the message otherwise).
pub fn stderr_ok(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{e}");
    e
}

/// `train --model DIR --data DIR/data.jsonl` (the folder `mixed_docs` or `affine_docs` wrote)
/// as command-line words, for [`cmd!`] lists to extend.
pub fn train_on(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut words = Vec::new();
    "train --model".put(&mut words);
    dir.put(&mut words);
    "--data".put(&mut words);
    dir.join("data.jsonl").as_path().put(&mut words);
    words
}

/// Command-line words as tests write them (`common::cmd!["train --steps 4 --save", &out]`): a
/// `&str` stands for its words separated by white space, a path for one word whatever it holds.
pub trait Words {
    /// Appends the words to `into`.
    fn put(self, into: &mut Vec<std::ffi::OsString>);
}

impl Words for &str {
    fn put(self, into: &mut Vec<std::ffi::OsString>) {
        into.extend(self.split_whitespace().map(Into::into));
    }
}

impl Words for &String {
    fn put(self, into: &mut Vec<std::ffi::OsString>) {
        self.as_str().put(into)
    }
}

impl Words for &Path {
    fn put(self, into: &mut Vec<std::ffi::OsString>) {
        into.push(self.into());
    }
}

impl Words for &&Path {
    fn put(self, into: &mut Vec<std::ffi::OsString>) {
        into.push((*self).into());
    }
}

impl Words for &std::path::PathBuf {
    fn put(self, into: &mut Vec<std::ffi::OsString>) {
        into.push(self.into());
    }
}

/// A command line from [`Words`]: `cmd!["eval --model", &dir, "--json"]`.
#[allow(unused_macros)] // each test file uses its part
macro_rules! cmd {
    ($($w:expr),* $(,)?) => {{
        let mut words: Vec<std::ffi::OsString> = Vec::new();
        $( $crate::common::Words::put($w, &mut words); )*
        words
    }};
}
#[allow(unused_imports)]
pub(crate) use cmd;
