//! Training checkpoints: a directory per step holding the weights (HF names, f32 safetensors),
//! the AdamW moments (same names and shapes), other per-run state as named vectors
//! (`run_state.safetensors`, e.g. error-feedback residuals; only when there is some), and
//! `state.json` (step, the run's settings, the model config and the SHA-256 of every file). A step folder is also an HF model folder
//! (`config.json`, `generation_config.json`, the tokenizer's files when one was used), so
//! `from_pretrained` loads it. Written atomically as a whole: the step directory
//! is assembled under a temporary name and renamed, and only then does `latest` (written by temp
//! + rename) point at it, so a crash at any moment leaves the previous checkpoint loadable.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::LlamaConfig;
use crate::error::{io, read_json, ModelError, Result};
use crate::files::write_atomic;
use crate::folder::CarriedFile;
use crate::manifest::{remove_owned, remove_temporary_dir, sha256_file, Removal};
use crate::weights::Weights;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

/// Everything needed to continue a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// The weights after `step` steps.
    pub weights: Weights,
    /// AdamW first moments.
    pub exp_avg: Weights,
    /// AdamW second moments.
    pub exp_avg_sq: Weights,
    /// The run's settings (free-form JSON, kept for the record and for checks on resume).
    pub run: serde_json::Value,
    /// Other state a resumed run needs, as named `f32` vectors (e.g. each rank's
    /// error-feedback residuals); empty for most runs.
    pub state: BTreeMap<String, Vec<f32>>,
}

/// The file of [`Checkpoint::state`].
const STATE_FILE: &str = "run_state.safetensors";

fn save_state(state: &BTreeMap<String, Vec<f32>>, path: &Path) -> Result<()> {
    let bytes: Vec<(&String, Vec<u8>)> = state
        .iter()
        .map(|(n, v)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, b) in &bytes {
        let view = TensorView::new(StDtype::F32, vec![b.len() / 4], b)
            .map_err(|e| ModelError::Mismatch(format!("{name}: {e}")))?;
        views.push(((*name).clone(), view));
    }
    let out = safetensors::serialize(views, None::<HashMap<String, String>>).map_err(|e| {
        ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    write_atomic(path, &out)
}

fn load_state(path: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != StDtype::F32 || view.shape().len() != 1 {
            return Err(corrupt(format!(
                "{name}: {:?} of shape {:?}, expected a vector of f32",
                view.dtype(),
                view.shape()
            )));
        }
        let v = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, v);
    }
    Ok(out)
}

const FILES: [&str; 3] = [
    "model.safetensors",
    "exp_avg.safetensors",
    "exp_avg_sq.safetensors",
];

impl Checkpoint {
    /// Writes `dir/step-NNNNNNNN/` and points `dir/latest` at it. Returns the step directory.
    pub fn save(&self, dir: &Path, cfg: &LlamaConfig) -> Result<PathBuf> {
        self.save_with(dir, cfg, &[])
    }

    /// [`Checkpoint::save`], the step folder also an HF model folder (`config.json`,
    /// `generation_config.json`, f32 weights) carrying `extra_files` (the tokenizer's). Every
    /// file of the step folder is listed with its SHA-256 in `state.json`.
    pub fn save_with(
        &self,
        dir: &Path,
        cfg: &LlamaConfig,
        extra_files: &[CarriedFile],
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // Leftovers of interrupted writes are never pointed at; remove them.
        remove_interrupted(dir);
        let name = format!("step-{:08}", self.step);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let opts = crate::folder::SaveOptions {
            dtype: crate::folder::Dtype::F32,
            shard_bytes: usize::MAX,
            extra_files: extra_files.to_vec(),
        };
        let mut files = crate::folder::write_folder_files(&tmp, cfg, &self.weights, &opts)?;
        self.exp_avg.save(&tmp.join(FILES[1]))?;
        self.exp_avg_sq.save(&tmp.join(FILES[2]))?;
        files.extend([FILES[1].to_string(), FILES[2].to_string()]);
        if !self.state.is_empty() {
            save_state(&self.state, &tmp.join(STATE_FILE))?;
            files.push(STATE_FILE.to_string());
        }
        let mut sums = serde_json::Map::new();
        for f in files {
            let sum = sha256_file(&tmp.join(&f))?;
            sums.insert(f, serde_json::Value::String(sum));
        }
        let state = serde_json::json!({
            "step": self.step,
            "config": cfg,
            "run": self.run,
            "sha256": sums,
        });
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| ModelError::Mismatch(e.to_string()))?;
        write_atomic(&tmp.join("state.json"), text.as_bytes())?;
        let final_dir = dir.join(&name);
        // A step folder of the same step (a run resumed before it) is replaced only when it
        // is wholly hotspa's.
        match remove_owned(&final_dir)? {
            Removal::Removed => {}
            other => {
                let _ = remove_temporary_dir(&tmp);
                return Err(ModelError::NotOwned {
                    path: final_dir.clone(),
                    reason: format!(
                        "{} exists and cannot be replaced ({}); move it away",
                        final_dir.display(),
                        match other {
                            Removal::Foreign(f) =>
                                format!("it holds files hotspa did not write: {}", f.join(", ")),
                            _ => "it is not a checkpoint hotspa wrote".into(),
                        }
                    ),
                });
            }
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        write_atomic(&dir.join("latest"), name.as_bytes())?;
        Ok(final_dir)
    }

    /// The step folder a checkpoint directory's `latest` names, for `path` being that
    /// directory (it has a `latest` file and no `config.json`) or its `latest` file itself;
    /// `None` for anything else (a model folder, a step folder, a missing path).
    pub fn latest_step(path: &Path) -> Option<PathBuf> {
        let (dir, latest) = if path.is_dir() && !path.join("config.json").exists() {
            (path.to_path_buf(), path.join("latest"))
        } else if path.file_name().is_some_and(|n| n == "latest") && path.is_file() {
            (path.parent()?.to_path_buf(), path.to_path_buf())
        } else {
            return None;
        };
        let name = std::fs::read_to_string(latest).ok()?;
        let step = dir.join(name.trim());
        step.join("config.json").is_file().then_some(step)
    }

    /// The step folder `dir` names: itself when it holds `state.json`, else the one its
    /// `latest` file points at.
    pub fn step_dir(dir: &Path) -> Result<PathBuf> {
        if dir.join("state.json").exists() {
            return Ok(dir.to_path_buf());
        }
        let latest = dir.join("latest");
        let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
        let name = name.trim();
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(ModelError::CheckpointState {
                path: latest,
                reason: format!("does not name a step folder of this directory: {name:?}"),
            });
        }
        Ok(dir.join(name))
    }

    /// Loads the checkpoint `dir/latest` points at (or `dir` itself when it is a step directory),
    /// verifying every file's checksum and that the model config matches `cfg`.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let step_dir = Self::step_dir(dir)?;
        let state_path = step_dir.join("state.json");
        let (state, corrupt) = read_json(&state_path, |path, reason| {
            ModelError::CheckpointState { path, reason }
        })?;
        let step = state["step"]
            .as_u64()
            .ok_or_else(|| corrupt("no \"step\"".into()))?;
        let saved_cfg: LlamaConfig = serde_json::from_value(state["config"].clone())
            .map_err(|e| corrupt(format!("bad \"config\": {e}")))?;
        if !saved_cfg.same_model(cfg) {
            return Err(ModelError::Mismatch(format!(
                "{} was written for another model config ({saved_cfg:?})",
                step_dir.display()
            )));
        }
        let mut files = FILES.to_vec();
        if state["sha256"].get(STATE_FILE).is_some() {
            files.push(STATE_FILE);
        } else if step_dir.join(STATE_FILE).exists() {
            return Err(corrupt(format!(
                "{STATE_FILE} is there but state.json lists no checksum for it"
            )));
        }
        for f in &files {
            if state["sha256"][f].as_str().is_none() {
                return Err(corrupt(format!("no checksum for {f}")));
            }
        }
        // Every file the step lists (the config and tokenizer's too, where a newer run listed
        // them), checked before any is parsed.
        let manifest = crate::manifest::Manifest::read(&step_dir)?
            .ok_or_else(|| corrupt("no checksums".into()))?;
        let listed: Vec<String> = manifest.files.keys().cloned().collect();
        manifest.verify(&step_dir, &listed)?;
        Ok(Self {
            step,
            weights: Weights::load(cfg, &step_dir.join(FILES[0]))?,
            exp_avg: Weights::load(cfg, &step_dir.join(FILES[1]))?,
            exp_avg_sq: Weights::load(cfg, &step_dir.join(FILES[2]))?,
            run: state["run"].clone(),
            state: if state["sha256"].get(STATE_FILE).is_some() {
                load_state(&step_dir.join(STATE_FILE))?
            } else {
                BTreeMap::new()
            },
        })
    }
}

/// Removes what interrupted checkpoint writes left in `dir` (`.step-N.tmp-PID` folders of
/// hotspa's files); one holding anything else is left in place.
pub fn remove_interrupted(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && crate::manifest::is_temporary(&name) {
            let _ = remove_temporary_dir(&e.path());
        }
    }
}
