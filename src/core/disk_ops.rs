//! The core's identifiers and the disk operations in flight: every id the core
//! hands out (disk ops, requests, flushes, metadata writes, handlers) comes
//! from one counter here, and every `Action::Disk` the core emits has its
//! [`Io`] here until its `DiskDone` arrives, owned here so that no other file
//! changes the table field by field.
//!
//! Invariants (asserted in the methods): ids are nonzero and never reused; a
//! disk op is registered once, under an id already handed out, and completes
//! once.

use std::collections::HashMap;

use super::node::Io;

#[derive(Debug)]
pub(super) struct DiskOps {
    /// The next identifier to hand out.
    next_id: u64,
    /// Disk operations in flight, by id.
    ios: HashMap<u64, Io>,
}

impl Default for DiskOps {
    fn default() -> DiskOps {
        DiskOps {
            next_id: 1,
            ios: HashMap::new(),
        }
    }
}

impl DiskOps {
    /// A fresh identifier (for a disk op or anything else the core numbers).
    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        assert!(id > 0 && id < self.next_id);
        id
    }

    /// Disk op `id` (handed out by [`DiskOps::new_id`]) starts as `io`.
    pub(super) fn begin(&mut self, id: u64, io: Io) {
        assert!(
            id > 0 && id < self.next_id,
            "disk op {id} was never handed out"
        );
        let old = self.ios.insert(id, io);
        assert!(old.is_none(), "disk op {id} started twice");
    }

    /// Disk op `id` completed: what it was (None: unknown id).
    pub(super) fn complete(&mut self, id: u64) -> Option<Io> {
        let io = self.ios.remove(&id);
        debug_assert!(!self.ios.contains_key(&id));
        io
    }

    /// No disk op is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.ios.is_empty()
    }

    /// A client's read is in flight on the disk.
    pub(super) fn client_read_in_flight(&self) -> bool {
        self.ios.values().any(|io| matches!(io, Io::Read { .. }))
    }
}
