//! The DP gradient exchange as the cost model sees it: which codec (with or without error
//! feedback, everywhere or only across nodes) and which all-reduce algorithm, and what that
//! costs on a cluster — bytes on each link class, α–β seconds of each algorithm's steps, and the
//! codec's own encode and decode passes over memory.
//!
//! The α–β model of each algorithm follows its steps as [`comm::allreduce`] and
//! [`comm::codec`] run them, over node-contiguous members: a step lasts its slowest link's
//! latency plus its bytes over that link's bandwidth, and a link between nodes is one node's
//! NIC (`cross_node.gbps × devices_per_node`) shared by the streams that cross it at once — one
//! per concurrent group for a ring (only the node's boundary member sends out), every member of
//! every concurrent group for halving–doubling, the trees' crossing edges and the hierarchical
//! algorithm's inter-node phase.
//!
//! ```
//! use planner::exchange::{AlgorithmChoice, Exchange, GroupShape};
//! use comm::allreduce::Algorithm;
//!
//! let cluster = planner::Cluster::new(
//!     "eth",
//!     8,
//!     8,
//!     312.0,
//!     80.0,
//!     planner::Link { gbps: 300.0, latency_us: 5.0 },
//!     planner::Link { gbps: 25.0 / 8.0 / 8.0, latency_us: 30.0 },
//! );
//! // DP over 64 devices, 8 per node: hierarchical beats a flat ring, a big message pays to
//! // compress, and `auto` finds the faster algorithm.
//! let shape = GroupShape { members: 64, per_node: 8, groups_per_node: 1 };
//! let bytes = 4.0 * 100e6;
//! let exact = |a| Exchange { algorithm: AlgorithmChoice::Fixed(a), ..Exchange::default() };
//! let ring = exact(Algorithm::Ring).cost(&cluster, bytes / 4.0, &[], shape);
//! let hier = exact(Algorithm::Hierarchical).cost(&cluster, bytes / 4.0, &[], shape);
//! assert!(hier.seconds < ring.seconds);
//! let int8 = Exchange { codec: comm::codec::Codec::Int8, ..exact(Algorithm::Ring) };
//! assert!(int8.cost(&cluster, bytes / 4.0, &[], shape).seconds < ring.seconds);
//! let auto = Exchange { algorithm: AlgorithmChoice::Auto, ..Exchange::default() };
//! assert!(auto.cost(&cluster, bytes / 4.0, &[], shape).seconds <= hier.seconds);
//! ```

use std::fmt;
use std::str::FromStr;

use comm::allreduce::Algorithm;
use comm::codec::{Codec, CHUNK};
use serde::Serialize;

use crate::cluster::{Cluster, Link};

/// Device memory bandwidth the codecs' passes are timed at where the cluster does not say
/// (`memory_gbps = 0`): an A800's HBM2e as the codecs see it, GB/s.
pub const DEFAULT_MEMORY_GBPS: f64 = 1500.0;

/// Memory passes over the gradient (each reading or writing its `f32` values once) of a codec's
/// encode and decode: a dense codec encodes and decodes twice (the reduce-scatter and the
/// all-gather), top-k's selection is a few passes of a quickselect, PowerSGD reads the matrix
/// three times (`MQ`, `MᵀP`, the residual).
fn codec_passes(codec: Codec) -> f64 {
    match codec {
        Codec::None => 0.0,
        Codec::Bf16 | Codec::Fp16 | Codec::Int8 | Codec::Sign => 6.0,
        // Its norm is one more read, the draws are hashed from the values as they are read.
        Codec::Qsgd(_) => 8.0,
        Codec::TopK(_) => 8.0,
        // The owner's sums and its own selection among them.
        Codec::OkTopK(_) => 10.0,
        // The velocity and the accumulation (read and written) before the selection.
        Codec::Dgc(_) => 12.0,
        // DGC's passes and the owners' selection.
        Codec::OkDgc(_) => 14.0,
        // Each value into every row, then the server's estimates of every coordinate.
        Codec::Sketch(rows, _) => 2.0 * rows as f64,
        Codec::RandK(_) => 3.0,
        Codec::PowerSgd(_) => 4.0,
    }
}

/// `auto` or one algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmChoice {
    /// The cheapest by the α–β model, per message size and group shape.
    Auto,
    /// Always this one.
    Fixed(Algorithm),
}

impl fmt::Display for AlgorithmChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlgorithmChoice::Auto => f.write_str("auto"),
            AlgorithmChoice::Fixed(a) => a.fmt(f),
        }
    }
}

impl FromStr for AlgorithmChoice {
    type Err = comm::CommError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AlgorithmChoice::Auto),
            other => {
                other
                    .parse()
                    .map(AlgorithmChoice::Fixed)
                    .map_err(|_| comm::CommError::Parse {
                        what: "all-reduce algorithm",
                        input: other.into(),
                        expected: "use auto, ring, rhd, tree or hier".into(),
                    })
            }
        }
    }
}

/// How DP replicas exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exchange {
    /// The codec ([`Codec::None`]: exact).
    pub codec: Codec,
    /// Whether each member adds back what its codec left out last time.
    pub error_feedback: bool,
    /// Exact inside a node, the codec only on what crosses nodes.
    pub cross_node_only: bool,
    /// The all-reduce algorithm of exact sums (and of random-k's values and PowerSGD's factors).
    pub algorithm: AlgorithmChoice,
    /// `--grad-compression auto`: each bucket takes [`Exchange::adapt`]'s choice from
    /// [`ADAPTIVE_MENU`] (then `codec` and `cross_node_only` are not used).
    pub adaptive: bool,
    /// The step being priced (from 0), for DGC's sparsity warm-up: its fraction at that step
    /// ([`comm::dgc::dgc_density`], stages of [`comm::dgc::WARMUP_STAGE`] steps). `None`:
    /// the final fraction, as a long run spends almost all its steps.
    pub step: Option<u64>,
}

/// What `--grad-compression auto` chooses among, most faithful first: exact; bf16 or int8 (with
/// error feedback), across nodes only or over the whole group. The codecs that trained within
/// 2 % of the exact loss on the default run (docs/communication.md); sign, top-k, random-k and
/// PowerSGD, which did not, are left to an explicit choice.
pub const ADAPTIVE_MENU: [(Codec, bool); 5] = [
    (Codec::None, false),
    (Codec::Bf16, true),
    (Codec::Bf16, false),
    (Codec::Int8, true),
    (Codec::Int8, false),
];

/// `--grad-compression`'s value: a codec, or `auto` (adaptive, [`Exchange::adapt`]); the
/// flag `true` for `auto`.
pub fn compression(s: &str) -> Result<(Codec, bool), comm::CommError> {
    if s.trim() == "auto" {
        Ok((Codec::None, true))
    } else {
        s.parse().map(|c| (c, false))
    }
}

/// How much slower than the fastest of the menu `auto`'s choice may be: it takes the most
/// faithful option within this factor of the fastest.
pub const ADAPTIVE_SLACK: f64 = 1.1;

impl Default for Exchange {
    /// Exact, by the ring: what hotspa always did.
    fn default() -> Self {
        Exchange {
            codec: Codec::None,
            error_feedback: true,
            cross_node_only: false,
            algorithm: AlgorithmChoice::Fixed(Algorithm::Ring),
            adaptive: false,
            step: None,
        }
    }
}

impl Exchange {
    /// The values a sparse codec keeps of `values`: top-k's and Ok-Topk's fraction, DGC's at
    /// the warm-up's fraction of [`Exchange::step`].
    fn kept(&self, values: f64) -> f64 {
        match (self.codec, self.step) {
            (Codec::Dgc(f) | Codec::OkDgc(f), Some(step)) => {
                let d = comm::dgc::dgc_density(f, step, comm::dgc::WARMUP_STAGE);
                (d * values).ceil().clamp(1.0, values.max(1.0))
            }
            _ => self.codec.keep(values as usize) as f64,
        }
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {}", self.codec_label(), self.algorithm)
    }
}

impl Exchange {
    /// What it does to the values, without the algorithm: `int8 across nodes`, `none`, `auto
    /// (…)`.
    pub fn codec_label(&self) -> String {
        if self.adaptive {
            return "auto (per bucket: exact, bf16 or int8, across nodes only or not)".into();
        }
        let mut out = self.codec.to_string();
        if self.codec != Codec::None {
            if !self.error_feedback {
                out.push_str(" (no feedback)");
            }
            if self.cross_node_only {
                out.push_str(" across nodes");
            }
        }
        out
    }
}

/// Where the members of a DP group sit: `members` in all, `per_node` of them on each node they
/// use (node-contiguous), and `groups_per_node` such groups exchanging at the same time on one
/// node (e.g. one per TP rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupShape {
    /// Members.
    pub members: usize,
    /// Members on one node.
    pub per_node: usize,
    /// Groups of this shape that share a node's links.
    pub groups_per_node: usize,
}

impl GroupShape {
    fn nodes(&self) -> usize {
        self.members.div_ceil(self.per_node.max(1))
    }
    fn node(&self, member: usize) -> usize {
        member / self.per_node.max(1)
    }
}

/// What one exchange of a group costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ExchangeCost {
    /// Seconds, communication and codec together.
    pub seconds: f64,
    /// Of which the codec's encode and decode.
    pub codec_seconds: f64,
    /// Bytes all members send to members on their own node.
    pub intra_bytes: f64,
    /// Bytes all members send across nodes.
    pub inter_bytes: f64,
}

impl ExchangeCost {
    fn then(mut self, o: ExchangeCost) -> Self {
        self.seconds += o.seconds;
        self.codec_seconds += o.codec_seconds;
        self.intra_bytes += o.intra_bytes;
        self.inter_bytes += o.inter_bytes;
        self
    }
}

/// The link between nodes as `streams` concurrent senders of one node see it: the node's total
/// shared among them, at most what one stream reaches ([`Cluster::nic_gbps`]).
fn nic(cluster: &Cluster, streams: usize) -> Link {
    let total = cluster.cross_node.gbps * cluster.devices_per_node as f64;
    let stream = if cluster.nic_gbps > 0.0 {
        cluster.nic_gbps
    } else {
        cluster.cross_node.gbps
    };
    Link::new(
        (total / streams.max(1) as f64).min(stream),
        cluster.cross_node.latency_us,
    )
}

/// One step in which every listed sender moves `bytes` to a peer: the slowest link's time.
struct Steps<'a> {
    cluster: &'a Cluster,
    shape: GroupShape,
    cost: ExchangeCost,
}

impl<'a> Steps<'a> {
    fn new(cluster: &'a Cluster, shape: GroupShape) -> Self {
        Steps {
            cluster,
            shape,
            cost: ExchangeCost::default(),
        }
    }

    /// Every `(from, to)` pair sends `bytes` at once; `crossing_streams` senders of a node share
    /// its NIC.
    fn step(&mut self, pairs: &[(usize, usize)], bytes: f64, crossing_streams: usize) -> f64 {
        let mut worst = 0.0f64;
        for &(a, b) in pairs {
            let cross = self.shape.node(a) != self.shape.node(b);
            let link = if cross {
                self.cost.inter_bytes += bytes;
                nic(self.cluster, crossing_streams)
            } else {
                self.cost.intra_bytes += bytes;
                self.cluster.same_node
            };
            worst = worst.max(link.seconds(bytes, 1.0));
        }
        self.cost.seconds += worst;
        worst
    }

    /// An all-to-all of `chunk` bytes to every peer: to the `g − 1` on the member's node over
    /// the node's links and to the others over its share of the node's NIC, at once; a message
    /// (and a latency) per peer.
    fn all_to_all(&mut self, chunk: f64, g: usize) {
        let (cluster, shape) = (self.cluster, self.shape);
        let n = shape.members;
        let (intra, cross) = ((g - 1) as f64 * chunk, (n - g) as f64 * chunk);
        let out = nic(cluster, g * shape.groups_per_node);
        let latency = if n > g {
            cluster.cross_node.latency_us
        } else {
            cluster.same_node.latency_us
        };
        self.cost.seconds += (intra / (cluster.same_node.gbps * 1e9)).max(cross / (out.gbps * 1e9))
            + (n - 1) as f64 * latency * 1e-6;
        self.cost.intra_bytes += n as f64 * intra;
        self.cost.inter_bytes += n as f64 * cross;
    }

    /// `steps` ring steps of `chunk` bytes, member `i` sending to `i + 1` (mod the members):
    /// every step is the same, and its pairs are of two kinds only, so one step is priced in
    /// O(1) from how many pairs cross a node boundary ([`ring_crossings`]) and counted `steps`
    /// times.
    fn ring(&mut self, chunk: f64, steps: usize) {
        if steps == 0 {
            return;
        }
        let n = self.shape.members;
        let cross = ring_crossings(self.shape);
        let mut worst = 0.0f64;
        if cross > 0 {
            worst = nic(self.cluster, self.shape.groups_per_node).seconds(chunk, 1.0);
        }
        if cross < n {
            worst = worst.max(self.cluster.same_node.seconds(chunk, 1.0));
        }
        let steps = steps as f64;
        self.cost.seconds += steps * worst;
        self.cost.inter_bytes += steps * cross as f64 * chunk;
        self.cost.intra_bytes += steps * (n - cross) as f64 * chunk;
    }
}

/// How many of a ring's pairs `(i, i + 1 mod members)` join members on different nodes: each
/// node boundary inside the order, and the pair closing the ring where it spans nodes.
fn ring_crossings(shape: GroupShape) -> usize {
    let (n, per) = (shape.members, shape.per_node.max(1));
    if n > per {
        (n - 1) / per + 1
    } else {
        0
    }
}

/// Two binary trees over the members, as `comm`'s double tree runs them: the first half of the
/// buffer on the tree over members in order, the second on the same tree over members in
/// reverse; every member reduces up (its children's halves in turn, then to its parent) on one
/// tree and then the other, then broadcasts down the same way. Its messages ordered as the
/// runtime's (sends buffered; the messages through a member's link of one class leave, and
/// arrive, one after another): (seconds, bytes inside nodes, bytes across).
fn double_tree(cluster: &Cluster, bytes: f64, shape: GroupShape) -> (f64, f64, f64) {
    #[derive(Clone, Copy)]
    enum Op {
        Send(usize),
        Recv(usize),
    }
    let n = shape.members;
    let half = bytes / 2.0;
    let rank_of = |tree: usize, pos: usize| if tree == 0 { pos } else { n - 1 - pos };
    let links = |pos: usize| comm::allreduce::tree_links(pos, n);
    // Each member's program: up on both trees, then down on both.
    let programs: Vec<Vec<Op>> = (0..n)
        .map(|me| {
            let mut ops = Vec::new();
            for tree in 0..2 {
                let pos = if tree == 0 { me } else { n - 1 - me };
                let (parent, children) = links(pos);
                ops.extend(children.iter().map(|&c| Op::Recv(rank_of(tree, c))));
                ops.extend(parent.map(|p| Op::Send(rank_of(tree, p))));
            }
            for tree in 0..2 {
                let pos = if tree == 0 { me } else { n - 1 - me };
                let (parent, children) = links(pos);
                ops.extend(parent.map(|p| Op::Recv(rank_of(tree, p))));
                ops.extend(children.iter().map(|&c| Op::Send(rank_of(tree, c))));
            }
            ops
        })
        .collect();
    let link = |a: usize, b: usize| {
        if shape.node(a) != shape.node(b) {
            cluster.cross_node
        } else {
            cluster.same_node
        }
    };
    let class = |a: usize, b: usize| usize::from(shape.node(a) != shape.node(b));
    let mut clock = vec![0.0f64; n];
    let mut next = vec![0usize; n];
    let mut egress = vec![[0.0f64; 2]; n];
    let mut ingress = vec![[0.0f64; 2]; n];
    // Messages in flight from (sender, receiver): when each is whole, in order.
    let mut flight: std::collections::HashMap<(usize, usize), std::collections::VecDeque<f64>> =
        Default::default();
    let (mut intra, mut inter) = (0.0, 0.0);
    loop {
        let mut moved = false;
        for me in 0..n {
            while let Some(&op) = programs[me].get(next[me]) {
                match op {
                    Op::Send(to) => {
                        let l = link(me, to);
                        let busy = half / (l.gbps * 1e9);
                        let c = class(me, to);
                        let leave = clock[me].max(egress[me][c]);
                        egress[me][c] = leave + busy;
                        let whole = leave + busy + l.latency_us * 1e-6;
                        flight.entry((me, to)).or_default().push_back(whole);
                        if c == 1 {
                            inter += half;
                        } else {
                            intra += half;
                        }
                    }
                    Op::Recv(from) => {
                        let Some(whole) = flight.get_mut(&(from, me)).and_then(|q| q.pop_front())
                        else {
                            break;
                        };
                        let l = link(from, me);
                        let busy = half / (l.gbps * 1e9);
                        let c = class(from, me);
                        let arrived = (whole - busy).max(ingress[me][c]) + busy;
                        ingress[me][c] = arrived;
                        clock[me] = clock[me].max(arrived);
                    }
                }
                next[me] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    (clock.iter().copied().fold(0.0, f64::max), intra, inter)
}

/// Seconds and bytes of an exact all-reduce of `bytes` by `algo` over `shape`.
fn exact(cluster: &Cluster, bytes: f64, algo: Algorithm, shape: GroupShape) -> ExchangeCost {
    let n = shape.members;
    if n <= 1 {
        return ExchangeCost::default();
    }
    let all_cross = shape.per_node * shape.groups_per_node;
    let mut s = Steps::new(cluster, shape);
    match algo {
        Algorithm::Ring => s.ring(bytes / n as f64, 2 * (n - 1)),
        Algorithm::HalvingDoubling => {
            let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
            let extra = n - p;
            let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
            let fold: Vec<(usize, usize)> = (0..extra).map(|i| (2 * i, 2 * i + 1)).collect();
            if extra > 0 {
                s.step(&fold, bytes, all_cross);
            }
            let mut d = p / 2;
            let mut size = bytes / 2.0;
            let mut rounds = Vec::new();
            while d >= 1 {
                let pairs: Vec<(usize, usize)> = (0..p).map(|v| (real(v), real(v ^ d))).collect();
                rounds.push((pairs, size));
                d /= 2;
                size /= 2.0;
            }
            for (pairs, size) in rounds.iter().chain(rounds.iter().rev()) {
                s.step(pairs, *size, all_cross);
            }
            if extra > 0 {
                let back: Vec<(usize, usize)> = fold.iter().map(|&(a, b)| (b, a)).collect();
                s.step(&back, bytes, all_cross);
            }
        }
        Algorithm::DoubleTree => {
            let (seconds, intra, inter) = double_tree(cluster, bytes, shape);
            s.cost.seconds += seconds;
            s.cost.intra_bytes += intra;
            s.cost.inter_bytes += inter;
        }
        Algorithm::Hierarchical => {
            let g = shape.per_node.min(n);
            let m = shape.nodes();
            if g <= 1 || m <= 1 {
                return exact(cluster, bytes, Algorithm::Ring, shape);
            }
            let local = GroupShape {
                members: g,
                per_node: g,
                groups_per_node: shape.groups_per_node,
            };
            let across = GroupShape {
                members: m,
                per_node: 1,
                groups_per_node: g * shape.groups_per_node,
            };
            let half = |c: ExchangeCost| ExchangeCost {
                seconds: c.seconds / 2.0,
                codec_seconds: 0.0,
                intra_bytes: c.intra_bytes / 2.0 * m as f64,
                inter_bytes: c.inter_bytes / 2.0 * m as f64,
            };
            let rs = half(exact(cluster, bytes, Algorithm::Ring, local));
            let mut mid = exact(cluster, bytes / g as f64, Algorithm::Ring, across);
            mid.intra_bytes *= g as f64;
            mid.inter_bytes *= g as f64;
            return rs.then(mid).then(rs);
        }
    }
    s.cost
}

/// The matrices a codec like PowerSGD sees: `(rows, cols)` of each, and the values of the
/// tensors it sends exactly.
pub type Matrices<'a> = &'a [(f64, f64)];

impl Exchange {
    /// The exchange a bucket of `values` on `shape` takes: itself, or under
    /// [`Exchange::adaptive`] the most faithful option of [`ADAPTIVE_MENU`] whose modelled time
    /// (the bytes over the links and the codec passes; latencies left out) is within
    /// [`ADAPTIVE_SLACK`] of the fastest option's, or within one message latency of it. A small
    /// bucket stays exact; a large one compresses where the links are slow, across nodes only
    /// where only those are.
    pub fn adapt(&self, cluster: &Cluster, values: f64, shape: GroupShape) -> Exchange {
        if !self.adaptive {
            return *self;
        }
        let spans = shape.nodes() > 1 && shape.per_node > 1;
        let options: Vec<Exchange> = ADAPTIVE_MENU
            .iter()
            .filter(|&&(codec, across)| !across || (spans && codec != Codec::None))
            .map(|&(codec, across)| Exchange {
                codec,
                cross_node_only: across,
                adaptive: false,
                ..*self
            })
            .collect();
        // Weighed by the bytes' time and the codec passes alone: a small bucket's latencies
        // are not what a codec saves (the across-nodes options' two levels would otherwise win
        // them, which `--allreduce hier` does exactly).
        let mut bytes_only = cluster.clone();
        bytes_only.same_node.latency_us = 0.0;
        bytes_only.cross_node.latency_us = 0.0;
        let times: Vec<f64> = options
            .iter()
            .map(|e| e.cost(&bytes_only, values, &[], shape).seconds)
            .collect();
        // A saving below one message's latency is not worth a lossy codec.
        let latency = if shape.nodes() > 1 {
            cluster.cross_node.latency_us
        } else {
            cluster.same_node.latency_us
        } * 1e-6;
        let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
        let within = (fastest * (ADAPTIVE_SLACK - 1.0)).max(latency);
        options
            .iter()
            .zip(&times)
            .find(|(_, &t)| t <= fastest + within)
            .map_or(options[0], |(e, _)| *e)
    }

    /// The algorithm this exchange runs for an exact all-reduce of `bytes` over `shape`.
    pub fn algorithm_for(&self, cluster: &Cluster, bytes: f64, shape: GroupShape) -> Algorithm {
        match self.algorithm {
            AlgorithmChoice::Fixed(a) => a,
            AlgorithmChoice::Auto => Algorithm::ALL
                .into_iter()
                .map(|a| (a, exact(cluster, bytes, a, shape).seconds))
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .map_or(Algorithm::Ring, |(a, _)| a),
        }
    }

    /// One exchange of `values` gradient values (`matrices` of them in matrices, for PowerSGD;
    /// empty: one square matrix) over `shape`.
    pub fn cost(
        &self,
        cluster: &Cluster,
        values: f64,
        matrices: Matrices<'_>,
        shape: GroupShape,
    ) -> ExchangeCost {
        if shape.members <= 1 || values <= 0.0 {
            return ExchangeCost::default();
        }
        if self.adaptive {
            return self
                .adapt(cluster, values, shape)
                .cost(cluster, values, matrices, shape);
        }
        let elem = cluster.elem_bytes;
        // An exact all-reduce of `bytes` by the algorithm chosen for them.
        let exact_of = |bytes: f64| {
            exact(
                cluster,
                bytes,
                self.algorithm_for(cluster, bytes, shape),
                shape,
            )
        };
        if self.codec == Codec::None {
            return exact_of(values * elem);
        }
        let g = shape.per_node.min(shape.members);
        if self.cross_node_only && g > 1 {
            let m = shape.nodes();
            let local = GroupShape {
                members: g,
                per_node: g,
                groups_per_node: shape.groups_per_node,
            };
            // Exact reduce-scatter and all-gather inside the node (each half a ring), the codec
            // on each member's 1/g chunk across nodes, g groups at once.
            let ring = exact(cluster, values * elem, Algorithm::Ring, local);
            let half = ExchangeCost {
                seconds: ring.seconds / 2.0,
                codec_seconds: 0.0,
                intra_bytes: ring.intra_bytes / 2.0 * m as f64,
                inter_bytes: 0.0,
            };
            if m <= 1 {
                return half.then(half);
            }
            let across = GroupShape {
                members: m,
                per_node: 1,
                groups_per_node: g * shape.groups_per_node,
            };
            let mut mid = Exchange {
                cross_node_only: false,
                ..*self
            }
            .cost(cluster, values / g as f64, matrices, across);
            mid.intra_bytes *= g as f64;
            mid.inter_bytes *= g as f64;
            return half.then(mid).then(half);
        }
        let n = shape.members;
        let memory = if cluster.memory_gbps > 0.0 {
            cluster.memory_gbps
        } else {
            DEFAULT_MEMORY_GBPS
        };
        let codec_seconds = codec_passes(self.codec) * values * 4.0 / (memory * 1e9);
        let mut s = Steps::new(cluster, shape);
        let comm = match self.codec {
            Codec::Bf16 | Codec::Fp16 | Codec::Int8 | Codec::Sign | Codec::Qsgd(_) => {
                let per_value = self.codec.encoded_words(CHUNK) as f64 * 4.0 / CHUNK as f64;
                let wire = values * per_value.min(elem);
                s.all_to_all(wire / n as f64, g);
                // Ring all-gather of the compressed sums.
                s.ring(wire / n as f64, n - 1);
                s.cost
            }
            Codec::OkTopK(_) | Codec::OkDgc(_) => {
                // The pair counts to each owner, the pairs (a share of the k pairs to each),
                // the counts of the kept sums and the kept sums (k pairs in all) gathered.
                let k = self.kept(values);
                s.all_to_all(8.0, g);
                s.all_to_all(8.0 * k / n as f64, g);
                s.ring(8.0, n - 1);
                s.ring(8.0 * k / n as f64, n - 1);
                s.cost
            }
            Codec::Sketch(rows, cols) => {
                // Sketches add: an exact all-reduce of rows × cols values (a federated uplink
                // in the runtime; priced here as a DP exchange would carry it).
                let bytes = 4.0 * (rows as f64 * cols as f64).min(values);
                exact_of(bytes)
            }
            Codec::TopK(_) | Codec::Dgc(_) => {
                // Ring all-gather of every member's (index, value) pairs (DGC's at the
                // warm-up's fraction of the step priced).
                let k = self.kept(values);
                s.ring(8.0 * k, n - 1);
                s.cost
            }
            Codec::RandK(_) => {
                let k = self.codec.keep(values as usize) as f64;
                let bytes = 4.0 * k;
                exact_of(bytes)
            }
            Codec::PowerSgd(r) => {
                let r = r as f64;
                let square = [(values.sqrt(), values.sqrt())];
                let mats = if matrices.is_empty() {
                    &square[..]
                } else {
                    matrices
                };
                let (mut p, mut q, mut plain) = (0.0, 0.0, values);
                for &(rows, cols) in mats {
                    if (rows + cols) * r < rows * cols {
                        p += rows * r;
                        q += cols * r;
                        plain -= rows * cols;
                    }
                }
                let first = 4.0 * (p + plain.max(0.0));
                let second = 4.0 * q;
                exact_of(first).then(exact_of(second))
            }
            Codec::None => ExchangeCost::default(),
        };
        ExchangeCost {
            seconds: comm.seconds + codec_seconds,
            codec_seconds,
            ..comm
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(cross_gbps: f64) -> Cluster {
        Cluster::new(
            "t",
            4,
            8,
            100.0,
            80.0,
            Link::new(200.0, 5.0),
            Link::new(cross_gbps, 20.0),
        )
    }

    #[test]
    fn dgc_is_priced_at_the_warm_up_fraction_of_the_step() {
        let at = |step| Exchange {
            codec: Codec::Dgc(0.01),
            step,
            ..Exchange::default()
        };
        // Stages of 25 steps: a quarter, a sixteenth, …, down to the final fraction.
        assert_eq!(at(Some(0)).kept(1000.0), 250.0);
        assert_eq!(at(Some(25)).kept(1000.0), 63.0);
        assert_eq!(at(Some(1000)).kept(1000.0), 10.0);
        assert_eq!(at(None).kept(1000.0), 10.0);
        let shape = GroupShape {
            members: 8,
            per_node: 4,
            groups_per_node: 1,
        };
        let c = cluster(1.0);
        let secs = |e: Exchange| e.cost(&c, 1e6, &[], shape).seconds;
        assert!(secs(at(Some(0))) > 10.0 * secs(at(None)));
    }

    #[test]
    fn a_ring_priced_in_closed_form_equals_its_pairs_stepped_one_by_one() {
        for cross in [0.5, 25.0, 400.0] {
            let c = cluster(cross);
            for members in 1..=40 {
                for per_node in [1, 2, 3, 4, 8, 64] {
                    for groups_per_node in [1, 2] {
                        let shape = GroupShape {
                            members,
                            per_node,
                            groups_per_node,
                        };
                        let mut fast = Steps::new(&c, shape);
                        fast.ring(1e5, 7);
                        let mut slow = Steps::new(&c, shape);
                        let pairs: Vec<_> = (0..members).map(|i| (i, (i + 1) % members)).collect();
                        for _ in 0..7 {
                            slow.step(&pairs, 1e5, groups_per_node);
                        }
                        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
                        let (f, s) = (fast.cost, slow.cost);
                        assert!(
                            close(f.seconds, s.seconds)
                                && close(f.intra_bytes, s.intra_bytes)
                                && close(f.inter_bytes, s.inter_bytes),
                            "{shape:?}: {f:?} vs {s:?}"
                        );
                    }
                }
            }
        }
    }

    fn fixed(a: Algorithm) -> Exchange {
        Exchange {
            algorithm: AlgorithmChoice::Fixed(a),
            ..Exchange::default()
        }
    }

    /// `auto` keeps small buckets and fast links exact, compresses large buckets across slow
    /// links only, and compresses the whole group where every link is slow; what it picks is
    /// never slower than exact by more than its slack, and each choice's time is within the
    /// slack of the fastest of the menu.
    #[test]
    fn auto_compresses_large_buckets_where_links_are_slow() {
        let auto = Exchange {
            adaptive: true,
            ..Exchange::default()
        };
        let two_nodes = GroupShape {
            members: 16,
            per_node: 8,
            groups_per_node: 1,
        };
        let one_node = GroupShape {
            members: 8,
            per_node: 8,
            groups_per_node: 1,
        };
        let pick = |c: &Cluster, values: f64, shape| auto.adapt(c, values, shape);
        let (fast, slow) = (cluster(400.0), cluster(1.0));
        // Inside one 200 GB/s node the codec passes cost more than the bytes they save.
        assert_eq!(pick(&fast, 1e8, one_node).codec, Codec::None);
        // A few hundred values: latency, not bytes.
        assert_eq!(pick(&slow, 300.0, two_nodes).codec, Codec::None);
        // 100 M values over 1 GB/s across nodes: compressed, across nodes only.
        let big = pick(&slow, 1e8, two_nodes);
        assert!(big.codec != Codec::None && big.cross_node_only, "{big}");
        assert!(!big.adaptive);
        // Every link slow: the whole group compressed.
        let mut all_slow = cluster(1.0);
        all_slow.same_node.gbps = 1.0;
        let whole = pick(&all_slow, 1e8, two_nodes);
        assert!(
            whole.codec == Codec::Int8 && !whole.cross_node_only,
            "{whole}"
        );
        for (c, shape) in [
            (&fast, one_node),
            (&slow, two_nodes),
            (&all_slow, two_nodes),
        ] {
            let chosen = pick(c, 1e8, shape).cost(c, 1e8, &[], shape).seconds;
            let exact = Exchange::default().cost(c, 1e8, &[], shape).seconds;
            // (Latencies included here: at 100 M values they are a rounding.)
            assert!(
                chosen <= exact * ADAPTIVE_SLACK,
                "{chosen} vs exact {exact}"
            );
            // The cost of `auto` is its choice's.
            assert_eq!(auto.cost(c, 1e8, &[], shape).seconds, chosen);
        }
        assert_eq!(compression("auto").unwrap(), (Codec::None, true));
        assert_eq!(compression("int8").unwrap(), (Codec::Int8, false));
        assert!(compression("fast").is_err());
    }

    #[test]
    fn the_ring_is_bandwidth_optimal_and_latency_bound() {
        let c = cluster(25.0);
        let one_node = GroupShape {
            members: 8,
            per_node: 8,
            groups_per_node: 1,
        };
        // Big message inside a node: ring = 2(n−1)/n·S/B + 2(n−1)α.
        let s = 1e9;
        let ring = fixed(Algorithm::Ring).cost(&c, s / 2.0, &[], one_node);
        let want = 2.0 * 7.0 / 8.0 * s / 200e9 + 14.0 * 5e-6;
        assert!(
            (ring.seconds / want - 1.0).abs() < 1e-9,
            "{} vs {want}",
            ring.seconds
        );
        assert_eq!(ring.inter_bytes, 0.0);
        assert!((ring.intra_bytes - 8.0 * 2.0 * 7.0 / 8.0 * s).abs() < 1.0);
        // Halving–doubling moves the same bytes in 2·log2(n) steps.
        let rhd = fixed(Algorithm::HalvingDoubling).cost(&c, s / 2.0, &[], one_node);
        assert!((rhd.intra_bytes - ring.intra_bytes).abs() < 1.0);
        let small = |a| fixed(a).cost(&c, 16.0, &[], one_node).seconds;
        assert!(small(Algorithm::HalvingDoubling) < small(Algorithm::Ring));
        // Auto picks the cheapest for each size.
        let auto = Exchange {
            algorithm: AlgorithmChoice::Auto,
            ..Exchange::default()
        };
        for v in [16.0, 1e4, 1e8] {
            let best = Algorithm::ALL
                .into_iter()
                .map(|a| fixed(a).cost(&c, v, &[], one_node).seconds)
                .fold(f64::INFINITY, f64::min);
            assert_eq!(auto.cost(&c, v, &[], one_node).seconds, best);
        }
    }

    #[test]
    fn across_slow_nodes_the_hierarchy_and_the_codecs_pay() {
        // One 25 Gb/s port per node.
        let c = Cluster {
            nic_gbps: 25.0 / 8.0,
            ..cluster(25.0 / 8.0 / 8.0)
        };
        let shape = GroupShape {
            members: 32,
            per_node: 8,
            groups_per_node: 1,
        };
        let v = 25e6;
        let ring = fixed(Algorithm::Ring).cost(&c, v, &[], shape);
        let hier = fixed(Algorithm::Hierarchical).cost(&c, v, &[], shape);
        assert!(hier.seconds < ring.seconds);
        // Fewer bytes cross nodes (2(m−1)/m·S per node instead of 2(n−1)/n·S) in fewer steps.
        let s = v * c.elem_bytes;
        assert!((ring.inter_bytes - 4.0 * 2.0 * 31.0 / 32.0 * s).abs() < 1.0);
        assert!(
            (hier.inter_bytes - 4.0 * 2.0 * 3.0 / 4.0 * s).abs() < 1.0,
            "{hier:?}"
        );
        let with = |codec| {
            Exchange {
                codec,
                ..fixed(Algorithm::Ring)
            }
            .cost(&c, v, &[], shape)
        };
        let (bf16, int8, sign) = (with(Codec::Bf16), with(Codec::Int8), with(Codec::Sign));
        // elem_bytes 2 (bf16 gradients): bf16 saves nothing, int8 halves what a member sends,
        // sign sends ~1/14.
        let total = |c: &ExchangeCost| c.intra_bytes + c.inter_bytes;
        assert!(total(&int8) < 0.6 * total(&ring));
        assert!(total(&sign) < 0.1 * total(&ring));
        assert!(bf16.seconds >= ring.seconds * 0.99);
        // But a flat compressed all-to-all sends 3/4 of every member's chunks off its node,
        // where the ring sends one member's: across nodes int8 loses, only sign still wins.
        assert!(int8.inter_bytes > ring.inter_bytes && int8.seconds > ring.seconds);
        assert!(sign.seconds < ring.seconds);
        // Compressing only across nodes keeps the fast links exact and still cuts the slow ones.
        let cross = Exchange {
            codec: Codec::Int8,
            cross_node_only: true,
            ..fixed(Algorithm::Ring)
        }
        .cost(&c, v, &[], shape);
        assert!(cross.inter_bytes < 0.6 * hier.inter_bytes);
        assert!(cross.seconds < hier.seconds);
        // Top-k's all-gather grows with the members (31 × 1% × 8 bytes a value); PowerSGD's
        // factors are a sliver.
        assert!(with(Codec::TopK(0.01)).inter_bytes < ring.inter_bytes);
        assert!(with(Codec::PowerSgd(4)).inter_bytes < 0.05 * ring.inter_bytes);
    }

    #[test]
    fn names_round_trip() {
        for s in ["auto", "ring", "rhd", "tree", "hier"] {
            assert_eq!(s.parse::<AlgorithmChoice>().unwrap().to_string(), s);
        }
        let e = "fast".parse::<AlgorithmChoice>().unwrap_err().to_string();
        assert!(e.contains("fast") && e.contains("auto, ring"), "{e}");
    }
}
