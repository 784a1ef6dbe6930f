//! Which devices share a node, and the two link classes that follow.

use std::fmt;

use dstate::DeviceId;

/// Devices `n·m .. (n+1)·m` form node `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topology {
    /// Devices per node (at least 1).
    pub devices_per_node: usize,
}

/// A kind of link, each with its own bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkClass {
    /// Between two devices of one node (NVLink, shared memory).
    SameNode,
    /// Between nodes (the network).
    CrossNode,
}

impl LinkClass {
    /// Both classes, same-node first.
    pub const ALL: [LinkClass; 2] = [LinkClass::SameNode, LinkClass::CrossNode];

    /// Index into per-class arrays.
    pub fn index(self) -> usize {
        match self {
            LinkClass::SameNode => 0,
            LinkClass::CrossNode => 1,
        }
    }
}

impl fmt::Display for LinkClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkClass::SameNode => "same-node",
            LinkClass::CrossNode => "cross-node",
        })
    }
}

impl Topology {
    /// Nodes of `m` devices each.
    pub fn new(devices_per_node: usize) -> Self {
        Self {
            devices_per_node: devices_per_node.max(1),
        }
    }

    /// The node of a device.
    pub fn node(&self, d: DeviceId) -> usize {
        d.0 / self.devices_per_node
    }

    /// The link class between two devices.
    pub fn class(&self, a: DeviceId, b: DeviceId) -> LinkClass {
        if self.node(a) == self.node(b) {
            LinkClass::SameNode
        } else {
            LinkClass::CrossNode
        }
    }
}
