//! How text becomes token ids: one id per byte, or a Hugging Face `tokenizer.json` through the
//! `tokenizers` crate, adding special tokens exactly as HF's `tokenizer(text)` does by default
//! (its post-processor: `<s>` first for LLaMA), optionally an end-of-sequence id after every
//! document.

use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// The `tokenizer_class` of the `tokenizer_config.json` beside `file`, if it names one.
fn tokenizer_class(file: &Path) -> std::result::Result<Option<String>, String> {
    let Some(cfg) = tokenizer_config(file)? else {
        return Ok(None);
    };
    Ok(cfg
        .get("tokenizer_class")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string))
}

/// The `tokenizer_config.json` beside `file`, if there is one.
fn tokenizer_config(file: &Path) -> std::result::Result<Option<serde_json::Value>, String> {
    let Some(path) = file.parent().map(|d| d.join("tokenizer_config.json")) else {
        return Ok(None);
    };
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{}: malformed JSON: {e}", path.display()))
}

/// `tokenizer.json`'s text as transformers 5's `LlamaTokenizer` uses it: its vocabulary,
/// merges, added tokens and post-processor, in the class's own pipeline — no normalizer, a
/// Metaspace pre-tokenizer (`▁`, not split) prepending `▁` to the first piece (`legacy` false,
/// the default), to every piece (`legacy` true) or never (`add_prefix_space` false), BPE with
/// byte fallback, fused unknowns and no unknown token, and the matching decoder.
fn llama_pipeline(text: &str, file: &Path) -> std::result::Result<String, String> {
    use serde_json::{json, Value};
    let cfg = tokenizer_config(file)?.unwrap_or(Value::Null);
    let flag = |k: &str, default: bool| cfg.get(k).and_then(Value::as_bool).unwrap_or(default);
    let prefix = flag("add_prefix_space", true);
    let scheme = match (prefix, flag("legacy", false)) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    let mut v: Value =
        serde_json::from_str(text).map_err(|e| format!("not a usable tokenizer.json: {e}"))?;
    let model = v
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or("not a usable tokenizer.json: no model")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(format!(
            "tokenizer_class LlamaTokenizer needs a BPE model (transformers builds one from the \
             vocabulary and merges); this one is {}",
            model.get("type").unwrap_or(&Value::Null)
        ));
    }
    for (k, x) in [
        ("dropout", Value::Null),
        ("unk_token", Value::Null),
        ("continuing_subword_prefix", Value::Null),
        ("end_of_word_suffix", Value::Null),
        ("fuse_unk", Value::Bool(true)),
        ("byte_fallback", Value::Bool(true)),
        ("ignore_merges", Value::Bool(false)),
    ] {
        model.insert(k.into(), x);
    }
    v["normalizer"] = Value::Null;
    v["pre_tokenizer"] =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    v["decoder"] = json!({"type": "Sequence", "decoders": decoders});
    Ok(v.to_string())
}

/// The byte tokenizer: every UTF-8 byte is a token id (vocabulary 256).
pub fn byte_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

enum Kind {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// How `text` records and text files become token ids.
pub struct TextTokenizer {
    kind: Kind,
    /// Where the tokenizer was read (its folder's files travel with saved models).
    source: Option<PathBuf>,
    /// Appended after every document.
    eos: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            None => write!(f, "TextTokenizer(bytes)"),
            Some(p) => write!(f, "TextTokenizer({})", p.display()),
        }
    }
}

/// The files of an HF tokenizer's folder that a saved model folder carries along.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

impl TextTokenizer {
    /// One token per byte.
    pub fn bytes() -> Self {
        Self {
            kind: Kind::Bytes,
            source: None,
            eos: None,
        }
    }

    /// An HF tokenizer: a `tokenizer.json`, or a folder holding one.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bad = |reason: String| DataError::Tokenizer {
            path: file.clone(),
            reason,
        };
        if !file.is_file() {
            return Err(bad("no such file".into()));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?;
        let text = match tokenizer_class(&file).map_err(&bad)?.as_deref() {
            None | Some("TokenizersBackend" | "PreTrainedTokenizerFast") => text,
            Some("LlamaTokenizer" | "LlamaTokenizerFast") => {
                llama_pipeline(&text, &file).map_err(&bad)?
            }
            Some(other) => {
                return Err(bad(format!(
                    "tokenizer_config.json names tokenizer_class `{other}`, which transformers \
                     builds from its own definition rather than from tokenizer.json; hotspa \
                     reproduces LlamaTokenizer and tokenizer.json as it is \
                     (PreTrainedTokenizerFast): set tokenizer_class to one of those if that is \
                     the tokenization meant"
                )))
            }
        };
        let mut t = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text)
            .map_err(|e| bad(format!("not a usable tokenizer.json: {e}")))?;
        // A tokenizer.json saved with truncation or padding on keeps them, and the tokenizers
        // library applies them to every encode; transformers' `tokenizer(text)` turns both off
        // unless asked, so documents are neither cut nor padded here either.
        t.with_truncation(None)
            .map_err(|e| bad(format!("turning truncation off: {e}")))?;
        t.with_padding(None);
        Ok(Self {
            kind: Kind::Hf(Box::new(t)),
            source: Some(file),
            eos: None,
        })
    }

    /// The same tokenizer appending `eos` after every document.
    pub fn with_eos(mut self, eos: u32) -> Self {
        self.eos = Some(eos);
        self
    }

    /// Whether this is the byte tokenizer.
    pub fn is_bytes(&self) -> bool {
        matches!(self.kind, Kind::Bytes)
    }

    /// The `tokenizer.json` read, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The files of the tokenizer's folder that a saved model carries ([`TOKENIZER_FILES`]
    /// present beside its `tokenizer.json`).
    pub fn files(&self) -> Vec<PathBuf> {
        let Some(dir) = self.source.as_ref().and_then(|s| s.parent()) else {
            return Vec::new();
        };
        TOKENIZER_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect()
    }

    /// Token ids of one document, special tokens added as HF's `tokenizer(text)` adds them,
    /// then the end-of-sequence id if asked for.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let mut ids = match &self.kind {
            Kind::Bytes => byte_tokens(text),
            Kind::Hf(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| format!("tokenizer failed: {e}"))?,
        };
        ids.extend(self.eos);
        Ok(ids)
    }

    /// Token ids of `bytes` (a text file): any bytes for the byte tokenizer, UTF-8 for an HF
    /// tokenizer.
    pub fn encode_bytes(&self, bytes: &[u8]) -> std::result::Result<Vec<u32>, String> {
        match &self.kind {
            Kind::Bytes => {
                let mut ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
                ids.extend(self.eos);
                Ok(ids)
            }
            Kind::Hf(_) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| format!("not UTF-8 text ({e}); the tokenizer needs text"))?;
                self.encode(text)
            }
        }
    }

    /// Text of `ids` (special tokens skipped; bytes decoded as UTF-8, invalid ones replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.kind {
            Kind::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Kind::Hf(t) => t.decode(ids, true).unwrap_or_default(),
        }
    }

    /// The id of a token, e.g. `</s>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Bytes => None,
            Kind::Hf(t) => t.token_to_id(token),
        }
    }

    /// The end-of-sequence id the tokenizer's folder names (`tokenizer_config.json`'s
    /// `eos_token`), if any.
    pub fn eos_id(&self) -> Option<u32> {
        let dir = self.source.as_ref()?.parent()?;
        let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let eos = &v["eos_token"];
        let name = eos.as_str().or_else(|| eos["content"].as_str())?;
        self.token_id(name)
    }

    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Bytes => 256,
            Kind::Hf(t) => t.get_vocab_size(true),
        }
    }
}
