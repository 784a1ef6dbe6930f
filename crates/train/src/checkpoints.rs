//! A run owns its checkpoint directory: it holds the directory's lock for its whole life (a
//! second run on it is refused), cleans what killed runs left half-written, refuses to start
//! fresh over another run's steps unless forced, and keeps only the last few step folders.

use std::fs::File;
use std::path::{Path, PathBuf};

use model::manifest::remove_owned;
use model::{CarriedFile, Checkpoint, LlamaConfig};

use crate::error::{Result, TrainError};

/// The lock file inside a checkpoint directory.
pub const LOCK: &str = ".hotspa.lock";

/// A checkpoint directory owned by this run.
#[derive(Debug)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep_last: usize,
    /// Held (locked) until the run ends; the OS releases it when the process dies.
    _lock: File,
}

/// The step folders of `dir` (`step-NNNNNNNN`), by step.
fn steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Why the step folder `p` cannot be removed file by file (it holds files hotspa did not write,
/// or has no checksums), or `None`.
fn not_removable(p: &Path) -> Result<Option<String>> {
    let Some(m) = model::manifest::Manifest::read(p)? else {
        return Ok(Some(format!(
            "{} has no state.json: not a checkpoint hotspa wrote, left in place",
            p.display()
        )));
    };
    let foreign = m.foreign_entries(p)?;
    Ok((!foreign.is_empty()).then(|| {
        format!(
            "{} holds file(s) hotspa did not write ({}); move them away first",
            p.display(),
            foreign.join(", ")
        )
    }))
}

/// What `dir/latest` names, if anything.
fn latest(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("latest"))
        .ok()
        .map(|s| s.trim().to_string())
}

impl CheckpointDir {
    /// Takes `dir` (created if missing) for this run, keeping the last `keep_last` step
    /// folders. `resuming` says the run continues from a checkpoint in `dir`; otherwise a
    /// directory that already holds steps is refused, or with `force` emptied of them first.
    /// Temporary folders of interrupted writes are removed.
    pub fn open(dir: &Path, keep_last: usize, resuming: bool, force: bool) -> Result<Self> {
        crate::outputs::check_dir("checkpoint_dir", dir)?;
        if keep_last == 0 {
            return Err(TrainError::setting("keep_last", "must be at least 1"));
        }
        let path = dir.join(LOCK);
        let lock = crate::outputs::lock_file(&path)?.map_err(|holder| {
            TrainError::setting(
                "checkpoint_dir",
                format!(
                    "{} is in use by another run ({holder}); wait for it to end or choose another directory",
                    dir.display(),
                ),
            )
        })?;
        crate::outputs::say_holder(&path);
        // Leftovers of interrupted writes are never pointed at.
        model::remove_interrupted(dir);
        let existing = steps(dir);
        if !resuming && (!existing.is_empty() || latest(dir).is_some()) {
            if !force {
                return Err(TrainError::setting(
                    "checkpoint_dir",
                    format!(
                        "{} already holds {} checkpoint(s) of another run (the last at step {}); \
                         continue it with --resume {}, choose another directory, or pass --force \
                         to delete them and start fresh",
                        dir.display(),
                        existing.len(),
                        existing.last().map_or(0, |s| s.0),
                        dir.display()
                    ),
                ));
            }
            // Every step folder must be wholly hotspa's before any is touched; then each goes
            // file by file.
            for (_, p) in &existing {
                if let Some(why) = not_removable(p)? {
                    return Err(TrainError::setting(
                        "checkpoint_dir",
                        format!("--force: {why}"),
                    ));
                }
            }
            for (_, p) in existing {
                remove_owned(&p)?;
            }
            let l = dir.join("latest");
            if l.exists() {
                std::fs::remove_file(&l).map_err(TrainError::io(&l))?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            keep_last,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `ck` (atomically, `latest` moved last) and then removes the oldest step folders
    /// beyond the last `keep_last`, file by file (one holding files hotspa did not write is
    /// kept whole).
    pub fn save(&self, ck: &Checkpoint, cfg: &LlamaConfig) -> Result<PathBuf> {
        self.save_with(ck, cfg, &[]).map(|(at, _)| at)
    }

    /// [`CheckpointDir::save`], the step folder carrying `extra_files` (the tokenizer's).
    /// Returns the step folder and a notice for each old step folder that was kept because it
    /// holds files hotspa did not write.
    pub fn save_with(
        &self,
        ck: &Checkpoint,
        cfg: &LlamaConfig,
        extra_files: &[CarriedFile],
    ) -> Result<(PathBuf, Vec<String>)> {
        let at = ck.save_with(&self.dir, cfg, extra_files)?;
        let keep = latest(&self.dir);
        let all = steps(&self.dir);
        let excess = all.len().saturating_sub(self.keep_last);
        let mut notices = Vec::new();
        for (_, p) in all.into_iter().take(excess) {
            let is_latest = keep
                .as_deref()
                .is_some_and(|k| p.file_name().is_some_and(|n| n == k));
            if is_latest {
                continue;
            }
            match not_removable(&p) {
                Ok(None) => {
                    remove_owned(&p)?;
                }
                Ok(Some(why)) => notices.push(format!("--keep-last: {why}; kept")),
                Err(e) => notices.push(format!("--keep-last: {}: {e}; kept", p.display())),
            }
        }
        Ok((at, notices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"vocab_size": 8, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
                "num_attention_heads": 2}"#,
            Path::new("t"),
        )
        .unwrap()
    }

    fn ck(step: u64) -> Checkpoint {
        let w = model::Weights::random(&cfg(), step);
        Checkpoint {
            step,
            weights: w.clone(),
            exp_avg: w.clone(),
            exp_avg_sq: w,
            run: serde_json::json!({}),
            state: [("rank0/dp2/0/worker".to_string(), vec![0.5; 3])].into(),
        }
    }

    #[test]
    fn one_run_at_a_time_keeps_the_last_steps_and_refuses_to_start_over_another() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        let run = CheckpointDir::open(&dir, 2, false, false).unwrap();
        let e = CheckpointDir::open(&dir, 2, true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is in use by another run"), "{e}");
        for s in [10, 20, 30] {
            run.save(&ck(s), &cfg()).unwrap();
        }
        let kept: Vec<u64> = steps(&dir).iter().map(|s| s.0).collect();
        assert_eq!(kept, vec![20, 30]);
        assert_eq!(latest(&dir).as_deref(), Some("step-00000030"));
        // What the run keeps besides weights and moments comes back, checksummed.
        let back = Checkpoint::load(&dir, &cfg()).unwrap();
        assert_eq!(back, ck(30));
        let extra = dir.join("step-00000030").join("run_state.safetensors");
        let mut bytes = std::fs::read(&extra).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&extra, bytes).unwrap();
        let e = Checkpoint::load(&dir, &cfg()).unwrap_err().to_string();
        assert!(
            e.contains("run_state.safetensors") && e.contains("checksum"),
            "{e}"
        );
        drop(run);
        // A half-written folder of a killed run is cleaned; a fresh run is refused, a resumed
        // one welcome, a forced one starts from nothing.
        std::fs::create_dir_all(dir.join(".step-00000040.tmp-999")).unwrap();
        let e = CheckpointDir::open(&dir, 2, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("already holds 2 checkpoint(s)") && e.contains("--force"),
            "{e}"
        );
        assert!(!dir.join(".step-00000040.tmp-999").exists());
        drop(CheckpointDir::open(&dir, 2, true, false).unwrap());
        drop(CheckpointDir::open(&dir, 2, false, true).unwrap());
        assert!(steps(&dir).is_empty() && latest(&dir).is_none());
    }
}
