//! What simulated sectors hold. Every 512-byte sector carries one u64 *value*
//! spread over the whole sector in a checkable pattern, so the simulator can
//! tell from any bytes the core hands around which write (and which sector of
//! it) they came from, and notice bytes that were corrupted or misplaced.
//!
//! Value 0 is an all-zero sector (never written, trimmed or zeroed). Other
//! values are `write_id << 32 | sector`; garbage on a fresh disk has the top bit set.

use bytes::{BufMut, Bytes, BytesMut};

pub const SECTOR: u64 = 512;
const WORDS: usize = (SECTOR / 8) as usize;
/// Marks a value that no write produced (initial contents of a fresh disk).
pub const GARBAGE: u64 = 1 << 63;

pub fn value_of(write: u32, sector: u64) -> u64 {
    ((write as u64) << 32) | (sector & 0xFFFF_FFFF)
}

/// The write a value came from (None for zeros and garbage).
pub fn write_of(v: u64) -> Option<u32> {
    if v == 0 || v & GARBAGE != 0 {
        None
    } else {
        Some((v >> 32) as u32)
    }
}

/// The sector a nonzero value was made for.
pub fn sector_of(v: u64) -> u64 {
    v & 0xFFFF_FFFF
}

pub fn garbage(random: u64, sector: u64) -> u64 {
    GARBAGE | (random & 0x7FFF_FFFF_0000_0000) | (sector & 0xFFFF_FFFF)
}

fn word(v: u64, i: usize) -> u64 {
    if i == 0 {
        v
    } else {
        (v ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(i as u32)
    }
}

/// The bytes of consecutive sectors holding `values`.
pub fn encode(values: &[u64]) -> Bytes {
    let mut b = BytesMut::with_capacity(values.len() * SECTOR as usize);
    for &v in values {
        if v == 0 {
            b.put_bytes(0, SECTOR as usize);
        } else {
            for i in 0..WORDS {
                b.put_u64_le(word(v, i));
            }
        }
    }
    b.freeze()
}

/// The values of whole sectors, or why the bytes are not ones we wrote.
pub fn decode(data: &[u8]) -> Result<Vec<u64>, String> {
    if data.len() % SECTOR as usize != 0 {
        return Err(format!(
            "{} bytes is not a whole number of sectors",
            data.len()
        ));
    }
    let mut out = Vec::with_capacity(data.len() / SECTOR as usize);
    for (n, sector) in data.chunks(SECTOR as usize).enumerate() {
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&sector[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        let v = w(0);
        let ok = if v == 0 {
            sector.iter().all(|b| *b == 0)
        } else {
            (1..WORDS).all(|i| w(i) == word(v, i))
        };
        if !ok {
            return Err(format!(
                "sector {n} of the buffer does not hold a simulator pattern (first word {v:#x})"
            ));
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detects_a_flipped_bit() {
        let vals = vec![0, value_of(7, 3), garbage(0xABCD_0000_0000, 4)];
        let b = encode(&vals);
        assert_eq!(decode(&b).unwrap(), vals);
        assert_eq!(write_of(vals[1]), Some(7));
        assert_eq!(sector_of(vals[1]), 3);
        assert_eq!(write_of(vals[2]), None);
        for bit in [0usize, 100, 4000, 8 * 1536 - 1] {
            let mut m = b.to_vec();
            m[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&m).is_err(), "flip of bit {bit} not noticed");
        }
    }
}
