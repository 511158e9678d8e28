//! The disk engine: asynchronous reads, writes, flushes, trims and write-zeroes on a regular
//! file or block device, with completions delivered by callback.
//!
//! Two backends: io_uring (one ring on its own thread; see `uring.rs`) and a pread/pwrite
//! thread pool (`threads.rs`) used when io_uring is unavailable or asked for.
//!
//! Completions normally run on an engine thread. Requests rejected up front (out of range,
//! misaligned for O_DIRECT), empty requests, and requests after [`Disk::shutdown`] complete
//! synchronously inside [`Disk::submit`], on the caller's thread.
//!
//! [`Disk::run_inline`] is the fast path for page-cache I/O: a buffered read that hits the
//! cache, or a buffered write (a copy into the cache), runs on the caller's thread at once,
//! with no thread hand-off in either direction. Everything that may wait for the device
//! (O_DIRECT, FUA, flush, cache misses, discard) goes through [`Disk::submit`].

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::blockdev::{self, Kind};
use super::job::{self, FileCtx, Job, ReadBuf, WriteBuf, ZERO_CHUNK};
use super::sync_io;
use super::threads::{self, ThreadsEngine};
use super::uring::UringEngine;

/// Which backend runs the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring; falls back to [`EngineKind::Threads`] if the kernel refuses it.
    #[default]
    Uring,
    /// A pool of threads doing blocking pread/pwrite.
    Threads,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Threads => "threads",
        })
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<EngineKind, String> {
        match s {
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "threads" => Ok(EngineKind::Threads),
            other => Err(format!(
                "unknown disk engine {other:?} (expected \"uring\" or \"threads\")"
            )),
        }
    }
}

/// How to open the backing store.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub engine: EngineKind,
    /// Open with O_DIRECT (bypass the page cache). Offsets and lengths of reads, writes and
    /// write-zeroes must then be multiples of [`Disk::logical_block_size`].
    pub direct_io: bool,
}

/// One disk operation.
#[derive(Debug, Clone)]
pub enum DiskOp {
    Read {
        offset: u64,
        len: u32,
    },
    /// `fua`: the data is durable when the operation completes.
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// Makes completed writes durable (fdatasync).
    Flush,
    /// Advisory discard: succeeds where unsupported; contents afterwards are unspecified
    /// (zeros on files).
    Trim {
        offset: u64,
        len: u64,
    },
    /// The range reads as zeros afterwards. `may_trim`: the space may be deallocated.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
}

/// The result of a successful operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOutput {
    Done,
    /// The bytes of a read.
    Data(Bytes),
}

/// A buffer for a large write payload that the caller fills (e.g. straight from a socket) and
/// then turns into [`Bytes`] without a copy. Page-aligned, so O_DIRECT needs no bounce copy,
/// and recycled when the last reference drops, so large buffers are not faulted in afresh
/// for every request. The initial contents are unspecified (but initialised).
pub struct IoBuf(AlignedBuf);

impl IoBuf {
    pub fn new(len: usize) -> IoBuf {
        IoBuf(AlignedBuf::scratch(len))
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self.0)
    }
}

/// Called exactly once per submitted operation.
pub type Completion = Box<dyn FnOnce(io::Result<DiskOutput>) + Send + 'static>;

/// One run of [`Disk::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// Why [`Disk::open`] failed.
#[derive(Debug)]
pub enum DiskError {
    /// open(2) failed.
    Open { path: PathBuf, source: io::Error },
    /// Reading the size or properties of the opened file failed.
    Inspect { path: PathBuf, source: io::Error },
    /// Neither a regular file nor a block device.
    NotFileOrDevice { path: PathBuf },
    /// The device is smaller than the requested data area.
    TooSmall {
        path: PathBuf,
        device_size: u64,
        data_len: u64,
    },
    /// With O_DIRECT the data area must be a whole number of blocks.
    Unaligned {
        path: PathBuf,
        data_len: u64,
        block: u32,
    },
    /// Starting the engine threads failed.
    Engine { path: PathBuf, source: io::Error },
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Open { path, source } => {
                write!(f, "cannot open {}: {source}", path.display())
            }
            DiskError::Inspect { path, source } => {
                write!(f, "cannot inspect {}: {source}", path.display())
            }
            DiskError::NotFileOrDevice { path } => {
                write!(
                    f,
                    "{} is neither a regular file nor a block device",
                    path.display()
                )
            }
            DiskError::TooSmall {
                path,
                device_size,
                data_len,
            } => write!(
                f,
                "{} is too small: {device_size} bytes, need {data_len}",
                path.display()
            ),
            DiskError::Unaligned {
                path,
                data_len,
                block,
            } => write!(
                f,
                "{}: data area of {data_len} bytes is not a multiple of the {block}-byte \
                 O_DIRECT block",
                path.display()
            ),
            DiskError::Engine { path, source } => {
                write!(
                    f,
                    "cannot start the disk engine for {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiskError::Open { source, .. }
            | DiskError::Inspect { source, .. }
            | DiskError::Engine { source, .. } => Some(source),
            _ => None,
        }
    }
}

enum Backend {
    Uring(UringEngine),
    Threads(ThreadsEngine),
}

struct Inner {
    ctx: Arc<FileCtx>,
    size: u64,
    backend: Backend,
    path: PathBuf,
    /// Set by [`Disk::shutdown`]: nothing more runs inline.
    shut: AtomicBool,
    /// Inline writes are paused until this many ms after `born` (see [`Disk::run_inline`]).
    inline_writes_paused_until: AtomicU64,
    born: Instant,
}

/// Buffered writes up to this size may run inline (larger ones overlap better on the pool).
const INLINE_WRITE_MAX: usize = 256 * 1024;
/// An inline write slower than this means the page cache is throttling writers (dirty limit)
/// or the write waits for the device: inline writes pause for [`INLINE_PAUSE`], so callers'
/// threads are not held up meanwhile. (Well above what a busy machine's scheduler delays.)
const INLINE_SLOW: Duration = Duration::from_millis(50);
const INLINE_PAUSE: Duration = Duration::from_millis(1000);

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        match &self.backend {
            Backend::Uring(engine) => engine.shutdown(),
            Backend::Threads(engine) => engine.shutdown(),
        }
    }
}

/// An open backing store with its engine. Cheap to clone; the engine shuts down when the
/// last clone is dropped (or at [`Disk::shutdown`]).
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("engine", &self.engine())
            .finish()
    }
}

impl Disk {
    /// Opens a regular file or block device read-write. `data_len`: the size of the data area
    /// the engine serves (internal metadata lives after it); None = the whole device.
    pub fn open(path: &Path, data_len: Option<u64>, opts: &DiskOptions) -> Result<Disk, DiskError> {
        let mut flags = libc::O_CLOEXEC;
        if opts.direct_io {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let inspect = |source| DiskError::Inspect {
            path: path.to_owned(),
            source,
        };
        let (kind, rdev) = blockdev::kind(&file).map_err(inspect)?;
        if kind == Kind::Other {
            return Err(DiskError::NotFileOrDevice {
                path: path.to_owned(),
            });
        }
        let blockdev = kind == Kind::BlockDevice;
        let device_size = blockdev::size(&file, kind).map_err(inspect)?;
        let size = data_len.unwrap_or(device_size);
        if size > device_size {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
                device_size,
                data_len: size,
            });
        }
        let block = block_size(&file, blockdev, opts.direct_io).map_err(inspect)?;
        if opts.direct_io && size % u64::from(block) != 0 {
            return Err(DiskError::Unaligned {
                path: path.to_owned(),
                data_len: size,
                block,
            });
        }
        let fast_zero = if blockdev {
            blockdev::has_write_zeroes(rdev)
        } else {
            blockdev::fs_has_cheap_zero_range(&file)
        };
        let async_buffered_writes = !blockdev && blockdev::fs_has_async_buffered_writes(&file);
        let ctx = Arc::new(FileCtx {
            file,
            blockdev,
            direct: opts.direct_io,
            async_buffered_writes,
            block,
            punch_ok: AtomicBool::new(true),
            zero_range_ok: AtomicBool::new(true),
            fast_zero: AtomicBool::new(fast_zero),
            zeroes: AlignedBuf::zeroed(ZERO_CHUNK),
        });
        let backend =
            start_backend(&ctx, opts.engine, path).map_err(|source| DiskError::Engine {
                path: path.to_owned(),
                source,
            })?;
        Ok(Disk {
            inner: Arc::new(Inner {
                ctx,
                size,
                backend,
                path: path.to_owned(),
                shut: AtomicBool::new(false),
                inline_writes_paused_until: AtomicU64::new(0),
                born: Instant::now(),
            }),
        })
    }

    /// Size in bytes of a regular file or block device.
    pub fn device_size(path: &Path) -> io::Result<u64> {
        let file = File::open(path)?;
        let (kind, _) = blockdev::kind(&file)?;
        blockdev::size(&file, kind)
    }

    /// Size of the data area.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The backend actually running (after any fallback).
    pub fn engine(&self) -> EngineKind {
        match self.inner.backend {
            Backend::Uring(_) => EngineKind::Uring,
            Backend::Threads(_) => EngineKind::Threads,
        }
    }

    /// Smallest offset/length granularity: the device's logical block size, the O_DIRECT
    /// alignment of a file, or 512 for a buffered file.
    pub fn logical_block_size(&self) -> u32 {
        self.inner.ctx.block
    }

    /// Whether write-zeroes is a cheap metadata operation here (for NBD_CMD_FLAG_FAST_ZERO).
    pub fn fast_zero(&self) -> bool {
        self.inner.ctx.fast_zero.load(Ordering::Relaxed)
    }

    /// Starts an operation; `done` is called exactly once with its result. Never blocks on I/O.
    /// Out-of-range requests fail with EINVAL (ENOSPC for writes and write-zeroes, as the NBD
    /// protocol asks); with O_DIRECT, misaligned reads/writes/write-zeroes fail with EINVAL.
    pub fn submit(&self, op: DiskOp, done: Completion) {
        match self.prepare(op) {
            Ok(Prepared::Job(job)) => match &self.inner.backend {
                Backend::Uring(engine) => engine.submit(job, done),
                Backend::Threads(engine) => engine.submit(job, done),
            },
            Ok(Prepared::Ready(output)) => job::complete(done, Ok(output)),
            Err(err) => job::complete(done, Err(err)),
        }
    }

    /// Runs `op` on the calling thread if that cannot wait for the device: a buffered read
    /// whose data is all in the page cache (`preadv2(RWF_NOWAIT)`), or a buffered, non-FUA
    /// write of at most 256 KiB (a copy into the page cache; it can still be throttled when
    /// too much is dirty, so after one slow write inline writes pause for a second). Requests
    /// rejected up front complete here too. Otherwise hands `op` back unchanged, for
    /// [`Disk::submit`]. Never used with O_DIRECT, where every request reaches the device.
    pub fn run_inline(&self, op: DiskOp) -> Result<io::Result<DiskOutput>, DiskOp> {
        self.run_inline_up_to(op, INLINE_WRITE_MAX)
    }

    /// [`Disk::run_inline`] with buffered writes of up to `write_max` bytes taken inline (at
    /// least 256 KiB): for a caller with nothing else to do meanwhile, such as the peer link's
    /// reader, for which handing a large write to a disk thread costs a wake-up and gains
    /// nothing (the peer's next frames wait in the socket either way).
    pub fn run_inline_up_to(
        &self,
        op: DiskOp,
        write_max: usize,
    ) -> Result<io::Result<DiskOutput>, DiskOp> {
        assert!(write_max >= INLINE_WRITE_MAX);
        let inner = &self.inner;
        let ctx = &inner.ctx;
        if ctx.direct || inner.shut.load(Ordering::Acquire) {
            return Err(op);
        }
        let inline_read = matches!(op, DiskOp::Read { .. });
        let inline_write = match &op {
            DiskOp::Write { data, fua, .. } => {
                !*fua && data.len() <= write_max && !self.inline_writes_paused()
            }
            _ => false,
        };
        if !inline_read && !inline_write {
            return Err(op);
        }
        let retry = op.clone();
        match self.prepare(op) {
            Err(err) => Ok(Err(err)),
            Ok(Prepared::Ready(output)) => Ok(Ok(output)),
            Ok(Prepared::Job(Job::Read { offset, mut buf })) => {
                match sync_io::read_nowait(ctx, &mut buf, offset) {
                    // SAFETY: read_nowait returned true: every byte of the buffer was read.
                    Ok(true) => Ok(Ok(DiskOutput::Data(unsafe { buf.into_filled_bytes() }))),
                    // Not (all) cached, or the kernel cannot say without waiting.
                    Ok(false) | Err(_) => Err(retry),
                }
            }
            Ok(Prepared::Job(job @ Job::Write { .. })) => {
                let started = Instant::now();
                let result = sync_io::execute(ctx, &AtomicBool::new(false), job);
                self.note_inline_write(started.elapsed());
                Ok(result)
            }
            Ok(Prepared::Job(_)) => Err(retry),
        }
    }

    /// Whether a write may go into the page cache on the caller's thread now, through
    /// [`Disk::write_now`] and [`Disk::write_from_pipe`]: buffered I/O, not shut down, and
    /// inline writes not paused (see [`Disk::run_inline`]).
    pub fn caller_writes_ok(&self) -> bool {
        !self.inner.ctx.direct
            && !self.inner.shut.load(Ordering::Acquire)
            && !self.inline_writes_paused()
    }

    /// Writes `data` at `offset` on the caller's thread (a buffered write). For a write the
    /// core admitted; [`Disk::caller_writes_ok`] should hold. Past the end: ENOSPC.
    pub fn write_now(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.caller_write(offset, data.len(), || {
            sync_io::write_slice(&self.inner.ctx, data, offset)
        })
    }

    /// Moves up to `len` bytes from the pipe `pipe`, which holds at least that many, into the
    /// data area at `offset` on the caller's thread (splice(2): a copy from the pipe's pages
    /// into the page cache, never through our memory). Returns how many moved (at least one).
    /// For a write the core admitted; [`Disk::caller_writes_ok`] should hold. Past the end:
    /// ENOSPC.
    pub fn write_from_pipe(
        &self,
        pipe: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        self.caller_write(offset, len, || {
            sync_io::splice_in(&self.inner.ctx, pipe.as_raw_fd(), offset, len)
        })
    }

    /// Runs a caller-thread write of `len` bytes at `offset`: checks the range, and pauses
    /// inline writes after a slow one, as [`Disk::run_inline`] does.
    fn caller_write<R>(
        &self,
        offset: u64,
        len: usize,
        write: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        let inner = &self.inner;
        if inner.ctx.direct {
            return Err(blockdev::einval());
        }
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|e| e <= inner.size);
        if !fits {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let started = Instant::now();
        let result = write();
        self.note_inline_write(started.elapsed());
        result
    }

    /// After an inline write slower than [`INLINE_SLOW`], inline writes pause.
    fn note_inline_write(&self, took: Duration) {
        if took > INLINE_SLOW {
            let until = self.inner.born.elapsed() + INLINE_PAUSE;
            self.inner
                .inline_writes_paused_until
                .store(until.as_millis() as u64, Ordering::Relaxed);
            tracing::debug!(
                "inline write took {took:?}: page cache throttled; writes go to the \
                 disk threads for {INLINE_PAUSE:?}"
            );
        }
    }

    fn inline_writes_paused(&self) -> bool {
        let until = self
            .inner
            .inline_writes_paused_until
            .load(Ordering::Relaxed);
        until != 0 && (self.inner.born.elapsed().as_millis() as u64) < until
    }

    /// [`Disk::submit`] as a future.
    pub async fn run(&self, op: DiskOp) -> io::Result<DiskOutput> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            op,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.unwrap_or_else(|_| {
            Err(io::Error::other(
                "disk operation dropped without completion",
            ))
        })
    }

    /// Allocation status of `[offset, offset + len)`, as consecutive extents covering exactly
    /// that range, or its front when it has more than [`MAX_FILE_EXTENTS`]. Files:
    /// SEEK_DATA/SEEK_HOLE (holes read as zeros). Block devices: one data extent. Blocks
    /// briefly in lseek.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.inner.size)
            .ok_or_else(blockdev::einval)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.inner.ctx.blockdev {
            return Ok(vec![data_extent(len)]);
        }
        file_extents(&self.inner.ctx.file, offset, end)
    }

    /// Completes everything queued and in flight, stops and joins the engine threads.
    /// Idempotent. Operations submitted afterwards fail with ESHUTDOWN.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Validates an operation and prepares its buffers.
    fn prepare(&self, op: DiskOp) -> io::Result<Prepared> {
        let ctx = &self.inner.ctx;
        let size = self.inner.size;
        let block = u64::from(ctx.block);
        let in_range = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
        let aligned =
            |offset: u64, len: u64| !ctx.direct || (offset % block == 0 && len % block == 0);
        let einval = blockdev::einval;
        let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
        match op {
            DiskOp::Read { offset, len } => {
                let len64 = u64::from(len);
                if !in_range(offset, len64) || !aligned(offset, len64) {
                    return Err(einval());
                }
                if len == 0 {
                    return Ok(Prepared::Ready(DiskOutput::Data(Bytes::new())));
                }
                let buf = ReadBuf::new(len as usize, ctx.direct);
                Ok(Prepared::Job(Job::Read { offset, buf }))
            }
            DiskOp::Write { offset, data, fua } => {
                let len64 = data.len() as u64;
                if u32::try_from(data.len()).is_err() || !aligned(offset, len64) {
                    return Err(einval());
                }
                if !in_range(offset, len64) {
                    return Err(enospc());
                }
                if data.is_empty() {
                    return Ok(Prepared::Ready(DiskOutput::Done));
                }
                let buf = WriteBuf::new(data, ctx.direct);
                Ok(Prepared::Job(Job::Write { offset, buf, fua }))
            }
            DiskOp::Flush => Ok(Prepared::Job(Job::Flush)),
            DiskOp::Trim { offset, len } => {
                if !in_range(offset, len) {
                    return Err(einval());
                }
                Ok(job_unless_empty(len, Job::Trim { offset, len }))
            }
            DiskOp::WriteZeroes {
                offset,
                len,
                may_trim,
            } => {
                if !aligned(offset, len) {
                    return Err(einval());
                }
                if !in_range(offset, len) {
                    return Err(enospc());
                }
                Ok(job_unless_empty(
                    len,
                    Job::Zero {
                        offset,
                        len,
                        may_trim,
                    },
                ))
            }
        }
    }
}

/// A validated operation: work for the engine, or an answer needing no I/O.
enum Prepared {
    Job(Job),
    Ready(DiskOutput),
}

fn job_unless_empty(len: u64, job: Job) -> Prepared {
    if len == 0 {
        Prepared::Ready(DiskOutput::Done)
    } else {
        Prepared::Job(job)
    }
}

fn start_backend(ctx: &Arc<FileCtx>, kind: EngineKind, path: &Path) -> io::Result<Backend> {
    if kind == EngineKind::Uring {
        match UringEngine::start(Arc::clone(ctx)) {
            Ok(engine) => return Ok(Backend::Uring(engine)),
            Err(err) => tracing::warn!(
                "io_uring unavailable for {} ({err}); using the thread-pool disk engine",
                path.display()
            ),
        }
    }
    let engine = ThreadsEngine::start(Arc::clone(ctx), threads::WORKERS, "disk-io")?;
    Ok(Backend::Threads(engine))
}

/// The offset/length granularity of the store.
fn block_size(file: &File, blockdev: bool, direct: bool) -> io::Result<u32> {
    if blockdev {
        return blockdev::logical_block_size(file);
    }
    if !direct {
        return Ok(512);
    }
    // Without STATX_DIOALIGN (Linux < 6.1) assume a page, which every file system accepts.
    let align = blockdev::dio_offset_align(file).unwrap_or(4096);
    Ok(align.max(512))
}

fn data_extent(len: u64) -> Extent {
    Extent {
        len,
        hole: false,
        zero: false,
    }
}

fn hole_extent(len: u64) -> Extent {
    Extent {
        len,
        hole: true,
        zero: true,
    }
}

/// lseek(whence) from `pos`; Ok(None) on ENXIO (no data/hole at or after `pos`).
fn seek(file: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(pos).map_err(|_| blockdev::einval())?;
    // SAFETY: plain syscall on a valid fd. We never use the shared file position.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(err)
}

/// Data and hole extents of a regular file over `[offset, end)`.
/// Most extents [`Engine::block_status`] returns for a file: with more, the
/// answer covers only the front of the range (NBD lets a BLOCK_STATUS reply
/// describe less than was asked), so one request costs at most about twice
/// as many `lseek` calls.
pub const MAX_FILE_EXTENTS: usize = 1024;

fn file_extents(file: &File, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut extents: Vec<Extent> = Vec::new();
    let push = |extents: &mut Vec<Extent>, extent: Extent| match extents.last_mut() {
        Some(last) if last.hole == extent.hole => last.len += extent.len,
        _ => extents.push(extent),
    };
    let mut pos = offset;
    // Each round covers at least one byte, so this terminates; the bound is belt and braces.
    for _ in 0..1_000_000 {
        if pos >= end || extents.len() > MAX_FILE_EXTENTS {
            break;
        }
        let data_start = match seek(file, pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d.min(end),
            Ok(None) => end,
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && pos == offset => {
                // The file system cannot tell: report all data.
                return Ok(vec![data_extent(end - offset)]);
            }
            Err(err) => return Err(err),
        };
        if data_start > pos {
            push(&mut extents, hole_extent(data_start - pos));
            pos = data_start;
            continue;
        }
        let hole_start = seek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let hole_start = hole_start.max(pos + 1);
        push(&mut extents, data_extent(hole_start - pos));
        pos = hole_start;
    }
    if extents.len() > MAX_FILE_EXTENTS {
        // Capped: the last extent may still grow, so it is not reported.
        extents.truncate(MAX_FILE_EXTENTS);
    } else if pos < end {
        push(&mut extents, data_extent(end - pos));
    }
    debug_assert!(!extents.is_empty() && extents.len() <= MAX_FILE_EXTENTS);
    debug_assert!(extents.iter().map(|e| e.len).sum::<u64>() <= end - offset);
    Ok(extents)
}

#[cfg(test)]
mod tests;
