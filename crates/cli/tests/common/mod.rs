//! What several integration tests share: a small model's config and learnable data.

#![allow(dead_code)] // each test file uses its part

use std::path::Path;
use std::process::{Command, Output};

/// Runs `hotspa ARGS` in `dir` (backtraces off, so errors read as a user sees them).
pub fn hotspa(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
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
