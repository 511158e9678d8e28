//! io_uring backend: one ring, owned by one engine thread that is its only submitter.
//!
//! Submitting threads append to a mutex-protected queue; the engine thread moves queued jobs
//! into the submission ring in batches, submits and waits with a single `io_uring_enter`, and
//! runs completion callbacks.
//!
//! Waking the engine. The engine announces in `state` where it is about to sleep:
//! - `RING`: operations are in flight, so it blocks in `io_uring_enter(GETEVENTS,
//!   min_complete = 1)`. A read of an eventfd is kept armed in the ring; a submitter writes
//!   the eventfd, the read completes, and the wait ends at once.
//! - `IDLE`: nothing is in flight, so it parks on a futex (`thread::park`); a submitter
//!   unparks it. This is the QD1 path, and a futex wake is cheaper than an eventfd wake
//!   (which goes through poll and task work in the ring).
//!
//! A submitter that swaps the state to `RUNNING` owns the wake-up; while the engine is busy a
//! submit is a queue push and one atomic load, no syscall. The alternatives are worse: an
//! enter timeout trades latency for idle CPU, SQPOLL burns a core (we have two), and
//! futex-waiting inside io_uring needs Linux 6.7.
//!
//! The ring is set up with SINGLE_ISSUER|DEFER_TASKRUN when the kernel has it (6.1+), so
//! completion work runs in our own `io_uring_enter` instead of interrupting other threads.
//!
//! A few kinds of job go to a small blocking thread pool instead (see `goes_to_pool`): block
//! device discard, buffered writes on file systems without async buffered writes (ext4), and
//! large buffered reads.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle, Thread, ThreadId};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, CompletionQueue, IoUring, Probe, SubmissionQueue};

use super::engine::DiskOutput;
use super::job::{self, Done, FileCtx, Job, ZeroStep, MAX_RETRIES, ZERO_CHUNK};
use super::sync_io;
use super::threads::ThreadsEngine;

/// Threads of the blocking pool (see `goes_to_pool`). Few: on ext4, buffered writes to one
/// file serialise on the inode lock anyway, and large copies saturate the cores with a few.
const POOL_WORKERS: usize = 4;
/// Buffered reads at least this large go to the pool (see `goes_to_pool`).
const POOL_READ_MIN: usize = 128 * 1024;

/// Submission ring size; one entry is kept for the eventfd read.
const SQ_ENTRIES: u32 = 256;
/// Completion ring size: twice the submissions, so completions never overflow.
const CQ_ENTRIES: u32 = 2 * SQ_ENTRIES;
/// Data operations in flight at once; more wait in the engine's pending queue.
const MAX_IN_FLIGHT: usize = SQ_ENTRIES as usize - 1;

const EVENTFD_TOKEN: u64 = u64::MAX;
const CANCEL_TOKEN: u64 = u64::MAX - 1;

/// Consecutive failed `io_uring_enter` calls (about 1 ms apart) before the engine gives up.
const MAX_ENTER_ERRORS: u32 = 5000;

struct Queue {
    jobs: VecDeque<(Job, Done)>,
    closed: bool,
}

/// Engine states (see the module comment).
const RUNNING: u8 = 0;
const RING: u8 = 1;
const IDLE: u8 = 2;

struct Shared {
    queue: Mutex<Queue>,
    /// RUNNING, RING or IDLE: where the engine may be sleeping.
    state: AtomicU8,
    eventfd: OwnedFd,
    /// The engine thread, for unpark.
    engine: OnceLock<Thread>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the engine if it announced it may sleep. Called after pushing to the queue: the
    /// mutex orders our load after the engine's announcement if the engine looked at the queue
    /// before our push; if it looked after, it has our job anyway.
    fn notify(&self) {
        if self.state.load(Ordering::Relaxed) == RUNNING {
            return;
        }
        match self.state.swap(RUNNING, Ordering::AcqRel) {
            RING => self.write_eventfd(),
            IDLE => self.unpark(),
            _ => {}
        }
    }

    fn unpark(&self) {
        if let Some(engine) = self.engine.get() {
            engine.unpark();
        }
    }

    fn write_eventfd(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. It cannot block: the engine
        // resets the counter with every read, far below the overflow limit.
        let rc = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        debug_assert_eq!(rc, 8);
    }
}

pub(crate) struct UringEngine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
    /// Blocking helpers for what the ring does badly (see `goes_to_pool`); None with O_DIRECT
    /// on a regular file, where the ring does everything.
    pool: Option<ThreadsEngine>,
    ctx: Arc<FileCtx>,
}

/// Whether a job runs on the blocking pool instead of the ring:
/// - block-device discard: an ioctl, which io_uring cannot issue;
/// - buffered writes, unless the file system does them asynchronously (XFS, btrfs): io_uring
///   would punt them to its io-wq, where writes to one file are serialised behind one worker,
///   after a failed non-blocking attempt; the pool measured faster;
/// - large buffered reads: a page-cache hit is copied inline by the thread that submits, so
///   the engine thread would copy every MiB alone; the pool copies on every core.
fn goes_to_pool(ctx: &FileCtx, job: &Job) -> bool {
    match job {
        Job::Trim { .. } => ctx.blockdev,
        Job::Write { .. } => !ctx.direct && !ctx.async_buffered_writes,
        Job::Read { buf, .. } => !ctx.direct && buf.len() >= POOL_READ_MIN,
        _ => false,
    }
}

impl UringEngine {
    /// Sets up the ring on a new engine thread. Fails if io_uring is unavailable or lacks an
    /// opcode we need; the caller then falls back to the thread pool.
    pub(crate) fn start(ctx: Arc<FileCtx>) -> io::Result<UringEngine> {
        #[cfg(test)]
        if FAIL_SETUP.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: plain syscall; we take ownership of the returned fd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::with_capacity(256),
                closed: false,
            }),
            state: AtomicU8::new(RUNNING),
            eventfd,
            engine: OnceLock::new(),
        });

        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let thread_shared = Arc::clone(&shared);
        let thread_ctx = Arc::clone(&ctx);
        let handle = thread::Builder::new()
            .name("disk-uring".into())
            .spawn(move || {
                let _ = thread_shared.engine.set(thread::current());
                // The ring is created on this thread: SINGLE_ISSUER binds it to its creator.
                match setup(&thread_ctx) {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        Engine::new(thread_ctx, thread_shared).run(ring);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            })?;
        let thread_id = handle.thread().id();
        let setup_result = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("io_uring engine thread died")));
        if let Err(err) = setup_result {
            let _ = handle.join();
            return Err(err);
        }
        let engine = UringEngine {
            shared,
            thread: Mutex::new(Some(handle)),
            thread_id,
            pool: None,
            ctx: Arc::clone(&ctx),
        };
        if !ctx.blockdev && ctx.direct {
            return Ok(engine);
        }
        match ThreadsEngine::start(ctx, POOL_WORKERS, "disk-pool") {
            Ok(pool) => Ok(UringEngine {
                pool: Some(pool),
                ..engine
            }),
            Err(err) => {
                engine.shutdown();
                Err(err)
            }
        }
    }

    pub(crate) fn submit(&self, job: Job, done: Done) {
        if let Some(pool) = &self.pool {
            if goes_to_pool(&self.ctx, &job) {
                pool.submit(job, done);
                return;
            }
        }
        let mut queue = self.shared.lock();
        if queue.closed {
            drop(queue);
            job::complete(done, Err(job::shut_down()));
            return;
        }
        queue.jobs.push_back((job, done));
        drop(queue);
        self.shared.notify();
    }

    /// Completes everything queued and in flight, then joins the engine thread. Idempotent.
    pub(crate) fn shutdown(&self) {
        self.shared.lock().closed = true;
        // Wherever the engine sleeps, wake it.
        self.shared.write_eventfd();
        self.shared.unpark();
        if thread::current().id() != self.thread_id {
            let handle = self
                .thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(handle) = handle {
                if handle.join().is_err() {
                    tracing::error!("io_uring engine thread panicked");
                }
            }
        }
        if let Some(pool) = &self.pool {
            pool.shutdown();
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests set this to make `UringEngine::start` fail on this thread, as a kernel that
    /// refuses io_uring would.
    pub(crate) static FAIL_SETUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Creates the ring, checks the opcodes we use, registers the file.
fn setup(ctx: &FileCtx) -> io::Result<IoUring> {
    let ring = build_ring()?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        ("read", opcode::Read::CODE),
        ("write", opcode::Write::CODE),
        ("fsync", opcode::Fsync::CODE),
        ("fallocate", opcode::Fallocate::CODE),
        ("async_cancel", opcode::AsyncCancel::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
            ));
        }
    }
    ring.submitter().register_files(&[ctx.file.as_raw_fd()])?;
    Ok(ring)
}

/// Best ring flags first; older kernels reject the newer flags with EINVAL.
fn build_ring() -> io::Result<IoUring> {
    let best = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES);
    if let Ok(ring) = best {
        return Ok(ring);
    }
    let coop = IoUring::builder()
        .setup_coop_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES);
    if let Ok(ring) = coop {
        return Ok(ring);
    }
    IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)
}

/// One operation the kernel is working on.
struct Slot {
    job: Job,
    done: Done,
    /// Bytes finished so far (reads, writes, zero writes); the rest is resubmitted.
    progress: u64,
    /// Current zeroing method (Job::Zero only).
    step: ZeroStep,
    retries: u32,
}

/// What to do with a slot after a completion.
enum Next {
    Resubmit,
    Finish(io::Result<DiskOutput>),
}

/// State owned by the engine thread.
struct Engine {
    ctx: Arc<FileCtx>,
    shared: Arc<Shared>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    pending: VecDeque<(Job, Done)>,
    /// SQEs that did not fit in the ring (should not happen; kept for robustness).
    overflow: Vec<squeue::Entry>,
    cqes: Vec<(u64, i32)>,
    closed: bool,
    eventfd_armed: bool,
    /// Target of the armed eventfd read. Boxed so its address is stable; the read is
    /// cancelled and reaped before the engine exits.
    eventfd_buf: Box<u64>,
}

impl Engine {
    fn new(ctx: Arc<FileCtx>, shared: Arc<Shared>) -> Engine {
        Engine {
            ctx,
            shared,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT as u32).rev().collect(),
            pending: VecDeque::with_capacity(256),
            overflow: Vec::new(),
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            closed: false,
            eventfd_armed: false,
            eventfd_buf: Box::new(0),
        }
    }

    fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    fn run(mut self, mut ring: IoUring) {
        let (mut submitter, mut sq, mut cq) = ring.split();
        // Saves a file lookup per io_uring_enter (5.18+); harmless if unsupported.
        let _ = submitter.register_ring_fd();
        let mut enter_errors = 0u32;
        loop {
            self.shared.state.store(RING, Ordering::SeqCst);
            self.take_queue();
            self.flush_overflow(&mut sq);
            self.start_pending(&mut sq);
            if self.closed && self.pending.is_empty() && self.in_flight() == 0 {
                self.shared.state.store(RUNNING, Ordering::Relaxed);
                break;
            }
            if !self.eventfd_armed {
                self.arm_eventfd(&mut sq);
            }
            sq.sync();
            if self.in_flight() == 0 && self.overflow.is_empty() {
                // Nothing for the kernel to finish: park on the futex instead (after handing
                // over a re-armed eventfd read, if any).
                if !sq.is_empty() {
                    let _ = submitter.submit();
                }
                self.park();
                continue;
            }
            match submitter.submit_and_wait(1) {
                Ok(_) => enter_errors = 0,
                Err(err) if is_busy(&err) => {}
                Err(err) => {
                    enter_errors += 1;
                    if enter_errors == 1 {
                        tracing::error!("io_uring_enter failed: {err}");
                    }
                    if enter_errors >= MAX_ENTER_ERRORS {
                        self.shared.state.store(RUNNING, Ordering::Relaxed);
                        self.abandon(err);
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
            self.shared.state.store(RUNNING, Ordering::Relaxed);
            // Learn how far the kernel consumed the submission ring, so pushes see the space.
            sq.sync();
            cq.sync();
            self.cqes.clear();
            self.cqes
                .extend((&mut cq).map(|cqe: cqueue::Entry| (cqe.user_data(), cqe.result())));
            for i in 0..self.cqes.len() {
                let (token, result) = self.cqes[i];
                self.on_completion(&mut sq, token, result);
            }
        }
        self.disarm_eventfd(&submitter, &mut sq, &mut cq);
    }

    /// Sleeps until a submitter (or shutdown) unparks us, unless work arrived meanwhile.
    fn park(&mut self) {
        self.shared.state.store(IDLE, Ordering::SeqCst);
        let has_work = {
            let queue = self.shared.lock();
            !queue.jobs.is_empty() || queue.closed
        };
        if !has_work {
            // Spurious returns are fine: the loop re-checks everything.
            thread::park();
        }
        self.shared.state.store(RUNNING, Ordering::Relaxed);
    }

    /// Moves everything queued by submitters into our pending queue.
    fn take_queue(&mut self) {
        let mut queue = self.shared.lock();
        if self.pending.is_empty() {
            std::mem::swap(&mut self.pending, &mut queue.jobs);
        } else {
            self.pending.extend(queue.jobs.drain(..));
        }
        self.closed = queue.closed;
    }

    /// Gives pending jobs free slots and queues their first SQE.
    fn start_pending(&mut self, sq: &mut SubmissionQueue<'_>) {
        while !self.free.is_empty() {
            let Some((job, done)) = self.pending.pop_front() else {
                break;
            };
            let step = match &job {
                Job::Zero {
                    offset,
                    len,
                    may_trim,
                } => self.ctx.zero_step(*offset, *len, *may_trim, None),
                _ => ZeroStep::Write,
            };
            let Some(idx) = self.free.pop() else { break };
            let slot = self.slots[idx as usize].insert(Slot {
                job,
                done,
                progress: 0,
                step,
                retries: 0,
            });
            let entry = sqe(&self.ctx, slot, idx);
            self.push(sq, entry);
        }
    }

    fn push(&mut self, sq: &mut SubmissionQueue<'_>, entry: squeue::Entry) {
        // SAFETY: every buffer an SQE points at lives in a slot (or the Arc'd FileCtx, or
        // eventfd_buf) until its completion has been reaped.
        if unsafe { sq.push(&entry) }.is_err() {
            debug_assert!(false, "submission ring full");
            self.overflow.push(entry);
        }
    }

    fn flush_overflow(&mut self, sq: &mut SubmissionQueue<'_>) {
        while let Some(entry) = self.overflow.pop() {
            // SAFETY: as in `push`.
            if unsafe { sq.push(&entry) }.is_err() {
                self.overflow.push(entry);
                return;
            }
        }
    }

    fn arm_eventfd(&mut self, sq: &mut SubmissionQueue<'_>) {
        let buf: *mut u64 = &mut *self.eventfd_buf;
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            buf.cast::<u8>(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        self.push(sq, entry);
        self.eventfd_armed = true;
    }

    fn on_completion(&mut self, sq: &mut SubmissionQueue<'_>, token: u64, result: i32) {
        if token == EVENTFD_TOKEN {
            self.eventfd_armed = false;
            if result < 0 && result != -libc::ECANCELED {
                tracing::warn!("eventfd read failed: {}", job::errno(result));
            }
            return;
        }
        if token == CANCEL_TOKEN {
            return;
        }
        let idx = token as usize;
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            debug_assert!(false, "completion for unknown slot {token}");
            return;
        };
        match next_step(&self.ctx, slot, result) {
            Next::Resubmit => {
                let entry = sqe(&self.ctx, slot, idx as u32);
                self.push(sq, entry);
            }
            Next::Finish(outcome) => {
                let Some(slot) = self.slots[idx].take() else {
                    return;
                };
                self.free.push(idx as u32);
                job::complete(slot.done, outcome);
            }
        }
    }

    /// Cancels the armed eventfd read and reaps it, so the kernel never writes to
    /// `eventfd_buf` after it is freed.
    fn disarm_eventfd(
        &mut self,
        submitter: &io_uring::Submitter<'_>,
        sq: &mut SubmissionQueue<'_>,
        cq: &mut CompletionQueue<'_>,
    ) {
        if !self.eventfd_armed {
            return;
        }
        let cancel = opcode::AsyncCancel::new(EVENTFD_TOKEN)
            .build()
            .user_data(CANCEL_TOKEN);
        self.push(sq, cancel);
        sq.sync();
        for _ in 0..1000 {
            if submitter.submit_and_wait(1).is_err() {
                thread::sleep(Duration::from_millis(1));
            }
            cq.sync();
            for cqe in &mut *cq {
                if cqe.user_data() == EVENTFD_TOKEN {
                    self.eventfd_armed = false;
                }
            }
            if !self.eventfd_armed {
                return;
            }
        }
        // Still armed after ~1 s: never free the buffer the kernel may write to.
        tracing::error!("could not cancel the io_uring eventfd read; leaking 8 bytes");
        std::mem::forget(std::mem::take(&mut self.eventfd_buf));
    }

    /// The ring is unusable: fail everything. Buffers the kernel may still touch are leaked.
    fn abandon(&mut self, err: io::Error) {
        tracing::error!("io_uring engine giving up: {err}");
        let mut queue = self.shared.lock();
        queue.closed = true;
        self.pending.extend(queue.jobs.drain(..));
        drop(queue);
        let kind = err.kind();
        let fail = || io::Error::new(kind, format!("io_uring engine failed: {err}"));
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            let Slot { job, done, .. } = slot;
            std::mem::forget(job);
            job::complete(done, Err(fail()));
        }
        for (_, done) in self.pending.drain(..) {
            job::complete(done, Err(fail()));
        }
        std::mem::forget(std::mem::take(&mut self.eventfd_buf));
    }
}

fn is_busy(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// The SQE for a slot's next (or first) step.
fn sqe(ctx: &FileCtx, slot: &mut Slot, idx: u32) -> squeue::Entry {
    let fd = types::Fixed(0);
    let done = slot.progress;
    let entry = match &mut slot.job {
        Job::Read { offset, buf } => {
            let rest = buf.len() - done as usize;
            // SAFETY: done < len, so the pointer stays inside the buffer.
            let ptr = unsafe { buf.as_mut_ptr().add(done as usize) };
            opcode::Read::new(fd, ptr, rest as u32)
                .offset(*offset + done)
                .build()
        }
        Job::Write { offset, buf, fua } => {
            let rest = buf.len() - done as usize;
            // SAFETY: done < len, so the pointer stays inside the buffer.
            let ptr = unsafe { buf.as_ptr().add(done as usize) };
            let flags = if *fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, rest as u32)
                .offset(*offset + done)
                .rw_flags(flags)
                .build()
        }
        Job::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Job::Trim { offset, len } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(ZeroStep::Punch.fallocate_mode())
            .build(),
        Job::Zero { offset, len, .. } => match slot.step {
            ZeroStep::Write => {
                let chunk = (*len - done).min(ZERO_CHUNK as u64) as u32;
                opcode::Write::new(fd, ctx.zeroes.as_ptr(), chunk)
                    .offset(*offset + done)
                    .build()
            }
            step => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(step.fallocate_mode())
                .build(),
        },
    };
    entry.user_data(u64::from(idx))
}

/// Decides what a completion means for its slot.
fn next_step(ctx: &FileCtx, slot: &mut Slot, result: i32) -> Next {
    if result < 0 {
        if (result == -libc::EINTR || result == -libc::EAGAIN) && slot.retries < MAX_RETRIES {
            slot.retries += 1;
            return Next::Resubmit;
        }
        let err = job::errno(result);
        return match &slot.job {
            Job::Trim { .. } if sync_io::unsupported(&err) => Next::Finish(Ok(DiskOutput::Done)),
            Job::Zero {
                offset,
                len,
                may_trim,
            } if slot.step != ZeroStep::Write && sync_io::unsupported(&err) => {
                ctx.note_unsupported(slot.step);
                slot.step = ctx.zero_step(*offset, *len, *may_trim, Some(slot.step));
                slot.progress = 0;
                Next::Resubmit
            }
            _ => Next::Finish(Err(err)),
        };
    }
    let n = result as u64;
    let total = match &slot.job {
        Job::Read { buf, .. } => buf.len() as u64,
        Job::Write { buf, .. } => buf.len() as u64,
        Job::Zero { len, .. } if slot.step == ZeroStep::Write => *len,
        // Flush, trim and fallocate-based zeroing are done in one call.
        _ => return Next::Finish(Ok(DiskOutput::Done)),
    };
    if n == 0 {
        let err = match slot.job {
            Job::Read { .. } => sync_io::eof(),
            _ => io::Error::from(io::ErrorKind::WriteZero),
        };
        return Next::Finish(Err(err));
    }
    slot.progress += n;
    debug_assert!(slot.progress <= total);
    if slot.progress < total {
        return Next::Resubmit;
    }
    Next::Finish(Ok(finished_output(slot)))
}

/// The output of a fully completed slot; takes a read's buffer out of the slot.
fn finished_output(slot: &mut Slot) -> DiskOutput {
    match &mut slot.job {
        Job::Read { buf, .. } => {
            let buf = std::mem::replace(buf, job::ReadBuf::Heap(Vec::new(), 0));
            // SAFETY: progress == len: the kernel wrote every byte.
            DiskOutput::Data(unsafe { buf.into_filled_bytes() })
        }
        _ => DiskOutput::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::job::{ReadBuf, WriteBuf};
    use bytes::Bytes;
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Runs one slot step on a plain ring, as the engine would, and returns the result.
    fn run_step(ring: &mut IoUring, ctx: &FileCtx, slot: &mut Slot) -> i32 {
        let entry = sqe(ctx, slot, 0);
        // SAFETY: the slot's buffers outlive the wait below.
        unsafe { ring.submission().push(&entry) }.expect("push");
        ring.submit_and_wait(1).expect("submit");
        let cqe = ring.completion().next().expect("cqe");
        assert_eq!(cqe.user_data(), 0);
        cqe.result()
    }

    fn test_ring(ctx: &FileCtx) -> IoUring {
        let ring = IoUring::new(8).expect("ring");
        ring.submitter()
            .register_files(&[ctx.file.as_raw_fd()])
            .expect("register");
        ring
    }

    fn slot(job: Job) -> Slot {
        Slot {
            job,
            done: Box::new(|_| {}),
            progress: 0,
            step: ZeroStep::Write,
            retries: 0,
        }
    }

    #[test]
    fn short_read_is_resubmitted_for_the_rest() {
        let file = tempfile::tempfile().expect("tempfile");
        let data = pattern(8192);
        file.write_all_at(&data, 4096).expect("prepare");
        let ctx = FileCtx::for_test(file);
        let mut ring = test_ring(&ctx);
        let mut slot = slot(Job::Read {
            offset: 4096,
            buf: ReadBuf::new(8192, false),
        });
        // Pretend the kernel returned only the first 1000 bytes.
        let Job::Read { buf, .. } = &mut slot.job else {
            unreachable!()
        };
        // SAFETY: the buffer has room for 8192 bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr(), 1000) };
        assert!(matches!(next_step(&ctx, &mut slot, 1000), Next::Resubmit));
        assert_eq!(slot.progress, 1000);
        // The resubmission reads exactly the remaining 7192 bytes at the right place.
        let result = run_step(&mut ring, &ctx, &mut slot);
        assert_eq!(result, 7192);
        match next_step(&ctx, &mut slot, result) {
            Next::Finish(Ok(DiskOutput::Data(got))) => assert_eq!(&got[..], &data[..]),
            _ => panic!("read should have finished with data"),
        }
    }

    #[test]
    fn short_write_is_resubmitted_and_transient_errors_retried() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(65536).expect("set_len");
        let ctx = FileCtx::for_test(file);
        let mut ring = test_ring(&ctx);
        let data = pattern(5000);
        let mut slot = slot(Job::Write {
            offset: 100,
            buf: WriteBuf::new(Bytes::from(data.clone()), false),
            fua: false,
        });
        // EAGAIN/EINTR: retried without progress.
        assert!(matches!(
            next_step(&ctx, &mut slot, -libc::EAGAIN),
            Next::Resubmit
        ));
        assert!(matches!(
            next_step(&ctx, &mut slot, -libc::EINTR),
            Next::Resubmit
        ));
        assert_eq!((slot.progress, slot.retries), (0, 2));
        // First 3000 bytes "written" (we write them by hand), the rest via resubmission.
        ctx.file.write_all_at(&data[..3000], 100).expect("prefix");
        assert!(matches!(next_step(&ctx, &mut slot, 3000), Next::Resubmit));
        let result = run_step(&mut ring, &ctx, &mut slot);
        assert_eq!(result, 2000);
        assert!(matches!(
            next_step(&ctx, &mut slot, result),
            Next::Finish(Ok(DiskOutput::Done))
        ));
        let mut back = vec![0; 5000];
        ctx.file.read_exact_at(&mut back, 100).expect("read back");
        assert_eq!(back, data);
        // A real error finishes the slot with that errno.
        match next_step(&ctx, &mut slot, -libc::EIO) {
            Next::Finish(Err(err)) => assert_eq!(err.raw_os_error(), Some(libc::EIO)),
            _ => panic!("EIO should finish the slot"),
        }
    }

    #[test]
    fn unsupported_zeroing_falls_back_to_writing() {
        let file = tempfile::tempfile().expect("tempfile");
        file.write_all_at(&pattern(10_000), 0).expect("prepare");
        let ctx = FileCtx::for_test(file);
        let mut ring = test_ring(&ctx);
        let mut slot = slot(Job::Zero {
            offset: 10,
            len: 9000,
            may_trim: false,
        });
        slot.step = ctx.zero_step(10, 9000, false, None);
        assert_eq!(slot.step, ZeroStep::ZeroRange);
        assert!(matches!(
            next_step(&ctx, &mut slot, -libc::EOPNOTSUPP),
            Next::Resubmit
        ));
        assert_eq!(slot.step, ZeroStep::Write);
        assert!(!ctx.fast_zero.load(Ordering::Relaxed));
        let result = run_step(&mut ring, &ctx, &mut slot);
        assert_eq!(result, 9000);
        assert!(matches!(
            next_step(&ctx, &mut slot, result),
            Next::Finish(Ok(DiskOutput::Done))
        ));
        let mut back = vec![1; 10_000];
        ctx.file.read_exact_at(&mut back, 0).expect("read back");
        assert!(back[10..9010].iter().all(|&b| b == 0));
        assert_eq!(&back[..10], &pattern(10)[..]);
        assert_eq!(back[9010..], pattern(10_000)[9010..]);
    }

    #[test]
    fn unsupported_trim_succeeds() {
        let ctx = FileCtx::for_test(tempfile::tempfile().expect("tempfile"));
        let mut slot = slot(Job::Trim {
            offset: 0,
            len: 4096,
        });
        assert!(matches!(
            next_step(&ctx, &mut slot, -libc::EOPNOTSUPP),
            Next::Finish(Ok(DiskOutput::Done))
        ));
    }
}
