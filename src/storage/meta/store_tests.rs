//! File-level tests of `MetaStore` on sparse temporary files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;

const MIB: u64 = 1 << 20;

struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn sparse_disk(size: u64) -> Disk {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let f = File::create(&path).expect("create disk");
    f.set_len(size).expect("set_len");
    Disk { _dir: dir, path }
}

fn internal(d: &Disk) -> MetaLocation {
    MetaLocation::Internal(d.path.clone())
}

fn external_in(d: &Disk) -> MetaLocation {
    MetaLocation::External(d.path.with_extension("md"))
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    f.write_all_at(bytes, offset).expect("poke");
}

fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open for peek");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("peek");
    buf
}

fn ones(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[test]
fn create_then_open_internal() {
    let size = 64 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    let created = MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let layout = Layout::compute(size, &loc).expect("layout");
    let sb = &created.superblock;
    assert_eq!((sb.resource.as_str(), sb.node.as_str()), ("r0", "alpha"));
    assert_eq!(sb.data_size, layout.data_size);
    assert_eq!(sb.flags, flags::FULL_SYNC_NEEDED);
    assert!(!sb.has_flag(flags::CONSISTENT));
    assert_ne!(sb.gi.current, 0);
    assert_eq!(sb.gi.current & 1, 0);
    assert_eq!((sb.gi.bitmap, sb.gi.history), (0, [0, 0]));
    assert_ne!(sb.device_uuid, 0);
    assert_eq!(sb.al_slots, DEFAULT_AL_SLOTS);
    assert_eq!(created.bitmap.len(), layout.bitmap_words());
    assert_eq!(ones(&created.bitmap), layout.bitmap_bits());
    assert!(created.active_extents.is_empty());

    let (store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    assert_eq!(loaded, created);
    assert_eq!(store.layout(), &layout);
    assert_eq!(store.superblock_seq(), 2);
    assert_eq!(store.activity_log_seq(), 1);
    assert_eq!(store.bitmap_page_count(), 1);
    // Nothing was written outside the metadata area.
    assert_eq!(std::fs::metadata(&d.path).expect("stat").len(), size);
}

#[test]
fn create_does_not_touch_the_data_area() {
    let size = 8 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    let layout = Layout::compute(size, &loc).expect("layout");
    let pattern = vec![0xA5u8; BLOCK_SIZE as usize];
    let last_data_block = layout.data_size - BLOCK_SIZE;
    poke(&d.path, 0, &pattern);
    poke(&d.path, last_data_block, &pattern);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    assert_eq!(peek(&d.path, 0, pattern.len()), pattern);
    assert_eq!(peek(&d.path, last_data_block, pattern.len()), pattern);
    // And the first metadata block (bitmap page 0) directly follows.
    assert_eq!(&peek(&d.path, layout.data_size, 4), b"NMBP");
}

#[test]
fn create_then_open_external() {
    let size = 300 * MIB + 1234;
    let d = sparse_disk(size);
    let loc = external_in(&d);
    let created = MetaStore::create(&loc, size, "r0", "beta", false).expect("create");
    assert_eq!(created.superblock.data_size, 300 * MIB);
    let (store, loaded) = MetaStore::open(&loc, size, "r0", "beta").expect("open");
    assert_eq!(loaded, created);
    assert_eq!(store.bitmap_page_count(), 3); // 76800 blocks / 32512 per page
    let md_len = std::fs::metadata(loc.path()).expect("stat").len();
    assert_eq!(md_len, store.layout().meta_end());
    // The data disk itself was not written.
    assert_eq!(peek(&d.path, size - 4096, 4096), vec![0u8; 4096]);
}

#[test]
fn open_missing_or_blank_metadata() {
    let d = sparse_disk(16 * MIB);
    let err = MetaStore::open(&internal(&d), 16 * MIB, "r0", "alpha").expect_err("blank disk");
    assert!(
        matches!(err, MetaError::NotFound { internal: true, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with(&format!(
        "no nbd-mirror metadata on {} (run `mirrorctl create-md`)",
        d.path.display()
    )));
    let err = MetaStore::open(&external_in(&d), 16 * MIB, "r0", "alpha").expect_err("no file");
    assert!(
        matches!(
            err,
            MetaError::NotFound {
                internal: false,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn superblock_writes_alternate_and_persist() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let mut sb = loaded.superblock.clone();
    sb.gi = GenerationIds {
        current: 0x100,
        bitmap: 0x200,
        history: [0x300, 0x400],
    };
    sb.flags = flags::CONSISTENT | flags::WAS_UP_TO_DATE | flags::PRIMARY;
    sb.resync_offset = 8192;
    store.write_superblock(&sb).expect("write 1");
    assert_eq!(store.superblock_seq(), 3);
    let offsets = store.layout().superblock_offsets;
    let seq_at = |slot: usize| {
        decode_superblock(&peek(&d.path, offsets[slot], 4096))
            .expect("slot")
            .seq
    };
    assert_eq!((seq_at(0), seq_at(1)), (3, 2));
    sb.flags &= !flags::PRIMARY;
    store.write_superblock(&sb).expect("write 2");
    assert_eq!((seq_at(0), seq_at(1)), (3, 4));
    drop(store);
    let (store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    assert_eq!(loaded.superblock, sb);
    assert_eq!(store.superblock_seq(), 4);
}

#[test]
fn torn_superblock_write_falls_back_to_older_slot() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    let created = MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, _) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let mut newer = created.superblock.clone();
    newer.flags = flags::CONSISTENT;
    store.write_superblock(&newer).expect("write"); // seq 3 into slot 0
    let offsets = store.layout().superblock_offsets;
    drop(store);
    // Tear slot 0: only its first half reached the disk, the rest is older bytes.
    poke(&d.path, offsets[0] + 2048, &[0xEE; 2048]);
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open after tear");
    assert_eq!(loaded.superblock, created.superblock);
    assert_eq!(store.superblock_seq(), 2);
    // The next write goes into the torn slot and wins.
    store.write_superblock(&newer).expect("rewrite");
    drop(store);
    let (store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    assert_eq!(loaded.superblock, newer);
    assert_eq!(store.superblock_seq(), 3);
}

#[test]
fn corrupt_both_superblock_slots() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let offsets = Layout::compute(size, &loc)
        .expect("layout")
        .superblock_offsets;
    for off in offsets {
        poke(&d.path, off + 300, b"garbage");
    }
    let err = MetaStore::open(&loc, size, "r0", "alpha").expect_err("both corrupt");
    assert!(matches!(err, MetaError::SuperblockCorrupt { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "superblock checksum mismatch in both slots on {} (offsets {} and {})",
            d.path.display(),
            offsets[0],
            offsets[1]
        )
    );
    // One slot wiped, the other corrupt: the message lists both problems.
    poke(&d.path, offsets[0], &[0u8; 4096]);
    let err = MetaStore::open(&loc, size, "r0", "alpha").expect_err("still corrupt");
    let msg = err.to_string();
    assert!(msg.contains("slot 0") && msg.contains("bad magic"), "{msg}");
    assert!(
        msg.contains("slot 1") && msg.contains("checksum mismatch"),
        "{msg}"
    );
}

#[test]
fn unsupported_version_is_reported_not_skipped() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let off = Layout::compute(size, &loc)
        .expect("layout")
        .superblock_offsets[1];
    let mut b = peek(&d.path, off, 4096);
    b[12..16].copy_from_slice(&7u32.to_le_bytes());
    let crc = {
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..8]);
        h.update(&b[12..]);
        h.finalize()
    };
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    poke(&d.path, off, &b);
    let err = MetaStore::open(&loc, size, "r0", "alpha").expect_err("version");
    assert!(
        matches!(
            err,
            MetaError::Version {
                found: 7,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn identity_mismatch() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r1", "beta", false).expect("create");
    let err = MetaStore::open(&loc, size, "r0", "alpha").expect_err("other identity");
    assert!(matches!(err, MetaError::IdentityMismatch { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "metadata on {} belongs to resource r1 node beta, not r0 alpha",
            d.path.display()
        )
    );
    assert!(MetaStore::open(&loc, size, "r1", "alpha").is_err());
    assert!(MetaStore::open(&loc, size, "r1", "beta").is_ok());
    // inspect does no identity check.
    let (_, loaded) = MetaStore::inspect(&loc, size).expect("inspect");
    assert_eq!(loaded.superblock.resource, "r1");
}

#[test]
fn size_mismatch() {
    let d = sparse_disk(1 << 30);
    let loc = external_in(&d);
    MetaStore::create(&loc, 1 << 30, "r0", "alpha", false).expect("create");
    let err = MetaStore::open(&loc, 2 << 30, "r0", "alpha").expect_err("grown");
    assert!(matches!(err, MetaError::SizeMismatch { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "device is 2 GiB (data area 2 GiB) but metadata on {} says 1 GiB",
            loc.path().display()
        )
    );
    let err = MetaStore::open(&loc, 512 << 20, "r0", "alpha").expect_err("shrunk");
    assert!(matches!(err, MetaError::SizeMismatch { .. }), "{err}");

    // Internal: a grown disk no longer has metadata at its end.
    let size = 32 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    File::options()
        .write(true)
        .open(&d.path)
        .expect("open")
        .set_len(2 * size)
        .expect("grow");
    let err = MetaStore::open(&loc, 2 * size, "r0", "alpha").expect_err("grown internal");
    assert!(
        matches!(err, MetaError::NotFound { internal: true, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("resized"), "{err}");
    // A caller claiming a larger device than the file holds gets a clear error, not a short read.
    let d = sparse_disk(size);
    let err = MetaStore::open(&internal(&d), 2 * size, "r0", "alpha").expect_err("short file");
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
}

#[test]
fn tiny_devices() {
    let d = sparse_disk(40 * 1024);
    let err = MetaStore::create(&internal(&d), 40 * 1024, "r0", "alpha", false).expect_err("tiny");
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("needs at least 80 KiB"), "{err}");
    // The smallest internal layout: one data block.
    let d = sparse_disk(80 * 1024);
    let loc = internal(&d);
    let created = MetaStore::create(&loc, 80 * 1024, "r0", "alpha", false).expect("minimum");
    assert_eq!(created.superblock.data_size, 4096);
    assert_eq!(created.bitmap, vec![1]);
    let (mut store, loaded) = MetaStore::open(&loc, 80 * 1024, "r0", "alpha").expect("open");
    assert_eq!(loaded.bitmap, vec![1]);
    store.write_activity_log(&[0]).expect("extent 0 exists");
    assert!(
        store.write_activity_log(&[1]).is_err(),
        "extent 1 is past the end"
    );
    // External metadata for a one-block device.
    let d = sparse_disk(4096);
    let loc = external_in(&d);
    MetaStore::create(&loc, 4096, "r0", "alpha", false).expect("external minimum");
    assert!(MetaStore::open(&loc, 4096, "r0", "alpha").is_ok());
    let err = MetaStore::create(&loc, 100, "r0", "alpha", true).expect_err("below one block");
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
}

#[test]
fn create_refuses_existing_metadata_without_force() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    let first = MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let err = MetaStore::create(&loc, size, "r0", "alpha", false).expect_err("exists");
    assert!(matches!(err, MetaError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("use --force"), "{err}");
    // The refused create changed nothing.
    let (_, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    assert_eq!(loaded, first);
    // Only one slot valid still counts as existing.
    let offsets = Layout::compute(size, &loc)
        .expect("layout")
        .superblock_offsets;
    poke(&d.path, offsets[1], &[0u8; 4096]);
    assert!(matches!(
        MetaStore::create(&loc, size, "r0", "alpha", false),
        Err(MetaError::Exists { .. })
    ));

    let second = MetaStore::create(&loc, size, "r0", "alpha", true).expect("forced");
    assert_ne!(second.superblock.device_uuid, first.superblock.device_uuid);
    assert_ne!(second.superblock.gi.current, first.superblock.gi.current);
    let (_, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open after force");
    assert_eq!(loaded, second);

    // Corrupt (not valid) metadata does not block create.
    for off in offsets {
        poke(&d.path, off + 100, b"x");
    }
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create over corrupt metadata");
}

#[test]
fn bitmap_pages_round_trip() {
    let size = 300 * MIB; // internal: 3 bitmap pages
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let pages = store.bitmap_page_count();
    assert_eq!(pages, 3);
    let bits = store.layout().bitmap_bits();
    let mut bitmap = vec![0u64; loaded.bitmap.len()];
    for block in [0, 1, 64, 32511, 32512, bits - 1] {
        bitmap[(block / 64) as usize] |= 1 << (block % 64);
    }
    assert_eq!(MetaStore::bitmap_page_of_block(32511), 0);
    assert_eq!(MetaStore::bitmap_page_of_block(32512), 1);
    // Write pages 0 and 2 only: page 1 keeps the all-set state from create.
    store
        .write_bitmap_pages(&bitmap, &[2, 0, 2])
        .expect("write");
    drop(store);
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    let words1 = bitmap_words_of_page(1, bits);
    assert_eq!(loaded.bitmap[..words1.start], bitmap[..words1.start]);
    assert!(loaded.bitmap[words1.clone()].iter().all(|&w| w == u64::MAX));
    assert_eq!(loaded.bitmap[words1.end..], bitmap[words1.end..]);
    store
        .write_bitmap_pages(&bitmap, &[1])
        .expect("write page 1");
    drop(store);
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    assert_eq!(loaded.bitmap, bitmap);
    assert_eq!(ones(&loaded.bitmap), 6);

    // Bits past the end of the data are not persisted.
    let mut dirty = bitmap.clone();
    if let Some(last) = dirty.last_mut() {
        *last = u64::MAX;
    }
    store.write_bitmap_pages(&dirty, &[2]).expect("write");
    let (_, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    let bits_in_last_word = match bits % 64 {
        0 => 64,
        n => n,
    };
    assert_eq!(ones(&loaded.bitmap), 5 + bits_in_last_word);

    // Bad arguments.
    assert!(matches!(
        store.write_bitmap_pages(&bitmap[1..], &[0]),
        Err(MetaError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.write_bitmap_pages(&bitmap, &[3]),
        Err(MetaError::InvalidArgument(_))
    ));
}

fn bitmap_words_of_page(page: usize, bits: u64) -> std::ops::Range<usize> {
    let start = page * BITMAP_WORDS_PER_PAGE;
    start..(start + BITMAP_WORDS_PER_PAGE).min(bits.div_ceil(64) as usize)
}

#[test]
fn a_corrupt_bitmap_page_is_named_and_loaded_as_out_of_sync() {
    let size = 300 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let clear = vec![0u64; loaded.bitmap.len()];
    let all: Vec<usize> = (0..store.bitmap_page_count()).collect();
    store
        .write_bitmap_pages(&clear, &all)
        .expect("clear the bitmap");
    drop(store);
    let layout = Layout::compute(size, &loc).expect("layout");
    let bits = layout.bitmap_bits();
    let off = layout.bitmap_page_offset(1);
    poke(&d.path, off + 1000, &[0x00, 0x01]);
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("damaged page");
    let [damage] = &loaded.damaged_bitmap_pages[..] else {
        panic!("one damaged page: {:?}", loaded.damaged_bitmap_pages);
    };
    assert_eq!((damage.page, damage.offset), (1, off));
    let first = BITMAP_BITS_PER_PAGE;
    let count = BITMAP_BITS_PER_PAGE.min(bits - first);
    assert_eq!(damage.blocks, (first, count));
    let msg = damage.describe(&d.path);
    assert!(
        msg.starts_with(&format!("bitmap page 1 at offset {off} on")),
        "{msg}"
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(msg.contains("marked out of sync"), "{msg}");
    // Exactly that page's blocks are set.
    let set: u64 = loaded
        .bitmap
        .iter()
        .map(|w| u64::from(w.count_ones()))
        .sum();
    assert_eq!(set, count);
    assert_eq!(loaded.bitmap[bitmap_words_of_page(1, bits)][0], u64::MAX);
    assert_eq!(loaded.bitmap[bitmap_words_of_page(0, bits)][0], 0);
    // Writing the page repairs it.
    store
        .write_bitmap_pages(&loaded.bitmap, &[1])
        .expect("rewrite");
    drop(store);
    let (_, again) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    assert!(again.damaged_bitmap_pages.is_empty());
    assert_eq!(again.bitmap, loaded.bitmap);
    // A page copied into the wrong place (misdirected write) is caught too.
    let page0 = peek(&d.path, layout.bitmap_page_offset(0), 4096);
    poke(&d.path, off, &page0);
    let (_, loaded) = MetaStore::inspect(&loc, size).expect("misplaced page");
    assert_eq!(
        loaded.damaged_bitmap_pages[0].error,
        DecodeError::WrongPage {
            found: 0,
            expected: 1
        }
    );
}

#[test]
fn activity_log_round_trip_wraps_and_survives_torn_write() {
    let size = 64 * MIB; // 16 extents, roughly
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, _) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let extent_count = store.layout().al_extent_count() as u32;
    assert_eq!(extent_count, 16); // 64 MiB minus metadata: the last extent is partial
                                  // 40 transactions wrap the 16-block ring twice.
    let mut last = Vec::new();
    for i in 0..40u32 {
        last = (0..=(i % extent_count)).collect();
        store.write_activity_log(&last).expect("al write");
    }
    assert_eq!(store.activity_log_seq(), 41);
    drop(store);
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    assert_eq!(loaded.active_extents, last);
    assert_eq!(store.activity_log_seq(), 41);

    store.write_activity_log(&[1, 2]).expect("al write");
    store.write_activity_log(&[1, 2, 3]).expect("al write"); // seq 43
    let torn_off = store.layout().al_block_offset((43 - 1) % AL_RING_BLOCKS);
    drop(store);
    poke(&d.path, torn_off + 20, &[0xff; 8]);
    let (mut store, loaded) =
        MetaStore::open(&loc, size, "r0", "alpha").expect("open after torn AL");
    assert_eq!(loaded.active_extents, vec![1, 2]);
    assert_eq!(store.activity_log_seq(), 42);
    store
        .write_activity_log(&[9])
        .expect("rewrite over the torn block");
    drop(store);
    let (_, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("reopen");
    assert_eq!(loaded.active_extents, vec![9]);
}

#[test]
fn activity_log_limits_and_total_corruption() {
    let size = 64 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, _) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let too_many: Vec<u32> = vec![0; DEFAULT_AL_SLOTS as usize + 1];
    assert!(matches!(
        store.write_activity_log(&too_many),
        Err(MetaError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.write_activity_log(&[16]),
        Err(MetaError::InvalidArgument(_))
    ));
    assert_eq!(
        store.activity_log_seq(),
        1,
        "refused writes do not advance the ring"
    );
    let layout = store.layout().clone();
    drop(store);
    poke(&d.path, layout.al_offset + 8, &[1]);
    let err = MetaStore::open(&loc, size, "r0", "alpha").expect_err("no valid transaction");
    assert!(matches!(err, MetaError::ActivityLogCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("no valid transaction"), "{err}");
}

#[test]
fn write_superblock_refuses_identity_changes() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (mut store, loaded) = MetaStore::open(&loc, size, "r0", "alpha").expect("open");
    let changes: [fn(&mut Superblock); 5] = [
        |s| s.resource = "r9".into(),
        |s| s.node = "beta".into(),
        |s| s.device_uuid ^= 2,
        |s| s.data_size -= 4096,
        |s| s.al_slots = 10,
    ];
    for change in changes {
        let mut sb = loaded.superblock.clone();
        change(&mut sb);
        assert!(matches!(
            store.write_superblock(&sb),
            Err(MetaError::InvalidArgument(_))
        ));
    }
    let mut sb = loaded.superblock.clone();
    sb.resync_offset = sb.data_size + 4096;
    assert!(
        store.write_superblock(&sb).is_err(),
        "resync offset past the end"
    );
    assert_eq!(store.superblock_seq(), 2);
}

#[test]
fn dump_of_fresh_metadata() {
    let size = 16 * MIB;
    let d = sparse_disk(size);
    let loc = internal(&d);
    MetaStore::create(&loc, size, "r0", "alpha", false).expect("create");
    let (layout, loaded) = MetaStore::inspect(&loc, size).expect("inspect");
    let v = dump_json(&loaded, &layout);
    assert_eq!(v["resource"], "r0");
    assert_eq!(v["flags"], serde_json::json!(["full-sync-needed"]));
    assert_eq!(v["bitmap"]["out_of_sync_bytes"], layout.data_size);
    assert_eq!(
        v["bitmap"]["first_out_of_sync_ranges"],
        serde_json::json!([{"offset": 0, "length": layout.data_size}])
    );
    assert_eq!(
        v["generation"]["current"],
        format!("{:016X}", loaded.superblock.gi.current)
    );
    assert_eq!(v["layout"]["meta_disk"], "internal");
}

#[test]
fn device_size_of_file() {
    let d = sparse_disk(5 * MIB + 7);
    assert_eq!(device_size(&d.path).expect("size"), 5 * MIB + 7);
    assert!(matches!(
        device_size(&d.path.with_extension("nope")),
        Err(MetaError::Io { .. })
    ));
}
