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

/// The [`Backend`] methods of a backend that cannot exist: each `fn NAME(ARG TYPES) -> R;`
/// becomes a method taking `&self` and those arguments whose body is unreachable.
macro_rules! unreachable_methods {
    ($(fn $name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $name(&self, $(_: $arg),*) -> $ret {
                match *self.0 {}
            }
        )*
    };
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    #[rustfmt::skip]
    unreachable_methods! {
        fn name() -> String;
        fn zeros(usize) -> Result<CudaBuffer>;
        fn upload(&[f32]) -> Result<CudaBuffer>;
        fn download(&CudaBuffer) -> Result<Vec<f32>>;
        fn len(&CudaBuffer) -> usize;
        fn gemm(&GemmSpec, &CudaBuffer, &CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn embedding_forward(&CudaBuffer, usize, usize, &[u32], &mut CudaBuffer) -> Result<()>;
        fn embedding_backward(&CudaBuffer, usize, usize, &[u32], &mut CudaBuffer) -> Result<()>;
        fn rms_norm_forward(&CudaBuffer, &CudaBuffer, f64, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn rms_norm_backward(&CudaBuffer, &CudaBuffer, &CudaBuffer, &CudaBuffer, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn rope(&mut CudaBuffer, &crate::Rotation<'_>) -> Result<()>;
        fn attention_forward(&CudaBuffer, &CudaBuffer, &CudaBuffer, &[usize], AttnShape, f32, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn attention_backward(&CudaBuffer, &CudaBuffer, &CudaBuffer, &CudaBuffer, &CudaBuffer, &CudaBuffer, &[usize], AttnShape, f32, &mut CudaBuffer, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn swiglu_forward(&CudaBuffer, &CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn swiglu_backward(&CudaBuffer, &CudaBuffer, &CudaBuffer, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn cross_entropy_forward(&CudaBuffer, usize, &[u32], &[bool], &mut CudaBuffer) -> Result<f32>;
        fn cross_entropy_backward(&CudaBuffer, usize, &[u32], &[bool], &CudaBuffer, f32, &mut CudaBuffer) -> Result<()>;
        fn add(&CudaBuffer, &CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn axpy(f32, &CudaBuffer, &mut CudaBuffer) -> Result<()>;
        fn scale(f32, &mut CudaBuffer) -> Result<()>;
        fn sum_squares(&CudaBuffer) -> Result<f64>;
        fn round_bf16(&mut CudaBuffer) -> Result<()>;
        fn adamw(&AdamW, u64, &mut CudaBuffer, &CudaBuffer, &mut CudaBuffer, &mut CudaBuffer) -> Result<()>;
    }
}
