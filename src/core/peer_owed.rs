//! What the peer owes us in one session: our writes it has not acknowledged
//! (`recent`, also what conflict detection looks at), writes it acknowledged
//! but has not flushed (`unflushed`, like DRBD's transfer log up to a barrier),
//! the flushes we asked of it and the reads we sent it. All of it lives exactly
//! as long as a peer session: `replication.rs` `end_session_state` takes it
//! whole with [`PeerOwed::end_session`] when a session ends (a lost link or a
//! pause), and the callers settle what it left unanswered.
//!
//! Invariants (asserted in the methods): sequence numbers of writes sent grow;
//! an unflushed write was sent (its seq is at most the highest sent) and is no
//! longer unacknowledged; a flush covers every write sent before it; a flush or
//! read id is used once while it is outstanding; after `end_session` nothing is
//! left but the clock of the last flush asked for.

use std::collections::{BTreeMap, HashMap};

use super::ordering::Range;
use super::types::*;

/// A write the peer has not acknowledged yet (for conflict detection).
#[derive(Debug)]
pub(super) struct Recent {
    pub range: Range,
    pub req: Option<u64>,
    /// A local write's operation and FUA, to issue it again after a pause.
    pub redo: Option<(DiskOp, bool)>,
}

/// What an ended session left unanswered, for the caller to settle.
#[derive(Debug)]
pub(super) struct Owed {
    /// Writes not acknowledged, by sequence number.
    pub recent: BTreeMap<u64, Recent>,
    /// Writes acknowledged but not flushed, in sequence order.
    pub unflushed: Vec<Range>,
    /// Reads sent to the peer, (client, cookie) in the order they were sent.
    pub reads: Vec<(ConnId, u64)>,
}

#[derive(Debug, Default)]
pub(super) struct PeerOwed {
    recent: BTreeMap<u64, Recent>,
    /// Local writes the peer acknowledged (seq -> range) but has not flushed yet:
    /// if the peer loses power they may be gone from its disk, so they are marked
    /// out of sync when the link is lost.
    unflushed: BTreeMap<u64, Range>,
    /// Flushes sent to the peer (id -> our highest write seq when sent).
    flush_marks: BTreeMap<u64, u64>,
    /// When we last asked the peer to flush (kept across sessions).
    last_flush_ms: u64,
    /// Reads sent to the peer: id -> (client, cookie, length asked for).
    reads: HashMap<u64, (ConnId, u64, u32)>,
    /// The highest sequence number of a write sent in this session.
    highest_sent: u64,
}

impl PeerOwed {
    /// Nothing is owed (the clock of the last flush does not count).
    pub(super) fn is_empty(&self) -> bool {
        self.recent.is_empty()
            && self.unflushed.is_empty()
            && self.flush_marks.is_empty()
            && self.reads.is_empty()
            && self.highest_sent == 0
    }

    /// Write `seq` went to the peer; `r` until it acknowledges it.
    pub(super) fn write_sent(&mut self, seq: u64, r: Recent) {
        assert!(seq > self.highest_sent, "write seq {seq} sent out of order");
        self.highest_sent = seq;
        let old = self.recent.insert(seq, r);
        assert!(old.is_none());
    }

    /// The request of unacknowledged write `seq`, if it is a local write.
    pub(super) fn write_req(&self, seq: u64) -> Option<u64> {
        self.recent.get(&seq).and_then(|r| r.req)
    }

    /// The peer acknowledged write `seq` (None: not tracked, from outside input).
    pub(super) fn write_acked(&mut self, seq: u64) -> Option<Recent> {
        let r = self.recent.remove(&seq)?;
        assert!(seq <= self.highest_sent);
        Some(r)
    }

    /// Acknowledged write `seq` is on the peer's disk, not yet on its medium.
    pub(super) fn write_unflushed(&mut self, seq: u64, range: Range) {
        assert!(
            seq <= self.highest_sent,
            "unflushed write {seq} was never sent"
        );
        assert!(!self.recent.contains_key(&seq));
        let old = self.unflushed.insert(seq, range);
        assert!(old.is_none());
    }

    /// Unacknowledged writes sent after `seen` (what the peer had not seen).
    pub(super) fn unseen_by_peer(&self, seen: u64) -> impl Iterator<Item = &Recent> {
        self.recent.range(seen + 1..).map(|(_, r)| r)
    }

    /// How many writes wait for the peer's acknowledgement.
    pub(super) fn writes_in_flight(&self) -> usize {
        self.recent.len()
    }

    /// Flush `id` went to the peer at `now_ms`, covering writes up to `upto`.
    pub(super) fn flush_sent(&mut self, id: u64, upto: u64, now_ms: u64) {
        assert!(upto >= self.highest_sent, "a flush covers the writes sent");
        let old = self.flush_marks.insert(id, upto);
        assert!(old.is_none(), "peer flush id {id} reused");
        self.last_flush_ms = now_ms;
    }

    /// The peer answered flush `id` (`ok`: its disk flushed): every write sent
    /// before it is durable there. Unknown ids (outside input) change nothing.
    pub(super) fn flush_acked(&mut self, id: u64, ok: bool) {
        let Some(upto) = self.flush_marks.remove(&id) else {
            return;
        };
        if ok {
            self.unflushed = self.unflushed.split_off(&(upto + 1));
        }
        debug_assert!(!ok || self.unflushed.keys().all(|s| *s > upto));
    }

    /// A flush is due: unflushed writes and none asked for in `period_ms`.
    pub(super) fn flush_due(&self, now_ms: u64, period_ms: u64) -> bool {
        !self.unflushed.is_empty() && now_ms.saturating_sub(self.last_flush_ms) >= period_ms
    }

    /// A flush we asked for is not answered yet.
    pub(super) fn flush_outstanding(&self) -> bool {
        !self.flush_marks.is_empty()
    }

    /// The ranges of writes the peer acknowledged but has not flushed.
    pub(super) fn unflushed(&self) -> impl Iterator<Item = &Range> {
        self.unflushed.values()
    }

    /// Read `id` of `len` bytes for (conn, cookie) went to the peer.
    pub(super) fn read_sent(&mut self, id: u64, conn: ConnId, cookie: u64, len: u32) {
        let old = self.reads.insert(id, (conn, cookie, len));
        assert!(old.is_none(), "peer read id {id} reused");
    }

    /// Read `id` sent to the peer: (client, cookie, length asked for).
    pub(super) fn read(&self, id: u64) -> Option<(ConnId, u64, u32)> {
        self.reads.get(&id).copied()
    }

    /// Read `id` is answered.
    pub(super) fn read_answered(&mut self, id: u64) {
        let r = self.reads.remove(&id);
        assert!(r.is_some(), "peer read {id} is not outstanding");
    }

    /// Writes the peer acknowledged but has not flushed.
    pub(super) fn has_unflushed(&self) -> bool {
        !self.unflushed.is_empty()
    }

    /// Flush `id` went to the peer and is not answered yet.
    pub(super) fn flush_pending(&self, id: u64) -> bool {
        self.flush_marks.contains_key(&id)
    }

    /// Reads sent to the peer wait for it.
    pub(super) fn has_reads(&self) -> bool {
        !self.reads.is_empty()
    }

    /// The peer owes an answer: writes, reads or flushes outstanding.
    pub(super) fn owes_answers(&self) -> bool {
        !self.recent.is_empty() || !self.reads.is_empty() || !self.flush_marks.is_empty()
    }

    /// The session ended: everything it owed is taken whole (the one reset).
    pub(super) fn end_session(&mut self) -> Owed {
        let mut reads: Vec<(u64, (ConnId, u64, u32))> =
            std::mem::take(&mut self.reads).into_iter().collect();
        reads.sort_unstable_by_key(|(id, _)| *id); // deterministic reply order
        let owed = Owed {
            recent: std::mem::take(&mut self.recent),
            unflushed: std::mem::take(&mut self.unflushed).into_values().collect(),
            reads: reads.into_iter().map(|(_, (c, k, _))| (c, k)).collect(),
        };
        self.flush_marks.clear();
        self.highest_sent = 0;
        assert!(self.is_empty());
        owed
    }

    /// The process stops: the unflushed writes, to mark (the link goes with it).
    pub(super) fn take_unflushed(&mut self) -> Vec<Range> {
        let out = std::mem::take(&mut self.unflushed).into_values().collect();
        assert!(self.unflushed.is_empty());
        out
    }
}
