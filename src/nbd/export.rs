//! What the server tells a client about one export, and the transmission
//! flags this implementation can serve.

use super::consts::*;

/// One export as the handshake advertises it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (sent in `NBD_INFO_NAME` when asked).
    pub name: String,
    /// Human-readable description (sent in `NBD_INFO_DESCRIPTION` when asked).
    pub description: String,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags, `NBD_FLAG_HAS_FLAGS` included.
    pub flags: u16,
    /// Minimum block size: a power of two, at most 64 KiB.
    pub min_block: u32,
    /// Preferred block size: a power of two, at least max(min_block, 512).
    pub preferred_block: u32,
    /// Maximum block size: a multiple of `min_block` (or 0xffffffff), at
    /// least min(preferred_block, size).
    pub max_block: u32,
}

impl ExportInfo {
    /// True when the block sizes obey the "Block size constraints" section:
    /// minimum "MUST be a power of 2, MUST NOT be larger than 2^16";
    /// preferred "MUST be a power of 2 at least as large as the maximum of
    /// the minimum block size and 2^9"; maximum "MUST be either an integer
    /// multiple of the minimum block size or the value 0xffffffff ..., MUST
    /// be at least as large as the smaller of the preferred block size or
    /// export size".
    pub fn block_sizes_valid(&self) -> bool {
        let min_ok = self.min_block.is_power_of_two() && self.min_block <= 1 << 16;
        let pref_ok = self.preferred_block.is_power_of_two()
            && self.preferred_block >= self.min_block.max(512);
        let max_ok = min_ok
            && (self.max_block == u32::MAX || self.max_block % self.min_block == 0)
            && u64::from(self.max_block) >= u64::from(self.preferred_block).min(self.size);
        min_ok && pref_ok && max_ok
    }
}

/// The transmission flags for an export served by this implementation:
/// `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`, `SEND_WRITE_ZEROES`,
/// `SEND_FAST_ZERO`, `CAN_MULTI_CONN`, `SEND_CACHE`, plus `READ_ONLY` when
/// `read_only` is true.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN
        | NBD_FLAG_SEND_CACHE;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(min: u32, pref: u32, max: u32, size: u64) -> ExportInfo {
        ExportInfo {
            name: "d".into(),
            description: String::new(),
            size,
            flags: NBD_FLAG_HAS_FLAGS,
            min_block: min,
            preferred_block: pref,
            max_block: max,
        }
    }

    #[test]
    fn flags_have_every_feature_and_read_only_on_request() {
        let rw = transmission_flags(false);
        assert_eq!(
            rw,
            0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0800 | 0x0100 | 0x0400
        );
        assert_eq!(rw & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(transmission_flags(true), rw | NBD_FLAG_READ_ONLY);
    }

    #[test]
    fn block_size_rules() {
        assert!(info(1, 4096, u32::MAX, 1 << 30).block_sizes_valid());
        assert!(info(512, 4096, 32 << 20, 1 << 30).block_sizes_valid());
        assert!(info(4096, 4096, 4096, 1 << 30).block_sizes_valid());
        // max below preferred, but export smaller than both: allowed.
        assert!(info(512, 4096, 1024, 1024).block_sizes_valid());
        assert!(!info(3, 4096, u32::MAX, 1 << 30).block_sizes_valid());
        assert!(!info(1 << 17, 1 << 17, 1 << 17, 1 << 30).block_sizes_valid());
        assert!(!info(512, 256, u32::MAX, 1 << 30).block_sizes_valid());
        assert!(!info(4096, 2048, u32::MAX, 1 << 30).block_sizes_valid());
        assert!(!info(512, 4096, 1000, 1 << 30).block_sizes_valid());
        assert!(!info(512, 4096, 2048, 1 << 30).block_sizes_valid());
    }
}
