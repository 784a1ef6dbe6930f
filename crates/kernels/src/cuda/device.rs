//! The CUDA backend proper (feature `cuda`): cudarc with dynamic loading, cuBLAS GEMMs, the
//! kernels of `ops.cu` and `attention.cu` compiled by NVRTC at first use and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::{GemmPrecision, ATTENTION_SRC, OPS_SRC};
use crate::backend::Backend;
use crate::error::{check_len, invalid, KernelError, Result};
use crate::matmul::GemmSpec;
use crate::ops::adamw::AdamW;
use crate::ops::attention::AttnShape;

const NT: u32 = 256;
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
}

macro_rules! launch {
    ($self:expr, $op:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut b = $self.inner.stream.launch_builder($func);
        $( b.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in the .cu source.
        unsafe { b.launch($cfg) }.map_err(dev($op))?;
    }};
}

mod attention;
mod embedding;
mod gemm;
use attention::AttnKernels;

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
        self.cublas_gemm(spec, a, b, c)
    }

    fn embedding_forward(
        &self,
        weight: &CudaBuffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        out: &mut CudaBuffer,
    ) -> Result<()> {
        self.lookup(weight, dim, vocab_start, ids, out)
    }

    fn embedding_backward(
        &self,
        grad_out: &CudaBuffer,
        dim: usize,
        vocab_start: usize,
        ids: &[u32],
        grad_weight: &mut CudaBuffer,
    ) -> Result<()> {
        self.lookup_backward(grad_out, dim, vocab_start, ids, grad_weight)
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

    fn rope(&self, x: &mut CudaBuffer, r: &crate::Rotation<'_>) -> Result<()> {
        let (positions, head_dim) = (r.positions, r.head_dim);
        if !head_dim.is_multiple_of(2) {
            return Err(invalid("rope", format!("head_dim {head_dim} must be even")));
        }
        check_len("rope", "x", positions.len() * r.heads * head_dim, x.len)?;
        if x.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let freqs = r.rope.inv_freq::<f32>(head_dim);
        let d_pos = self.htod("rope", positions)?;
        let d_freq = self.htod("rope", &freqs)?;
        let (t, h, hd) = (positions.len() as i64, r.heads as i64, head_dim as i64);
        let sign: f32 = if r.inverse { -1.0 } else { 1.0 };
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
        self.flash_forward(q, k, v, cu_seqlens, shape, scale, out, lse)
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
        self.flash_backward(
            dout, q, k, v, out, lse, cu_seqlens, shape, scale, dq, dk, dv,
        )
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
        let (beta2, bc2_sqrt) = cfg.second_moment(step);
        let bc2_sqrt = bc2_sqrt as f32;
        let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
        let (b1, b2) = (cfg.beta1 as f32, beta2 as f32);
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
