//! What a run asks of the machine, checked before anything large is allocated: the memory it
//! needs by the runtime's memory model against what the machine has, and thread ranks against
//! the cores.

use graph::Strategy;
use model::LlamaConfig;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Thread ranks per core beyond which a run is refused: they would only take turns.
pub const RANKS_PER_CORE: usize = 8;

/// The bytes a run needs at most in this process, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryNeed {
    /// The whole model in host memory while the ranks start (twice: weights and, resuming, the
    /// checkpoint's moments too).
    pub host_model: f64,
    /// Every rank's pieces of the weights, gradients and AdamW moments, and the copies hot
    /// switching makes.
    pub model_state: f64,
    /// Every rank's activations and gradients in flight (the runtime's memory model).
    pub activations: f64,
    /// Every rank's copy of the global batch and its micro-batches.
    pub batches: f64,
    /// A checkpoint's pieces collected and reassembled on rank 0.
    pub checkpoint: f64,
}

impl MemoryNeed {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.host_model + self.model_state + self.activations + self.batches + self.checkpoint
    }
}

/// Memory this process may still take, by one of the limits on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    /// Bytes.
    pub bytes: f64,
    /// Which limit: `MemAvailable`, a cgroup's, `RLIMIT_AS`, `RLIMIT_DATA`.
    pub limit: String,
}

/// The memory this process has to give: the smallest of the machine's `MemAvailable`, what
/// every memory cgroup (v1 or v2) above the process leaves under its limit, and what
/// `RLIMIT_AS` and `RLIMIT_DATA` leave beyond the process's own size; `None` where none is
/// known (not Linux).
pub fn available_memory() -> Option<Available> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut all = Vec::new();
    if let Some(kb) = read("/proc/meminfo").and_then(|t| meminfo_kb(&t, "MemAvailable:")) {
        all.push(Available {
            bytes: kb * 1024.0,
            limit: "the machine's available memory (MemAvailable)".into(),
        });
    }
    if let (Some(cgroups), Some(mounts)) = (read("/proc/self/cgroup"), read("/proc/self/mountinfo"))
    {
        for dir in cgroup_dirs(&cgroups, &mounts) {
            all.extend(cgroup_room(&dir));
        }
    }
    if let (Some(limits), Some(status)) = (read("/proc/self/limits"), read("/proc/self/status")) {
        for (name, limit, used) in [
            ("Max address space", "RLIMIT_AS (ulimit -v)", "VmSize:"),
            ("Max data size", "RLIMIT_DATA (ulimit -d)", "VmData:"),
        ] {
            if let (Some(max), Some(kb)) = (rlimit(&limits, name), meminfo_kb(&status, used)) {
                all.push(Available {
                    bytes: (max - kb * 1024.0).max(0.0),
                    limit: format!(
                        "{limit}, {} beyond this process's own {}",
                        gib(max),
                        gib(kb * 1024.0)
                    ),
                });
            }
        }
    }
    all.into_iter().min_by(|a, b| a.bytes.total_cmp(&b.bytes))
}

/// A `KEY:   N kB` line's N (of /proc/meminfo or /proc/self/status).
fn meminfo_kb(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The soft limit of `name` in /proc/self/limits, in bytes (`None` when unlimited).
fn rlimit(limits: &str, name: &str) -> Option<f64> {
    let rest = limits.lines().find(|l| l.starts_with(name))?[name.len()..].to_string();
    rest.split_whitespace().next()?.parse().ok()
}

/// The directories of every memory cgroup holding this process and of their ancestors up to
/// each hierarchy's mount (v2: `cgroup2`; v1: a `cgroup` mount with the `memory` option), from
/// /proc/self/cgroup and /proc/self/mountinfo.
fn cgroup_dirs(cgroups: &str, mountinfo: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        let (Some(root), Some(mount), Some(fstype)) = (pre.get(3), pre.get(4), post.first()) else {
            continue;
        };
        let supers = post.get(2).copied().unwrap_or("");
        let path = cgroups.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let wanted = match *fstype {
                "cgroup2" => controllers.is_empty(),
                "cgroup" => {
                    supers.split(',').any(|o| o == "memory")
                        && controllers.split(',').any(|c| c == "memory")
                }
                _ => false,
            };
            wanted.then(|| path.to_string())
        });
        let Some(path) = path else {
            continue;
        };
        // The cgroup's path is from its hierarchy's root; the mount shows `root` of it.
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .trim_start_matches('/');
        let mut dir = std::path::PathBuf::from(mount).join(rel);
        loop {
            out.push(dir.clone());
            if dir == std::path::Path::new(mount) || !dir.pop() {
                break;
            }
        }
    }
    out
}

/// What the memory cgroup at `dir` leaves under its limit (v2 `memory.max` − `memory.current`,
/// v1 `memory.limit_in_bytes` − `memory.usage_in_bytes`), if it has one.
fn cgroup_room(dir: &std::path::Path) -> Option<Available> {
    let num = |f: &str| -> Option<f64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (max, used, file) = match num("memory.max") {
        Some(m) => (m, num("memory.current")?, "memory.max"),
        None => (
            num("memory.limit_in_bytes")?,
            num("memory.usage_in_bytes")?,
            "memory.limit_in_bytes",
        ),
    };
    // v1 writes "no limit" as a huge page-rounded number; v2 as `max` (which does not parse).
    if max >= 1e18 {
        return None;
    }
    Some(Available {
        bytes: (max - used).max(0.0),
        limit: format!(
            "the memory cgroup's limit ({}: {}, {} in use)",
            dir.join(file).display(),
            gib(max),
            gib(used)
        ),
    })
}

/// Bytes for people: GiB from 0.1 GiB up, MiB below.
fn gib(b: f64) -> String {
    let g = b / (1u64 << 30) as f64;
    if g >= 0.1 || b == 0.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

/// Every parameter of `cfg`.
fn params(cfg: &LlamaConfig) -> f64 {
    model::param_specs(cfg)
        .iter()
        .map(|s| s.numel() as f64)
        .sum()
}

/// What `cfg` needs with `ranks` of its ranks in this process running `strategies` (the
/// optimizer's being `inst`); `resuming` adds the checkpoint's moments.
pub fn memory_need(
    cfg: &TrainConfig,
    inst: &Strategy,
    strategies: &[&Strategy],
    ranks: usize,
    resuming: bool,
) -> Result<MemoryNeed> {
    let p = params(&cfg.model);
    let per_rank_state = |s: &Strategy| {
        // fp32 weights and gradients (ZeRO-3/2 shard them), fp32 moments (ZeRO-1 shards them).
        p * planner::state_bytes_per_param(4.0, s, inst)
    };
    let inst_state = per_rank_state(inst);
    // Other strategies of a hot schedule hold their weights and gradients while they run,
    // plus host copies of the parameters in their layout.
    let others: f64 = strategies
        .iter()
        .filter(|s| **s != inst)
        .map(|s| 3.0 * 4.0 * p / (s.tp * s.pp) as f64)
        .fold(0.0, f64::max);
    let budget_tokens = |i: usize| -> usize {
        let most = cfg.global_batch.saturating_mul(cfg.max_len());
        cfg.budget(i).min(most).max(cfg.max_len().min(most))
    };
    let mut activations = 0.0f64;
    for (i, s) in strategies.iter().enumerate() {
        // A CP rank holds its part of the micro-batch, about 1/cp of it for long sequences but
        // up to all of it for many short ones (a sequence's 2·cp chunks round up): the whole
        // micro-batch bounds it.
        let tokens = budget_tokens(i);
        // The first stage holds the most under 1F1B: `pp` passes in flight.
        let exec = model::rank_exec(&cfg.model, s, 0)?;
        let peak = planner::stage_peak(
            &exec,
            0,
            &vec![tokens; s.pp],
            cfg.pipeline_schedule,
            0,
            s.pp,
        )?;
        activations = activations.max(peak as f64);
    }
    let batch = cfg.global_batch as f64 * cfg.max_len() as f64 * 4.0 * 4.0;
    let ranks = ranks as f64;
    Ok(MemoryNeed {
        host_model: 4.0 * p * if resuming { 3.0 } else { 1.0 },
        model_state: ranks * (inst_state + others),
        activations: ranks * activations,
        batches: ranks * batch,
        checkpoint: if cfg.checkpoint.is_some() || cfg.save.is_some() {
            2.0 * 4.0 * p * if cfg.checkpoint.is_some() { 3.0 } else { 1.0 }
        } else {
            0.0
        },
    })
}

/// Refuses a run whose memory need exceeds what the process may take (the tightest of the
/// machine's, its cgroups' and its rlimits'), both numbers, the limit and the parts in the
/// message. Only the CPU's memory is checked (a GPU's is not yet).
pub fn check_memory(need: &MemoryNeed, available: Option<Available>) -> Result<()> {
    let Some(have) = available else {
        return Ok(());
    };
    if need.total() <= have.bytes {
        return Ok(());
    }
    Err(TrainError::setting(
        "devices",
        format!(
            "the run needs about {} of memory (the model in host memory {}, every rank's weights, \
             gradients and optimizer state {}, activations {}, batches {}, checkpoint assembly {}) \
             but only {} is available by {}; use a smaller model, fewer devices in this \
             process, a smaller --micro-batch-tokens or --global-batch",
            gib(need.total()),
            gib(need.host_model),
            gib(need.model_state),
            gib(need.activations),
            gib(need.batches),
            gib(need.checkpoint),
            gib(have.bytes),
            have.limit
        ),
    ))
}

/// Bytes free to this user on the filesystem holding `path` (or its nearest existing
/// ancestor), and the filesystem's device id; `None` where unknown.
pub fn free_disk(path: &std::path::Path) -> Option<(u64, u64)> {
    let mut p = crate::outputs::resolve(path);
    while !p.exists() {
        if !p.pop() {
            return None;
        }
    }
    statvfs(&p)
}

#[cfg(unix)]
fn statvfs(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a zeroed struct statvfs that the call
    // fills; nothing is kept past the call.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    let dev = std::fs::metadata(p).ok()?.dev();
    Some((st.f_bavail as u64 * st.f_frsize as u64, dev))
}

#[cfg(not(unix))]
fn statvfs(_: &std::path::Path) -> Option<(u64, u64)> {
    None
}

/// Bytes a run writes at most at once, by output: the final weights and one checkpoint.
pub fn disk_need(cfg: &TrainConfig) -> Vec<(&'static str, std::path::PathBuf, f64)> {
    let p = params(&cfg.model);
    let mut out = Vec::new();
    if let Some(s) = &cfg.save {
        let bytes = match cfg.save_dtype {
            Some(model::Dtype::Bf16 | model::Dtype::F16) => 2.0,
            _ => 4.0,
        };
        out.push(("save", s.clone(), bytes * p + (1 << 20) as f64));
    }
    if let Some(c) = &cfg.checkpoint {
        // Weights and both moments in f32, and error-feedback residuals (a gradient's worth
        // per device at most).
        let residuals = if cfg.exchange.codec != comm::codec::Codec::None {
            4.0 * p * cfg.devices as f64
        } else {
            0.0
        };
        out.push((
            "checkpoint_dir",
            c.dir.clone(),
            12.0 * p + residuals + (1 << 20) as f64,
        ));
    }
    out
}

/// Refuses outputs whose filesystem cannot hold what the run writes there (outputs on one
/// filesystem add up), with the figures.
pub fn check_disk(needs: &[(&'static str, std::path::PathBuf, f64)]) -> Result<()> {
    let mut by_fs: Vec<(u64, u64, f64, Vec<String>, &'static str)> = Vec::new();
    for (setting, path, bytes) in needs {
        let Some((free, dev)) = free_disk(path) else {
            continue;
        };
        let what = format!(
            "--{} {} {}",
            setting.replace('_', "-"),
            path.display(),
            gib(*bytes)
        );
        match by_fs.iter_mut().find(|f| f.0 == dev) {
            Some(f) => {
                f.2 += bytes;
                f.3.push(what);
            }
            None => by_fs.push((dev, free, *bytes, vec![what], setting)),
        }
    }
    for (_, free, need, parts, setting) in by_fs {
        if need > free as f64 {
            return Err(TrainError::setting(
                setting,
                format!(
                    "the disk holding it has {} free, and the run writes {} there ({}); free \
                     some space or write elsewhere",
                    gib(free as f64),
                    gib(need),
                    parts.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses more thread ranks than [`RANKS_PER_CORE`] per core.
pub fn check_threads(ranks: usize, cores: usize) -> Result<()> {
    let most = RANKS_PER_CORE * cores.max(1);
    if ranks > most {
        return Err(TrainError::setting(
            "devices",
            format!(
                "{ranks} thread ranks on {cores} core(s): at most {most} ({RANKS_PER_CORE} per core) \
                 run in one process; use fewer, or one process per rank under mpirun"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataSource;

    #[test]
    fn cgroups_of_both_versions_and_rlimits_are_found() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let cgroups = "4:memory:/jobs/a\n1:cpu:/\n0::/user/b\n";
        let dirs = cgroup_dirs(cgroups, mountinfo);
        let s: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            s,
            [
                "/sys/fs/cgroup/memory/jobs/a",
                "/sys/fs/cgroup/memory/jobs",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/unified/user/b",
                "/sys/fs/cgroup/unified/user",
                "/sys/fs/cgroup/unified",
            ]
        );
        // A v2 cgroup with a limit, and one without.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(d.path().join("memory.current"), "268435456\n").unwrap();
        let room = cgroup_room(d.path()).unwrap();
        assert_eq!(room.bytes, 805306368.0);
        assert!(
            room.limit.contains("memory.max: 1.00 GiB, 0.25 GiB in use"),
            "{}",
            room.limit
        );
        std::fs::write(d.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(
            d.path().join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(d.path().join("memory.usage_in_bytes"), "1\n").unwrap();
        assert!(cgroup_room(d.path()).is_none());
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
            Max data size             unlimited            unlimited            bytes\n\
            Max address space         4294967296           unlimited            bytes\n";
        assert_eq!(rlimit(limits, "Max address space"), Some(4294967296.0));
        assert_eq!(rlimit(limits, "Max data size"), None);
    }

    #[test]
    fn a_7b_model_needs_more_than_this_kind_of_machine_has() {
        let model = LlamaConfig::preset("llama2-7b").unwrap();
        let cfg = TrainConfig::new(model, DataSource::Sequences(vec![vec![1, 2]]));
        let s = Strategy::single();
        let need = memory_need(&cfg, &s, &[&s], 1, false).unwrap();
        // 6.7 B parameters: 27 GB of host weights alone, ~108 GB with gradients and moments.
        assert!(
            need.host_model > 26e9 && need.model_state > 100e9,
            "{need:?}"
        );
        let have = |bytes: f64| Available {
            bytes,
            limit: "a test's limit".into(),
        };
        let e = check_memory(&need, Some(have(23e9)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("only 21.42 GiB is available by a test's limit"),
            "{e}"
        );
        assert!(check_memory(&need, Some(have(1e13))).is_ok());
        assert!(check_memory(&need, None).is_ok());
        assert!(check_threads(16, 2).is_ok());
        let e = check_threads(1000, 2).unwrap_err().to_string();
        assert!(e.contains("at most 16"), "{e}");
    }
}
