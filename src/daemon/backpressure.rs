//! NBD back-pressure (docs/ARCHITECTURE.md, "Limits"): what NBD connections hold in memory
//! (requests handed to the core, counted by their READ length or WRITE payload, and reply
//! bytes not yet sent) is bounded per connection and in all. A connection's reader decodes
//! its next request only while both are under their limit, so a client that sends requests
//! and reads no replies stops being read: the kernel's socket buffers fill and it waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Bytes one connection may hold before its reader stops decoding requests.
pub const CONN_MAX_BYTES: usize = 64 << 20;
/// Bytes all connections together may hold before every reader holding anything stops.
pub const TOTAL_MAX_BYTES: usize = 256 << 20;
/// What a request handed to the core counts for at least, whatever its size (FLUSH, TRIM,
/// a spliced WRITE whose payload never passes through our memory): so the number of
/// requests in the core, including those it holds during a handshake or a freeze, is
/// bounded too, at `CONN_MAX_BYTES / REQUEST_MIN_BYTES` + 1 per connection.
pub const REQUEST_MIN_BYTES: usize = 4096;
/// How soon a stopped reader looks again: first after 1 ms, then twice as long each time
/// up to 16 ms (a client that reads nothing costs little CPU).
const RECHECK_FIRST: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(16);

/// What all connections hold.
static TOTAL: AtomicUsize = AtomicUsize::new(0);

/// One connection's share of the total, as last counted; given back when dropped.
#[derive(Debug, Default)]
pub(super) struct Share {
    counted: usize,
}

impl Share {
    /// Brings the total up to date with what this connection holds now.
    pub(super) fn update(&mut self, held: usize) {
        if held > self.counted {
            TOTAL.fetch_add(held - self.counted, Ordering::Relaxed);
        } else if held < self.counted {
            TOTAL.fetch_sub(self.counted - held, Ordering::Relaxed);
        }
        self.counted = held;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.update(0);
    }
}

/// Whether a connection holding `held` bytes may take its next request. One that holds
/// nothing always may, so every connection makes progress whatever the others hold; so a
/// connection holds at most its limit plus one request.
pub(super) fn may_take(held: usize) -> bool {
    held == 0 || (held < CONN_MAX_BYTES && TOTAL.load(Ordering::Relaxed) < TOTAL_MAX_BYTES)
}

/// Waits until [`may_take`] holds for `held()`. False: `stop` fired first.
pub(super) async fn wait_for_room(
    held: impl Fn() -> usize,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut pause = RECHECK_FIRST;
    while !may_take(held()) {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return false,
        }
        pause = (pause * 2).min(RECHECK_MAX);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_are_given_back() {
        // Other tests in this process hold nothing: the total moves by our shares only.
        let before = TOTAL.load(Ordering::Relaxed);
        let mut a = Share::default();
        let mut b = Share::default();
        a.update(CONN_MAX_BYTES);
        b.update(10);
        assert_eq!(TOTAL.load(Ordering::Relaxed), before + CONN_MAX_BYTES + 10);
        assert!(!may_take(CONN_MAX_BYTES), "a full connection waits");
        assert!(may_take(0), "an empty one never does");
        a.update(1);
        assert_eq!(TOTAL.load(Ordering::Relaxed), before + 11);
        assert!(may_take(1));
        drop(a);
        drop(b);
        assert_eq!(TOTAL.load(Ordering::Relaxed), before);
    }
}
