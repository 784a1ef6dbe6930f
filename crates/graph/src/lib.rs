//! The graph IR (DESIGN §2.3): tensors whose shapes may use the micro-batch's token count `T`,
//! ops that read and write them, a shape-checking builder, autodiff as a graph-to-graph pass (one
//! backward rule per op, itself made of ops), a readable printer, and strategy specs with their
//! rank mapping; then the parallel lowering ([`lower`]): DState deduction for a strategy, comm
//! insertion and the per-rank exec graph.
//!
//! ```
//! use graph::{backward, GraphBuilder, OpKind};
//!
//! let mut b = GraphBuilder::new();
//! let emb = b.param("embed", &[10, 4]);
//! let head = b.param("head", &[10, 4]);
//! let x = b.embedding(emb, "x")?;
//! let logits = b.linear(x, head, "logits")?;
//! b.cross_entropy(logits, "loss")?;
//! let mut g = b.finish()?;
//! backward(&mut g)?;
//! assert_eq!(g.grads.len(), 2);
//! assert!(g.ops.iter().any(|op| matches!(op.kind, OpKind::LinearGradWeight { .. })));
//! assert!(g.to_string().contains("= cross_entropy_grad("));
//! # Ok::<(), graph::GraphError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod autodiff;
mod builder;
mod error;
mod ir;
mod parallel;
mod print;
mod recompute;
mod schedule;
mod strategy;

pub use autodiff::backward;
pub use builder::GraphBuilder;
pub use error::{GraphError, Result};
pub use ir::{Dim, Graph, Op, OpKind, TensorId, TensorInfo, TensorKind, TpLayout, WeightLayout};
pub use parallel::{lower, normalize, param_state, CommPoint, ExecGraph, SharedComm};
pub use recompute::{recompute, Recompute};
pub use schedule::{Schedule, Slot};
pub use strategy::{CpExchange, MeshAxis, Strategy, Zero};
