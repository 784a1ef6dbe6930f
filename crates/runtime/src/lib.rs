//! Runs exec graphs on one rank (DESIGN §4 `runtime`): micro-batch packing (sequences back to
//! back, positions restarting at 0, `cu_seqlens` for attention, dealt and packed by
//! [`data::Packing`]), an executor over any [`kernels::Backend`] that frees activations after
//! their last use and reports peak bytes, a strategy's step on its TP, DP and PP groups under a
//! pipeline schedule with the DP gradients agreed by a [`GradientAgreement`] in buckets that
//! overlap the backward, and the optimizer step (clipping, AdamW, ZeRO-1/2/3).
//!
//! ```
//! use graph::{backward, GraphBuilder};
//! use kernels::{Backend, CpuBackend};
//! use runtime::{run, MicroBatch};
//!
//! let mut b = GraphBuilder::new();
//! let emb = b.param("embed", &[5, 3]);
//! let x = b.embedding(emb, "x")?;
//! let logits = b.linear(x, emb, "logits")?; // tied weights
//! b.cross_entropy(logits, "loss")?;
//! let mut g = b.finish()?;
//! backward(&mut g)?;
//!
//! let cpu = CpuBackend::new(1)?;
//! let w = cpu.upload(&[0.0; 15])?;
//! let batch = MicroBatch::pack(&[vec![1, 2, 3], vec![4, 0]], 1.0 / 3.0)?;
//! let out = run(&cpu, &g, &[w], &batch)?;
//! assert!((out.loss - 5f32.ln()).abs() < 1e-6); // uniform over 5 tokens
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod agreement;
mod batch;
pub mod context;
mod error;
mod executor;
pub mod host;
mod optimizer;
mod parallel;
mod pipeline;
pub mod profile;
pub mod progress;
mod reducer;
mod stashing;
pub mod stream;
mod tp;
pub mod zero;

pub use agreement::{BucketKey, ExactAllReduce, GradientAgreement};
pub use batch::{micro_batches, rank_micro_batches, MicroBatch};
pub use error::{Result, RuntimeError};
pub use executor::{run, run_exec, Pass, StepOutput, Suspended};
pub use optimizer::{Lent, Moments, Optimizer};
pub use parallel::{CommSchedule, RankGroups, StepGradients};
pub use pipeline::{pipeline_step, step_gradients};
pub use stashing::{stash, Stashed, Stashing, Weights};
pub use stream::{Gate, ParamView};
pub use tp::TpGroup;
