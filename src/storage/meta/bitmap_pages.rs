//! The out-of-sync bitmap as checksummed 4 KiB pages.
//!
//! Bit `i` of the bitmap (bit `i % 64` of word `i / 64`) is data block `i`
//! (bytes `i * 4096 .. (i + 1) * 4096`); set = out of sync.
//!
//! Byte format of one page (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `NMBP` |
//! | 4 | 4 | crc32 of the whole block with this field skipped |
//! | 8 | 4 | page index |
//! | 12 | 4 | zero |
//! | 16 | 8 | device uuid |
//! | 24 | 8 | zero |
//! | 32 | 4064 | 508 bitmap words; bits past the end of the bitmap are zero |

use std::ops::Range;

use super::block::{check_crc, check_len, get_u32, get_u64, put_u32, put_u64, seal, BLOCK};
use super::DecodeError;

pub const BITMAP_PAGE_MAGIC: u32 = u32::from_le_bytes(*b"NMBP");
const CRC_OFF: usize = 4;
const HEADER: usize = 32;

/// u64 words of bitmap per page.
pub const BITMAP_WORDS_PER_PAGE: usize = (BLOCK - HEADER) / 8;
/// Bitmap bits (4 KiB data blocks) per page: 32512, i.e. 127 MiB of data.
pub const BITMAP_BITS_PER_PAGE: u64 = BITMAP_WORDS_PER_PAGE as u64 * 64;

/// The page that holds the bit of data block `block`.
pub fn bitmap_page_of_block(block: u64) -> usize {
    (block / BITMAP_BITS_PER_PAGE) as usize
}

/// The word range of `page` within a bitmap of `total_bits` bits (empty past the end).
pub(crate) fn page_words(page: usize, total_bits: u64) -> Range<usize> {
    let total_words = total_bits.div_ceil(64) as usize;
    let start = page.saturating_mul(BITMAP_WORDS_PER_PAGE).min(total_words);
    let end = start.saturating_add(BITMAP_WORDS_PER_PAGE).min(total_words);
    start..end
}

/// How many bitmap bits `page` holds within a bitmap of `total_bits` bits.
pub(crate) fn page_bits(page: usize, total_bits: u64) -> u64 {
    let start = (page as u64).saturating_mul(BITMAP_BITS_PER_PAGE);
    total_bits.saturating_sub(start).min(BITMAP_BITS_PER_PAGE)
}

/// Encodes `words` (at most `BITMAP_WORDS_PER_PAGE`) as page `page`.
pub fn encode_bitmap_page(
    device_uuid: u64,
    page: u32,
    words: &[u64],
) -> Result<Vec<u8>, DecodeError> {
    if words.len() > BITMAP_WORDS_PER_PAGE {
        return Err(DecodeError::Field {
            field: "bitmap words",
            detail: format!(
                "{} words do not fit in a page of {BITMAP_WORDS_PER_PAGE}",
                words.len()
            ),
        });
    }
    let mut b = vec![0u8; BLOCK];
    put_u32(&mut b, 0, BITMAP_PAGE_MAGIC);
    put_u32(&mut b, 8, page);
    put_u64(&mut b, 16, device_uuid);
    for (i, w) in words.iter().enumerate() {
        put_u64(&mut b, HEADER + i * 8, *w);
    }
    seal(&mut b, CRC_OFF);
    Ok(b)
}

/// Decodes page `expected_page` of device `device_uuid` into `out`, which must be
/// `bits_in_page.div_ceil(64)` words long. Bits at or past `bits_in_page` must be zero.
pub fn decode_bitmap_page(
    buf: &[u8],
    expected_page: u32,
    device_uuid: u64,
    bits_in_page: u64,
    out: &mut [u64],
) -> Result<(), DecodeError> {
    check_len(buf)?;
    if bits_in_page > BITMAP_BITS_PER_PAGE || out.len() as u64 != bits_in_page.div_ceil(64) {
        return Err(DecodeError::Field {
            field: "bitmap page request",
            detail: format!("{bits_in_page} bits into {} words", out.len()),
        });
    }
    if get_u32(buf, 0) != BITMAP_PAGE_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    check_crc(buf, CRC_OFF)?;
    let page = get_u32(buf, 8);
    if page != expected_page {
        return Err(DecodeError::WrongPage {
            found: page,
            expected: expected_page,
        });
    }
    let uuid = get_u64(buf, 16);
    if uuid != device_uuid {
        return Err(DecodeError::ForeignDevice {
            found: uuid,
            expected: device_uuid,
        });
    }
    if get_u32(buf, 12) != 0 || get_u64(buf, 24) != 0 {
        return Err(DecodeError::Field {
            field: "bitmap page header",
            detail: "reserved bytes not zero".into(),
        });
    }
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = get_u64(buf, HEADER + i * 8);
    }
    let tail_bits = bits_in_page % 64;
    let tail_dirty = match out.last() {
        Some(last) if tail_bits != 0 => last >> tail_bits != 0,
        _ => false,
    };
    let rest_dirty = buf[HEADER + out.len() * 8..].iter().any(|&c| c != 0);
    if tail_dirty || rest_dirty {
        return Err(DecodeError::Field {
            field: "bitmap page",
            detail: format!("bits set past the end of the bitmap (page holds {bits_in_page} bits)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants() {
        assert_eq!(BITMAP_WORDS_PER_PAGE, 508);
        assert_eq!(BITMAP_BITS_PER_PAGE, 32512);
        assert_eq!(bitmap_page_of_block(0), 0);
        assert_eq!(bitmap_page_of_block(32511), 0);
        assert_eq!(bitmap_page_of_block(32512), 1);
    }

    #[test]
    fn page_ranges() {
        let total = 32512 + 100; // one full page and 100 bits
        assert_eq!(page_words(0, total), 0..508);
        assert_eq!(page_words(1, total), 508..510);
        assert_eq!(page_words(2, total), 510..510);
        assert_eq!(page_bits(0, total), 32512);
        assert_eq!(page_bits(1, total), 100);
        assert_eq!(page_bits(2, total), 0);
    }

    #[test]
    fn round_trip_partial_page() {
        let words = [u64::MAX, 0x5, (1 << 36) - 1];
        let b = encode_bitmap_page(77, 3, &words).expect("encode");
        let mut out = [0u64; 3];
        decode_bitmap_page(&b, 3, 77, 64 * 2 + 36, &mut out).expect("decode");
        assert_eq!(out, words);
    }

    #[test]
    fn detects_problems() {
        let b = encode_bitmap_page(77, 3, &[1, 2]).expect("encode");
        let mut out = [0u64; 2];
        assert_eq!(
            decode_bitmap_page(&b, 4, 77, 128, &mut out),
            Err(DecodeError::WrongPage {
                found: 3,
                expected: 4
            })
        );
        assert_eq!(
            decode_bitmap_page(&b, 3, 78, 128, &mut out),
            Err(DecodeError::ForeignDevice {
                found: 77,
                expected: 78
            })
        );
        let mut torn = b.clone();
        torn[40] ^= 0x10;
        assert!(matches!(
            decode_bitmap_page(&torn, 3, 77, 128, &mut out),
            Err(DecodeError::Checksum { .. })
        ));
        assert_eq!(
            decode_bitmap_page(&vec![0; 4096], 3, 77, 128, &mut out),
            Err(DecodeError::BadMagic)
        );
        // Word 1 = 2 has bit 1 set, past a 65-bit page.
        assert!(matches!(
            decode_bitmap_page(&b, 3, 77, 65, &mut out),
            Err(DecodeError::Field { .. })
        ));
        // Word 1 present in the block but the page holds one word only.
        let mut one = [0u64; 1];
        assert!(matches!(
            decode_bitmap_page(&b, 3, 77, 64, &mut one),
            Err(DecodeError::Field { .. })
        ));
        assert!(encode_bitmap_page(1, 0, &[0; 509]).is_err());
    }

    proptest! {
        #[test]
        fn prop_round_trip(words in proptest::collection::vec(any::<u64>(), 0..=508), page in any::<u32>(), uuid in any::<u64>()) {
            let b = encode_bitmap_page(uuid, page, &words).expect("encode");
            let mut out = vec![0u64; words.len()];
            decode_bitmap_page(&b, page, uuid, words.len() as u64 * 64, &mut out).expect("decode");
            prop_assert_eq!(out, words);
        }

        #[test]
        fn prop_decode_arbitrary_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..5000),
            seal_it in any::<bool>(), bits in 0u64..40000, words in 0usize..600,
        ) {
            if seal_it && bytes.len() == BLOCK {
                put_u32(&mut bytes, 0, BITMAP_PAGE_MAGIC);
                seal(&mut bytes, CRC_OFF);
            }
            let mut out = vec![0u64; words];
            let _ = decode_bitmap_page(&bytes, 0, 0, bits, &mut out);
        }
    }
}
