//! The peer link's round trip, measured at the edge: from the moment the core queues a
//! Ping on a connection to the moment that connection's PingAck reaches the core. Pings
//! share the data connection, so the time includes waiting behind queued data (what a
//! write's acknowledgement waits for too). The peer answers pings in order.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::LinkId;
use crate::daemon::lock;

/// Pings remembered without an answer; older ones are forgotten (the core sends one per
/// ping interval and drops a link whose ping goes unanswered, so a few suffice).
pub const MAX_OUTSTANDING: usize = 16;

pub struct PeerPing {
    round_trip: Histogram,
    last: Gauge<f64, AtomicU64>,
    sent: Mutex<VecDeque<(LinkId, Instant)>>,
}

impl PeerPing {
    pub fn register(reg: &mut Registry) -> PeerPing {
        // 100 µs doubling up to about 3.3 s.
        let round_trip = Histogram::new(exponential_buckets(100e-6, 2.0, 16));
        let last = Gauge::<f64, AtomicU64>::default();
        reg.register(
            "peer_ping_round_trip_seconds",
            "Round trip of pings on the peer link (queued behind replication data like any message)",
            round_trip.clone(),
        );
        reg.register(
            "peer_last_ping_round_trip_seconds",
            "Round trip of the last ping the peer answered (0 before the first)",
            last.clone(),
        );
        PeerPing {
            round_trip,
            last,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// The core queued a Ping on `link` at `now`.
    pub fn sent(&self, link: LinkId, now: Instant) {
        let mut sent = lock(&self.sent);
        if sent.len() >= MAX_OUTSTANDING {
            sent.pop_front();
        }
        sent.push_back((link, now));
    }

    /// A PingAck arrived on `link` at `now`: it answers the oldest ping sent there.
    pub fn acked(&self, link: LinkId, now: Instant) {
        let at = {
            let mut sent = lock(&self.sent);
            let Some(i) = sent.iter().position(|(l, _)| *l == link) else {
                return;
            };
            sent.remove(i).map(|(_, at)| at)
        };
        if let Some(at) = at {
            let rtt = now.saturating_duration_since(at).as_secs_f64();
            self.round_trip.observe(rtt);
            self.last.set(rtt);
        }
    }

    /// Connection `link` is gone: its pings will not be answered.
    pub fn link_down(&self, link: LinkId) {
        lock(&self.sent).retain(|(l, _)| *l != link);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_ack_answers_the_oldest_ping_of_its_own_link() {
        let mut reg = Registry::default();
        let p = PeerPing::register(&mut reg);
        let t0 = Instant::now();
        p.sent(1, t0);
        p.sent(2, t0 + Duration::from_millis(1));
        p.sent(1, t0 + Duration::from_millis(2));
        p.acked(2, t0 + Duration::from_millis(4));
        assert!((p.last.get() - 0.003).abs() < 1e-9, "{}", p.last.get());
        p.acked(1, t0 + Duration::from_millis(5));
        assert!((p.last.get() - 0.005).abs() < 1e-9, "{}", p.last.get());
        p.link_down(1);
        // The second ping of link 1 went with it: this ack matches nothing.
        p.acked(1, t0 + Duration::from_secs(9));
        assert!((p.last.get() - 0.005).abs() < 1e-9);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).expect("encode");
        assert!(
            out.contains("\npeer_ping_round_trip_seconds_count 2\n"),
            "{out}"
        );
    }

    #[test]
    fn unanswered_pings_are_bounded() {
        let mut reg = Registry::default();
        let p = PeerPing::register(&mut reg);
        let t0 = Instant::now();
        for i in 0..100 {
            p.sent(3, t0 + Duration::from_millis(i));
        }
        assert_eq!(lock(&p.sent).len(), MAX_OUTSTANDING);
        // The oldest kept is ping 84 (sent at 84 ms).
        p.acked(3, t0 + Duration::from_millis(100));
        assert!((p.last.get() - 0.016).abs() < 1e-9, "{}", p.last.get());
    }
}
