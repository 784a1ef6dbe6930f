//! The host side of the attention kernels (`attention.cu`): per-head-dim compilation, tile
//! lists, shared-memory sizes and the launches of the forward and the deterministic backward.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::{compile, dev, grid_for, CudaBackend, CudaBuffer, ATTENTION_SRC, NT};
use crate::error::{check_len, invalid, Result};
use crate::ops::attention::AttnShape;

/// Forward / dq query tile, dk/dv key tile, key tile (must match attention.cu).
const BQ: usize = 64;
const BKV: usize = 32;
const BK: usize = 32;
const MAX_HEAD_DIM: usize = 256;

pub(super) struct AttnKernels {
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

impl CudaBackend {
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_forward(
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
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
