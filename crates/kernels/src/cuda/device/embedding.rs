//! The embedding lookup and its backward (tokens grouped by row, summed in token order: the CPU's
//! order, no atomics).

use cudarc::driver::PushKernelArg;

use super::{dev, grid_for, rows_cfg, CudaBackend, CudaBuffer};
use crate::error::{check_len, Result};

impl CudaBackend {
    pub(super) fn lookup(
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

    pub(super) fn lookup_backward(
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
}
