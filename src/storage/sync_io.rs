//! Blocking implementations of every [`Job`]: used by the thread-pool backend, and by the
//! io_uring backend for the one call io_uring has no opcode for (BLKDISCARD).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::blockdev;
use super::engine::DiskOutput;
use super::job::{FileCtx, Job, ReadBuf, WriteBuf, ZeroStep, MAX_RETRIES, ZERO_CHUNK};

/// Runs one job to completion on the calling thread.
pub(crate) fn execute(
    ctx: &FileCtx,
    rwf_dsync_ok: &AtomicBool,
    job: Job,
) -> io::Result<DiskOutput> {
    match job {
        Job::Read { offset, mut buf } => {
            read_full(ctx, &mut buf, offset)?;
            // SAFETY: read_full filled all len() bytes.
            Ok(DiskOutput::Data(unsafe { buf.into_filled_bytes() }))
        }
        Job::Write { offset, buf, fua } => {
            write_full(ctx, &buf, offset, fua, rwf_dsync_ok)?;
            Ok(DiskOutput::Done)
        }
        Job::Flush => {
            fdatasync(ctx)?;
            Ok(DiskOutput::Done)
        }
        Job::Trim { offset, len } => {
            trim(ctx, offset, len)?;
            Ok(DiskOutput::Done)
        }
        Job::Zero {
            offset,
            len,
            may_trim,
        } => {
            zero(ctx, offset, len, may_trim)?;
            Ok(DiskOutput::Done)
        }
    }
}

/// Whether an errno result should simply be retried.
fn transient(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

fn read_full(ctx: &FileCtx, buf: &mut ReadBuf, offset: u64) -> io::Result<()> {
    let fd = ctx.file.as_raw_fd();
    let len = buf.len();
    let ptr = buf.as_mut_ptr();
    let mut done = 0usize;
    let mut retries = 0;
    while done < len {
        let pos = libc::off_t::try_from(offset + done as u64).map_err(|_| blockdev::einval())?;
        // SAFETY: ptr is valid for len bytes of writes; done < len.
        let n = unsafe { libc::pread(fd, ptr.add(done).cast(), len - done, pos) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if transient(&err) && retries < MAX_RETRIES {
                retries += 1;
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(eof());
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads all of `buf` at `offset` if the page cache holds it, without waiting for the device
/// (`preadv2(RWF_NOWAIT)`). Ok(false): some of it is not cached (or the kernel would block);
/// the caller then reads the normal way. Errors are those of the read itself.
pub(crate) fn read_nowait(ctx: &FileCtx, buf: &mut ReadBuf, offset: u64) -> io::Result<bool> {
    let fd = ctx.file.as_raw_fd();
    let len = buf.len();
    let ptr = buf.as_mut_ptr();
    let mut done = 0usize;
    while done < len {
        let pos = libc::off_t::try_from(offset + done as u64).map_err(|_| blockdev::einval())?;
        let iov = libc::iovec {
            // SAFETY: done < len, so the pointer stays inside the buffer.
            iov_base: unsafe { ptr.add(done) }.cast(),
            iov_len: len - done,
        };
        // SAFETY: the iovec points at len - done writable bytes of the buffer.
        let n = unsafe { libc::preadv2(fd, &iov, 1, pos, libc::RWF_NOWAIT) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINTR) => Ok(false),
                _ => Err(err),
            };
        }
        if n == 0 {
            // End of file inside the data area: let the normal path report it.
            return Ok(false);
        }
        done += n as usize;
    }
    Ok(true)
}

/// The error for a read that hit the end of the file inside the data area (the file was
/// truncated under us).
pub(crate) fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "backing file ends inside the data area",
    )
}

fn write_full(
    ctx: &FileCtx,
    buf: &WriteBuf,
    offset: u64,
    fua: bool,
    rwf_dsync_ok: &AtomicBool,
) -> io::Result<()> {
    let dsync = fua && rwf_dsync_ok.load(Ordering::Relaxed);
    match write_at(ctx, buf.as_ptr(), buf.len(), offset, dsync) {
        Err(err) if dsync && err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            // pwritev2 flags unsupported: write, then fdatasync.
            rwf_dsync_ok.store(false, Ordering::Relaxed);
            write_at(ctx, buf.as_ptr(), buf.len(), offset, false)?;
            fdatasync(ctx)
        }
        Err(err) => Err(err),
        Ok(()) if fua && !dsync => fdatasync(ctx),
        Ok(()) => Ok(()),
    }
}

/// pwritev2 of `len` bytes at `ptr` until all is written; RWF_DSYNC when `dsync`.
fn write_at(ctx: &FileCtx, ptr: *const u8, len: usize, offset: u64, dsync: bool) -> io::Result<()> {
    let fd = ctx.file.as_raw_fd();
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    let mut done = 0usize;
    while done < len {
        let pos = libc::off_t::try_from(offset + done as u64).map_err(|_| blockdev::einval())?;
        let iov = libc::iovec {
            // SAFETY: done < len, so the pointer stays inside the buffer.
            iov_base: unsafe { ptr.add(done) } as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: the iovec points at len - done readable bytes.
        done += write_call(|| unsafe { libc::pwritev2(fd, &iov, 1, pos, flags) })?;
    }
    Ok(())
}

/// Writes `data` at `offset` until all is written (a buffered write on the calling thread).
pub(crate) fn write_slice(ctx: &FileCtx, data: &[u8], offset: u64) -> io::Result<()> {
    write_at(ctx, data.as_ptr(), data.len(), offset, false)
}

/// Moves up to `len` bytes from the pipe `pipe` into the file at `offset` with splice(2) (the
/// pipe's pages are copied into the page cache); returns how many moved, at least one. The
/// pipe must hold at least `len` bytes, so this never waits for it.
pub(crate) fn splice_in(ctx: &FileCtx, pipe: RawFd, offset: u64, len: usize) -> io::Result<usize> {
    let pos = libc::loff_t::try_from(offset).map_err(|_| blockdev::einval())?;
    let file = ctx.file.as_raw_fd();
    write_call(|| {
        let mut at = pos;
        // SAFETY: plain syscall on valid fds; `at` outlives it.
        let n = unsafe {
            libc::splice(
                pipe,
                std::ptr::null_mut(),
                file,
                &mut at,
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        n as isize
    })
}

/// Runs a write-like call (returning bytes written, or -1 with errno), retrying EINTR and
/// EAGAIN up to [`MAX_RETRIES`] times: Ok(n) with n > 0; a zero-byte write is `WriteZero`.
fn write_call(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    let mut retries = 0;
    loop {
        let n = call();
        if n > 0 {
            return Ok(n as usize);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let err = io::Error::last_os_error();
        if transient(&err) && retries < MAX_RETRIES {
            retries += 1;
            continue;
        }
        return Err(err);
    }
}

fn fdatasync(ctx: &FileCtx) -> io::Result<()> {
    for _ in 0..MAX_RETRIES {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::fdatasync(ctx.file.as_raw_fd()) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if !transient(&err) {
            return Err(err);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINTR))
}

/// Trim is advisory: an unsupported discard is success.
pub(crate) fn trim(ctx: &FileCtx, offset: u64, len: u64) -> io::Result<()> {
    let result = if ctx.blockdev {
        let (start, len) = ctx.aligned_interior(offset, len);
        if len == 0 {
            return Ok(());
        }
        blockdev::discard(&ctx.file, start, len)
    } else {
        blockdev::fallocate(&ctx.file, ZeroStep::Punch.fallocate_mode(), offset, len)
    };
    match result {
        Err(err) if unsupported(&err) => Ok(()),
        other => other,
    }
}

/// Whether an error means "this call is not supported here".
pub(crate) fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

fn zero(ctx: &FileCtx, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
    let mut step = ctx.zero_step(offset, len, may_trim, None);
    loop {
        if step == ZeroStep::Write {
            return write_zeroes(ctx, offset, len);
        }
        match blockdev::fallocate(&ctx.file, step.fallocate_mode(), offset, len) {
            Err(err) if unsupported(&err) => {
                ctx.note_unsupported(step);
                step = ctx.zero_step(offset, len, may_trim, Some(step));
            }
            other => return other,
        }
    }
}

/// Writes zeroes over `[offset, offset + len)` from the shared zero buffer.
fn write_zeroes(ctx: &FileCtx, offset: u64, len: u64) -> io::Result<()> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = (end - pos).min(ZERO_CHUNK as u64) as usize;
        write_at(ctx, ctx.zeroes.as_ptr(), chunk, pos, false)?;
        pos += chunk as u64;
    }
    Ok(())
}
