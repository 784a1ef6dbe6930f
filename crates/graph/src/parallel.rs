//! Lowering a logical graph to the exec graph of one strategy's TP group: every tensor gets a
//! DState over the TP ranks, deduced op by op (Megatron column/row parallel linears,
//! vocab-parallel embedding and cross-entropy, KV heads replicated when TP exceeds them, sequence
//! parallelism of the residual stream), and a comm op is inserted wherever a consumer needs a
//! different DState than its producer gives. DP replicas run the same exec graph on different
//! data; their gradient reduction is done by the runtime. Pipeline stages and ZeRO are not built
//! yet and are refused.

use std::collections::HashMap;
use std::fmt;

use dstate::{transition, Axis, DState, Placement};

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Op, OpKind, TensorId, TensorKind, TpLayout};
use crate::strategy::Strategy;

/// One strategy's executable graph: the logical graph's ops with comm ops inserted, and the
/// DState of every tensor over the TP group (normalised: no degree-1 axes, adjacent `D` and `P`
/// axes merged).
#[derive(Debug, Clone)]
pub struct ExecGraph {
    /// Ops in execution order, comm ops included.
    pub graph: Graph,
    /// DState over the TP group of every tensor of `graph`.
    pub states: Vec<DState>,
    /// The strategy it was lowered for.
    pub strategy: Strategy,
    /// Where comm ops were inserted, in logical terms (for the shared multi-strategy view).
    pub comm_points: Vec<CommPoint>,
}

/// A place of the logical graph where a strategy inserted communication: before logical op `at`
/// (or at the end, `at = ops.len()`, for gradients brought to their parameter's DState), on
/// logical tensor `tensor`, the chain of collectives `steps` along TP axes.
#[derive(Debug, Clone, PartialEq)]
pub struct CommPoint {
    /// Index of the logical op that needed the tensor in another DState.
    pub at: usize,
    /// The logical tensor moved.
    pub tensor: TensorId,
    /// `(collective, axis)` in order.
    pub steps: Vec<(dstate::Collective, usize)>,
}

/// Merges adjacent `D`/`D` and `P`/`P` axes and drops degree-1 axes.
pub fn normalize(s: &DState) -> DState {
    let mut axes: Vec<Axis> = Vec::new();
    for a in s.axes().iter().filter(|a| a.degree > 1) {
        match axes.last_mut() {
            Some(last)
                if last.placement == a.placement
                    && matches!(a.placement, Placement::Duplicate | Placement::Partial) =>
            {
                last.degree *= a.degree;
            }
            _ => axes.push(*a),
        }
    }
    // Degrees are all ≥ 1, so the state is valid.
    DState::new(axes).unwrap_or_else(|_| s.clone())
}

fn one(p: Placement, t: usize) -> DState {
    normalize(
        &DState::new(vec![Axis {
            placement: p,
            degree: t,
        }])
        .unwrap_or_else(|_| empty()),
    )
}

fn empty() -> DState {
    // Invariant: DState::new only fails on a zero degree; an empty axis list has none.
    DState::new(vec![]).expect("an empty axis list is a valid DState")
}

fn two(a: Axis, b: Axis) -> DState {
    normalize(&DState::new(vec![a, b]).unwrap_or_else(|_| empty()))
}

/// The DState of a parameter with `layout` and `shape` over `t` TP ranks.
pub fn param_state(layout: TpLayout, shape: &[usize], t: usize, name: &str) -> Result<DState> {
    let err = |reason: String| GraphError::Strategy {
        spec: format!("tp{t}"),
        reason: format!("{name}: {reason}"),
    };
    Ok(match layout {
        TpLayout::Replicated => one(Placement::Duplicate, t),
        TpLayout::Vocab => one(Placement::Split(0), t),
        TpLayout::Column { unit } | TpLayout::Row { unit } => {
            // Column weights are `[out, in]` split by output rows, row-parallel weights `[in,
            // out]` split by input rows: dim 0 either way, so every piece is contiguous.
            let row = matches!(layout, TpLayout::Row { .. });
            let units = shape[0] / unit.max(1);
            if unit <= 1 || units.is_multiple_of(t) {
                one(Placement::Split(0), t)
            } else if !row && t.is_multiple_of(units) {
                // Fewer groups (KV heads) than TP ranks: split by group, replicate each group.
                two(Axis::split(0, units), Axis::dup(t / units))
            } else {
                return Err(err(format!(
                    "{units} groups of {unit} cannot be split over {t} TP ranks (the degree must divide the number of heads{})",
                    if row { "" } else { ", or be a multiple of it" }
                )));
            }
        }
    })
}

/// Replaces every `D` axis by `P` (a gradient flowing back through replicated computation).
fn dup_to_partial(s: &DState) -> DState {
    let axes = s
        .axes()
        .iter()
        .map(|a| match a.placement {
            Placement::Duplicate => Axis::partial(a.degree),
            _ => *a,
        })
        .collect();
    normalize(&DState::new(axes).unwrap_or_else(|_| s.clone()))
}

/// Expands single `D`/`P` axes of `s` so that its degrees match `degrees` (e.g. `[P×4]` to
/// `[P×2, P×2]`), when possible.
fn refine(s: &DState, degrees: &[usize]) -> Option<DState> {
    let mut out = Vec::new();
    let mut want = degrees.iter().copied().peekable();
    for a in s.axes() {
        let mut left = a.degree;
        while left > 1 {
            let d = want.next()?;
            if !left.is_multiple_of(d) || (d != left && matches!(a.placement, Placement::Split(_)))
            {
                return None;
            }
            out.push(Axis {
                placement: a.placement,
                degree: d,
            });
            left /= d;
        }
    }
    if want.next().is_some() {
        return None;
    }
    DState::new(out).ok()
}

/// The chain of one-axis transitions from `from` to `to`: `(collective, axis, state after)`.
fn plan(from: &DState, to: &DState) -> Result<Vec<(dstate::Collective, usize, DState)>> {
    let degrees = |s: &DState| s.axes().iter().map(|a| a.degree).collect::<Vec<_>>();
    let (a, b) = if degrees(from) == degrees(to) {
        (from.clone(), to.clone())
    } else if let Some(r) = refine(from, &degrees(to)) {
        (r, to.clone())
    } else if let Some(r) = refine(to, &degrees(from)) {
        (from.clone(), r)
    } else {
        return Err(GraphError::NotImplemented(format!(
            "moving a tensor from {from} to {to} (different axis structure)"
        )));
    };
    let mut steps = Vec::new();
    let mut cur = a;
    for i in 0..cur.axes().len() {
        if cur.axes()[i] == b.axes()[i] {
            continue;
        }
        let mut axes = cur.axes().to_vec();
        axes[i] = b.axes()[i];
        let next = DState::new(axes).map_err(|e| GraphError::Invalid(e.to_string()))?;
        let t = transition(&cur, &next).map_err(|e| GraphError::NotImplemented(e.to_string()))?;
        steps.push((t.collective, i, next.clone()));
        cur = next;
    }
    Ok(steps)
}

struct Lowering<'a> {
    logical: &'a Graph,
    g: Graph,
    states: Vec<Option<DState>>,
    cache: HashMap<(TensorId, DState), TensorId>,
    /// A Partial activation once settled into the stream DState: every later reader (backward
    /// ops reading saved forward tensors included) uses the settled tensor.
    alias: HashMap<TensorId, TensorId>,
    t: usize,
    stream: DState,
    full: DState,
    /// The logical op being lowered.
    at: usize,
    /// Number of forward ops of the logical graph.
    forward: usize,
    /// ZeRO-3: the gathered piece of each parameter, for the forward and for the backward.
    gathered: HashMap<(TensorId, bool), TensorId>,
    zero3: bool,
    /// The logical tensor every comm output stands for.
    origin: HashMap<TensorId, TensorId>,
    points: Vec<CommPoint>,
}

impl Lowering<'_> {
    fn state(&self, x: TensorId) -> Result<DState> {
        self.states[x.0].clone().ok_or_else(|| {
            GraphError::Invalid(format!("{} has no DState yet", self.g.info(x).name))
        })
    }

    fn set(&mut self, x: TensorId, s: DState) {
        if self.states.len() <= x.0 {
            self.states.resize(x.0 + 1, None);
        }
        self.states[x.0] = Some(normalize(&s));
    }

    /// `x` in DState `want`, inserting comm ops (shared by every consumer) when needed.
    fn require(&mut self, x: TensorId, want: &DState) -> Result<TensorId> {
        let want = normalize(want);
        let have = self.state(x)?;
        if have == want {
            return Ok(x);
        }
        if let Some(&y) = self.cache.get(&(x, want.clone())) {
            return Ok(y);
        }
        let mut cur = x;
        let source = self.origin.get(&x).copied().unwrap_or(x);
        let mut steps = Vec::new();
        for (collective, axis, next) in plan(&have, &want)? {
            steps.push((collective, axis));
            let info = self.g.info(x).clone();
            let y = self.g.add_tensor(
                format!("{}@{}", info.name, normalize(&next)),
                info.shape,
                info.kind,
            );
            self.g.ops.push(Op {
                kind: OpKind::Comm { collective, axis },
                inputs: vec![cur],
                outputs: vec![y],
            });
            self.set(y, next);
            self.origin.insert(y, source);
            cur = y;
        }
        self.points.push(CommPoint {
            at: self.at,
            tensor: source,
            steps,
        });
        self.cache.insert((x, want), cur);
        Ok(cur)
    }

    /// Ends the forward part: outputs in the stream's DState, the loss replicated.
    fn finish_forward(&mut self) -> Result<()> {
        let mut outputs = Vec::with_capacity(self.logical.outputs.len());
        for &o in &self.logical.outputs {
            let o = self.alias.get(&o).copied().unwrap_or(o);
            let s = self.stream.clone();
            outputs.push(self.require(o, &s)?);
        }
        self.g.outputs = outputs;
        if let Some(l) = self.logical.loss {
            let full = self.full.clone();
            self.require(l, &full)?;
        }
        self.g.forward_ops = self.logical.forward_ops.map(|_| self.g.ops.len());
        Ok(())
    }

    fn push(&mut self, op: &Op, inputs: Vec<TensorId>, outs: Vec<DState>) {
        for (&o, s) in op.outputs.iter().zip(outs) {
            self.set(o, s);
        }
        self.g.ops.push(Op {
            kind: op.kind,
            inputs,
            outputs: op.outputs.clone(),
        });
    }

    /// `x` with every token on every rank (all-gathered when it is token-split or partial).
    fn whole_tokens(&mut self, x: TensorId, allow_partial: bool) -> Result<TensorId> {
        let s = self.state(x)?;
        if Self::is_split(&s, 0) || (is_partial(&s) && !allow_partial) {
            let full = self.full.clone();
            self.require(x, &full)
        } else {
            Ok(x)
        }
    }

    fn is_split(s: &DState, dim: usize) -> bool {
        s.axes()
            .iter()
            .any(|a| a.placement == Placement::Split(dim))
    }

    /// ZeRO-3: the gathered piece of parameter `p` for the current phase (gathered on first use).
    fn gathered(&mut self, p: TensorId) -> TensorId {
        let backward = self.at >= self.forward;
        if let Some(&t) = self.gathered.get(&(p, backward)) {
            return t;
        }
        let info = self.g.info(p).clone();
        let phase = if backward { "bwd" } else { "fwd" };
        let t = self.g.add_tensor(
            format!("{}@gathered.{phase}", info.name),
            info.shape,
            TensorKind::Activation,
        );
        self.g.ops.push(Op {
            kind: OpKind::GatherParam,
            inputs: vec![p],
            outputs: vec![t],
        });
        let s = self.states[p.0].clone();
        if let Some(s) = s {
            self.set(t, s);
        }
        self.gathered.insert((p, backward), t);
        t
    }

    fn lower_op(&mut self, op: &Op) -> Result<()> {
        let mut inputs: Vec<TensorId> = op
            .inputs
            .iter()
            .map(|x| self.alias.get(x).copied().unwrap_or(*x))
            .collect();
        if self.zero3 {
            for (slot, x) in inputs.iter_mut().enumerate() {
                // The embedding gradient reads its weight for the shape only.
                let shape_only = op.kind == OpKind::EmbeddingGrad && slot == 1;
                if self.g.info(*x).kind == TensorKind::Param && !shape_only {
                    *x = self.gathered(*x);
                }
            }
        }
        let i = &inputs;
        let full = self.full.clone();
        let stream = self.stream.clone();
        // A Partial activation becomes the residual stream's DState before it is used, for good.
        let settle = |me: &mut Self, x: TensorId| -> Result<TensorId> {
            let s = me.state(x)?;
            if is_partial(&s) && me.g.info(x).kind == TensorKind::Activation {
                let y = me.require(x, &stream)?;
                me.alias.insert(x, y);
                Ok(y)
            } else if is_partial(&s) {
                me.require(x, &stream)
            } else {
                Ok(x)
            }
        };
        match op.kind {
            OpKind::Embedding => {
                let w = self.state(i[0])?;
                let out = if Self::is_split(&w, 0) {
                    dup_to_partial(&full)
                } else {
                    full.clone()
                };
                self.push(op, vec![i[0]], vec![out]);
            }
            OpKind::EmbeddingGrad => {
                let dy = self.require(i[0], &full)?;
                let w = self.state(i[1])?;
                self.push(op, vec![dy, i[1]], vec![w]);
            }
            OpKind::Linear { w: layout } => {
                let (out_dim, in_dim) = (layout.out_dim(), layout.in_dim());
                let w = self.state(i[1])?;
                if Self::is_split(&w, out_dim) {
                    let x = self.require(i[0], &full)?;
                    self.push(op, vec![x, i[1]], vec![swap_split(&w, out_dim, 1)]);
                } else if Self::is_split(&w, in_dim) {
                    let x = self.require(i[0], &swap_split(&w, in_dim, 1))?;
                    self.push(op, vec![x, i[1]], vec![dup_to_partial(&full)]);
                } else {
                    let x = settle(self, i[0])?;
                    let s = self.state(x)?;
                    self.push(op, vec![x, i[1]], vec![s]);
                }
            }
            OpKind::LinearGradInput { w: layout } => {
                let (out_dim, in_dim) = (layout.out_dim(), layout.in_dim());
                let w = self.state(i[1])?;
                if Self::is_split(&w, out_dim) {
                    // dy is split like the output; the product is partial over the split axes.
                    let dy = self.state(i[0])?;
                    let out = partial_over_splits(&dy);
                    self.push(op, vec![i[0], i[1]], vec![out]);
                } else if Self::is_split(&w, in_dim) {
                    let dy = self.require(i[0], &full)?;
                    self.push(op, vec![dy, i[1]], vec![swap_split(&w, in_dim, 1)]);
                } else {
                    let dy = settle(self, i[0])?;
                    let s = self.state(dy)?;
                    self.push(op, vec![dy, i[1]], vec![s]);
                }
            }
            OpKind::LinearGradWeight { w: layout } => {
                let dy = self.state(i[0])?;
                if Self::is_split(&dy, 1) {
                    // Column parallel: dW's output features split like dy's columns.
                    let x = self.require(i[1], &full)?;
                    let dw = swap_split(&dy, 1, layout.out_dim());
                    self.push(op, vec![i[0], x], vec![dw]);
                } else {
                    let x = self.state(i[1])?;
                    if Self::is_split(&x, 1) {
                        // Row parallel: dW's input features split like x's columns.
                        let dy = self.require(i[0], &full)?;
                        let dw = swap_split(&x, 1, layout.in_dim());
                        self.push(op, vec![dy, i[1]], vec![dw]);
                    } else {
                        // A replicated weight: every rank holds its own tokens' contribution.
                        let dy = settle(self, i[0])?;
                        let x = self.require(i[1], &self.state(dy)?)?;
                        let s = self.state(dy)?;
                        let out = if Self::is_split(&s, 0) {
                            dup_to_partial(&full)
                        } else {
                            full.clone()
                        };
                        self.push(op, vec![dy, x], vec![out]);
                    }
                }
            }
            OpKind::RmsNorm { .. } => {
                let x = settle(self, i[0])?;
                let s = self.state(x)?;
                self.push(op, vec![x, i[1]], vec![s.clone(), s]);
            }
            OpKind::RmsNormGrad => {
                let xs = self.state(i[1])?;
                let dy = self.require(i[0], &xs)?;
                let dw = if Self::is_split(&xs, 0) {
                    dup_to_partial(&full)
                } else {
                    full.clone()
                };
                self.push(op, vec![dy, i[1], i[2], i[3]], vec![xs, dw]);
            }
            OpKind::Rope { .. } | OpKind::RopeGrad { .. } => {
                // RoPE reads positions, so never on a token-split tensor; it is linear, so a
                // Partial gradient may go through as it is.
                let x = self.whole_tokens(i[0], matches!(op.kind, OpKind::RopeGrad { .. }))?;
                let s = self.state(x)?;
                self.push(op, vec![x], vec![s]);
            }
            OpKind::Attention { .. } => {
                let mut ins = Vec::with_capacity(3);
                for &x in &i[..3] {
                    ins.push(self.whole_tokens(x, false)?);
                }
                let q = self.state(ins[0])?;
                let lse = swap_split(&q, 1, 0);
                self.push(op, ins, vec![q, lse]);
            }
            OpKind::AttentionGrad { .. } => {
                // The saved q, k, v are the versions the forward read (shared conversions).
                let mut ins = i.clone();
                for x in ins.iter_mut().take(4).skip(1) {
                    *x = self.whole_tokens(*x, false)?;
                }
                let os = self.state(ins[4])?;
                ins[0] = self.require(i[0], &os)?;
                let (qs, ks) = (self.state(ins[1])?, self.state(ins[2])?);
                let kgrad = dup_to_partial(&ks);
                self.push(op, ins, vec![qs, kgrad.clone(), kgrad]);
            }
            OpKind::SwiGlu => {
                let s = self.state(i[0])?;
                let u = self.require(i[1], &s)?;
                self.push(op, vec![i[0], u], vec![s]);
            }
            OpKind::SwiGluGrad => {
                let s = self.state(i[1])?;
                let d = self.require(i[0], &s)?;
                self.push(op, vec![d, i[1], i[2]], vec![s.clone(), s]);
            }
            OpKind::Add => {
                let grad = self.g.info(op.outputs[0]).kind == TensorKind::Grad;
                let (a, b) = (self.state(i[0])?, self.state(i[1])?);
                if grad && a == b {
                    // Gradient parts in the same DState (Partial included) add locally.
                    self.push(op, vec![i[0], i[1]], vec![a]);
                } else {
                    let x = settle(self, i[0])?;
                    let y = settle(self, i[1])?;
                    let (a, b) = (self.state(x)?, self.state(y)?);
                    let target = if a == b { a } else { stream.clone() };
                    let x = self.require(x, &target)?;
                    let y = self.require(y, &target)?;
                    self.push(op, vec![x, y], vec![target]);
                }
            }
            OpKind::CrossEntropy => {
                let s = self.state(i[0])?;
                let x = if is_partial(&s) {
                    self.require(i[0], &full)?
                } else {
                    i[0]
                };
                self.push(op, vec![x], vec![full.clone(), full]);
            }
            OpKind::CrossEntropyGrad => {
                let s = self.state(i[0])?;
                self.push(op, i.clone(), vec![s]);
            }
            OpKind::Comm { .. } | OpKind::GatherParam => {
                return Err(GraphError::Invalid(
                    "the logical graph already holds comm ops".into(),
                ))
            }
        }
        Ok(())
    }
}

fn is_partial(s: &DState) -> bool {
    s.axes().iter().any(|a| a.placement == Placement::Partial)
}

/// Moves every `Split(from)` axis to `Split(to)`.
fn swap_split(s: &DState, from: usize, to: usize) -> DState {
    let axes = s
        .axes()
        .iter()
        .map(|a| match a.placement {
            Placement::Split(d) if d == from => Axis::split(to, a.degree),
            _ => *a,
        })
        .collect();
    normalize(&DState::new(axes).unwrap_or_else(|_| s.clone()))
}

/// Every split axis becomes Partial; Duplicate and Partial axes stay.
fn partial_over_splits(s: &DState) -> DState {
    let axes = s
        .axes()
        .iter()
        .map(|a| match a.placement {
            Placement::Split(_) => Axis::partial(a.degree),
            _ => *a,
        })
        .collect();
    normalize(&DState::new(axes).unwrap_or_else(|_| s.clone()))
}

/// Lowers a differentiated logical graph to `strategy`'s exec graph.
pub fn lower(logical: &Graph, strategy: &Strategy) -> Result<ExecGraph> {
    // Recomputation rewrites the backward (if there is one) before anything is placed.
    let recomputed;
    let logical = if strategy.recompute != crate::Recompute::None && logical.forward_ops.is_some() {
        recomputed = crate::recompute::recompute(logical, strategy.recompute)?;
        &recomputed
    } else {
        logical
    };
    if strategy.pp > 1 && logical.inputs.is_empty() && logical.outputs.is_empty() {
        return Err(GraphError::Strategy {
            spec: strategy.to_string(),
            reason: "with pipeline stages, lower one stage's graph (it has an input or an output activation), not the whole model".into(),
        });
    }
    let t = strategy.tp;
    let full = one(Placement::Duplicate, t);
    let stream = if strategy.sp {
        one(Placement::Split(0), t)
    } else {
        full.clone()
    };
    let mut g = logical.clone();
    g.ops.clear();
    let mut low = Lowering {
        logical,
        g,
        states: vec![None; logical.tensors.len()],
        cache: HashMap::new(),
        alias: HashMap::new(),
        t,
        stream,
        full,
        at: 0,
        forward: logical.num_forward_ops(),
        gathered: HashMap::new(),
        zero3: strategy.zero >= crate::Zero::Parameters && strategy.replicas() > 1,
        origin: HashMap::new(),
        points: Vec::new(),
    };
    for (k, &p) in logical.params.iter().enumerate() {
        let info = logical.info(p);
        let shape = info.resolve(0);
        let layout = logical.param_layouts.get(k).copied().unwrap_or_default();
        let s = param_state(layout, &shape, low.t, &info.name)?;
        low.set(p, s);
    }
    // Stage boundaries carry the residual stream.
    for &x in logical.inputs.iter().chain(&logical.output_grads) {
        let s = low.stream.clone();
        low.set(x, s);
    }
    let forward = logical.num_forward_ops();
    for (k, op) in logical.ops.iter().enumerate() {
        low.at = k;
        if k == forward {
            low.finish_forward()?;
        }
        low.lower_op(op)?;
    }
    low.at = logical.ops.len();
    if forward == logical.ops.len() {
        low.finish_forward()?;
    }
    let mut input_grads = Vec::with_capacity(logical.input_grads.len());
    for &(x, gx) in &logical.input_grads {
        let s = low.stream.clone();
        input_grads.push((x, low.require(gx, &s)?));
    }
    low.g.input_grads = input_grads;
    // Gradients end in their parameter's DState.
    let mut grads = Vec::with_capacity(low.logical.grads.len());
    for &(p, gp) in &low.logical.grads {
        let want = low.state(p)?;
        grads.push((p, low.require(gp, &want)?));
    }
    low.g.grads = grads;
    low.g.verify()?;
    let states = low
        .states
        .into_iter()
        .enumerate()
        .map(|(k, s)| s.ok_or_else(|| GraphError::Invalid(format!("tensor %{k} got no DState"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(ExecGraph {
        graph: low.g,
        states,
        strategy: strategy.clone(),
        comm_points: low.points,
    })
}

impl fmt::Display for ExecGraph {
    /// The ops with each tensor's DState; comm ops show their collective and axis.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = |x: TensorId| {
            let info = self.graph.info(x);
            let dims: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
            format!(
                "{x} {}[{}] {}",
                info.name,
                dims.join(", "),
                self.states[x.0]
            )
        };
        writeln!(
            f,
            "# strategy {}: tensor DStates over the TP group of {}",
            self.strategy, self.strategy.tp
        )?;
        for &p in &self.graph.params {
            writeln!(f, "param {}", label(p))?;
        }
        for op in &self.graph.ops {
            let outs: Vec<String> = op.outputs.iter().map(|&x| label(x)).collect();
            let ins: Vec<String> = op.inputs.iter().map(|x| x.to_string()).collect();
            let name = match op.kind {
                OpKind::Comm { collective, axis } => format!("{}@tp.axis{axis}", collective.name()),
                k => k.name().to_string(),
            };
            writeln!(f, "{} = {}({})", outs.join(", "), name, ins.join(", "))?;
        }
        Ok(())
    }
}

/// A comm point of the shared view: `(at, tensor, per strategy: Some(steps) or None = dummy)`.
pub type SharedPoint = (
    usize,
    TensorId,
    Vec<Option<Vec<(dstate::Collective, usize)>>>,
);

/// One logical graph for several strategies (DESIGN §2.3): the union of the places where any of
/// them communicates, each with that strategy's collectives, or a dummy where it needs none.
#[derive(Debug, Clone)]
pub struct SharedComm {
    /// The strategies, in column order.
    pub strategies: Vec<Strategy>,
    /// `(at, tensor, per strategy: Some(steps) or None for a dummy)`, in graph order.
    pub points: Vec<SharedPoint>,
    names: Vec<String>,
    ops: Vec<String>,
}

impl SharedComm {
    /// Merges the comm points of exec graphs lowered from the same logical graph.
    pub fn new(logical: &Graph, execs: &[ExecGraph]) -> Self {
        let mut keys: Vec<(usize, TensorId)> = execs
            .iter()
            .flat_map(|e| e.comm_points.iter().map(|p| (p.at, p.tensor)))
            .collect();
        keys.sort();
        keys.dedup();
        let points = keys
            .into_iter()
            .map(|(at, t)| {
                let per = execs
                    .iter()
                    .map(|e| {
                        e.comm_points
                            .iter()
                            .find(|p| p.at == at && p.tensor == t)
                            .map(|p| p.steps.clone())
                    })
                    .collect();
                (at, t, per)
            })
            .collect();
        Self {
            strategies: execs.iter().map(|e| e.strategy.clone()).collect(),
            points,
            names: logical.tensors.iter().map(|t| t.name.clone()).collect(),
            ops: logical
                .ops
                .iter()
                .map(|o| o.kind.name().to_string())
                .collect(),
        }
    }

    /// Number of comm points that are dummies for strategy column `k`.
    pub fn dummies(&self, k: usize) -> usize {
        self.points.iter().filter(|p| p.2[k].is_none()).count()
    }
}

impl fmt::Display for SharedComm {
    /// One line per comm point: `%13 model.embed_tokens → op#2 rms_norm: tp2 all-reduce@0 | dp2 dummy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, t, per) in &self.points {
            let target = self.ops.get(*at).map_or(
                "end (gradient in its parameter's DState)".to_string(),
                |o| format!("op#{at} {o}"),
            );
            let cols: Vec<String> = per
                .iter()
                .zip(&self.strategies)
                .map(|(steps, s)| match steps {
                    None => format!("{s} dummy"),
                    Some(st) => {
                        let c: Vec<String> = st
                            .iter()
                            .map(|(c, a)| format!("{}@{a}", c.name()))
                            .collect();
                        format!("{s} {}", c.join("+"))
                    }
                })
                .collect();
            writeln!(
                f,
                "{t} {} → {target}: {}",
                self.names[t.0],
                cols.join(" | ")
            )?;
        }
        Ok(())
    }
}
