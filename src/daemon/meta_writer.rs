//! The metadata writer: one thread that persists what the core asks, in order,
//! durably, and reports each write back.
//!
//! Its queue is bounded (docs/ARCHITECTURE.md, "Limits"). The core keeps one superblock
//! and one activity-log write in flight (`sb_txn`, `al_txn`), but asks for bitmap-page
//! writes whenever pages change, each with a snapshot of the whole bitmap. Bitmap writes
//! that queue up one behind the other therefore merge into one ([`MetaQueue::push`]): each
//! page is written with the value of the latest request that named it, as if they had
//! been written one after the other, and every merged request is reported done when the
//! merged write is. Merging never crosses a superblock or activity-log write, so the order
//! of those against the bitmap is the core's. The submitter cannot be made to wait
//! instead: it holds the core lock, which this thread needs to report a write done.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use super::lock;
use crate::core::{Event, MetaWrite};
use crate::storage::meta::{GenerationIds, MetaStore, Superblock, BITMAP_WORDS_PER_PAGE};

/// Writes queued (not counting the one being written) above which something is wrong with
/// the core's one-in-flight rule: at most one superblock and a few activity-log writes
/// (one in flight, plus those of start-up and stop), and merged bitmap writes between them.
pub const META_QUEUE_MAX: usize = 8;

/// One queued write.
#[derive(Debug)]
enum Entry {
    /// A superblock or activity-log write.
    One { id: u64, write: MetaWrite },
    /// Bitmap-page writes merged: `words` holds, for each page in `pages`, the value of
    /// the latest request that named it.
    Bitmap {
        ids: Vec<u64>,
        pages: BTreeSet<usize>,
        words: Arc<Vec<u64>>,
    },
}

/// The writer's queue, without the thread (sans-IO, tested below).
#[derive(Debug, Default)]
struct MetaQueue {
    entries: VecDeque<Entry>,
    /// The queue once passed [`META_QUEUE_MAX`] (logged once).
    overflowed: bool,
}

/// The words of `page` in a bitmap of `len` words (empty past the end).
fn page_range(page: usize, len: usize) -> Range<usize> {
    let start = page.saturating_mul(BITMAP_WORDS_PER_PAGE).min(len);
    start..start.saturating_add(BITMAP_WORDS_PER_PAGE).min(len)
}

impl MetaQueue {
    /// No two bitmap entries are next to each other (they would have merged).
    fn check(&self) {
        debug_assert!(
            !self
                .entries
                .iter()
                .zip(self.entries.iter().skip(1))
                .any(
                    |(a, b)| matches!(a, Entry::Bitmap { .. }) && matches!(b, Entry::Bitmap { .. })
                ),
            "two bitmap writes queued side by side"
        );
    }

    /// Queues `write`; a bitmap write merges into a bitmap write queued last.
    fn push(&mut self, id: u64, write: MetaWrite) {
        self.check();
        match write {
            MetaWrite::BitmapPages { pages, words } => match self.entries.back_mut() {
                Some(Entry::Bitmap {
                    ids,
                    pages: queued,
                    words: merged,
                }) if merged.len() == words.len() => {
                    let own = Arc::make_mut(merged);
                    for &p in &pages {
                        let r = page_range(p, own.len());
                        own[r.clone()].copy_from_slice(&words[r]);
                        queued.insert(p);
                    }
                    ids.push(id);
                }
                _ => self.entries.push_back(Entry::Bitmap {
                    ids: vec![id],
                    pages: pages.into_iter().collect(),
                    words,
                }),
            },
            write => self.entries.push_back(Entry::One { id, write }),
        }
        if self.entries.len() > META_QUEUE_MAX && !self.overflowed {
            self.overflowed = true;
            tracing::error!(
                "metadata queue holds {} writes (limit {META_QUEUE_MAX}): the core has more \
                 than one superblock or activity-log write in flight",
                self.entries.len()
            );
        }
        self.check();
    }

    fn pop(&mut self) -> Option<Entry> {
        self.entries.pop_front()
    }
}

struct Queue {
    state: Mutex<(MetaQueue, bool)>,
    ready: Condvar,
}

pub struct MetaWriter {
    queue: Arc<Queue>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl MetaWriter {
    /// `done` is called on the writer thread after each write.
    pub fn start(
        mut store: MetaStore,
        template: Superblock,
        done: impl Fn(Event) + Send + 'static,
    ) -> MetaWriter {
        let queue = Arc::new(Queue {
            state: Mutex::new((MetaQueue::default(), false)),
            ready: Condvar::new(),
        });
        let q = queue.clone();
        let join = std::thread::Builder::new()
            .name("meta-writer".into())
            .spawn(move || {
                while let Some(entry) = next(&q) {
                    let (ids, result) = match entry {
                        Entry::One { id, write } => {
                            (vec![id], write_one(&mut store, &template, &write))
                        }
                        Entry::Bitmap { ids, pages, words } => {
                            let pages: Vec<usize> = pages.into_iter().collect();
                            (ids, store.write_bitmap_pages(&words, &pages))
                        }
                    };
                    if let Err(e) = &result {
                        tracing::error!("metadata write failed: {e}");
                    }
                    for id in ids {
                        done(Event::MetaDone {
                            id,
                            ok: result.is_ok(),
                        });
                    }
                }
            })
            .expect("spawning the metadata writer thread");
        MetaWriter {
            queue,
            join: Some(join),
        }
    }

    /// Queues `write` (called under the core lock, so writes keep its order).
    pub fn submit(&self, id: u64, write: MetaWrite) {
        let mut st = lock(&self.queue.state);
        if st.1 {
            tracing::error!("metadata writer is stopping; write {id} dropped");
            return;
        }
        st.0.push(id, write);
        self.queue.ready.notify_one();
    }

    /// Waits until everything submitted is written.
    pub fn finish(mut self) {
        lock(&self.queue.state).1 = true;
        self.queue.ready.notify_one();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The next write, waiting for one; `None` once finishing and nothing is left.
fn next(q: &Queue) -> Option<Entry> {
    let mut st = lock(&q.state);
    loop {
        if let Some(e) = st.0.pop() {
            return Some(e);
        }
        if st.1 {
            return None;
        }
        st = q
            .ready
            .wait(st)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

fn write_one(
    store: &mut MetaStore,
    template: &Superblock,
    write: &MetaWrite,
) -> Result<(), crate::storage::meta::MetaError> {
    match write {
        MetaWrite::Superblock(m) => {
            let sb = Superblock {
                gi: GenerationIds {
                    current: m.gis.current,
                    bitmap: m.gis.bitmap,
                    history: m.gis.history,
                },
                flags: m.flags,
                resync_offset: m.resync_offset,
                ..template.clone()
            };
            store.write_superblock(&sb)
        }
        MetaWrite::ActivityLog(set) => store.write_activity_log(set),
        MetaWrite::BitmapPages { pages, words } => store.write_bitmap_pages(words, pages),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDS: usize = 3 * BITMAP_WORDS_PER_PAGE;

    fn bitmap(pages: &[usize], fill: u64) -> MetaWrite {
        MetaWrite::BitmapPages {
            pages: pages.to_vec(),
            words: Arc::new(vec![fill; WORDS]),
        }
    }

    fn ids(e: &Entry) -> Vec<u64> {
        match e {
            Entry::One { id, .. } => vec![*id],
            Entry::Bitmap { ids, .. } => ids.clone(),
        }
    }

    #[test]
    fn bitmap_writes_in_a_row_merge_with_each_page_at_its_latest_request() {
        let mut q = MetaQueue::default();
        // Many writes while the disk is slow: one entry, whatever their number.
        for i in 0..10_000u64 {
            q.push(i, bitmap(&[(i % 2) as usize], i));
        }
        assert_eq!(q.entries.len(), 1);
        let Some(Entry::Bitmap { ids, pages, words }) = q.pop() else {
            panic!("expected one merged bitmap write");
        };
        assert_eq!(
            ids,
            (0..10_000).collect::<Vec<_>>(),
            "every request reported"
        );
        assert_eq!(pages.into_iter().collect::<Vec<_>>(), vec![0, 1]);
        // Page 0 was last named by request 9998, page 1 by 9999; page 2 by none, so it
        // keeps the first snapshot's value (it is not written).
        assert!(words[page_range(0, WORDS)].iter().all(|&w| w == 9998));
        assert!(words[page_range(1, WORDS)].iter().all(|&w| w == 9999));
        assert!(words[page_range(2, WORDS)].iter().all(|&w| w == 0));
        assert!(q.pop().is_none());
    }

    #[test]
    fn merging_never_crosses_a_superblock_or_activity_log_write() {
        let mut q = MetaQueue::default();
        q.push(1, bitmap(&[0], 1));
        q.push(2, MetaWrite::ActivityLog(vec![3]));
        q.push(3, bitmap(&[1], 3));
        q.push(4, bitmap(&[2], 4));
        q.push(5, MetaWrite::ActivityLog(vec![4]));
        q.push(6, bitmap(&[0], 6));
        let order: Vec<Vec<u64>> = std::iter::from_fn(|| q.pop()).map(|e| ids(&e)).collect();
        assert_eq!(order, vec![vec![1], vec![2], vec![3, 4], vec![5], vec![6]]);
        assert!(!q.overflowed);
    }

    #[test]
    fn more_writes_queued_than_the_core_keeps_in_flight_is_flagged() {
        let mut q = MetaQueue::default();
        for i in 0..=META_QUEUE_MAX as u64 {
            q.push(i, MetaWrite::ActivityLog(vec![i as u32]));
        }
        assert_eq!(q.entries.len(), META_QUEUE_MAX + 1, "nothing is dropped");
        assert!(q.overflowed);
    }
}
