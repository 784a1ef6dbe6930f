//! Parameter synchronisation by architecture and topology, as the survey's §3–4 and its Table 4
//! compare them qualitatively: a parameter server, the ring, the hierarchical all-reduce and
//! in-network aggregation (SwitchML-style), on a fat-tree with an oversubscription ratio, on
//! BCube, and on one NVLink node, over TCP, RDMA or NVLink as α–β presets. Each time is the α–β
//! estimate of one synchronisation of `bytes` of gradient per worker (push and pull, or
//! reduce and broadcast), links full duplex, every flow at its bottleneck's fair share.
//!
//! - **Fat-tree** of `racks × per_rack` servers, one NIC of bandwidth `B` each; a rack's uplink
//!   carries `per_rack · B / oversubscription`.
//! - **BCube(n, k)**: `n^(k+1)` servers with `k + 1` NICs each (one per level), switches of `n`
//!   ports; a message between servers differing in `d` digits takes `d` hops relayed by servers.
//! - **Transports**: TCP (α 30 µs, 70% of the line rate), RDMA (α 3 µs, 95%), NVLink (α 2 µs,
//!   300 GB/s links inside one node).

use std::fmt;

use serde::Serialize;

/// A transport: latency per message and the fraction of the line rate it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Transport {
    /// Its name.
    pub name: &'static str,
    /// Per-message latency, seconds.
    pub alpha: f64,
    /// Bytes per second one link carries with this transport.
    pub bandwidth: f64,
}

impl Transport {
    /// TCP over a `gbit` Gb/s Ethernet link.
    pub fn tcp(gbit: f64) -> Self {
        Self {
            name: "TCP",
            alpha: 30e-6,
            bandwidth: 0.70 * gbit * 1e9 / 8.0,
        }
    }
    /// RDMA (RoCE or InfiniBand) over a `gbit` Gb/s link.
    pub fn rdma(gbit: f64) -> Self {
        Self {
            name: "RDMA",
            alpha: 3e-6,
            bandwidth: 0.95 * gbit * 1e9 / 8.0,
        }
    }
    /// NVLink (an A100's 300 GB/s per direction).
    pub fn nvlink() -> Self {
        Self {
            name: "NVLink",
            alpha: 2e-6,
            bandwidth: 300e9,
        }
    }
}

/// How the servers are wired.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Topology {
    /// Racks of servers under top-of-rack switches, the racks joined by a core whose uplinks
    /// carry `per_rack / oversubscription` NICs' worth.
    FatTree {
        /// Racks.
        racks: usize,
        /// Servers per rack.
        per_rack: usize,
        /// Rack bandwidth over uplink bandwidth (1: non-blocking).
        oversubscription: f64,
    },
    /// BCube(n, k).
    BCube {
        /// Switch ports (servers per level-0 switch).
        n: usize,
        /// Levels above 0.
        k: usize,
    },
}

impl Topology {
    /// Servers.
    pub fn servers(&self) -> usize {
        match *self {
            Topology::FatTree {
                racks, per_rack, ..
            } => racks * per_rack,
            Topology::BCube { n, k } => n.pow(k as u32 + 1),
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Topology::FatTree {
                racks: 1, per_rack, ..
            } => write!(f, "one node of {per_rack}"),
            Topology::FatTree {
                racks,
                per_rack,
                oversubscription,
            } => write!(f, "fat-tree {racks}×{per_rack} {oversubscription}:1"),
            Topology::BCube { n, k } => write!(f, "BCube({n},{k})"),
        }
    }
}

/// How the workers synchronise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Architecture {
    /// Sharded parameter server: `servers` shards, on workers (co-located) or on machines of
    /// their own; every worker pushes its gradient shard by shard and pulls the parameters.
    ParameterServer {
        /// Server shards.
        servers: usize,
        /// On the workers' machines (sharing their NICs) or dedicated.
        colocated: bool,
    },
    /// The ring all-reduce over every worker.
    Ring,
    /// Reduce-scatter in each rack (BCube: level by level, all NICs at once), all-reduce
    /// across, all-gather back.
    Hierarchical,
    /// The switches sum the gradients on the way up and multicast the sum down
    /// (SwitchML); an aggregated link carries one copy.
    InNetwork,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Architecture::ParameterServer { servers, colocated } => write!(
                f,
                "parameter server ({servers} shards, {})",
                if colocated { "co-located" } else { "dedicated" }
            ),
            Architecture::Ring => f.write_str("ring all-reduce"),
            Architecture::Hierarchical => f.write_str("hierarchical all-reduce"),
            Architecture::InNetwork => f.write_str("in-network aggregation"),
        }
    }
}

/// One synchronisation's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SyncCost {
    /// Seconds.
    pub seconds: f64,
    /// Of which latency (the α terms).
    pub latency: f64,
}

/// One synchronisation of `bytes` per worker among every server of `topo` over `t`.
pub fn sync_cost(arch: Architecture, topo: Topology, t: Transport, bytes: f64) -> SyncCost {
    let w = topo.servers() as f64;
    let b = t.bandwidth;
    let cost = |steps: f64, link: f64, bw: f64| SyncCost {
        seconds: steps * t.alpha + link / bw,
        latency: steps * t.alpha,
    };
    match topo {
        Topology::FatTree {
            racks,
            per_rack,
            oversubscription: o,
        } => {
            let (r, p) = (racks as f64, per_rack as f64);
            // A rack uplink's bandwidth; the fraction of a flow's partners in other racks.
            let uplink = p * b / o;
            let away = (r - 1.0) / r;
            match arch {
                Architecture::Ring => {
                    // Ordered rack by rack: one flow leaves each rack, at min(B, uplink).
                    let link = 2.0 * (w - 1.0) / w * bytes;
                    cost(2.0 * (w - 1.0), link, b.min(uplink))
                }
                Architecture::Hierarchical => {
                    // In the rack: reduce-scatter and all-gather over p; across: p rings of
                    // bytes/p share the uplink.
                    let inner = 2.0 * (p - 1.0) / p * bytes;
                    let outer = 2.0 * (r - 1.0) / r * bytes / p;
                    let per_flow = b.min(uplink / p);
                    SyncCost {
                        seconds: 2.0 * (p - 1.0) * t.alpha
                            + inner / b
                            + 2.0 * (r - 1.0) * t.alpha
                            + outer / per_flow,
                        latency: 2.0 * (p + r - 2.0) * t.alpha,
                    }
                }
                Architecture::ParameterServer { servers, colocated } => {
                    // Pushes and pulls pipelined by chunks (BytePS), links full duplex.
                    let (nic, server) = ps_egress(bytes, w, servers, colocated);
                    // A rack's uplink: what its NICs send away (dedicated servers have racks of
                    // their own, so all of it).
                    let rack_up = p * nic * if colocated { away } else { 1.0 };
                    SyncCost {
                        seconds: 2.0 * t.alpha + (nic.max(server) / b).max(rack_up / uplink),
                        latency: 2.0 * t.alpha,
                    }
                }
                Architecture::InNetwork => {
                    // Streamed up through the top-of-rack switch (and the core) and the sum
                    // streamed back while the rest goes up: each byte leaves a worker once, and
                    // a rack's uplink carries one aggregated copy each way.
                    let hops = if racks > 1 { 4.0 } else { 2.0 };
                    let up = if racks > 1 { bytes / uplink } else { 0.0 };
                    SyncCost {
                        seconds: hops * t.alpha + (bytes / b).max(up),
                        latency: hops * t.alpha,
                    }
                }
            }
        }
        Topology::BCube { n, k } => {
            let (n, levels) = (n as f64, k as f64 + 1.0);
            // Average hops between two servers (digits that differ) and the NICs a server
            // drives at once.
            let hops = levels * (n - 1.0) / n * w / (w - 1.0);
            match arch {
                Architecture::Ring => {
                    // A ring through every server, one NIC each.
                    cost(2.0 * (w - 1.0), 2.0 * (w - 1.0) / w * bytes, b)
                }
                Architecture::Hierarchical => {
                    // BCube's own: level by level reduce-scatter among n, then all-gather back,
                    // the data in `levels` parts each starting at another level so every NIC
                    // works at once.
                    let link = 2.0 * (1.0 - 1.0 / w) * bytes / levels;
                    cost(2.0 * levels * (n - 1.0), link, b)
                }
                Architecture::ParameterServer { servers, colocated } => {
                    // As on the fat-tree, but every byte crosses `hops` links on average,
                    // relayed by servers, spread over a server's `levels` NICs.
                    let (nic, server) = ps_egress(bytes, w, servers, colocated);
                    SyncCost {
                        seconds: 2.0 * hops * t.alpha + (nic * hops).max(server) / levels / b,
                        latency: 2.0 * hops * t.alpha,
                    }
                }
                Architecture::InNetwork => {
                    // Each level's switches sum their n ports' parts, `levels` parts at once,
                    // streamed up and back.
                    cost(2.0 * levels, bytes / levels, b)
                }
            }
        }
    }
}

/// One row of the table: an architecture's seconds on each column.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRow {
    /// The architecture.
    pub architecture: String,
    /// Seconds per column, in the columns' order (None: the architecture does not apply).
    pub seconds: Vec<Option<f64>>,
}

/// The survey's comparison measured by the model: every architecture on every (topology,
/// transport) column, for `bytes` of gradient per worker.
#[derive(Debug, Clone, Serialize)]
pub struct SyncTable {
    /// Gradient bytes per worker.
    pub bytes: f64,
    /// Column labels.
    pub columns: Vec<String>,
    /// Workers per column.
    pub workers: Vec<usize>,
    /// One row per architecture.
    pub rows: Vec<SyncRow>,
}

/// The table for `bytes` of gradient per worker on 64 workers (fat-tree 8×8 at 1:1 and 4:1,
/// BCube(8,1); 100 Gb/s NICs over TCP and RDMA) and 8 on one NVLink node.
pub fn sync_table(bytes: f64) -> SyncTable {
    let fat = |o: f64| Topology::FatTree {
        racks: 8,
        per_rack: 8,
        oversubscription: o,
    };
    let bcube = Topology::BCube { n: 8, k: 1 };
    let node = Topology::FatTree {
        racks: 1,
        per_rack: 8,
        oversubscription: 1.0,
    };
    let columns: Vec<(Topology, Transport)> = vec![
        (fat(1.0), Transport::tcp(100.0)),
        (fat(1.0), Transport::rdma(100.0)),
        (fat(4.0), Transport::rdma(100.0)),
        (bcube, Transport::rdma(100.0)),
        (node, Transport::nvlink()),
    ];
    let archs = [
        Architecture::ParameterServer {
            servers: 64,
            colocated: true,
        },
        Architecture::ParameterServer {
            servers: 8,
            colocated: false,
        },
        Architecture::Ring,
        Architecture::Hierarchical,
        Architecture::InNetwork,
    ];
    let rows = archs
        .iter()
        .map(|&a| SyncRow {
            architecture: a.to_string(),
            seconds: columns
                .iter()
                .map(|&(topo, t)| {
                    let a = match a {
                        // A shard per worker of this column.
                        Architecture::ParameterServer {
                            colocated: true, ..
                        } => Architecture::ParameterServer {
                            servers: topo.servers(),
                            colocated: true,
                        },
                        other => other,
                    };
                    Some(sync_cost(a, topo, t, bytes).seconds)
                })
                .collect(),
        })
        .collect();
    SyncTable {
        bytes,
        columns: columns
            .iter()
            .map(|(topo, t)| format!("{topo}, {}", t.name))
            .collect(),
        workers: columns.iter().map(|(topo, _)| topo.servers()).collect(),
        rows,
    }
}

/// The bytes a worker's NIC and a dedicated server's NIC send in one push and pull of `bytes`
/// by `w` workers over `servers` shards: a co-located NIC pushes its gradient to the other
/// shards and serves its shard to the other workers (no dedicated server); a worker on its own
/// pushes all of it, and a dedicated server serves its shard to every worker.
fn ps_egress(bytes: f64, w: f64, servers: usize, colocated: bool) -> (f64, f64) {
    let k = servers as f64;
    if colocated {
        (bytes * (1.0 - 1.0 / k) + (w - 1.0) * bytes / k, 0.0)
    } else {
        (bytes, w * bytes / k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    fn fat(racks: usize, per_rack: usize, o: f64) -> Topology {
        Topology::FatTree {
            racks,
            per_rack,
            oversubscription: o,
        }
    }

    /// The textbook ring: 2(W−1) steps of bytes/W.
    #[test]
    fn the_ring_is_the_textbook_ring() {
        let t = Transport::rdma(100.0);
        let c = sync_cost(Architecture::Ring, fat(4, 4, 1.0), t, GB);
        let want = 30.0 * t.alpha + 2.0 * 15.0 / 16.0 * GB / t.bandwidth;
        assert!((c.seconds - want).abs() < 1e-12, "{} vs {want}", c.seconds);
    }

    /// The survey: on a non-blocking fabric the architectures' bandwidth terms are alike and
    /// they differ by latency; a co-located sharded server needs 2 messages where the ring
    /// needs 2(W−1).
    #[test]
    fn without_oversubscription_they_differ_by_latency() {
        let t = Transport::tcp(100.0);
        let topo = fat(8, 8, 1.0);
        let ps = sync_cost(
            Architecture::ParameterServer {
                servers: 64,
                colocated: true,
            },
            topo,
            t,
            GB,
        );
        let ring = sync_cost(Architecture::Ring, topo, t, GB);
        let band = |c: SyncCost| c.seconds - c.latency;
        assert!((band(ps) / band(ring) - 1.0).abs() < 0.02);
        assert!(ring.latency > 30.0 * ps.latency);
    }

    /// Oversubscription hurts the all-to-all traffic of a parameter server (every worker talks
    /// to shards in every rack), the hierarchy's slices across racks less (p flows share an
    /// uplink, each 1/p of the gradient), and neither the rack-ordered ring (one flow leaves a
    /// rack) nor in-network aggregation (one aggregated copy per uplink).
    #[test]
    fn oversubscription_hurts_the_all_to_all_traffic_of_a_parameter_server() {
        let t = Transport::rdma(100.0);
        let ps = Architecture::ParameterServer {
            servers: 64,
            colocated: true,
        };
        let slow = |a| {
            sync_cost(a, fat(8, 8, 4.0), t, GB).seconds
                / sync_cost(a, fat(8, 8, 1.0), t, GB).seconds
        };
        assert!(slow(ps) > 3.0, "{}", slow(ps));
        let h = slow(Architecture::Hierarchical);
        assert!(h > 1.2 && h < 1.5, "{h}");
        assert!(slow(Architecture::Ring) < 1.0 + 1e-9);
        assert!(slow(Architecture::InNetwork) < 1.0 + 1e-9);
    }

    /// In-network aggregation halves the bandwidth term of the ring (a worker sends its
    /// gradient once, where the ring sends 2(W−1)/W of it), as do dedicated servers with as
    /// many NICs as the workers (BytePS).
    #[test]
    fn in_network_aggregation_sends_each_byte_once() {
        let t = Transport::rdma(100.0);
        let topo = fat(8, 8, 1.0);
        let band = |c: SyncCost| c.seconds - c.latency;
        let ina = sync_cost(Architecture::InNetwork, topo, t, GB);
        assert!((band(ina) - GB / t.bandwidth).abs() < 1e-12);
        let ring = sync_cost(Architecture::Ring, topo, t, GB);
        assert!((band(ring) / band(ina) - 2.0 * 63.0 / 64.0).abs() < 1e-9);
        let dedicated = |servers| {
            band(sync_cost(
                Architecture::ParameterServer {
                    servers,
                    colocated: false,
                },
                fat(8, 8, 1.0),
                t,
                GB,
            ))
        };
        assert!((dedicated(64) / band(ina) - 1.0).abs() < 1e-9);
        // Eight servers for 64 workers: each takes 8 workers' worth.
        assert!((dedicated(8) / band(ina) - 8.0).abs() < 1e-9);
    }

    /// BCube(n, 0) is one switch of n: its level algorithm is the ring of n, and BCube(n, 1)'s
    /// two NICs halve the bandwidth term of a one-NIC ring.
    #[test]
    fn bcube_levels_use_every_nic() {
        let t = Transport::rdma(100.0);
        let one = sync_cost(
            Architecture::Hierarchical,
            Topology::BCube { n: 8, k: 0 },
            t,
            GB,
        );
        let ring = sync_cost(Architecture::Ring, fat(1, 8, 1.0), t, GB);
        assert!((one.seconds - ring.seconds).abs() < 1e-12);
        let two = sync_cost(
            Architecture::Hierarchical,
            Topology::BCube { n: 8, k: 1 },
            t,
            GB,
        );
        let flat = sync_cost(Architecture::Ring, Topology::BCube { n: 8, k: 1 }, t, GB);
        let band = |c: SyncCost| c.seconds - c.latency;
        assert!((band(flat) / band(two) - 2.0).abs() < 0.05);
    }

    #[test]
    fn the_table_has_every_architecture_on_every_column() {
        let t = sync_table(4.0 * 6.7e9);
        assert_eq!(t.rows.len(), 5);
        assert!(t.rows.iter().all(|r| r.seconds.len() == t.columns.len()));
        assert_eq!(t.workers, vec![64, 64, 64, 64, 8]);
    }
}
