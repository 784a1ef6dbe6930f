//! A model folder's `generation_config.json` as transformers' `generate()` reads it: whether to
//! sample and how (`do_sample`, `temperature`, `top_k`, `top_p`), when to stop (`eos_token_id`,
//! one id or a list; `max_new_tokens`, `max_length`), over transformers' own defaults (greedy;
//! when sampling, temperature 1, top-k 50, top-p 1). Fields that change the tokens and are not
//! implemented here (a repetition penalty, beam search, forced or suppressed tokens, …) are
//! refused by name unless they hold transformers' neutral value; fields that do not change the
//! tokens (caching, outputs, speculative decoding's helpers) are accepted; unknown fields are
//! refused.
//!
//! ```
//! use model::generation_config::GenerationConfig;
//! let g = GenerationConfig::from_json(
//!     r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7],
//!         "transformers_version": "5.24.0"}"#,
//!     std::path::Path::new("generation_config.json"),
//! )?;
//! assert!(g.do_sample);
//! assert_eq!((g.temperature, g.top_k, g.top_p), (0.6, 50, 0.9)); // top-k: transformers' 50
//! assert_eq!(g.eos, Some(vec![2, 7]));
//! # Ok::<(), model::ModelError>(())
//! ```

use std::path::Path;

use serde_json::Value;

use crate::config::TokenIds;
use crate::error::{ModelError, Result};

/// What `generate()` would do by a folder's `generation_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Sample (`true`) or take the most likely token (transformers' default: `false`).
    pub do_sample: bool,
    /// Sampling temperature (default 1).
    pub temperature: f64,
    /// Sample among the k most likely tokens (default 50; 0: all).
    pub top_k: usize,
    /// Nucleus sampling's probability mass (default 1: all).
    pub top_p: f64,
    /// The ids that end generation, when the file names them (else the model config's).
    pub eos: Option<Vec<u32>>,
    /// Most new tokens, when the file says.
    pub max_new_tokens: Option<usize>,
    /// Most tokens, prompt included, when the file says.
    pub max_length: Option<usize>,
}

impl Default for GenerationConfig {
    /// transformers' defaults: greedy; when sampling, temperature 1, top-k 50, top-p 1.
    fn default() -> Self {
        GenerationConfig {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            eos: None,
            max_new_tokens: None,
            max_length: None,
        }
    }
}

/// Fields that do not change which tokens come out.
const HARMLESS: [&str; 27] = [
    "_from_model_config",
    "transformers_version",
    "bos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "compile_config",
    "disable_compile",
    "prefill_chunk_size",
    "low_memory",
    "max_time",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "is_assistant",
    // Beam search's alone (refused below unless num_beams is 1).
    "length_penalty",
    "early_stopping",
];

/// Fields that change the tokens, not implemented: each with the value that leaves generation
/// as it is (`Null`: absent or null only).
fn neutral(name: &str) -> Option<Value> {
    let v = match name {
        "repetition_penalty"
        | "encoder_repetition_penalty"
        | "typical_p"
        | "num_beams"
        | "num_beam_groups"
        | "num_return_sequences"
        | "guidance_scale" => Value::from(1.0),
        "no_repeat_ngram_size"
        | "encoder_no_repeat_ngram_size"
        | "min_length"
        | "min_new_tokens"
        | "epsilon_cutoff"
        | "eta_cutoff"
        | "diversity_penalty" => Value::from(0.0),
        "remove_invalid_values" | "renormalize_logits" | "token_healing" => Value::Bool(false),
        "bad_words_ids"
        | "force_words_ids"
        | "constraints"
        | "suppress_tokens"
        | "begin_suppress_tokens"
        | "forced_bos_token_id"
        | "forced_eos_token_id"
        | "exponential_decay_length_penalty"
        | "sequence_bias"
        | "min_p"
        | "top_h"
        | "penalty_alpha"
        | "dola_layers"
        | "stop_strings"
        | "watermarking_config"
        | "prompt_lookup_num_tokens"
        | "max_matching_ngram_size"
        | "assistant_early_exit"
        | "speculation_type"
        | "use_mtp"
        | "continuous_batching_config" => Value::Null,
        _ => return None,
    };
    Some(v)
}

/// Whether `v` is the neutral value `n` (numbers compared as numbers; `Null` also matches an
/// empty list and `false`).
fn is_neutral(v: &Value, n: &Value) -> bool {
    match (v, n) {
        (Value::Null, _) => true,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Null) => a.is_empty(),
        (Value::Bool(false), Value::Null) => true,
        (a, b) => a == b,
    }
}

impl GenerationConfig {
    /// `DIR/generation_config.json` when the folder has one, else `None` (transformers'
    /// defaults apply).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path).map(Some)
    }

    /// Parses a `generation_config.json`'s text (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::GenerationConfig {
            path: path.to_path_buf(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let mut g = GenerationConfig::default();
        let number = |k: &str, x: &Value| {
            x.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(format!("`{k}` = {x} is not a number")))
        };
        let count = |k: &str, x: &Value| {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("`{k}` = {x} is not a non-negative integer")))
        };
        for (k, x) in obj {
            if x.is_null() {
                continue;
            }
            match k.as_str() {
                "do_sample" => {
                    g.do_sample = x
                        .as_bool()
                        .ok_or_else(|| bad(format!("`do_sample` = {x} is not true or false")))?
                }
                "temperature" => g.temperature = number(k, x)?,
                "top_k" => g.top_k = count(k, x)?,
                "top_p" => g.top_p = number(k, x)?,
                "max_new_tokens" => g.max_new_tokens = Some(count(k, x)?),
                "max_length" => g.max_length = Some(count(k, x)?),
                "eos_token_id" => {
                    let ids: TokenIds = serde_json::from_value(x.clone())
                        .map_err(|_| bad(format!("`eos_token_id` = {x} is not an id or a list")))?;
                    g.eos = Some(ids.ids());
                }
                k if HARMLESS.contains(&k) => {}
                k => match neutral(k) {
                    Some(n) if is_neutral(x, &n) => {}
                    Some(n) => {
                        return Err(ModelError::GenerationConfig {
                            path: path.to_path_buf(),
                            reason: format!(
                                "`{k}` = {x} changes the generated tokens and is not \
                                 implemented (only {} is); remove it, or pass \
                                 --generation-config none to use transformers' defaults",
                                if n.is_null() {
                                    "null".to_string()
                                } else {
                                    n.to_string()
                                }
                            ),
                        })
                    }
                    None => {
                        return Err(ModelError::GenerationConfig {
                            path: path.to_path_buf(),
                            reason: format!(
                                "unknown field `{k}`; remove it, or pass --generation-config \
                                 none to use transformers' defaults"
                            ),
                        })
                    }
                },
            }
        }
        if g.do_sample && g.temperature <= 0.0 {
            return Err(bad(format!(
                "`do_sample` with `temperature` = {}: sampling needs a temperature above 0",
                g.temperature
            )));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(bad(format!("`top_p` = {} is not in (0, 1]", g.top_p)));
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GenerationConfig> {
        GenerationConfig::from_json(text, Path::new("g.json"))
    }

    #[test]
    fn transformers_defaults_fill_what_the_file_leaves_out() {
        let g =
            parse(r#"{"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
        assert_eq!(
            g,
            GenerationConfig {
                eos: Some(vec![2]),
                ..GenerationConfig::default()
            }
        );
        let g =
            parse(r#"{"do_sample": true, "top_k": 0, "max_new_tokens": 9, "max_length": null}"#)
                .unwrap();
        assert!(
            g.do_sample && g.top_k == 0 && g.max_new_tokens == Some(9) && g.max_length.is_none()
        );
    }

    #[test]
    fn fields_that_change_the_tokens_are_refused_unless_neutral() {
        for ok in [
            r#"{"repetition_penalty": 1.0}"#,
            r#"{"num_beams": 1, "length_penalty": 2.0}"#,
            r#"{"suppress_tokens": []}"#,
            r#"{"min_p": null, "renormalize_logits": false}"#,
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for (bad, needle) in [
            (
                r#"{"repetition_penalty": 1.1}"#,
                "`repetition_penalty` = 1.1 changes",
            ),
            (r#"{"num_beams": 4}"#, "`num_beams` = 4 changes"),
            (
                r#"{"suppress_tokens": [5]}"#,
                "`suppress_tokens` = [5] changes",
            ),
            (r#"{"min_p": 0.05}"#, "`min_p` = 0.05 changes"),
            (r#"{"my_sampler": 3}"#, "unknown field `my_sampler`"),
            (
                r#"{"top_k": -1}"#,
                "`top_k` = -1 is not a non-negative integer",
            ),
            (
                r#"{"do_sample": true, "temperature": 0}"#,
                "needs a temperature above 0",
            ),
            (r#"{"top_p": 1.5}"#, "`top_p` = 1.5 is not in (0, 1]"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
