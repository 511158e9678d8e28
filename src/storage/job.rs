//! What both engine backends share: the open file with its capabilities ([`FileCtx`]) and a
//! validated operation with its buffers ready for the kernel ([`Job`]).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::aligned::{is_aligned, AlignedBuf, POOL_MIN};
use super::engine::DiskOutput;

/// Size of the shared zero buffer used when zeroes must be written out.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Bounded retry count for EINTR/EAGAIN on one operation.
pub(crate) const MAX_RETRIES: u32 = 1000;

/// The backing file and what it supports. Shared by the public handle and the engine threads.
pub(crate) struct FileCtx {
    pub(crate) file: File,
    pub(crate) blockdev: bool,
    pub(crate) direct: bool,
    /// Buffered writes complete without blocking in io_uring (XFS, btrfs).
    pub(crate) async_buffered_writes: bool,
    /// Offset/length granularity: O_DIRECT alignment, or the device's logical block size.
    pub(crate) block: u32,
    /// Cleared when FALLOC_FL_PUNCH_HOLE says EOPNOTSUPP.
    pub(crate) punch_ok: AtomicBool,
    /// Cleared when FALLOC_FL_ZERO_RANGE says EOPNOTSUPP.
    pub(crate) zero_range_ok: AtomicBool,
    /// Whether write-zeroes is expected to be a cheap metadata operation.
    pub(crate) fast_zero: AtomicBool,
    /// ZERO_CHUNK zero bytes, aligned for O_DIRECT.
    pub(crate) zeroes: AlignedBuf,
}

/// How a write-zeroes request is carried out; tried in order until one is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroStep {
    /// fallocate PUNCH_HOLE|KEEP_SIZE (files: deallocate; block devices: write-zeroes with unmap).
    Punch,
    /// fallocate ZERO_RANGE|KEEP_SIZE (files: unwritten extents; block devices: BLKZEROOUT).
    ZeroRange,
    /// Write zero buffers.
    Write,
}

impl ZeroStep {
    pub(crate) fn fallocate_mode(self) -> i32 {
        match self {
            ZeroStep::Punch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ZeroStep::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ZeroStep::Write => 0,
        }
    }
}

impl FileCtx {
    /// The first zeroing method to try (`after` = None), or the next one after `after` was
    /// found unsupported. Always ends with [`ZeroStep::Write`], which works everywhere.
    pub(crate) fn zero_step(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        after: Option<ZeroStep>,
    ) -> ZeroStep {
        let block = u64::from(self.block);
        // Block devices take fallocate only on whole logical blocks.
        if self.blockdev && (offset % block != 0 || len % block != 0) {
            return ZeroStep::Write;
        }
        let order: &[ZeroStep] = if may_trim {
            &[ZeroStep::Punch, ZeroStep::ZeroRange, ZeroStep::Write]
        } else {
            &[ZeroStep::ZeroRange, ZeroStep::Write]
        };
        let start = match after {
            None => 0,
            Some(prev) => order.iter().position(|s| *s == prev).map_or(0, |i| i + 1),
        };
        order[start.min(order.len() - 1)..]
            .iter()
            .copied()
            .find(|step| match step {
                ZeroStep::Punch => self.punch_ok.load(Ordering::Relaxed),
                ZeroStep::ZeroRange => self.zero_range_ok.load(Ordering::Relaxed),
                ZeroStep::Write => true,
            })
            .unwrap_or(ZeroStep::Write)
    }

    /// Remembers that a zeroing method returned EOPNOTSUPP so it is not tried again.
    pub(crate) fn note_unsupported(&self, step: ZeroStep) {
        match step {
            ZeroStep::Punch => self.punch_ok.store(false, Ordering::Relaxed),
            ZeroStep::ZeroRange => {
                self.zero_range_ok.store(false, Ordering::Relaxed);
                self.fast_zero.store(false, Ordering::Relaxed);
            }
            ZeroStep::Write => {}
        }
    }

    /// The part of `[offset, offset + len)` made of whole blocks (for BLKDISCARD).
    pub(crate) fn aligned_interior(&self, offset: u64, len: u64) -> (u64, u64) {
        let block = u64::from(self.block);
        let start = offset.next_multiple_of(block);
        let end = (offset + len) / block * block;
        if end > start {
            (start, end - start)
        } else {
            (start, 0)
        }
    }
}

/// Destination of a read: uninitialised heap memory (buffered I/O) or an aligned buffer.
pub(crate) enum ReadBuf {
    /// `capacity() >= want`, `len() == 0` until the read has fully completed.
    Heap(Vec<u8>, usize),
    Aligned(AlignedBuf),
}

impl ReadBuf {
    /// O_DIRECT and large reads use recycled aligned buffers; small buffered reads use malloc.
    pub(crate) fn new(len: usize, direct: bool) -> ReadBuf {
        if direct || len >= POOL_MIN {
            ReadBuf::Aligned(AlignedBuf::scratch(len))
        } else {
            ReadBuf::Heap(Vec::with_capacity(len), len)
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            ReadBuf::Heap(_, want) => *want,
            ReadBuf::Aligned(buf) => buf.len(),
        }
    }

    /// Start of the buffer; the kernel writes up to `len()` bytes there.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            ReadBuf::Heap(vec, _) => vec.as_mut_ptr(),
            ReadBuf::Aligned(buf) => buf.as_mut_ptr(),
        }
    }

    /// The filled buffer as Bytes, without copying.
    ///
    /// # Safety
    /// All `len()` bytes must have been written (by the kernel).
    pub(crate) unsafe fn into_filled_bytes(self) -> Bytes {
        match self {
            ReadBuf::Heap(mut vec, want) => {
                debug_assert!(vec.capacity() >= want);
                // SAFETY: the caller guarantees the first `want` bytes are initialised.
                unsafe { vec.set_len(want) };
                Bytes::from(vec)
            }
            ReadBuf::Aligned(buf) => Bytes::from_owner(buf),
        }
    }
}

/// Source of a write: the caller's bytes, or an aligned copy of them for O_DIRECT.
pub(crate) enum WriteBuf {
    Shared(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    pub(crate) fn new(data: Bytes, direct: bool) -> WriteBuf {
        if direct && !is_aligned(data.as_ptr()) {
            WriteBuf::Aligned(AlignedBuf::copy_from(&data))
        } else {
            WriteBuf::Shared(data)
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            WriteBuf::Shared(b) => b.len(),
            WriteBuf::Aligned(b) => b.len(),
        }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            WriteBuf::Shared(b) => b.as_ptr(),
            WriteBuf::Aligned(b) => b.as_ptr(),
        }
    }
}

/// A validated, non-empty operation with its buffers ready.
pub(crate) enum Job {
    Read {
        offset: u64,
        buf: ReadBuf,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
}

/// The completion callback type, as in the public API.
pub(crate) type Done = super::engine::Completion;

/// An error for a failed operation from a negative errno (as io_uring returns it).
pub(crate) fn errno(neg: i32) -> io::Error {
    io::Error::from_raw_os_error(-neg)
}

/// The error an operation gets when the engine has shut down.
pub(crate) fn shut_down() -> io::Error {
    io::Error::from_raw_os_error(libc::ESHUTDOWN)
}

/// Calls a completion, containing a panic in it so the engine thread survives a buggy callback.
pub(crate) fn complete(done: Done, result: io::Result<DiskOutput>) {
    let call = std::panic::AssertUnwindSafe(move || done(result));
    if std::panic::catch_unwind(call).is_err() {
        tracing::error!("disk completion callback panicked");
    }
}

#[cfg(test)]
impl FileCtx {
    /// A context over an open regular file, for unit tests of the backends.
    pub(crate) fn for_test(file: File) -> FileCtx {
        FileCtx {
            file,
            blockdev: false,
            direct: false,
            async_buffered_writes: false,
            block: 512,
            punch_ok: AtomicBool::new(true),
            zero_range_ok: AtomicBool::new(true),
            fast_zero: AtomicBool::new(true),
            zeroes: AlignedBuf::zeroed(ZERO_CHUNK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> FileCtx {
        FileCtx::for_test(tempfile::tempfile().expect("tempfile"))
    }

    #[test]
    fn zero_steps_in_order() {
        let ctx = ctx();
        assert_eq!(ctx.zero_step(0, 4096, true, None), ZeroStep::Punch);
        assert_eq!(
            ctx.zero_step(0, 4096, true, Some(ZeroStep::Punch)),
            ZeroStep::ZeroRange
        );
        assert_eq!(
            ctx.zero_step(0, 4096, true, Some(ZeroStep::ZeroRange)),
            ZeroStep::Write
        );
        assert_eq!(ctx.zero_step(0, 4096, false, None), ZeroStep::ZeroRange);
        assert_eq!(
            ctx.zero_step(0, 4096, false, Some(ZeroStep::ZeroRange)),
            ZeroStep::Write
        );
        ctx.note_unsupported(ZeroStep::ZeroRange);
        assert!(!ctx.fast_zero.load(Ordering::Relaxed));
        assert_eq!(ctx.zero_step(0, 4096, false, None), ZeroStep::Write);
        assert_eq!(
            ctx.zero_step(0, 4096, true, Some(ZeroStep::Punch)),
            ZeroStep::Write
        );
    }

    #[test]
    fn block_devices_write_unaligned_zeroes() {
        let mut ctx = ctx();
        ctx.blockdev = true;
        assert_eq!(ctx.zero_step(512, 1024, true, None), ZeroStep::Punch);
        assert_eq!(ctx.zero_step(100, 1024, true, None), ZeroStep::Write);
        assert_eq!(ctx.zero_step(512, 1000, false, None), ZeroStep::Write);
    }

    #[test]
    fn aligned_interior_of_ranges() {
        let ctx = ctx();
        assert_eq!(ctx.aligned_interior(0, 4096), (0, 4096));
        assert_eq!(ctx.aligned_interior(100, 1000), (512, 512));
        assert_eq!(ctx.aligned_interior(100, 500).1, 0);
    }
}
