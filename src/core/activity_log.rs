//! The activity log: the set of "hot" 4 MiB extents that may hold writes not yet
//! known to be on both disks. It is persisted before a write to a cold extent
//! starts, so after a crash every block that may differ is covered by either the
//! persisted bitmap or a persisted active extent (DRBD's activity log idea).

use std::collections::{BTreeSet, HashMap};

use super::ordering::Range;

pub const EXTENT: u64 = 4 << 20;

#[derive(Debug, Default, Clone)]
struct Ext {
    /// Writes in flight in this extent.
    refs: u32,
    /// Logical clock of the last use, for LRU eviction.
    used: u64,
}

#[derive(Debug)]
pub struct ActivityLog {
    slots: usize,
    active: HashMap<u32, Ext>,
    clock: u64,
    /// Set being persisted by the transaction in flight, if any.
    pending: Option<BTreeSet<u32>>,
}

/// What a write needs before it may touch the disk.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Its extents are active and referenced: go.
    Go,
    /// Wait for an activity-log transaction.
    Wait,
}

pub fn extents_of(r: Range) -> std::ops::RangeInclusive<u32> {
    debug_assert!(!r.is_empty());
    let first = (r.start / EXTENT) as u32;
    let last = ((r.end - 1) / EXTENT) as u32;
    first..=last
}

impl ActivityLog {
    pub fn new(slots: usize, active: &[u32]) -> ActivityLog {
        assert!(slots >= 2, "activity log needs at least two slots");
        let mut al = ActivityLog {
            slots,
            active: HashMap::new(),
            clock: 0,
            pending: None,
        };
        for e in active.iter().take(slots) {
            al.active.insert(*e, Ext::default());
        }
        al
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.active.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn transaction_in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether every extent of `r` is active ([`ActivityLog::admit`] would say Go).
    pub fn covers(&self, r: Range) -> bool {
        extents_of(r).all(|e| self.active.contains_key(&e))
    }

    /// Tries to admit a write to `r`: takes a reference on its extents if all are active.
    pub fn admit(&mut self, r: Range) -> Admit {
        if r.is_empty() {
            return Admit::Go;
        }
        if self.covers(r) {
            self.clock += 1;
            for e in extents_of(r) {
                if let Some(x) = self.active.get_mut(&e) {
                    x.refs += 1;
                    x.used = self.clock;
                }
            }
            Admit::Go
        } else {
            Admit::Wait
        }
    }

    /// Drops the references a completed write took.
    pub fn release(&mut self, r: Range) {
        if r.is_empty() {
            return;
        }
        for e in extents_of(r) {
            if let Some(x) = self.active.get_mut(&e) {
                debug_assert!(x.refs > 0, "release of extent {e} without a reference");
                x.refs = x.refs.saturating_sub(1);
            }
        }
    }

    /// Plans a transaction that makes the extents of `wanted` active, evicting idle
    /// extents (least recently used first). Returns the new set and the evicted
    /// extents, or None if a transaction is already in flight or nothing can be
    /// evicted yet (all slots busy).
    pub fn plan(&mut self, wanted: &[Range]) -> Option<(Vec<u32>, Vec<u32>)> {
        if self.pending.is_some() {
            return None;
        }
        let mut need: BTreeSet<u32> = BTreeSet::new();
        let mut wanted_extents: BTreeSet<u32> = BTreeSet::new();
        for r in wanted.iter().filter(|r| !r.is_empty()) {
            for e in extents_of(*r) {
                wanted_extents.insert(e);
                if !self.active.contains_key(&e) {
                    need.insert(e);
                }
            }
        }
        // A write wider than the log could never be admitted: it would load
        // what fits, never evict what it needs itself, and wait forever with
        // every later write behind it. The node splits such writes (split.rs).
        assert!(
            wanted_extents.len() <= self.slots,
            "a write needs {} activity-log extents, the log has {} slots",
            wanted_extents.len(),
            self.slots
        );
        if need.is_empty() {
            return None;
        }
        // Never evict an extent a waiting write needs: a write spanning two
        // extents would otherwise evict one to load the other, forever (found by
        // the simulator: an endless stream of activity-log transactions).
        let mut idle: Vec<(u64, u32)> = self
            .active
            .iter()
            .filter(|(e, x)| x.refs == 0 && !wanted_extents.contains(e))
            .map(|(e, x)| (x.used, *e))
            .collect();
        idle.sort_unstable();
        let free = self.slots.saturating_sub(self.active.len());
        let mut evict = Vec::new();
        let mut room = free;
        let mut idle_iter = idle.into_iter();
        while room < need.len() {
            match idle_iter.next() {
                Some((_, e)) => {
                    evict.push(e);
                    room += 1;
                }
                None => break,
            }
        }
        if room == 0 {
            return None;
        }
        // Take as many needed extents as fit; the rest wait for the next transaction.
        let take: Vec<u32> = need.into_iter().take(room).collect();
        let mut set: BTreeSet<u32> = self.active.keys().copied().collect();
        for e in &evict {
            set.remove(e);
        }
        set.extend(take.iter().copied());
        debug_assert!(set.len() <= self.slots);
        self.pending = Some(set.clone());
        // Evicted extents leave the active set now: new writes to them must wait.
        for e in &evict {
            self.active.remove(e);
        }
        Some((set.into_iter().collect(), evict))
    }

    /// The planned transaction is durable: its extents are active.
    pub fn committed(&mut self) {
        if let Some(set) = self.pending.take() {
            for e in set {
                self.active.entry(e).or_default();
            }
        }
    }

    /// Forgets everything (after the whole bitmap is persisted and the log written empty).
    pub fn reset_idle(&mut self) -> bool {
        if self.active.values().all(|x| x.refs == 0) && self.pending.is_none() {
            self.active.clear();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_plan_commit_evict() {
        let mut al = ActivityLog::new(2, &[]);
        let r0 = Range::new(0, 4096);
        assert_eq!(al.admit(r0), Admit::Wait);
        let (set, evict) = al.plan(&[r0]).unwrap();
        assert_eq!((set, evict), (vec![0], vec![]));
        assert!(al.plan(&[r0]).is_none(), "one transaction at a time");
        al.committed();
        assert_eq!(al.admit(r0), Admit::Go);
        // A write spanning extents 1 and 2 needs two slots: extent 0 is busy, so only one fits.
        let r12 = Range::new(EXTENT * 2 - 512, 1024);
        assert_eq!(al.admit(r12), Admit::Wait);
        let (set, evict) = al.plan(&[r12]).unwrap();
        assert_eq!((set, evict), (vec![0, 1], vec![]));
        al.committed();
        assert_eq!(al.admit(r12), Admit::Wait);
        assert!(
            al.plan(&[r12]).is_none(),
            "extent 0 busy, 1 needed: no room"
        );
        al.release(r0);
        let (set, evict) = al.plan(&[r12]).unwrap();
        assert_eq!((set, evict), (vec![1, 2], vec![0]));
        al.committed();
        assert_eq!(al.admit(r12), Admit::Go);
        assert_eq!(al.active(), vec![1, 2]);
    }

    #[test]
    #[should_panic(expected = "activity-log extents, the log has 2 slots")]
    fn a_write_wider_than_the_log_is_refused_not_left_waiting() {
        let mut al = ActivityLog::new(2, &[]);
        let wide = Range::new(0, 3 * EXTENT);
        assert_eq!(al.admit(wide), Admit::Wait);
        al.plan(&[wide]);
    }

    /// Regression (simulator): with extents 0 and 1 busy and 2 active, a write
    /// spanning 2 and 3 used to evict 2 to load 3, then 3 to load 2, forever.
    #[test]
    fn never_evicts_an_extent_the_waiting_write_needs() {
        let mut al = ActivityLog::new(3, &[]);
        let (r0, r1, r2) = (
            Range::new(0, 512),
            Range::new(EXTENT, 512),
            Range::new(2 * EXTENT, 512),
        );
        al.plan(&[r0, r1, r2]).unwrap();
        al.committed();
        assert_eq!(al.admit(r0), Admit::Go);
        assert_eq!(al.admit(r1), Admit::Go);
        let r23 = Range::new(3 * EXTENT - 512, 1024);
        assert_eq!(al.admit(r23), Admit::Wait);
        // No room without evicting extent 2, which the write needs: wait.
        assert!(al.plan(&[r23]).is_none());
        al.release(r0);
        let (set, evict) = al.plan(&[r23]).unwrap();
        assert_eq!((set, evict), (vec![1, 2, 3], vec![0]));
        al.committed();
        assert_eq!(al.admit(r23), Admit::Go);
    }
}
