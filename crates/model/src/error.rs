//! The one error type of the `model` crate.

use std::path::PathBuf;

use thiserror::Error;

/// What can be wrong with a model's configuration or weights.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or a field has the wrong type.
    #[error("{path}: invalid config: {reason}")]
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Required config fields are absent.
    #[error("{path}: config lacks required field(s): {}", fields.join(", "))]
    MissingFields {
        /// The file.
        path: PathBuf,
        /// Every missing field.
        fields: Vec<String>,
    },
    /// Config values are inconsistent (e.g. heads that do not divide the hidden size).
    #[error("invalid LLaMA config: {0}")]
    InvalidConfig(String),
    /// A generation request is out of range: a sampling setting (`setting`, e.g. `top_p`) or
    /// an empty prompt.
    #[error("invalid generation request: {setting} {reason}")]
    InvalidGeneration {
        /// The setting, as named in [`crate::Sampling`] (or `prompt`).
        setting: &'static str,
        /// What is wrong, with the value.
        reason: String,
    },
    /// A `generation_config.json` is malformed or asks for what `generate` does not do.
    #[error("{path}: {reason}")]
    GenerationConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A model folder holds weights in a format not read here (`file`: a PyTorch pickle, a
    /// TensorFlow or Flax file) and no safetensors.
    #[error("{}", foreign_weights_reason(.dir, .file))]
    ForeignWeights {
        /// The folder.
        dir: PathBuf,
        /// The weight file it holds.
        file: PathBuf,
    },
    /// Memory for the model could not be allocated.
    #[error("out of memory: {what} need {bytes} bytes")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes asked for.
        bytes: usize,
    },
    /// A config feature the model does not implement.
    #[error("unsupported LLaMA config: {0}")]
    Unsupported(String),
    /// A folder's manifest (`hotspa-manifest.json`, a checkpoint's `state.json`) is malformed.
    #[error("{path}: malformed manifest: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint's `state.json` is malformed (not JSON, or a field missing or of the wrong
    /// type).
    #[error("{path}: malformed checkpoint state: {reason}")]
    CheckpointState {
        /// The `state.json`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file differs from the SHA-256 its folder's manifest lists: it changed or was corrupted
    /// after hotspa wrote it.
    #[error("{path}: checksum mismatch: {} says {want}, the file is {got} (the file changed or was corrupted after it was written)", manifest.display())]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The manifest that lists it.
        manifest: PathBuf,
        /// The SHA-256 listed.
        want: String,
        /// The file's SHA-256.
        got: String,
    },
    /// A save would replace a file or folder hotspa did not write.
    #[error("{reason}")]
    NotOwned {
        /// The file or folder.
        path: PathBuf,
        /// Why it is not hotspa's to replace.
        reason: String,
    },
    /// A weights file is malformed or truncated.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Tensors the model needs are absent from a weights file.
    #[error("{path}: missing tensor(s): {}", names.join(", "))]
    MissingTensors {
        /// The file.
        path: PathBuf,
        /// Every missing name.
        names: Vec<String>,
    },
    /// Tensors the model does not know are present in a weights file.
    #[error("{path}: unexpected tensor(s) for this config: {}", names.join(", "))]
    UnexpectedTensors {
        /// The file.
        path: PathBuf,
        /// Every unexpected name.
        names: Vec<String>,
    },
    /// A tensor has the wrong shape or an unsupported dtype.
    #[error("{path}: tensor {name}: {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Expected vs found.
        reason: String,
    },
    /// In-memory weights do not match the config.
    #[error("weights do not match the config: {0}")]
    Mismatch(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The JSON value of the file `path` and the error for what is wrong inside it: a file that
/// cannot be read is [`ModelError::Io`]; one that is not JSON, `fault(path, "malformed JSON:
/// …")`, and so is what the caller finds missing, through the returned closure.
pub(crate) fn read_json(
    path: &std::path::Path,
    fault: fn(std::path::PathBuf, String) -> ModelError,
) -> Result<(serde_json::Value, impl Fn(String) -> ModelError + '_)> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let bad = move |reason: String| fault(path.to_path_buf(), reason);
    let v = serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    Ok((v, bad))
}

/// Why `dir`'s weights cannot be read, for a folder holding [`crate::folder::foreign_weights`] `file`.
pub fn foreign_weights_reason(dir: &std::path::Path, file: &std::path::Path) -> String {
    format!(
        "{} holds {} but no model.safetensors: hotspa reads safetensors only (a pickle can run \
         code); convert it with transformers — \
         `AutoModelForCausalLM.from_pretrained(\"{dir}\").save_pretrained(OUT)` writes \
         model.safetensors — or pass --init random to start from random weights on purpose",
        dir.display(),
        file.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        dir = dir.display()
    )
}
