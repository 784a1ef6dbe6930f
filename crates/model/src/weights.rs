//! Model weights in memory (fp32, HF names), random initialisation, and safetensors I/O.

use std::path::Path;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::files::{serialize, write_atomic};
use crate::params::{param_specs, ParamSpec};

/// Standard deviation of the random initialisation (HF's `initializer_range` default).
pub const INIT_STD: f64 = 0.02;

/// Every parameter of a model as fp32, in [`param_specs`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    specs: Vec<ParamSpec>,
    data: Vec<Vec<f32>>,
}

impl Weights {
    /// Weights from values in [`param_specs`] order; every length must match its shape.
    pub fn new(cfg: &LlamaConfig, data: Vec<Vec<f32>>) -> Result<Self> {
        let specs = param_specs(cfg);
        if specs.len() != data.len() {
            return Err(ModelError::Mismatch(format!(
                "{} tensors given, the config has {}",
                data.len(),
                specs.len()
            )));
        }
        for (s, d) in specs.iter().zip(&data) {
            if s.numel() != d.len() {
                return Err(ModelError::Mismatch(format!(
                    "{} has {} values, its shape {:?} needs {}",
                    s.name,
                    d.len(),
                    s.shape,
                    s.numel()
                )));
            }
        }
        Ok(Self { specs, data })
    }

    /// Random weights from `seed`: normal with std `initializer_range` (HF's default
    /// [`INIT_STD`]), norm weights 1. Aborts where
    /// the allocator does; [`Weights::try_random`] returns an error instead.
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Self {
        let specs = param_specs(cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // A validated config's initializer_range is positive and finite (INIT_STD otherwise), so
        // the distribution exists.
        let std = if cfg.initializer_range > 0.0 && cfg.initializer_range.is_finite() {
            cfg.initializer_range
        } else {
            INIT_STD
        };
        let normal = Normal::new(0.0f32, std as f32).expect("valid normal distribution");
        let data = specs
            .iter()
            .map(|s| {
                if s.shape.len() == 1 {
                    vec![1.0; s.numel()]
                } else {
                    (0..s.numel()).map(|_| normal.sample(&mut rng)).collect()
                }
            })
            .collect();
        Self { specs, data }
    }

    /// [`Weights::random`], or [`ModelError::OutOfMemory`] when the memory cannot be had.
    pub fn try_random(cfg: &LlamaConfig, seed: u64) -> Result<Self> {
        let specs = param_specs(cfg);
        let total: usize = specs.iter().map(ParamSpec::numel).sum();
        // Reserve the whole model once to learn whether it fits, then free it for the tensors.
        let mut probe: Vec<f32> = Vec::new();
        probe
            .try_reserve_exact(total)
            .map_err(|_| ModelError::OutOfMemory {
                what: format!("{total} parameters of random weights"),
                bytes: total.saturating_mul(4),
            })?;
        drop(probe);
        Ok(Self::random(cfg, seed))
    }

    /// The catalogue, in [`param_specs`] order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The values of every parameter (HF layout), in [`param_specs`] order.
    pub fn tensors(&self) -> &[Vec<f32>] {
        &self.data
    }

    /// The values in the training graph's storage layout (row-parallel weights transposed: see
    /// [`ParamSpec::storage`]), ready to bind to `build_graph(cfg).params`.
    pub fn stored(&self) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .zip(&self.data)
            .map(|(s, d)| s.to_stored(d).into_owned())
            .collect()
    }

    /// Weights from values in the training graph's storage layout (the inverse of
    /// [`Weights::stored`]).
    pub fn from_stored(cfg: &LlamaConfig, data: Vec<Vec<f32>>) -> Result<Self> {
        // A tensor of the wrong length passes through `from_stored` unchanged and `new` names it.
        let specs = param_specs(cfg);
        let data = if specs.len() == data.len() {
            specs
                .iter()
                .zip(data)
                .map(|(s, d)| s.from_stored(d))
                .collect()
        } else {
            data
        };
        Self::new(cfg, data)
    }

    /// Mutable values (HF layout), in [`param_specs`] order.
    pub fn tensors_mut(&mut self) -> &mut [Vec<f32>] {
        &mut self.data
    }

    /// The values of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .map(|i| self.data[i].as_slice())
    }

    /// The parameter whose values differ most from `other`'s (same config), and the largest
    /// absolute difference; NaN counts as infinitely different.
    pub fn worst_difference(&self, other: &Weights) -> (String, f32) {
        let mut worst = (String::new(), 0f32);
        for ((a, b), spec) in self.data.iter().zip(&other.data).zip(&self.specs) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| {
                    let d = (x - y).abs();
                    if d.is_nan() {
                        f32::INFINITY
                    } else {
                        d
                    }
                })
                .fold(0f32, f32::max);
            if d > worst.1 || worst.0.is_empty() {
                worst = (spec.name.clone(), d);
            }
        }
        worst
    }

    /// Total number of parameters.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(|s| s.numel()).sum()
    }

    /// Writes f32 safetensors with HF names (and the `format: pt` metadata HF expects),
    /// atomically: a temporary file in the same directory, fsynced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<Vec<u8>> = self
            .data
            .iter()
            .map(|d| d.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::with_capacity(self.specs.len());
        for (s, b) in self.specs.iter().zip(&bytes) {
            let view = TensorView::new(StDtype::F32, s.shape.clone(), b)
                .map_err(|e| ModelError::Mismatch(format!("{}: {e}", s.name)))?;
            views.push((s.name.clone(), view));
        }
        let out = serialize(views, path)?;
        write_atomic(path, &out)
    }
}
