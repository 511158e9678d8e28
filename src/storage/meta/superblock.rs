//! The superblock: identity, sizes, generation identifiers, flags.
//!
//! Byte format of one 4 KiB slot (version 1, little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NBDMIRSB` |
//! | 8 | 4 | crc32 of the whole block with this field skipped |
//! | 12 | 4 | format version (1) |
//! | 16 | 8 | write sequence number (nonzero) |
//! | 24 | 8 | device uuid (nonzero) |
//! | 32 | 8 | data size in bytes (multiple of 4096) |
//! | 40 | 4 | bitmap block size (4096) |
//! | 44 | 4 | activity-log extent size (4 MiB) |
//! | 48 | 4 | activity-log slots |
//! | 52 | 4 | activity-log ring blocks |
//! | 56 | 4 | bitmap pages |
//! | 60 | 4 | flags |
//! | 64 | 32 | generation ids: current, bitmap, history 0, history 1 |
//! | 96 | 8 | resync resume offset in bytes |
//! | 104 | 1 | resource name length |
//! | 105 | 1 | node name length |
//! | 106 | 6 | zero |
//! | 112 | 64 | resource name (UTF-8, zero padded) |
//! | 176 | 64 | node name (UTF-8, zero padded) |
//! | 240 | .. | zero (ignored on read) |
//!
//! Two slots are written alternately (double buffering): each write goes to
//! the slot not holding the newest superblock, with seq + 1, so a torn write
//! never loses the last good one.

use super::block::{check_crc, check_len, get_u32, get_u64, put_u32, put_u64, seal, BLOCK};
use super::{DecodeError, AL_EXTENT_SIZE, BLOCK_SIZE};

pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"NBDMIRSB");
pub const FORMAT_VERSION: u32 = 1;
/// Maximum length of the resource and node names, in bytes.
pub const MAX_NAME_LEN: usize = 64;

const CRC_OFF: usize = 8;
const RESOURCE_OFF: usize = 112;
const NODE_OFF: usize = RESOURCE_OFF + MAX_NAME_LEN;

/// Superblock flag bits.
pub mod flags {
    /// The local data is consistent (not in the middle of a resync as target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The local data was up to date the last time we knew.
    pub const WAS_UP_TO_DATE: u32 = 1 << 1;
    /// Set while this node is primary; still set on load = this node crashed as primary.
    pub const PRIMARY: u32 = 1 << 2;
    /// The peer's disk is known to be outdated (fenced).
    pub const PEER_OUTDATED: u32 = 1 << 3;
    /// A resync with this node as target was interrupted.
    pub const SYNC_TARGET: u32 = 1 << 4;
    /// The next resync must copy everything.
    pub const FULL_SYNC_NEEDED: u32 = 1 << 5;
    /// The bitmap marks writes the peer acknowledged but had not flushed when
    /// the link was lost: the peer may have lost them, this node is the sync
    /// source for them (docs/SYNC-DECISION.md). Older versions keep the bit
    /// as it is and ignore it.
    pub const PEER_MAY_LACK: u32 = 1 << 6;

    /// Every flag with its name, for display.
    pub const NAMES: [(u32, &str); 7] = [
        (CONSISTENT, "consistent"),
        (WAS_UP_TO_DATE, "was-up-to-date"),
        (PRIMARY, "primary"),
        (PEER_OUTDATED, "peer-outdated"),
        (SYNC_TARGET, "sync-target"),
        (FULL_SYNC_NEEDED, "full-sync-needed"),
        (PEER_MAY_LACK, "peer-may-lack"),
    ];
}

/// Names of the flags set in `bits`; unknown bits as `bit-N`.
pub fn flag_names(bits: u32) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..32 {
        let bit = 1u32 << i;
        if bits & bit == 0 {
            continue;
        }
        match flags::NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => out.push((*name).to_string()),
            None => out.push(format!("bit-{i}")),
        }
    }
    out
}

/// DRBD-style generation identifiers (current, bitmap and history UUIDs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerationIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

/// The persistent state of one node's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub resource: String,
    pub node: String,
    /// Random, set by `create-md`; binds bitmap pages and AL blocks to this superblock.
    pub device_uuid: u64,
    /// Usable data bytes (multiple of 4096).
    pub data_size: u64,
    pub gi: GenerationIds,
    /// Bitset of `flags::*`.
    pub flags: u32,
    /// Where an interrupted resync resumes, in bytes.
    pub resync_offset: u64,
    /// Maximum number of active activity-log extents.
    pub al_slots: u32,
}

impl Superblock {
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// A superblock as stored: the superblock plus the fields the store manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockRecord {
    pub sb: Superblock,
    /// Write sequence number; the valid slot with the highest one wins.
    pub seq: u64,
    /// Recorded layout, cross-checked against the computed one on open.
    pub al_blocks: u32,
    pub bitmap_pages: u32,
}

fn check_name(field: &'static str, name: &str) -> Result<(), DecodeError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(DecodeError::Field {
            field,
            detail: format!(
                "{name:?} must be 1 to {MAX_NAME_LEN} bytes without NUL (is {} bytes)",
                name.len()
            ),
        });
    }
    Ok(())
}

/// Checks the fields a caller may set; used before encoding and after decoding.
pub(crate) fn validate(sb: &Superblock) -> Result<(), DecodeError> {
    check_name("resource name", &sb.resource)?;
    check_name("node name", &sb.node)?;
    if sb.device_uuid == 0 {
        return Err(DecodeError::Field {
            field: "device uuid",
            detail: "is zero".into(),
        });
    }
    if sb.data_size == 0 || sb.data_size % BLOCK_SIZE != 0 {
        return Err(DecodeError::Field {
            field: "data size",
            detail: format!("{} is not a nonzero multiple of 4096", sb.data_size),
        });
    }
    if sb.resync_offset > sb.data_size {
        return Err(DecodeError::Field {
            field: "resync offset",
            detail: format!(
                "{} is beyond the data size {}",
                sb.resync_offset, sb.data_size
            ),
        });
    }
    if sb.al_slots == 0 || sb.al_slots > super::MAX_AL_SLOTS {
        return Err(DecodeError::Field {
            field: "activity-log slots",
            detail: format!("{} is not in 1..={}", sb.al_slots, super::MAX_AL_SLOTS),
        });
    }
    Ok(())
}

/// Encodes one superblock slot. The record must pass validation (the store checks it first).
pub fn encode_superblock(rec: &SuperblockRecord) -> Result<Vec<u8>, DecodeError> {
    validate(&rec.sb)?;
    if rec.seq == 0 {
        return Err(DecodeError::Field {
            field: "sequence number",
            detail: "is zero".into(),
        });
    }
    let sb = &rec.sb;
    let mut b = vec![0u8; BLOCK];
    put_u64(&mut b, 0, SUPERBLOCK_MAGIC);
    put_u32(&mut b, 12, FORMAT_VERSION);
    put_u64(&mut b, 16, rec.seq);
    put_u64(&mut b, 24, sb.device_uuid);
    put_u64(&mut b, 32, sb.data_size);
    put_u32(&mut b, 40, BLOCK_SIZE as u32);
    put_u32(&mut b, 44, AL_EXTENT_SIZE as u32);
    put_u32(&mut b, 48, sb.al_slots);
    put_u32(&mut b, 52, rec.al_blocks);
    put_u32(&mut b, 56, rec.bitmap_pages);
    put_u32(&mut b, 60, sb.flags);
    put_u64(&mut b, 64, sb.gi.current);
    put_u64(&mut b, 72, sb.gi.bitmap);
    put_u64(&mut b, 80, sb.gi.history[0]);
    put_u64(&mut b, 88, sb.gi.history[1]);
    put_u64(&mut b, 96, sb.resync_offset);
    b[104] = sb.resource.len() as u8;
    b[105] = sb.node.len() as u8;
    b[RESOURCE_OFF..RESOURCE_OFF + sb.resource.len()].copy_from_slice(sb.resource.as_bytes());
    b[NODE_OFF..NODE_OFF + sb.node.len()].copy_from_slice(sb.node.as_bytes());
    seal(&mut b, CRC_OFF);
    Ok(b)
}

/// True if the block starts with the superblock magic (says nothing about validity).
pub(crate) fn has_magic(buf: &[u8]) -> bool {
    buf.len() >= 8 && get_u64(buf, 0) == SUPERBLOCK_MAGIC
}

/// True if the block has the magic and a matching checksum, whatever its version:
/// something `create` must not overwrite without force.
pub(crate) fn looks_valid(buf: &[u8]) -> bool {
    check_len(buf).is_ok() && has_magic(buf) && check_crc(buf, CRC_OFF).is_ok()
}

fn decode_name(
    buf: &[u8],
    off: usize,
    len: u8,
    field: &'static str,
) -> Result<String, DecodeError> {
    let len = usize::from(len);
    if len > MAX_NAME_LEN {
        return Err(DecodeError::Field {
            field,
            detail: format!("length {len} > {MAX_NAME_LEN}"),
        });
    }
    let area = &buf[off..off + MAX_NAME_LEN];
    if area[len..].iter().any(|&c| c != 0) {
        return Err(DecodeError::Field {
            field,
            detail: "nonzero bytes after the name".into(),
        });
    }
    String::from_utf8(area[..len].to_vec()).map_err(|_| DecodeError::Field {
        field,
        detail: "not UTF-8".into(),
    })
}

/// Decodes one superblock slot: magic, then checksum, then version, then fields.
pub fn decode_superblock(buf: &[u8]) -> Result<SuperblockRecord, DecodeError> {
    check_len(buf)?;
    if !has_magic(buf) {
        return Err(DecodeError::BadMagic);
    }
    check_crc(buf, CRC_OFF)?;
    let version = get_u32(buf, 12);
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let block_size = get_u32(buf, 40);
    if u64::from(block_size) != BLOCK_SIZE {
        return Err(DecodeError::Field {
            field: "bitmap block size",
            detail: format!("{block_size}, expected {BLOCK_SIZE}"),
        });
    }
    let extent = get_u32(buf, 44);
    if u64::from(extent) != AL_EXTENT_SIZE {
        return Err(DecodeError::Field {
            field: "activity-log extent size",
            detail: format!("{extent}, expected {AL_EXTENT_SIZE}"),
        });
    }
    if buf[106..112].iter().any(|&c| c != 0) {
        return Err(DecodeError::Field {
            field: "reserved bytes",
            detail: "not zero".into(),
        });
    }
    let seq = get_u64(buf, 16);
    if seq == 0 {
        return Err(DecodeError::Field {
            field: "sequence number",
            detail: "is zero".into(),
        });
    }
    let sb = Superblock {
        resource: decode_name(buf, RESOURCE_OFF, buf[104], "resource name")?,
        node: decode_name(buf, NODE_OFF, buf[105], "node name")?,
        device_uuid: get_u64(buf, 24),
        data_size: get_u64(buf, 32),
        gi: GenerationIds {
            current: get_u64(buf, 64),
            bitmap: get_u64(buf, 72),
            history: [get_u64(buf, 80), get_u64(buf, 88)],
        },
        flags: get_u32(buf, 60),
        resync_offset: get_u64(buf, 96),
        al_slots: get_u32(buf, 48),
    };
    validate(&sb)?;
    Ok(SuperblockRecord {
        sb,
        seq,
        al_blocks: get_u32(buf, 52),
        bitmap_pages: get_u32(buf, 56),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SuperblockRecord {
        SuperblockRecord {
            sb: Superblock {
                resource: "r0".into(),
                node: "alpha".into(),
                device_uuid: 0x1234_5678_9abc_def1,
                data_size: 1 << 30,
                gi: GenerationIds {
                    current: 0xaa00,
                    bitmap: 0xbb00,
                    history: [0xcc00, 0xdd00],
                },
                flags: flags::CONSISTENT | flags::PRIMARY,
                resync_offset: 4096 * 7,
                al_slots: 509,
            },
            seq: 42,
            al_blocks: 16,
            bitmap_pages: 9,
        }
    }

    #[test]
    fn round_trip() {
        let rec = sample();
        let b = encode_superblock(&rec).expect("encode");
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..8], b"NBDMIRSB");
        assert_eq!(decode_superblock(&b).expect("decode"), rec);
    }

    #[test]
    fn max_length_names_round_trip() {
        let mut rec = sample();
        rec.sb.resource = "r".repeat(64);
        rec.sb.node = "ñ".repeat(32);
        let b = encode_superblock(&rec).expect("encode");
        assert_eq!(decode_superblock(&b).expect("decode"), rec);
    }

    #[test]
    fn rejects_bad_names_on_encode() {
        for (res, node) in [("", "a"), ("a", ""), (&*"x".repeat(65), "a"), ("a\0b", "a")] {
            let mut rec = sample();
            rec.sb.resource = res.into();
            rec.sb.node = node.into();
            assert!(matches!(
                encode_superblock(&rec),
                Err(DecodeError::Field { .. })
            ));
        }
    }

    #[test]
    fn detects_corruption_in_order() {
        let good = encode_superblock(&sample()).expect("encode");
        assert_eq!(
            decode_superblock(&vec![0u8; 4096]),
            Err(DecodeError::BadMagic)
        );
        assert_eq!(
            decode_superblock(&good[..100]),
            Err(DecodeError::Length { len: 100 })
        );
        let mut torn = good.clone();
        torn[2000..].fill(0xEE); // torn: the tail still holds older bytes
        assert!(matches!(
            decode_superblock(&torn),
            Err(DecodeError::Checksum { .. })
        ));
        let mut v2 = good.clone();
        put_u32(&mut v2, 12, 2);
        seal(&mut v2, CRC_OFF);
        assert_eq!(
            decode_superblock(&v2),
            Err(DecodeError::Version {
                found: 2,
                supported: 1
            })
        );
        assert!(looks_valid(&v2));
        let mut bad_size = good;
        put_u64(&mut bad_size, 32, 4097);
        seal(&mut bad_size, CRC_OFF);
        assert!(matches!(
            decode_superblock(&bad_size),
            Err(DecodeError::Field {
                field: "data size",
                ..
            })
        ));
    }

    #[test]
    fn flag_names_lists_known_and_unknown() {
        assert_eq!(
            flag_names(flags::CONSISTENT | flags::FULL_SYNC_NEEDED | (1 << 30)),
            vec!["consistent", "full-sync-needed", "bit-30"]
        );
        assert!(flag_names(0).is_empty());
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,64}"
    }

    proptest! {
        #[test]
        fn prop_round_trip(
            resource in arb_name(), node in arb_name(), uuid in 1u64.., blocks in 1u64..(1 << 40),
            gi in any::<[u64; 4]>(), fl in any::<u32>(), resync_frac in 0u64..=100,
            al_slots in 1u32..=super::super::MAX_AL_SLOTS, seq in 1u64.., pages in any::<u32>(),
        ) {
            let data_size = blocks * BLOCK_SIZE;
            let rec = SuperblockRecord {
                sb: Superblock {
                    resource, node, device_uuid: uuid, data_size,
                    gi: GenerationIds { current: gi[0], bitmap: gi[1], history: [gi[2], gi[3]] },
                    flags: fl, resync_offset: data_size / 100 * resync_frac, al_slots,
                },
                seq, al_blocks: 16, bitmap_pages: pages,
            };
            let b = encode_superblock(&rec).expect("encode");
            prop_assert_eq!(decode_superblock(&b).expect("decode"), rec);
        }

        #[test]
        fn prop_decode_arbitrary_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode_superblock(&bytes);
        }

        /// Arbitrary contents behind a valid magic and checksum reach the field checks.
        #[test]
        fn prop_decode_sealed_arbitrary_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 4096..=4096),
            version_ok in any::<bool>(),
        ) {
            put_u64(&mut bytes, 0, SUPERBLOCK_MAGIC);
            if version_ok {
                put_u32(&mut bytes, 12, FORMAT_VERSION);
                put_u32(&mut bytes, 40, BLOCK_SIZE as u32);
                put_u32(&mut bytes, 44, AL_EXTENT_SIZE as u32);
            }
            seal(&mut bytes, CRC_OFF);
            if let Ok(rec) = decode_superblock(&bytes) {
                // Whatever decodes must re-encode to something that decodes the same.
                let again = encode_superblock(&rec).expect("valid record encodes");
                prop_assert_eq!(decode_superblock(&again).expect("decode"), rec);
            }
        }
    }
}
