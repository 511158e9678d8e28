//! Carrying out the core's disk actions.
//!
//! The fast path: a thread that feeds the core a batch of requests (an NBD connection's reader,
//! the peer link's reader) runs page-cache I/O itself, right where the core asks for it
//! ([`Disk::run_inline`](crate::storage::engine::Disk::run_inline): buffered reads that hit the
//! cache, buffered writes), and feeds the completions back in the next round of the same
//! batch. A 4 KiB write is then one `pwrite` on the thread that decoded it, with no hand-off
//! to a disk thread and back. Everything that may wait for the device (flush, FUA, O_DIRECT,
//! cache misses, discard) goes to the disk engine, whose completions come back as events.
//!
//! Only threads inside [`batch`] run I/O inline; every other caller (engine completion
//! threads, the metadata thread, timers) submits to the engine as before. Writes inline are
//! buffered writes of at most 256 KiB, except in the peer link reader's batches
//! ([`InlineWrites::Any`]): a mirrored 1 MiB write is then one `pwrite` on the reader, and
//! its ack leaves in the same batch, instead of a wake-up of a disk thread and an ack from
//! there. (An NBD reader keeps large writes on the disk threads: it has the client's next
//! requests to read meanwhile.)

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::{lock, nbd_conn, Shared};
use crate::core::{DiskOp, Event};
use crate::storage::engine::{DiskOp as EngineOp, DiskOutput};

thread_local! {
    /// Completions of I/O run inline on this thread and not yet fed to the core. Some while
    /// this thread is inside [`run_batch`].
    static INLINE: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
    /// The largest buffered write run inline in this thread's batch.
    static INLINE_WRITE_MAX: Cell<usize> = const { Cell::new(SMALL_WRITE_MAX) };
}

/// Buffered writes up to this size run inline in any batch (the disk's own limit).
const SMALL_WRITE_MAX: usize = 256 * 1024;

/// Which buffered writes a batch runs inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InlineWrites {
    /// Up to 256 KiB (NBD readers: larger ones overlap better on the disk threads).
    Small,
    /// Any size a peer frame carries (the peer link's reader).
    Any,
}

/// Clears this thread's batch state however the batch ends (a panic in the core included), so
/// no later caller on this thread queues completions that nobody feeds back.
struct BatchGuard;

impl Drop for BatchGuard {
    fn drop(&mut self) {
        INLINE.with(|b| b.borrow_mut().take());
        INLINE_WRITE_MAX.with(|m| m.set(SMALL_WRITE_MAX));
    }
}

/// Runs `f` (which feeds the core) as a batch on this thread: disk actions that can run
/// inline run here, and their completions are fed back, round after round, until nothing is
/// left. NBD replies produced meanwhile are sent together at the end (one `sendmsg` per
/// connection instead of one per reply). Must not be held across an await.
pub(super) fn batch<R>(shared: &Arc<Shared>, f: impl FnOnce() -> R) -> R {
    batch_with(shared, InlineWrites::Small, f)
}

/// [`batch`], with the writes `writes` says run inline (a nested batch keeps the outer one's).
pub(super) fn batch_with<R>(
    shared: &Arc<Shared>,
    writes: InlineWrites,
    f: impl FnOnce() -> R,
) -> R {
    let nested = INLINE.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_some() {
            true
        } else {
            *b = Some(Vec::new());
            false
        }
    });
    if nested {
        // The outer batch feeds back what this one runs inline.
        return f();
    }
    let _guard = BatchGuard;
    let write_max = match writes {
        InlineWrites::Small => SMALL_WRITE_MAX,
        InlineWrites::Any => crate::peer::MAX_DATA_LEN as usize,
    };
    INLINE_WRITE_MAX.with(|m| m.set(write_max));
    let _cork = nbd_conn::Cork::new();
    let r = f();
    let mut done = Vec::new();
    loop {
        INLINE.with(|b| {
            if let Some(queued) = b.borrow_mut().as_mut() {
                std::mem::swap(queued, &mut done);
            }
        });
        if done.is_empty() {
            return r;
        }
        shared.handle_many(done.drain(..));
    }
}

/// Carries out one `Action::Disk`.
pub(super) fn submit(shared: &Arc<Shared>, id: u64, op: DiskOp) {
    let op = match op {
        DiskOp::Read { offset, len } => EngineOp::Read { offset, len },
        DiskOp::Write { offset, data, fua } => EngineOp::Write { offset, data, fua },
        DiskOp::Flush => EngineOp::Flush,
        DiskOp::Trim { offset, len } => EngineOp::Trim { offset, len },
        DiskOp::WriteZeroes {
            offset,
            len,
            may_trim,
        } => EngineOp::WriteZeroes {
            offset,
            len,
            may_trim,
        },
    };
    let traced = shared.disk_trace.as_ref().and_then(|_| trace_line(&op));
    let in_batch = INLINE.with(|b| b.borrow().is_some());
    let op = if in_batch {
        let write_max = INLINE_WRITE_MAX.with(Cell::get);
        debug_assert!(write_max >= SMALL_WRITE_MAX);
        match shared.disk.run_inline_up_to(op, write_max) {
            Ok(result) => {
                let ev = completion(shared, id, traced.as_deref(), result);
                INLINE.with(|b| {
                    if let Some(done) = b.borrow_mut().as_mut() {
                        done.push(ev);
                    }
                });
                return;
            }
            Err(op) => op,
        }
    } else {
        op
    };
    let me = shared.clone();
    shared.disk.submit(
        op,
        Box::new(move |r| {
            let ev = completion(&me, id, traced.as_deref(), r);
            me.handle(ev);
        }),
    );
}

/// The core's event for a write the NBD reader streamed to the disk itself (splice.rs), with
/// its trace line, as for a write the engine ran.
pub(super) fn streamed(
    shared: &Shared,
    id: u64,
    offset: u64,
    len: u32,
    result: std::io::Result<()>,
) -> Event {
    let traced = shared
        .disk_trace
        .as_ref()
        .map(|_| write_trace(offset, len as usize, false));
    completion(
        shared,
        id,
        traced.as_deref(),
        result.map(|()| DiskOutput::Done),
    )
}

/// What `MIRRORD_DISK_TRACE` records for an operation (flushes and writes).
fn trace_line(op: &EngineOp) -> Option<String> {
    match op {
        EngineOp::Flush => Some("flush".to_string()),
        EngineOp::Write { offset, data, fua } => Some(write_trace(*offset, data.len(), *fua)),
        _ => None,
    }
}

/// The trace line of a write, however its data reached the disk.
fn write_trace(offset: u64, len: usize, fua: bool) -> String {
    let kind = if fua { "fua-write" } else { "write" };
    format!("{kind} {offset} {len}")
}

/// The core's event for a finished operation (and its trace line, if tracing).
fn completion(
    shared: &Shared,
    id: u64,
    traced: Option<&str>,
    r: std::io::Result<DiskOutput>,
) -> Event {
    if let (Some(t), Some(line), true) = (&shared.disk_trace, traced, r.is_ok()) {
        use std::io::Write;
        let _ = writeln!(lock(t), "{line}");
    }
    let result = match r {
        Ok(DiskOutput::Done) => Ok(None),
        Ok(DiskOutput::Data(d)) => Ok(Some(d)),
        Err(e) => {
            tracing::error!("disk I/O failed: {e}");
            Err(crate::core::errno::EIO)
        }
    };
    Event::DiskDone { id, result }
}
