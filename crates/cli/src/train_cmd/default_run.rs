//! `hotspa train` with no arguments: the embedded default run on this project's own files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::flags::TrainFlags;

/// The embedded default model: ~3 M parameters, byte vocabulary.
const DEFAULT_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_act": "silu",
  "vocab_size": 256,
  "hidden_size": 256,
  "intermediate_size": 688,
  "num_hidden_layers": 4,
  "num_attention_heads": 8,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "max_position_embeddings": 256,
  "tie_word_embeddings": false
}
"#;

/// This project's sources and documentation, found from the current directory.
fn project_files() -> Vec<PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if p.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    walk(&p, out);
                }
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("rs" | "md" | "toml")
            ) {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    if std::path::Path::new("README.md").is_file() {
        files.push(PathBuf::from("README.md"));
    }
    walk(std::path::Path::new("crates"), &mut files);
    walk(std::path::Path::new("docs"), &mut files);
    files
}

/// `hotspa train` with no arguments: a ~3 M-parameter LLaMA on 4 thread devices trained on the
/// paragraphs of this project's own sources through the byte tokenizer, hot switching between
/// DP4 (short paragraphs) and DP2×TP2, timed as on the HotSPa paper's cluster too; everything is
/// written under `runs/default-<unix time>/`, the model as an HF folder.
pub(super) fn default_run(mut args: TrainFlags, given: &[String]) -> Result<()> {
    let files = project_files();
    if files.len() < 5 {
        bail!(
            "the default run trains on this project's own sources: run it from the repository root \
             (where README.md, crates/ and docs/ are), or pass --model and --data"
        );
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // A folder of its own, never one that exists (two runs in the same second get `-2`, …).
    std::fs::create_dir_all("runs").context("creating runs/")?;
    let mut dir = PathBuf::from(format!("runs/default-{stamp}"));
    for n in 2.. {
        match std::fs::create_dir(&dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {
                dir = PathBuf::from(format!("runs/default-{stamp}-{n}"));
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    std::fs::write(dir.join("config.json"), DEFAULT_CONFIG)?;
    args.model = Some(dir.clone());
    args.data_files = Some(files);
    // Each setting of the default run, unless the command line gave that flag.
    let mine = |flag: &str| !given.iter().any(|g| g == flag);
    if mine("devices") {
        args.devices = Some(4);
    }
    // The parameter server and federated averaging run whole replicas, without the simulated
    // clock or checkpoints (not built there).
    let replicas_only = args.ps_servers.is_some()
        || matches!(args.sync.split(':').next(), Some("ssp" | "asp" | "fedavg"));
    if replicas_only && mine("strategies") && mine("strategy") {
        args.strategy = Some(format!("dp{}", args.devices.unwrap_or(4)));
    } else if mine("strategies") && mine("strategy") {
        // Paragraphs of 64 bytes or less (a tenth of them) under DP4, which sends no
        // activations; the rest under DP2×TP2, which holds the optimizer (half the model state
        // per device).
        args.strategies = Some("dp4:64,dp2tp2:max".into());
    }
    // The priority schedule's update thread is not timed by the clock yet.
    if mine("sim_cluster") && !replicas_only && args.comm_schedule != "priority" {
        // What the same steps would take on the HotSPa paper's cluster.
        args.sim_cluster = Some("a800x32".into());
    }
    if mine("steps") {
        args.steps = 300;
    }
    if mine("global_batch") {
        args.global_batch = 16;
    }
    if mine("max_len") {
        args.max_len = Some(256);
    }
    if mine("lr") {
        args.lr = 2e-3;
    }
    if mine("lr_schedule") {
        args.lr_schedule = "cosine".into();
    }
    if mine("warmup") {
        args.warmup = 10;
    }
    if mine("min_lr") {
        args.min_lr = Some(2e-4);
    }
    if mine("checkpoint_dir") && !replicas_only {
        args.checkpoint_dir = Some(dir.join("checkpoints"));
        if mine("checkpoint_every") {
            // Every 50 steps, or the next multiple of the averaging period (checkpoints are
            // written where the replicas are one).
            let period = train::SyncMode::parse(&args.sync, args.outer_lr, args.outer_momentum)
                .ok()
                .and_then(|m| m.every())
                .unwrap_or(1);
            args.checkpoint_every = Some(50usize.div_ceil(period) * period);
        }
    }
    if mine("metrics") {
        args.metrics = Some(dir.join("metrics.jsonl"));
    }
    if mine("save") {
        args.save = Some(dir.join("model"));
    }
    eprintln!(
        "default run: a small LLaMA trained on this project's own files, written to {}",
        dir.display()
    );
    if let Err(e) = super::train(&args) {
        // Refused before writing anything but the config it was given: the folder this run
        // made goes again (it holds nothing else), so that refusals leave no litter.
        let only_config = std::fs::read_dir(&dir).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .all(|e| e.file_name() == "config.json")
        });
        if only_config && std::fs::remove_file(dir.join("config.json")).is_ok() {
            let _ = std::fs::remove_dir(&dir);
            eprintln!("nothing trained: {} removed", dir.display());
        }
        return Err(e);
    }
    if let Some(metrics) = &args.metrics {
        crate::chart::plot_file(metrics, &dir.join("plot.svg"))?;
    }
    let model = args.save.clone().unwrap_or_else(|| dir.join("model"));
    // What is in the run's folder (the flags may have sent parts elsewhere or turned them off).
    let written: Vec<&str> = [
        ("config.json", true),
        ("model/ (an HF model folder)", dir.join("model").is_dir()),
        ("checkpoints/", dir.join("checkpoints").is_dir()),
        ("metrics.jsonl", dir.join("metrics.jsonl").is_file()),
        ("plot.svg", dir.join("plot.svg").is_file()),
    ]
    .into_iter()
    .filter_map(|(name, there)| there.then_some(name))
    .collect();
    eprintln!(
        "run written to {}: {}\n\
         continue a prompt with it: hotspa generate --model {} --prompt \"fn main\"",
        dir.display(),
        written.join(", "),
        model.display()
    );
    Ok(())
}
