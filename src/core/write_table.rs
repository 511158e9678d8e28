//! The disk order's entries: every local write, peer write and ordered read
//! this node has decided, from its admission until its last piece is done,
//! with the disk order (`ordering.rs`) that decides when each may start, owned
//! here so that the entries and the order change together.
//!
//! An entry is in one of three states:
//! - waiting: a local write admitted ([`WriteTable::add_waiting`]) but not in
//!   the disk order yet, because it waits for its activity-log extent or for a
//!   pause's end (`grace.rs`); it enters the order
//!   ([`WriteTable::enter_order`]) or is dropped ([`WriteTable::drop_waiting`]);
//! - ordered: in the disk order ([`WriteTable::enter`], `enter_order`) until
//!   every piece is done;
//! - taken: its last piece is done and its entry taken out
//!   ([`WriteTable::take`]), while its slot in the order is still there, until
//!   [`WriteTable::complete_in_order`] removes the slot.
//!
//! Invariants (checked at the top and bottom of the methods that change the
//! table, in O(1)): an id is entered once; every slot of the order is an
//! ordered entry or a taken one, every entry is waiting or ordered, so
//! `order.len() + waiting == entries.len() + taken`.

use std::collections::{BTreeSet, HashMap};

use super::node::{Origin, WriteEntry};
use super::ordering::{DiskOrder, Range};
use super::types::DiskOp;

#[derive(Debug)]
pub(super) struct WriteTable {
    order: DiskOrder,
    entries: HashMap<u64, WriteEntry>,
    /// Entries not in the disk order yet (waiting for the activity log or a pause).
    waiting: usize,
    /// Slots of the order whose entry was taken and which are not completed yet.
    taken: usize,
}

impl WriteTable {
    pub(super) fn new() -> WriteTable {
        WriteTable {
            order: DiskOrder::new(),
            entries: HashMap::new(),
            waiting: 0,
            taken: 0,
        }
    }

    /// The counts agree: every slot of the order has its entry or was taken,
    /// every entry is in the order or waiting (all O(1)).
    fn check(&self) {
        assert!(self.waiting <= self.entries.len());
        assert_eq!(
            self.order.len() + self.waiting,
            self.entries.len() + self.taken,
            "disk order and its entries disagree"
        );
    }

    pub(super) fn get(&self, wid: &u64) -> Option<&WriteEntry> {
        self.entries.get(wid)
    }

    pub(super) fn get_mut(&mut self, wid: &u64) -> Option<&mut WriteEntry> {
        self.entries.get_mut(wid)
    }

    /// No entry (and so nothing in the disk order, unless an entry is taken).
    pub(super) fn is_empty(&self) -> bool {
        self.check();
        self.entries.is_empty()
    }

    /// Local write `wid` is admitted; it enters the disk order later
    /// ([`WriteTable::enter_order`]), when its activity-log extent is durable
    /// and no pause holds it.
    pub(super) fn add_waiting(&mut self, wid: u64, e: WriteEntry) {
        self.check();
        assert!(!e.ready && !e.submitted, "write {wid} admitted as started");
        debug_assert!(!super::scan_checks(self.order.len()) || !self.order.contains(wid));
        let old = self.entries.insert(wid, e);
        assert!(old.is_none(), "write {wid} entered twice");
        self.waiting += 1;
        self.check();
    }

    /// Waiting entry `wid` of `range` enters the disk order (its `ready` is set here).
    pub(super) fn enter_order(&mut self, wid: u64, range: Range) {
        self.check();
        assert!(self.waiting > 0, "write {wid} enters the order, none waits");
        debug_assert!(
            !super::scan_checks(self.order.len()) || !self.order.contains(wid),
            "write {wid} is in the order already"
        );
        let Some(e) = self.entries.get_mut(&wid) else {
            panic!("write {wid} enters the disk order without its entry");
        };
        assert!(e.range == range && !e.submitted);
        e.ready = self.order.push(wid, range);
        self.waiting -= 1;
        self.check();
    }

    /// Entry `wid` enters the disk order at once (its `ready` is set here).
    pub(super) fn enter(&mut self, wid: u64, mut e: WriteEntry) {
        self.check();
        assert!(!e.submitted, "write {wid} entered as submitted");
        e.ready = self.order.push(wid, e.range);
        let old = self.entries.insert(wid, e);
        assert!(old.is_none(), "write {wid} entered twice");
        self.check();
    }

    /// Waiting entry `wid` is dropped before it entered the disk order.
    pub(super) fn drop_waiting(&mut self, wid: u64) {
        self.check();
        debug_assert!(!super::scan_checks(self.order.len()) || !self.order.contains(wid));
        let e = self.entries.remove(&wid);
        assert!(e.is_some(), "write {wid} to drop is not there");
        assert!(self.waiting > 0, "write {wid} dropped, none waits");
        self.waiting -= 1;
        self.check();
    }

    /// Every piece of entry `wid` is done: its entry. Its slot stays in the
    /// disk order until [`WriteTable::complete_in_order`].
    pub(super) fn take(&mut self, wid: u64) -> WriteEntry {
        self.check();
        debug_assert!(
            !super::scan_checks(self.order.len()) || self.order.contains(wid),
            "write {wid} done, not ordered"
        );
        let Some(e) = self.entries.remove(&wid) else {
            panic!("write {wid} done twice, or never entered");
        };
        self.taken += 1;
        self.check();
        e
    }

    /// Taken entry `wid` leaves the disk order: the entries it held back that
    /// may start now, in the order's order. The caller marks each ready
    /// ([`WriteTable::mark_ready`]) just before it tries to start it.
    pub(super) fn complete_in_order(&mut self, wid: u64) -> Vec<u64> {
        self.check();
        assert!(!self.entries.contains_key(&wid), "write {wid} is not taken");
        assert!(self.taken > 0, "write {wid} completes, none is taken");
        let next = self.order.complete(wid);
        self.taken -= 1;
        debug_assert!(!super::scan_checks(self.order.len()) || !self.order.contains(wid));
        self.check();
        next
    }

    /// Entry `wid`, held back by one that completed, may start.
    pub(super) fn mark_ready(&mut self, wid: u64) {
        let Some(e) = self.entries.get_mut(&wid) else {
            panic!("write {wid} made ready is not in the disk order");
        };
        e.ready = true;
    }

    /// The ids of all entries, in id (arrival) order.
    pub(super) fn ids_sorted(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The pieces of entries not handed to the disk yet.
    pub(super) fn queued_ops(&self) -> impl Iterator<Item = &DiskOp> {
        self.entries
            .values()
            .filter(|e| !e.submitted)
            .flat_map(|e| e.pieces.iter())
    }

    /// An NBD read waits in the disk order.
    pub(super) fn any_local_read(&self) -> bool {
        self.entries
            .values()
            .any(|e| matches!(e.origin, Origin::LocalRead { .. }))
    }

    /// An entry (in the order or waiting to enter it) overlaps `range`.
    pub(super) fn overlaps_any(&self, range: &Range) -> bool {
        self.entries.values().any(|e| e.range.overlaps(range))
    }

    /// A slot of the disk order (a taken one too) overlaps `range`.
    pub(super) fn order_overlaps(&self, range: &Range) -> bool {
        self.order.overlaps(range)
    }

    /// The ids of the peer's writes here.
    pub(super) fn peer_write_ids(&self) -> BTreeSet<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.origin, Origin::Peer { .. }))
            .map(|(k, _)| *k)
            .collect()
    }
}
