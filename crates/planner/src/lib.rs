//! The cost model and the step planner (DESIGN §2.5): an analytic estimate of a step — compute
//! (FLOPs with attention's quadratic term over a calibrated efficiency), TP/SP and pipeline
//! communication (α–β over the links each group uses), 1F1B bubbles, the DP gradient reduction,
//! and switches from the switch planner's actual plans — a memory model that bounds each
//! strategy's micro-batch, and the search for the plan (strategies, bucket edges, packing) with
//! the least estimated step time.
//!
//! ```
//! use planner::{Cluster, CostModel, Link, Planner};
//!
//! let cluster = Cluster::new(
//!     "toy",
//!     1,
//!     4,
//!     100.0,
//!     80.0,
//!     Link { gbps: 200.0, latency_us: 5.0 },
//!     Link { gbps: 25.0, latency_us: 10.0 },
//! );
//! let cfg = model::LlamaConfig::preset("llama2-7b").unwrap();
//! let planner = Planner::new(CostModel::new(cluster, cfg));
//! let lens: Vec<usize> = (0..64).map(|i| if i % 16 == 0 { 16384 } else { 512 }).collect();
//! let (_, fixed) = planner.best_static(&lens)?;
//! let (plan, auto) = planner.auto(&lens)?;
//! assert!(auto.seconds <= fixed.seconds);
//! assert!(!plan.buckets.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod cluster;
mod cost;
mod error;
pub mod exchange;
mod groups;
mod memory;
mod plan;
pub mod route;
pub mod timeline;

pub use cluster::{Cluster, Efficiency, Link};
pub use cost::{
    instantiation, quadratic_work, state_bytes_per_param, Breakdown, CostModel, Memory, Tensor,
    ACT_BYTES_PER_TOKEN_HIDDEN, USABLE_MEMORY,
};
pub use error::{PlanError, Result};
pub use groups::MAX_GROUPS;
pub use memory::{pass_memory, stage_peak, PassMemory};
pub use plan::{Estimate, Plan, Planner};
