//! `hotspa plot`: loss and tokens/s per step from a metrics file, as SVG or PNG.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// A metrics file written by `hotspa train --metrics`.
    metrics: PathBuf,
    /// Output file (.svg or .png).
    #[arg(short = 'o', long)]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let rows = crate::chart::read(&args.metrics)?;
    crate::chart::draw(&rows, &args.output)?;
    eprintln!("{} steps plotted to {}", rows.len(), args.output.display());
    Ok(())
}
