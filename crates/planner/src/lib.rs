//! The cost model and the step planner (DESIGN §2.5): an analytic estimate of a step — compute
//! (FLOPs with attention's quadratic term over a calibrated efficiency), TP/SP and pipeline
//! communication (α–β over the links each group uses), 1F1B bubbles, the DP gradient reduction,
//! and switches from the switch planner's actual plans — a memory model that bounds each
//! strategy's micro-batch, and the search for the plan (strategies, bucket edges, packing) with
//! the least estimated step time.
//!
//! ```
//! use planner::{Cluster, CostModel, Efficiency, Link, Planner};
//!
//! let cluster = Cluster {
//!     name: "toy".into(),
//!     nodes: 1,
//!     devices_per_node: 4,
//!     peak_tflops: 100.0,
//!     efficiency: Efficiency { max: 0.6, half_tokens: 256.0, half_width: 256.0, attention: 0.3 },
//!     memory_gib: 80.0,
//!     same_node: Link { gbps: 200.0, latency_us: 5.0 },
//!     cross_node: Link { gbps: 25.0, latency_us: 10.0 },
//!     elem_bytes: 2.0,
//!     memory_gbps: 0.0,
//!     optimizer_gparams: 0.0,
//!     shared_cores: 0.0,
//!     compute_scale: 1.0,
//!     clock_scale: 0.0,
//!     kernel_overhead_us: 0.0,
//!     gemm_table: Vec::new(),
//!     attention_table: Vec::new(),
//! };
//! let cfg = model::LlamaConfig::preset("llama2-7b").unwrap();
//! let planner = Planner::new(CostModel::new(cluster, cfg));
//! let lens: Vec<usize> = (0..64).map(|i| if i % 16 == 0 { 16384 } else { 512 }).collect();
//! let (_, fixed) = planner.best_static(&lens)?;
//! let (plan, auto) = planner.auto(&lens)?;
//! assert!(auto.seconds <= fixed.seconds);
//! assert!(!plan.buckets.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cluster;
mod cost;
mod error;
mod memory;
mod plan;

pub use cluster::{Cluster, Efficiency, Link};
pub use cost::{Breakdown, CostModel, Memory, Packing, ACT_BYTES_PER_TOKEN_HIDDEN, USABLE_MEMORY};
pub use error::{PlanError, Result};
pub use memory::{pass_memory, stage_peak, PassMemory};
pub use plan::{Estimate, Plan, Planner};
