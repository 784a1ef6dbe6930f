//! `hotspa profile`: calibrates the cost model on this machine's CPU backend
//! ([`train::profile`]) and writes the cluster file that `hotspa plan`, `hotspa simulate
//! --cluster` and `hotspa train --profile` read.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Thread ranks running at once (as `hotspa train --devices N` would).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Where to write the profile (TOML, the fields of a cluster).
    #[arg(long, default_value = "profile.toml")]
    out: PathBuf,
    /// Also time this model's forward and backward (every rank a DP replica, micro-batches of
    /// `--probe-tokens`) and its optimizer update, and scale the model to them.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens of the probe's micro-batch (sequences of 512, or the model's longest if shorter).
    #[arg(long, default_value_t = 1024)]
    probe_tokens: usize,
    /// Take every measurement this many times, one round after the other, and keep the
    /// fastest of each (a slow spell of a virtual or shared machine then spoils a round, not
    /// the profile; `scripts/check-predictions.sh` uses 3).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = match &args.model {
        Some(p) => Some(model::LlamaConfig::load(p)?),
        None => None,
    };
    let mut notes = crate::output::Notices;
    let p = train::profile(
        args.devices,
        cfg.as_ref(),
        args.probe_tokens,
        args.rounds,
        &mut notes,
    )?;
    let text = format!(
        "# hotspa profile --devices {}: this machine as a cluster (planner::Cluster)\n{}",
        args.devices,
        toml::to_string(&p.cluster).context("writing the profile as TOML")?
    );
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    println!(
        "# GEMM GFLOP/s per rank (a linear layer of tokens × width × input dim, its three GEMMs) measured, and the efficiency curve's (fitted at input dim {}):",
        train::CURVE_INPUT_DIM
    );
    let c = &p.cluster;
    for &([w, k, t], rate) in &p.gemm {
        println!(
            "#   {t:>5} × {w:>4} × {k:>4}: {:>7.2} measured, {:>7.2} curve",
            rate / 1e9,
            c.peak_tflops * 1e3 * c.gemm_efficiency(t as f64, w as f64)
        );
    }
    eprintln!("profile written to {}", args.out.display());
    Ok(())
}
