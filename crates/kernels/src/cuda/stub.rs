//! The CUDA backend's types in a build without the `cuda` feature: opening one is an error.

use crate::backend::Backend;
use crate::error::{KernelError, Result};
use crate::matmul::GemmSpec;
use crate::ops::adamw::AdamW;
use crate::ops::attention::AttnShape;

use super::GemmPrecision;

fn unavailable() -> KernelError {
    KernelError::Unavailable(
        "this hotspa was built without the `cuda` feature (rebuild with --features cuda)".into(),
    )
}

/// Always an error in this build.
pub fn device_count() -> Result<usize> {
    Err(unavailable())
}

enum Never {}

/// A GPU buffer; none can exist in this build.
pub struct CudaBuffer(Never);

/// The CUDA backend; [`CudaBackend::new`] fails in this build.
#[derive(Clone)]
pub struct CudaBackend(std::sync::Arc<Never>);

impl CudaBackend {
    /// Always [`KernelError::Unavailable`] in this build.
    pub fn new(_ordinal: usize, _precision: GemmPrecision) -> Result<Self> {
        Err(unavailable())
    }
    /// Unreachable in this build.
    pub fn synchronize(&self) -> Result<()> {
        match *self.0 {}
    }
    /// Unreachable in this build.
    pub fn precision(&self) -> GemmPrecision {
        match *self.0 {}
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    fn name(&self) -> String {
        match *self.0 {}
    }
    fn zeros(&self, _: usize) -> Result<CudaBuffer> {
        match *self.0 {}
    }
    fn upload(&self, _: &[f32]) -> Result<CudaBuffer> {
        match *self.0 {}
    }
    fn download(&self, _: &CudaBuffer) -> Result<Vec<f32>> {
        match *self.0 {}
    }
    fn len(&self, _: &CudaBuffer) -> usize {
        match *self.0 {}
    }
    fn gemm(&self, _: &GemmSpec, _: &CudaBuffer, _: &CudaBuffer, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn embedding_forward(
        &self,
        _: &CudaBuffer,
        _: usize,
        _: usize,
        _: &[u32],
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn embedding_backward(
        &self,
        _: &CudaBuffer,
        _: usize,
        _: usize,
        _: &[u32],
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn rms_norm_forward(
        &self,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: f64,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn rms_norm_backward(
        &self,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn rope(
        &self,
        _: &mut CudaBuffer,
        _: &[u32],
        _: usize,
        _: usize,
        _: &crate::Rope,
        _: bool,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn attention_forward(
        &self,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &[usize],
        _: AttnShape,
        _: f32,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn attention_backward(
        &self,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &[usize],
        _: AttnShape,
        _: f32,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn swiglu_forward(&self, _: &CudaBuffer, _: &CudaBuffer, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn swiglu_backward(
        &self,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &CudaBuffer,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn cross_entropy_forward(
        &self,
        _: &CudaBuffer,
        _: usize,
        _: &[u32],
        _: &[bool],
        _: &mut CudaBuffer,
    ) -> Result<f32> {
        match *self.0 {}
    }
    fn cross_entropy_backward(
        &self,
        _: &CudaBuffer,
        _: usize,
        _: &[u32],
        _: &[bool],
        _: &CudaBuffer,
        _: f32,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
    fn add(&self, _: &CudaBuffer, _: &CudaBuffer, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn axpy(&self, _: f32, _: &CudaBuffer, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn scale(&self, _: f32, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn sum_squares(&self, _: &CudaBuffer) -> Result<f64> {
        match *self.0 {}
    }
    fn round_bf16(&self, _: &mut CudaBuffer) -> Result<()> {
        match *self.0 {}
    }
    fn adamw(
        &self,
        _: &AdamW,
        _: u64,
        _: &mut CudaBuffer,
        _: &CudaBuffer,
        _: &mut CudaBuffer,
        _: &mut CudaBuffer,
    ) -> Result<()> {
        match *self.0 {}
    }
}
