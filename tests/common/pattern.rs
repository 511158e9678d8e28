//! Deterministic pseudo-random test data, so a failing test can be replayed
//! and two buffers made from the same seed compare equal.

/// splitmix64: tiny, good enough to make every 8 bytes distinct.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes derived from `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Index of the first byte where `a` and `b` differ (or where one ends).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    None
}

/// Asserts `got == want` with a short message (offset of the first
/// difference) instead of dumping megabytes.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: data differs at byte {i} (got {} bytes, want {} bytes; got {:02x?}, want {:02x?})",
            got.len(),
            want.len(),
            got.get(i..(i + 16).min(got.len())).unwrap_or(&[]),
            want.get(i..(i + 16).min(want.len())).unwrap_or(&[]),
        );
    }
}
