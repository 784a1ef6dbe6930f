//! `hotspa bench switch`: real switches of a model's parameters between strategies on thread
//! ranks, timed, against their lower bound at this machine's memcpy bandwidth.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use comm::{Communicator, ThreadComm};
use dstate::DeviceId;
use graph::Strategy;
use model::LlamaConfig;
use serde::Serialize;
use switch::{destination_pieces, execute_into, lower_bound, plan, LinkClass, Method, Topology};

use super::emit;
use super::machine::{memcpy_all_cores_gbps, memcpy_gbps};

#[derive(ClapArgs)]
pub struct Args {
    /// A preset or config.json (default: a 110 M-parameter LLaMA: hidden 768, 12 layers).
    #[arg(long)]
    model: Option<String>,
    /// Thread devices.
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Switches as FROM:TO, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["dp4:tp4".to_string(), "tp4:dp4".to_string(), "dp2tp2:tp2pp2".to_string(), "tp2pp2:dp4".to_string(), "tp4:dp2tp2".to_string()])]
    switches: Vec<String>,
    /// Timed repetitions per switch (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// A 110 M LLaMA: 12 layers of width 768.
const DEFAULT_MODEL: [usize; 6] = [32000, 768, 2048, 12, 12, 12];

#[derive(Serialize)]
struct Row {
    from: String,
    to: String,
    moved_bytes: u64,
    bound_bytes: u64,
    /// Bytes copied inside devices (kept regions), all devices together.
    local_bytes: u64,
    seconds: f64,
    /// The busiest device's moved bytes at one memcpy's bandwidth.
    device_bound_seconds: f64,
    /// All devices' written bytes (moved and kept) at the all-core memcpy bandwidth.
    machine_bound_seconds: f64,
    /// The larger of the two.
    bound_seconds: f64,
    over_bound: f64,
    over_device_bound: f64,
    planning_ms: f64,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = match &args.model {
        Some(m) => LlamaConfig::preset_or_load(m)?,
        None => LlamaConfig::from_json(
            &super::llama_config(DEFAULT_MODEL).to_string(),
            std::path::Path::new("default"),
        )?,
    };
    let gbps = memcpy_gbps(64 << 20);
    let all_cores_gbps = memcpy_all_cores_gbps(128 << 20);
    let mut rows = Vec::new();
    for s in &args.switches {
        let (a, b) = s
            .split_once(':')
            .with_context(|| format!("--switches {s}: use FROM:TO"))?;
        let (sa, sb) = (
            Strategy::parse(a, args.devices)?,
            Strategy::parse(b, args.devices)?,
        );
        let ts = model::switch_tensors(&cfg, &sa, &sb)?;
        let topo = Topology::new(args.devices);
        let t0 = Instant::now();
        let p = Arc::new(plan(&ts, topo, Method::Exact)?);
        let planning_ms = t0.elapsed().as_secs_f64() * 1e3;
        let lb = lower_bound(&ts, topo)?;
        let bound = LinkClass::ALL
            .iter()
            .map(|c| (lb[c.index()].0 as f64).max(lb[c.index()].1))
            .fold(0.0, f64::max)
            * 4.0;
        let p2 = p.clone();
        let repeat = args.repeat.max(1);
        let times = ThreadComm::run(args.devices, move |c| -> anyhow::Result<Vec<f64>> {
            let me = DeviceId(c.rank().0);
            // Each rank's source pieces, filled with arbitrary values (nothing is checked here;
            // the switch crate's tests check contents).
            let mine: switch::Pieces = p2
                .tensors
                .iter()
                .map(|t| {
                    t.src.piece_of(me, &t.shape).map(|o| {
                        o.map(|piece| {
                            let n = piece.region.volume();
                            (piece.region, vec![1.0f32; n])
                        })
                    })
                })
                .collect::<Result<_, _>>()?;
            // Destination buffers allocated once; the first run warms them and the pools.
            let mut dst = destination_pieces(&p2, me)?;
            let mut out = Vec::new();
            for _ in 0..repeat + 1 {
                c.barrier()?;
                let t = Instant::now();
                execute_into(&p2, &c, &mine, &mut dst)?;
                c.barrier()?;
                out.push(t.elapsed().as_secs_f64());
            }
            Ok(out)
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut per_run: Vec<f64> = (1..=repeat)
            .map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max))
            .collect();
        per_run.sort_by(f64::total_cmp);
        let seconds = per_run[per_run.len() / 2];
        // Every value a device ends with is written once: received, or copied from its own
        // source piece. All devices together write no faster than the machine copies.
        let local = p.local.iter().map(|c| c.region.volume()).sum::<usize>() as f64 * 4.0;
        let written = p.moved() as f64 * 4.0 + local;
        let device_seconds = bound / (gbps * 1e9);
        let machine_seconds = written / (all_cores_gbps * 1e9);
        let bound_seconds = device_seconds.max(machine_seconds);
        rows.push(Row {
            from: sa.to_string(),
            to: sb.to_string(),
            moved_bytes: p.moved() as u64 * 4,
            bound_bytes: bound as u64,
            local_bytes: local as u64,
            device_bound_seconds: device_seconds,
            machine_bound_seconds: machine_seconds,
            seconds,
            bound_seconds,
            over_bound: if bound_seconds > 0.0 {
                seconds / bound_seconds
            } else {
                f64::NAN
            },
            over_device_bound: if device_seconds > 0.0 {
                seconds / device_seconds
            } else {
                f64::NAN
            },
            planning_ms,
        });
    }
    let params: usize = model::param_specs(&cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let report = serde_json::json!({"bench": "switch", "devices": args.devices, "params": params,
        "memcpy_gbps": gbps, "memcpy_all_cores_gbps": all_cores_gbps, "rows": rows});
    emit(args.json, &report, |_| {
        println!(
            "parameter switches (f32) of a {:.0} M-parameter LLaMA on {} thread devices; memcpy {:.1} GB/s on one core, {:.1} GB/s on all {}",
            params as f64 / 1e6,
            args.devices,
            gbps,
            all_cores_gbps,
            kernels::available_cores()
        );
        println!(
            "{:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7}",
            "from",
            "to",
            "moved MB",
            "bound MB",
            "local MB",
            "ms",
            "dev ms",
            "mach ms",
            "ratio",
            "r.dev",
            "plan ms"
        );
        let ratio = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.2}")
            }
        };
        for r in &rows {
            println!(
                "{:>8} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>6} {:>7.1}",
                r.from,
                r.to,
                r.moved_bytes as f64 / 1e6,
                r.bound_bytes as f64 / 1e6,
                r.local_bytes as f64 / 1e6,
                r.seconds * 1e3,
                r.device_bound_seconds * 1e3,
                r.machine_bound_seconds * 1e3,
                ratio(r.over_bound),
                ratio(r.over_device_bound),
                r.planning_ms
            );
        }
        println!("(dev ms: the busiest device's moved bytes (bound MB) at one core's memcpy; mach ms: every device's written bytes, moved + local, at all cores' memcpy; ratio = ms / the larger bound, r.dev = ms / dev ms)");
    })
}
