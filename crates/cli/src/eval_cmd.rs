//! `hotspa eval`: a model's loss and perplexity on held-out data, over every predicted token,
//! under any strategy and device count.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::flags::TrainFlags;

#[derive(ClapArgs)]
pub struct Args {
    /// A model folder (config.json, weights, tokenizer) or config.json (weights from --init).
    #[arg(long)]
    model: PathBuf,
    /// Held-out data: JSONL, a directory of text files, a Megatron indexed dataset or Parquet.
    #[arg(long)]
    data: PathBuf,
    /// Weights (default: the model folder's).
    #[arg(long)]
    init: Option<String>,
    /// A tokenizer.json or `bytes` (default: the model folder's tokenizer.json, else bytes).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Append the end-of-sequence id after every text document.
    #[arg(long)]
    append_eos: bool,
    /// Thread ranks (under mpirun: the world size).
    #[arg(long)]
    devices: Option<usize>,
    /// Parallel strategy (default: dp over every device).
    #[arg(long)]
    strategy: Option<String>,
    /// Documents longer than this are cut into pieces (default: max_position_embeddings).
    #[arg(long)]
    max_len: Option<usize>,
    /// Sequences evaluated at a time.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Token budget of a micro-batch.
    #[arg(long, default_value_t = 4096)]
    micro_batch_tokens: usize,
    /// One JSON object on stdout instead of a line.
    #[arg(long)]
    json: bool,
}

pub fn run(mut args: Args) -> Result<()> {
    args.model = crate::output::model_folder(&args.model);
    let flags = TrainFlags {
        model: Some(args.model.clone()),
        data: Some(args.data.clone()),
        init: args.init,
        tokenizer: args.tokenizer,
        append_eos: args.append_eos,
        devices: args.devices,
        strategy: args.strategy,
        max_len: args.max_len,
        global_batch: args.batch,
        micro_batch_tokens: vec![args.micro_batch_tokens],
        steps: 1,
        shuffle: "off".into(),
        ..TrainFlags::defaults()
    };
    let cfg = flags.config()?;
    if matches!(cfg.init, train::Init::Random) {
        anyhow::bail!(
            "{} holds no weights: pass --init FILE|FOLDER (evaluating random weights says nothing)",
            args.model.display()
        );
    }
    let e = train::evaluate(&cfg, &mut crate::output::Notices)?;
    crate::output::emit(args.json, &e, |e| {
        println!(
            "{}: loss {:.6}, perplexity {:.4} over {} predicted tokens of {} sequences",
            args.data.display(),
            e.loss,
            e.perplexity,
            e.predicted_tokens,
            e.sequences
        );
    })
}
