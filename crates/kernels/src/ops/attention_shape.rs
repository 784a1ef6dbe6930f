//! The head layout of an attention call and the tile edge, shared by the whole-sequence
//! attention and its span tiles.

use crate::error::{check_len, invalid, Result};

/// Tile edge (query rows and key columns per tile).
pub const BLOCK: usize = 64;

/// Head layout of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Dimension of every head.
    pub head_dim: usize,
}

impl AttnShape {
    /// The query heads are a multiple of the kv heads.
    pub(crate) fn check_heads(&self, op: &'static str) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(
                op,
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn check(
        &self,
        op: &'static str,
        cu_seqlens: &[usize],
        q: usize,
        k: usize,
        v: usize,
    ) -> Result<usize> {
        self.check_heads(op)?;
        let tokens = *cu_seqlens.last().unwrap_or(&0);
        if cu_seqlens.first() != Some(&0) || cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
            return Err(invalid(
                op,
                format!("cu_seqlens must start at 0 and never decrease, got {cu_seqlens:?}"),
            ));
        }
        check_len(op, "q", tokens * self.heads * self.head_dim, q)?;
        check_len(op, "k", tokens * self.kv_heads * self.head_dim, k)?;
        check_len(op, "v", tokens * self.kv_heads * self.head_dim, v)?;
        Ok(tokens)
    }
}
