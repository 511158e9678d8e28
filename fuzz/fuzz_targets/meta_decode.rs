//! Feeds arbitrary bytes to the on-disk metadata decoders (superblock,
//! activity-log transaction, bitmap page). The first input byte picks the
//! decoder and whether to fix up magic and crc32 so that the field checks
//! behind them are reached. Must never panic; whatever decodes must
//! re-encode to a block that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_mirror::storage::meta::{
    decode_al_transaction, decode_bitmap_page, decode_superblock, encode_al_transaction,
    encode_bitmap_page, encode_superblock, AL_EXTENT_SIZE, BITMAP_BITS_PER_PAGE, BLOCK_SIZE,
    FORMAT_VERSION,
};

const BLOCK: usize = BLOCK_SIZE as usize;

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    (u64::from(get_u32(b, off + 4)) << 32) | u64::from(get_u32(b, off))
}

/// Stores the crc32 of the block (crc field skipped) at `crc_off`, as the format defines.
fn seal(b: &mut [u8], crc_off: usize) {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..crc_off]);
    h.update(&b[crc_off + 4..]);
    let crc = h.finalize();
    b[crc_off..crc_off + 4].copy_from_slice(&crc.to_le_bytes());
}

fn superblock(mut b: Vec<u8>, fix: bool, fields: bool) {
    if fix {
        b[0..8].copy_from_slice(b"NBDMIRSB");
        if fields {
            b[12..16].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            b[40..44].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
            b[44..48].copy_from_slice(&(AL_EXTENT_SIZE as u32).to_le_bytes());
        }
        seal(&mut b, 8);
    }
    if let Ok(rec) = decode_superblock(&b) {
        let again = encode_superblock(&rec).expect("a decoded superblock encodes");
        assert_eq!(decode_superblock(&again).expect("re-decode"), rec);
    }
}

fn activity_log(mut b: Vec<u8>, fix: bool) {
    if fix {
        b[0..4].copy_from_slice(b"NMAL");
        seal(&mut b, 4);
    }
    let uuid = if b.len() >= 24 { get_u64(&b, 16) } else { 0 };
    if let Ok(tx) = decode_al_transaction(&b, uuid) {
        let again = encode_al_transaction(uuid, tx.seq, &tx.extents).expect("re-encode");
        assert_eq!(decode_al_transaction(&again, uuid).expect("re-decode"), tx);
    }
}

fn bitmap_page(mut b: Vec<u8>, fix: bool, bits_seed: u8) {
    if fix {
        b[0..4].copy_from_slice(b"NMBP");
        seal(&mut b, 4);
    }
    let (page, uuid) = if b.len() >= 24 {
        (get_u32(&b, 8), get_u64(&b, 16))
    } else {
        (0, 0)
    };
    let bits = BITMAP_BITS_PER_PAGE - u64::from(bits_seed) * 127;
    let mut words = vec![0u64; bits.div_ceil(64) as usize];
    if decode_bitmap_page(&b, page, uuid, bits, &mut words).is_ok() {
        let again = encode_bitmap_page(uuid, page, &words).expect("re-encode");
        let mut out = vec![0u64; words.len()];
        decode_bitmap_page(&again, page, uuid, bits, &mut out).expect("re-decode");
        assert_eq!(out, words);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let fix = sel & 0x80 != 0;
    let mut block = rest.to_vec();
    if fix {
        // Magic and crc need a whole block.
        block.resize(BLOCK, 0);
    }
    match sel % 3 {
        0 => superblock(block, fix, sel & 0x40 != 0),
        1 => activity_log(block, fix),
        _ => bitmap_page(block, fix, sel.wrapping_shr(2) & 0x1f),
    }
});
