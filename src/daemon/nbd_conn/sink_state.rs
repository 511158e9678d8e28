//! What a connection's reply side holds: the requests handed to the core, the output not
//! yet sent, and what both count against back-pressure.

use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;

use bytes::{Buf, Bytes, BytesMut};

use crate::daemon::backpressure;
use crate::nbd::Command;

/// A request handed to the core, waiting for its answer.
pub(super) struct Pending {
    pub(super) cookie: u64,
    pub(super) command: Command,
    pub(super) offset: u64,
    /// Its payload never fully arrived (a streamed write cut off): whatever the core
    /// answers, the client is told nothing, since not all of its data reached the disk.
    pub(super) abandoned: bool,
    /// Bytes it holds until answered (READ length, WRITE payload, at least
    /// `backpressure::REQUEST_MIN_BYTES`), for back-pressure.
    pub(super) held: usize,
}

#[derive(Default)]
pub(super) struct SinkState {
    /// Requests handed to the core, by our number for them.
    pub(super) pending: HashMap<u64, Pending>,
    /// Output not yet sent, in order: `queue` first, then `out`.
    pub(super) queue: VecDeque<Bytes>,
    pub(super) queued: usize,
    pub(super) out: BytesMut,
    /// The socket was full: the writer task sends until everything is out; others only queue.
    pub(super) writer_owns: bool,
    /// Sending failed (the client is gone): output is dropped.
    pub(super) broken: bool,
    pub(super) reader_done: bool,
    /// The reader stopped for a hand-over: the socket stays open for the next process (no
    /// shutdown of its sending side when the last reply is out).
    pub(super) keep_open: bool,
    /// Bytes the pending requests hold (`Pending::held`).
    pub(super) held: usize,
    /// This connection's part of the total (backpressure.rs), updated at every unlock.
    pub(super) share: backpressure::Share,
}

impl SinkState {
    pub(super) fn unsent(&self) -> usize {
        self.queued + self.out.len()
    }

    /// What this connection holds in memory: pending requests and unsent replies.
    pub(super) fn held(&self) -> usize {
        self.held + self.unsent()
    }

    pub(super) fn insert_pending(&mut self, idx: u64, p: Pending) {
        self.held += p.held;
        let old = self.pending.insert(idx, p);
        assert!(old.is_none(), "request {idx} registered twice");
    }

    pub(super) fn remove_pending(&mut self, idx: u64) -> Option<Pending> {
        let p = self.pending.remove(&idx)?;
        self.held -= p.held;
        debug_assert!(
            !self.pending.is_empty() || self.held == 0,
            "held bytes leaked"
        );
        Some(p)
    }

    /// Appends a data buffer after everything encoded so far, without copying it.
    pub(super) fn push_data(&mut self, data: Bytes) {
        if !self.out.is_empty() {
            let head = self.out.split().freeze();
            self.queued += head.len();
            self.queue.push_back(head);
        }
        if !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    /// Drops the first `n` sent bytes.
    pub(super) fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                self.out.advance(n.min(self.out.len()));
                return;
            };
            let take = n.min(front.len());
            front.advance(take);
            self.queued -= take;
            n -= take;
            if front.is_empty() {
                self.queue.pop_front();
            }
        }
    }

    pub(super) fn discard_output(&mut self) {
        self.queue.clear();
        self.queued = 0;
        self.out.clear();
    }

    /// Whether the writer task may finish: the reader is gone, every request answered, and
    /// everything sent (or the client gone).
    pub(super) fn finished(&self) -> bool {
        self.reader_done && self.pending.is_empty() && (self.broken || self.unsent() == 0)
    }
}
/// The sink's state, locked; at unlock the connection's share of the back-pressure total is
/// brought up to date, so every change to what it holds is counted.
pub(super) struct SinkGuard<'a>(pub(super) MutexGuard<'a, SinkState>);

impl std::ops::Deref for SinkGuard<'_> {
    type Target = SinkState;
    fn deref(&self) -> &SinkState {
        &self.0
    }
}

impl std::ops::DerefMut for SinkGuard<'_> {
    fn deref_mut(&mut self) -> &mut SinkState {
        &mut self.0
    }
}

impl Drop for SinkGuard<'_> {
    fn drop(&mut self) {
        let held = self.0.held();
        self.0.share.update(held);
    }
}
