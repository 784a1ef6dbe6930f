//! Switch plans: which device sends which region of which tensor to whom.
//!
//! Every slice of the common refinement of the source and destination partitions
//! (`dstate::intersect`) that a destination device needs and does not already hold must come
//! from one of its owners. A needer with an owner on its own node takes it over a same-node link,
//! otherwise over the network: that fixes each transfer's link class and keeps cross-node bytes
//! at their minimum. Within a class, two ways to pick senders:
//!
//! * [`Method::Greedy`] (HotSPa's): per slice, the owner that has sent least so far;
//! * [`Method::Exact`]: the min–max assignment over all slices at once (max-flow, slices split
//!   between owners by rows where that balances the load).
//!
//! [`lower_bound`] is, per class, the larger of the most bytes a device must receive and the
//! fractional optimum of the most bytes a device must send: no plan does better.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use dstate::{intersect, DeviceId, Distribution, Region};

use crate::error::{Result, SwitchError};
use crate::flow::min_max_assignment;
use crate::topology::{LinkClass, Topology};

/// One tensor to switch: its shape and its source and destination distributions (over any
/// device groups; device ids are world ranks).
#[derive(Debug, Clone)]
pub struct TensorSwitch {
    /// A name for messages (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// The global shape.
    pub shape: Vec<usize>,
    /// Where it is now.
    pub src: Distribution,
    /// Where it must be.
    pub dst: Distribution,
}

/// How senders are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Per slice, a same-node owner if any, then the owner that has sent least so far.
    Greedy,
    /// The min–max send assignment (max-flow), slices split between owners where it helps.
    Exact,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Greedy => "greedy",
            Method::Exact => "exact",
        })
    }
}

/// `region` of tensor `tensor` goes from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Index into the plan's tensors.
    pub tensor: usize,
    /// Global indices.
    pub region: Region,
    /// The sender (an owner under the source).
    pub from: DeviceId,
    /// The receiver (a holder under the destination).
    pub to: DeviceId,
}

/// `region` of tensor `tensor` is already on `device`: copied locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCopy {
    /// Index into the plan's tensors.
    pub tensor: usize,
    /// Global indices.
    pub region: Region,
    /// The device that holds it under both distributions.
    pub device: DeviceId,
}

/// A complete switch: the transfers in a deterministic order (every rank that plans the same
/// switch gets the same plan), the local copies, and the method that chose the senders.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The tensors, as given.
    pub tensors: Vec<TensorSwitch>,
    /// Transfers between devices, grouped by (from, to) in fusion order.
    pub transfers: Vec<Transfer>,
    /// Regions kept on their device.
    pub local: Vec<LocalCopy>,
    /// How the senders were chosen.
    pub method: Method,
    /// The topology the link classes refer to.
    pub topology: Topology,
}

/// One slice a device needs from elsewhere.
struct Demand {
    tensor: usize,
    region: Region,
    to: DeviceId,
    class: LinkClass,
    /// Eligible senders, sorted (shared by the demands of one slice: a replicated tensor on
    /// many devices has as many needers as owners).
    owners: Arc<[DeviceId]>,
}

fn demands(tensors: &[TensorSwitch], topo: &Topology) -> Result<(Vec<Demand>, Vec<LocalCopy>)> {
    let mut out = Vec::new();
    let mut local = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        let slices = intersect(&t.src, &t.dst, &t.shape).map_err(|e| SwitchError::State {
            tensor: t.name.clone(),
            source: e,
        })?;
        for s in slices {
            if s.owners.iter().chain(&s.needers).any(|h| h.part.is_some()) {
                return Err(SwitchError::Partial(t.name.clone()));
            }
            let mut owners: Vec<DeviceId> = s.owners.iter().map(|h| h.device).collect();
            owners.sort();
            owners.dedup();
            if owners.is_empty() {
                return Err(SwitchError::NoOwner {
                    tensor: t.name.clone(),
                    region: s.region.to_string(),
                });
            }
            let mut needers: Vec<DeviceId> = s.needers.iter().map(|h| h.device).collect();
            needers.sort();
            needers.dedup();
            // The owners on each node (sorted, as `owners` is), and all of them, each shared
            // by the demands that may take from them.
            let mut by_node: BTreeMap<usize, Vec<DeviceId>> = BTreeMap::new();
            for &o in &owners {
                by_node.entry(topo.node(o)).or_default().push(o);
            }
            let by_node: BTreeMap<usize, Arc<[DeviceId]>> =
                by_node.into_iter().map(|(n, v)| (n, v.into())).collect();
            let all: Arc<[DeviceId]> = owners.as_slice().into();
            for to in needers {
                if owners.binary_search(&to).is_ok() {
                    local.push(LocalCopy {
                        tensor: ti,
                        region: s.region.clone(),
                        device: to,
                    });
                    continue;
                }
                let (class, eligible) = match by_node.get(&topo.node(to)) {
                    Some(near) => (LinkClass::SameNode, near.clone()),
                    None => (LinkClass::CrossNode, all.clone()),
                };
                out.push(Demand {
                    tensor: ti,
                    region: s.region.clone(),
                    to,
                    class,
                    owners: eligible,
                });
            }
        }
    }
    Ok((out, local))
}

/// The first `rows` units of `region` along its outermost dimension of extent > 1, and the rest.
fn split_rows(region: &Region, rows: usize) -> (Region, Region) {
    let d = region
        .ranges
        .iter()
        .position(|r| r.end - r.start > 1)
        .unwrap_or(0);
    let mut a = region.clone();
    let mut b = region.clone();
    let cut = region.ranges[d].start + rows;
    a.ranges[d].end = cut;
    b.ranges[d].start = cut;
    (a, b)
}

/// Elements per unit of the dimension `split_rows` cuts.
fn row_volume(region: &Region) -> usize {
    let d = region
        .ranges
        .iter()
        .position(|r| r.end - r.start > 1)
        .unwrap_or(0);
    let extent = (region.ranges[d].end - region.ranges[d].start).max(1);
    region.volume() / extent
}

fn greedy(demands: Vec<Demand>) -> Vec<Transfer> {
    let mut sent: BTreeMap<(LinkClass, DeviceId), usize> = BTreeMap::new();
    demands
        .into_iter()
        .map(|d| {
            let from = *d
                .owners
                .iter()
                .min_by_key(|&&o| (sent.get(&(d.class, o)).copied().unwrap_or(0), o))
                .unwrap_or(&d.owners[0]);
            *sent.entry((d.class, from)).or_default() += d.region.volume();
            Transfer {
                tensor: d.tensor,
                region: d.region,
                from,
                to: d.to,
            }
        })
        .collect()
}

fn exact(demands: Vec<Demand>) -> Vec<Transfer> {
    let mut out = Vec::new();
    for class in LinkClass::ALL {
        // Demands with the same eligible senders are interchangeable: one flow node each.
        // First by the sharing `Arc` (cheap: a replicated tensor's owner list may span every
        // device), then by content. Each slice's demands share one list per class and come
        // one slice after another, so a content's demands keep their order.
        let mut shared: Vec<(&Arc<[DeviceId]>, Vec<&Demand>)> = Vec::new();
        let mut at: std::collections::HashMap<*const DeviceId, usize> = Default::default();
        for d in demands.iter().filter(|d| d.class == class) {
            let i = *at.entry(d.owners.as_ptr()).or_insert_with(|| {
                shared.push((&d.owners, Vec::new()));
                shared.len() - 1
            });
            shared[i].1.push(d);
        }
        let mut groups: BTreeMap<Arc<[DeviceId]>, Vec<&Demand>> = BTreeMap::new();
        for (owners, ds) in shared {
            groups.entry(owners.clone()).or_default().extend(ds);
        }
        let mut senders: Vec<DeviceId> = groups.keys().flat_map(|k| k.iter().copied()).collect();
        senders.sort();
        senders.dedup();
        let index = |d: DeviceId| senders.binary_search(&d).unwrap_or(0);
        let keys: Vec<&Arc<[DeviceId]>> = groups.keys().collect();
        let volumes: Vec<f64> = groups
            .values()
            .map(|ds| ds.iter().map(|d| d.region.volume() as f64).sum())
            .collect();
        let eligible: Vec<Vec<usize>> = keys
            .iter()
            .map(|k| k.iter().map(|&o| index(o)).collect())
            .collect();
        let a = min_max_assignment(&volumes, &eligible, senders.len());
        for ((_, ds), flows) in groups.iter().zip(&a.flows) {
            // Integer quotas in the group's demand order; the last sender takes any remainder.
            let mut quotas: Vec<(DeviceId, f64)> =
                flows.iter().map(|&(k, f)| (senders[k], f)).collect();
            if quotas.is_empty() {
                quotas.push((ds[0].owners[0], 0.0));
            }
            let mut qi = 0;
            for d in ds {
                let mut rest = d.region.clone();
                loop {
                    let vol = rest.volume();
                    if vol == 0 {
                        break;
                    }
                    let last = qi + 1 >= quotas.len();
                    let left = quotas[qi].1;
                    if last || vol as f64 <= left + 0.5 {
                        quotas[qi].1 -= vol as f64;
                        out.push(Transfer {
                            tensor: d.tensor,
                            region: rest,
                            from: quotas[qi].0,
                            to: d.to,
                        });
                        break;
                    }
                    let rows = (left / row_volume(&rest) as f64).round().max(0.0) as usize;
                    if rows > 0 {
                        let (head, tail) = split_rows(&rest, rows);
                        quotas[qi].1 -= head.volume() as f64;
                        out.push(Transfer {
                            tensor: d.tensor,
                            region: head,
                            from: quotas[qi].0,
                            to: d.to,
                        });
                        rest = tail;
                    }
                    qi += 1;
                }
            }
        }
    }
    out
}

/// Plans the switch of `tensors` with `method`. The result depends only on the arguments.
pub fn plan(tensors: &[TensorSwitch], topology: Topology, method: Method) -> Result<Plan> {
    let (ds, local) = demands(tensors, &topology)?;
    let mut transfers = match method {
        Method::Greedy => greedy(ds),
        Method::Exact => exact(ds),
    };
    // Fusion order: by (sender, receiver), then tensor and region (stable).
    transfers.sort_by(|a, b| {
        (a.from, a.to, a.tensor)
            .cmp(&(b.from, b.to, b.tensor))
            .then_with(|| {
                a.region
                    .ranges
                    .iter()
                    .map(|r| (r.start, r.end))
                    .cmp(b.region.ranges.iter().map(|r| (r.start, r.end)))
            })
    });
    Ok(Plan {
        tensors: tensors.to_vec(),
        transfers,
        local,
        method,
        topology,
    })
}

/// What a switch moves, without its transfers in order: the planner's cost model needs only
/// this, and skips ordering and keeping every transfer's region (at 1,024 devices most of a
/// plan's time).
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// What every device sends and receives per link class.
    pub load: Load,
    /// Elements that cross a link (as [`Plan::moved`]).
    pub moved: usize,
    /// One entry per fused message, `(sender, receiver, elements)`, sorted by sender then
    /// receiver (as [`Plan::messages`] counts them).
    pub pairs: Vec<(DeviceId, DeviceId, usize)>,
}

impl Traffic {
    fn of(transfers: impl Iterator<Item = (DeviceId, DeviceId, usize)>, topo: &Topology) -> Self {
        let mut by_pair: std::collections::HashMap<(DeviceId, DeviceId), usize> =
            std::collections::HashMap::new();
        let mut moved = 0;
        for (from, to, n) in transfers {
            *by_pair.entry((from, to)).or_default() += n;
            moved += n;
        }
        let mut pairs: Vec<(DeviceId, DeviceId, usize)> =
            by_pair.into_iter().map(|((f, t), n)| (f, t, n)).collect();
        pairs.sort_unstable();
        let mut load = Load {
            send: [BTreeMap::new(), BTreeMap::new()],
            recv: [BTreeMap::new(), BTreeMap::new()],
        };
        for &(from, to, n) in &pairs {
            let c = topo.class(from, to).index();
            *load.send[c].entry(from).or_default() += n;
            *load.recv[c].entry(to).or_default() += n;
        }
        Traffic { load, moved, pairs }
    }
}

/// What [`plan`] with the same arguments would move ([`Plan::traffic`] of it), without
/// ordering or keeping its transfers.
pub fn traffic(tensors: &[TensorSwitch], topology: Topology, method: Method) -> Result<Traffic> {
    let (ds, _) = demands(tensors, &topology)?;
    let transfers = match method {
        Method::Greedy => greedy(ds),
        Method::Exact => exact(ds),
    };
    Ok(Traffic::of(
        transfers.iter().map(|t| (t.from, t.to, t.region.volume())),
        &topology,
    ))
}

/// Per link class, what every device sends and receives (elements).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// `send[class][device]`.
    pub send: [BTreeMap<DeviceId, usize>; 2],
    /// `recv[class][device]`.
    pub recv: [BTreeMap<DeviceId, usize>; 2],
}

impl Load {
    /// The most any device sends over `class`.
    pub fn max_send(&self, class: LinkClass) -> usize {
        self.send[class.index()]
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
    /// The most any device receives over `class`.
    pub fn max_recv(&self, class: LinkClass) -> usize {
        self.recv[class.index()]
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
    /// The plan's cost over `class`: the most any device sends or receives.
    pub fn cost(&self, class: LinkClass) -> usize {
        self.max_send(class).max(self.max_recv(class))
    }
}

impl Plan {
    /// What every device sends and receives per link class, in elements.
    pub fn load(&self) -> Load {
        let mut load = Load {
            send: [BTreeMap::new(), BTreeMap::new()],
            recv: [BTreeMap::new(), BTreeMap::new()],
        };
        for t in &self.transfers {
            let c = self.topology.class(t.from, t.to).index();
            *load.send[c].entry(t.from).or_default() += t.region.volume();
            *load.recv[c].entry(t.to).or_default() += t.region.volume();
        }
        load
    }

    /// Fused messages: one per (sender, receiver) pair with data.
    pub fn messages(&self) -> usize {
        let mut pairs: Vec<(DeviceId, DeviceId)> =
            self.transfers.iter().map(|t| (t.from, t.to)).collect();
        pairs.dedup();
        pairs.len()
    }

    /// Contiguous runs the plan copies (packing, unpacking, local copies): per transfer and
    /// local copy, the runs of its region in the row-major tensor. With every split on dim 0
    /// (the layout optimisation), one per slice.
    pub fn runs(&self) -> usize {
        let of = |tensor: usize, region: &dstate::Region| {
            self.tensors
                .get(tensor)
                .map_or(0, |t| dstate::runs(&t.shape, region))
        };
        self.transfers
            .iter()
            .map(|t| of(t.tensor, &t.region))
            .chain(self.local.iter().map(|l| of(l.tensor, &l.region)))
            .sum()
    }

    /// Elements that cross a link (not counting local copies).
    pub fn moved(&self) -> usize {
        self.transfers.iter().map(|t| t.region.volume()).sum()
    }

    /// Its load, moved elements and fused messages in one pass.
    pub fn traffic(&self) -> Traffic {
        Traffic::of(
            self.transfers
                .iter()
                .map(|t| (t.from, t.to, t.region.volume())),
            &self.topology,
        )
    }
}

/// Per link class: (the most elements a device must receive, the fractional optimum of the most
/// elements a device must send). `max` of the two bounds every plan's cost from below.
pub fn lower_bound(tensors: &[TensorSwitch], topology: Topology) -> Result<[(usize, f64); 2]> {
    let (ds, _) = demands(tensors, &topology)?;
    let mut out = [(0usize, 0f64); 2];
    for class in LinkClass::ALL {
        let mut recv: BTreeMap<DeviceId, usize> = BTreeMap::new();
        let mut groups: BTreeMap<Arc<[DeviceId]>, f64> = BTreeMap::new();
        for d in ds.iter().filter(|d| d.class == class) {
            *recv.entry(d.to).or_default() += d.region.volume();
            *groups.entry(d.owners.clone()).or_default() += d.region.volume() as f64;
        }
        let mut senders: Vec<DeviceId> = groups.keys().flat_map(|k| k.iter().copied()).collect();
        senders.sort();
        senders.dedup();
        let eligible: Vec<Vec<usize>> = groups
            .keys()
            .map(|k| {
                k.iter()
                    .map(|o| senders.binary_search(o).unwrap_or(0))
                    .collect()
            })
            .collect();
        let volumes: Vec<f64> = groups.values().copied().collect();
        let a = min_max_assignment(&volumes, &eligible, senders.len());
        out[class.index()] = (recv.values().copied().max().unwrap_or(0), a.bottleneck);
    }
    Ok(out)
}
