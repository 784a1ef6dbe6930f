//! The count sketch (Charikar, Chen and Farach-Colton 2002) as FetchSGD uses it for uplinks
//! (Rothchild et al. 2020): a vector of `d` values is summarised by `rows × cols` sums, each row
//! adding every value, signed by a hash, into one of its columns, chosen by another. Sketches
//! are linear — the sum of sketches is the sketch of the sum — so a server adds its clients'
//! sketches and its own error accumulation in sketch space, and recovers the largest
//! coordinates by the median of their rows' signed columns.
//!
//! ```
//! use comm::sketch::CountSketch;
//!
//! let s = CountSketch::new(5, 64, 7);
//! let mut x = vec![0.0f32; 1000];
//! x[3] = 5.0;
//! x[800] = -2.0;
//! let table = s.sketch(&x);
//! assert_eq!(table.len(), 5 * 64);
//! // A sparse vector's coordinates come back exactly (collisions are outvoted by the median).
//! assert_eq!(s.top_k(&table, x.len(), 2), vec![(3, 5.0), (800, -2.0)]);
//! ```

use crate::codec::splitmix;

/// A count sketch's shape and hashes: `rows × cols` sums, the hashes drawn from `seed` (the
/// same on every member that sketches and every one that reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountSketch {
    /// Independent rows (the median over them estimates a coordinate).
    pub rows: usize,
    /// Columns a row hashes the coordinates into.
    pub cols: usize,
    /// The hashes' seed.
    pub seed: u64,
}

impl CountSketch {
    /// A sketch of `rows × cols` (each at least 1) hashed from `seed`.
    pub fn new(rows: usize, cols: usize, seed: u64) -> Self {
        Self {
            rows: rows.max(1),
            cols: cols.max(1),
            seed,
        }
    }

    /// Coordinate `j`'s column and sign in row `r`.
    fn slot(&self, r: usize, j: usize) -> (usize, f32) {
        let h = splitmix(self.seed ^ splitmix(((r as u64) << 40) ^ j as u64));
        let col = ((h >> 1) % self.cols as u64) as usize;
        (col, if h & 1 == 0 { 1.0 } else { -1.0 })
    }

    /// The sketch of `x`: `rows × cols` sums, row after row.
    pub fn sketch(&self, x: &[f32]) -> Vec<f32> {
        let mut table = vec![0.0f32; self.rows * self.cols];
        self.add(&mut table, x, 1.0);
        table
    }

    /// Adds `scale · x`'s sketch into `table`.
    pub fn add(&self, table: &mut [f32], x: &[f32], scale: f32) {
        for (j, &v) in x.iter().enumerate() {
            if v == 0.0 {
                continue;
            }
            for r in 0..self.rows {
                let (c, s) = self.slot(r, j);
                table[r * self.cols + c] += scale * s * v;
            }
        }
    }

    /// Coordinate `j`'s estimate from `table`: the median of its rows' signed columns (the
    /// mean of the middle two for an even row count).
    pub fn estimate(&self, table: &[f32], j: usize) -> f32 {
        let mut v: Vec<f32> = (0..self.rows)
            .map(|r| {
                let (c, s) = self.slot(r, j);
                s * table[r * self.cols + c]
            })
            .collect();
        v.sort_by(f32::total_cmp);
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            0.5 * (v[m - 1] + v[m])
        }
    }

    /// The `k` coordinates of a vector of `len` with the largest estimates by magnitude, and
    /// their estimates, ascending by coordinate (ties to the lower coordinate).
    pub fn top_k(&self, table: &[f32], len: usize, k: usize) -> Vec<(u32, f32)> {
        let est: Vec<f32> = (0..len).map(|j| self.estimate(table, j)).collect();
        let mut out: Vec<(u32, f32)> = crate::codec::top_k(&est, k)
            .into_iter()
            .map(|j| (j, est[j as usize]))
            .collect();
        out.sort_by_key(|p| p.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketches_are_linear_and_unbiased_over_seeds() {
        let s = CountSketch::new(3, 50, 1);
        let a: Vec<f32> = (0..300).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..300).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let (sa, sb, ss) = (s.sketch(&a), s.sketch(&b), s.sketch(&sum));
        for ((x, y), z) in sa.iter().zip(&sb).zip(&ss) {
            assert!((x + y - z).abs() < 1e-3, "{x} + {y} vs {z}");
        }
        // One row's estimate of a coordinate is unbiased: over many seeds its mean is the value.
        let j = 17;
        let mean: f64 = (0..4000)
            .map(|seed| {
                let one = CountSketch::new(1, 50, seed);
                f64::from(one.estimate(&one.sketch(&a), j))
            })
            .sum::<f64>()
            / 4000.0;
        // The other 299 values add ±v/50 each: the standard error is about 0.04.
        assert!((mean - f64::from(a[j])).abs() < 0.2, "{mean} vs {}", a[j]);
    }

    #[test]
    fn heavy_coordinates_come_back_from_a_dense_tail() {
        // 10 large values over 5,000 small ones: the 10 are the top 10 estimates, within the
        // tail's noise of their values (with 1,000 columns a small coordinate shares a column
        // with the same large one in three of five rows with probability ~5e-4: a ghost).
        let mut x: Vec<f32> = (0..5000).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
        let heavy: Vec<usize> = (0..10).map(|i| 97 + i * 431).collect();
        for (n, &j) in heavy.iter().enumerate() {
            x[j] = if n % 2 == 0 { 3.0 } else { -2.5 };
        }
        let s = CountSketch::new(5, 1000, 42);
        let got = s.top_k(&s.sketch(&x), x.len(), 10);
        assert_eq!(got.iter().map(|p| p.0 as usize).collect::<Vec<_>>(), heavy);
        for (j, v) in got {
            assert!(
                (v - x[j as usize]).abs() < 0.05,
                "{j}: {v} vs {}",
                x[j as usize]
            );
        }
    }
}
