//! The held-request limit (docs/ARCHITECTURE.md, "Limits"): while writes are frozen
//! (fencing), a client that pipelines many small writes stops being read once its
//! connection holds `CONN_MAX_BYTES` (each request counting at least
//! `REQUEST_MIN_BYTES`): the daemon takes at most 16,385 of them, the rest wait in the
//! client's socket (back-pressure, not growth). Other clients are served meanwhile, and
//! every request is answered once the freeze ends.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::nbd_wire::{request_bytes, RawConn, CMD_TRIM};
use common::pair::{connected, wait_in_sync};
use common::{pattern, ClusterSpec, EXPORT, MIB};

const T: Duration = Duration::from_secs(60);
const SIZE: u64 = 16 * MIB;
/// `backpressure::CONN_MAX_BYTES / REQUEST_MIN_BYTES + 1`: requests one connection may
/// hand the core.
const HELD_MAX: usize = (64 << 20) / 4096 + 1;
/// What the client tries to send: far more than the limit and the socket buffers.
const SENT_MAX: usize = 200_000;
/// An NBD request header.
const REQ: usize = 28;

#[test]
fn requests_held_by_a_freeze_are_bounded_and_all_answered_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handler = dir.path().join("fence-peer");
    // A handler that fails: writes stay frozen until `mirrorctl resume-io`.
    std::fs::write(&handler, "#!/bin/sh\nexit 1\n").expect("write the handler");
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the handler");
    let mut c = ClusterSpec::new(2)
        .mirrord_only()
        .size(SIZE)
        .resource_line("fencing = \"resource-only\"")
        .table(&format!(
            "[handlers]\nfence-peer = \"{}\"",
            handler.display()
        ))
        .start();
    for i in 0..2 {
        c.wait_status(i, T, "connected", connected);
    }
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    wait_in_sync(&c, "the initial sync");
    let (mut other, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    other.write_at(0, &pattern::bytes(1, 65536));

    c.kill(1);
    c.wait_status(0, T, "writes frozen", |v| v["suspended"] == true);
    let deadline = Instant::now() + T;
    while !c.log_text(0).contains("\"outcome\":\"handler-failed\"") {
        assert!(Instant::now() < deadline, "the handler never failed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pipelined TRIMs, 4 KiB each, none of whose replies is read.
    let reqs: Vec<u8> = (0..SENT_MAX as u64)
        .flat_map(|i| request_bytes(0, CMD_TRIM, i, (i * 4096) % SIZE, 4096, &[]))
        .collect();
    let (mut greedy, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    greedy.set_write_timeout(Duration::from_millis(200));
    let mut sent = 0usize;
    let mut last_progress = Instant::now();
    let start = Instant::now();
    while sent < reqs.len() && last_progress.elapsed() < Duration::from_secs(3) {
        assert!(start.elapsed() < T, "sending did not settle");
        match greedy.send_some(&reqs[sent..]) {
            Ok(n) if n > 0 => {
                sent += n;
                last_progress = Instant::now();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("sending requests: {e}"),
        }
    }
    eprintln!(
        "the daemon took {} of {SENT_MAX} requests ({sent} bytes) while frozen; limit {HELD_MAX}",
        sent / REQ
    );
    // At most the limit, plus what fits in the daemon's read buffer and the socket's.
    assert!(
        sent < 2 * MIB as usize,
        "{sent} bytes of requests were taken"
    );
    assert!(
        sent / REQ >= HELD_MAX,
        "only {} requests were taken",
        sent / REQ
    );
    assert_eq!(c.status_json(0)["suspended"], true);

    // Another client is served meanwhile (reads are not frozen).
    assert_eq!(other.read_at(0, 65536), pattern::bytes(1, 65536));

    // The freeze ends: every request sent is answered, once, without error.
    c.mirrorctl(0, &["resume-io"]).assert_success();
    // The replies are read on a thread of their own while the rest of the
    // last request is sent: the daemon stops reading a connection whose
    // replies nobody reads (back-pressure), so sending first and reading after
    // could wait on each other (a CI run: the send timed out after 30 s).
    greedy.set_write_timeout(Duration::from_secs(30));
    greedy.set_read_timeout(Duration::from_secs(30));
    let whole = sent.div_ceil(REQ);
    let mut replies = greedy.try_clone();
    let answered = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut answered = BTreeSet::new();
            for _ in 0..whole {
                let r = replies
                    .read_simple_reply()
                    .expect("a reply after the freeze");
                assert_eq!(r.error, 0, "TRIM {} failed", r.cookie);
                assert!(
                    answered.insert(r.cookie),
                    "TRIM {} answered twice",
                    r.cookie
                );
            }
            answered
        });
        greedy
            .send(&reqs[sent..whole * REQ])
            .expect("send the rest of the last request");
        reader.join().expect("the reply reader")
    });
    assert_eq!(answered.len(), whole);
    assert_eq!(answered.last().copied(), Some(whole as u64 - 1));
    // And the connection goes on.
    greedy.write_at(MIB, &pattern::bytes(2, 4096));
    assert_eq!(greedy.read_at(MIB, 4096), pattern::bytes(2, 4096));
    c.assert_running(0);
}
