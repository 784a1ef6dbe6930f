//! Rectangular regions of a tensor and the chunk rule that cuts them.

use std::fmt;
use std::ops::Range;

/// The `index`-th of `parts` chunks of `range`: every chunk has `ceil(len/parts)` elements except
/// the trailing ones, which are smaller or empty. `parts` must be ≥ 1.
pub fn chunk(range: Range<usize>, parts: usize, index: usize) -> Range<usize> {
    let len = range.end - range.start;
    let size = len.div_ceil(parts.max(1));
    let start = range.start + (index * size).min(len);
    let end = range.start + ((index + 1) * size).min(len);
    start..end
}

/// A box in index space: one half-open range per tensor dim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Region {
    /// One range per dim, outermost dim first.
    pub ranges: Vec<Range<usize>>,
}

impl Region {
    /// The whole tensor of `shape`.
    pub fn full(shape: &[usize]) -> Self {
        Self {
            ranges: shape.iter().map(|&n| 0..n).collect(),
        }
    }

    /// Extent along every dim.
    pub fn shape(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| r.end - r.start).collect()
    }

    /// First index along every dim.
    pub fn offset(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| r.start).collect()
    }

    /// Number of elements.
    pub fn volume(&self) -> usize {
        self.ranges.iter().map(|r| r.end - r.start).product()
    }

    /// True when the region holds no element.
    pub fn is_empty(&self) -> bool {
        self.volume() == 0
    }

    /// The common part of two regions of the same rank (possibly empty).
    pub fn intersect(&self, other: &Region) -> Region {
        Region {
            ranges: self
                .ranges
                .iter()
                .zip(&other.ranges)
                .map(|(a, b)| {
                    let start = a.start.max(b.start);
                    let end = a.end.min(b.end).max(start);
                    start..end
                })
                .collect(),
        }
    }

    /// This region (global indices) in the coordinates of `within`, a region that contains it
    /// (a piece's own indices).
    pub fn relative_to(&self, within: &Region) -> Region {
        Region {
            ranges: self
                .ranges
                .iter()
                .zip(&within.ranges)
                .map(|(r, w)| r.start - w.start..r.end - w.start)
                .collect(),
        }
    }

    /// True when `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Region) -> bool {
        other.is_empty()
            || self
                .ranges
                .iter()
                .zip(&other.ranges)
                .all(|(a, b)| a.start <= b.start && b.end <= a.end)
    }
}

impl Region {
    fn key(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ranges.iter().map(|r| (r.start, r.end))
    }
}

impl PartialOrd for Region {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Region {
    /// Lexicographic by `(start, end)` of each dim: a stable order for plans.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_ceil_sized_with_small_or_empty_tail() {
        let c: Vec<_> = (0..4).map(|i| chunk(0..10, 4, i)).collect();
        assert_eq!(c, vec![0..3, 3..6, 6..9, 9..10]);
        let c: Vec<_> = (0..4).map(|i| chunk(0..5, 4, i)).collect();
        assert_eq!(c, vec![0..2, 2..4, 4..5, 5..5]);
        let c: Vec<_> = (0..3).map(|i| chunk(10..11, 3, i)).collect();
        assert_eq!(c, vec![10..11, 11..11, 11..11]);
    }

    #[test]
    fn intersection_and_display() {
        let a = Region {
            ranges: vec![0..4, 2..6],
        };
        let b = Region {
            ranges: vec![3..8, 0..3],
        };
        assert_eq!(a.intersect(&b).to_string(), "[3..4, 2..3]");
        assert_eq!(a.intersect(&b).volume(), 1);
        let c = Region {
            ranges: vec![5..8, 0..3],
        };
        assert!(a.intersect(&c).is_empty());
        assert!(a.contains(&a.intersect(&b)));
    }
}
