//! How commands print: one JSON object or a table, durations for people, and the training
//! library's notices on stderr.

use anyhow::Result;
use serde::Serialize;

/// Prints `value` as one JSON object, or calls `table`.
pub fn emit<T: Serialize>(json: bool, value: &T, table: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        table(value);
    }
    Ok(())
}

/// A duration for people: seconds, or milliseconds/microseconds when short.
pub fn seconds(s: f64) -> String {
    if s >= 0.1 {
        format!("{s:.3} s")
    } else if s >= 1e-4 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} µs", s * 1e6)
    }
}

/// Prints the library's notices on stderr, one per line.
pub struct Notices;

impl train::Sink for Notices {
    fn notice(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// The model folder `--model PATH` names: `PATH` itself, or, for a checkpoint directory (or its
/// `latest` file), the step folder `latest` points at — said on stderr.
pub fn model_folder(path: &std::path::Path) -> std::path::PathBuf {
    match model::Checkpoint::latest_step(path) {
        Some(step) => {
            eprintln!(
                "{}: the checkpoint's latest step, {}",
                path.display(),
                step.display()
            );
            step
        }
        None => path.to_path_buf(),
    }
}
