//! A dataset of token sequences from any of the formats users bring, cut to a maximum length,
//! and its global batches in file order or a reproducible shuffle.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::fields;
use crate::tokenizer::TextTokenizer;
use crate::{DataError, Result};

/// Token sequences ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    seqs: Vec<Vec<u32>>,
    /// Every sequence's source (see [`Dataset::sources`]).
    sources: Vec<u32>,
    skipped: usize,
}

impl Dataset {
    /// The SHA-256 of the token sequences, in order (each as its length and its ids, little
    /// endian): the same for the same training data whatever file, path or format it came
    /// from, different when the data, the tokenizer or the cutting changes it.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in &self.seqs {
            h.update((s.len() as u64).to_le_bytes());
            for t in s {
                h.update(t.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())
    }

    /// Reads `path`: a directory of text files (one document each), a Megatron-LM indexed
    /// dataset (`PREFIX.idx`/`PREFIX.bin`, named by either or the prefix), a `.parquet` file
    /// (a `text` or `input_ids` column), or a JSONL file (`input_ids` or `text` per line). Ids
    /// must be below `vocab`; documents longer than `max_len` are cut into consecutive pieces of
    /// `max_len`.
    pub fn load(path: &Path, vocab: usize, max_len: usize) -> Result<Self> {
        Self::load_with(path, vocab, max_len, &TextTokenizer::bytes())
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
            // Hidden files (`.DS_Store`, editor swap files) are not documents.
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            files.sort();
            for f in files {
                if let Some(ext) = structured(&f) {
                    return Err(DataError::Format {
                        path: f.clone(),
                        format: "text document",
                        reason: format!(
                            "a --data folder is read as text files, one document each, and a \
                             .{ext} file is not one (its syntax would train as text); pass the \
                             file itself, or move it out of the folder"
                        ),
                    });
                }
                docs.push(text_file(&f, vocab, tokenizer)?);
            }
        } else if let Some((idx, bin)) = crate::megatron::files(path) {
            docs = crate::megatron::read(&idx, &bin, vocab)?;
        } else if let Some(missing) = crate::megatron::missing_half(path) {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                format: "Megatron indexed dataset",
                reason: format!(
                    "its other half, {}, is missing: a Megatron dataset is a PREFIX.idx and a \
                     PREFIX.bin side by side (preprocess_data.py writes both)",
                    missing.display()
                ),
            });
        } else if path.extension().is_some_and(|e| e == "parquet") {
            docs = crate::parquet_file::read(path, vocab, tokenizer)?;
        } else {
            let bytes = std::fs::read(path).map_err(io)?;
            if let Some(kind) = compressed(&bytes) {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    format: "JSON Lines file",
                    reason: format!("it is {kind}-compressed; decompress it first"),
                });
            }
            let text = String::from_utf8(bytes).map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                format: "JSON Lines file",
                reason: format!("not UTF-8 text ({e})"),
            })?;
            // A byte-order mark (Windows editors write one) is encoding, not data.
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            if !json_by_name_or_content(path, text) {
                // Neither named nor looking like JSON: one text document, as one file of a
                // folder would be.
                docs.push(text_file(path, vocab, tokenizer)?);
            } else if text.trim_start().starts_with('[') {
                // One JSON array of records, which HF `datasets` reads as JSON too.
                let records: Vec<serde_json::Value> =
                    serde_json::from_str(text).map_err(|e| DataError::Line {
                        path: path.to_path_buf(),
                        line: e.line(),
                        reason: format!("malformed JSON array of records: {e}"),
                    })?;
                for (k, r) in records.into_iter().enumerate() {
                    let at = format!("record {} of the array", k + 1);
                    docs.push(parse_record(path, 1, &at, r, vocab, tokenizer)?);
                }
            } else {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v = serde_json::from_str(line).map_err(|e| DataError::Line {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason: format!("malformed JSON: {e}"),
                    })?;
                    docs.push(parse_record(path, i + 1, "", v, vocab, tokenizer)?);
                }
            }
        }
        Self::from_docs(docs, max_len, path)
    }

    /// Text files, one document each, in the order given, tokenized by `tokenizer`.
    pub fn from_text_files(
        files: &[PathBuf],
        vocab: usize,
        max_len: usize,
        tokenizer: &TextTokenizer,
    ) -> Result<Self> {
        let mut docs = Vec::with_capacity(files.len());
        for f in files {
            docs.push(text_file(f, vocab, tokenizer)?);
        }
        Self::from_docs(docs, max_len, Path::new("(file list)"))
    }

    /// Text files split at blank lines (`\n\n`), every paragraph a document, tokenized by
    /// `tokenizer`: a corpus of short and long documents from the same files.
    pub fn from_paragraphs(
        files: &[PathBuf],
        vocab: usize,
        max_len: usize,
        tokenizer: &TextTokenizer,
    ) -> Result<Self> {
        let mut docs = Vec::new();
        let mut sources = Vec::new();
        for (file, f) in files.iter().enumerate() {
            let bytes = read(f)?;
            for para in bytes
                .split_inclusive(|&b| b == b'\n')
                .collect::<Vec<_>>()
                .split(|l| *l == b"\n")
            {
                let text: Vec<u8> = para.concat();
                if text.is_empty() {
                    continue;
                }
                docs.push(encode(f, &text, vocab, tokenizer)?);
                sources.push(file as u32);
            }
        }
        Self::from_sourced_docs(
            docs,
            sources,
            max_len,
            Path::new("(paragraphs of a file list)"),
        )
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

    /// Documents, each its own source.
    fn from_docs(docs: Vec<Vec<u32>>, max_len: usize, origin: &Path) -> Result<Self> {
        let sources = (0..docs.len() as u32).collect();
        Self::from_sourced_docs(docs, sources, max_len, origin)
    }

    fn from_sourced_docs(
        docs: Vec<Vec<u32>>,
        doc_sources: Vec<u32>,
        max_len: usize,
        origin: &Path,
    ) -> Result<Self> {
        let max_len = max_len.max(2);
        let mut seqs = Vec::new();
        let mut sources = Vec::new();
        let mut skipped = 0;
        for (d, src) in docs.into_iter().zip(doc_sources) {
            for piece in d.chunks(max_len) {
                if piece.len() < 2 {
                    skipped += 1;
                } else {
                    seqs.push(piece.to_vec());
                    sources.push(src);
                }
            }
        }
        if seqs.is_empty() {
            return Err(DataError::Empty {
                path: origin.to_path_buf(),
                skipped,
            });
        }
        Ok(Self {
            seqs,
            sources,
            skipped,
        })
    }

    /// Where every sequence came from, as a number that orders the sources: its file (a
    /// directory of text files, a file list, paragraphs of files) or its document (a JSONL,
    /// Parquet or Megatron file, sequences in memory). Pieces of one long document share it.
    pub fn sources(&self) -> &[u32] {
        &self.sources
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
        // One permutation per pass over the data that the batch touches (at most a few).
        let mut order: Option<(usize, Vec<usize>)> = None;
        (step * size..(step + 1) * size)
            .map(|r| {
                let (epoch, pos) = (r / n, r % n);
                let idx = match shuffle_seed {
                    None => pos,
                    Some(seed) => {
                        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                            order = Some((epoch, permutation(n, seed, epoch as u64)));
                        }
                        order.as_ref().map_or(pos, |(_, o)| o[pos])
                    }
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

/// The extension of a file that holds records or weights rather than a text document.
fn structured(f: &Path) -> Option<String> {
    const KINDS: [&str; 13] = [
        "jsonl",
        "json",
        "parquet",
        "idx",
        "bin",
        "safetensors",
        "gz",
        "zst",
        "bz2",
        "xz",
        "zip",
        "tar",
        "arrow",
    ];
    let ext = f.extension()?.to_string_lossy().to_lowercase();
    KINDS.contains(&ext.as_str()).then_some(ext)
}

/// The compression a file's first bytes say it has, if any.
fn compressed(bytes: &[u8]) -> Option<&'static str> {
    const MAGIC: [(&[u8], &str); 4] = [
        (&[0x1f, 0x8b], "gzip"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (b"BZh", "bzip2"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
    ];
    MAGIC
        .iter()
        .find(|(m, _)| bytes.starts_with(m))
        .map(|(_, k)| *k)
}

/// One record (a JSON object) as token ids; `at` says where it is beside `line` (e.g. its place
/// in a JSON array).
fn parse_record(
    path: &Path,
    line: usize,
    at: &str,
    v: serde_json::Value,
    vocab: usize,
    tokenizer: &TextTokenizer,
) -> Result<Vec<u32>> {
    let bad = |reason: String| DataError::Line {
        path: path.to_path_buf(),
        line,
        reason: if at.is_empty() {
            reason
        } else {
            format!("{at}: {reason}")
        },
    };
    if !v.is_object() {
        return Err(bad(format!(
            "a record must be a JSON object with \"input_ids\" or \"text\", not {}",
            match &v {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                _ => "that",
            }
        )));
    }
    let ids = if let Some(ids) = v.get("input_ids") {
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
            .collect::<Result<Vec<u32>>>()?
    } else if let Some(t) = v.get("text") {
        let t = t
            .as_str()
            .ok_or_else(|| bad("\"text\" is not a string".into()))?;
        let ids = tokenizer.encode(t).map_err(bad)?;
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(bad(out_of_vocab(tokenizer, id, vocab)));
        }
        ids
    } else {
        return Err(bad(
            "the object has neither \"input_ids\" nor \"text\"".into()
        ));
    };
    for name in fields::CHECKED_FIELDS {
        let Some(field) = v.get(name).filter(|f| !f.is_null()) else {
            continue;
        };
        let values = field
            .as_array()
            .ok_or_else(|| bad(format!("`{name}` is not an array")))?
            .iter()
            .enumerate()
            .map(|(k, x)| {
                x.as_i64()
                    .map(i128::from)
                    .ok_or_else(|| bad(format!("`{name}[{k}]` = {x} is not an integer")))
            })
            .collect::<Result<Vec<i128>>>()?;
        fields::check(name, &values, &ids).map_err(bad)?;
    }
    Ok(ids)
}

/// Why token `id` of `tokenizer` cannot be used with a vocabulary of `vocab`.
fn out_of_vocab(tokenizer: &TextTokenizer, id: u32, vocab: usize) -> String {
    if tokenizer.is_bytes() {
        format!("text is byte-tokenized (256 ids) but the model's vocabulary is {vocab}")
    } else {
        format!("token id {id} of the tokenizer is outside the model's vocabulary of {vocab}")
    }
}

/// A text file as one document.
/// Whether a single `--data` file is read as JSON (Lines, or one array of records): by its
/// name (`.jsonl`, `.json`, `.ndjson`), else by its content — its first non-blank line a JSON
/// object, or the whole text a JSON array. Anything else is a text document.
fn json_by_name_or_content(path: &Path, text: &str) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if matches!(ext.as_str(), "jsonl" | "json" | "ndjson") {
        return true;
    }
    let t = text.trim_start();
    if t.starts_with('[') {
        return serde_json::from_str::<Vec<serde_json::Value>>(t).is_ok();
    }
    t.lines().next().is_some_and(|l| {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).is_ok()
    })
}

fn text_file(f: &Path, vocab: usize, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    encode(f, &read(f)?, vocab, tokenizer)
}

/// The bytes of `f`, or an error naming it.
fn read(f: &Path) -> Result<Vec<u8>> {
    std::fs::read(f).map_err(|source| DataError::Io {
        path: f.to_path_buf(),
        source,
    })
}

/// `text` (from `f`) in tokens, every id inside the model's `vocab`; errors name `f`.
fn encode(f: &Path, text: &[u8], vocab: usize, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    let bad = |reason: String| DataError::Line {
        path: f.to_path_buf(),
        line: 0,
        reason,
    };
    let ids = tokenizer.encode_bytes(text).map_err(bad)?;
    if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(bad(out_of_vocab(tokenizer, id, vocab)));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sequence_knows_its_file_or_document() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "abcdefghij").unwrap();
        std::fs::write(dir.path().join("b.txt"), "xyz").unwrap();
        // A directory: a file is a source; its pieces share it.
        let d = Dataset::load(dir.path(), 256, 4).unwrap();
        assert_eq!(d.sequences().len(), 4);
        assert_eq!(d.sources(), &[0, 0, 0, 1]);
        // Paragraphs: their file.
        std::fs::write(dir.path().join("a.txt"), "ab\n\ncd\n\nef").unwrap();
        let files = [dir.path().join("a.txt"), dir.path().join("b.txt")];
        let p = Dataset::from_paragraphs(&files, 256, 64, &TextTokenizer::bytes()).unwrap();
        assert_eq!(p.sources(), &[0, 0, 0, 1]);
        // One file of documents: each document.
        let s = Dataset::from_sequences(&[vec![1, 2, 3, 4, 5], vec![6, 7]], 10, 2).unwrap();
        assert_eq!(s.sources(), &[0, 0, 1]);
    }
}
