//! Training data (DESIGN §4 `data`): a dataset of token sequences read from a JSONL file (each
//! line an object with `"input_ids"`, or `"text"` tokenized byte by byte) or from a directory of
//! text files (one document each), cut into pieces of at most `max_len` tokens; pieces shorter
//! than 2 tokens are skipped and counted. Global batches are taken in file order (wrapping) or in
//! an order shuffled reproducibly from a seed.
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

pub mod packing;

use std::path::{Path, PathBuf};

pub use packing::Packing;

use rand::seq::SliceRandom;
use rand::SeedableRng;
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

/// The byte tokenizer: every UTF-8 byte is a token id (vocabulary 256).
pub fn byte_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// How `text` records and text files become token ids.
pub enum TextTokenizer {
    /// Every UTF-8 byte is a token (vocabulary 256).
    Bytes,
    /// A Hugging Face `tokenizer.json`, through the `tokenizers` crate (no special tokens added).
    Hf(Box<tokenizers::Tokenizer>),
}

impl TextTokenizer {
    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| TextTokenizer::Hf(Box::new(t)))
            .map_err(|e| DataError::Line {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("not a usable tokenizer.json: {e}"),
            })
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        match self {
            TextTokenizer::Bytes => Ok(byte_tokens(text)),
            TextTokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| format!("tokenizer failed: {e}")),
        }
    }

    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Bytes => 256,
            TextTokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }
}

/// Token sequences ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    seqs: Vec<Vec<u32>>,
    skipped: usize,
}

impl Dataset {
    /// Reads `path` (a `.jsonl` file or a directory of text files). Ids must be below `vocab`;
    /// documents longer than `max_len` are cut into consecutive pieces of `max_len`.
    pub fn load(path: &Path, vocab: usize, max_len: usize) -> Result<Self> {
        Self::load_with(path, vocab, max_len, &TextTokenizer::Bytes)
    }

    /// Like [`Dataset::load`], tokenizing `text` records and text files with `tokenizer`.
    pub fn load_with(
        path: &Path,
        vocab: usize,
        max_len: usize,
        tokenizer: &TextTokenizer,
    ) -> Result<Self> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut docs: Vec<Vec<u32>> = Vec::new();
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for f in files {
                let bytes = std::fs::read(&f).map_err(|source| DataError::Io {
                    path: f.clone(),
                    source,
                })?;
                docs.push(bytes.into_iter().map(u32::from).collect());
            }
            if vocab < 256 {
                return Err(DataError::Line {
                    path: path.to_path_buf(),
                    line: 0,
                    reason: format!(
                        "text is byte-tokenized (256 ids) but the model's vocabulary is {vocab}"
                    ),
                });
            }
        } else {
            let text = std::fs::read_to_string(path).map_err(io)?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                docs.push(parse_line(path, i + 1, line, vocab, tokenizer)?);
            }
        }
        Self::from_docs(docs, max_len, path)
    }

    /// Text files, one document each, byte-tokenized, in the order given.
    pub fn from_text_files(files: &[PathBuf], max_len: usize) -> Result<Self> {
        let mut docs = Vec::with_capacity(files.len());
        for f in files {
            let bytes = std::fs::read(f).map_err(|source| DataError::Io {
                path: f.clone(),
                source,
            })?;
            docs.push(bytes.into_iter().map(u32::from).collect());
        }
        Self::from_docs(docs, max_len, Path::new("(file list)"))
    }

    /// Token sequences given in memory, one document each, checked against `vocab` and cut
    /// like a file's.
    pub fn from_sequences(docs: &[Vec<u32>], vocab: usize, max_len: usize) -> Result<Self> {
        let origin = Path::new("(sequences in memory)");
        for (i, d) in docs.iter().enumerate() {
            if let Some(k) = d.iter().position(|&id| id as usize >= vocab) {
                return Err(DataError::Line {
                    path: origin.to_path_buf(),
                    line: i + 1,
                    reason: format!("token {k} = {} is outside the vocabulary of {vocab}", d[k]),
                });
            }
        }
        Self::from_docs(docs.to_vec(), max_len, origin)
    }

    fn from_docs(docs: Vec<Vec<u32>>, max_len: usize, origin: &Path) -> Result<Self> {
        let max_len = max_len.max(2);
        let mut seqs = Vec::new();
        let mut skipped = 0;
        for d in docs {
            for piece in d.chunks(max_len) {
                if piece.len() < 2 {
                    skipped += 1;
                } else {
                    seqs.push(piece.to_vec());
                }
            }
        }
        if seqs.is_empty() {
            return Err(DataError::Empty {
                path: origin.to_path_buf(),
                skipped,
            });
        }
        Ok(Self { seqs, skipped })
    }

    /// The sequences, in file order.
    pub fn sequences(&self) -> &[Vec<u32>] {
        &self.seqs
    }

    /// Pieces skipped for being shorter than 2 tokens.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The `size` records of global batch `step`: records `step·size …` of the order, wrapping at
    /// the end. The order is the file order, or (with `shuffle_seed`) a permutation drawn from it
    /// anew for every pass over the data.
    pub fn batch(&self, step: usize, size: usize, shuffle_seed: Option<u64>) -> Vec<Vec<u32>> {
        let n = self.seqs.len();
        (step * size..(step + 1) * size)
            .map(|r| {
                let (epoch, pos) = (r / n, r % n);
                let idx = match shuffle_seed {
                    None => pos,
                    Some(seed) => permutation(n, seed, epoch as u64)[pos],
                };
                self.seqs[idx].clone()
            })
            .collect()
    }
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

fn parse_line(
    path: &Path,
    line: usize,
    text: &str,
    vocab: usize,
    tokenizer: &TextTokenizer,
) -> Result<Vec<u32>> {
    let bad = |reason: String| DataError::Line {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    if let Some(ids) = v.get("input_ids") {
        let arr = ids
            .as_array()
            .ok_or_else(|| bad("\"input_ids\" is not an array".into()))?;
        arr.iter()
            .enumerate()
            .map(|(k, x)| {
                let id = x.as_u64().ok_or_else(|| {
                    bad(format!(
                        "input_ids[{k}] = {x} is not a non-negative integer"
                    ))
                })?;
                if id as usize >= vocab {
                    return Err(bad(format!(
                        "input_ids[{k}] = {id} is outside the vocabulary of {vocab}"
                    )));
                }
                Ok(id as u32)
            })
            .collect()
    } else if let Some(t) = v.get("text") {
        let t = t
            .as_str()
            .ok_or_else(|| bad("\"text\" is not a string".into()))?;
        let ids = tokenizer.encode(t).map_err(bad)?;
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(bad(match tokenizer {
                TextTokenizer::Bytes => format!(
                    "text is byte-tokenized (256 ids) but the model's vocabulary is {vocab}"
                ),
                TextTokenizer::Hf(_) => {
                    format!("token id {id} of the tokenizer is outside the model's vocabulary of {vocab}")
                }
            }));
        }
        Ok(ids)
    } else {
        Err(bad(
            "the object has neither \"input_ids\" nor \"text\"".into()
        ))
    }
}
