//! GEMMs through cuBLAS: row-major `C = op(A)·op(B)` as column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, with
//! bf16 operands cast from the f32 buffers (f32 output and accumulation) or plain f32.

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{blas, dev, grid_for, CudaBackend, CudaBuffer, GemmPrecision};
use crate::backend::Backend;
use crate::error::{check_len, Result};
use crate::matmul::GemmSpec;

impl CudaBackend {
    pub(super) fn cublas_gemm(
        &self,
        spec: &GemmSpec,
        a: &CudaBuffer,
        b: &CudaBuffer,
        c: &mut CudaBuffer,
    ) -> Result<()> {
        let GemmSpec { m, n, k, batch, .. } = *spec;
        check_len("gemm", "A", batch * m * k, a.len)?;
        check_len("gemm", "B", batch * k * n, b.len)?;
        check_len("gemm", "C", batch * m * n, c.len)?;
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        self.bind()?;
        if k == 0 {
            // C = beta·C, and beta = 0 overwrites without reading C (as the CPU path).
            if spec.beta == 0.0 {
                let s = &self.inner.stream;
                return s.memset_zeros(&mut c.slice).map_err(dev("gemm"));
            }
            return self.scale(spec.beta, c);
        }
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS sees B first.
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ldb = if spec.trans_b { k } else { n };
        let lda = if spec.trans_a { m } else { k };
        let (alpha, beta) = (spec.alpha, spec.beta);
        let s = &self.inner.stream;
        let h = *self.inner.blas.handle();
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let f32t = blas_sys::cudaDataType::CUDA_R_32F;
        let (c_ptr, _c_sync) = c.slice.device_ptr_mut(s);
        let run = |a_ptr: u64, b_ptr: u64, ty| {
            // SAFETY: pointers are device buffers of the checked lengths on this stream; alpha
            // and beta live on the host for the call (host pointer mode).
            unsafe {
                blas_result::gemm_strided_batched_ex(
                    h,
                    op(spec.trans_b),
                    op(spec.trans_a),
                    n as i32,
                    m as i32,
                    k as i32,
                    (&alpha) as *const f32 as *const _,
                    b_ptr as *const _,
                    ty,
                    ldb as i32,
                    (k * n) as i64,
                    a_ptr as *const _,
                    ty,
                    lda as i32,
                    (m * k) as i64,
                    (&beta) as *const f32 as *const _,
                    c_ptr as *mut _,
                    f32t,
                    n as i32,
                    (m * n) as i64,
                    batch as i32,
                    compute,
                    algo,
                )
            }
            .map_err(blas("gemm"))
        };
        match self.inner.precision {
            GemmPrecision::F32 => {
                let (a_ptr, _a) = a.slice.device_ptr(s);
                let (b_ptr, _b) = b.slice.device_ptr(s);
                run(a_ptr, b_ptr, f32t)
            }
            GemmPrecision::Bf16 => {
                let a16 = self.cast_bf16(a)?;
                let b16 = self.cast_bf16(b)?;
                let (a_ptr, _a) = a16.device_ptr(s);
                let (b_ptr, _b) = b16.device_ptr(s);
                run(a_ptr, b_ptr, blas_sys::cudaDataType::CUDA_R_16BF)
            }
        }
    }

    fn cast_bf16(&self, x: &CudaBuffer) -> Result<CudaSlice<u16>> {
        let s = &self.inner.stream;
        // SAFETY: every element is written by the cast kernel before any read.
        let mut out = unsafe { s.alloc::<u16>(x.len.max(1)) }.map_err(dev("gemm"))?;
        let n = x.len as i64;
        let mut b = s.launch_builder(self.f("cast_f32_bf16"));
        b.arg(&x.slice).arg(&mut out).arg(&n);
        // SAFETY: arguments match the kernel's signature; both buffers start at an allocation.
        unsafe { b.launch(grid_for(x.len.div_ceil(4))) }.map_err(dev("gemm"))?;
        Ok(out)
    }
}
