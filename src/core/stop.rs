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
