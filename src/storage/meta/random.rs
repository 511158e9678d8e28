//! Random identifiers from /dev/urandom.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::MetaError;

const URANDOM: &str = "/dev/urandom";

fn random_u64() -> Result<u64, MetaError> {
    let mut buf = [0u8; 8];
    File::open(URANDOM)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| MetaError::io(Path::new(URANDOM), "reading random bytes", e))?;
    Ok(u64::from_le_bytes(buf))
}

/// Draws until `accept` holds; bounded (the chance of 8 rejections is ~2^-500).
fn random_where(accept: impl Fn(u64) -> bool) -> Result<u64, MetaError> {
    for _ in 0..8 {
        let v = random_u64()?;
        if accept(v) {
            return Ok(v);
        }
    }
    Err(MetaError::InvalidArgument(
        "/dev/urandom keeps returning zero".into(),
    ))
}

/// A fresh generation identifier: random, nonzero, with the lowest bit cleared.
/// Bit 0 is left to the core (DRBD uses it to mark "primary").
pub fn new_generation_id() -> Result<u64, MetaError> {
    random_where(|v| v & !1 != 0).map(|v| v & !1)
}

/// A fresh device uuid: random and nonzero.
pub fn new_device_uuid() -> Result<u64, MetaError> {
    random_where(|v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_nonzero_even_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let gi = new_generation_id().expect("urandom");
            assert_ne!(gi, 0);
            assert_eq!(gi & 1, 0);
            assert!(seen.insert(gi), "duplicate generation id");
            assert_ne!(new_device_uuid().expect("urandom"), 0);
        }
    }
}
