//! A simulated metadata store: what `Node::new` is given after a restart.
//! Writes are applied in order, one at a time, each after a delay, like the
//! daemon's metadata writer thread. A crash loses the queue; the write being
//! carried out when the power goes is lost, or lands whole, or (bitmap pages)
//! lands page by page.

use std::collections::VecDeque;

use super::rng::Rng;
use crate::core::{MetaState, MetaWrite};

/// What the metadata store holds durably.
#[derive(Debug, Clone)]
pub struct Durable {
    pub meta: MetaState,
    pub words: Vec<u64>,
    pub active_extents: Vec<u32>,
}

#[derive(Debug)]
pub struct SimMeta {
    pub durable: Durable,
    queue: VecDeque<(u64, MetaWrite)>,
    words_per_page: usize,
    /// Writes done so far (for the trace).
    pub writes: u64,
}

impl SimMeta {
    pub fn new(durable: Durable, bits_per_page: u64) -> SimMeta {
        SimMeta {
            durable,
            queue: VecDeque::new(),
            words_per_page: (bits_per_page / 64) as usize,
            writes: 0,
        }
    }

    /// Queues a write; true if the store was idle (the caller schedules its completion).
    pub fn push(&mut self, id: u64, write: MetaWrite) -> bool {
        self.queue.push_back((id, write));
        self.queue.len() == 1
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// The write at the head is durable: applies it and returns its id and whether
    /// another write waits.
    pub fn complete_head(&mut self) -> Option<(u64, bool)> {
        let (id, w) = self.queue.pop_front()?;
        self.apply(&w, None);
        self.writes += 1;
        Some((id, !self.queue.is_empty()))
    }

    /// The write at the head failed (EIO): nothing of it lands. Returns its id and
    /// whether another write waits.
    pub fn fail_head(&mut self) -> Option<(u64, bool)> {
        let (id, _) = self.queue.pop_front()?;
        Some((id, !self.queue.is_empty()))
    }

    fn apply(&mut self, w: &MetaWrite, rng: Option<&mut Rng>) {
        match w {
            MetaWrite::Superblock(m) => self.durable.meta = m.clone(),
            MetaWrite::ActivityLog(set) => self.durable.active_extents = set.clone(),
            MetaWrite::BitmapPages { pages, words } => {
                let mut rng = rng;
                for p in pages {
                    if let Some(r) = rng.as_deref_mut() {
                        if r.chance(0.5) {
                            continue;
                        }
                    }
                    let lo = (p * self.words_per_page).min(self.durable.words.len());
                    let hi = ((p + 1) * self.words_per_page)
                        .min(self.durable.words.len())
                        .min(words.len());
                    if lo < hi {
                        self.durable.words[lo..hi].copy_from_slice(&words[lo..hi]);
                    }
                }
            }
        }
    }

    /// Power loss: the write in progress is lost, lands whole, or (bitmap pages) lands
    /// page by page; the rest of the queue is lost.
    pub fn power_loss(&mut self, rng: &mut Rng) {
        if let Some((_, w)) = self.queue.pop_front() {
            match (&w, rng.below(3)) {
                (_, 0) => {}
                (MetaWrite::BitmapPages { .. }, 1) => self.apply(&w, Some(rng)),
                _ => self.apply(&w, None),
            }
        }
        self.queue.clear();
    }

    /// The process died: a write it had started lands, the rest is lost.
    pub fn process_crash(&mut self, rng: &mut Rng) {
        if let Some((_, w)) = self.queue.pop_front() {
            if rng.chance(0.5) {
                self.apply(&w, None);
            }
        }
        self.queue.clear();
    }
}
