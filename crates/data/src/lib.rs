//! Training data (DESIGN §4 `data`): a dataset of token sequences read from a JSONL file (each
//! line an object with `"input_ids"`, or `"text"` tokenized), a directory of text files (one
//! document each), a Megatron-LM indexed dataset or a Parquet file, cut into pieces of at most
//! `max_len` tokens; pieces shorter than 2 tokens are skipped and counted. Text goes through the
//! byte tokenizer or an HF `tokenizer.json` ([`TextTokenizer`], special tokens as HF adds them).
//! Global batches are taken in file order (wrapping) or in an order shuffled reproducibly from a
//! seed. [`Packing`] is the one policy that deals a batch to DP replicas and micro-batches.
//! A record's `labels`, `attention_mask`, `loss_mask` and `position_ids` are checked against its
//! tokens ([`fields`]): accepted where they say what hotspa trains anyway, refused otherwise.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("d.jsonl");
//! std::fs::write(&path, "{\"input_ids\": [1, 2, 3, 4, 5]}\n{\"text\": \"hi\"}\n{\"input_ids\": [7]}\n").unwrap();
//! let ds = data::Dataset::load(&path, 256, 3)?;
//! assert_eq!(ds.sequences(), &[vec![1, 2, 3], vec![4, 5], vec![104, 105]]);
//! assert_eq!(ds.skipped(), 1);
//! assert_eq!(ds.batch(1, 2, None), vec![vec![104, 105], vec![1, 2, 3]]); // wraps around
//! # Ok::<(), data::DataError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod dataset;
pub mod fields;
mod megatron;
pub mod packing;
mod parquet_file;
mod tokenizer;

use std::path::PathBuf;

pub use dataset::Dataset;
pub use packing::Packing;
pub use tokenizer::{byte_tokens, TextTokenizer, TOKENIZER_FILES};

use thiserror::Error;

/// What can be wrong with a data file.
#[derive(Debug, Error)]
pub enum DataError {
    /// The file or directory cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is not what the format requires.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A file is not what its format requires (Megatron indexed dataset, Parquet).
    #[error("{path}: not a valid {format}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it was read as.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer cannot be used.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// Its `tokenizer.json`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Nothing usable was found.
    #[error("{path}: no sequence of at least 2 tokens ({skipped} too short)")]
    Empty {
        /// The file or directory.
        path: PathBuf,
        /// Pieces skipped for being shorter than 2 tokens.
        skipped: usize,
    },
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, DataError>;
