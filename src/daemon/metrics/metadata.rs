//! Metadata writes (`Action::Persist` .. `Event::MetaDone`): how many of each kind, how
//! many failed, how long each took to be durable, and the bitmap pages written.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::MetaWrite;
use crate::daemon::lock;

/// Most metadata writes timed at once (the metadata channel holds at most one superblock
/// and one activity-log write, and bitmap writes the core issues as pages get dirty);
/// past it a write is counted but not timed.
pub const MAX_TIMED: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Superblock,
    ActivityLog,
    Bitmap,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Superblock, Kind::ActivityLog, Kind::Bitmap];

    fn name(self) -> &'static str {
        match self {
            Kind::Superblock => "superblock",
            Kind::ActivityLog => "activity_log",
            Kind::Bitmap => "bitmap",
        }
    }

    fn of(w: &MetaWrite) -> Kind {
        match w {
            MetaWrite::Superblock(_) => Kind::Superblock,
            MetaWrite::ActivityLog(_) => Kind::ActivityLog,
            MetaWrite::BitmapPages { .. } => Kind::Bitmap,
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

struct KindSeries {
    writes: Counter,
    errors: Counter,
    duration: Histogram,
}

pub struct MetaWrites {
    kinds: Vec<KindSeries>,
    bitmap_pages: Counter,
    pending: Mutex<HashMap<u64, (Kind, Instant)>>,
}

impl MetaWrites {
    pub fn register(reg: &mut Registry) -> MetaWrites {
        let writes = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        // 100 µs doubling up to about 3.3 s.
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(100e-6, 2.0, 16))) as fn() -> Histogram,
        );
        let bitmap_pages = Counter::default();
        reg.register(
            "metadata_writes",
            "Metadata writes asked for, by kind (superblock, activity_log, bitmap)",
            writes.clone(),
        );
        reg.register(
            "metadata_write_errors",
            "Metadata writes that failed, by kind",
            errors.clone(),
        );
        reg.register(
            "metadata_write_duration_seconds",
            "Time from a metadata write being asked for to it being durable (or failed)",
            duration.clone(),
        );
        reg.register(
            "metadata_bitmap_pages_written",
            "Out-of-sync bitmap pages written to the metadata",
            bitmap_pages.clone(),
        );
        let kinds = Kind::ALL
            .iter()
            .map(|k| KindSeries {
                writes: writes.get_or_create_owned(&[("kind", k.name())]),
                errors: errors.get_or_create_owned(&[("kind", k.name())]),
                duration: duration.get_or_create_owned(&[("kind", k.name())]),
            })
            .collect();
        MetaWrites {
            kinds,
            bitmap_pages,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The core asked for metadata write `id` at `now`.
    pub fn asked(&self, id: u64, write: &MetaWrite, now: Instant) {
        let kind = Kind::of(write);
        self.kinds[kind as usize].writes.inc();
        if let MetaWrite::BitmapPages { pages, .. } = write {
            self.bitmap_pages.inc_by(pages.len() as u64);
        }
        let mut pending = lock(&self.pending);
        if pending.len() < MAX_TIMED {
            pending.insert(id, (kind, now));
        }
    }

    /// Metadata write `id` is durable (`ok`) or failed, at `now`.
    pub fn done(&self, id: u64, ok: bool, now: Instant) {
        let Some((kind, at)) = lock(&self.pending).remove(&id) else {
            return;
        };
        let s = &self.kinds[kind as usize];
        if !ok {
            s.errors.inc();
        }
        s.duration
            .observe(now.saturating_duration_since(at).as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MetaState;
    use prometheus_client::encoding::prometheus_text::encode;
    use std::time::Duration;

    #[test]
    fn counts_kinds_pages_errors_and_times() {
        let mut reg = Registry::with_prefix("t");
        let m = MetaWrites::register(&mut reg);
        let t0 = Instant::now();
        let sb = MetaWrite::Superblock(MetaState {
            gis: Default::default(),
            flags: 0,
            resync_offset: 0,
        });
        let pages = MetaWrite::BitmapPages {
            pages: vec![1, 2, 5],
            words: std::sync::Arc::new(vec![0; 8]),
        };
        m.asked(1, &sb, t0);
        m.asked(2, &pages, t0);
        m.asked(3, &MetaWrite::ActivityLog(vec![7]), t0);
        m.done(1, true, t0 + Duration::from_millis(2));
        m.done(2, false, t0 + Duration::from_millis(1));
        m.done(2, false, t0); // twice: ignored
        let mut out = String::new();
        encode(&mut out, &reg).expect("encode");
        for line in [
            "t_metadata_writes_total{kind=\"superblock\"} 1\n",
            "t_metadata_writes_total{kind=\"bitmap\"} 1\n",
            "t_metadata_writes_total{kind=\"activity_log\"} 1\n",
            "t_metadata_write_errors_total{kind=\"bitmap\"} 1\n",
            "t_metadata_write_errors_total{kind=\"superblock\"} 0\n",
            "t_metadata_bitmap_pages_written_total 3\n",
            "t_metadata_write_duration_seconds_count{kind=\"superblock\"} 1\n",
            "t_metadata_write_duration_seconds_count{kind=\"activity_log\"} 0\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }
}
