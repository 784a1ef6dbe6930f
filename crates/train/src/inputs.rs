//! The run's inputs as it reads them: the tokenizer (bytes or an HF `tokenizer.json`) and the
//! datasets, cut to the run's `max_len`.

use data::{Dataset, TextTokenizer};

use crate::config::{DataSource, Tokenizer, TrainConfig};
use crate::error::{Result, TrainError};

/// The run's tokenizer: bytes or an HF `tokenizer.json` (its vocabulary checked against the
/// model's), appending the end-of-sequence id after every document when asked.
pub fn tokenizer(cfg: &TrainConfig) -> Result<TextTokenizer> {
    let t = match &cfg.tokenizer {
        Tokenizer::Bytes => TextTokenizer::bytes(),
        Tokenizer::File(p) => {
            let t = TextTokenizer::from_path(p)?;
            if t.vocab_size() > cfg.model.vocab_size {
                return Err(TrainError::setting(
                    "tokenizer",
                    format!(
                        "{} has {} ids but the model's vocabulary is {}; use the model's own tokenizer",
                        t.source().unwrap_or(p).display(),
                        t.vocab_size(),
                        cfg.model.vocab_size
                    ),
                ));
            }
            t
        }
    };
    if !cfg.append_eos {
        return Ok(t);
    }
    let eos = cfg
        .model
        .eos_token_id
        .as_ref()
        .and_then(|e| e.ids().first().copied())
        .or_else(|| t.eos_id())
        .ok_or_else(|| {
            TrainError::setting(
                "append_eos",
                "no end-of-sequence id: the model config has no eos_token_id and the tokenizer \
                 names no eos_token",
            )
        })?;
    Ok(t.with_eos(eos))
}

/// The run's dataset: its files (or sequences) tokenized and cut to the run's `max_len`.
pub fn load_data(cfg: &TrainConfig) -> Result<Dataset> {
    load(cfg, &cfg.data)
}

/// `source` read as the run reads its data (the held-out set of `eval_data` too).
pub fn load(cfg: &TrainConfig, source: &DataSource) -> Result<Dataset> {
    let max_len = cfg.max_len();
    let vocab = cfg.model.vocab_size;
    Ok(match source {
        DataSource::Files(files) => {
            Dataset::from_text_files(files, vocab, max_len, &tokenizer(cfg)?)?
        }
        DataSource::Paragraphs(files) => {
            Dataset::from_paragraphs(files, vocab, max_len, &tokenizer(cfg)?)?
        }
        DataSource::Path(path) => Dataset::load_with(path, vocab, max_len, &tokenizer(cfg)?)?,
        DataSource::Sequences(seqs) => Dataset::from_sequences(seqs, vocab, max_len)?,
    })
}
