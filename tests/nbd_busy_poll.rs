//! The NBD reader's busy-poll (`[nbd] busy-poll-us`) reads the socket behind tokio's back.
//! Requests and payloads that trickle in, with gaps shorter and longer than the spins, must
//! be served exactly as if they had come at once: no byte lost or read twice, no request left
//! waiting for a readiness event that already went by. Checked with the spin on (default)
//! and off, by reading every write back on a fresh connection. Large writes take the splice
//! path (socket -> pipe -> disk, daemon/splice.rs), so this checks it too, over unix and TCP.

mod common;

use std::time::Duration;

use common::nbd_wire::*;
use common::{pattern, ClusterSpec, EXPORT, MIB};

const SIZE: u64 = 64 * MIB;
/// Gaps between the pieces of one request: none, inside a spin, well past both spins.
const GAPS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_micros(20),
    Duration::from_millis(2),
];

/// Sends `bytes` in `pieces` parts, `gap` apart.
fn trickle(conn: &mut RawConn, bytes: &[u8], pieces: usize, gap: Duration) {
    let step = bytes.len().div_ceil(pieces);
    for (i, part) in bytes.chunks(step).enumerate() {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        conn.send(part).expect("send a piece of a request");
    }
}

fn write_bytes(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("write fits u32");
    request_bytes(0, CMD_WRITE, cookie, offset, len, data)
}

fn trickled_writes_are_served_intact(extra_table: Option<&str>, tcp: bool) {
    let mut spec = ClusterSpec::new(1).size(SIZE).mirrord_only();
    if tcp {
        spec = spec.tcp();
    }
    if let Some(t) = extra_table {
        spec = spec.table(t);
    }
    let c = spec.start();
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.set_read_timeout(Duration::from_secs(20));

    // Small writes one at a time (the idle spin), then large ones whose payload trickles in
    // (the payload spin), each with every gap: (count, length, pieces, first offset).
    let kinds = [(8u64, 4096u64, 3usize, 0u64), (2, MIB, 16, 8 * MIB)];
    let mut written = Vec::new();
    let mut cookie = 1u64;
    for (g, gap) in GAPS.iter().enumerate() {
        for (count, len, pieces, base) in kinds {
            for i in 0..count {
                let offset = base + (g as u64 * count + i) * len;
                let data = pattern::bytes(100 + cookie, len as usize);
                trickle(&mut conn, &write_bytes(cookie, offset, &data), pieces, *gap);
                let r = conn
                    .read_simple_reply()
                    .unwrap_or_else(|e| panic!("no reply to trickled write {cookie}: {e}"));
                assert_eq!((r.cookie, r.error), (cookie, 0), "trickled write {cookie}");
                written.push((offset, data));
                cookie += 1;
            }
        }
    }
    conn.flush();
    conn.disconnect();

    let (mut fresh, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    for (offset, data) in &written {
        let got = fresh.read_at(*offset, data.len() as u32);
        pattern::assert_same(&got, data, &format!("write at offset {offset}"));
    }
    fresh.disconnect();
}

#[test]
fn trickled_writes_with_busy_poll_on() {
    trickled_writes_are_served_intact(None, false);
}

/// The same over TCP: large writes are spliced from a TCP socket there.
#[test]
fn trickled_writes_over_tcp() {
    trickled_writes_are_served_intact(None, true);
}

#[test]
fn trickled_writes_with_busy_poll_off() {
    trickled_writes_are_served_intact(Some("[nbd]\nbusy-poll-us = 0"), false);
}
