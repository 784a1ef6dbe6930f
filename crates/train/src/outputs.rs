//! Where a run writes, checked before the first step: every output path is of the right kind
//! (never a device, pipe or socket), its directory exists or can be made, and it is writable.

use std::path::Path;

use crate::error::{Result, TrainError};

/// What a path is, as far as writing to it goes.
enum Kind {
    Missing,
    File,
    Dir,
    /// A device, pipe or socket (or something else not a file or directory).
    Special(&'static str),
}

fn kind(path: &Path) -> Kind {
    match std::fs::metadata(path) {
        Err(_) => Kind::Missing,
        Ok(m) => {
            let t = m.file_type();
            if t.is_file() {
                Kind::File
            } else if t.is_dir() {
                Kind::Dir
            } else {
                Kind::Special(special_name(&t))
            }
        }
    }
}

#[cfg(unix)]
fn special_name(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_name(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// Makes `dir` (and its parents) and proves it writable by creating and removing a file in it.
fn writable_dir(setting: &'static str, dir: &Path) -> Result<()> {
    let bad = |what: String| TrainError::setting(setting, what);
    match kind(dir) {
        Kind::Dir => {}
        Kind::Missing => std::fs::create_dir_all(dir).map_err(|e| {
            bad(format!(
                "cannot create the directory {}: {e}",
                dir.display()
            ))
        })?,
        Kind::File => return Err(bad(format!("{} is a file, not a directory", dir.display()))),
        Kind::Special(what) => {
            return Err(bad(format!("{} is {what}, not a directory", dir.display())))
        }
    }
    let probe = dir.join(format!(".hotspa-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| bad(format!("cannot write into {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Checks that a file can be written at `path` (replacing a regular file there): not a
/// directory or special file, its directory made and writable.
pub fn check_file(setting: &'static str, path: &Path) -> Result<()> {
    match kind(path) {
        Kind::Missing | Kind::File => {}
        Kind::Dir => {
            return Err(TrainError::setting(
                setting,
                format!("{} is a directory; give a file name", path.display()),
            ))
        }
        Kind::Special(what) => {
            return Err(TrainError::setting(
                setting,
                format!(
                    "{} is {what}; hotspa writes only regular files",
                    path.display()
                ),
            ))
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    writable_dir(setting, dir)
}

/// Checks that a model folder can be written at `dir`: missing or empty (anything else only
/// with `force`, and then replaced), its parent made and writable.
pub fn check_folder(setting: &'static str, dir: &Path, force: bool) -> Result<()> {
    match kind(dir) {
        Kind::Missing => {}
        Kind::Dir => {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && !force {
                return Err(TrainError::setting(
                    setting,
                    format!(
                        "{} exists and is not empty; choose a new folder, or pass --force to replace it",
                        dir.display()
                    ),
                ));
            }
        }
        Kind::File => {
            return Err(TrainError::setting(
                setting,
                format!(
                    "{} is a file; a model folder is written there (name a .safetensors file for one file)",
                    dir.display()
                ),
            ))
        }
        Kind::Special(what) => {
            return Err(TrainError::setting(
                setting,
                format!("{} is {what}; hotspa writes only regular files", dir.display()),
            ))
        }
    }
    let parent = dir
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    writable_dir(setting, parent)
}

/// Checks that `dir` is (or can be made) a writable directory, and makes it.
pub fn check_dir(setting: &'static str, dir: &Path) -> Result<()> {
    writable_dir(setting, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_kinds_and_unwritable_places_are_refused_naming_the_setting() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_file("save", &d.path().join("new/deep/w.safetensors")).is_ok());
        assert!(d.path().join("new/deep").is_dir());
        assert!(check_file("save", &file).is_ok());
        let e = check_file("save", d.path()).unwrap_err().to_string();
        assert!(
            e.starts_with("save: ") && e.contains("is a directory"),
            "{e}"
        );
        let e = check_dir("checkpoint_dir", &file.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot create the directory"), "{e}");
        let e = check_dir("checkpoint_dir", &file).unwrap_err().to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
        #[cfg(unix)]
        {
            let e = check_file("save", Path::new("/dev/null"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("is a character device"), "{e}");
        }
    }
}
