//! The metadata writer: one thread that persists what the core asks, in order,
//! durably, and reports each write back.

use std::sync::mpsc;

use crate::core::{Event, MetaWrite};
use crate::storage::meta::{GenerationIds, MetaStore, Superblock};

pub struct MetaWriter {
    tx: mpsc::Sender<(u64, MetaWrite)>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl MetaWriter {
    /// `done` is called on the writer thread after each write.
    pub fn start(
        mut store: MetaStore,
        template: Superblock,
        done: impl Fn(Event) + Send + 'static,
    ) -> MetaWriter {
        let (tx, rx) = mpsc::channel::<(u64, MetaWrite)>();
        let join = std::thread::Builder::new()
            .name("meta-writer".into())
            .spawn(move || {
                for (id, write) in rx {
                    let result = match &write {
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
                        MetaWrite::BitmapPages { pages, words } => {
                            store.write_bitmap_pages(words, pages)
                        }
                    };
                    if let Err(e) = &result {
                        tracing::error!("metadata write failed: {e}");
                    }
                    done(Event::MetaDone {
                        id,
                        ok: result.is_ok(),
                    });
                }
            })
            .expect("spawning the metadata writer thread");
        MetaWriter {
            tx,
            join: Some(join),
        }
    }

    pub fn submit(&self, id: u64, write: MetaWrite) {
        if self.tx.send((id, write)).is_err() {
            tracing::error!("metadata writer is gone; write {id} dropped");
        }
    }

    /// Waits until everything submitted is written.
    pub fn finish(mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}
