//! Hugging Face model folders in and out: weights from a single `model.safetensors` or a sharded
//! `model.safetensors.index.json`, in f32, bf16 or f16; a folder written as `save_pretrained`
//! writes one — `config.json`, weights (sharded above a size), `generation_config.json`, and the
//! tokenizer's files when one was used — atomically (a temporary folder renamed into place).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::config::LlamaConfig;
use crate::error::{io, read_json, ModelError, Result};
use crate::files::write_atomic;
use crate::params::param_specs;
use crate::weights::Weights;

/// The element type weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Dtype {
    /// HF's name (`config.json`'s `dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    fn st(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::Bf16 => StDtype::BF16,
            Dtype::F16 => StDtype::F16,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            _ => Err(format!("dtype `{s}`: use bf16, f16 or f32")),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

/// The index of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";
/// The weights of an unsharded one.
pub const SINGLE: &str = "model.safetensors";
/// Shards are cut above this many bytes of weights (HF's default of `save_pretrained`).
pub const SHARD_BYTES: usize = 5 << 30;

/// Whether `dir` holds weights (a single file or a sharded index).
pub fn has_weights(dir: &Path) -> bool {
    dir.is_dir() && (dir.join(SINGLE).is_file() || dir.join(INDEX).is_file())
}

/// Weight files of other formats that a model folder may hold instead of safetensors, which
/// hotspa does not read: PyTorch pickles (transformers' `pytorch_model.bin`, sharded or not;
/// Meta's original `consolidated.*.pth`), TensorFlow and Flax weights.
pub const FOREIGN_WEIGHTS: [&str; 5] = [
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "consolidated.00.pth",
    "tf_model.h5",
    "flax_model.msgpack",
];

/// The first of [`FOREIGN_WEIGHTS`] in `dir` when it holds no safetensors weights.
pub fn foreign_weights(dir: &Path) -> Option<PathBuf> {
    if has_weights(dir) {
        return None;
    }
    FOREIGN_WEIGHTS
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

pub use crate::error::foreign_weights_reason;

impl Weights {
    /// Reads a safetensors file (or a model folder: see [`crate::load_weights`]) for `cfg`.
    /// f32, bf16 and f16 tensors are accepted; every name the config needs must be present with
    /// its shape, and unknown names are refused (a `rotary_emb.inv_freq` buffer, and
    /// `lm_head.weight` under tied embeddings, are ignored as HF does). Truncated or corrupt
    /// files are refused naming the file.
    pub fn load(cfg: &LlamaConfig, path: &Path) -> Result<Self> {
        crate::folder::load_weights(cfg, path).map(|(w, _)| w)
    }
}

/// Tensors by name, as f32.
type Tensors = HashMap<String, Vec<f32>>;

/// Refuses the tensors among `names` (those of `path`) that the model does not have (not in
/// `shapes`, not `ignorable`), naming them in order.
fn no_unexpected<'a>(
    path: &Path,
    names: impl IntoIterator<Item = &'a str>,
    shapes: &HashMap<String, Vec<usize>>,
    ignorable: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut unexpected: Vec<String> = names
        .into_iter()
        .filter(|n| !shapes.contains_key(*n) && !ignorable(n))
        .map(str::to_string)
        .collect();
    if unexpected.is_empty() {
        return Ok(());
    }
    unexpected.sort();
    Err(ModelError::UnexpectedTensors {
        path: path.to_path_buf(),
        names: unexpected,
    })
}

/// The tensors `names` of one safetensors file, as f32, with the file's dtype; a missing one is
/// refused, and so is a name the model does not know unless `ignorable` says it may be there.
fn read_file(
    path: &Path,
    names: &BTreeSet<String>,
    shapes: &HashMap<String, Vec<usize>>,
    ignorable: &dyn Fn(&str) -> bool,
) -> Result<(Tensors, Option<Dtype>)> {
    let buf = std::fs::read(path).map_err(io(path))?;
    let st = SafeTensors::deserialize(&buf).map_err(|e| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    no_unexpected(path, st.names(), shapes, ignorable)?;
    let present: BTreeSet<&str> = st.names().into_iter().collect();
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !present.contains(n.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ModelError::MissingTensors {
            path: path.to_path_buf(),
            names: missing,
        });
    }
    let mut out = HashMap::new();
    let mut dtype = None;
    for name in names {
        let bad = |reason: String| ModelError::BadTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let want = &shapes[name];
        if t.shape() != want.as_slice() {
            return Err(bad(format!(
                "shape {:?}, the config needs {want:?}",
                t.shape()
            )));
        }
        let raw = t.data();
        let (values, d): (Vec<f32>, Dtype) = match t.dtype() {
            StDtype::F32 => (
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F32,
            ),
            StDtype::BF16 => (
                raw.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::Bf16,
            ),
            StDtype::F16 => (
                raw.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F16,
            ),
            other => return Err(bad(format!("dtype {other:?} (f32, bf16 or f16 expected)"))),
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "value {} at index {i} is not finite",
                values[i]
            )));
        }
        dtype = Some(match dtype {
            Some(prev) if prev != d => Dtype::F32,
            _ => d,
        });
        out.insert(name.clone(), values);
    }
    Ok((out, dtype))
}

/// Reads weights for `cfg` from a safetensors file, or from a model folder (a single
/// `model.safetensors`, or the shards a `model.safetensors.index.json` lists), with the dtype
/// they were stored in (f32 where tensors differ). Every name the config needs must be present
/// with its shape; unknown names are refused (a `rotary_emb.inv_freq` buffer, and
/// `lm_head.weight` under tied embeddings, are ignored as HF does).
///
/// A folder hotspa wrote (a saved model's `hotspa-manifest.json`, a checkpoint step's
/// `state.json`) has every file read checked against its SHA-256 first; see
/// [`load_weights_checked`] for what was verified.
pub fn load_weights(cfg: &LlamaConfig, path: &Path) -> Result<(Weights, Dtype)> {
    load_weights_checked(cfg, path).map(|(w, d, _)| (w, d))
}

/// [`load_weights`], saying which files were verified against a manifest.
pub fn load_weights_checked(
    cfg: &LlamaConfig,
    path: &Path,
) -> Result<(Weights, Dtype, crate::manifest::Checksums)> {
    let specs = param_specs(cfg);
    let shapes: HashMap<String, Vec<usize>> = specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    let tied = cfg.tie_word_embeddings;
    let ignorable =
        move |n: &str| n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight");
    if let Some(file) = foreign_weights(path) {
        return Err(ModelError::ForeignWeights {
            dir: path.to_path_buf(),
            file,
        });
    }
    // Which file holds which names.
    let plan: Vec<(PathBuf, BTreeSet<String>)> = if path.is_dir() {
        if path.join(INDEX).is_file() {
            let ipath = path.join(INDEX);
            let (v, corrupt) =
                read_json(&ipath, |path, reason| ModelError::Corrupt { path, reason })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| corrupt("no \"weight_map\" object".into()))?;
            no_unexpected(&ipath, map.keys().map(String::as_str), &shapes, &ignorable)?;
            let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
                    .ok_or_else(|| {
                        corrupt(format!("{name}: not a file name in this folder: {file}"))
                    })?;
                if shapes.contains_key(name) {
                    by_file
                        .entry(file.to_string())
                        .or_default()
                        .insert(name.clone());
                }
            }
            by_file
                .into_iter()
                .map(|(f, names)| (path.join(f), names))
                .collect()
        } else {
            vec![(path.join(SINGLE), shapes.keys().cloned().collect())]
        }
    } else {
        vec![(path.to_path_buf(), shapes.keys().cloned().collect())]
    };
    // Everything read, checked against the folder's manifest before it is parsed.
    let folder = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut read: Vec<String> = plan
        .iter()
        .filter_map(|(f, _)| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if path.is_dir() {
        read.push("config.json".into());
        if path.join(INDEX).is_file() {
            read.push(INDEX.into());
        }
    }
    let checksums = crate::manifest::verify_folder(&folder, &read)?;
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    let mut dtype: Option<Dtype> = None;
    for (file, names) in &plan {
        let (got, d) = read_file(file, names, &shapes, &ignorable)?;
        values.extend(got);
        if let Some(d) = d {
            dtype = Some(match dtype {
                Some(prev) if prev != d => Dtype::F32,
                _ => d,
            });
        }
    }
    let missing: Vec<String> = specs
        .iter()
        .filter(|s| !values.contains_key(&s.name))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(ModelError::MissingTensors {
            path: path.to_path_buf(),
            names: missing,
        });
    }
    let data = specs
        .iter()
        .map(|s| values.remove(&s.name).unwrap_or_default())
        .collect();
    Ok((
        Weights::new(cfg, data)?,
        dtype.unwrap_or(Dtype::F32),
        checksums,
    ))
}

/// A file a saved folder carries as it is (a tokenizer's, a `generation_config.json`), read
/// once when a run starts: later saves do not depend on the original staying in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedFile {
    /// Its name in the saved folder.
    pub name: String,
    /// Its bytes.
    pub bytes: std::sync::Arc<Vec<u8>>,
}

impl CarriedFile {
    /// Reads `path` (its file name is the name it is saved under).
    pub fn read(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ModelError::Mismatch(format!("{} is not a file", path.display())))?;
        let bytes = std::fs::read(path).map_err(io(path))?;
        Ok(Self {
            name,
            bytes: std::sync::Arc::new(bytes),
        })
    }
}

/// How [`save_folder`] writes.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The element type of the weights.
    pub dtype: Dtype,
    /// Weights beyond this many bytes are split over several files with an index.
    pub shard_bytes: usize,
    /// Files written into the folder as they are (the tokenizer's).
    pub extra_files: Vec<CarriedFile>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::F32,
            shard_bytes: SHARD_BYTES,
            extra_files: Vec::new(),
        }
    }
}

/// The `config.json` transformers 5 writes for `cfg` with weights in `dtype`.
pub fn hf_config(cfg: &LlamaConfig, dtype: Dtype) -> serde_json::Value {
    let mut rope = serde_json::Map::new();
    rope.insert("rope_theta".into(), cfg.rope_theta.into());
    match cfg.rope_scaling {
        None => {
            rope.insert("rope_type".into(), "default".into());
        }
        Some(s) => {
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(s) {
                rope.extend(m);
            }
        }
    }
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype.hf_name(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": false,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.kv_heads(),
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
    })
}

fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| ModelError::Mismatch(e.to_string()))
}

/// Writes the files of an HF model folder into `dir` (which exists): `config.json`,
/// `generation_config.json`, the weights (one `model.safetensors`, or shards of at most
/// `opts.shard_bytes` with `model.safetensors.index.json`) and `opts.extra_files`. Returns
/// every file written, by name.
pub fn write_folder_files(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &Weights,
    opts: &SaveOptions,
) -> Result<Vec<String>> {
    write_atomic(
        &dir.join("config.json"),
        &json_bytes(&hf_config(cfg, opts.dtype))?,
    )?;
    let mut generation = serde_json::Map::new();
    generation.insert("_from_model_config".into(), true.into());
    if let Some(b) = cfg.bos_token_id {
        generation.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = &cfg.eos_token_id {
        generation.insert(
            "eos_token_id".into(),
            serde_json::to_value(e).unwrap_or_default(),
        );
    }
    if let Some(p) = cfg.pad_token_id {
        generation.insert("pad_token_id".into(), p.into());
    }
    write_atomic(
        &dir.join("generation_config.json"),
        &json_bytes(&serde_json::Value::Object(generation))?,
    )?;
    // Shards in parameter order, each at most shard_bytes (a larger tensor alone).
    let specs = weights.specs();
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0usize;
    for (k, s) in specs.iter().enumerate() {
        let b = s.numel() * opts.dtype.bytes();
        if shards.is_empty() || (size + b > opts.shard_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        if let Some(last) = shards.last_mut() {
            last.push(k);
        }
    }
    let n = shards.len();
    let mut files = vec![
        "config.json".to_string(),
        "generation_config.json".to_string(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let bytes: Vec<Vec<u8>> = shard
            .iter()
            .map(|&k| opts.dtype.encode(&weights.tensors()[k]))
            .collect();
        let mut views = Vec::with_capacity(shard.len());
        for (&k, b) in shard.iter().zip(&bytes) {
            let s = &specs[k];
            let view = TensorView::new(opts.dtype.st(), s.shape.clone(), b)
                .map_err(|e| ModelError::Mismatch(format!("{}: {e}", s.name)))?;
            views.push((s.name.clone(), view));
            weight_map.insert(s.name.clone(), name.clone().into());
        }
        let out = crate::files::serialize(views, &dir.join(&name))?;
        write_atomic(&dir.join(&name), &out)?;
        files.push(name);
    }
    if n > 1 {
        let total: usize = specs.iter().map(|s| s.numel() * opts.dtype.bytes()).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total, "total_parameters": weights.numel()},
            "weight_map": weight_map,
        });
        write_atomic(&dir.join(INDEX), &json_bytes(&index)?)?;
        files.push(INDEX.to_string());
    }
    for f in &opts.extra_files {
        if files.contains(&f.name) {
            // The folder's own file (e.g. generation_config.json) is replaced by the carried one.
            files.retain(|n| n != &f.name);
        }
        write_atomic(&dir.join(&f.name), &f.bytes)?;
        files.push(f.name.clone());
    }
    Ok(files)
}

/// Why `dir` (an existing, non-empty folder) may not be replaced by a save, or `None` when
/// every entry in it is hotspa's (listed in its manifest).
pub fn not_replaceable(dir: &Path) -> Result<Option<String>> {
    Ok(match crate::manifest::Manifest::read(dir)? {
        None => Some(format!(
            "{} was not written by hotspa (it has no {}): hotspa replaces only its own outputs",
            dir.display(),
            crate::manifest::MANIFEST
        )),
        Some(m) => {
            let foreign = m.foreign_entries(dir)?;
            (!foreign.is_empty()).then(|| {
                format!(
                    "{} holds file(s) hotspa did not write ({}): hotspa replaces only its own outputs",
                    dir.display(),
                    foreign.join(", ")
                )
            })
        }
    })
}

/// Writes an HF model folder at `dir`, atomically: the files are assembled in a temporary
/// folder beside it, a [`MANIFEST`](crate::manifest::MANIFEST) with every file's SHA-256
/// written last, and the folder renamed into place. `dir` may be missing or empty, or a folder
/// hotspa wrote before (every entry listed in its manifest): that one is moved aside and removed
/// file by file once the new folder is in place. Anything else is refused before a byte is written.
pub fn save_folder(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &Weights,
    opts: &SaveOptions,
) -> Result<()> {
    let occupied = dir.is_dir() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some();
    if occupied {
        if let Some(why) = not_replaceable(dir)? {
            return Err(ModelError::NotOwned {
                path: dir.to_path_buf(),
                reason: why,
            });
        }
    } else if dir.exists() && !dir.is_dir() {
        return Err(ModelError::NotOwned {
            path: dir.to_path_buf(),
            reason: format!("{} is a file, not a model folder", dir.display()),
        });
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        crate::manifest::remove_temporary_dir(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let result = (|| {
        let files = write_folder_files(&tmp, cfg, weights, opts)?;
        crate::manifest::Manifest::of(&tmp, &files)?.write(&tmp)?;
        if occupied {
            std::fs::rename(dir, &old).map_err(io(dir))?;
        } else if dir.is_dir() {
            // An empty directory gives way to the finished folder.
            std::fs::remove_dir(dir).map_err(io(dir))?;
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            if occupied {
                // Put the previous folder back.
                let _ = std::fs::rename(&old, dir);
            }
            return Err(io(dir)(e));
        }
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = crate::manifest::remove_temporary_dir(&tmp);
        return result;
    }
    if occupied {
        match crate::manifest::remove_owned(&old)? {
            crate::manifest::Removal::Removed => {}
            other => {
                return Err(ModelError::NotOwned {
                    path: old.clone(),
                    reason: format!(
                        "the model was saved to {}, but the folder it replaced changed during the                          run ({other:?}); it was moved to {} and left there",
                        dir.display(),
                        old.display()
                    ),
                })
            }
        }
    }
    Ok(())
}

/// The `writer` a safetensors file's metadata names (`hotspa …` for files hotspa wrote), read
/// from its header alone; `None` for a file that is not safetensors or names no writer.
pub fn safetensors_writer(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?
        .get("writer")?
        .as_str()
        .map(str::to_string)
}
