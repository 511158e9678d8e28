//! One-line summaries of what crosses the core's boundary, for `--trace`.

use crate::core::{DiskOp, IoRequest, MetaWrite};
use crate::peer::{Message, WriteKind};

fn first_value(d: &[u8]) -> String {
    match super::data::decode(d.get(..512).unwrap_or(d)) {
        Ok(v) => v.first().map(|v| format!("{v:#x}")).unwrap_or_default(),
        Err(_) => "?".into(),
    }
}

pub fn message(m: &Message) -> String {
    match m {
        Message::Hello(h) => format!(
            "Hello({} {:?} {:?} gis {:x?} crashed {} may-lack {} oos {} discard {})",
            h.node,
            h.role,
            h.disk,
            h.gis,
            h.crashed_primary,
            h.peer_may_lack,
            h.out_of_sync_blocks,
            h.discard_my_data
        ),
        Message::BitmapChunk {
            first_word,
            words,
            last,
        } => format!(
            "BitmapChunk(from word {first_word}, {} words, {} bits, last {last})",
            words.len(),
            words.iter().map(|w| w.count_ones()).sum::<u32>()
        ),
        Message::Write {
            seq,
            seen,
            offset,
            kind,
            fua,
            resync,
        } => {
            let k = match kind {
                WriteKind::Data(d) => format!("data {} bytes first {}", d.len(), first_value(d)),
                WriteKind::Trim { len } => format!("trim {len}"),
                WriteKind::Zeroes { len, .. } => format!("zeroes {len}"),
            };
            format!("Write(seq {seq} seen {seen} at {offset} {k} fua {fua} resync {resync})")
        }
        Message::ReadReply { id, error, data } => {
            format!("ReadReply(id {id} error {error} {} bytes)", data.len())
        }
        Message::ChecksumReply { id, error, sums } => {
            format!("ChecksumReply(id {id} error {error} {} sums)", sums.len())
        }
        other => format!("{other:?}"),
    }
}

pub fn disk_op(op: &DiskOp) -> String {
    match op {
        DiskOp::Write { offset, data, fua } => format!(
            "write {offset}+{} first {} fua {fua}",
            data.len(),
            first_value(data)
        ),
        other => format!("{other:?}"),
    }
}

pub fn io_request(r: &IoRequest) -> String {
    match r {
        IoRequest::Write { offset, data, fua } => {
            format!("write {offset}+{} fua {fua}", data.len())
        }
        other => format!("{other:?}"),
    }
}

pub fn meta_write(w: &MetaWrite) -> String {
    match w {
        MetaWrite::Superblock(m) => format!("superblock flags {:#x} gis {:x?}", m.flags, m.gis),
        MetaWrite::ActivityLog(set) => format!("activity log {set:?}"),
        MetaWrite::BitmapPages { pages, words } => format!(
            "bitmap pages {pages:?} ({} bits set in memory)",
            words.iter().map(|w| w.count_ones()).sum::<u32>()
        ),
    }
}
