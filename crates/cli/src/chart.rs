//! Loss and tokens/s per step from a metrics file, drawn as SVG or PNG (`hotspa plot`, and the
//! default training run's `plot.svg`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// `(step, loss, tokens_per_s)` of every line. A last line cut short (a killed run was writing
/// it) is left out with a warning; a malformed line elsewhere is an error naming it.
pub fn read(path: &Path) -> Result<Vec<(f64, f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let complete = !text.is_empty() && text.ends_with('\n');
    for (k, &(i, line)) in lines.iter().enumerate() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if k + 1 == lines.len() && !complete => {
                eprintln!(
                    "warning: {}:{}: the last line is cut short (a killed run?); plotting the {} before it",
                    path.display(),
                    i + 1,
                    rows.len()
                );
                break;
            }
            Err(e) => bail!(
                "{}:{}: not a metrics line of hotspa train ({e})",
                path.display(),
                i + 1
            ),
        };
        let get = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("{}:{}: no numeric \"{k}\"", path.display(), i + 1))
        };
        let (step, loss) = (get("step")?, get("loss")?);
        let tps = match v.get("tokens_per_s").and_then(|x| x.as_f64()) {
            Some(t) => t,
            None => get("tokens")? / get("seconds")?.max(1e-12),
        };
        rows.push((step, loss, tps));
    }
    if rows.is_empty() {
        bail!("{}: no metrics", path.display());
    }
    Ok(rows)
}

/// Where the plot font is looked for (Debian's fonts-dejavu-core, present on the base image).
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as plotters' "sans-serif" (once per process).
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                format!("plots need the DejaVu Sans font (Debian package fonts-dejavu-core), looked for {FONT_PATHS:?}")
            })?;
        // Leaked once: plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "DejaVu Sans could not be read as a font".to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Draws `rows` into `out`, an .svg or .png file.
pub fn draw(rows: &[(f64, f64, f64)], out: &Path) -> Result<()> {
    register_font()?;
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw_on(
            SVGBackend::new(out, (900, 600)).into_drawing_area(),
            rows,
            out,
        ),
        Some("png") => draw_on(
            BitMapBackend::new(out, (900, 600)).into_drawing_area(),
            rows,
            out,
        ),
        _ => bail!("{}: write a .svg or .png file", out.display()),
    }
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    rows: &[(f64, f64, f64)],
    out: &Path,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(300);
    let loss: Vec<(f64, f64)> = rows.iter().map(|r| (r.0, r.1)).collect();
    let speed: Vec<(f64, f64)> = rows.iter().map(|r| (r.0, r.2)).collect();
    panel(&top, "loss", &loss, RED)?;
    panel(&bottom, "tokens/s", &speed, BLUE)?;
    root.present()
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    points: &[(f64, f64)],
    color: RGBColor,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &color))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Plots a metrics file (used by the default training run).
pub fn plot_file(metrics: &Path, out: &Path) -> Result<()> {
    draw(&read(metrics)?, out)
}
