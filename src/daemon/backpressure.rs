//! NBD back-pressure (docs/ARCHITECTURE.md, "Limits"): what NBD connections hold in memory
//! (requests handed to the core, counted by their READ length or WRITE payload, and reply
//! bytes not yet sent) is bounded per connection and in all. A connection's reader decodes
//! its next request only while both are under their limit, so a client that sends requests
//! and reads no replies stops being read: the kernel's socket buffers fill and it waits.
//! Every reader also waits while the peer send queues are full
//! ([`super::peer_link::send_queue_full`]): under protocol A a write is answered once it is
//! queued for the peer, so without this a peer that stops reading would let the queue grow
//! with the clients' writes.

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
/// connection holds at most its limit plus one request. None may while the peer send
/// queues are full: they empty when the peer reads, or when its link is dropped.
pub(super) fn may_take(held: usize) -> bool {
    room(
        held,
        TOTAL.load(Ordering::Relaxed),
        super::peer_link::send_queue_full(),
    )
}

/// [`may_take`] for a connection holding `held`, all holding `total`.
fn room(held: usize, total: usize, peer_full: bool) -> bool {
    !peer_full && (held == 0 || (held < CONN_MAX_BYTES && total < TOTAL_MAX_BYTES))
}

/// Waits until [`may_take`] holds for `held()`. False: the daemon is stopping (`stop`).
pub(super) async fn wait_for_room(
    held: impl Fn() -> usize,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut pause = RECHECK_FIRST;
    while !may_take(held()) {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            // The value, not a change: a stop another wait of this reader already saw (a
            // payload's) still ends this one, and the stop waits for the reader. Err: the
            // sender is gone, which only happens when the daemon is ending.
            _ = stop.wait_for(|&stopping| stopping) => return false,
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
        a.update(1);
        assert_eq!(TOTAL.load(Ordering::Relaxed), before + 11);
        drop(a);
        drop(b);
        assert_eq!(TOTAL.load(Ordering::Relaxed), before);
    }

    #[test]
    fn a_reader_waits_for_its_own_room_the_total_and_the_peer() {
        assert!(
            !room(CONN_MAX_BYTES, CONN_MAX_BYTES, false),
            "a full connection waits"
        );
        assert!(
            room(0, TOTAL_MAX_BYTES, false),
            "an empty one never does..."
        );
        assert!(!room(0, 0, true), "...unless the peer send queues are full");
        assert!(room(1, TOTAL_MAX_BYTES - 1, false));
        assert!(!room(1, TOTAL_MAX_BYTES, false), "the total is full");
        assert!(!room(1, 1, true));
    }
}
