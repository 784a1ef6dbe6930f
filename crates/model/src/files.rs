//! How hotspa writes a file: safetensors bytes with the metadata of every weights file it
//! writes, and any file atomically (a temporary file, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;

use crate::error::{io, ModelError, Result};

/// The safetensors bytes of `views` with the metadata of every weights file hotspa writes: HF's
/// `format: pt`, and `writer`, by which a later `--force` recognises a file as hotspa's own.
/// The header's keys are sorted, so the same weights give the same bytes (the metadata map's
/// own order is random).
pub(crate) fn serialize(views: Vec<(String, TensorView<'_>)>, path: &Path) -> Result<Vec<u8>> {
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "writer".to_string(),
            format!("hotspa {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| corrupt(e.to_string()))?;
    // 8 bytes of header length, the header (JSON, padded with spaces), the data.
    let n = u64::from_le_bytes(
        out[..8]
            .try_into()
            .map_err(|_| corrupt("no header".into()))?,
    ) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&out[8..8 + n]).map_err(|e| corrupt(e.to_string()))?;
    let mut sorted = serde_json::to_vec(&header).map_err(|e| corrupt(e.to_string()))?;
    while sorted.len() % 8 != 0 {
        sorted.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + sorted.len() + out.len() - 8 - n);
    bytes.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&sorted);
    bytes.extend_from_slice(&out[8 + n..]);
    Ok(bytes)
}

/// A hidden file in `path`'s folder (`.` for a bare name), named by `name` from `path`'s file
/// name: where a temporary copy or a lock of `path` lives.
pub fn beside(path: &Path, name: impl FnOnce(&str) -> String) -> PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dir.join(name(&file))
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename, fsync of
/// the directory. A crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = beside(path, |name| format!(".{name}.tmp-{}", std::process::id()));
    let dir = tmp.parent().unwrap_or(Path::new("."));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            // Best effort: some filesystems refuse to fsync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
