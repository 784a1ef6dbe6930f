//! The hotspa trainer as a library (DESIGN §4 `train`): a typed [`TrainConfig`], the rank loop
//! over thread ranks or MPI processes, the step runners behind the [`StepRunner`] seam (one
//! strategy, a hot-switching schedule, or the planner's choice every step), the gradient
//! agreement between DP replicas behind [`runtime::GradientAgreement`], pieces gathered on rank
//! 0, checkpoints, and [`StepMetrics`] sent to [`Sink`]s.
//!
//! Train a tiny LLaMA on two thread devices, short sequences under DP, long ones under TP,
//! switching inside every step:
//!
//! ```
//! use std::path::Path;
//! use train::{DataSource, StrategySpec, TrainConfig};
//!
//! let model = model::LlamaConfig::from_json(
//!     r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 22,
//!         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
//!     Path::new("config.json"),
//! )?;
//! let seqs: Vec<Vec<u32>> = (0..16u32)
//!     .map(|i| (0..3 + (i % 4) * 7).map(|j| (i * 7 + j * j) % 40).collect())
//!     .collect();
//! let mut cfg = TrainConfig::new(model, DataSource::Sequences(seqs));
//! cfg.devices = 2;
//! cfg.strategy = StrategySpec::Hot(planner::Plan::parse("dp2:8,tp2:max", 2)?);
//! cfg.steps = 3;
//! let out = train::run(&cfg, &mut train::NoSink)?;
//! assert_eq!(out.inst.to_string(), "tp2"); // the least model state per device
//! let last = &out.steps[2];
//! assert!(last.loss < out.steps[0].loss);
//! assert!(last.hot.as_ref().unwrap().switch_bytes > 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod agreement;
mod checkpoints;
mod clocked;
mod config;
mod error;
mod eval;
pub mod exchange;
mod fed;
pub mod gather;
mod hot;
mod inputs;
mod job;
mod loss;
mod metrics;
mod optim;
pub mod outputs;
mod planning;
mod powersgd;
mod prepare;
mod priority;
mod profile;
mod ps;
mod rank;
mod rank_state;
mod replica;
pub mod resources;
mod run;
mod runner;
mod settings;
mod stashing;
mod sync;
mod trainer;
pub mod watchdog;

pub use checkpoints::CheckpointDir;
pub use clocked::{clock_against_model, ClockedStep};
pub use config::{
    AutoPlanning, Buckets, Checkpointing, DataSource, Decay, Device, Evaluating, Init, LrSchedule,
    PackingPolicy, StrategySpec, Tokenizer, TrainConfig, KEEP_LAST,
};
pub use error::{Result, TrainError};
pub use eval::evaluate;
pub use hot::{HotRank, HotSetup, HotStep};
pub use inputs::load_data;
pub use loss::Evaluation;
pub use metrics::{
    read_metrics, EvalMetrics, Fanout, FedMetrics, HotMetrics, JsonLines, NoSink, PlanMetrics,
    PsMetrics, SimulatedMetrics, SimulatedPhases, Sink, StepMetrics, WireMetrics, WorkerStep,
};
pub use planning::{batch_lengths, cost_model, plan_of, planner, BucketSizer};
pub use profile::{profile, Profile, CURVE_INPUT_DIM};
pub use rank::PLAN_CACHE;
pub use run::{run, TrainOutcome};
pub use runner::{HotRunner, PlannedRunner, StaticRunner, StepGradients, StepInput, StepRunner};
pub use settings::{
    FedWeighting, Federated, OptimizerKind, ParamServers, Placement, Sharding, SlowRank, SyncMode,
    OUTER_LR, OUTER_MOMENTUM,
};
