//! The CUDA backend proper (feature `cuda`): cudarc with dynamic loading, cuBLAS GEMMs, the
//! kernels of `ops.cu` and `attention.cu` compiled by NVRTC at first use and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::{GemmPrecision, ATTENTION_SRC, OPS_SRC};
use crate::backend::Backend;
use crate::error::{check_len, invalid, KernelError, Result};
use crate::matmul::GemmSpec;
use crate::ops::adamw::AdamW;
use crate::ops::attention::AttnShape;

const NT: u32 = 256;
/// Forward / dq query tile, dk/dv key tile, key tile (must match attention.cu).
const BQ: usize = 64;
const BKV: usize = 32;
const BK: usize = 32;
const MAX_HEAD_DIM: usize = 256;
/// cuBLAS workspace per backend.
const WORKSPACE_BYTES: usize = 32 << 20;

fn dev(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Device {
        op,
        message: e.to_string(),
    }
}

fn blas(op: &'static str) -> impl Fn(blas_result::CublasError) -> KernelError {
    move |e| KernelError::Device {
        op,
        message: format!("{e:?}"),
    }
}

/// A buffer of `f32` in GPU memory.
pub struct CudaBuffer {
    slice: CudaSlice<f32>,
    len: usize,
}

/// Checks that the driver, cuBLAS and NVRTC libraries can be loaded and a device exists; returns
/// the number of devices.
pub fn device_count() -> Result<usize> {
    let missing = |lib: &str| {
        KernelError::Unavailable(format!(
            "the CUDA backend could not load {lib} (CUDA 13 names, e.g. lib{lib}.so.13; put its \
             folder on LD_LIBRARY_PATH)"
        ))
    };
    // SAFETY: only probes dlopen on the candidate names.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(KernelError::Unavailable(
                "no NVIDIA driver: libcuda.so could not be loaded".into(),
            ));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(missing("cublas"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(missing("nvrtc"));
        }
    }
    let n = CudaContext::device_count().map_err(dev("cuda init"))?;
    if n <= 0 {
        return Err(KernelError::Unavailable(
            "the NVIDIA driver reports no CUDA device".into(),
        ));
    }
    Ok(n as usize)
}

/// PTX cache for the whole process: (source name, defines, arch) → PTX text.
fn ptx_cache() -> &'static Mutex<HashMap<String, String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles `src` with NVRTC for `arch` (`compute_90`), once per process and key.
pub fn compile(name: &str, src: &str, defines: &[String], arch: &str, fmad: bool) -> Result<Ptx> {
    let key = format!("{name}|{}|{arch}|{fmad}", defines.join(","));
    if let Some(ptx) = ptx_cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(Ptx::from_src(ptx));
    }
    let mut options = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let opts = CompileOptions {
        fmad: Some(fmad),
        options,
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| KernelError::Device {
        op: "nvrtc",
        message: format!("{name}.cu did not compile: {e:?}"),
    })?;
    if let Ok(mut c) = ptx_cache().lock() {
        c.insert(key, ptx.to_src());
    }
    Ok(ptx)
}

struct AttnKernels {
    fwd: CudaFunction,
    delta: CudaFunction,
    dq: CudaFunction,
    dkv: CudaFunction,
    /// The register-tiled forward, dq, dk/dv (per query head) kernels and the dk/dv reduction
    /// over a kv group (head dims multiple of 16, ≤ 128).
    fast: Option<[CudaFunction; 4]>,
    _module: Arc<CudaModule>,
}

/// Rows/keys per tile of the register-tiled kernels.
const TB: usize = 64;

/// Whether the register-tiled kernels exist for a head dim (see attention.cu).
fn fast_attention(d: usize) -> bool {
    d.is_multiple_of(16) && d <= 128
}

/// Shared memory of the register-tiled (forward, dq, dk/dv) blocks.
fn attn_smem_fast(d: usize) -> (usize, usize, usize) {
    let ds = d + 4;
    let pt = TB + 4;
    (
        (3 * TB * ds + TB * pt) * 4,
        (4 * TB * ds + TB * pt) * 4,
        (4 * TB * ds + 2 * TB * pt + 2 * TB) * 4,
    )
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    ops: HashMap<&'static str, CudaFunction>,
    _ops_module: Arc<CudaModule>,
    attn: Mutex<HashMap<usize, Arc<AttnKernels>>>,
    arch: String,
    max_smem: usize,
    precision: GemmPrecision,
    name: String,
}

/// The CUDA backend: one device, one stream; `f32` buffers (master weights, activations,
/// gradients), GEMMs through cuBLAS in bf16 (f32 accumulation) or f32.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

const OPS_KERNELS: &[&str] = &[
    "cast_f32_bf16",
    "cast_bf16_f32",
    "round_bf16",
    "add",
    "axpy",
    "scale",
    "sum_squares",
    "embedding_forward",
    "embedding_backward",
    "rms_norm_forward",
    "rms_norm_backward_dx",
    "rms_norm_backward_dw_partial",
    "rms_norm_backward_dw_reduce",
    "rope",
    "swiglu_forward",
    "swiglu_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "adamw",
];

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(NT as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (NT, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (NT, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens device `ordinal` with the given GEMM precision. Fails with
    /// [`KernelError::Unavailable`] when the driver or a library is missing.
    pub fn new(ordinal: usize, precision: GemmPrecision) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::Unavailable(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev("cuda context"))?;
        // Buffers never cross streams (ranks exchange through their communicator), so the
        // per-buffer event tracking of cudarc is not needed.
        // SAFETY: no buffer of this context is used on two streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev("cuda stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(blas("cublas"))?;
        // cuBLAS picks faster Hopper kernels when it has a workspace (NVIDIA suggests 32 MiB).
        let mut workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(dev("cublas workspace"))?;
        {
            let (ptr, _sync) = workspace.device_ptr_mut(&stream);
            // SAFETY: the workspace lives as long as the handle (both in `Inner`).
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, WORKSPACE_BYTES)
            };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(KernelError::Device {
                    op: "cublas",
                    message: format!("cublasSetWorkspace: {status:?}"),
                });
            }
        }
        let (major, minor) = ctx.compute_capability().map_err(dev("cuda"))?;
        let arch = format!("compute_{major}{minor}");
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(dev("cuda"))? as usize;
        let ptx = compile("ops", OPS_SRC, &[], &arch, false)?;
        let module = ctx.load_module(ptx).map_err(dev("cuda module"))?;
        let mut ops = HashMap::new();
        for &name in OPS_KERNELS {
            ops.insert(
                name,
                module.load_function(name).map_err(dev("cuda module"))?,
            );
        }
        let name = format!(
            "cuda:{ordinal} ({}, sm_{major}{minor}, gemm {})",
            ctx.name().unwrap_or_else(|_| "unknown".into()),
            precision
        );
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                _workspace: workspace,
                ops,
                _ops_module: module,
                attn: Mutex::new(HashMap::new()),
                arch,
                max_smem,
                precision,
                name,
            }),
        })
    }

    /// Waits for every queued kernel of this backend.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(dev("synchronize"))
    }

    /// The stream this backend queues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// GEMM precision of this backend.
    pub fn precision(&self) -> GemmPrecision {
        self.inner.precision
    }

    fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(dev("cuda"))
    }

    fn f(&self, name: &'static str) -> &CudaFunction {
        // Invariant: every name used below is in OPS_KERNELS, loaded in `new`.
        &self.inner.ops[name]
    }

    fn htod<T: cudarc::driver::DeviceRepr>(
        &self,
        op: &'static str,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // SAFETY: a one-element allocation that no kernel reads (lengths are 0).
            return unsafe { self.inner.stream.alloc::<T>(1) }.map_err(dev(op));
        }
        self.inner.stream.clone_htod(data).map_err(dev(op))
    }

    fn alloc_f32(&self, op: &'static str, len: usize) -> Result<CudaSlice<f32>> {
        self.inner
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(dev(op))
    }

    fn attn_kernels(&self, head_dim: usize) -> Result<Arc<AttnKernels>> {
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(invalid(
                "attention",
                format!("the CUDA kernel takes head dims 1..={MAX_HEAD_DIM}, got {head_dim}"),
            ));
        }
        let mut cache = self
            .inner
            .attn
            .lock()
            .map_err(|_| invalid("attention", "kernel cache poisoned by a panic"))?;
        if let Some(k) = cache.get(&head_dim) {
            return Ok(k.clone());
        }
        let ptx = compile(
            "attention",
            ATTENTION_SRC,
            &[format!("HEAD_DIM={head_dim}")],
            &self.inner.arch,
            true,
        )?;
        let module = self
            .inner
            .ctx
            .load_module(ptx)
            .map_err(dev("cuda module"))?;
        let load = |n: &str| module.load_function(n).map_err(dev("cuda module"));
        let fast = if fast_attention(head_dim) {
            Some([
                load("attn_fwd_rt")?,
                load("attn_bwd_dq_rt")?,
                load("attn_bwd_dkv_rt")?,
                load("attn_bwd_dkv_reduce")?,
            ])
        } else {
            None
        };
        let k = Arc::new(AttnKernels {
            fwd: load("attn_fwd")?,
            delta: load("attn_bwd_delta")?,
            dq: load("attn_bwd_dq")?,
            dkv: load("attn_bwd_dkv")?,
            fast,
            _module: module.clone(),
        });
        let (fwd, dq, dkv) = attn_smem(head_dim);
        let mut sized = vec![(&k.fwd, fwd), (&k.dq, dq), (&k.dkv, dkv)];
        if let Some(f) = &k.fast {
            let (a, b, c) = attn_smem_fast(head_dim);
            sized.extend([(&f[0], a), (&f[1], b), (&f[2], c)]);
        }
        for (f, bytes) in sized {
            if bytes > self.inner.max_smem {
                return Err(invalid(
                    "attention",
                    format!(
                        "head dim {head_dim} needs {bytes} B of shared memory per block, the \
                         device allows {}",
                        self.inner.max_smem
                    ),
                ));
            }
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(dev("attention"))?;
        }
        cache.insert(head_dim, k.clone());
        Ok(k)
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

/// Shared memory of (forward, dq, dk/dv) blocks for a head dimension, as attention.cu lays out.
fn attn_smem(d: usize) -> (usize, usize, usize) {
    let dp = d + 1;
    let ps = BK + 1;
    let fwd = ((BQ + 2 * BK) * dp + BQ * ps) * 4;
    let dq = ((2 * BQ + 2 * BK) * dp + BQ * ps) * 4;
    let dkv = ((2 * BKV + 2 * 32) * dp + 2 * 32 * ps + 2 * 32) * 4;
    (fwd, dq, dkv)
}

/// (sequence start, sequence length, first row) of every `tile`-row tile of every sequence.
fn tiles(cu_seqlens: &[usize], tile: usize) -> Vec<i32> {
    let mut out = Vec::new();
    for w in cu_seqlens.windows(2) {
        let len = w[1] - w[0];
        let mut r = 0;
        while r < len {
            out.extend([w[0] as i32, len as i32, r as i32]);
            r += tile;
        }
    }
    out
}

macro_rules! launch {
    ($self:expr, $op:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut b = $self.inner.stream.launch_builder($func);
        $( b.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in the .cu source.
        unsafe { b.launch($cfg) }.map_err(dev($op))?;
    }};
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> String {
        self.inner.name.clone()
    }
    fn zeros(&self, len: usize) -> Result<CudaBuffer> {
        self.bind()?;
        Ok(CudaBuffer {
            slice: self.alloc_f32("zeros", len)?,
            len,
        })
    }
    fn upload(&self, data: &[f32]) -> Result<CudaBuffer> {
        self.bind()?;
        Ok(CudaBuffer {
            slice: self.htod("upload", data)?,
            len: data.len(),
        })
    }
    fn download(&self, buf: &CudaBuffer) -> Result<Vec<f32>> {
        self.bind()?;
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        let s = &self.inner.stream;
        let mut v = s.clone_dtoh(&buf.slice).map_err(dev("download"))?;
        s.synchronize().map_err(dev("download"))?;
        v.truncate(buf.len);
        Ok(v)
    }
    fn len(&self, buf: &CudaBuffer) -> usize {
        buf.len
    }
    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn gemm(
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

    fn embedding_forward(
        &self,
        weight: &CudaBuffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        out: &mut CudaBuffer,
    ) -> Result<()> {
        check_len("embedding", "out", ids.len() * dim, out.len)?;
        let rows = weight.len.checked_div(dim).unwrap_or(0);
        check_len("embedding", "weight", rows * dim, weight.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let d_ids = self.htod("embedding", ids)?;
        let (rows, dim_i, vs, n) = (
            rows as i64,
            dim as i64,
            vocab_start as i64,
            ids.len() as i64,
        );
        launch!(
            self,
            "embedding",
            self.f("embedding_forward"),
            grid_for(out.len),
            &weight.slice,
            &rows,
            &dim_i,
            &vs,
            &d_ids,
            &n,
            &mut out.slice
        );
        Ok(())
    }

    fn embedding_backward(
        &self,
        grad_out: &CudaBuffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        grad_weight: &mut CudaBuffer,
    ) -> Result<()> {
        check_len(
            "embedding_backward",
            "grad_out",
            ids.len() * dim,
            grad_out.len,
        )?;
        let rows = grad_weight.len.checked_div(dim).unwrap_or(0);
        check_len(
            "embedding_backward",
            "grad_weight",
            rows * dim,
            grad_weight.len,
        )?;
        // Tokens grouped by row, in token order within a row: the CPU's summation order.
        let mut order: Vec<(usize, usize)> = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| (id as usize) >= vocab_start && (id as usize) < vocab_start + rows)
            .map(|(t, &id)| (id as usize - vocab_start, t))
            .collect();
        if order.is_empty() || dim == 0 {
            return Ok(());
        }
        order.sort_unstable();
        let mut rows_of = Vec::new();
        let mut starts = Vec::new();
        for (p, &(r, _)) in order.iter().enumerate() {
            if rows_of.last() != Some(&(r as i32)) {
                rows_of.push(r as i32);
                starts.push(p as i32);
            }
        }
        starts.push(order.len() as i32);
        let tokens: Vec<i32> = order.iter().map(|&(_, t)| t as i32).collect();
        self.bind()?;
        let (d_rows, d_starts, d_tok) = (
            self.htod("embedding_backward", &rows_of)?,
            self.htod("embedding_backward", &starts)?,
            self.htod("embedding_backward", &tokens)?,
        );
        let dim_i = dim as i64;
        launch!(
            self,
            "embedding_backward",
            self.f("embedding_backward"),
            rows_cfg(rows_of.len()),
            &grad_out.slice,
            &dim_i,
            &d_rows,
            &d_starts,
            &d_tok,
            &mut grad_weight.slice
        );
        Ok(())
    }

    fn rms_norm_forward(
        &self,
        x: &CudaBuffer,
        weight: &CudaBuffer,
        eps: f64,
        y: &mut CudaBuffer,
        rstd: &mut CudaBuffer,
    ) -> Result<()> {
        let (dim, rows) = (weight.len, rstd.len);
        check_len("rms_norm", "x", rows * dim, x.len)?;
        check_len("rms_norm", "y", rows * dim, y.len)?;
        if rows == 0 {
            return Ok(());
        }
        self.bind()?;
        let (dim_i, eps) = (dim as i64, eps as f32);
        launch!(
            self,
            "rms_norm",
            self.f("rms_norm_forward"),
            rows_cfg(rows),
            &x.slice,
            &weight.slice,
            &dim_i,
            &eps,
            &mut y.slice,
            &mut rstd.slice
        );
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dy: &CudaBuffer,
        x: &CudaBuffer,
        weight: &CudaBuffer,
        rstd: &CudaBuffer,
        dx: &mut CudaBuffer,
        dweight: &mut CudaBuffer,
    ) -> Result<()> {
        let (dim, rows) = (weight.len, rstd.len);
        check_len("rms_norm_backward", "dy", rows * dim, dy.len)?;
        check_len("rms_norm_backward", "x", rows * dim, x.len)?;
        check_len("rms_norm_backward", "dx", rows * dim, dx.len)?;
        check_len("rms_norm_backward", "dweight", dim, dweight.len)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        self.bind()?;
        let dim_i = dim as i64;
        launch!(
            self,
            "rms_norm_backward",
            self.f("rms_norm_backward_dx"),
            rows_cfg(rows),
            &dy.slice,
            &x.slice,
            &weight.slice,
            &rstd.slice,
            &dim_i,
            &mut dx.slice
        );
        let chunk = 64usize;
        let chunks = rows.div_ceil(chunk);
        let mut partial = self.alloc_f32("rms_norm_backward", chunks * dim)?;
        let (rows_i, chunk_i, chunks_i) = (rows as i64, chunk as i64, chunks as i64);
        let cfg = LaunchConfig {
            grid_dim: (dim.div_ceil(NT as usize) as u32, chunks as u32, 1),
            block_dim: (NT, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "rms_norm_backward",
            self.f("rms_norm_backward_dw_partial"),
            cfg,
            &dy.slice,
            &x.slice,
            &rstd.slice,
            &rows_i,
            &dim_i,
            &chunk_i,
            &mut partial
        );
        launch!(
            self,
            "rms_norm_backward",
            self.f("rms_norm_backward_dw_reduce"),
            grid_for(dim),
            &partial,
            &chunks_i,
            &dim_i,
            &mut dweight.slice
        );
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaBuffer,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> Result<()> {
        if !head_dim.is_multiple_of(2) {
            return Err(invalid("rope", format!("head_dim {head_dim} must be even")));
        }
        check_len("rope", "x", positions.len() * heads * head_dim, x.len)?;
        if x.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let freqs = crate::ops::rope::inv_freq::<f32>(head_dim, theta);
        let d_pos = self.htod("rope", positions)?;
        let d_freq = self.htod("rope", &freqs)?;
        let (t, h, hd) = (positions.len() as i64, heads as i64, head_dim as i64);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch!(
            self,
            "rope",
            self.f("rope"),
            grid_for(x.len / 2),
            &mut x.slice,
            &d_pos,
            &d_freq,
            &t,
            &h,
            &hd,
            &sign
        );
        Ok(())
    }

    fn attention_forward(
        &self,
        q: &CudaBuffer,
        k: &CudaBuffer,
        v: &CudaBuffer,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        out: &mut CudaBuffer,
        lse: &mut CudaBuffer,
    ) -> Result<()> {
        let tokens = shape.check("attention", cu_seqlens, q.len, k.len, v.len)?;
        check_len("attention", "out", q.len, out.len)?;
        check_len("attention", "lse", shape.heads * tokens, lse.len)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        self.bind()?;
        let kern = self.attn_kernels(shape.head_dim)?;
        let (func, rows, smem) = match &kern.fast {
            Some(f) => (&f[0], TB, attn_smem_fast(shape.head_dim).0),
            None => (&kern.fwd, BQ, attn_smem(shape.head_dim).0),
        };
        let t = tiles(cu_seqlens, rows);
        let d_tiles = self.htod("attention", &t)?;
        let cfg = LaunchConfig {
            grid_dim: ((t.len() / 3) as u32, shape.heads as u32, 1),
            block_dim: (NT, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (ti, hi, kvi) = (tokens as i32, shape.heads as i32, shape.kv_heads as i32);
        launch!(
            self,
            "attention",
            func,
            cfg,
            &q.slice,
            &k.slice,
            &v.slice,
            &mut out.slice,
            &mut lse.slice,
            &d_tiles,
            &ti,
            &hi,
            &kvi,
            &scale
        );
        Ok(())
    }

    fn attention_backward(
        &self,
        dout: &CudaBuffer,
        q: &CudaBuffer,
        k: &CudaBuffer,
        v: &CudaBuffer,
        out: &CudaBuffer,
        lse: &CudaBuffer,
        cu_seqlens: &[usize],
        shape: AttnShape,
        scale: f32,
        dq: &mut CudaBuffer,
        dk: &mut CudaBuffer,
        dv: &mut CudaBuffer,
    ) -> Result<()> {
        let op = "attention_backward";
        let tokens = shape.check(op, cu_seqlens, q.len, k.len, v.len)?;
        check_len(op, "dout", q.len, dout.len)?;
        check_len(op, "out", q.len, out.len)?;
        check_len(op, "lse", shape.heads * tokens, lse.len)?;
        check_len(op, "dq", q.len, dq.len)?;
        check_len(op, "dk", k.len, dk.len)?;
        check_len(op, "dv", v.len, dv.len)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        self.bind()?;
        let kern = self.attn_kernels(shape.head_dim)?;
        let (ti, hi, kvi) = (tokens as i32, shape.heads as i32, shape.kv_heads as i32);
        let mut delta = self.alloc_f32(op, shape.heads * tokens)?;
        launch!(
            self,
            op,
            &kern.delta,
            grid_for(shape.heads * tokens),
            &dout.slice,
            &out.slice,
            &mut delta,
            &ti,
            &hi
        );
        let (dq_fn, dkv_fn, q_rows, k_rows, dq_smem, dkv_smem) = match &kern.fast {
            Some(f) => {
                let (_, a, b) = attn_smem_fast(shape.head_dim);
                (&f[1], &kern.dkv, TB, TB, a, b)
            }
            None => {
                let (_, a, b) = attn_smem(shape.head_dim);
                (&kern.dq, &kern.dkv, BQ, BKV, a, b)
            }
        };
        let tq = tiles(cu_seqlens, q_rows);
        let d_tq = self.htod(op, &tq)?;
        let cfg = LaunchConfig {
            grid_dim: ((tq.len() / 3) as u32, shape.heads as u32, 1),
            block_dim: (NT, 1, 1),
            shared_mem_bytes: dq_smem as u32,
        };
        launch!(
            self,
            op,
            dq_fn,
            cfg,
            &dout.slice,
            &q.slice,
            &k.slice,
            &v.slice,
            &lse.slice,
            &delta,
            &mut dq.slice,
            &d_tq,
            &ti,
            &hi,
            &kvi,
            &scale
        );
        let tk = tiles(cu_seqlens, k_rows);
        let d_tk = self.htod(op, &tk)?;
        if let Some(f) = &kern.fast {
            // One block per (key tile, query head), then the kv group's heads summed in order.
            let part = shape.heads * tokens * shape.head_dim;
            // SAFETY: every element of the parts a reduction reads is written by the blocks
            // (each (head, token) row of a valid key belongs to exactly one tile).
            let mut dk_part = unsafe { self.inner.stream.alloc::<f32>(part) }.map_err(dev(op))?;
            let mut dv_part = unsafe { self.inner.stream.alloc::<f32>(part) }.map_err(dev(op))?;
            let cfg = LaunchConfig {
                grid_dim: ((tk.len() / 3) as u32, shape.heads as u32, 1),
                block_dim: (NT, 1, 1),
                shared_mem_bytes: dkv_smem as u32,
            };
            launch!(
                self,
                op,
                &f[2],
                cfg,
                &dout.slice,
                &q.slice,
                &k.slice,
                &v.slice,
                &lse.slice,
                &delta,
                &mut dk_part,
                &mut dv_part,
                &d_tk,
                &ti,
                &hi,
                &kvi,
                &scale
            );
            launch!(
                self,
                op,
                &f[3],
                grid_for(k.len),
                &dk_part,
                &dv_part,
                &mut dk.slice,
                &mut dv.slice,
                &ti,
                &hi,
                &kvi,
                &scale
            );
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((tk.len() / 3) as u32, shape.kv_heads as u32, 1),
            block_dim: (NT, 1, 1),
            shared_mem_bytes: dkv_smem as u32,
        };
        launch!(
            self,
            op,
            dkv_fn,
            cfg,
            &dout.slice,
            &q.slice,
            &k.slice,
            &v.slice,
            &lse.slice,
            &delta,
            &mut dk.slice,
            &mut dv.slice,
            &d_tk,
            &ti,
            &hi,
            &kvi,
            &scale
        );
        Ok(())
    }

    fn swiglu_forward(
        &self,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        check_len("swiglu", "up", gate.len, up.len)?;
        check_len("swiglu", "out", gate.len, out.len)?;
        if gate.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = gate.len as i64;
        launch!(
            self,
            "swiglu",
            self.f("swiglu_forward"),
            grid_for(gate.len),
            &gate.slice,
            &up.slice,
            &mut out.slice,
            &n
        );
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dout: &CudaBuffer,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        dgate: &mut CudaBuffer,
        dup: &mut CudaBuffer,
    ) -> Result<()> {
        let n = gate.len;
        check_len("swiglu_backward", "dout", n, dout.len)?;
        check_len("swiglu_backward", "up", n, up.len)?;
        check_len("swiglu_backward", "dgate", n, dgate.len)?;
        check_len("swiglu_backward", "dup", n, dup.len)?;
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let ni = n as i64;
        launch!(
            self,
            "swiglu_backward",
            self.f("swiglu_backward"),
            grid_for(n),
            &dout.slice,
            &gate.slice,
            &up.slice,
            &mut dgate.slice,
            &mut dup.slice,
            &ni
        );
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        logits: &CudaBuffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &mut CudaBuffer,
    ) -> Result<f32> {
        let rows = targets.len();
        check_len("cross_entropy", "logits", rows * vocab, logits.len)?;
        check_len("cross_entropy", "mask", rows, mask.len())?;
        check_len("cross_entropy", "lse", rows, lse.len)?;
        check_targets("cross_entropy", vocab, targets, mask)?;
        if rows == 0 {
            return Ok(0.0);
        }
        self.bind()?;
        let d_t = self.htod("cross_entropy", targets)?;
        let m8: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        let d_m = self.htod("cross_entropy", &m8)?;
        let mut loss = self.alloc_f32("cross_entropy", rows)?;
        let v = vocab as i64;
        launch!(
            self,
            "cross_entropy",
            self.f("cross_entropy_forward"),
            rows_cfg(rows),
            &logits.slice,
            &v,
            &d_t,
            &d_m,
            &mut lse.slice,
            &mut loss
        );
        let per_row = self.download(&CudaBuffer {
            slice: loss,
            len: rows,
        })?;
        // Summed on the host in row order, as the CPU kernel does.
        let mut total = 0.0f32;
        for (r, l) in per_row.iter().enumerate() {
            if mask[r] {
                total += l;
            }
        }
        Ok(total)
    }

    fn cross_entropy_backward(
        &self,
        logits: &CudaBuffer,
        vocab: usize,
        targets: &[u32],
        mask: &[bool],
        lse: &CudaBuffer,
        scale: f32,
        dlogits: &mut CudaBuffer,
    ) -> Result<()> {
        let op = "cross_entropy_backward";
        let rows = targets.len();
        check_len(op, "logits", rows * vocab, logits.len)?;
        check_len(op, "dlogits", rows * vocab, dlogits.len)?;
        check_len(op, "mask", rows, mask.len())?;
        check_len(op, "lse", rows, lse.len)?;
        check_targets(op, vocab, targets, mask)?;
        if rows == 0 {
            return Ok(());
        }
        self.bind()?;
        let d_t = self.htod(op, targets)?;
        let m8: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        let d_m = self.htod(op, &m8)?;
        let v = vocab as i64;
        launch!(
            self,
            op,
            self.f("cross_entropy_backward"),
            rows_cfg(rows),
            &logits.slice,
            &v,
            &d_t,
            &d_m,
            &lse.slice,
            &scale,
            &mut dlogits.slice
        );
        Ok(())
    }

    fn add(&self, a: &CudaBuffer, b: &CudaBuffer, out: &mut CudaBuffer) -> Result<()> {
        check_len("add", "b", a.len, b.len)?;
        check_len("add", "out", a.len, out.len)?;
        if a.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = a.len as i64;
        launch!(
            self,
            "add",
            self.f("add"),
            grid_for(a.len),
            &a.slice,
            &b.slice,
            &mut out.slice,
            &n
        );
        Ok(())
    }

    fn axpy(&self, alpha: f32, x: &CudaBuffer, y: &mut CudaBuffer) -> Result<()> {
        check_len("axpy", "y", x.len, y.len)?;
        if x.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = x.len as i64;
        launch!(
            self,
            "axpy",
            self.f("axpy"),
            grid_for(x.len),
            &alpha,
            &x.slice,
            &mut y.slice,
            &n
        );
        Ok(())
    }

    fn scale(&self, alpha: f32, x: &mut CudaBuffer) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = x.len as i64;
        launch!(
            self,
            "scale",
            self.f("scale"),
            grid_for(x.len),
            &alpha,
            &mut x.slice,
            &n
        );
        Ok(())
    }

    fn sum_squares(&self, x: &CudaBuffer) -> Result<f64> {
        if x.len == 0 {
            return Ok(0.0);
        }
        self.bind()?;
        let cfg = grid_for(x.len);
        let blocks = cfg.grid_dim.0 as usize;
        let s = &self.inner.stream;
        let mut partial = s.alloc_zeros::<f64>(blocks).map_err(dev("sum_squares"))?;
        let n = x.len as i64;
        launch!(
            self,
            "sum_squares",
            self.f("sum_squares"),
            cfg,
            &x.slice,
            &mut partial,
            &n
        );
        let host = s.clone_dtoh(&partial).map_err(dev("sum_squares"))?;
        s.synchronize().map_err(dev("sum_squares"))?;
        Ok(host.iter().sum())
    }

    fn round_bf16(&self, x: &mut CudaBuffer) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = x.len as i64;
        launch!(
            self,
            "round_bf16",
            self.f("round_bf16"),
            grid_for(x.len),
            &mut x.slice,
            &n
        );
        Ok(())
    }

    fn adamw(
        &self,
        cfg: &AdamW,
        step: u64,
        param: &mut CudaBuffer,
        grad: &CudaBuffer,
        m: &mut CudaBuffer,
        v: &mut CudaBuffer,
    ) -> Result<()> {
        let n = param.len;
        check_len("adamw", "grad", n, grad.len)?;
        check_len("adamw", "exp_avg", n, m.len)?;
        check_len("adamw", "exp_avg_sq", n, v.len)?;
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        // The scalars exactly as the CPU kernel forms them.
        let t = step.max(1) as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt() as f32;
        let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let (omb1, omb2) = (1.0f32 - b1, 1.0f32 - b2);
        let step_size = (cfg.lr / bc1) as f32;
        let eps = cfg.eps as f32;
        let ni = n as i64;
        launch!(
            self,
            "adamw",
            self.f("adamw"),
            grid_for(n),
            &mut param.slice,
            &grad.slice,
            &mut m.slice,
            &mut v.slice,
            &ni,
            &decay,
            &b1,
            &b2,
            &omb1,
            &omb2,
            &step_size,
            &eps,
            &bc2_sqrt
        );
        Ok(())
    }
}

fn check_targets(op: &'static str, vocab: usize, targets: &[u32], mask: &[bool]) -> Result<()> {
    for (r, (&t, &m)) in targets.iter().zip(mask).enumerate() {
        if m && t as usize >= vocab {
            return Err(invalid(
                op,
                format!("row {r}: target {t} is outside the vocabulary of {vocab}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once() {
        let t = tiles(&[0, 5, 5, 70], 64);
        assert_eq!(t, vec![0, 5, 0, 5, 65, 0, 5, 65, 64]);
    }
}
