//! What attention's online softmax works on, one tile at a time: the scores and the running
//! state of their query rows (used by [`crate::Real::online_softmax`] and `kernels::simd`).

/// A tile of attention scores: rows of `bc`, row `r` visible up to `visible[r]` (one row per
/// entry of `visible`).
pub struct ScoreTile<'a, T> {
    /// The scores, row-major.
    pub scores: &'a mut [T],
    /// Scores per row.
    pub bc: usize,
    /// Each row's visible prefix.
    pub visible: &'a [usize],
}

impl<'a, T> ScoreTile<'a, T> {
    /// Each row: its index, its scores and how many of them are visible.
    pub fn rows(self) -> impl Iterator<Item = (usize, &'a mut [T], usize)> {
        let ScoreTile {
            scores,
            bc,
            visible,
        } = self;
        scores
            .chunks_exact_mut(bc)
            .zip(visible)
            .enumerate()
            .map(|(r, (row, &v))| (r, row, v))
    }
}

/// The online softmax's running state of the tile's query rows: the maximum `m` and sum `l`
/// of each row's exponentials so far, and its unnormalised output `o` (rows of `d`).
pub struct Running<'a, T> {
    /// Running maxima.
    pub m: &'a mut [T],
    /// Running sums.
    pub l: &'a mut [T],
    /// Unnormalised outputs.
    pub o: &'a mut [T],
    /// Values per output row.
    pub d: usize,
}
