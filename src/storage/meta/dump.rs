//! `mirrorctl dump-md`: the metadata as JSON.

use serde_json::{json, Value};

use super::superblock::flag_names;
use super::{Layout, Loaded, AL_EXTENT_SIZE, BLOCK_SIZE, FORMAT_VERSION};

/// How many out-of-sync ranges `dump_json` lists.
const DUMP_RANGES: usize = 16;

fn hex(v: u64) -> String {
    format!("{v:016X}")
}

/// The first `max` runs of set bits among the first `bits` bits, as (first block, block count).
pub fn out_of_sync_ranges(bitmap: &[u64], bits: u64, max: usize) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<u64> = None; // start of the run being scanned
    for (wi, &word) in bitmap.iter().enumerate() {
        let base = wi as u64 * 64;
        if base >= bits {
            break;
        }
        // Fast paths: a whole word continuing or not starting a run.
        if (word == 0 && open.is_none())
            || (word == u64::MAX && open.is_some() && base + 64 <= bits)
        {
            continue;
        }
        for b in 0..64u64 {
            let i = base + b;
            if i >= bits {
                break;
            }
            let set = word >> b & 1 == 1;
            match (set, open) {
                (true, None) => open = Some(i),
                (false, Some(start)) => {
                    ranges.push((start, i - start));
                    open = None;
                    if ranges.len() == max {
                        return ranges;
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(start) = open {
        if ranges.len() < max {
            ranges.push((start, bits - start));
        }
    }
    ranges
}

/// The metadata as JSON: generation ids as hex strings, flags by name, a bitmap
/// summary (out-of-sync blocks and bytes, the first ranges), active extents, layout.
pub fn dump_json(loaded: &Loaded, layout: &Layout) -> Value {
    let sb = &loaded.superblock;
    let bits = layout.bitmap_bits();
    let oos_blocks: u64 = loaded
        .bitmap
        .iter()
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let ranges: Vec<Value> = out_of_sync_ranges(&loaded.bitmap, bits, DUMP_RANGES)
        .into_iter()
        .map(|(start, len)| json!({"offset": start * BLOCK_SIZE, "length": len * BLOCK_SIZE}))
        .collect();
    let damaged: Vec<Value> = loaded
        .damaged_bitmap_pages
        .iter()
        .map(|d| {
            json!({
                "page": d.page,
                "offset": d.offset,
                "error": d.error.to_string(),
                "out_of_sync": {"offset": d.blocks.0 * BLOCK_SIZE, "length": d.blocks.1 * BLOCK_SIZE},
            })
        })
        .collect();
    let mut extents = loaded.active_extents.clone();
    extents.sort_unstable();
    json!({
        "format_version": FORMAT_VERSION,
        "resource": sb.resource,
        "node": sb.node,
        "device_uuid": hex(sb.device_uuid),
        "data_size_bytes": sb.data_size,
        "generation": {
            "current": hex(sb.gi.current),
            "bitmap": hex(sb.gi.bitmap),
            "history": [hex(sb.gi.history[0]), hex(sb.gi.history[1])],
        },
        "flags": flag_names(sb.flags),
        "resync_offset_bytes": sb.resync_offset,
        "bitmap": {
            "block_size": BLOCK_SIZE,
            "blocks": bits,
            "out_of_sync_blocks": oos_blocks,
            "out_of_sync_bytes": oos_blocks * BLOCK_SIZE,
            "first_out_of_sync_ranges": ranges,
            "damaged_pages": damaged,
        },
        "activity_log": {
            "extent_size": AL_EXTENT_SIZE,
            "slots": sb.al_slots,
            "active_extents": extents,
        },
        "layout": {
            "meta_disk": if layout.location.is_internal() { "internal" } else { "external" },
            "path": layout.location.path().display().to_string(),
            "device_size_bytes": layout.device_size,
            "meta_offset": layout.meta_offset,
            "meta_size": layout.meta_size,
            "superblock_offsets": layout.superblock_offsets,
            "activity_log_offset": layout.al_offset,
            "activity_log_blocks": layout.al_blocks,
            "bitmap_offset": layout.bitmap_offset,
            "bitmap_pages": layout.bitmap_pages,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::meta::{flags, GenerationIds, MetaLocation, Superblock};

    #[test]
    fn ranges() {
        assert_eq!(out_of_sync_ranges(&[0], 64, 5), vec![]);
        assert_eq!(
            out_of_sync_ranges(&[0b0110_0001], 64, 5),
            vec![(0, 1), (5, 2)]
        );
        assert_eq!(out_of_sync_ranges(&[0b0110_0001], 64, 1), vec![(0, 1)]);
        assert_eq!(
            out_of_sync_ranges(&[u64::MAX, u64::MAX, 1], 130, 5),
            vec![(0, 129)]
        );
        assert_eq!(out_of_sync_ranges(&[1 << 63, 0b11], 100, 5), vec![(63, 3)]);
        assert_eq!(out_of_sync_ranges(&[u64::MAX, 0b111], 66, 5), vec![(0, 66)]);
        assert_eq!(out_of_sync_ranges(&[0, 0, 1 << 5], 200, 5), vec![(133, 1)]);
    }

    #[test]
    fn dump_contents() {
        let layout =
            Layout::compute(1 << 30, &MetaLocation::External("/m".into())).expect("layout");
        let mut bitmap = vec![0u64; layout.bitmap_words()];
        bitmap[0] = 0b1111; // blocks 0..4
        bitmap[10] = 1; // block 640
        let loaded = Loaded {
            superblock: Superblock {
                resource: "r0".into(),
                node: "alpha".into(),
                device_uuid: 0xabc,
                data_size: layout.data_size,
                gi: GenerationIds {
                    current: 0x10,
                    bitmap: 0,
                    history: [0x20, 0],
                },
                flags: flags::CONSISTENT | flags::PRIMARY,
                resync_offset: 0,
                al_slots: 509,
            },
            bitmap,
            active_extents: vec![7, 3],
            damaged_bitmap_pages: vec![crate::storage::meta::BitmapDamage {
                page: 0,
                offset: 8192,
                error: crate::storage::meta::DecodeError::BadMagic,
                blocks: (0, 100),
            }],
        };
        let v = dump_json(&loaded, &layout);
        assert_eq!(v["generation"]["current"], "0000000000000010");
        assert_eq!(v["generation"]["history"][0], "0000000000000020");
        assert_eq!(v["flags"], json!(["consistent", "primary"]));
        assert_eq!(v["bitmap"]["out_of_sync_blocks"], 5);
        assert_eq!(v["bitmap"]["out_of_sync_bytes"], 5 * 4096);
        assert_eq!(
            v["bitmap"]["first_out_of_sync_ranges"],
            json!([{"offset": 0, "length": 16384}, {"offset": 640 * 4096, "length": 4096}])
        );
        assert_eq!(
            v["bitmap"]["damaged_pages"][0]["out_of_sync"],
            json!({"offset": 0, "length": 100 * 4096})
        );
        assert_eq!(v["bitmap"]["damaged_pages"][0]["offset"], 8192);
        assert_eq!(v["activity_log"]["active_extents"], json!([3, 7]));
        assert_eq!(v["layout"]["meta_disk"], "external");
    }
}
