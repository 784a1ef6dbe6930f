//! Metrics files drawn as SVG or PNG (`hotspa plot`, and the default training run's
//! `plot.svg`): loss (and held-out loss), tokens/s, and time per step — with hot switching the
//! seconds per strategy and in switches, with the simulator's clock the simulated seconds.
//! Several files overlay, one colour per run.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// One step of a metrics file, as much as the plot uses.
#[derive(Debug, Clone, Default)]
pub struct Row {
    step: f64,
    loss: f64,
    tokens_per_s: f64,
    seconds: Option<f64>,
    eval_loss: Option<f64>,
    switch_seconds: Option<f64>,
    strategy_seconds: Vec<(String, f64)>,
    simulated_seconds: Option<f64>,
    /// Bytes every rank sent in the step inside nodes and across nodes.
    wire: Option<(f64, f64)>,
}

/// Every line of a metrics file. A last line cut short (a killed run was writing it) is left
/// out with a warning; a malformed line elsewhere is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Row>> {
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
        if v.get("loss").is_some_and(serde_json::Value::is_null) && v["step"].is_u64() {
            // A run that failed while this step's gradients were pending (PipeDream-2BW).
            eprintln!(
                "warning: {}:{}: step {} has no loss (its run failed before it came); not plotted",
                path.display(),
                i + 1,
                v["step"]
            );
            continue;
        }
        let (step, loss) = (get("step")?, get("loss")?);
        let tokens_per_s = match v.get("tokens_per_s").and_then(|x| x.as_f64()) {
            Some(t) => t,
            None => get("tokens")? / get("seconds")?.max(1e-12),
        };
        let mut strategy_seconds: Vec<(String, f64)> = v["strategy_seconds"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, s)| Some((k.clone(), s.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        strategy_seconds.sort_by(|a, b| a.0.cmp(&b.0));
        rows.push(Row {
            step,
            loss,
            tokens_per_s,
            seconds: v["seconds"].as_f64(),
            eval_loss: v["eval_loss"].as_f64(),
            switch_seconds: v["switch_seconds"].as_f64(),
            strategy_seconds,
            simulated_seconds: v["simulated_seconds"].as_f64(),
            wire: v["wire_intra_node_bytes"]
                .as_f64()
                .zip(v["wire_inter_node_bytes"].as_f64()),
        });
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

/// A named line of one panel.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
}

/// Adds the series (`name`, `points`, `color`) to `panel` where it has points.
fn add(panel: &mut Vec<Series>, name: String, points: Vec<(f64, f64)>, color: RGBColor) {
    if !points.is_empty() {
        panel.push(Series {
            name,
            points,
            color,
        });
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(200, 30, 30),
    RGBColor(30, 80, 200),
    RGBColor(30, 150, 60),
    RGBColor(160, 60, 180),
    RGBColor(230, 130, 0),
    RGBColor(90, 90, 90),
];

/// One panel: its title, what its x axis counts, its lines.
struct Panel {
    title: &'static str,
    x: &'static str,
    series: Vec<Series>,
}

/// Running sums of `f` over the rows (None from the first row that lacks it).
fn cumulative(rows: &[Row], f: impl Fn(&Row) -> Option<f64>) -> Vec<Option<f64>> {
    let mut total = Some(0.0);
    rows.iter()
        .map(|r| {
            total = total.zip(f(r)).map(|(t, x)| t + x);
            total
        })
        .collect()
}

/// The panels of `runs` (name, rows): loss against step, against measured seconds and against
/// simulated seconds (when the runs have them), tokens/s, seconds per step, bytes on the wire.
fn panels(runs: &[(String, Vec<Row>)]) -> Vec<Panel> {
    let one = runs.len() == 1;
    let label = |run: &str, what: &str| {
        if one {
            what.to_string()
        } else {
            format!("{run}: {what}")
        }
    };
    let (mut loss, mut speed, mut time, mut simulated) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut loss_wall, mut loss_sim, mut wire) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (name, rows)) in runs.iter().enumerate() {
        let base = COLORS[r % COLORS.len()];
        let other = |k: usize| {
            if one {
                COLORS[(r + k) % COLORS.len()]
            } else {
                base
            }
        };
        let pick = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
            rows.iter().filter_map(|x| Some((x.step, f(x)?))).collect()
        };
        loss.push(Series {
            name: label(name, "loss"),
            points: pick(&|x| Some(x.loss)),
            color: base,
        });
        let against = |clock: Vec<Option<f64>>| -> Vec<(f64, f64)> {
            clock
                .iter()
                .zip(rows)
                .filter_map(|(t, r)| Some(((*t)?, r.loss)))
                .collect()
        };
        let wall = against(cumulative(rows, |r| r.seconds));
        add(&mut loss_wall, label(name, "loss"), wall, base);
        let sim_clock = against(cumulative(rows, |r| r.simulated_seconds));
        add(&mut loss_sim, label(name, "loss"), sim_clock, base);
        for (k, (what, part)) in [("MB inside nodes", 0usize), ("MB across nodes", 1)]
            .into_iter()
            .enumerate()
        {
            let pts = pick(&|x| x.wire.map(|w| [w.0, w.1][part] / 1e6));
            add(&mut wire, label(name, what), pts, other(k));
        }
        let eval = pick(&|x| x.eval_loss);
        add(&mut loss, label(name, "held-out loss"), eval, other(1));
        speed.push(Series {
            name: label(name, "tokens/s"),
            points: pick(&|x| Some(x.tokens_per_s)),
            color: base,
        });
        let measured = pick(&|x| x.seconds);
        add(
            &mut time,
            label(name, "step (measured)"),
            measured,
            other(0),
        );
        add(
            &mut time,
            label(name, "switches"),
            pick(&|x| x.switch_seconds),
            other(1),
        );
        let sim = pick(&|x| x.simulated_seconds);
        let what = "step on the simulated cluster";
        add(&mut simulated, label(name, what), sim, base);
        let mut strategies: Vec<String> = rows
            .iter()
            .flat_map(|x| x.strategy_seconds.iter().map(|(s, _)| s.clone()))
            .collect();
        strategies.sort();
        strategies.dedup();
        for (k, s) in strategies.into_iter().enumerate() {
            let pts = pick(&|x| {
                x.strategy_seconds
                    .iter()
                    .find(|(n, _)| *n == s)
                    .map(|(_, v)| *v)
            });
            add(
                &mut time,
                label(name, &format!("under {s}")),
                pts,
                other(3 + k),
            );
        }
    }
    // Loss, speed and time always; the others where the runs have such points.
    let mut out = Vec::new();
    let mut panel = |title, x, series: Vec<Series>, always: bool| {
        if always || !series.is_empty() {
            out.push(Panel { title, x, series });
        }
    };
    panel("loss", "step", loss, true);
    panel("loss against time", "measured seconds", loss_wall, false);
    panel(
        "loss against time on the simulated cluster",
        "simulated seconds",
        loss_sim,
        false,
    );
    panel("tokens/s", "step", speed, true);
    panel("seconds per step", "step", time, true);
    panel(
        "seconds per step on the simulated cluster",
        "step",
        simulated,
        false,
    );
    panel(
        "bytes on the wire per step (all ranks)",
        "step",
        wire,
        false,
    );
    out
}

/// Draws the runs (name, rows) into `out`, an .svg or .png file.
pub fn draw(runs: &[(String, Vec<Row>)], out: &Path) -> Result<()> {
    register_font()?;
    let panels = panels(runs);
    let (width, height) = (900u32, 300 * panels.len() as u32);
    // Drawn in memory, marked as hotspa's (so that `plot --force` knows its own), and written
    // atomically.
    let bytes = match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => {
            let mut svg = String::new();
            draw_on(
                SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area(),
                &panels,
                out,
            )?;
            format!("{SVG_MARK}\n{svg}").into_bytes()
        }
        Some("png") => {
            let mut rgb = vec![0u8; (width * height * 3) as usize];
            draw_on(
                BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area(),
                &panels,
                out,
            )?;
            let mut png = Vec::new();
            let mut enc = png::Encoder::new(&mut png, width, height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("Software".into(), PNG_MARK.into())?;
            let mut w = enc.write_header()?;
            w.write_image_data(&rgb)?;
            w.finish()?;
            png
        }
        _ => bail!("{}: write a .svg or .png file", out.display()),
    };
    model::write_atomic(out, &bytes)?;
    Ok(())
}

/// The first line of every SVG plot hotspa draws.
const SVG_MARK: &str = "<!-- drawn by hotspa plot -->";
/// The `Software` text of every PNG plot hotspa draws.
const PNG_MARK: &str = "hotspa plot";

/// Whether `path` is a plot hotspa drew (an SVG starting with its mark, a PNG whose `Software`
/// text names it).
pub fn drawn_by_hotspa(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    if bytes.starts_with(SVG_MARK.as_bytes()) {
        return true;
    }
    let Ok(reader) = png::Decoder::new(std::io::Cursor::new(bytes)).read_info() else {
        return false;
    };
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .any(|t| t.keyword == "Software" && t.text == PNG_MARK)
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    panels: &[Panel],
    out: &Path,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, p) in areas.iter().zip(panels) {
        panel(area, p)?;
    }
    root.present()
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let series = &p.series;
    let all = series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(1e-9, f64::max);
    let lo = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(p.x)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &color))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// Plots a metrics file (used by the default training run).
pub fn plot_file(metrics: &Path, out: &Path) -> Result<()> {
    draw(&[(String::new(), read(metrics)?)], out)
}
