//! The activity log: a ring of transaction blocks, each holding the complete
//! set of "hot" 4 MiB extents (extents that may have writes in flight).
//!
//! Byte format of one transaction block (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `NMAL` |
//! | 4 | 4 | crc32 of the whole block with this field skipped |
//! | 8 | 4 | number of extents `n` |
//! | 12 | 4 | zero |
//! | 16 | 8 | device uuid |
//! | 24 | 8 | transaction sequence number (nonzero) |
//! | 32 | 4 n | extent numbers (extent `e` = data bytes `e * 4 MiB ..`) |
//! | .. | .. | zero |
//!
//! Transaction `seq` goes to ring block `(seq - 1) % AL_RING_BLOCKS`. On load the
//! valid transaction with the highest seq wins; a torn newest write is skipped,
//! which is safe because data writes to a newly hot extent wait for its
//! transaction to be durable.

use super::block::{check_crc, check_len, get_u32, get_u64, put_u32, put_u64, seal, BLOCK};
use super::DecodeError;

pub const AL_MAGIC: u32 = u32::from_le_bytes(*b"NMAL");
const CRC_OFF: usize = 4;
const HEADER: usize = 32;

/// Transaction blocks in the ring.
pub const AL_RING_BLOCKS: u32 = 16;
/// Most extents one transaction block can hold.
pub const MAX_AL_SLOTS: u32 = ((BLOCK - HEADER) / 4) as u32;
/// Default number of activity-log slots: 509 x 4 MiB, about 2 GiB hot.
pub const DEFAULT_AL_SLOTS: u32 = 509;
const _: () = assert!(DEFAULT_AL_SLOTS <= MAX_AL_SLOTS);

/// One decoded activity-log transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    pub seq: u64,
    pub extents: Vec<u32>,
}

/// The ring block that transaction `seq` is written to.
pub(crate) fn ring_slot(seq: u64) -> u32 {
    debug_assert!(seq > 0);
    (seq.wrapping_sub(1) % u64::from(AL_RING_BLOCKS)) as u32
}

pub fn encode_al_transaction(
    device_uuid: u64,
    seq: u64,
    extents: &[u32],
) -> Result<Vec<u8>, DecodeError> {
    if extents.len() > MAX_AL_SLOTS as usize {
        return Err(DecodeError::Field {
            field: "activity-log extents",
            detail: format!("{} extents, at most {MAX_AL_SLOTS} fit", extents.len()),
        });
    }
    if seq == 0 {
        return Err(DecodeError::Field {
            field: "sequence number",
            detail: "is zero".into(),
        });
    }
    let mut b = vec![0u8; BLOCK];
    put_u32(&mut b, 0, AL_MAGIC);
    put_u32(&mut b, 8, extents.len() as u32);
    put_u64(&mut b, 16, device_uuid);
    put_u64(&mut b, 24, seq);
    for (i, e) in extents.iter().enumerate() {
        put_u32(&mut b, HEADER + i * 4, *e);
    }
    seal(&mut b, CRC_OFF);
    Ok(b)
}

pub fn decode_al_transaction(buf: &[u8], device_uuid: u64) -> Result<AlTransaction, DecodeError> {
    check_len(buf)?;
    if get_u32(buf, 0) != AL_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    check_crc(buf, CRC_OFF)?;
    let uuid = get_u64(buf, 16);
    if uuid != device_uuid {
        return Err(DecodeError::ForeignDevice {
            found: uuid,
            expected: device_uuid,
        });
    }
    let n = get_u32(buf, 8);
    if n > MAX_AL_SLOTS {
        return Err(DecodeError::Field {
            field: "activity-log extent count",
            detail: format!("{n} > {MAX_AL_SLOTS}"),
        });
    }
    let seq = get_u64(buf, 24);
    if seq == 0 {
        return Err(DecodeError::Field {
            field: "sequence number",
            detail: "is zero".into(),
        });
    }
    let end = HEADER + n as usize * 4;
    if get_u32(buf, 12) != 0 || buf[end..].iter().any(|&c| c != 0) {
        return Err(DecodeError::Field {
            field: "activity-log block",
            detail: "reserved bytes not zero".into(),
        });
    }
    let extents = (0..n as usize)
        .map(|i| get_u32(buf, HEADER + i * 4))
        .collect();
    Ok(AlTransaction { seq, extents })
}

/// The valid transaction with the highest seq among the ring `blocks`
/// (any decode failure = skipped), with every block's failure for diagnostics.
pub fn newest_transaction<'a>(
    blocks: impl IntoIterator<Item = &'a [u8]>,
    device_uuid: u64,
) -> (Option<AlTransaction>, Vec<(usize, DecodeError)>) {
    let mut best: Option<AlTransaction> = None;
    let mut failures = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        match decode_al_transaction(block, device_uuid) {
            Ok(t) => {
                let newer = match &best {
                    Some(b) => t.seq > b.seq,
                    None => true,
                };
                if newer {
                    best = Some(t);
                }
            }
            Err(e) => failures.push((i, e)),
        }
    }
    (best, failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants() {
        assert_eq!(MAX_AL_SLOTS, 1016);
        assert_eq!(ring_slot(1), 0);
        assert_eq!(ring_slot(16), 15);
        assert_eq!(ring_slot(17), 0);
    }

    #[test]
    fn round_trip_and_limits() {
        let ext: Vec<u32> = (0..509).map(|i| i * 3).collect();
        let b = encode_al_transaction(9, 5, &ext).expect("encode");
        assert_eq!(
            decode_al_transaction(&b, 9),
            Ok(AlTransaction {
                seq: 5,
                extents: ext
            })
        );
        let full: Vec<u32> = (0..MAX_AL_SLOTS).collect();
        let b = encode_al_transaction(9, 6, &full).expect("encode");
        assert_eq!(decode_al_transaction(&b, 9).expect("decode").extents, full);
        assert!(encode_al_transaction(9, 6, &vec![0; MAX_AL_SLOTS as usize + 1]).is_err());
        assert!(encode_al_transaction(9, 0, &[]).is_err());
        assert_eq!(
            decode_al_transaction(&b, 8),
            Err(DecodeError::ForeignDevice {
                found: 9,
                expected: 8
            })
        );
    }

    #[test]
    fn torn_newest_falls_back_to_previous() {
        let t1 = encode_al_transaction(9, 1, &[1]).expect("encode");
        let t2 = encode_al_transaction(9, 2, &[1, 2]).expect("encode");
        let mut t3 = encode_al_transaction(9, 3, &[1, 2, 3]).expect("encode");
        t3[2048..].fill(0xEE); // torn: the second half still holds older bytes
        let empty = vec![0u8; BLOCK];
        let ring: Vec<&[u8]> = vec![&t1, &t2, &t3, &empty];
        let (best, failures) = newest_transaction(ring, 9);
        assert_eq!(
            best,
            Some(AlTransaction {
                seq: 2,
                extents: vec![1, 2]
            })
        );
        assert_eq!(failures.len(), 2);
        assert!(matches!(failures[0], (2, DecodeError::Checksum { .. })));
        assert_eq!(failures[1], (3, DecodeError::BadMagic));
    }

    #[test]
    fn nothing_valid() {
        let empty = vec![0u8; BLOCK];
        let (best, failures) = newest_transaction([&empty[..], &empty[..]], 1);
        assert_eq!(best, None);
        assert_eq!(failures.len(), 2);
    }

    proptest! {
        #[test]
        fn prop_round_trip(ext in proptest::collection::vec(any::<u32>(), 0..=1016), seq in 1u64.., uuid in any::<u64>()) {
            let b = encode_al_transaction(uuid, seq, &ext).expect("encode");
            prop_assert_eq!(decode_al_transaction(&b, uuid).expect("decode"), AlTransaction { seq, extents: ext });
        }

        #[test]
        fn prop_decode_arbitrary_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..5000), seal_it in any::<bool>(),
        ) {
            if seal_it && bytes.len() == BLOCK {
                put_u32(&mut bytes, 0, AL_MAGIC);
                put_u64(&mut bytes, 16, 0);
                seal(&mut bytes, CRC_OFF);
            }
            let _ = decode_al_transaction(&bytes, 0);
        }
    }
}
