//! Page-aligned heap buffers for O_DIRECT and large reads, with a small recycling pool so
//! large buffers are not faulted in afresh (and zeroed by the kernel) for every operation.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

/// Memory alignment of every [`AlignedBuf`]. 4 KiB satisfies the DMA alignment of every
/// block device and file system we serve (STATX_DIOALIGN reports at most a page).
pub(crate) const MEM_ALIGN: usize = 4096;

/// Buffers from this size up (rounded up to a power of two) are recycled.
pub(crate) const POOL_MIN: usize = 64 * 1024;
/// Buffers above this size are never recycled.
const POOL_MAX: usize = 32 << 20;
/// Size classes: POOL_MIN << i for i in 0..CLASSES.
const CLASSES: usize = (POOL_MAX / POOL_MIN).trailing_zeros() as usize + 1;
/// Most bytes kept idle in the pool, over all classes.
const POOL_BYTES: usize = 64 << 20;

/// Idle buffers by size class (addresses; each of `POOL_MIN << class` bytes).
struct Pool {
    free: [Vec<usize>; CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fixed-size byte buffer whose start address is aligned to [`MEM_ALIGN`].
/// Every byte is always initialised: fresh allocations are zero-filled (`alloc_zeroed` gets
/// fresh zero pages for large sizes, so this is cheap), recycled ones hold old contents.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// Size class this buffer returns to on drop.
    class: Option<usize>,
}

// SAFETY: AlignedBuf uniquely owns its heap allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0). Never recycled.
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        // Allocate at least one alignment unit so the layout is never zero-sized.
        let size = len.max(1).next_multiple_of(MEM_ALIGN);
        let (ptr, layout) = allocate(size);
        AlignedBuf {
            ptr,
            len,
            layout,
            class: None,
        }
    }

    /// A buffer of `len` bytes with unspecified (but initialised) contents, for data that
    /// will be overwritten: recycled from the pool when large enough.
    pub(crate) fn scratch(len: usize) -> AlignedBuf {
        if !(POOL_MIN..=POOL_MAX).contains(&len) {
            return AlignedBuf::zeroed(len);
        }
        let size = len.next_power_of_two();
        let class = (size / POOL_MIN).trailing_zeros() as usize;
        debug_assert_eq!(POOL_MIN << class, size);
        let recycled = {
            let mut pool = pool();
            let addr = pool.free[class].pop();
            if addr.is_some() {
                pool.bytes -= size;
            }
            addr
        };
        let (ptr, layout) = match recycled.and_then(|addr| NonNull::new(addr as *mut u8)) {
            Some(ptr) => (ptr, layout_of(size)),
            None => allocate(size),
        };
        AlignedBuf {
            ptr,
            len,
            layout,
            class: Some(class),
        }
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::scratch(data.len());
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
        if let Some(class) = self.class {
            let size = self.layout.size();
            let mut pool = pool();
            if pool.bytes + size <= POOL_BYTES {
                pool.bytes += size;
                pool.free[class].push(self.ptr.as_ptr() as usize);
                return;
            }
        }
        // SAFETY: allocated by `allocate` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn layout_of(size: usize) -> Layout {
    match Layout::from_size_align(size, MEM_ALIGN) {
        Ok(layout) => layout,
        Err(_) => panic!("aligned buffer of {size} bytes is too large"),
    }
}

/// A zeroed allocation of `size` (> 0) bytes aligned to MEM_ALIGN.
fn allocate(size: usize) -> (NonNull<u8>, Layout) {
    debug_assert!(size > 0);
    let layout = layout_of(size);
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { alloc_zeroed(layout) };
    let Some(ptr) = NonNull::new(raw) else {
        std::alloc::handle_alloc_error(layout)
    };
    (ptr, layout)
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
    fn scratch_buffers_are_recycled() {
        let len = 3 * POOL_MIN + 5; // class of 4 * POOL_MIN
        let mut first = AlignedBuf::scratch(len);
        assert!(is_aligned(first.as_ptr()) && first.len() == len);
        first.as_mut_slice().fill(7);
        let addr = first.as_ptr() as usize;
        drop(first);
        // Other tests may take buffers of this class concurrently, so look for ours among a few.
        let again: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::scratch(len)).collect();
        let ours = again.iter().find(|b| b.as_ptr() as usize == addr);
        let ours = ours.expect("the dropped buffer is handed out again");
        assert_eq!(ours.len(), len);
        assert!(
            ours.as_ref().iter().all(|&b| b == 7),
            "old contents, not fresh pages"
        );
        // Small and huge buffers bypass the pool.
        assert_eq!(AlignedBuf::scratch(100).class, None);
        assert_eq!(AlignedBuf::scratch(POOL_MAX + 1).class, None);
    }

    #[test]
    fn copy_keeps_bytes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let buf = AlignedBuf::copy_from(&data);
        assert_eq!(buf.as_ref(), &data[..]);
        assert_eq!(buf.len(), data.len());
    }
}
