//! `hotspa plot`: loss, tokens/s and time per step from one or more metrics files, as SVG or PNG
//! (several files overlay, one colour per run).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Metrics files written by `hotspa train --metrics` (several overlay).
    #[arg(required = true)]
    metrics: Vec<PathBuf>,
    /// Output file (.svg or .png).
    #[arg(short = 'o', long)]
    output: PathBuf,
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
    crate::chart::draw(&runs, &args.output)?;
    let steps: usize = runs.iter().map(|r| r.1.len()).sum();
    eprintln!(
        "{} run(s), {steps} steps plotted to {}",
        runs.len(),
        args.output.display()
    );
    Ok(())
}
