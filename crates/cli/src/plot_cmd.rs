//! `hotspa plot`: loss, tokens/s and time per step from one or more metrics files, as SVG or PNG
//! (several files overlay, one colour per run).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Metrics files written by `hotspa train --metrics` (several overlay).
    #[arg(required = true)]
    metrics: Vec<PathBuf>,
    /// Output file (.svg or .png). An existing one is replaced only with --force, and only a
    /// plot hotspa drew.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Replace an existing plot of hotspa's at --output.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut runs = Vec::with_capacity(args.metrics.len());
    for m in &args.metrics {
        let name = m
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        runs.push((name, crate::chart::read(m)?));
    }
    // The inputs read first (their faults named first), then the output checked.
    let out = train::outputs::resolve(&args.output);
    if let Some(m) = args
        .metrics
        .iter()
        .find(|m| train::outputs::resolve(m) == out)
    {
        bail!(
            "--output {} is the metrics file {} it would plot; choose another name",
            args.output.display(),
            m.display()
        );
    }
    if out.is_dir() {
        bail!(
            "--output {} is a directory; give a .svg or .png file name",
            args.output.display()
        );
    }
    if out.exists() {
        if !crate::chart::drawn_by_hotspa(&out) {
            bail!(
                "--output {} exists and is not a plot hotspa drew: hotspa never overwrites a \
                 file it did not write; choose another name",
                args.output.display()
            );
        }
        if !args.force {
            bail!(
                "--output {} exists (an earlier plot); pass --force to replace it",
                args.output.display()
            );
        }
    }
    crate::chart::draw(&runs, &args.output)?;
    let steps: usize = runs.iter().map(|r| r.1.len()).sum();
    eprintln!(
        "{} run(s), {steps} steps plotted to {}",
        runs.len(),
        args.output.display()
    );
    Ok(())
}
