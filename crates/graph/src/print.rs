//! A readable listing of a graph, one op per line.

use std::fmt;

use crate::ir::{Graph, TensorId};

impl Graph {
    fn tensor_label(&self, t: TensorId) -> String {
        let info = self.info(t);
        let dims: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
        format!("{t} {}[{}]", info.name, dims.join(", "))
    }
}

impl fmt::Display for Graph {
    /// `%12 model.layers.0.self_attn.q[T, 64] = linear(%10 …, %3 …)`, parameters first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &p in &self.params {
            writeln!(f, "param {}", self.tensor_label(p))?;
        }
        for op in &self.ops {
            let outs: Vec<String> = op.outputs.iter().map(|&t| self.tensor_label(t)).collect();
            let ins: Vec<String> = op.inputs.iter().map(|t| t.to_string()).collect();
            writeln!(
                f,
                "{} = {}({})",
                outs.join(", "),
                op.kind.name(),
                ins.join(", ")
            )?;
        }
        if let Some(l) = self.loss {
            writeln!(f, "loss {l}")?;
        }
        Ok(())
    }
}
