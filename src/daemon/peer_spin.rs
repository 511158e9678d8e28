//! When the peer link's reader spins for the next frame instead of sleeping in epoll.
//!
//! A client that writes one block at a time through the other node (QD1: a database's
//! commits, a journal) sends the next write soon after the last one's ack. On this
//! machine's VMs a sleeping reader then costs a cross-CPU wake-up, 25-50 µs per write on the
//! secondary's side of every replicated write. Spinning whenever the link is quiet took a
//! CPU from the primary and the client under load (docs/BENCH.md: 4K QD32 35K -> 20K IOPS),
//! so the reader spins only while the traffic looks like QD1: [`STREAK`] batches in a row
//! that were one small write each, and the last time the socket ran empty the next frame
//! came within [`POLL`]. Anything else (several writes in one read, a large write, a resync
//! request, an ack) ends the streak; a gap longer than a spin stops the spinning until a
//! gap is short again. `[nbd] busy-poll-us = 0` turns it off, as it does the NBD side's.
//! No spinning over TLS (a record may hold part of a frame).

use std::time::Duration;

use crate::peer::Message;

/// How long the reader spins for the next frame, at most.
pub(super) const POLL: Duration = Duration::from_micros(150);
/// Batches in a row, each one small write, before the reader spins.
const STREAK: u32 = 2;
/// Writes at most this large count towards the streak.
const SMALL_WRITE_MAX: u64 = 16 * 1024;

/// The reader's spin decision for one link (see the module comment).
#[derive(Debug)]
pub(super) struct PeerSpin {
    enabled: bool,
    /// Batches in a row that were one small write each (saturates at `STREAK`).
    streak: u32,
    /// The last time the socket ran empty, the next bytes came within `POLL`.
    gap_short: bool,
}

impl PeerSpin {
    pub(super) fn new(enabled: bool) -> PeerSpin {
        PeerSpin {
            enabled,
            streak: 0,
            gap_short: true,
        }
    }

    /// The reader decoded `msgs` from one read and hands them to the core.
    pub(super) fn batch(&mut self, msgs: &[Message]) {
        assert!(!msgs.is_empty(), "a batch holds at least one message");
        let one_small_write = msgs.len() == 1
            && matches!(&msgs[0], Message::Write { kind, .. } if kind.len() <= SMALL_WRITE_MAX);
        self.streak = if one_small_write {
            (self.streak + 1).min(STREAK)
        } else {
            0
        };
        assert!(self.streak <= STREAK);
    }

    /// How long to spin now that the socket is empty (zero: sleep at once).
    pub(super) fn poll(&self) -> Duration {
        if self.enabled && self.streak >= STREAK && self.gap_short {
            POLL
        } else {
            Duration::ZERO
        }
    }

    /// The socket was empty for `gap` (spinning, sleeping or both) before more came.
    pub(super) fn waited(&mut self, gap: Duration) {
        self.gap_short = gap < POLL;
        assert!(self.poll() <= POLL);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::peer::WriteKind;

    fn write(len: usize) -> Message {
        Message::Write {
            seq: 1,
            seen: 0,
            offset: 0,
            kind: WriteKind::Data(Bytes::from(vec![0u8; len])),
            fua: false,
            resync: false,
        }
    }

    fn ack() -> Message {
        Message::WriteAck { seq: 1, error: 0 }
    }

    #[test]
    fn spins_only_after_a_streak_of_single_small_writes() {
        let mut s = PeerSpin::new(true);
        assert_eq!(s.poll(), Duration::ZERO, "no traffic yet");
        s.batch(&[write(4096)]);
        assert_eq!(s.poll(), Duration::ZERO, "one batch is not a streak");
        s.batch(&[write(4096)]);
        assert_eq!(s.poll(), POLL);
        s.batch(&[write(4096)]);
        assert_eq!(s.poll(), POLL, "the streak holds");
    }

    #[test]
    fn other_traffic_ends_the_streak() {
        let cases: [&[Message]; 3] = [&[write(4096), write(4096)], &[write(64 * 1024)], &[ack()]];
        for batch in cases {
            let mut s = PeerSpin::new(true);
            s.batch(&[write(4096)]);
            s.batch(&[write(4096)]);
            assert_eq!(s.poll(), POLL);
            s.batch(batch);
            assert_eq!(s.poll(), Duration::ZERO, "{batch:?}");
            s.batch(&[write(4096)]);
            assert_eq!(s.poll(), Duration::ZERO, "the streak starts over");
        }
    }

    #[test]
    fn a_long_gap_stops_the_spinning_until_a_short_one() {
        let mut s = PeerSpin::new(true);
        s.batch(&[write(512)]);
        s.batch(&[write(512)]);
        s.waited(POLL);
        assert_eq!(s.poll(), Duration::ZERO, "a spin would have run out");
        s.batch(&[write(512)]);
        assert_eq!(s.poll(), Duration::ZERO);
        s.waited(POLL / 3);
        assert_eq!(s.poll(), POLL);
    }

    #[test]
    fn never_spins_when_busy_polling_is_off() {
        let mut s = PeerSpin::new(false);
        for _ in 0..5 {
            s.batch(&[write(4096)]);
            s.waited(Duration::from_micros(1));
            assert_eq!(s.poll(), Duration::ZERO);
        }
    }
}
