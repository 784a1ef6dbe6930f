//! `LlamaConfig` from a Hugging Face `config.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, ModelError, Result};

/// The LLaMA hyper-parameters hotspa uses, with HF's field names. Fields absent from the file take
/// `transformers.LlamaConfig`'s defaults, except the five size fields, which are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (required).
    pub vocab_size: usize,
    /// Model width (required).
    pub hidden_size: usize,
    /// MLP width (required).
    pub intermediate_size: usize,
    /// Decoder layers (required).
    pub num_hidden_layers: usize,
    /// Query heads (required).
    pub num_attention_heads: usize,
    /// Key/value heads (default: `num_attention_heads`, i.e. no GQA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head dimension (default: `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon (default 1e-6).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (default 10000).
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position the model was built for (default 2048).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix (default false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

const REQUIRED: [&str; 5] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
];

/// The named model shapes of the paper's experiments: (name, layers, hidden, FFN, heads), all
/// with a 32000-token vocabulary, MHA, untied embeddings and 4096 positions.
pub const PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("llama2-7b", 32, 4096, 11008, 32),
    ("llama2-13b", 40, 5120, 13824, 40),
    ("llama-32b", 60, 6656, 17920, 64),
];

impl LlamaConfig {
    /// A preset by name (see [`PRESETS`]); no weights are allocated.
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, layers, hidden, ffn, heads) = PRESETS.iter().find(|p| p.0 == name)?;
        let text = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": 32000, "hidden_size": {hidden}, "intermediate_size": {ffn},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "num_key_value_heads": {heads}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": false}}"#
        );
        Self::from_json(&text, Path::new(name)).ok()
    }

    /// A preset name, or a `config.json` (or the directory holding it).
    pub fn preset_or_load(name_or_path: &str) -> Result<Self> {
        match Self::preset(name_or_path) {
            Some(c) => Ok(c),
            None => Self::load(Path::new(name_or_path)),
        }
    }

    /// Reads `config.json`, given the file or the directory holding it.
    pub fn load(path: &Path) -> Result<Self> {
        let file: PathBuf = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        Self::from_json(&text, &file)
    }

    /// Parses the text of a `config.json` (`origin` names it in errors).
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let syntax = |e: serde_json::Error| ModelError::ConfigSyntax {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(syntax)?;
        let obj = value.as_object().ok_or_else(|| ModelError::ConfigSyntax {
            path: origin.to_path_buf(),
            reason: "the top level is not a JSON object".into(),
        })?;
        let missing: Vec<String> = REQUIRED
            .iter()
            .filter(|f| obj.get(**f).is_none_or(|v| v.is_null()))
            .map(|f| f.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::MissingFields {
                path: origin.to_path_buf(),
                fields: missing,
            });
        }
        if let Some(s) = obj.get("rope_scaling").filter(|v| !v.is_null()) {
            return Err(ModelError::Unsupported(format!(
                "rope_scaling {s} (only plain RoPE is implemented)"
            )));
        }
        if let Some(act) = obj.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!(
                    "hidden_act \"{act}\" (only silu/SwiGLU is implemented)"
                )));
            }
        }
        for bias in ["attention_bias", "mlp_bias"] {
            if obj.get(bias).and_then(|v| v.as_bool()) == Some(true) {
                return Err(ModelError::Unsupported(format!(
                    "{bias}: true (LLaMA projections have no bias)"
                )));
            }
        }
        let cfg: LlamaConfig = serde_json::from_value(value).map_err(syntax)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the sizes are positive and consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be positive and even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }
}
