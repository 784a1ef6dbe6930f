//! The CPU backend's shelf of freed buffers: a buffer the runtime hands back (an activation
//! after its last use) is kept, and a later `zeros` of a similar length takes it instead of
//! asking the allocator for fresh pages. Fresh pages cost a page fault and the kernel's own
//! zeroing on first touch; in a training step, where every op's output is new, that was about a
//! tenth of the CPU step's time.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Most bytes one backend keeps on its shelf; buffers handed back beyond it are freed.
pub const SHELF_BYTES: usize = 1 << 30;

/// Freed buffers by capacity.
#[derive(Default)]
pub(crate) struct Shelf {
    inner: Mutex<Stock>,
}

#[derive(Default)]
struct Stock {
    by_capacity: BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

impl Shelf {
    fn stock(&self) -> std::sync::MutexGuard<'_, Stock> {
        // The stock is consistent between statements (a panic while holding the lock cannot
        // leave it half-updated), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A zero-filled buffer of `len` values from the shelf — one whose capacity is between
    /// `len` and twice that — or `None`.
    pub(crate) fn take_zeroed(&self, len: usize) -> Option<Vec<f32>> {
        let mut v = self.take(len)?;
        v.clear();
        v.resize(len, 0.0);
        Some(v)
    }

    /// Like [`Self::take_zeroed`], but the values are whatever the buffer held before (values
    /// past its old length are zeros): for an output its op writes in full.
    pub(crate) fn take_unfilled(&self, len: usize) -> Option<Vec<f32>> {
        let mut v = self.take(len)?;
        v.resize(len, 0.0);
        Some(v)
    }

    fn take(&self, len: usize) -> Option<Vec<f32>> {
        if len == 0 {
            return None;
        }
        let v = {
            let mut s = self.stock();
            let (&cap, list) = s
                .by_capacity
                .range_mut(len..=len.saturating_mul(2))
                .next()?;
            let v = list.pop()?;
            if list.is_empty() {
                s.by_capacity.remove(&cap);
            }
            s.bytes -= cap * std::mem::size_of::<f32>();
            v
        };
        Some(v)
    }

    /// Keeps `v` for a later [`Self::take_zeroed`], unless the shelf is full.
    pub(crate) fn give(&self, v: Vec<f32>) {
        let bytes = v.capacity() * std::mem::size_of::<f32>();
        if bytes == 0 {
            return;
        }
        let mut s = self.stock();
        if s.bytes + bytes > SHELF_BYTES {
            return;
        }
        s.bytes += bytes;
        s.by_capacity.entry(v.capacity()).or_default().push(v);
    }

    /// Bytes on the shelf now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.stock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_zeroed_for_a_similar_length_only() {
        let shelf = Shelf::default();
        let v = vec![7.0f32; 1000];
        let ptr = v.as_ptr();
        shelf.give(v);
        assert_eq!(shelf.bytes(), 4000);
        assert!(shelf.take_zeroed(1001).is_none(), "too short");
        assert!(shelf.take_zeroed(499).is_none(), "more than twice too long");
        let w = shelf.take_zeroed(600).expect("on the shelf");
        assert_eq!((w.len(), w.as_ptr()), (600, ptr));
        assert!(w.iter().all(|&x| x == 0.0));
        assert_eq!(shelf.bytes(), 0);
        assert!(shelf.take_zeroed(600).is_none(), "taken once only");
        shelf.give(vec![7.0f32; 1000]);
        let w = shelf.take_unfilled(800).expect("on the shelf");
        assert!(w.len() == 800 && w.iter().all(|&x| x == 7.0));
    }

    #[test]
    fn the_shelf_stops_at_its_size() {
        let shelf = Shelf::default();
        let big = SHELF_BYTES / 4 / 2 + 1;
        shelf.give(vec![0.0; big]);
        shelf.give(vec![0.0; big]);
        assert_eq!(shelf.bytes(), big * 4);
    }
}
