//! The hot switch planner (DESIGN §2.4): moving tensors from one strategy's DStates to
//! another's. [`plan`] intersects the source and destination partitions of every tensor, keeps
//! what a device already holds as a local copy, and picks a sender for every other slice:
//! HotSPa's greedy rule or the exact min–max assignment (max-flow; slices split between owners).
//! [`lower_bound`] gives, per link class, what no plan can beat. [`execute`] runs a plan on the
//! ranks of a [`comm::Communicator`] with one fused buffer per (sender, receiver) pair, all in one
//! batched group. [`PlanCache`] keeps plans for reuse.
//!
//! ```
//! use comm::{CommError, Communicator, ThreadComm};
//! use dstate::{Axis, DState, DeviceGroup, DeviceId, Distribution, Placement};
//! use switch::{execute, plan, source_pieces, Method, TensorSwitch, Topology};
//!
//! // A 4×2 tensor split by rows over devices 0 and 1, wanted whole on both.
//! let group = DeviceGroup::range(0, 2)?;
//! let split = DState::new(vec![Axis::split(0, 2)])?;
//! let dup = DState::new(vec![Axis::dup(2)])?;
//! let t = TensorSwitch {
//!     name: "w".into(),
//!     shape: vec![4, 2],
//!     src: Distribution::new(group.clone(), split)?,
//!     dst: Distribution::new(group, dup)?,
//! };
//! let p = plan(&[t], Topology::new(8), Method::Exact).unwrap();
//! assert_eq!(p.transfers.len(), 2); // each device sends its half to the other
//! let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
//! let (p2, x2) = (p.clone(), x.clone());
//! let got = ThreadComm::run(2, move |c| {
//!     let mine = source_pieces(&p2, DeviceId(c.rank().0), &[x2.clone()]).unwrap();
//!     Ok::<_, CommError>(execute(&p2, &c, &mine).unwrap())
//! })?;
//! for pieces in got {
//!     assert_eq!(pieces[0].as_ref().unwrap().1, x);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod cache;
mod error;
mod exec;
mod flow;
mod plan;
mod stream;
mod topology;

pub use cache::PlanCache;
pub use error::{Result, SwitchError};
pub use exec::{destination_pieces, execute, execute_into, source_pieces, Pieces};
pub use flow::{min_max_assignment, Assignment};
pub use plan::{
    lower_bound, plan, traffic, Load, LocalCopy, Method, Plan, TensorSwitch, Traffic, Transfer,
};
pub use topology::{LinkClass, Topology};

impl std::fmt::Display for Plan {
    /// One line per tensor (`name: [S(0)×2]@0..2 -> [D×2]@0..2: 2 transfers, 8 elements`),
    /// then the totals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = |d: &dstate::Distribution| {
            let ids: Vec<String> = d
                .group()
                .devices()
                .iter()
                .map(|x| x.0.to_string())
                .collect();
            ids.join(",")
        };
        for (i, t) in self.tensors.iter().enumerate() {
            let (n, v) = self
                .transfers
                .iter()
                .filter(|x| x.tensor == i)
                .fold((0, 0), |(n, v), x| (n + 1, v + x.region.volume()));
            writeln!(
                f,
                "{}: {}@{{{}}} -> {}@{{{}}}: {n} transfers, {v} elements",
                t.name,
                t.src.state(),
                group(&t.src),
                t.dst.state(),
                group(&t.dst)
            )?;
        }
        write!(
            f,
            "{} plan: {} transfers in {} fused messages, {} elements moved, {} local copies",
            self.method,
            self.transfers.len(),
            self.messages(),
            self.moved(),
            self.local.len()
        )
    }
}
