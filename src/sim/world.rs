//! Simulated time and the queue of things that will happen. Time is in
//! microseconds; events at the same time run in the order they were scheduled.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<E> {
    t: u64,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Entry<E> {
    // Reversed: the heap pops the earliest first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

pub struct World<E> {
    pub now: u64,
    seq: u64,
    heap: BinaryHeap<Entry<E>>,
}

impl<E> Default for World<E> {
    fn default() -> Self {
        World {
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
        }
    }
}

impl<E> World<E> {
    /// Schedules `ev` at `t` (never in the past).
    pub fn at(&mut self, t: u64, ev: E) {
        self.seq += 1;
        self.heap.push(Entry {
            t: t.max(self.now),
            seq: self.seq,
            ev,
        });
    }

    pub fn after(&mut self, dt: u64, ev: E) {
        self.at(self.now.saturating_add(dt), ev);
    }

    /// The next event; advances the clock to it.
    pub fn pop(&mut self) -> Option<E> {
        let e = self.heap.pop()?;
        debug_assert!(e.t >= self.now, "time went backwards");
        self.now = e.t;
        Some(e.ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_then_fifo() {
        let mut w = World::default();
        w.at(20, "c");
        w.at(10, "a");
        w.at(10, "b");
        assert_eq!(w.pop(), Some("a"));
        assert_eq!(w.pop(), Some("b"));
        w.after(0, "now");
        assert_eq!(w.pop(), Some("now"));
        assert_eq!(w.now, 10);
        assert_eq!(w.pop(), Some("c"));
        assert_eq!(w.now, 20);
    }
}
