//! The per-disk write order: overlapping writes are never in flight on one disk
//! at once, and they reach the disk in the order this node decided them
//! (docs/CONFLICTS.md).

use std::collections::VecDeque;

/// A byte range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(start: u64, len: u64) -> Range {
        debug_assert!(start.checked_add(len).is_some());
        Range {
            start,
            end: start + len,
        }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// `range` minus every range in `holes`, as sorted, disjoint pieces.
pub fn subtract(range: Range, holes: &[Range]) -> Vec<Range> {
    let mut pieces = vec![range];
    for h in holes {
        let mut next = Vec::with_capacity(pieces.len() + 1);
        for p in pieces {
            if !p.overlaps(h) {
                next.push(p);
                continue;
            }
            if p.start < h.start {
                next.push(Range {
                    start: p.start,
                    end: h.start,
                });
            }
            if h.end < p.end {
                next.push(Range {
                    start: h.end,
                    end: p.end,
                });
            }
        }
        pieces = next;
    }
    pieces.sort_by_key(|r| r.start);
    pieces
}

#[derive(Debug)]
struct Slot {
    id: u64,
    range: Range,
    started: bool,
}

/// Writes (and resync reads) waiting for or in flight on the local disk, in decided order.
#[derive(Debug, Default)]
pub struct DiskOrder {
    slots: VecDeque<Slot>,
}

impl DiskOrder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Appends `id` at the end of the order. Returns true when it may start now
    /// (nothing earlier overlaps it); the caller then submits it.
    pub fn push(&mut self, id: u64, range: Range) -> bool {
        debug_assert!(
            !super::scan_checks(self.slots.len()) || self.slots.iter().all(|s| s.id != id),
            "id {id} pushed twice"
        );
        let free = !self.slots.iter().any(|s| s.range.overlaps(&range));
        self.slots.push_back(Slot {
            id,
            range,
            started: free,
        });
        free
    }

    /// Whether any entry overlaps `range` (waiting or in flight).
    pub fn overlaps(&self, range: &Range) -> bool {
        self.slots.iter().any(|s| s.range.overlaps(range))
    }

    /// Whether `id` is still in the order (not completed).
    pub fn contains(&self, id: u64) -> bool {
        self.slots.iter().any(|s| s.id == id)
    }

    /// Removes a started entry; returns the entries that may start now, in order.
    pub fn complete(&mut self, id: u64) -> Vec<u64> {
        let Some(pos) = self.slots.iter().position(|s| s.id == id) else {
            debug_assert!(false, "complete of unknown id {id}");
            return Vec::new();
        };
        let done = self
            .slots
            .remove(pos)
            .map(|s| s.range)
            .expect("the position was just found");
        let mut ready = Vec::new();
        for i in pos..self.slots.len() {
            if self.slots[i].started || !self.slots[i].range.overlaps(&done) {
                continue;
            }
            let r = self.slots[i].range;
            if !self.slots.iter().take(i).any(|s| s.range.overlaps(&r)) {
                self.slots[i].started = true;
                ready.push(self.slots[i].id);
            }
        }
        ready
    }

    /// Removes every entry (disk failure or shutdown); returns their ids.
    pub fn drain(&mut self) -> Vec<u64> {
        self.slots.drain(..).map(|s| s.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: u64, e: u64) -> Range {
        Range { start: s, end: e }
    }

    #[test]
    fn subtract_pieces() {
        assert_eq!(subtract(r(0, 10), &[]), vec![r(0, 10)]);
        assert_eq!(subtract(r(0, 10), &[r(3, 5)]), vec![r(0, 3), r(5, 10)]);
        assert_eq!(subtract(r(0, 10), &[r(0, 10)]), vec![]);
        assert_eq!(
            subtract(r(0, 10), &[r(8, 20), r(-0i64 as u64, 2)]),
            vec![r(2, 8)]
        );
        assert_eq!(subtract(r(5, 10), &[r(0, 4)]), vec![r(5, 10)]);
    }

    #[test]
    fn overlapping_writes_wait_in_order() {
        let mut o = DiskOrder::new();
        assert!(o.push(1, r(0, 4096)));
        assert!(o.push(2, r(8192, 12288)));
        assert!(!o.push(3, r(0, 512)));
        assert!(!o.push(4, r(256, 1024)));
        assert!(o.push(5, r(4096, 8192)));
        assert_eq!(o.complete(2), Vec::<u64>::new());
        assert_eq!(o.complete(1), vec![3]);
        assert_eq!(o.complete(3), vec![4]);
        assert_eq!(o.complete(4), Vec::<u64>::new());
        assert_eq!(o.complete(5), Vec::<u64>::new());
        assert!(o.is_empty());
    }

    proptest! {
        /// Simulates random completion orders: overlapping entries never run together and
        /// each range sees its writers in push order.
        #[test]
        fn never_two_overlapping_in_flight(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<u8>()), 1..60)) {
            let mut o = DiskOrder::new();
            let mut running: Vec<(u64, Range)> = Vec::new();
            let mut ranges = std::collections::HashMap::new();
            let mut last_writer = vec![0u64; 80];
            for (id, (start, len, pick)) in ops.iter().enumerate() {
                let id = id as u64 + 1;
                let rg = r(*start, start + len);
                ranges.insert(id, rg);
                if o.push(id, rg) { running.push((id, rg)); }
                // complete a random running one sometimes
                if pick % 3 == 0 && !running.is_empty() {
                    let (cid, crg) = running.remove(*pick as usize % running.len());
                    for b in crg.start..crg.end { prop_assert!(last_writer[b as usize] < cid); last_writer[b as usize] = cid; }
                    for n in o.complete(cid) { running.push((n, ranges[&n])); }
                }
                for (i, (_, a)) in running.iter().enumerate() {
                    for (_, b) in running.iter().skip(i + 1) { prop_assert!(!a.overlaps(b)); }
                }
            }
            while !running.is_empty() {
                let (cid, crg) = running.remove(0);
                for b in crg.start..crg.end { prop_assert!(last_writer[b as usize] < cid); last_writer[b as usize] = cid; }
                for n in o.complete(cid) { running.push((n, ranges[&n])); }
            }
            prop_assert!(o.is_empty());
        }
    }
}
