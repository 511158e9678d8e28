//! The resync sub-state: the resync or verify this node drives as sync source,
//! the progress of the one it receives as sync target, what a cut verify
//! resumes from, and the counters for `status`. `resync.rs` drives it through
//! these methods; no other file reaches into its fields.
//!
//! Invariants: this node is sync source or sync target of one resync, never
//! both; one driven resync at a time.

use super::ordering::Range;
use super::resync::{Resync, TargetProgress};
use super::types::SyncCounters;

#[derive(Debug, Default)]
pub(super) struct SyncState {
    /// The resync or verify this node drives (sync or verify source).
    source: Option<Resync>,
    /// Progress of the resync this node receives, while it is sync target.
    target: Option<TargetProgress>,
    /// Ranges of our writes the peer failed (error acks) while this node is sync
    /// target: the clear-all at the end of the resync must leave them marked.
    target_neg_acked: Vec<Range>,
    /// Differing blocks the last finished verify found.
    last_verify: Option<u64>,
    /// A verify the lost link cut: (first block not verified, differing so far).
    verify_resume: Option<(u64, u64)>,
    /// Resync counters for `status` (bytes moved, resyncs run).
    stats: SyncCounters,
}

impl SyncState {
    fn invariants(&self) {
        assert!(
            self.source.is_none() || self.target.is_none(),
            "sync source and sync target at once"
        );
    }

    /// The resync or verify this node drives, if any.
    pub(super) fn source(&self) -> Option<&Resync> {
        self.source.as_ref()
    }

    pub(super) fn source_mut(&mut self) -> Option<&mut Resync> {
        self.source.as_mut()
    }

    /// A resync or verify driven by this node starts (a verify: `counted` false).
    pub(super) fn begin_source(&mut self, r: Resync, counted: bool) {
        self.invariants();
        assert!(self.source.is_none(), "one resync at a time");
        if r.verify {
            self.last_verify = None;
        }
        self.stats.resyncs_started += counted as u64;
        self.source = Some(r);
        self.invariants();
    }

    /// The driven resync or verify ends (or there was none).
    pub(super) fn take_source(&mut self) -> Option<Resync> {
        let r = self.source.take();
        assert!(self.source.is_none());
        r
    }

    /// A finished verify's result.
    pub(super) fn verify_finished(&mut self, differing_blocks: u64) {
        assert!(
            self.source.is_none(),
            "the verify is taken before it finishes"
        );
        self.last_verify = Some(differing_blocks);
    }

    /// The peer reported the result of a verify it drove.
    pub(super) fn peer_verify_finished(&mut self, differing_blocks: u64) {
        self.last_verify = Some(differing_blocks);
    }

    pub(super) fn last_verify(&self) -> Option<u64> {
        self.last_verify
    }

    /// A verify cut at block `from` with `differing` found: resumed later.
    pub(super) fn set_verify_resume(&mut self, from: u64, differing: u64) {
        assert!(self.source.is_none(), "the cut verify is taken first");
        self.verify_resume = Some((from, differing));
    }

    pub(super) fn verify_resume(&self) -> Option<(u64, u64)> {
        self.verify_resume
    }

    pub(super) fn forget_verify_resume(&mut self) {
        self.verify_resume = None;
    }

    /// The progress of the resync this node receives, if any.
    pub(super) fn target(&self) -> Option<&TargetProgress> {
        self.target.as_ref()
    }

    pub(super) fn target_mut(&mut self) -> Option<&mut TargetProgress> {
        self.target.as_mut()
    }

    /// This node starts to receive a resync.
    pub(super) fn begin_target(&mut self, now_ms: u64) {
        self.invariants();
        self.stats.resyncs_started += 1;
        self.target = Some(TargetProgress::new(now_ms));
        self.target_neg_acked.clear();
        self.invariants();
    }

    /// The received resync ended, finished or not.
    pub(super) fn end_target(&mut self) {
        self.target = None;
        self.invariants();
    }

    /// The peer failed our write of `range` while this node is sync target.
    pub(super) fn target_write_failed(&mut self, range: Range) {
        self.target_neg_acked.push(range);
        self.invariants();
    }

    /// The ranges the peer failed during the received resync, taken once.
    pub(super) fn take_target_failed(&mut self) -> Vec<Range> {
        std::mem::take(&mut self.target_neg_acked)
    }

    pub(super) fn stats(&self) -> SyncCounters {
        self.stats
    }

    pub(super) fn stats_mut(&mut self) -> &mut SyncCounters {
        &mut self.stats
    }
}
