//! Megatron-LM's indexed datasets: `PREFIX.idx` and `PREFIX.bin` as its
//! `tools/preprocess_data.py` writes them (`MMIDIDX` index, version 1). Every document — its
//! sequences concatenated, as Megatron's document index groups them — becomes one document here.

use std::path::{Path, PathBuf};

use crate::{DataError, Result};

const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

/// `PREFIX.idx` and `PREFIX.bin` of a path that names either file or the prefix.
fn halves(path: &Path) -> (PathBuf, PathBuf) {
    let s = path.to_string_lossy();
    let prefix = s
        .strip_suffix(".idx")
        .or_else(|| s.strip_suffix(".bin"))
        .unwrap_or(&s)
        .to_string();
    (
        PathBuf::from(format!("{prefix}.idx")),
        PathBuf::from(format!("{prefix}.bin")),
    )
}

/// `PREFIX.idx` and `PREFIX.bin` of a path that names either file or the prefix, if both exist.
pub fn files(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let (idx, bin) = halves(path);
    (idx.is_file() && bin.is_file()).then_some((idx, bin))
}

/// For a path naming one half of a Megatron dataset (`PREFIX.idx` or `PREFIX.bin`, or a
/// `PREFIX` of which one half exists) whose other half is missing: the missing file.
pub fn missing_half(path: &Path) -> Option<PathBuf> {
    let (idx, bin) = halves(path);
    match (idx.is_file(), bin.is_file()) {
        (true, false) => Some(bin),
        (false, true) => Some(idx),
        _ => None,
    }
}

/// A little-endian reader over the index that names the index in its errors.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn bad(&self, reason: String) -> DataError {
        DataError::Format {
            path: self.path.to_path_buf(),
            format: "Megatron indexed dataset",
            reason,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.bad(format!(
                "truncated: {what} needs {n} bytes at offset {}, the index has {}",
                self.at,
                self.bytes.len()
            )));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// `n` little-endian values of `width` bytes (signed), checked to fit before reading.
    fn ints(&mut self, n: u64, width: usize, what: &str) -> Result<Vec<i64>> {
        let bytes = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(width))
            .ok_or_else(|| self.bad(format!("{what}: {n} entries cannot be right")))?;
        let b = self.take(bytes, what)?;
        Ok(b.chunks_exact(width)
            .map(|c| match width {
                4 => i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))),
                _ => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            })
            .collect())
    }
}

/// Bytes per token and how to read one, by Megatron's dtype code.
fn token_dtype(code: u8) -> Option<(usize, &'static str)> {
    match code {
        1 => Some((1, "uint8")),
        2 => Some((1, "int8")),
        3 => Some((2, "int16")),
        4 => Some((4, "int32")),
        5 => Some((8, "int64")),
        8 => Some((2, "uint16")),
        _ => None,
    }
}

fn token(bytes: &[u8], name: &str) -> i64 {
    match name {
        "uint8" => i64::from(bytes[0]),
        "int8" => i64::from(bytes[0] as i8),
        "int16" => i64::from(i16::from_le_bytes([bytes[0], bytes[1]])),
        "uint16" => i64::from(u16::from_le_bytes([bytes[0], bytes[1]])),
        "int32" => i64::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        _ => i64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])),
    }
}

/// Every document of the dataset at `idx`/`bin`, its ids checked against `vocab`.
pub fn read(idx: &Path, bin: &Path, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    let index = std::fs::read(idx).map_err(io(idx))?;
    let data = std::fs::read(bin).map_err(io(bin))?;
    let mut c = Cursor {
        bytes: &index,
        at: 0,
        path: idx,
    };
    if c.take(9, "the header")? != MAGIC {
        return Err(c.bad("not an MMIDIDX index (wrong magic bytes)".into()));
    }
    let version = c.u64("the version")?;
    if version != 1 {
        return Err(c.bad(format!("version {version} (1 is implemented)")));
    }
    let code = c.take(1, "the dtype")?[0];
    let (width, dtype) = token_dtype(code).ok_or_else(|| {
        c.bad(format!(
            "token dtype code {code} (integer dtypes 1-5 and 8 are token ids)"
        ))
    })?;
    let sequences = c.u64("the sequence count")?;
    let documents = c.u64("the document count")?;
    let lengths = c.ints(sequences, 4, "the sequence lengths")?;
    let pointers = c.ints(sequences, 8, "the sequence pointers")?;
    let doc_index = c.ints(documents, 8, "the document index")?;
    let bad = |reason: String| DataError::Format {
        path: idx.to_path_buf(),
        format: "Megatron indexed dataset",
        reason,
    };
    if doc_index.first() != Some(&0)
        || doc_index.windows(2).any(|w| w[1] < w[0])
        || doc_index.last().is_some_and(|&l| l as u64 != sequences)
    {
        return Err(bad(format!(
            "the document index must rise from 0 to the {sequences} sequences"
        )));
    }
    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(lengths.len());
    for (s, (&len, &ptr)) in lengths.iter().zip(&pointers).enumerate() {
        let span = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_mul(width))
            .zip(usize::try_from(ptr).ok())
            .and_then(|(n, p)| Some(p..p.checked_add(n)?))
            .filter(|r| r.end <= data.len())
            .ok_or_else(|| {
                DataError::Format {
                    path: bin.to_path_buf(),
                    format: "Megatron indexed dataset",
                    reason: format!(
                        "sequence {s} ({len} tokens at byte {ptr}) lies outside the {} bytes of the data",
                        data.len()
                    ),
                }
            })?;
        let ids = data[span]
            .chunks_exact(width)
            .map(|b| {
                let t = token(b, dtype);
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        bad(format!(
                            "sequence {s}: token id {t} is outside the model's vocabulary of {vocab}"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        seqs.push(ids);
    }
    Ok(doc_index
        .windows(2)
        .map(|w| seqs[w[0] as usize..w[1] as usize].concat())
        .collect())
}
