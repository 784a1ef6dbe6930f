//! Where a run writes, owned end to end and checked before the first step: every output path is
//! resolved (canonical, through symlinks) and of the right kind (never a device, pipe or
//! socket), none lies inside or over an input or another output, each is locked for the run's
//! life, and an existing one is replaced only with `--force` and only when hotspa wrote it
//! (recognised by its manifest, its safetensors metadata or its metrics lines).

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::config::{DataSource, Init, Tokenizer, TrainConfig};
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

/// `path` made absolute and canonical through every symlink of its existing part; the part
/// that does not exist yet is appended with `.` and `..` resolved by name.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    if let Ok(c) = abs.canonicalize() {
        return c;
    }
    // The longest existing prefix, canonicalised, then the rest by name.
    let parts: Vec<Component> = abs.components().collect();
    for cut in (0..parts.len()).rev() {
        let head: PathBuf = parts[..cut].iter().collect();
        if let Ok(mut c) = head.canonicalize() {
            for p in &parts[cut..] {
                match p {
                    Component::ParentDir => {
                        c.pop();
                    }
                    Component::CurDir => {}
                    other => c.push(other.as_os_str()),
                }
            }
            return c;
        }
    }
    abs
}

/// One path a run reads or writes, with the setting that names it.
#[derive(Debug, Clone)]
struct Named {
    setting: &'static str,
    given: PathBuf,
    real: PathBuf,
}

impl Named {
    fn new(setting: &'static str, given: &Path) -> Self {
        Self {
            setting,
            given: given.to_path_buf(),
            real: resolve(given),
        }
    }

    fn flag(&self) -> String {
        format!(
            "--{} {}",
            self.setting.replace('_', "-"),
            self.given.display()
        )
    }
}

/// Whether `inner` is `outer` or lies inside it (by resolved path, or as the same file).
fn within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer) || same_file(inner, outer)
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// What a run reads of a model (or weights, or tokenizer) folder: its own files, by name —
/// the config, the weights (single or sharded), the tokenizer's and generation files, and the
/// manifest. An output may sit beside them in the folder (`--model . --save out`), never on
/// them or around them.
fn folder_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let read = name == "config.json"
            || name == "generation_config.json"
            || name == "special_tokens_map.json"
            || name == "state.json"
            || name == "latest"
            || name == model::manifest::MANIFEST
            || (name.starts_with("model") && name.ends_with(".safetensors"))
            || name == model::folder::INDEX
            || name.starts_with("tokenizer")
            || name.starts_with("exp_avg")
            || name == "run_state.safetensors";
        if read {
            out.push(e.path());
        }
    }
    out
}

/// A model, weights or tokenizer path as the run reads it: a file, or a folder's own files.
fn model_input(setting: &'static str, p: &Path, out: &mut Vec<Named>) {
    if p.is_dir() {
        out.extend(folder_files(p).iter().map(|f| Named::new(setting, f)));
        // A checkpoint directory given as a model folder reads its latest step.
        if let Some(step) = model::Checkpoint::latest_step(p) {
            out.push(Named::new(setting, &step));
        }
    } else {
        out.push(Named::new(setting, p));
    }
}

/// Every path the run reads.
fn inputs(cfg: &TrainConfig) -> Vec<Named> {
    let mut out = Vec::new();
    let mut data = |setting: &'static str, d: &DataSource| match d {
        DataSource::Path(p) => out.push(Named::new(setting, p)),
        DataSource::Files(f) | DataSource::Paragraphs(f) => {
            out.extend(f.iter().map(|p| Named::new(setting, p)))
        }
        DataSource::Sequences(_) => {}
    };
    data("data", &cfg.data);
    if let Some(e) = &cfg.eval {
        data("eval_data", &e.data);
    }
    if let Some(m) = &cfg.model_path {
        model_input("model", m, &mut out);
    }
    if let Init::File(p) = &cfg.init {
        model_input("init", p, &mut out);
    }
    if let Tokenizer::File(p) = &cfg.tokenizer {
        model_input("tokenizer", p, &mut out);
    }
    if let Some(r) = &cfg.resume {
        // The step folder read, whole, and the `latest` file that names it.
        match model::Checkpoint::step_dir(r) {
            Ok(step) => out.push(Named::new("resume", &step)),
            Err(_) => out.push(Named::new("resume", r)),
        }
        if r.join("latest").is_file() {
            out.push(Named::new("resume", &r.join("latest")));
        }
    }
    out
}

/// Every path the run writes.
fn outputs(cfg: &TrainConfig) -> Vec<Named> {
    let mut out = Vec::new();
    if let Some(p) = &cfg.save {
        out.push(Named::new("save", p));
    }
    if let Some(p) = &cfg.metrics {
        out.push(Named::new("metrics", p));
    }
    if let Some(c) = &cfg.checkpoint {
        out.push(Named::new("checkpoint_dir", &c.dir));
    }
    out
}

/// The checkpoint directory a `--resume` path belongs to (the path itself, or a step folder's
/// parent, or a `latest` file's).
pub fn checkpoint_home(resume: &Path) -> PathBuf {
    if resume.join("state.json").is_file()
        || (resume.file_name().is_some_and(|n| n == "latest") && resume.is_file())
    {
        resume.parent().unwrap_or(resume).to_path_buf()
    } else {
        resume.to_path_buf()
    }
}

/// Refuses, by name, an output equal to or inside an input (a data folder, a file read), an
/// input inside an output, and two outputs that overlap. The one overlap allowed: a run resumed in its own checkpoint directory
/// (`--resume CK --checkpoint-dir CK`) reads that directory's step (and the model config and
/// tokenizer it holds) before it writes there.
pub fn check_layout(cfg: &TrainConfig) -> Result<()> {
    let ins = inputs(cfg);
    let outs = outputs(cfg);
    let resumed_here = cfg.resume.as_ref().map(|r| resolve(&checkpoint_home(r)));
    for (i, a) in outs.iter().enumerate() {
        for b in &outs[i + 1..] {
            if within(&a.real, &b.real) || within(&b.real, &a.real) {
                let (inner, outer) = if within(&a.real, &b.real) {
                    (a, b)
                } else {
                    (b, a)
                };
                return Err(TrainError::setting(
                    inner.setting,
                    format!(
                        "{} and {} overlap ({} {} {}): each output needs a place of its own, or \
                         one would delete or overwrite the other",
                        inner.flag(),
                        outer.flag(),
                        inner.real.display(),
                        if inner.real == outer.real {
                            "is"
                        } else {
                            "is inside"
                        },
                        outer.real.display()
                    ),
                ));
            }
        }
    }
    for o in &outs {
        for i in &ins {
            let resumed_in_place = o.setting == "checkpoint_dir"
                && resumed_here.as_ref() == Some(&o.real)
                && within(&i.real, &o.real);
            if resumed_in_place {
                continue;
            }
            if within(&o.real, &i.real) {
                return Err(TrainError::setting(
                    o.setting,
                    format!(
                        "{} is {} the input {} ({}): an output never goes into what the run \
                         reads; choose a place outside it",
                        o.flag(),
                        if o.real == i.real || same_file(&o.real, &i.real) {
                            "the same path as"
                        } else {
                            "inside"
                        },
                        i.flag(),
                        i.real.display()
                    ),
                ));
            }
            if within(&i.real, &o.real) {
                return Err(TrainError::setting(
                    o.setting,
                    format!(
                        "{} holds the input {} ({}): writing there could delete or overwrite \
                         what the run reads; choose another place",
                        o.flag(),
                        i.flag(),
                        i.real.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Opens (creating) the lock file `path` and takes its advisory lock: the open file (the lock
/// lasts as long as it does), or, where another process holds the lock already, what the file
/// says of it ([`say_holder`]).
pub(crate) fn lock_file(path: &Path) -> Result<std::result::Result<File, String>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(TrainError::io(path))?;
    match file.try_lock() {
        Ok(()) => Ok(Ok(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            Ok(Err(holder.trim().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(TrainError::io(path)(e)),
    }
}

/// Writes who holds the lock of `path` into it, for the message of a run refused by it (the
/// lock itself is what counts).
pub(crate) fn say_holder(path: &Path) {
    let _ = std::fs::write(path, format!("process {}\n", std::process::id()));
}

/// An output locked for the run's life: an advisory lock on `.NAME.hotspa-lock` beside it,
/// which the OS releases when the process dies; the file is removed when the run ends.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: Option<File>,
}

impl OutputLock {
    /// Locks output `target` (resolved) of `setting`, or says which process holds it.
    pub fn take(setting: &'static str, target: &Path) -> Result<Self> {
        let path = model::beside(target, |name| format!(".{name}.hotspa-lock"));
        // A lock file that another run removed between our open and our lock is retried.
        for _ in 0..8 {
            let file = lock_file(&path)?.map_err(|holder| {
                TrainError::setting(
                    setting,
                    format!(
                        "{} is being written by another run ({holder}); wait for it to end or \
                         choose another place",
                        target.display(),
                    ),
                )
            })?;
            if same_open_file(&file, &path) {
                say_holder(&path);
                return Ok(Self {
                    path,
                    file: Some(file),
                });
            }
        }
        Err(TrainError::setting(
            setting,
            format!("{}: could not take its lock", target.display()),
        ))
    }
}

#[cfg(unix)]
fn same_open_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_open_file(_: &File, _: &Path) -> bool {
    true
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so that no other run can hold the same file meanwhile.
        let _ = std::fs::remove_file(&self.path);
        self.file.take();
    }
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

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether an existing file at `path` is one hotspa wrote as `setting` (a metrics file: every
/// line one step's metrics, a torn last line allowed; a weights file: hotspa in its
/// safetensors metadata). An empty file holds nothing to lose.
fn written_by_hotspa(setting: &'static str, path: &Path) -> bool {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return true;
    }
    if setting == "metrics" {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let torn_last = !text.ends_with('\n');
        // A killed run's last line may be torn: the start of one hotspa writes.
        return lines.iter().enumerate().all(|(i, l)| {
            serde_json::from_str::<crate::metrics::StepMetrics>(l).is_ok()
                || (torn_last && i + 1 == lines.len() && l.starts_with("{\"step\":"))
        });
    }
    model::folder::safetensors_writer(path).is_some_and(|w| w.starts_with("hotspa"))
}

/// Checks that a file can be written at `path`: not a directory or special file, its
/// directory made and writable, and an existing file replaced only when `force` says so and
/// hotspa wrote it (`appending`: a resumed run's own metrics, continued).
pub fn check_file(setting: &'static str, path: &Path, force: bool, appending: bool) -> Result<()> {
    match kind(path) {
        Kind::Missing => {}
        Kind::File => {
            let ours = written_by_hotspa(setting, path);
            let what = if setting == "metrics" {
                "a metrics file of hotspa's"
            } else {
                "a weights file hotspa wrote"
            };
            if !ours {
                return Err(TrainError::setting(
                    setting,
                    format!(
                        "{} exists and is not {what}: hotspa never overwrites a file it did not \
                         write; choose another name",
                        path.display()
                    ),
                ));
            }
            if !force && !appending {
                return Err(TrainError::setting(
                    setting,
                    format!(
                        "{} exists (another run's output); choose a new name, or pass --force \
                         to replace it",
                        path.display()
                    ),
                ));
            }
        }
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
    writable_dir(setting, parent_of(path))
}

/// Checks that a model folder can be written at `dir`: missing or empty, or, with `force`, a
/// folder hotspa wrote (every entry in its manifest) — replaced file by file; its parent made
/// and writable.
pub fn check_folder(setting: &'static str, dir: &Path, force: bool) -> Result<()> {
    match kind(dir) {
        Kind::Missing => {}
        Kind::Dir => {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                if let Some(why) = model::folder::not_replaceable(dir)? {
                    return Err(TrainError::setting(
                        setting,
                        format!("{why}; choose a new folder"),
                    ));
                }
                if !force {
                    return Err(TrainError::setting(
                        setting,
                        format!(
                            "{} holds another run's model; choose a new folder, or pass --force \
                             to replace it",
                            dir.display()
                        ),
                    ));
                }
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
    writable_dir(setting, parent_of(dir))
}

/// Checks that `dir` is (or can be made) a writable directory, and makes it.
pub fn check_dir(setting: &'static str, dir: &Path) -> Result<()> {
    writable_dir(setting, dir)
}

/// The outputs of a run, checked and locked (world rank 0 holds them until the run ends).
#[derive(Debug, Default)]
pub struct Claimed {
    /// The locks on `--save` and `--metrics` (the checkpoint directory locks itself).
    pub locks: Vec<OutputLock>,
}

/// Checks every output of `cfg` (layout against the inputs and each other, kinds, ownership),
/// and locks `--save` and `--metrics`. `resuming_metrics`: the metrics file is continued.
pub fn claim(cfg: &TrainConfig, resuming_metrics: bool) -> Result<Claimed> {
    check_layout(cfg)?;
    let mut locks = Vec::new();
    if let Some(p) = &cfg.save {
        let real = resolve(p);
        writable_dir("save", parent_of(&real))?;
        locks.push(OutputLock::take("save", &real)?);
        if is_single_file(p) {
            check_file("save", &real, cfg.force, false)?;
        } else {
            check_folder("save", &real, cfg.force)?;
        }
    }
    if let Some(p) = &cfg.metrics {
        let real = resolve(p);
        writable_dir("metrics", parent_of(&real))?;
        locks.push(OutputLock::take("metrics", &real)?);
        check_file("metrics", &real, cfg.force, resuming_metrics)?;
    }
    Ok(Claimed { locks })
}

/// Whether `--save` names one safetensors file rather than a model folder.
pub fn is_single_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_kinds_and_unwritable_places_are_refused_naming_the_setting() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_file(
            "save",
            &d.path().join("new/deep/w.safetensors"),
            false,
            false
        )
        .is_ok());
        assert!(d.path().join("new/deep").is_dir());
        // An existing file that hotspa did not write is never replaced, forced or not.
        let e = check_file("save", &file, true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a weights file hotspa wrote"), "{e}");
        let e = check_file("save", d.path(), false, false)
            .unwrap_err()
            .to_string();
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
            let e = check_file("save", Path::new("/dev/null"), false, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("is a character device"), "{e}");
        }
    }

    #[test]
    fn metrics_files_are_recognised_by_their_lines() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m.jsonl");
        let line = r#"{"step":1,"loss":2.0,"grad_norm":1.0,"lr":0.001,"tokens":8,"seconds":0.1,"tokens_per_s":80.0,"peak_bytes":10}"#;
        std::fs::write(&m, format!("{line}\n{{\"step\":2,\"lo")).unwrap();
        assert!(written_by_hotspa("metrics", &m));
        let e = check_file("metrics", &m, false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pass --force"), "{e}");
        assert!(check_file("metrics", &m, true, false).is_ok());
        assert!(check_file("metrics", &m, false, true).is_ok());
        std::fs::write(&m, "my notes, no newline at the end").unwrap();
        assert!(!written_by_hotspa("metrics", &m));
        std::fs::write(&m, format!("{line}\nmy notes\n{line}\n")).unwrap();
        assert!(!written_by_hotspa("metrics", &m));
        assert!(check_file("metrics", &m, true, false).is_err());
        assert!(check_file("metrics", &m, false, true).is_err());
    }

    #[test]
    fn paths_resolve_through_symlinks_and_missing_parts() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
            let r = resolve(&d.path().join("link/new/../x"));
            assert_eq!(r, real.canonicalize().unwrap().join("x"));
        }
    }

    #[test]
    fn a_locked_output_is_refused_to_a_second_run() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("m.jsonl");
        let a = OutputLock::take("metrics", &target).unwrap();
        let e = OutputLock::take("metrics", &target)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is being written by another run"), "{e}");
        drop(a);
        assert!(!d.path().join(".m.jsonl.hotspa-lock").exists());
        drop(OutputLock::take("metrics", &target).unwrap());
    }
}
