//! Fencing: a primary that loses an up-to-date peer freezes writes, asks the
//! fence-peer handler to outdate (or power off) the peer, and resumes per the
//! handler's exit code, with DRBD's meanings:
//!
//! | exit | meaning                                   | what the node does                    |
//! |------|-------------------------------------------|---------------------------------------|
//! | 3    | the peer's disk was already Inconsistent  | resume; peer marked outdated          |
//! | 4    | the peer's disk is now (or was) Outdated  | resume; peer marked outdated          |
//! | 5    | the peer could not be reached             | resume if our disk is up to date (the |
//! |      |                                           | peer is taken as down), else stay     |
//! |      |                                           | frozen                                |
//! | 6    | the peer refused: it is primary           | our disk becomes Outdated; frozen and |
//! |      |                                           | later writes fail with EIO            |
//! | 7    | the peer was fenced off (STONITH)         | resume; peer marked outdated          |
//! | else | the handler is broken                     | stay frozen until the peer reconnects |
//! |      |                                           | or `mirrorctl resume-io`              |
//!
//! While frozen, new writes, trims, zeroes and flushes are held (not failed),
//! and replies to writes that were in flight when the link broke are held too:
//! they reached only this disk, and acknowledging them before the peer is known
//! to be outdated would let a promoted peer go on without them. Reads go on.
//! "Peer outdated" is persisted (md_flags::PEER_OUTDATED) so a later promotion
//! without the peer does not fence again; it is cleared when the peer connects.

use serde_json::json;

use super::node::Node;
use super::types::*;
use crate::config::Fencing;

impl Node {
    /// The link to a peer whose disk was `peer_disk` just went (or this node was
    /// promoted without its peer): fence when configured and needed.
    pub(super) fn maybe_fence(&mut self, peer_disk: Option<DiskState>, why: &str) {
        if self.cfg.fencing == Fencing::DontCare
            || self.cfg.peer.is_none()
            || self.role != Role::Primary
            || self.conn == ConnState::Connected
            || self.freeze.fence_running()
            || self.meta.flags & md_flags::PEER_OUTDATED != 0
        {
            return;
        }
        // Only a peer that might hold up-to-date data can be promoted and diverge.
        if matches!(
            peer_disk,
            Some(DiskState::Inconsistent | DiskState::Outdated | DiskState::Failed)
        ) {
            return;
        }
        let id = self.new_id();
        self.freeze.begin_fence(id);
        self.out.push(Action::FencePeer { id });
        self.notify(
            "fence-peer",
            json!({ "reason": why, "fencing": self.cfg.fencing, "io": "writes frozen" }),
        );
        if self.stopping {
            // Stopping: what the freeze would hold fails now instead of holding
            // the stop (simulator finding: the link broke during a clean stop).
            self.on_stop_begin();
        }
        // Postcondition: frozen with the handler running, or (stopping) not at all.
        assert!(self.stopping || (self.freeze.suspended() && self.freeze.fence_running()));
    }

    /// The fence-peer handler ended.
    pub(super) fn on_fence_done(&mut self, id: u64, exit: Option<i32>) {
        if !self.freeze.end_fence(id) {
            return; // the peer came back meanwhile; its answer no longer matters
        }
        let up_to_date = self.disk == DiskState::UpToDate;
        let outcome = match exit {
            Some(3) => "peer-inconsistent",
            Some(4) => "peer-outdated",
            Some(5) if up_to_date => "peer-unreachable",
            Some(5) => "peer-unreachable-and-local-disk-not-up-to-date",
            Some(7) => "peer-fenced",
            Some(6) => "peer-is-primary",
            _ => "handler-failed",
        };
        let stonith_mismatch = exit == Some(7) && self.cfg.fencing != Fencing::ResourceAndStonith;
        self.notify(
            "fence-peer-done",
            json!({ "exit": exit, "outcome": outcome, "stonith_without_stonith_policy": stonith_mismatch }),
        );
        match outcome {
            "peer-inconsistent" | "peer-outdated" | "peer-unreachable" | "peer-fenced" => {
                self.meta.flags |= md_flags::PEER_OUTDATED;
                self.persist_superblock(false);
                self.resume_io(outcome);
            }
            "peer-is-primary" => {
                // The peer goes on as primary: our data is the older one now.
                // An inconsistent disk stays inconsistent (simulator finding: a
                // sync target made "outdated" looked whole, and its data was
                // later refused as unrelated instead of resynced).
                if self.disk == DiskState::UpToDate {
                    self.disk = DiskState::Outdated;
                }
                self.meta.flags &= !md_flags::WAS_UP_TO_DATE;
                self.persist_superblock(false);
                let mut held: Vec<u64> = self
                    .reqs
                    .iter()
                    .filter(|(_, r)| !r.replied)
                    .map(|(k, _)| *k)
                    .collect();
                held.sort_unstable();
                for rid in held {
                    if let Some(r) = self.reqs.get_mut(&rid) {
                        r.error = errno::EIO;
                    }
                }
                self.resume_io(outcome);
            }
            _ => {
                // Stay frozen: an operator decides (resume-io), or the peer returns.
            }
        }
        // Postcondition: the handler's answer is taken, whatever it was.
        assert!(!self.freeze.fence_running());
    }

    /// Lifts the freeze: held requests go on, held replies go out.
    pub(super) fn resume_io(&mut self, by: &str) {
        if !self.freeze.lift() {
            return;
        }
        self.notify("io-resumed", json!({ "by": by }));
        let mut pending: Vec<u64> = self.reqs.keys().copied().collect();
        pending.sort_unstable(); // deterministic reply order
        for rid in pending {
            self.maybe_finish(rid);
        }
        self.release_held();
        assert!(
            !self.freeze.suspended(),
            "a freeze lifted is not frozen again by its own replies"
        );
    }

    /// `mirrorctl resume-io`.
    pub(super) fn admin_resume_io(&mut self) -> Result<String, String> {
        if !self.freeze.suspended() {
            return Err("I/O is not suspended".into());
        }
        // A handler still running is ignored from now on.
        self.freeze.forget_fence();
        self.resume_io("operator");
        Ok("resumed".into())
    }

    /// The peer is connected again: its disk state is known, fencing is over.
    pub(super) fn fencing_peer_back(&mut self) {
        self.freeze.forget_fence();
        if self.meta.flags & md_flags::PEER_OUTDATED != 0 {
            self.meta.flags &= !md_flags::PEER_OUTDATED;
            self.persist_superblock(false);
        }
        self.resume_io("peer-reconnected");
        assert!(!self.freeze.fence_running() && !self.freeze.suspended());
        assert_eq!(self.meta.flags & md_flags::PEER_OUTDATED, 0);
    }
}
