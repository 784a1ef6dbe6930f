//! `LlamaConfig` from a Hugging Face `config.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, ModelError, Result};

/// The LLaMA hyper-parameters hotspa uses, with HF's field names. Fields absent from the file take
/// `transformers.LlamaConfig`'s defaults, except the five size fields, which are required.
/// RoPE is read from transformers 5's `rope_parameters` or the older top-level `rope_theta` and
/// `rope_scaling`. Every other field of an HF config is either implemented, accepted only at the
/// value hotspa implements (`hidden_act: silu`, no biases, no dropout, `pretraining_tp: 1`, a
/// `LlamaForCausalLM` of `model_type` `llama`), known not to change training (`dtype`,
/// `use_cache`, …: [`HARMLESS`]), or refused by name.
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
    /// RoPE frequency scaling (`rope_type` `linear` or `llama3`; `None`: plain RoPE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScalingConfig>,
    /// Standard deviation of the random initialisation (default 0.02).
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// The tokenizer's beginning-of-sequence id, where the config names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence id or ids (generation stops at any of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// The padding id, where the config names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Longest position the model was built for (default 2048).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix (default false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// RoPE frequency scaling as HF writes it (`rope_type` and its parameters).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScalingConfig {
    /// Every frequency divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// One token id or several (HF's `eos_token_id` may be a list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// Every id.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// Fields of an HF config that do not change what training computes: how the weights were
/// stored (`dtype`, `torch_dtype`: hotspa trains in fp32 and saves in the input's dtype or
/// `--save-dtype`), inference switches, bookkeeping.
pub const HARMLESS: [&str; 13] = [
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
];

/// Fields read into [`LlamaConfig`] (or checked against the one value implemented).
const IMPLEMENTED: [&str; 24] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "architectures",
    "model_type",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "pretraining_tp",
];

fn default_init_range() -> f64 {
    0.02
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
        // What kind of model it is comes first: a GPT-2 or Mistral config is another model, not
        // a LLaMA config with fields missing.
        let unsupported = |m: String| ModelError::Unsupported(format!("{}: {m}", origin.display()));
        if let Some(t) = obj.get("model_type").filter(|v| !v.is_null()) {
            if t != "llama" {
                return Err(unsupported(format!(
                    "model_type {t}: not a LLaMA-family model; hotspa trains LlamaForCausalLM \
                     (model_type \"llama\") only"
                )));
            }
        }
        if let Some(a) = obj.get("architectures").filter(|v| !v.is_null()) {
            let names: Vec<&str> = a
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            if names.is_empty() || names.iter().any(|n| *n != "LlamaForCausalLM") {
                return Err(unsupported(format!(
                    "architectures {a}: not a LLaMA-family model; hotspa trains LlamaForCausalLM only"
                )));
            }
        }
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
        let mut unknown: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !IMPLEMENTED.contains(k) && !HARMLESS.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(unsupported(format!(
                "field(s) {} — hotspa cannot tell whether they change the model, so it refuses \
                 them; remove them from the config if they do not",
                unknown.join(", ")
            )));
        }
        let refuse = |key: &str, ok: &dyn Fn(&serde_json::Value) -> bool, want: &str| match obj
            .get(key)
            .filter(|v| !v.is_null())
        {
            Some(v) if !ok(v) => Err(unsupported(format!("{key} {v} ({want} is implemented)"))),
            _ => Ok(()),
        };
        refuse("hidden_act", &|v| v == "silu", "silu/SwiGLU")?;
        refuse("attention_bias", &|v| v == false, "no bias")?;
        refuse("mlp_bias", &|v| v == false, "no bias")?;
        refuse(
            "attention_dropout",
            &|v| v.as_f64() == Some(0.0),
            "no dropout",
        )?;
        refuse("pretraining_tp", &|v| v.as_u64() == Some(1), "1")?;
        let (theta, scaling) = rope(obj, origin)?;
        let mut value = value;
        if let Some(o) = value.as_object_mut() {
            o.remove("rope_parameters");
            o.remove("rope_scaling");
            o.insert("rope_theta".into(), theta.into());
            if let Some(sc) = scaling {
                let v = serde_json::to_value(sc).map_err(syntax)?;
                o.insert("rope_scaling".into(), v);
            }
        }
        let cfg: LlamaConfig = serde_json::from_value(value).map_err(syntax)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The RoPE the model applies.
    pub fn rope(&self) -> kernels::Rope {
        let scaling = match self.rope_scaling {
            None => kernels::RopeScaling::None,
            Some(RopeScalingConfig::Linear { factor }) => kernels::RopeScaling::Linear { factor },
            Some(RopeScalingConfig::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => kernels::RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original_max_position_embeddings as f64,
            },
        };
        kernels::Rope {
            theta: self.rope_theta,
            scaling,
        }
    }

    /// Whether `other` describes the same computation (token ids aside).
    pub fn same_model(&self, other: &LlamaConfig) -> bool {
        // Defaults written out (`head_dim`, `num_key_value_heads`: config.json files that
        // hotspa writes state them) are the same model as left implicit.
        let strip = |c: &LlamaConfig| LlamaConfig {
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            head_dim: Some(c.head_dim()),
            num_key_value_heads: Some(c.kv_heads()),
            ..c.clone()
        };
        strip(self) == strip(other)
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
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        let ids = [
            ("bos_token_id", self.bos_token_id.map(|b| vec![b])),
            ("eos_token_id", self.eos_token_id.as_ref().map(|e| e.ids())),
            ("pad_token_id", self.pad_token_id.map(|p| vec![p])),
        ];
        for (name, ids) in ids {
            if let Some(id) = ids
                .into_iter()
                .flatten()
                .find(|&i| i as usize >= self.vocab_size)
            {
                return bad(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.initializer_range > 0.0 && self.initializer_range.is_finite()) {
            return bad(format!(
                "initializer_range {} must be positive",
                self.initializer_range
            ));
        }
        match self.rope_scaling {
            Some(RopeScalingConfig::Linear { factor }) if !(factor.is_finite() && factor > 0.0) => {
                bad(format!("rope_scaling factor {factor} must be positive"))
            }
            Some(RopeScalingConfig::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) if !(factor.is_finite()
                && factor > 0.0
                && low_freq_factor > 0.0
                && high_freq_factor > low_freq_factor
                && high_freq_factor.is_finite()
                && original_max_position_embeddings > 0) =>
            {
                bad(format!(
                    "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor \
                     and original_max_position_embeddings > 0 (got {factor}, {low_freq_factor}, \
                     {high_freq_factor}, {original_max_position_embeddings})"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// RoPE's base and scaling from an HF config object: transformers 5's `rope_parameters`, or the
/// top-level `rope_theta` and `rope_scaling` of earlier versions (both may be present when
/// they agree). Unimplemented `rope_type`s and unknown parameters are refused by name.
fn rope(
    obj: &serde_json::Map<String, serde_json::Value>,
    origin: &Path,
) -> Result<(f64, Option<RopeScalingConfig>)> {
    let unsupported = |m: String| ModelError::Unsupported(format!("{}: {m}", origin.display()));
    let syntax = |m: String| ModelError::ConfigSyntax {
        path: origin.to_path_buf(),
        reason: m,
    };
    let num = |o: &serde_json::Map<String, serde_json::Value>, k: &str, within: &str| {
        o.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| syntax(format!("{within}: \"{k}\" must be a number")))
    };
    let top = match obj.get("rope_theta").filter(|v| !v.is_null()) {
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| syntax("\"rope_theta\" must be a number".into()))?,
        ),
        None => None,
    };
    let params = obj
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_object()
                .ok_or_else(|| syntax("\"rope_parameters\" must be an object".into()))
        })
        .transpose()?;
    let legacy = obj
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_object()
                .ok_or_else(|| syntax("\"rope_scaling\" must be an object".into()))
        })
        .transpose()?;
    let theta = match (params.and_then(|p| p.get("rope_theta")), top) {
        (Some(t), top) => {
            let t = t
                .as_f64()
                .ok_or_else(|| syntax("rope_parameters: \"rope_theta\" must be a number".into()))?;
            if top.is_some_and(|top| top != t) {
                return Err(syntax(format!(
                    "rope_theta {} and rope_parameters.rope_theta {t} disagree",
                    top.unwrap_or(t)
                )));
            }
            t
        }
        (None, Some(t)) => t,
        (None, None) => default_theta(),
    };
    // The scaling: rope_parameters unless it is plain, else the legacy rope_scaling.
    let kind = |o: &serde_json::Map<String, serde_json::Value>| -> String {
        o.get("rope_type")
            .or_else(|| o.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string()
    };
    let (within, sc) = match (params, legacy) {
        (Some(p), _) if kind(p) != "default" => ("rope_parameters", Some(p)),
        (_, Some(l)) => ("rope_scaling", Some(l)),
        (Some(p), None) => ("rope_parameters", Some(p)),
        (None, None) => ("rope_parameters", None),
    };
    let Some(sc) = sc else {
        return Ok((theta, None));
    };
    let t = kind(sc);
    let allowed: &[&str] = match t.as_str() {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return Err(unsupported(format!(
                "{within}: rope_type \"{other}\" (default, linear and llama3 are implemented)"
            )))
        }
    };
    let extra: Vec<&str> = sc
        .keys()
        .map(String::as_str)
        .filter(|k| !["rope_type", "type", "rope_theta"].contains(k) && !allowed.contains(k))
        .collect();
    if !extra.is_empty() {
        return Err(unsupported(format!(
            "{within}: {} with rope_type \"{t}\" (not implemented)",
            extra.join(", ")
        )));
    }
    let scaling = match t.as_str() {
        "linear" => Some(RopeScalingConfig::Linear {
            factor: num(sc, "factor", within)?,
        }),
        "llama3" => Some(RopeScalingConfig::Llama3 {
            factor: num(sc, "factor", within)?,
            low_freq_factor: num(sc, "low_freq_factor", within)?,
            high_freq_factor: num(sc, "high_freq_factor", within)?,
            original_max_position_embeddings: sc
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    syntax(format!(
                        "{within}: \"original_max_position_embeddings\" must be a positive integer"
                    ))
                })? as usize,
        }),
        _ => None,
    };
    Ok((theta, scaling))
}
