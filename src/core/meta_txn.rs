//! Metadata transactions: the activity log and the local writes waiting for
//! it, the activity-log and superblock writes in flight, the write gate while
//! new identifiers are persisted, a deferred data generation, and when the
//! bitmap was last saved. `node.rs` drives it through these methods.
//!
//! Invariants: at most one activity-log transaction and one superblock write
//! in flight (`al_txn`, `sb_txn`); a superblock write is asked for again
//! (`sb_again`) only while one is in flight; writes wait for the activity log
//! only when the node keeps one.

use super::activity_log::ActivityLog;

#[derive(Debug)]
pub(super) struct MetaTxns {
    /// The activity log; a resource without a peer keeps none.
    al: Option<ActivityLog>,
    /// Local writes (write ids) waiting for an activity-log transaction, in order.
    al_waiting: Vec<u64>,
    /// The activity-log transaction in flight: its data flush, then its write.
    al_txn: Option<u64>,
    /// The superblock write in flight.
    sb_txn: Option<u64>,
    /// The superblock changed while its write was in flight: write it again.
    sb_again: bool,
    /// The next superblock write starts a new data generation: the data disk
    /// is flushed first, and the superblock is written once that flush is
    /// done (`sb_txn` is the flush's id until then).
    sb_flush_first: bool,
    /// Local writes wait while a superblock with new identifiers is being persisted.
    gate_writes: bool,
    /// A new data generation starts at the next local write that the peer does
    /// not get (`Some(primary before the split)`), not when the peer is lost:
    /// a primary that writes nothing while apart keeps its identifiers.
    pending_gen: Option<bool>,
    last_bitmap_save_ms: u64,
}

/// What the end of a superblock write leaves to do.
pub(super) enum SbDone {
    /// Not the superblock write in flight.
    Other,
    /// The superblock changed meanwhile: write it again.
    Again,
    /// Durable; `ungated`: local writes held by the gate may start now.
    Durable { ungated: bool },
}

impl MetaTxns {
    pub(super) fn new(al: Option<ActivityLog>) -> MetaTxns {
        MetaTxns {
            al,
            al_waiting: Vec::new(),
            al_txn: None,
            sb_txn: None,
            sb_again: false,
            sb_flush_first: false,
            gate_writes: false,
            pending_gen: None,
            last_bitmap_save_ms: 0,
        }
    }

    fn invariants(&self) {
        assert!(
            self.sb_txn.is_some() || !self.sb_again,
            "a superblock write asked for again with none in flight"
        );
        assert!(
            self.al.is_some() || (self.al_waiting.is_empty() && self.al_txn.is_none()),
            "activity-log waits without an activity log"
        );
    }

    pub(super) fn al(&self) -> Option<&ActivityLog> {
        self.al.as_ref()
    }

    pub(super) fn al_mut(&mut self) -> Option<&mut ActivityLog> {
        self.al.as_mut()
    }

    // ----- the activity-log queue -----

    /// No local write waits for the activity log.
    pub(super) fn none_waiting(&self) -> bool {
        self.al_waiting.is_empty()
    }

    /// The first waiting write, when no transaction is in flight: the next
    /// transaction is planned for it.
    pub(super) fn next_to_plan(&self) -> Option<u64> {
        self.invariants();
        if self.al_txn.is_some() {
            return None;
        }
        self.al_waiting.first().copied()
    }

    /// Local write `wid` waits for an activity-log transaction.
    pub(super) fn wait_for_al(&mut self, wid: u64) {
        assert!(
            self.al.is_some(),
            "a write waits for an activity log it has"
        );
        debug_assert!(!self.al_waiting.contains(&wid));
        self.al_waiting.push(wid);
        self.invariants();
    }

    /// The waiting writes, taken to be admitted again in order.
    pub(super) fn take_waiting(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.al_waiting)
    }

    /// Those of [`MetaTxns::take_waiting`] still not admitted, in order.
    pub(super) fn put_back_waiting(&mut self, still: Vec<u64>) {
        assert!(
            self.al_waiting.is_empty(),
            "waiters added while readmitting"
        );
        self.al_waiting = still;
        self.invariants();
    }

    /// An activity-log transaction `id` starts (its flush or its write).
    pub(super) fn begin_al_txn(&mut self, id: u64) {
        assert!(
            self.al_txn.is_none(),
            "one activity-log transaction at a time"
        );
        assert!(self.al.is_some());
        self.al_txn = Some(id);
        self.invariants();
    }

    /// The transaction's data flush is done: its write `id` follows.
    pub(super) fn al_txn_write(&mut self, id: u64) {
        assert!(
            self.al_txn.is_some(),
            "an activity-log flush without its transaction"
        );
        self.al_txn = Some(id);
        self.invariants();
    }

    /// Metadata write `id` is done: if it was the activity-log transaction,
    /// the log takes it as committed (true).
    pub(super) fn end_al_txn(&mut self, id: u64) -> bool {
        if self.al_txn != Some(id) {
            return false;
        }
        self.al_txn = None;
        if let Some(al) = self.al.as_mut() {
            al.committed();
        }
        self.invariants();
        true
    }

    // ----- the superblock -----

    /// A superblock write is wanted (`gate`: local writes wait until it is
    /// durable). Returns true if a write must start (none is in flight).
    pub(super) fn want_superblock(&mut self, gate: bool) -> bool {
        self.invariants();
        if gate {
            self.gate_writes = true;
        }
        if self.sb_txn.is_some() {
            self.sb_again = true;
            return false;
        }
        true
    }

    /// The superblock now names a new data generation: its next write waits
    /// for a flush of the data disk (see [`MetaTxns::begin_superblock`]).
    pub(super) fn flush_before_superblock(&mut self) {
        self.sb_flush_first = true;
    }

    /// The superblock write `id` started. Returns true if `id` is the data
    /// flush that must come first (a new generation): the write itself
    /// follows with [`MetaTxns::superblock_flushed`].
    pub(super) fn begin_superblock(&mut self, id: u64) -> bool {
        assert!(self.sb_txn.is_none(), "one superblock write at a time");
        self.sb_txn = Some(id);
        self.invariants();
        std::mem::take(&mut self.sb_flush_first)
    }

    /// The data flush before the superblock is done: its write `id` follows.
    pub(super) fn superblock_flushed(&mut self, id: u64) {
        assert!(
            self.sb_txn.is_some(),
            "a superblock flush without its transaction"
        );
        self.sb_txn = Some(id);
        self.invariants();
    }

    /// Metadata write `id` is done: what follows for the superblock.
    pub(super) fn end_superblock(&mut self, id: u64) -> SbDone {
        if self.sb_txn != Some(id) {
            return SbDone::Other;
        }
        self.sb_txn = None;
        if self.sb_again {
            self.sb_again = false;
            self.invariants();
            return SbDone::Again;
        }
        let ungated = std::mem::take(&mut self.gate_writes);
        self.invariants();
        SbDone::Durable { ungated }
    }

    /// Local writes wait for a superblock with new identifiers.
    pub(super) fn gated(&self) -> bool {
        self.gate_writes
    }

    // ----- a deferred generation -----

    /// The next unreplicated local write starts a new generation; returns the
    /// mark it will carry (primary before the split, now or at an earlier deferral).
    pub(super) fn defer_generation(&mut self, primary_before: bool) -> bool {
        let mark = self.pending_gen.unwrap_or(false) || primary_before;
        self.pending_gen = Some(mark);
        mark
    }

    pub(super) fn generation_deferred(&self) -> bool {
        self.pending_gen.is_some()
    }

    /// The deferred generation's mark, taken once (or none deferred).
    pub(super) fn take_deferred_generation(&mut self) -> Option<bool> {
        let mark = self.pending_gen.take();
        assert!(self.pending_gen.is_none());
        mark
    }

    // ----- bitmap saves -----

    /// A periodic bitmap save is due at `now_ms` (at most once a second);
    /// true records it as done now.
    pub(super) fn bitmap_save_due(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.last_bitmap_save_ms) < 1000 {
            return false;
        }
        self.last_bitmap_save_ms = now_ms;
        true
    }
}
