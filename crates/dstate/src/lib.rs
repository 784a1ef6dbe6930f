//! Distributed tensor states (DESIGN §2.1): device groups, placements, DStates, the piece every
//! device holds (with uneven chunk semantics), the slice intersection of two distributions, and
//! the one-axis transition table. Pure: no I/O, no communication.
//!
//! ```
//! use dstate::{intersect, transition, Axis, DState, DeviceGroup, Distribution};
//!
//! // 8 devices: 2 replicas, each splitting rows 4 ways.
//! let a = DState::new(vec![Axis::dup(2), Axis::split(0, 4)])?;
//! let dist = Distribution::new(DeviceGroup::range(0, 8)?, a.clone())?;
//! assert_eq!(dist.to_string(), "[D×2, S(0)×4] @ g0-7");
//!
//! // Device 5 is replica 1, chunk 1 of 10 rows: rows 3..6 (chunks of ceil(10/4) = 3).
//! let piece = a.piece(5, &[10, 16])?;
//! assert_eq!(piece.region.to_string(), "[3..6, 0..16]");
//!
//! // One axis changes: S(0) -> S(1) is an all-to-all along axis 1.
//! let b: DState = "[D×2, S(1)×4]".parse().unwrap();
//! assert_eq!(transition(&a, &b)?.collective.name(), "all-to-all");
//!
//! // Resharding to all 8 devices splitting columns: slices are the common refinement.
//! let c = Distribution::new(DeviceGroup::range(0, 8)?, "[S(1)×8]".parse().unwrap())?;
//! let slices = intersect(&dist, &c, &[10, 16])?;
//! assert_eq!(slices.iter().map(|s| s.volume()).sum::<usize>(), 160);
//! # Ok::<(), dstate::DStateError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![forbid(unsafe_code)]

mod error;
mod group;
mod layout;
mod region;
mod reshard;
mod state;
mod transition;

pub use error::{DStateError, Result};
pub use group::{DeviceGroup, DeviceId};
pub use layout::{
    assemble, copy_region, copy_region_with, distribute, extract, extract_into, insert, runs,
};
pub use region::{chunk, Region};
pub use reshard::{intersect, Holder, Slice};
pub use state::{Axis, DState, Distribution, Piece, Placement};
pub use transition::{transition, Collective, Transition};
