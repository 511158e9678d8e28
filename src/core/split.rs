//! Large local writes in bounded pieces. A TRIM or WRITE_ZEROES may cover up to
//! 4 GiB - 1 (the whole device through repeated requests); applied as one
//! operation it needed more activity-log slots than the log has (it waited
//! forever, and every later write behind it) and one disk operation of a minute
//! on each disk (the kernel client and the peer's ko-count timed out).
//!
//! So a local write whose range spans more activity-log extents than
//! [`Node::piece_extents`] is cut at piece boundaries (multiples of that many
//! extents, 64 MiB by default) into pieces, and each piece is an ordinary local
//! write: disk order, activity-log gate, its own peer `Write` message and ack,
//! bitmap marking when not replicating. At most [`PIECES_IN_FLIGHT`] pieces of
//! one request are in flight; the next one starts when one is answered (by the
//! protocol's rule). The client's reply goes when every piece is answered, with
//! the first error any piece got. After an error no further piece starts.
//!
//! A TRIM has a time budget besides ([`CoreConfig::trim_budget_ms`], 5 s by
//! default): once a split TRIM has run longer than that, it starts no further
//! piece and answers the client success when the pieces in flight are done. On
//! a disk that discards slowly (UML guest disks: minutes for 4 GiB) the whole
//! range would outlast the kernel client's request timeout (15 s with our
//! attach agent), and the kernel would send it again on another connection.
//! This is allowed because an NBD TRIM is advisory: after it, the client may
//! assume nothing about the contents until it overwrites them. Both disks stay
//! identical: a skipped piece is written on neither (the peer applies only the
//! pieces it is sent, and they are sent only for pieces that start here), and
//! nothing is marked out of sync for it. WRITE_ZEROES has no budget: its zeroes
//! are promised.
//!
//! The activity log then only needs the extents of the pieces in flight, the
//! peer applies each piece as its own bounded disk operation, and other
//! requests interleave with the pieces (they queue between them in the
//! activity-log queue instead of behind the whole range).

use super::activity_log::{extents_of, EXTENT};
use super::node::Node;
use super::ordering::Range;
use super::types::*;

/// Pieces of one request in flight at once: while one is on the disks, the
/// activity-log transaction (and the peer message) of the next one proceeds.
pub(super) const PIECES_IN_FLIGHT: u32 = 2;

/// Most activity-log extents one piece spans (16 x 4 MiB = 64 MiB): the
/// default of [`CoreConfig::max_piece_extents`].
pub const MAX_PIECE_EXTENTS: u64 = 16;

/// A local write being carried out in pieces.
#[derive(Debug)]
pub(super) struct Split {
    pub conn: ConnId,
    pub cookie: u64,
    /// The whole request's operation; pieces are cut from it.
    pub op: DiskOp,
    pub range: Range,
    pub fua: bool,
    /// Where the next piece starts.
    pub next: u64,
    pub in_flight: u32,
    /// The first error a piece got (0: none).
    pub error: u32,
    /// When it started (the core's clock, `now_ms`).
    pub started_ms: u64,
    /// A TRIM whose budget ran out: no further piece starts; `next` is where
    /// the skipped rest begins.
    pub cut: bool,
}

impl Node {
    /// Extents per piece: 16 (64 MiB; `max_piece_extents`), fewer when the
    /// activity log has fewer slots, so that any piece fits in the log.
    pub(super) fn piece_extents(&self) -> u64 {
        let slots = self.txn.al().map_or(usize::MAX, |al| al.slots());
        self.cfg.max_piece_extents.min(slots as u64).max(1)
    }

    /// Whether a local write of `range` is carried out in pieces.
    pub(super) fn needs_split(&self, range: Range) -> bool {
        !range.is_empty() && extents_of(range).count() as u64 > self.piece_extents()
    }

    /// Starts a local write of `range` (carried out by `op`) in pieces.
    pub(super) fn start_split(
        &mut self,
        conn: ConnId,
        cookie: u64,
        range: Range,
        op: DiskOp,
        fua: bool,
    ) {
        assert!(
            self.needs_split(range),
            "split of a write that fits: {range:?}"
        );
        debug_assert!(matches!(
            op,
            DiskOp::Write { .. } | DiskOp::Trim { .. } | DiskOp::WriteZeroes { .. }
        ));
        let sid = self.new_id();
        self.splits.insert(
            sid,
            Split {
                conn,
                cookie,
                op,
                range,
                fua,
                next: range.start,
                in_flight: 0,
                error: 0,
                started_ms: self.now_ms,
                cut: false,
            },
        );
        self.pump_split(sid);
    }

    /// Whether new local writes must wait now (as `on_request` holds them).
    fn local_writes_held(&self) -> bool {
        self.session.handshake.is_some()
            || self.session.promote_confirm.is_some()
            || self.freeze.frozen()
    }

    /// While replicating: whether the peer holds too many of our writes that
    /// it acknowledged but has not flushed for another piece to start. An
    /// activity-log extent evicted with such writes in it is marked out of
    /// sync (`try_al_transaction`); a whole-device TRIM outruns the periodic
    /// peer flush (once a second) by gigabytes, and marked 704 MiB of a 6 GiB
    /// pair that way. So past a quarter of the log's span a split asks the
    /// peer to flush, and past half of it it waits for that flush (it goes on
    /// at the next answer of a piece or tick).
    fn peer_flush_throttle(&mut self) -> bool {
        let Some(al) = self.txn.al().filter(|_| self.replicating()) else {
            return false;
        };
        let span = al.slots() as u64 * EXTENT;
        let unflushed: u64 = self.unflushed.values().map(|r| r.len()).sum();
        if unflushed >= span / 4 && self.flush_marks.is_empty() {
            let id = self.new_id();
            self.send_peer_flush(id);
        }
        unflushed >= span / 2
    }

    /// Starts the pieces of split `sid` that may start, and answers the client
    /// once nothing is left to do.
    pub(super) fn pump_split(&mut self, sid: u64) {
        let bytes = self.piece_extents() * EXTENT;
        let (now, budget) = (self.now_ms, self.cfg.trim_budget_ms);
        // At most one pass per piece; a piece that fails at once ends the loop.
        for _ in 0..PIECES_IN_FLIGHT {
            let held = self.local_writes_held() || self.peer_flush_throttle();
            let serves = self.role == Role::Primary;
            let Some(s) = self.splits.get_mut(&sid) else {
                return; // finished by a piece that failed at once (below)
            };
            debug_assert!(s.next <= s.range.end && s.in_flight <= PIECES_IN_FLIGHT);
            if s.error == 0 && s.next < s.range.end && !serves {
                // Demoted under it: no further piece may be written here.
                s.error = errno::EPERM;
            }
            if s.error == 0
                && !s.cut
                && s.next < s.range.end
                && matches!(s.op, DiskOp::Trim { .. })
                && now.saturating_sub(s.started_ms) > budget
            {
                // Out of time: the rest is skipped (module doc).
                s.cut = true;
            }
            if s.error != 0
                || s.cut
                || s.next >= s.range.end
                || s.in_flight >= PIECES_IN_FLIGHT
                || held
            {
                break;
            }
            let start = s.next;
            let end = s.range.end.min((start / bytes + 1) * bytes);
            let piece = Range::new(start, end - start);
            s.next = end;
            s.in_flight += 1;
            let op = piece_op(&s.op, s.range.start, piece);
            let (conn, cookie, fua) = (s.conn, s.cookie, s.fua);
            self.local_write(conn, cookie, piece, Some(op), fua, Some(sid));
        }
        // A piece that failed at once may have finished the split inside the loop.
        let Some(s) = self.splits.get(&sid) else {
            return;
        };
        let done = s.in_flight == 0 && (s.error != 0 || s.cut || s.next >= s.range.end);
        if done {
            let s = self.splits.remove(&sid).expect("split present");
            if s.cut && s.error == 0 {
                self.trim_cut_short(&s);
            }
            let result = if s.error != 0 { Err(s.error) } else { Ok(None) };
            self.reply(s.conn, s.cookie, result);
        }
        debug_assert!(self
            .splits
            .get(&sid)
            .is_none_or(|s| s.in_flight <= PIECES_IN_FLIGHT));
    }

    /// Split TRIM `s` ran out of its budget and is answered success: count it
    /// and say so (once per request, at info level in the daemon's log).
    fn trim_cut_short(&mut self, s: &Split) {
        let applied = s.next - s.range.start;
        let skipped = s.range.end - s.next;
        self.trim_budget_stats.trims_cut_short += 1;
        self.trim_budget_stats.bytes_skipped += skipped;
        let budget = self.cfg.trim_budget_ms;
        let message = format!(
            "TRIM of {} bytes at {}: applied {applied} bytes within the {} budget, \
             skipped the rest (TRIM is advisory)",
            s.range.len(),
            s.range.start,
            if budget >= 1000 && budget % 1000 == 0 {
                format!("{} s", budget / 1000)
            } else {
                format!("{budget} ms")
            },
        );
        self.notify(
            "trim-budget",
            serde_json::json!({
                "offset": s.range.start,
                "len": s.range.len(),
                "applied_bytes": applied,
                "skipped_bytes": skipped,
                "budget_ms": budget,
                "message": message,
            }),
        );
    }

    /// A piece of split `sid` got its answer (what a whole request's reply would be).
    pub(super) fn piece_done(&mut self, sid: u64, result: &Result<Option<bytes::Bytes>, u32>) {
        let s = self
            .splits
            .get_mut(&sid)
            .unwrap_or_else(|| panic!("piece of unknown split {sid}"));
        assert!(s.in_flight > 0, "piece answered with none in flight");
        s.in_flight -= 1;
        if let Err(code) = result {
            if s.error == 0 {
                s.error = *code;
            }
        }
        self.pump_split(sid);
    }

    /// Splits whose next pieces waited (handshake, promotion check, freeze,
    /// peer flush) go on.
    pub(super) fn resume_splits(&mut self) {
        let ids: Vec<u64> = self.splits.keys().copied().collect();
        for sid in ids {
            self.pump_split(sid);
        }
    }

    /// A clean stop while frozen: splits start no further piece and answer
    /// ESHUTDOWN once the pieces in flight are done.
    pub(super) fn stop_splits(&mut self, error: u32) {
        for s in self.splits.values_mut() {
            if s.error == 0 {
                s.error = error;
            }
        }
    }
}

/// The operation for `piece` of a request whose operation `op` starts at `start`.
fn piece_op(op: &DiskOp, start: u64, piece: Range) -> DiskOp {
    match op {
        DiskOp::Write { data, fua, .. } => {
            let rel = (piece.start - start) as usize;
            DiskOp::Write {
                offset: piece.start,
                data: data.slice(rel..rel + piece.len() as usize),
                fua: *fua,
            }
        }
        DiskOp::Trim { .. } => DiskOp::Trim {
            offset: piece.start,
            len: piece.len(),
        },
        DiskOp::WriteZeroes { may_trim, .. } => DiskOp::WriteZeroes {
            offset: piece.start,
            len: piece.len(),
            may_trim: *may_trim,
        },
        other => unreachable!("not a write: {other:?}"),
    }
}
