//! What NBD clients' requests wait for before the write path takes them or
//! before they are answered, owned here so that no other file changes it field
//! by field:
//!
//! - requests held while writes are frozen (`freeze.rs`), a connection
//!   handshake runs or a promotion waits for the peer's confirmation
//!   (`node.rs` `on_request`), released by `release_held`;
//! - trims and write-zeroes with FUA, answered after a flush (`clients.rs`),
//!   and those of them whose operation completed during the current event;
//! - the disk op id of the streamed write that just started, taken by
//!   `on_stream_write` in the same event.
//!
//! Invariants (asserted here and in `Node::handle`): between events no FUA
//! flush is queued and no stream grant is untaken; a FUA trim is pending at
//! most once; one grant at a time.

use std::collections::BTreeSet;

use super::types::*;

#[derive(Debug, Default)]
pub(super) struct ClientWaits {
    /// Requests held, in arrival order.
    held: Vec<(ConnId, u64, IoRequest)>,
    /// Trims and write-zeroes with FUA in the core: each is answered after a
    /// flush. At most one entry per request in the core.
    fua_pending: BTreeSet<(ConnId, u64)>,
    /// Those whose operation completed during the current event: their flushes
    /// start at its end. Empty between events.
    fua_flushes: Vec<(ConnId, u64)>,
    /// The disk op id of the streamed write that just started.
    stream_grant: Option<u64>,
}

impl ClientWaits {
    /// Nothing of the current event is left over (checked between events).
    pub(super) fn between_events(&self) -> bool {
        self.fua_flushes.is_empty() && self.stream_grant.is_none()
    }

    /// Holds a request; `why` says a cause holds requests now.
    pub(super) fn hold(&mut self, why: bool, conn: ConnId, cookie: u64, req: IoRequest) {
        assert!(why, "a request is held only while something holds requests");
        self.held.push((conn, cookie, req));
    }

    /// Takes the held requests (in arrival order) to go on or fail.
    pub(super) fn take_held(&mut self) -> Vec<(ConnId, u64, IoRequest)> {
        let held = std::mem::take(&mut self.held);
        assert!(self.held.is_empty());
        held
    }

    /// Requests held (the resync's pace counts them, resync_rate.rs).
    pub(super) fn held_len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn none_held(&self) -> bool {
        self.held.is_empty()
    }

    /// A trim or write-zeroes with FUA arrives: its answer waits for a flush. (A
    /// request held during a handshake arrives a second time: the set keeps one.)
    pub(super) fn fua_after(&mut self, conn: ConnId, cookie: u64) {
        self.fua_pending.insert((conn, cookie));
        debug_assert!(self.fua_pending.contains(&(conn, cookie)));
    }

    /// The answer `ok` of request (conn, cookie) is ready: true if it is a FUA
    /// trim that succeeded, whose flush now starts at the end of the event
    /// instead of the answer.
    pub(super) fn fua_answer(&mut self, conn: ConnId, cookie: u64, ok: bool) -> bool {
        if !(self.fua_pending.remove(&(conn, cookie)) && ok) {
            return false;
        }
        self.fua_flushes.push((conn, cookie));
        debug_assert!(!self.fua_pending.contains(&(conn, cookie)));
        true
    }

    /// Connection `conn` has a FUA trim unanswered.
    pub(super) fn fua_pending_on(&self, conn: ConnId) -> bool {
        self.fua_pending.iter().any(|&(c, _)| c == conn)
    }

    /// FUA flushes wait for the end of the event.
    pub(super) fn fua_flushes_due(&self) -> bool {
        !self.fua_flushes.is_empty()
    }

    /// Takes the FUA flushes of the event just handled.
    pub(super) fn take_fua_flushes(&mut self) -> Vec<(ConnId, u64)> {
        let flushes = std::mem::take(&mut self.fua_flushes);
        assert!(self.fua_flushes.is_empty());
        flushes
    }

    /// The streamed write's disk op `id` started.
    pub(super) fn grant_stream(&mut self, id: u64) {
        assert!(
            self.stream_grant.is_none(),
            "an earlier grant was not taken"
        );
        self.stream_grant = Some(id);
    }

    /// Takes the grant of the streamed write that just started.
    pub(super) fn take_stream_grant(&mut self) -> Option<u64> {
        let id = self.stream_grant.take();
        assert!(self.stream_grant.is_none());
        id
    }
}
