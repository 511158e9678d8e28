//! The NBD requests the write path carries, owned here so that no other file
//! changes them field by field: every local write and flush from its issue
//! until it is answered and done (`Req`), and the large writes carried out in
//! pieces (`Split`, `split.rs`), whose pieces are requests too.
//!
//! A request is answered once ([`Requests::settle`]), to its client, to the
//! request it was issued again for after a pause (`grace.rs`, its parent), or
//! to its split; it is done once it is answered, its local part is done and
//! the peer owes nothing more for it ([`Requests::finish`]).
//!
//! Invariants (asserted in the methods that change the table): an id is
//! inserted once; a write issued again has a parent waiting for the peer and
//! a piece has its split; a request is answered once and removed only when
//! answered and done; `unanswered` counts the requests not answered yet (O(1)
//! at the top and bottom, recounted in debug builds for tables of up to `SCAN_CHECK_MAX` entries); a split ends with
//! no piece in flight and no piece request unanswered.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::ordering::Range;
use super::split::Split;
use super::types::*;

#[derive(Debug)]
struct Req {
    conn: ConnId,
    cookie: u64,
    range: Range,
    is_flush: bool,
    local_pending: bool,
    /// The reply waits for the peer's RecvAck (protocol B).
    wait_recv: bool,
    /// The reply waits for the peer's WriteAck / FlushAck (protocol C, FUA, flush).
    wait_ack: bool,
    ack_outstanding: bool,
    recv_got: bool,
    error: u32,
    replied: bool,
    al_held: bool,
    /// A write issued again after a pause (grace.rs): its completion answers
    /// this request instead of a client.
    parent: Option<u64>,
    /// A piece of this split (`split.rs`): its answer goes to the split, not the client.
    split: Option<u64>,
}

impl Req {
    /// A local write's request, before it is issued.
    fn write(conn: ConnId, cookie: u64, range: Range, parent: Option<u64>) -> Req {
        Req {
            conn,
            cookie,
            range,
            is_flush: false,
            local_pending: true,
            wait_recv: false,
            wait_ack: false,
            ack_outstanding: false,
            recv_got: false,
            error: 0,
            replied: false,
            al_held: false,
            parent,
            split: None,
        }
    }
}

/// Where a request's answer goes ([`Requests::settle`]).
#[derive(Debug)]
pub(super) enum Answer {
    Client {
        conn: ConnId,
        cookie: u64,
        result: Result<Option<Bytes>, u32>,
    },
    /// A write issued again after a pause answers the original request.
    Parent { parent: u64, error: u32 },
    /// A piece answers its split.
    Piece {
        split: u64,
        result: Result<Option<Bytes>, u32>,
    },
}

/// A request done ([`Requests::finish`]): what it held of the activity log.
#[derive(Debug)]
pub(super) struct Finished {
    pub range: Range,
    pub al_held: bool,
}

#[derive(Debug, Default)]
pub(super) struct Requests {
    reqs: HashMap<u64, Req>,
    /// Large local writes carried out in pieces (`split.rs`), by split id.
    splits: BTreeMap<u64, Split>,
    /// Requests not answered yet.
    unanswered: usize,
}

impl Requests {
    /// The counts agree (O(1); the recount only where `scan_checks` says).
    fn check(&self) {
        assert!(self.unanswered <= self.reqs.len());
        if super::scan_checks(self.reqs.len()) {
            assert_eq!(
                self.unanswered,
                self.reqs.values().filter(|r| !r.replied).count(),
                "unanswered requests miscounted"
            );
        }
    }

    fn insert(&mut self, rid: u64, req: Req) {
        self.check();
        assert!(!req.replied);
        if let Some(p) = req.parent {
            let Some(parent) = self.reqs.get(&p) else {
                unreachable!("a write issued again has no request {p}");
            };
            assert!(parent.ack_outstanding, "write {p} was answered already");
        }
        if let Some(sid) = req.split {
            assert!(
                self.splits.contains_key(&sid),
                "piece {rid} of unknown split {sid}"
            );
        }
        let old = self.reqs.insert(rid, req);
        assert!(old.is_none(), "request {rid} inserted twice");
        self.unanswered += 1;
        self.check();
    }

    fn get_mut(&mut self, rid: u64, what: &str) -> &mut Req {
        let Some(r) = self.reqs.get_mut(&rid) else {
            unreachable!("{what}: request {rid} is not in flight");
        };
        r
    }

    /// No request in flight (splits aside: see [`Requests::no_splits`]).
    pub(super) fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Requests in flight (the resync's pace counts them, resync_rate.rs).
    pub(super) fn len(&self) -> usize {
        self.reqs.len()
    }

    pub(super) fn contains(&self, rid: u64) -> bool {
        self.reqs.contains_key(&rid)
    }

    /// The ids of the requests in flight, in id (arrival) order.
    pub(super) fn ids_sorted(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.reqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The flushes still waiting for the peer's FlushAck, in id order.
    pub(super) fn flushes_awaiting_peer(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.is_flush && r.ack_outstanding)
            .map(|(k, _)| *k)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The client connection and cookie of request `rid`, if it is in the table.
    pub(super) fn origin(&self, rid: u64) -> Option<(ConnId, u64)> {
        self.reqs.get(&rid).map(|r| (r.conn, r.cookie))
    }

    /// Request `rid` still waits for the peer.
    pub(super) fn awaits_peer(&self, rid: u64) -> bool {
        let Some(q) = self.reqs.get(&rid) else {
            unreachable!("request {rid} a pause waited for is gone");
        };
        q.ack_outstanding
    }

    /// A local write of `range` from (conn, cookie), a piece of `split` if any,
    /// before it is issued.
    pub(super) fn add_write(
        &mut self,
        rid: u64,
        conn: ConnId,
        cookie: u64,
        range: Range,
        split: Option<u64>,
    ) {
        let mut req = Req::write(conn, cookie, range, None);
        req.split = split;
        self.insert(rid, req);
    }

    /// Write `parent`, unanswered by the peer at a pause, is issued again as
    /// request `rid` of `range`; its answer goes to `parent`.
    pub(super) fn add_redo(&mut self, rid: u64, parent: u64, range: Range) {
        let p = self.get_mut(parent, "write to issue again");
        let (conn, cookie) = (p.conn, p.cookie);
        self.insert(rid, Req::write(conn, cookie, range, Some(parent)));
    }

    /// A flush from (conn, cookie); `mirrored`: the peer flushes too.
    pub(super) fn add_flush(&mut self, rid: u64, conn: ConnId, cookie: u64, mirrored: bool) {
        self.insert(
            rid,
            Req {
                conn,
                cookie,
                range: Range::new(0, 0),
                is_flush: true,
                local_pending: true,
                wait_recv: false,
                wait_ack: mirrored,
                ack_outstanding: mirrored,
                recv_got: false,
                error: 0,
                replied: false,
                al_held: false,
                parent: None,
                split: None,
            },
        );
    }

    /// Request `rid`'s write enters the write path: it must wait for its
    /// local part, unanswered. True if it is a write issued again after a pause.
    pub(super) fn entering_write(&self, rid: u64) -> bool {
        let Some(r) = self.reqs.get(&rid) else {
            unreachable!("write of request {rid} enters without its request");
        };
        assert!(
            r.local_pending && !r.replied && !r.is_flush,
            "request {rid} enters the write path twice"
        );
        r.parent.is_some()
    }

    /// Request `rid`'s write got its activity-log extents (`held`: the node
    /// keeps an activity log, released when the request is done).
    pub(super) fn hold_al(&mut self, rid: u64, held: bool) {
        let r = self.get_mut(rid, "activity log admitted");
        assert!(r.local_pending && !r.al_held);
        r.al_held = held;
    }

    /// Request `rid`'s write is issued: what its answer waits for from the
    /// peer (`mirrored`: the peer owes an ack).
    pub(super) fn issued(&mut self, rid: u64, wait_recv: bool, wait_ack: bool, mirrored: bool) {
        let r = self.get_mut(rid, "write issued");
        assert!(r.local_pending && !r.replied);
        r.wait_recv = wait_recv;
        r.wait_ack = wait_ack;
        r.ack_outstanding = mirrored;
    }

    /// Request `rid`'s local part is done (or dropped), with `error` (0: none;
    /// a nonzero error replaces one the peer side set).
    pub(super) fn local_done(&mut self, rid: u64, error: u32) {
        let r = self.get_mut(rid, "local part done");
        assert!(r.local_pending, "local part of request {rid} done twice");
        r.local_pending = false;
        if error != 0 {
            r.error = error;
        }
    }

    /// The peer received request `rid`'s write (RecvAck).
    pub(super) fn peer_received(&mut self, rid: u64) {
        self.get_mut(rid, "RecvAck").recv_got = true;
    }

    /// The peer acknowledged request `rid`'s write with `error`; it counts
    /// only if this disk (`local_good`) holds no good copy.
    pub(super) fn peer_acked(&mut self, rid: u64, error: u32, local_good: bool) {
        let q = self.get_mut(rid, "WriteAck");
        q.ack_outstanding = false;
        q.recv_got = true;
        if error != 0 && !local_good && q.error == 0 {
            // The peer failed it and the local disk is no good copy.
            q.error = error;
        }
    }

    /// The peer acknowledged flush `id`. Not every peer flush is a request
    /// (periodic flushes, a split's throttle): then nothing changes.
    pub(super) fn peer_flushed(&mut self, id: u64) {
        if let Some(q) = self.reqs.get_mut(&id) {
            q.ack_outstanding = false;
        }
    }

    /// Request `rid` was answered successfully to its client, though the peer
    /// still owes its acknowledgement (protocol A or B answered it first).
    pub(super) fn answered_before_peer(&self, rid: u64) -> bool {
        self.reqs
            .get(&rid)
            .is_some_and(|r| r.replied && r.error == 0 && r.ack_outstanding)
    }

    /// The peer will not answer request `rid`: done as far as the peer goes,
    /// failed (EIO) unless this disk (`local_good`) holds a good copy.
    pub(super) fn peer_gone(&mut self, rid: u64, local_good: bool) {
        // Legitimately gone: a flush a pause waited for that the session's
        // end (`on_peer_down`) answered and finished before it ended the pause
        // (`end_pause_alone`), which answers it again (mirror-sim seeds 77, 357).
        let Some(q) = self.reqs.get_mut(&rid) else {
            return;
        };
        q.ack_outstanding = false;
        if !local_good && q.error == 0 {
            q.error = errno::EIO;
        }
    }

    /// Every request not answered yet will fail with `error` (fencing's
    /// `peer-is-primary`, a stop while frozen; splits: [`Requests::fail_splits`]).
    pub(super) fn fail_unanswered(&mut self, error: u32) {
        for r in self.reqs.values_mut() {
            if !r.replied {
                r.error = error;
            }
        }
    }

    /// The write issued again for `parent` is answered with `error`: the
    /// peer owes `parent` nothing more.
    pub(super) fn answer_parent(&mut self, parent: u64, error: u32) {
        let Some(pr) = self.reqs.get_mut(&parent) else {
            unreachable!("the write issued again for {parent} outlived its request");
        };
        assert!(
            pr.ack_outstanding,
            "write {parent} answered twice by writes issued again"
        );
        pr.ack_outstanding = false;
        if error != 0 && pr.error == 0 {
            pr.error = error;
        }
    }

    /// Request `rid` is answered if the protocol allows (`suspended`: fencing
    /// holds replies): where its answer goes, if now, and whether it is done
    /// ([`Requests::finish`]). None: it finished at an earlier call (callers
    /// look again after every ack and completion).
    pub(super) fn settle(&mut self, rid: u64, suspended: bool) -> Option<(Option<Answer>, bool)> {
        self.check();
        let r = self.reqs.get_mut(&rid)?;
        // C/FUA/flush wait for the peer's WriteAck/FlushAck; B for its RecvAck; the link
        // going down clears `ack_outstanding`.
        let waiting_ack = r.wait_ack && r.ack_outstanding;
        let waiting_recv = r.wait_recv && !r.recv_got && r.ack_outstanding;
        let peer_ok = !waiting_ack && !waiting_recv;
        let mut answer = None;
        // Fencing holds replies until the peer is known outdated (fencing.rs).
        if !r.replied && !r.local_pending && peer_ok && !suspended {
            r.replied = true;
            let result = if r.error != 0 { Err(r.error) } else { Ok(None) };
            answer = Some(match (r.parent, r.split) {
                // A write issued again after a pause: it answers the original.
                (Some(parent), _) => Answer::Parent {
                    parent,
                    error: r.error,
                },
                (None, Some(split)) => Answer::Piece { split, result },
                (None, None) => Answer::Client {
                    conn: r.conn,
                    cookie: r.cookie,
                    result,
                },
            });
            assert!(self.unanswered > 0);
            self.unanswered -= 1;
        }
        let finished = r.replied && !r.local_pending && !r.ack_outstanding;
        self.check();
        Some((answer, finished))
    }

    /// Request `rid`, answered and done, is forgotten.
    pub(super) fn finish(&mut self, rid: u64) -> Finished {
        self.check();
        let Some(d) = self.reqs.remove(&rid) else {
            unreachable!("request {rid} finished twice");
        };
        assert!(
            d.replied && !d.local_pending && !d.ack_outstanding,
            "request {rid} finished before it was done"
        );
        if super::scan_checks(self.reqs.len()) {
            assert!(
                !self
                    .reqs
                    .values()
                    .any(|r| r.parent == Some(rid) && !r.replied),
                "request {rid} finished before the write issued again for it was answered"
            );
        }
        self.check();
        Finished {
            range: d.range,
            al_held: d.al_held,
        }
    }

    // ----- splits -----

    /// No split in flight.
    pub(super) fn no_splits(&self) -> bool {
        self.splits.is_empty()
    }

    /// The ids of the splits in flight, in id order.
    pub(super) fn split_ids(&self) -> Vec<u64> {
        self.splits.keys().copied().collect()
    }

    /// Split `sid` starts.
    pub(super) fn add_split(&mut self, sid: u64, s: Split) {
        assert!(s.in_flight == 0 && s.error == 0 && !s.cut);
        let old = self.splits.insert(sid, s);
        assert!(old.is_none(), "split {sid} inserted twice");
    }

    pub(super) fn split(&self, sid: u64) -> Option<&Split> {
        self.splits.get(&sid)
    }

    /// Split `sid`, if still in flight (a piece that failed at once finishes it).
    pub(super) fn split_mut(&mut self, sid: u64) -> Option<&mut Split> {
        self.splits.get_mut(&sid)
    }

    /// Split `sid`, with nothing in flight, is done and forgotten.
    pub(super) fn take_split(&mut self, sid: u64) -> Split {
        let Some(s) = self.splits.remove(&sid) else {
            unreachable!("split {sid} taken twice");
        };
        assert_eq!(s.in_flight, 0, "split {sid} done with pieces in flight");
        if super::scan_checks(self.reqs.len()) {
            assert!(
                !self
                    .reqs
                    .values()
                    .any(|r| r.split == Some(sid) && !r.replied),
                "split {sid} done with a piece unanswered"
            );
        }
        s
    }

    /// A piece of split `sid` was answered with `result`: the first error counts.
    pub(super) fn piece_answered(&mut self, sid: u64, result: &Result<Option<Bytes>, u32>) {
        let Some(s) = self.splits.get_mut(&sid) else {
            unreachable!("piece of unknown split {sid}");
        };
        assert!(s.in_flight > 0, "piece answered with none in flight");
        s.in_flight -= 1;
        if let Err(code) = result {
            if s.error == 0 {
                s.error = *code;
            }
        }
    }

    /// Every split starts no further piece and answers `error` once the
    /// pieces in flight are done.
    pub(super) fn fail_splits(&mut self, error: u32) {
        for s in self.splits.values_mut() {
            if s.error == 0 {
                s.error = error;
            }
        }
    }
}
