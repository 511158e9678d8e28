//! Page-aligned, zero-initialised heap buffers for O_DIRECT I/O.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Memory alignment of every [`AlignedBuf`]. 4 KiB satisfies the DMA alignment of every
/// block device and file system we serve (STATX_DIOALIGN reports at most a page).
pub(crate) const MEM_ALIGN: usize = 4096;

/// A fixed-size byte buffer whose start address is aligned to [`MEM_ALIGN`].
/// It is zero-filled on creation (`alloc_zeroed` gets fresh zero pages for large sizes, so
/// this is cheap), which keeps every byte initialised for safe slicing.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its heap allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        // Allocate at least one alignment unit so the layout is never zero-sized.
        let size = len.max(1).next_multiple_of(MEM_ALIGN);
        let layout = match Layout::from_size_align(size, MEM_ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("aligned buffer of {len} bytes is too large"),
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len initialised bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Whether `ptr` is aligned for O_DIRECT.
pub(crate) fn is_aligned(ptr: *const u8) -> bool {
    (ptr as usize) % MEM_ALIGN == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0usize, 1, 511, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert!(is_aligned(buf.as_ptr()), "len {len}");
            assert_eq!(buf.as_ref().len(), len);
            assert!(buf.as_ref().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn copy_keeps_bytes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let buf = AlignedBuf::copy_from(&data);
        assert_eq!(buf.as_ref(), &data[..]);
        assert_eq!(buf.len(), data.len());
    }
}
