//! What hotspa wrote into a folder, with the SHA-256 of every file: the manifest that lets any
//! later load verify what it reads, and a later `--force` replace (file by file) only what
//! hotspa itself wrote — never a file it did not write, never a folder wholesale.
//!
//! A saved model folder carries [`MANIFEST`]; a checkpoint step folder's `state.json` plays the
//! same part (its `sha256` map, plus `state.json` itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io, read_json, ModelError, Result};
use crate::files::write_atomic;

/// The manifest file of a model folder hotspa wrote.
pub const MANIFEST: &str = "hotspa-manifest.json";
/// The state file of a checkpoint step folder (its `sha256` map is the step's manifest).
pub const STATE: &str = "state.json";

/// The SHA-256 of a file, in lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The files of a folder hotspa wrote, by name, with their SHA-256.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// File name (inside the folder) → SHA-256.
    pub files: BTreeMap<String, String>,
    /// The file the manifest was read from ([`MANIFEST`] or a step's `state.json`).
    pub source: PathBuf,
}

/// What a load could check of the files it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksums {
    /// Every weight file read matched the SHA-256 its folder's manifest lists.
    Verified {
        /// Files checked.
        files: usize,
        /// The manifest (`hotspa-manifest.json` or a checkpoint's `state.json`).
        by: PathBuf,
    },
    /// The folder lists no checksums (a plain Hugging Face folder, or a lone file).
    None,
}

impl std::fmt::Display for Checksums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checksums::Verified { files, by } => write!(
                f,
                "SHA-256 of {files} file(s) verified against {}",
                by.display()
            ),
            Checksums::None => write!(f, "no checksums to verify (not a folder hotspa wrote)"),
        }
    }
}

/// Whether `name` is a temporary file or folder hotspa's atomic writes leave behind when killed
/// (`.NAME.tmp-PID`).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

impl Manifest {
    /// The manifest of `files` (names inside `dir`), hashed now.
    pub fn of(dir: &Path, files: &[String]) -> Result<Self> {
        let mut out = BTreeMap::new();
        for f in files {
            out.insert(f.clone(), sha256_file(&dir.join(f))?);
        }
        Ok(Self {
            files: out,
            source: dir.join(MANIFEST),
        })
    }

    /// Writes it as `dir/hotspa-manifest.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let v = serde_json::json!({
            "writer": format!("hotspa {}", env!("CARGO_PKG_VERSION")),
            "sha256": self.files,
        });
        let text =
            serde_json::to_vec_pretty(&v).map_err(|e| ModelError::Mismatch(e.to_string()))?;
        write_atomic(&dir.join(MANIFEST), &text)
    }

    /// The manifest of `dir`, if hotspa wrote it: its `hotspa-manifest.json`, or (a checkpoint
    /// step folder) the `sha256` map of its `state.json` with `state.json` itself. A malformed
    /// manifest is an error naming the file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        for (file, key) in [(MANIFEST, "sha256"), (STATE, "sha256")] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let (v, bad) = read_json(&path, |path, reason| ModelError::Manifest { path, reason })?;
            let map = v
                .get(key)
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad(format!("no \"{key}\" object")))?;
            let mut files = BTreeMap::new();
            for (name, sum) in map {
                let sum = sum
                    .as_str()
                    .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| bad(format!("{name}: not a SHA-256: {sum}")))?;
                if name.contains('/') || name.contains('\\') || name == ".." || name == "." {
                    return Err(bad(format!("{name}: not a file name in this folder")));
                }
                files.insert(name.clone(), sum.to_string());
            }
            if file == STATE {
                // Listed so that removal knows it; its own hash is not checked.
                files.insert(STATE.to_string(), String::new());
            }
            return Ok(Some(Self {
                files,
                source: path.clone(),
            }));
        }
        Ok(None)
    }

    /// Checks the files of `names` that the manifest lists against their SHA-256 (a listed file
    /// that is missing or differs is an error naming it); returns how many were checked.
    pub fn verify(&self, dir: &Path, names: &[String]) -> Result<usize> {
        let mut checked = 0;
        for name in names {
            let Some(want) = self.files.get(name).filter(|w| !w.is_empty()) else {
                continue;
            };
            let path = dir.join(name);
            let got = sha256_file(&path)?;
            if &got != want {
                return Err(ModelError::ChecksumMismatch {
                    path,
                    manifest: self.source.clone(),
                    want: want.clone(),
                    got,
                });
            }
            checked += 1;
        }
        Ok(checked)
    }

    /// The entries of `dir` that are not this manifest's (nor its own file, nor temporaries of
    /// hotspa's atomic writes), by name, sorted.
    pub fn foreign_entries(&self, dir: &Path) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(true);
            let ours = if is_dir {
                // Only a temporary folder of an interrupted write is hotspa's.
                is_temporary(&name)
            } else {
                name == MANIFEST || self.files.contains_key(&name) || is_temporary(&name)
            };
            if !ours {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// What [`remove_owned`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Every file was hotspa's: removed, and the folder with them.
    Removed,
    /// The folder holds files hotspa did not write (named): nothing was removed.
    Foreign(Vec<String>),
    /// The folder has no manifest: nothing was removed.
    NoManifest,
}

/// Removes a folder hotspa wrote, file by file: only when every entry is listed in its
/// manifest (or is a temporary of an interrupted write); otherwise nothing is touched and the
/// answer says why. A missing folder is [`Removal::Removed`].
pub fn remove_owned(dir: &Path) -> Result<Removal> {
    if !dir.exists() {
        return Ok(Removal::Removed);
    }
    let Some(m) = Manifest::read(dir)? else {
        return Ok(Removal::NoManifest);
    };
    let foreign = m.foreign_entries(dir)?;
    if !foreign.is_empty() {
        return Ok(Removal::Foreign(foreign));
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            // Only a temporary folder of ours (checked above).
            remove_temporary_dir(&path)?;
        } else if name != MANIFEST && name != STATE {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    // The manifest last: an interrupted removal leaves a folder still known as hotspa's.
    for last in [STATE, MANIFEST] {
        let p = dir.join(last);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    std::fs::remove_dir(dir).map_err(io(dir))?;
    Ok(Removal::Removed)
}

/// Removes a temporary folder of an interrupted write of hotspa's (`.NAME.tmp-PID`): its files
/// are those the write had made so far; a sub-folder in it is not hotspa's and stops the removal.
pub fn remove_temporary_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let path = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(true) {
            return Err(ModelError::Manifest {
                path: dir.to_path_buf(),
                reason: format!(
                    "a temporary folder of an interrupted write holds a folder ({}) hotspa did not make; left in place",
                    path.display()
                ),
            });
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    std::fs::remove_dir(dir).map_err(io(dir))
}

/// Verifies the files of `names` inside `dir` against `dir`'s manifest, if it has one.
pub fn verify_folder(dir: &Path, names: &[String]) -> Result<Checksums> {
    let Some(m) = Manifest::read(dir)? else {
        return Ok(Checksums::None);
    };
    let files = m.verify(dir, names)?;
    Ok(if files == 0 {
        Checksums::None
    } else {
        Checksums::Verified {
            files,
            by: m.source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_verifies_and_removes_only_what_it_lists() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), b"one").unwrap();
        std::fs::write(dir.join("b"), b"two").unwrap();
        let m = Manifest::of(&dir, &["a".into(), "b".into()]).unwrap();
        m.write(&dir).unwrap();
        let back = Manifest::read(&dir).unwrap().unwrap();
        assert_eq!(back.files, m.files);
        assert_eq!(
            verify_folder(&dir, &["a".into(), "c".into()]).unwrap(),
            Checksums::Verified {
                files: 1,
                by: dir.join(MANIFEST)
            }
        );
        std::fs::write(dir.join("a"), b"One").unwrap();
        let e = verify_folder(&dir, &["a".into()]).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains("/a"), "{e}");
        // A file the manifest does not list stops the removal, and nothing is removed.
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        assert_eq!(
            remove_owned(&dir).unwrap(),
            Removal::Foreign(vec!["notes.txt".into()])
        );
        assert!(dir.join("a").exists() && dir.join(MANIFEST).exists());
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        std::fs::create_dir(dir.join(".x.tmp-12")).unwrap();
        std::fs::write(dir.join(".x.tmp-12/part"), b"p").unwrap();
        assert_eq!(remove_owned(&dir).unwrap(), Removal::Removed);
        assert!(!dir.exists());
        // A folder without a manifest is never removed.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), b"x").unwrap();
        assert_eq!(remove_owned(&dir).unwrap(), Removal::NoManifest);
        assert!(dir.join("a").exists());
        assert!(is_temporary(".model.tmp-991") && !is_temporary("model.tmp-991"));
        assert!(!is_temporary(".model.tmp-") && !is_temporary(".a.tmp-x1"));
    }
}
