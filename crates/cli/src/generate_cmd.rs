//! `hotspa generate`: continue a prompt with a model on the CPU (a KV cache), greedy or
//! sampled as the flags or the model folder's `generation_config.json` say, printing the text
//! as it comes.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use data::TextTokenizer;
use model::generation_config::GenerationConfig;
use model::{LlamaConfig, Sampling};

#[derive(ClapArgs)]
pub struct Args {
    /// A model folder (config.json, weights, tokenizer), e.g. a run's `model/` or a checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// Weights (default: the model folder's).
    #[arg(long)]
    init: Option<PathBuf>,
    /// A tokenizer.json or `bytes` (default: the model folder's tokenizer.json, else bytes).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Most new tokens (default: the generation config's `max_new_tokens`, or its `max_length`
    /// less the prompt, else 128).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0: greedy (the most likely token each time); above 0, sample with this temperature
    /// (default: as the generation config says; greedy without one).
    #[arg(long, allow_hyphen_values = true)]
    temperature: Option<f64>,
    /// Sample among the k most likely tokens only, 0: all (default: the generation config's,
    /// else transformers' 50).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability reaches p, 1: all (default: the
    /// generation config's, else 1).
    #[arg(long, allow_hyphen_values = true)]
    top_p: Option<f64>,
    /// Whose defaults for sampling, stopping and length: `auto` (the model folder's
    /// generation_config.json when it has one, as transformers' generate() reads it; else
    /// transformers' defaults), `none` (transformers' defaults), or a generation_config.json
    /// (or a folder holding one).
    #[arg(long, default_value = "auto")]
    generation_config: String,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Let the prompt and the new tokens run past the model's max_position_embeddings (RoPE
    /// goes on as in transformers, but the model was not made for those positions); without
    /// it the new tokens stop there.
    #[arg(long)]
    past_max_positions: bool,
}

pub fn run(mut args: Args) -> Result<()> {
    args.model = crate::output::model_folder(&args.model);
    let gen = match args.generation_config.as_str() {
        "none" => GenerationConfig::default(),
        "auto" => GenerationConfig::load(&args.model)?.unwrap_or_default(),
        p => {
            let p = std::path::Path::new(p);
            if p.is_dir() {
                GenerationConfig::load(p)?.with_context(|| {
                    format!(
                        "--generation-config {}: no generation_config.json there",
                        p.display()
                    )
                })?
            } else {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("--generation-config {}", p.display()))?;
                GenerationConfig::from_json(&text, p)?
            }
        }
    };
    // A flag overrides the generation config; greedy unless one of them asks to sample.
    let sampling = Sampling {
        temperature: args
            .temperature
            .unwrap_or(if gen.do_sample { gen.temperature } else { 0.0 }),
        top_k: args.top_k.unwrap_or(gen.top_k),
        top_p: args.top_p.unwrap_or(gen.top_p),
        seed: args.seed,
    };
    // The flags, by their names, before anything is loaded or printed.
    sampling.check().map_err(|e| match e {
        model::ModelError::InvalidGeneration { setting, reason } => {
            anyhow::anyhow!("--{} {reason}", setting.replace('_', "-"))
        }
        e => e.into(),
    })?;
    let cfg = LlamaConfig::load(&args.model)?;
    let from = args.init.clone().unwrap_or_else(|| args.model.clone());
    if let (None, Some(file)) = (&args.init, model::folder::foreign_weights(&args.model)) {
        bail!(
            "{}",
            model::folder::foreign_weights_reason(&args.model, &file)
        );
    }
    if args.init.is_none() && !model::has_weights(&args.model) {
        bail!(
            "{} holds no weights (model.safetensors or an index); pass --init FILE|FOLDER",
            args.model.display()
        );
    }
    let (weights, _, checked) = model::load_weights_checked(&cfg, &from)?;
    eprintln!("weights from {}: {checked}", from.display());
    let folder_tok = args.model.join("tokenizer.json");
    let tokenizer = match args.tokenizer.as_deref() {
        Some("bytes") => TextTokenizer::bytes(),
        Some(p) => TextTokenizer::from_path(std::path::Path::new(p))?,
        None if folder_tok.is_file() => TextTokenizer::from_path(&folder_tok)?,
        None => TextTokenizer::bytes(),
    };
    if tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "the tokenizer has {} ids but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    let prompt = tokenizer.encode(&args.prompt).map_err(anyhow::Error::msg)?;
    if prompt.is_empty() {
        bail!("--prompt is empty after tokenizing: give at least one token of text");
    }
    let limit = cfg.max_position_embeddings;
    let wanted = args
        .max_new_tokens
        .or(gen.max_new_tokens)
        .or(gen.max_length.map(|m| m.saturating_sub(prompt.len())))
        .unwrap_or(128);
    let room = limit.saturating_sub(prompt.len());
    let max_new = if args.past_max_positions || wanted <= room {
        wanted
    } else if args.max_new_tokens.is_some() {
        bail!(
            "--max-new-tokens {wanted}: the prompt ({} tokens) and {wanted} new ones reach position \
             {}, past the model's max_position_embeddings ({limit}); ask for at most {room}, or \
             pass --past-max-positions to go on past it",
            prompt.len(),
            prompt.len() + wanted
        );
    } else {
        if room == 0 {
            bail!(
                "the prompt ({} tokens) already fills the model's max_position_embeddings \
                 ({limit}); shorten it, or pass --past-max-positions",
                prompt.len()
            );
        }
        eprintln!(
            "note: at most {room} new tokens: the prompt ({} tokens) and {wanted} new ones would \
             pass the model's max_position_embeddings ({limit}); --past-max-positions goes on",
            prompt.len()
        );
        room
    };
    let last = prompt.len() + max_new;
    if last > limit {
        eprintln!(
            "note: the prompt ({} tokens) and up to {} new ones reach position {last}, beyond \
             the model's max_position_embeddings ({limit}): RoPE goes on past it as in \
             transformers, but the model was not made for those positions",
            prompt.len(),
            max_new,
        );
    }
    let stop: Vec<u32> = if args.ignore_eos {
        Vec::new()
    } else {
        gen.eos
            .clone()
            .or_else(|| cfg.eos_token_id.as_ref().map(|e| e.ids()))
            .or_else(|| tokenizer.eos_id().map(|e| vec![e]))
            .unwrap_or_default()
    };
    if let Some(bad) = stop.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "the end-of-sequence id {bad} (of the generation config) is outside the model's \
             vocabulary of {}: it could never be generated, so generation would not stop there",
            cfg.vocab_size
        );
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    out.flush()?;
    // Decode everything so far and print what is new: multi-byte characters and merged pieces
    // come out whole.
    let mut ids: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let mut failed: Option<std::io::Error> = None;
    model::generate(
        &cfg,
        &weights,
        &prompt,
        max_new,
        &sampling,
        &stop,
        &mut |t| {
            if stop.contains(&t) {
                return false;
            }
            ids.push(t);
            let text = tokenizer.decode(&ids);
            let new = text
                .strip_prefix(shown.as_str())
                .unwrap_or(&text)
                .to_string();
            // Hold back a trailing replacement character: the rest of its bytes may follow.
            if !new.ends_with('\u{FFFD}') {
                if let Err(e) = write!(out, "{new}").and_then(|_| out.flush()) {
                    failed = Some(e);
                    return false;
                }
                shown = text;
                // After a line, decoding starts afresh (as transformers' TextStreamer): the
                // text so far is never decoded again, so streaming stays linear.
                if shown.ends_with('\n') {
                    ids.clear();
                    shown.clear();
                }
            }
            true
        },
    )
    .context("generating")?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    writeln!(out)?;
    Ok(())
}
