//! LLaMA models the Hugging Face way (DESIGN §3): `LlamaConfig` from `config.json`, the parameter
//! catalogue with HF names, shapes and roles, random initialisation, and safetensors I/O (f32,
//! bf16 and f16 accepted on load; f32 written atomically with HF's `format: pt` metadata).
//!
//! ```
//! use model::{param_specs, LlamaConfig, Weights};
//! use std::path::Path;
//!
//! let cfg = LlamaConfig::from_json(
//!     r#"{"vocab_size": 64, "hidden_size": 16, "intermediate_size": 40,
//!         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!         "tie_word_embeddings": true, "architectures": ["LlamaForCausalLM"]}"#,
//!     Path::new("config.json"),
//! )?;
//! assert_eq!(cfg.head_dim(), 4);
//! let specs = param_specs(&cfg);
//! assert_eq!(specs[2].name, "model.layers.0.self_attn.k_proj.weight");
//! assert_eq!(specs[2].shape, vec![8, 16]);
//! let w = Weights::random(&cfg, 0);
//! assert_eq!(w.numel(), 64 * 16 + 2 * (16 * 16 * 2 + 8 * 16 * 2 + 3 * 40 * 16 + 2 * 16) + 16);
//! # Ok::<(), model::ModelError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod checkpoint;
mod config;
mod decoder;
mod error;
mod files;
pub mod folder;
pub mod generate;
pub mod generation_config;
pub mod manifest;
mod params;
mod shard;
mod weights;

pub use checkpoint::{remove_interrupted, Checkpoint};
pub use config::{LlamaConfig, RopeScalingConfig, TokenIds, HARMLESS, PRESETS};
pub use decoder::{build_graph, build_stage_graph};
pub use error::{ModelError, Result};
pub use files::{beside, write_atomic};
pub use folder::{
    has_weights, load_weights, load_weights_checked, save_folder, CarriedFile, Dtype, SaveOptions,
};
pub use generate::{generate, Generator, Sampling};
pub use manifest::Checksums;
pub use params::{param_specs, ParamSpec, Role};
pub use shard::{
    gather_weights, held, placements, placements_at, rank_exec, rank_params, switch_tensors,
    switch_tensors_at, Held, RankParams,
};
pub use weights::{Weights, INIT_STD};
