//! The freeze: what holds local writes while this node may not go on alone.
//! Two causes, owned here so that no other file sets them field by field:
//!
//! - a fence-peer handler runs or ran without a usable answer (`fencing.rs`):
//!   writes are suspended until the handler's answer, an operator's
//!   `resume-io` or the peer's return lifts it;
//! - a link blip between two primaries, within its grace (`grace.rs`).
//!
//! Invariants: a handler starts only with none running, and its start freezes
//! I/O; a pause starts only with none running. The freeze may be lifted while
//! a handler still runs (a demotion, a failed disk): its answer still counts.

use super::grace::Grace;

#[derive(Debug, Default)]
pub(super) struct Freeze {
    /// Writes frozen while the fence-peer handler runs (see fencing.rs).
    suspended: bool,
    /// The running fence-peer handler's id.
    fence_id: Option<u64>,
    /// A link blip between two primaries, within its grace (grace.rs).
    grace: Option<Grace>,
}

impl Freeze {
    /// Writes, trims, zeroes and flushes are held (reads go on).
    pub(super) fn frozen(&self) -> bool {
        self.suspended || self.grace.is_some()
    }

    /// Suspended by fencing (not counting a pause).
    pub(super) fn suspended(&self) -> bool {
        self.suspended
    }

    pub(super) fn fence_running(&self) -> bool {
        self.fence_id.is_some()
    }

    /// A fence-peer handler `id` starts; writes freeze until it is answered.
    pub(super) fn begin_fence(&mut self, id: u64) {
        assert!(self.fence_id.is_none(), "one fence-peer handler at a time");
        self.fence_id = Some(id);
        self.suspended = true;
        assert!(self.frozen());
    }

    /// Handler `id` ended: true if it was the running one (its answer counts).
    /// The freeze stays until [`Freeze::lift`].
    pub(super) fn end_fence(&mut self, id: u64) -> bool {
        assert_ne!(id, 0, "operation ids start at 1");
        if self.fence_id != Some(id) {
            return false;
        }
        self.fence_id = None;
        true
    }

    /// The running handler (if any) is ignored from now on.
    pub(super) fn forget_fence(&mut self) {
        self.fence_id = None;
        assert!(!self.fence_running());
    }

    /// Lifts the fencing freeze; false if there was none.
    pub(super) fn lift(&mut self) -> bool {
        if !self.suspended {
            return false;
        }
        self.suspended = false;
        assert!(!self.suspended());
        true
    }

    pub(super) fn grace(&self) -> Option<&Grace> {
        self.grace.as_ref()
    }

    pub(super) fn grace_mut(&mut self) -> Option<&mut Grace> {
        self.grace.as_mut()
    }

    /// A pause between two primaries begins.
    pub(super) fn begin_pause(&mut self, g: Grace) {
        assert!(self.grace.is_none(), "one pause at a time");
        self.grace = Some(g);
        assert!(self.frozen());
    }

    /// The pause ends (or there was none).
    pub(super) fn end_pause(&mut self) -> Option<Grace> {
        let g = self.grace.take();
        assert!(self.grace.is_none());
        g
    }
}
