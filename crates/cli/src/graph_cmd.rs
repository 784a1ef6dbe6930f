//! `hotspa graph`: print a strategy's exec graph for review.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use graph::Strategy;
use model::{build_graph, build_stage_graph, LlamaConfig};

#[derive(ClapArgs)]
pub struct Args {
    /// An HF `config.json`, or the directory holding it.
    #[arg(long)]
    model: PathBuf,
    /// The strategy, e.g. `dp2tp2`, `tp4sp`, `tp2pp2`, `dp4zero1`; several, comma-separated,
    /// print the shared logical graph's comm points with a dummy where a strategy needs none.
    #[arg(long, default_value = "dp1")]
    strategy: String,
    /// Number of devices the strategy spans.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Print only the forward graph.
    #[arg(long)]
    forward_only: bool,
    /// Token count of the micro-batch used to size the comm ops in the per-rank summary.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
}

/// Per rank of DP replica 0 of `stage`: every comm op with its kind, its group (world ranks) and
/// the bytes of this rank's piece it puts in.
fn comm_per_rank(
    exec: &graph::ExecGraph,
    strategy: &Strategy,
    stage: usize,
    tokens: usize,
) -> Result<()> {
    for r in 0..strategy.tp {
        let world = strategy.rank_of(stage, 0, r);
        let mut total = 0usize;
        let mut lines = Vec::new();
        for op in &exec.graph.ops {
            let graph::OpKind::Comm { collective, axis } = op.kind else {
                continue;
            };
            let x = op.inputs[0];
            let state = &exec.states[x.0];
            let shape = exec.graph.info(x).resolve(tokens);
            let bytes = state.piece(r, &shape)?.region.volume() * 4;
            let coords = state.coords(r)?;
            let group: Vec<usize> = (0..state.axes()[axis].degree)
                .map(|j| {
                    let mut c = coords.clone();
                    c[axis] = j;
                    strategy.rank_of(stage, 0, state.index_of(&c))
                })
                .collect();
            if collective.communicates() {
                total += bytes;
            }
            lines.push(format!(
                "#   {} {}: {} over ranks {:?}, {} B",
                op.outputs[0],
                exec.graph.info(op.outputs[0]).name,
                collective.name(),
                group,
                bytes
            ));
        }
        println!(
            "# rank {world} (tp {r}) at T = {tokens}: {} comm ops, {total} B put in",
            lines.len()
        );
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}

/// What every attention op exchanges over its CP group, and the bytes per rank at `tokens`.
fn context_exchange(cfg: &LlamaConfig, strategy: &Strategy, tokens: usize) {
    let cp = strategy.cp;
    let heads = cfg.num_attention_heads / strategy.tp;
    let kv = (cfg.kv_heads() / strategy.tp).max(1);
    let head_dim = cfg.hidden_size / cfg.num_attention_heads;
    let n = tokens.div_ceil(cp);
    let x = strategy.cp_exchange;
    let (fwd, bwd) = x.bytes_per_rank(cp, n, heads, kv, head_dim);
    println!(
        "# context parallelism cp{cp} ({x}) over CP groups such as ranks {:?}: every sequence \
         cut in {} chunks, rank r of a group holding chunks r and {}−r",
        strategy.group(0, graph::MeshAxis::Cp),
        2 * cp,
        2 * cp - 1
    );
    let how = match x {
        graph::CpExchange::Ring => format!(
            "K,V -> ring ({} hop(s), softmax merged per block)@cp; backward K,V,dK,dV -> ring \
             ({} hop(s)) + dK,dV home@cp",
            cp - 1,
            cp - 1
        ),
        graph::CpExchange::Ulysses => "Q,K,V [S(0)×{cp}] -> all-to-all -> heads [S(1)×{cp}]@cp, \
             whole-sequence attention, O,lse -> all-to-all back@cp; backward the same for \
             dO,Q,O,lse,K,V and dQ,dK,dV"
            .replace("{cp}", &cp.to_string()),
    };
    println!(
        "#   every attention ({} layers): {how}",
        cfg.num_hidden_layers
    );
    println!(
        "#   per rank at T = {tokens} ({n} tokens each, {heads} heads, {kv} kv heads × \
         {head_dim}): forward {fwd} B, backward {bwd} B per layer"
    );
}

pub fn run(args: Args) -> Result<()> {
    let cfg = LlamaConfig::load(&args.model)?;
    if args.strategy.contains(',') {
        return shared_view(&cfg, &args);
    }
    let strategy = Strategy::parse(&args.strategy, args.devices)?;
    let mut g = build_graph(&cfg).context("building the LLaMA graph")?;
    if !args.forward_only {
        graph::backward(&mut g).context("differentiating the graph")?;
    }
    if strategy.devices() == 1 {
        println!("# strategy {strategy} on 1 device: rank 0, no communication");
        print!("{g}");
    } else {
        if args.forward_only {
            bail!("--forward-only prints the logical graph; multi-device exec graphs include the backward");
        }
        let stages = strategy.stage_layers(cfg.num_hidden_layers)?;
        for (s, layers) in stages.iter().enumerate() {
            let last = s + 1 == stages.len();
            if stages.len() > 1 {
                g = build_stage_graph(&cfg, layers.clone(), s == 0, last)?;
                graph::backward(&mut g)?;
                println!("# pipeline stage {s}: layers {layers:?}");
            }
            let exec = graph::lower(&g, &strategy)?;
            print!("{exec}");
            comm_per_rank(&exec, &strategy, s, args.tokens)?;
            let comm = exec
                .graph
                .ops
                .iter()
                .filter(|o| matches!(o.kind, graph::OpKind::Comm { .. }))
                .count();
            println!(
                "# {comm} comm ops per TP rank; {} activation input(s) from the previous stage, {} output(s) to the next",
                exec.graph.inputs.len(),
                exec.graph.outputs.len()
            );
            g = exec.graph;
        }
        if strategy.cp > 1 {
            context_exchange(&cfg, &strategy, args.tokens);
        }
        println!(
            "# DP replicas ({}) all-reduce every gradient after the last micro-batch",
            if strategy.cp > 1 {
                format!(
                    "dp{} × cp{} = {}",
                    strategy.dp,
                    strategy.cp,
                    strategy.replicas()
                )
            } else {
                strategy.dp.to_string()
            }
        );
    }
    let params: usize = g.params.iter().map(|&p| g.info(p).numel(0)).sum();
    println!(
        "# {} ops, {} tensors, {} parameters ({} values){}",
        g.ops.len(),
        g.tensors.len(),
        g.params.len(),
        params,
        if strategy.pp > 1 {
            " in the last stage"
        } else {
            ""
        }
    );
    Ok(())
}

fn shared_view(cfg: &LlamaConfig, args: &Args) -> Result<()> {
    let mut g = build_graph(cfg).context("building the LLaMA graph")?;
    graph::backward(&mut g)?;
    let mut execs = Vec::new();
    for spec in args.strategy.split(',') {
        let s = Strategy::parse(spec, args.devices)?;
        if s.pp > 1 {
            bail!("strategy {s}: the shared view compares strategies without pipeline stages");
        }
        if s.recompute != graph::Recompute::None {
            bail!(
                "strategy {s}: the shared view compares strategies on one logical graph, which \
                 recomputation rewrites per strategy; print {s} alone"
            );
        }
        execs.push(graph::lower(&g, &s)?);
    }
    let shared = graph::SharedComm::new(&g, &execs);
    println!(
        "# one logical graph, {} comm points; per strategy: collectives, or dummy",
        shared.points.len()
    );
    print!("{shared}");
    for (k, s) in shared.strategies.iter().enumerate() {
        println!(
            "# {s}: {} real, {} dummy",
            shared.points.len() - shared.dummies(k),
            shared.dummies(k)
        );
    }
    Ok(())
}
