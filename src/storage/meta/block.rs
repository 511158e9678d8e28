//! Little-endian field access and the crc32 shared by all metadata blocks.
//!
//! Callers check the buffer length (one `BLOCK_SIZE` block) before using
//! these, so the slice indexing below stays in bounds.

use super::BLOCK_SIZE;

/// One metadata block as bytes.
pub(crate) const BLOCK: usize = BLOCK_SIZE as usize;

pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// crc32 over the whole block except the 4-byte crc field at `crc_off`.
pub(crate) fn block_crc(buf: &[u8], crc_off: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..crc_off]);
    h.update(&buf[crc_off + 4..]);
    h.finalize()
}

/// Stores the crc of `buf` at `crc_off`.
pub(crate) fn seal(buf: &mut [u8], crc_off: usize) {
    let crc = block_crc(buf, crc_off);
    put_u32(buf, crc_off, crc);
}

/// Ok if the stored crc matches the contents.
pub(crate) fn check_crc(buf: &[u8], crc_off: usize) -> Result<(), super::DecodeError> {
    let stored = get_u32(buf, crc_off);
    let computed = block_crc(buf, crc_off);
    if stored == computed {
        Ok(())
    } else {
        Err(super::DecodeError::Checksum { stored, computed })
    }
}

/// Ok if `buf` is exactly one block.
pub(crate) fn check_len(buf: &[u8]) -> Result<(), super::DecodeError> {
    if buf.len() == BLOCK {
        Ok(())
    } else {
        Err(super::DecodeError::Length { len: buf.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_check_and_detect_flip() {
        let mut b = vec![7u8; BLOCK];
        seal(&mut b, 8);
        assert!(check_crc(&b, 8).is_ok());
        b[100] ^= 1;
        assert!(matches!(
            check_crc(&b, 8),
            Err(crate::storage::meta::DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn le_round_trip() {
        let mut b = [0u8; 16];
        put_u32(&mut b, 1, 0xdead_beef);
        put_u64(&mut b, 5, 0x0102_0304_0506_0708);
        assert_eq!(get_u32(&b, 1), 0xdead_beef);
        assert_eq!(get_u64(&b, 5), 0x0102_0304_0506_0708);
        assert_eq!(b[5], 0x08);
    }
}
