//! The peer send queue limit (docs/ARCHITECTURE.md, "Limits"): a peer that stops
//! reading is disconnected with a log line once the queue is full and nothing moves
//! for `[net] timeout`; meanwhile the NBD clients are held by back-pressure (the queue
//! does not grow with their writes, even under protocol A, where a write is answered
//! once queued), then served again; the pair resyncs when the peer reads again.

mod common;

use std::time::{Duration, Instant};

use common::link_proxy::LinkProxy;
use common::nbd_wire::RawConn;
use common::pair::{connected, wait_in_sync};
use common::process::rss;
use common::{pattern, ClusterSpec, EXPORT, MIB};

const SIZE: u64 = 64 * MIB;
const PASSES: u64 = 6;
const T: Duration = Duration::from_secs(120);
/// The queue limit (`peer_link::PEER_SEND_MAX_BYTES`) in MiB.
const LIMIT_MIB: u64 = 256;

/// What pass `pass` writes at `offset` (1 MiB).
fn block(pass: u64, offset: u64) -> Vec<u8> {
    pattern::bytes(pass << 32 | offset, MIB as usize)
}

/// The MiB queued that the disconnect line names.
fn queued_mib(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("the peer has read nothing for"))?;
    let rest = &line[line.find(" with ")? + 6..];
    rest.split(' ').next()?.parse().ok()
}

#[test]
fn a_peer_that_stops_reading_is_disconnected_and_the_clients_are_held_not_failed() {
    let mut c = ClusterSpec::new(2)
        .size(SIZE)
        .mirrord_only()
        .protocol('A')
        // The send queue rule acts after `timeout`; the ping and ko-count rules, which
        // would also drop a silent peer, are set far later so that this one is seen.
        .table(
            "[net]\ninsecure-allow-relay = true\ntimeout = \"1s\"\nko-count = 90\n\
             ping-timeout = \"90s\"",
        )
        .build();
    let proxy = LinkProxy::start(c.nodes[1].cfg.peer_addr);
    c.start_via_proxy(&proxy);
    c.wait_status(0, T, "connected", connected);
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    wait_in_sync(&c, "the initial sync");
    let pid = c.daemon(0).pid();
    let baseline = rss(pid);

    // beta now reads nothing from alpha; a client writes the disk 6 times over
    // (384 MiB, more than the queue's limit).
    proxy.hold_forward(true);
    let addr = c.nbd_addr(0).clone();
    let writer = std::thread::spawn(move || {
        let (mut conn, _) = RawConn::handshake(&addr, EXPORT);
        conn.set_read_timeout(Duration::from_secs(60));
        let mut slowest = Duration::ZERO;
        for pass in 0..PASSES {
            for off in (0..SIZE).step_by(MIB as usize) {
                let t = Instant::now();
                conn.write_at(off, &block(pass, off));
                slowest = slowest.max(t.elapsed());
            }
        }
        conn.flush();
        slowest
    });
    let start = Instant::now();
    let mut peak = 0;
    while !writer.is_finished() {
        assert!(start.elapsed() < T, "the client's writes did not finish");
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let slowest = writer.join().expect("the client's writes all succeeded");
    let log = c.log_text(0);
    let queued = queued_mib(&log).unwrap_or_else(|| panic!("no disconnect line:\n{log}"));
    eprintln!(
        "alpha: RSS {} MiB before, peak {} MiB; disconnected with {queued} MiB queued; \
         slowest client write {slowest:?}",
        baseline / MIB,
        peak / MIB
    );
    // The queue stopped at its limit (plus at most one 1 MiB write per reader that was
    // let through): back-pressure, not growth.
    assert!(
        (LIMIT_MIB..=LIMIT_MIB + 2).contains(&queued),
        "{queued} MiB were queued"
    );
    assert!(
        slowest >= Duration::from_millis(900),
        "no client write was held ({slowest:?}): the queue was not full?"
    );
    assert!(peak < 512 * MIB, "alpha's RSS reached {} MiB", peak / MIB);
    assert!(
        !log.contains("hard limit"),
        "the hard limit fired: the back-pressure did not hold"
    );
    c.assert_running(0);

    // The peer reads again: a new connection, and the resync makes the disks equal.
    proxy.hold_forward(false);
    wait_in_sync(&c, "the resync after the peer reads again");
    let last: Vec<u8> = (0..SIZE)
        .step_by(MIB as usize)
        .flat_map(|off| block(PASSES - 1, off))
        .collect();
    c.stop(0);
    c.stop(1);
    for i in 0..2 {
        let disk = std::fs::read(c.disk_path(i)).expect("read a disk");
        pattern::assert_same(&disk, &last, &format!("node {i}'s disk"));
    }
    assert!(
        proxy.connections() >= 2,
        "no reconnection through the proxy"
    );
}
