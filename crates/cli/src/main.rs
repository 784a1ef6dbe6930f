//! `hotspa`: the command line. Only subcommands that work exist.

// Command modules (one per subcommand; none imports another)…
mod bench;
mod conformance_cmd;
mod eval_cmd;
mod generate_cmd;
mod graph_cmd;
mod plan_cmd;
mod plot_cmd;
mod profile_cmd;
mod simulate_cmd;
mod switch_cmd;
mod train_cmd;
// …and what they share.
mod chart;
mod flags;
mod output;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hotspa",
    version,
    about = "Training LLaMA-family models with parallelism hot switching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure this machine: GEMM, collectives, attention. Prints a table, or one JSON object
    /// with --json.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Check a backend's kernels against the CPU backend (exit status 1 on any failure).
    Conformance(conformance_cmd::Args),
    /// Print the exec graph of a strategy for review.
    Graph(graph_cmd::Args),
    /// Train a LLaMA model on thread devices (or MPI processes) under a parallel strategy.
    Train(Box<flags::TrainFlags>),
    /// A model's loss and perplexity on held-out data.
    Eval(eval_cmd::Args),
    /// Continue a prompt with a model (CPU, KV cache; greedy or sampled), streaming the text.
    Generate(generate_cmd::Args),
    /// The switch plan between two strategies' parameter layouts, against its lower bound.
    SwitchPlan(switch_cmd::Args),
    /// Plot loss (against step and time), tokens/s, time and wire bytes per step from one or
    /// more metrics files, overlaid (SVG or PNG).
    Plot(plot_cmd::Args),
    /// Estimate a cluster setting by the cost model: the best static strategy, the HotSPa
    /// paper's hand-picked plan and the automatic plan (or `--paper`: the paper's grid).
    Simulate(simulate_cmd::Args),
    /// Calibrate the cost model on this machine's CPU backend (a cluster file for `plan` and
    /// `simulate --cluster`).
    Profile(profile_cmd::Args),
    /// The cost model's estimate of a training command (the flags of `train`), calibrated by
    /// `profile`, with the best static strategy and the automatic plan for its batches.
    Plan(Box<plan_cmd::PlanArgs>),
}

/// The error and every cause on one line, joined by `: ` (a cause whose text the message
/// already holds is not repeated).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

fn main() {
    let Err(e) = dispatch() else {
        return;
    };
    let e = one_line(&e);
    match comm::mpi::launch() {
        // Under mpirun every rank meets the same argument and configuration errors: one line
        // each from the others, the whole error from rank 0.
        Some((rank, size)) if size > 1 && rank != 0 => {
            eprintln!("Error (MPI rank {rank} of {size}): {e}")
        }
        // The reason on the first line: the context and every cause, joined by `: `.
        _ => eprintln!("Error: {e}"),
    }
    std::process::exit(1);
}

fn dispatch() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The flags given on the command line (the default run changes only the others).
    let given: Vec<String> = matches
        .subcommand_matches("train")
        .map(|m| {
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default();
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::Conformance(args) => conformance_cmd::run(args),
        Command::Graph(args) => graph_cmd::run(args),
        // `hotspa train` alone (or with --default-run) runs the embedded default.
        Command::Train(args) => train_cmd::run(*args, &given),
        Command::Plot(args) => plot_cmd::run(args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Generate(args) => generate_cmd::run(args),
        Command::SwitchPlan(args) => switch_cmd::run(args),
        Command::Simulate(args) => simulate_cmd::run(args),
        Command::Profile(args) => profile_cmd::run(args),
        Command::Plan(args) => plan_cmd::run(*args),
    }
}
