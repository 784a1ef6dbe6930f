//! The IR: tensors with shapes over a symbolic token dim, and ops that read and write them.

use std::fmt;

use dstate::Collective;
use kernels::AttnShape;

/// Index of a tensor in its graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TensorId(pub usize);

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One dimension of a tensor: fixed, or the number of tokens of the micro-batch (known at run
/// time only, so one graph serves every micro-batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// The micro-batch's packed token count `T`.
    Tokens,
    /// A size fixed by the model.
    Fixed(usize),
}

impl Dim {
    /// The size once the token count is known.
    pub fn resolve(self, tokens: usize) -> usize {
        match self {
            Dim::Tokens => tokens,
            Dim::Fixed(n) => n,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Tokens => write!(f, "T"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// What a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorKind {
    /// A model parameter, bound from outside.
    Param,
    /// An intermediate value of the forward pass (or saved statistics such as `rstd`, `lse`).
    Activation,
    /// A gradient, produced by the backward pass.
    Grad,
    /// A value bound from outside at run time: a pipeline stage's incoming activation, or the
    /// incoming gradient of its outgoing activation.
    Input,
}

/// A tensor's static description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Readable name (HF name for parameters, `grad(name)` for gradients).
    pub name: String,
    /// Shape, outermost dim first; row-major storage.
    pub shape: Vec<Dim>,
    /// What it is.
    pub kind: TensorKind,
}

impl TensorInfo {
    /// Concrete shape for a micro-batch of `tokens` tokens.
    pub fn resolve(&self, tokens: usize) -> Vec<usize> {
        self.shape.iter().map(|d| d.resolve(tokens)).collect()
    }

    /// Number of elements for a micro-batch of `tokens` tokens.
    pub fn numel(&self, tokens: usize) -> usize {
        self.resolve(tokens).iter().product()
    }
}

/// The operations. Token ids, targets, the predicted-position mask, position ids, cumulative
/// sequence lengths and the loss scale come from the micro-batch, not from tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpKind {
    /// `[w] → [x]`: rows of `w` for the batch's token ids.
    Embedding,
    /// `[dx, w] → [dw]`: scatter-add into a zeroed gradient shaped like `w` (read for its shape
    /// and layout only).
    EmbeddingGrad,
    /// `[x, w] → [y]`: `y = x · wᵀ` with `w` stored `[out, in]` as in HF, or `y = x · w` with
    /// `w` stored `[in, out]` (the GEMM's transpose flag absorbs the storage).
    Linear {
        /// How `w` is stored.
        w: WeightLayout,
    },
    /// `[dy, w] → [dx]`: `dx = dy · w` (`[out, in]`) or `dy · wᵀ` (`[in, out]`).
    LinearGradInput {
        /// How `w` is stored.
        w: WeightLayout,
    },
    /// `[dy, x] → [dw]`: `dw = dyᵀ · x` (`[out, in]`) or `xᵀ · dy` (`[in, out]`).
    LinearGradWeight {
        /// How `w` is stored.
        w: WeightLayout,
    },
    /// `[x, w] → [y, rstd]`.
    RmsNorm {
        /// Epsilon.
        eps: f64,
    },
    /// `[dy, x, w, rstd] → [dx, dw]`.
    RmsNormGrad,
    /// `[x] → [y]`: RoPE at the batch's position ids, `x` viewed `[T, heads, head_dim]`.
    Rope {
        /// Heads in the view.
        heads: usize,
        /// Head dimension.
        head_dim: usize,
        /// The frequencies.
        rope: kernels::Rope,
    },
    /// `[dy] → [dx]`: the transposed rotation.
    RopeGrad {
        /// Heads in the view.
        heads: usize,
        /// Head dimension.
        head_dim: usize,
        /// The frequencies.
        rope: kernels::Rope,
    },
    /// `[q, k, v] → [o, lse]`: causal GQA attention within each packed sequence.
    Attention {
        /// Head layout.
        shape: AttnShape,
        /// Score scale (`1/√head_dim`).
        scale: f32,
    },
    /// `[do, q, k, v, o, lse] → [dq, dk, dv]`.
    AttentionGrad {
        /// Head layout.
        shape: AttnShape,
        /// Score scale.
        scale: f32,
    },
    /// `[gate, up] → [h]`.
    SwiGlu,
    /// `[dh, gate, up] → [dgate, dup]`.
    SwiGluGrad,
    /// `[a, b] → [a + b]` (residuals, gradient accumulation).
    Add,
    /// `[logits] → [loss, lse]`: `loss = loss_scale · Σ_masked CE` (shape `[1]`).
    CrossEntropy,
    /// `[logits, lse] → [dlogits]`: the gradient of `loss` itself (the seed of the backward).
    CrossEntropyGrad,
    /// `[shard] → [piece]`: ZeRO-3. A parameter is stored as this rank's flat `1/dp` chunk of its
    /// TP piece; this all-gathers the chunks over DP just before the parameter is used (once for
    /// the forward, once for the backward), and the piece is freed after its last use.
    GatherParam,
    /// `[x] → [y]`: the same global tensor moved from one DState to another by `collective`
    /// along mesh axis `axis` of the TP group (inserted by the parallel lowering only).
    Comm {
        /// What runs.
        collective: Collective,
        /// The axis of the tensor's DState it runs along.
        axis: usize,
    },
}

impl OpKind {
    /// Short name for printing.
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::EmbeddingGrad => "embedding_grad",
            OpKind::Linear {
                w: WeightLayout::OutIn,
            } => "linear",
            OpKind::Linear {
                w: WeightLayout::InOut,
            } => "linear[in,out]",
            OpKind::LinearGradInput {
                w: WeightLayout::OutIn,
            } => "linear_grad_input",
            OpKind::LinearGradInput {
                w: WeightLayout::InOut,
            } => "linear_grad_input[in,out]",
            OpKind::LinearGradWeight {
                w: WeightLayout::OutIn,
            } => "linear_grad_weight",
            OpKind::LinearGradWeight {
                w: WeightLayout::InOut,
            } => "linear_grad_weight[in,out]",
            OpKind::RmsNorm { .. } => "rms_norm",
            OpKind::RmsNormGrad => "rms_norm_grad",
            OpKind::Rope { .. } => "rope",
            OpKind::RopeGrad { .. } => "rope_grad",
            OpKind::Attention { .. } => "attention",
            OpKind::AttentionGrad { .. } => "attention_grad",
            OpKind::SwiGlu => "swiglu",
            OpKind::SwiGluGrad => "swiglu_grad",
            OpKind::Add => "add",
            OpKind::CrossEntropy => "cross_entropy",
            OpKind::CrossEntropyGrad => "cross_entropy_grad",
            OpKind::Comm { collective, .. } => collective.name(),
            OpKind::GatherParam => "zero-gather@dp",
        }
    }
}

/// One operation: reads `inputs`, writes fresh `outputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// What it computes.
    pub kind: OpKind,
    /// Tensors read.
    pub inputs: Vec<TensorId>,
    /// Tensors written (each produced exactly once in the graph).
    pub outputs: Vec<TensorId>,
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightLayout {
    /// `[out, in]`, as in Hugging Face checkpoints.
    #[default]
    OutIn,
    /// `[in, out]`: row-parallel weights, so that their TP split (the input features) is dim 0.
    InOut,
}

impl WeightLayout {
    /// The dim holding the output features.
    pub fn out_dim(self) -> usize {
        match self {
            WeightLayout::OutIn => 0,
            WeightLayout::InOut => 1,
        }
    }

    /// The dim holding the input features.
    pub fn in_dim(self) -> usize {
        1 - self.out_dim()
    }
}

/// How a parameter is laid out under tensor parallelism (Megatron).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TpLayout {
    /// Every TP rank holds all of it (norm weights).
    #[default]
    Replicated,
    /// Column parallel: the output rows (dim 0) are split in groups of `unit` rows (a head).
    Column {
        /// Rows that must stay together.
        unit: usize,
    },
    /// Row parallel: the input features are split in groups of `unit`. The weight is stored
    /// transposed, `[in, out]` (the layout optimisation), so the split is on dim 0 and every
    /// piece — and every slice a switch moves — is contiguous; the linear ops use it through
    /// their GEMM's transpose flag ([`WeightLayout::InOut`]).
    Row {
        /// Input features that must stay together.
        unit: usize,
    },
    /// Vocabulary parallel: rows split by token id, uneven pieces allowed.
    Vocab,
}

/// A dataflow graph in execution order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    /// Every tensor.
    pub tensors: Vec<TensorInfo>,
    /// Every op, in an order where each input is produced before it is read.
    pub ops: Vec<Op>,
    /// The parameters, in binding order.
    pub params: Vec<TensorId>,
    /// The TP layout of every parameter, in `params` order.
    pub param_layouts: Vec<TpLayout>,
    /// The scalar loss, when the graph has one.
    pub loss: Option<TensorId>,
    /// `(param, gradient)` for every parameter, once autodiff ran.
    pub grads: Vec<(TensorId, TensorId)>,
    /// Activations bound from outside (a pipeline stage's incoming activation).
    pub inputs: Vec<TensorId>,
    /// Activations handed to the outside (a pipeline stage's outgoing activation).
    pub outputs: Vec<TensorId>,
    /// The incoming gradient of every output (bound from outside), once autodiff ran.
    pub output_grads: Vec<TensorId>,
    /// `(input, gradient)` for every input, once autodiff ran.
    pub input_grads: Vec<(TensorId, TensorId)>,
    /// How many of `ops` belong to the forward pass (all of them before autodiff runs).
    pub forward_ops: Option<usize>,
}

impl Graph {
    /// Number of forward ops (the backward ones follow).
    pub fn num_forward_ops(&self) -> usize {
        self.forward_ops.unwrap_or(self.ops.len())
    }

    /// The description of `t`.
    pub fn info(&self, t: TensorId) -> &TensorInfo {
        &self.tensors[t.0]
    }

    /// Adds a tensor.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: Vec<Dim>,
        kind: TensorKind,
    ) -> TensorId {
        self.tensors.push(TensorInfo {
            name: name.into(),
            shape,
            kind,
        });
        TensorId(self.tensors.len() - 1)
    }

    /// Checks that every tensor read is a parameter or was produced earlier, and that every
    /// non-parameter is produced exactly once.
    pub fn verify(&self) -> crate::Result<()> {
        let mut produced = vec![false; self.tensors.len()];
        for &p in self
            .params
            .iter()
            .chain(&self.inputs)
            .chain(&self.output_grads)
        {
            produced[p.0] = true;
        }
        for (i, op) in self.ops.iter().enumerate() {
            for &t in &op.inputs {
                if !produced.get(t.0).copied().unwrap_or(false) {
                    return Err(crate::GraphError::Invalid(format!(
                        "op #{i} ({}) reads {t} ({}) before it is produced",
                        op.kind.name(),
                        self.tensors.get(t.0).map_or("?", |x| x.name.as_str())
                    )));
                }
            }
            for &t in &op.outputs {
                if produced[t.0] {
                    return Err(crate::GraphError::Invalid(format!(
                        "op #{i} ({}) writes {t} ({}) which already exists",
                        op.kind.name(),
                        self.tensors[t.0].name
                    )));
                }
                produced[t.0] = true;
            }
        }
        Ok(())
    }
}
