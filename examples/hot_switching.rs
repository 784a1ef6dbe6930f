//! Hot switching through the library: the tiny LLaMA of `examples/tiny-llama` trained on the
//! paragraphs of this project's README and architecture notes (byte tokens: short and long
//! ones) on 4 thread devices — short paragraphs under DP4, medium ones under DP2×TP2, long ones
//! under TP4, switching inside every step.
//!
//! Run from the repository root: `cargo run --release -p train --example hot_switching`.

use std::path::Path;

use train::{DataSource, StrategySpec, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut paragraphs = Vec::new();
    for file in ["README.md", "docs/architecture.md"] {
        let text = std::fs::read_to_string(file)?;
        paragraphs.extend(
            text.split("\n\n")
                .map(|p| p.bytes().map(u32::from).collect()),
        );
    }
    let model = model::LlamaConfig::load(Path::new("examples/tiny-llama"))?;
    let mut cfg = TrainConfig::new(model, DataSource::Sequences(paragraphs));
    cfg.devices = 4;
    cfg.strategy = StrategySpec::Hot(planner::Plan::parse("dp4:64,dp2tp2:160,tp4:max", 4)?);
    cfg.max_len = Some(256);
    cfg.global_batch = 16;
    cfg.steps = 20;
    cfg.lr.peak = 3e-3;
    let out = train::run(&cfg, &mut train::NoSink)?;
    for m in &out.steps {
        let hot = m.hot.as_ref().map_or(String::new(), |h| {
            format!(
                "  {:?}, {} bytes switched",
                h.strategy_seconds, h.switch_bytes
            )
        });
        println!("step {:>2}  loss {:.4}{hot}", m.step, m.loss);
    }
    println!(
        "{} held the weights; {:.0} tokens/s",
        out.inst,
        out.tokens_per_s()
    );
    Ok(())
}
