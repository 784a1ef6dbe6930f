//! Copies that stream past the cache: a switch writes hundreds of megabytes that nothing reads
//! until the next phase, so non-temporal stores save the read of every destination line that an
//! ordinary store would make first (a third of the memory traffic of a copy).

/// Copies `src` into `dst` (equal lengths) with non-temporal stores where the CPU has them;
/// call [`fence`] once after the last such copy, before another thread reads `dst`.
pub(crate) fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "stream::copy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        // Short runs: the ordinary copy (the streaming one's alignment work would dominate).
        if dst.len() < 64 {
            dst.copy_from_slice(src);
            return;
        }
        // Elements until `dst` is 16-byte aligned (f32 pointers are 4-byte aligned).
        let head = (dst.as_ptr() as usize).wrapping_neg() % 16 / 4;
        dst[..head].copy_from_slice(&src[..head]);
        let body = (dst.len() - head) / 4 * 4;
        let (d, s) = (&mut dst[head..head + body], &src[head..head + body]);
        for (d, s) in d.chunks_exact_mut(4).zip(s.chunks_exact(4)) {
            // SAFETY: SSE is part of x86_64; `s` and `d` are 4 valid f32s, and `d` is 16-byte
            // aligned (the head was copied first and every chunk advances 16 bytes).
            unsafe { _mm_stream_ps(d.as_mut_ptr(), _mm_loadu_ps(s.as_ptr())) }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Orders the streaming stores before whatever this thread does next (a lock release that
/// hands `dst` to another thread).
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; sfence has no operands.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        for start in 0..5 {
            for len in [0, 1, 3, 63, 64, 65, 67, 100, 995 - start] {
                let mut dst = vec![f32::NAN; 1000];
                super::copy(&mut dst[start..start + len], &src[..len]);
                super::fence();
                assert_eq!(&dst[start..start + len], &src[..len], "{start}+{len}");
                assert!(dst[..start].iter().all(|x| x.is_nan()));
                assert!(dst[start + len..].iter().all(|x| x.is_nan()));
            }
        }
    }
}
