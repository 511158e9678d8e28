//! A link blip between two primaries is a pause, not a split brain.
//!
//! When the link of a dual-primary pair breaks (the connection went down, or a
//! ping went unanswered) and both disks were up to date, the node does not go
//! on alone at once. For `[net] reconnect-grace` it pauses instead:
//!
//! - the local writes the peer had not acknowledged stay unanswered (their
//!   ranges are marked out of sync), and so do flushes that waited for the
//!   peer's flush;
//! - new writes, trims, zeroes and flushes are held; reads go on;
//! - no generation starts and no fence-peer handler runs.
//!
//! If the link is back within the grace, the sync decision runs as after any
//! reconnect (same generations: a bitmap resync of the union of both sides'
//! marks, by name), and then every write that was unanswered at the cut is
//! issued again as a new replicated write ([`Resend`]), in its original order,
//! before the held requests; the original is answered when that write is on
//! both disks. A block's union resync may have brought the other side's older
//! data back over a write of ours; the write issued again lands after it on
//! both disks, so no acknowledged write is lost, and nothing was acknowledged
//! that is not on both disks. Overlapping writes of both primaries issued again
//! at the same time follow the conflict rules of docs/CONFLICTS.md.
//!
//! If the grace runs out, the node does what it would have done at the cut:
//! fence when configured, answer the unanswered writes from its own disk, start
//! a new generation, release what it held.
//!
//! A node that starts (a restart, an upgrade, a crash, a reboot) as one half of
//! such a pair pauses the same way before it has seen its peer: the start pause
//! ([`Node::begin_start_pause`]). Without it, a restarted primary took the
//! kernel's writes on its handed-over sockets at once, alone; if the peer's own
//! grace had run out meanwhile (a restart slower than the grace), both had
//! written apart: a split brain under OCFS2 (`make vm-two-host`, 2026-12-07).
//! With it, the restarted node writes nothing until the link is back (then it
//! is at worst the sync target of a peer that went on alone) or its own grace
//! runs out. This is DRBD's wait for the connection at start (`wfc-timeout`),
//! bounded by the grace.

use serde_json::json;

use super::node::Node;
use super::ordering::Range;
use super::types::*;

/// A local write the peer had not acknowledged when the link broke.
#[derive(Debug, Clone)]
pub(super) struct Resend {
    /// The request that waits for it (its reply, or the parent's).
    pub req: u64,
    pub range: Range,
    pub op: DiskOp,
    pub fua: bool,
}

#[derive(Debug)]
pub(super) struct Grace {
    pub since_ms: u64,
    pub reason: String,
    /// The peer's disk when the link broke (for fencing, if the grace runs out).
    pub peer_disk: Option<DiskState>,
    /// In the order they were first issued.
    pub resend: Vec<Resend>,
    /// Flushes that waited for the peer's FlushAck.
    pub flushes: Vec<u64>,
    /// Local writes admitted before the cut whose issue (to the disk order and
    /// the peer) came during the pause: write id and FUA, issued when it ends.
    pub unissued: Vec<(u64, bool)>,
    /// The start pause: nothing was replicated yet, so nothing is answered,
    /// fenced or put in a new generation when it ends (a promotion during it
    /// deferred its own generation and ran its own fencing).
    pub at_start: bool,
    /// `since_ms` is a time of the core's clock: false for the start pause
    /// until the first tick gives one.
    pub timed: bool,
}

impl Node {
    /// Whether a broken link is a pause: two primaries, both up to date and
    /// replicating, a grace configured (or a pause already running).
    pub(super) fn grace_applies(&self) -> bool {
        if self.freeze.grace().is_some() {
            return true;
        }
        self.cfg.reconnect_grace_ms > 0
            && self.cfg.allow_two_primaries
            && self.role == Role::Primary
            && !self.stopping
            && self.replicating()
            && self.disk == DiskState::UpToDate
            && self
                .session
                .peer
                .as_ref()
                .is_some_and(|p| p.role == Role::Primary && p.disk == DiskState::UpToDate)
    }

    /// The link broke (it went down, or the peer fell silent): a pause within
    /// the grace, or the end of the peer session.
    pub(super) fn on_link_lost(&mut self, reason: &str) {
        if self.grace_applies() {
            self.pause(reason);
        } else {
            self.on_peer_down(reason);
        }
    }

    /// Starts (or, after a reconnect that failed in its handshake, continues)
    /// the pause.
    fn pause(&mut self, reason: &str) {
        assert!(self.grace_applies());
        let peer_disk = self.session.peer.as_ref().map(|p| p.disk);
        let was_connected = self.conn == ConnState::Connected;
        let owed = self.end_session_state();
        if was_connected {
            self.notify(
                "peer-disconnected",
                json!({ "reason": reason, "pause_ms": self.cfg.reconnect_grace_ms }),
            );
        }
        // Marked now, before the flushes held in the pause may be answered
        // from this disk alone at its end.
        self.mark_peer_may_lack(&owed.unflushed);
        for r in owed.unflushed {
            self.bitmap.set_range(r);
        }
        let mut resend = Vec::new();
        for (_, r) in owed.recent {
            self.bitmap.set_range(r.range);
            if let (Some(req), Some((op, fua))) = (r.req, r.redo) {
                assert!(
                    self.reqs.contains(req),
                    "unacknowledged write {req} has no request"
                );
                resend.push(Resend {
                    req,
                    range: r.range,
                    op,
                    fua,
                });
            }
        }
        let flushes = self.reqs.flushes_awaiting_peer();
        self.fail_peer_reads(owed.reads);
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        match self.freeze.grace_mut() {
            Some(g) => {
                // A reconnect failed in its handshake: nothing was issued again yet.
                debug_assert!(resend.is_empty());
                g.flushes.extend(flushes);
                g.flushes.sort_unstable();
                g.flushes.dedup();
            }
            None => {
                let ranges: Vec<[u64; 2]> = resend
                    .iter()
                    .map(|r| [r.range.start, r.range.end])
                    .collect();
                self.notify(
                    "pause-started",
                    json!({ "writes": resend.len(), "ranges": ranges, "grace_ms": self.cfg.reconnect_grace_ms }),
                );
                self.freeze.begin_pause(super::grace::Grace {
                    since_ms: self.now_ms,
                    reason: reason.to_string(),
                    peer_disk,
                    resend,
                    flushes,
                    unissued: Vec::new(),
                    at_start: false,
                    timed: true,
                });
            }
        }
        debug_assert!(self.freeze.grace().is_some() && !self.replicating());
    }

    /// Whether a node that starts waits for its peer before it writes alone:
    /// one half of a dual-primary pair with a grace, its disk up to date and its
    /// peer not known to be outdated (then it could not have gone on alone).
    pub(super) fn start_pause_applies(&self) -> bool {
        self.cfg.reconnect_grace_ms > 0
            && self.cfg.allow_two_primaries
            && self.cfg.peer.is_some()
            && self.disk == DiskState::UpToDate
            && self.meta.flags & md_flags::PEER_OUTDATED == 0
    }

    /// At start, before any connection: writes, trims, zeroes and flushes are
    /// held until the link is up and replicating, or the grace (counted from
    /// the process's start) runs out.
    pub(super) fn begin_start_pause(&mut self) {
        assert!(self.start_pause_applies());
        assert!(self.freeze.grace().is_none() && !self.replicating());
        assert!(self.reqs.is_empty() && self.waits.none_held());
        self.notify(
            "pause-started",
            json!({ "writes": 0, "reason": "start", "grace_ms": self.cfg.reconnect_grace_ms }),
        );
        self.freeze.begin_pause(super::grace::Grace {
            since_ms: self.now_ms,
            reason: "started without the peer".to_string(),
            peer_disk: None,
            resend: Vec::new(),
            flushes: Vec::new(),
            unissued: Vec::new(),
            at_start: true,
            timed: false,
        });
        assert!(self.freeze.frozen());
    }

    /// On each tick: a pause that outlasts the grace ends without the peer.
    pub(super) fn grace_tick(&mut self) {
        if let Some(g) = self.freeze.grace_mut().filter(|g| !g.timed) {
            // The start pause counts from the first time the core is given.
            assert!(g.at_start);
            g.since_ms = self.now_ms;
            g.timed = true;
        }
        let expired = self
            .freeze
            .grace()
            .is_some_and(|g| self.now_ms.saturating_sub(g.since_ms) > self.cfg.reconnect_grace_ms);
        if expired && self.conn != ConnState::Connected {
            self.end_pause_alone();
        }
    }

    /// The grace ran out (or the session ended for good, or the node stops):
    /// what the loss of the peer would have done at the cut happens now.
    pub(super) fn end_pause_alone(&mut self) {
        // No pause running is normal: every stop and every end of a session calls this.
        let Some(g) = self.freeze.end_pause() else {
            return;
        };
        self.notify(
            "pause-ended",
            json!({ "reconnected": false, "after_ms": self.now_ms.saturating_sub(g.since_ms), "at_start": g.at_start }),
        );
        if g.at_start {
            // Nothing was replicated yet: nothing to answer, fence or start.
            assert!(g.resend.is_empty() && g.flushes.is_empty());
        } else {
            self.end_link_pause_alone(&g);
        }
        for (wid, fua) in g.unissued {
            self.issue_local_write(wid, fua);
        }
        self.release_held();
        debug_assert!(self.freeze.grace().is_none());
    }

    /// A link pause ran out: what the loss of the peer would have done at the
    /// cut (fencing, the unanswered writes and flushes answered from this disk,
    /// the new data generation).
    fn end_link_pause_alone(&mut self, g: &Grace) {
        assert!(!g.at_start);
        // Fence first: the replies below wait for its answer (fencing.rs).
        self.maybe_fence(g.peer_disk, &g.reason);
        let local_good = self.disk == DiskState::UpToDate;
        let waiting: Vec<u64> = g
            .resend
            .iter()
            .map(|r| r.req)
            .chain(g.flushes.iter().copied())
            .collect();
        for req in waiting {
            self.answer_without_peer(req, local_good);
        }
        let wrote = !g.resend.is_empty();
        if self.role == Role::Primary && local_good && self.meta.gis.bitmap == 0 {
            if !wrote {
                self.defer_generation(true);
            } else {
                // Answered from this disk alone: a new generation already.
                self.new_generation(true);
                self.persist_superblock(true);
            }
        }
    }

    /// A local write admitted before the cut is ready to be issued during the
    /// pause: it waits for the pause's end (issued alone it would reach this
    /// disk only, and a union resync could then overwrite it). True if held.
    pub(super) fn hold_for_pause(&mut self, wid: u64, fua: bool) -> bool {
        // Not paused: the write goes on (the common case).
        let Some(g) = self.freeze.grace_mut() else {
            return false;
        };
        debug_assert!(!g.unissued.iter().any(|(w, _)| *w == wid));
        g.unissued.push((wid, fua));
        true
    }

    /// The link is back and replicating: every write unanswered at the cut is
    /// issued again, then the peer flushes that were waited for.
    pub(super) fn end_pause_reconnected(&mut self) {
        assert!(self.replicating());
        // Called at every handshake's end; only a paused pair has a grace to end.
        let Some(g) = self.freeze.end_pause() else {
            return;
        };
        self.notify(
            "pause-ended",
            json!({ "reconnected": true, "after_ms": self.now_ms.saturating_sub(g.since_ms), "writes": g.resend.len(), "at_start": g.at_start }),
        );
        for r in g.resend {
            self.redo_write(r);
        }
        for (wid, fua) in g.unissued {
            self.issue_local_write(wid, fua);
        }
        for f in g.flushes {
            if self.reqs.awaits_peer(f) {
                self.send_peer_flush(f);
            }
        }
        debug_assert!(self.freeze.grace().is_none());
    }

    /// Issues `r`'s write again as a new replicated write; its completion
    /// answers the original request.
    fn redo_write(&mut self, r: Resend) {
        let rid = self.new_id();
        self.reqs.add_redo(rid, r.req, r.range);
        self.enter_local_write(rid, r.range, Some(r.op), r.fua);
    }
}
