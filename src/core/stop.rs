//! The clean stop (SIGTERM), as two events from the edge: [`Event::StopBegin`]
//! when the listeners close, and [`Event::StopFinal`] once every request is
//! answered and the edge flushed the backing disk (or failed to).

use super::node::Node;
use super::types::*;

impl Node {
    /// A clean stop begins: writes frozen by fencing get ESHUTDOWN now (they
    /// reached this disk only and are not acknowledged) instead of holding the
    /// stop up until its time limit (simulator finding).
    pub(super) fn on_stop_begin(&mut self) {
        self.stopping = true;
        // A pause ends as its grace would have: the process is going away.
        self.end_pause_alone();
        self.stop_flush_tick();
        if !self.freeze.suspended() {
            return;
        }
        self.reqs.fail_unanswered(errno::ESHUTDOWN);
        self.reqs.fail_splits(errno::ESHUTDOWN);
        for (conn, cookie, req) in self.waits.take_held() {
            if matches!(req, IoRequest::Read { .. }) {
                self.hold(conn, cookie, req); // not frozen: goes on
                continue;
            }
            self.reply(conn, cookie, Err(errno::ESHUTDOWN));
        }
        self.freeze.forget_fence();
        self.resume_io("stopping");
    }

    /// A clean stop whose clients are idle asks the peer, once, to flush the
    /// writes it acknowledged or still has in flight, and waits for the answer ([`Node::stop_ready`])
    /// before its final metadata: a stop that left them unflushed marked
    /// `PEER_MAY_LACK`, and a planned failover (the stopped primary's peer
    /// promoted, writing, the old primary back) then ended in a split brain
    /// (chaos seed 1057296862449), though the peer never lost them. A link
    /// lost before the answer marks them as any link loss does.
    pub(super) fn stop_flush_tick(&mut self) {
        if !self.stopping
            || self.stop_peer_flush.is_some()
            || self.conn != ConnState::Connected
            || !self.clients_idle()
            || (!self.owed.has_unflushed() && self.owed.writes_in_flight() == 0)
        {
            return;
        }
        let id = self.new_id();
        self.send_peer_flush(id);
        self.stop_peer_flush = Some(id);
        assert!(self.owed.flush_pending(id));
    }

    /// What a clean stop waits for before [`Event::StopFinal`]: no NBD request
    /// in flight or held ([`Node::clients_idle`]), and, while the link is up,
    /// the peer's answer to the stop's flush if one was needed. Outside a
    /// stop, the same as `clients_idle` (a restart's drain).
    pub fn stop_ready(&self) -> bool {
        if !self.clients_idle() {
            return false;
        }
        if !self.stopping || self.conn != ConnState::Connected {
            return true;
        }
        // The flush follows every write sent so far on the link, so its answer
        // comes after their acknowledgements: writes still in flight wait for it
        // too (sent at the next tick if none was needed before).
        match self.stop_peer_flush {
            Some(id) => !self.owed.flush_pending(id),
            None => !self.owed.has_unflushed() && self.owed.writes_in_flight() == 0,
        }
    }

    /// Clean shutdown: persist the whole bitmap state, an empty activity log if
    /// idle, and the superblock without the primary mark. `data_flushed`: the
    /// edge flushed the backing disk after the last local write completed; if
    /// not (the flush failed), the activity log stays, so the next start marks
    /// its extents (simulator finding: the empty log was persisted before the
    /// final flush, a power cut in between lost a mirrored write on this disk,
    /// and no mark was left for it).
    pub(super) fn on_stop_final(&mut self, data_flushed: bool) {
        // The link goes with the process: writes the peer has not flushed yet may
        // still be lost there (simulator finding: after a clean stop and the peer's
        // power loss, an in-sync reconnect left the blocks different).
        let unflushed = self.owed.take_unflushed();
        self.mark_peer_may_lack(&unflushed);
        for r in unflushed {
            self.bitmap.set_range(r);
        }
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        if let Some(al) = self.txn.al_mut().filter(|_| data_flushed) {
            if al.reset_idle() {
                let id = self.new_id();
                self.out.push(Action::Persist {
                    id,
                    write: MetaWrite::ActivityLog(Vec::new()),
                });
            }
        }
        if self.writes.is_empty() && self.reqs.is_empty() {
            self.meta.flags &= !md_flags::PRIMARY;
        }
        self.persist_superblock(false);
    }
}
