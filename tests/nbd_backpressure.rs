//! NBD back-pressure: a client that pipelines large READs and reads no reply
//! costs the daemon a bounded amount of memory; other clients are served
//! meanwhile, and the first gets every reply once it reads.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::nbd_wire::{RawConn, CMD_READ};
use common::process::rss;
use common::{ClusterSpec, EXPORT, MIB};

const READS: u64 = 64;
const READ_LEN: u32 = 32 << 20;

/// The 4 KiB block that starts the READ at `offset`.
fn marker(offset: u64) -> Vec<u8> {
    common::pattern::bytes(offset ^ 0x5eed, 4096)
}

#[test]
fn a_client_that_reads_no_replies_costs_bounded_memory_and_others_are_served() {
    let mut c = ClusterSpec::new(1)
        .size(2 * READ_LEN as u64)
        .mirrord_only()
        .start();
    let pid = c.daemon(0).pid();
    let addr = c.nbd_addr(0).clone();
    let (mut other, _) = RawConn::handshake(&addr, EXPORT);
    for k in 0..2u64 {
        other.write_at(k * READ_LEN as u64, &marker(k * READ_LEN as u64));
    }
    let baseline = rss(pid);

    // 64 x 32 MiB = 2 GiB of READs, and no reply read for 10 s.
    let (mut greedy, _) = RawConn::handshake(&addr, EXPORT);
    for i in 0..READS {
        let offset = (i % 2) * READ_LEN as u64;
        greedy
            .send_request(0, CMD_READ, i, offset, READ_LEN, &[])
            .expect("send READ");
    }
    let start = Instant::now();
    let mut peak = 0;
    let mut served = 0u64;
    while start.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss(pid));
        // The other client is served meanwhile.
        let at = 4096 * (1 + served % 1000);
        let data = common::pattern::bytes(served, 4096);
        let t = Instant::now();
        other.write_at(at, &data);
        assert_eq!(other.read_at(at, 4096), data, "the other client's data");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the other client waited {:?}",
            t.elapsed()
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "daemon RSS: {} MiB before, peak {} MiB while 2 GiB of READs waited; other client: {served} write+read pairs",
        baseline / MIB,
        peak / MIB
    );
    c.assert_running(0);
    assert!(
        peak < 512 * MIB,
        "the daemon's RSS reached {} MiB",
        peak / MIB
    );
    assert!(
        served >= 50,
        "the other client got only {served} round trips in 10 s"
    );

    // Now the greedy client reads: every reply arrives, with the right data.
    let mut got = BTreeSet::new();
    for _ in 0..READS {
        let r = greedy.read_simple_reply().expect("a READ reply");
        assert_eq!(r.error, 0, "READ {} failed", r.cookie);
        assert!(
            r.cookie < READS && got.insert(r.cookie),
            "cookie {}",
            r.cookie
        );
        let data = greedy.recv_exact(READ_LEN as usize).expect("READ data");
        let offset = (r.cookie % 2) * READ_LEN as u64;
        assert!(data[..4096] == marker(offset)[..], "READ {} data", r.cookie);
        peak = peak.max(rss(pid));
    }
    assert!(
        peak < 512 * MIB,
        "the daemon's RSS reached {} MiB",
        peak / MIB
    );
    greedy.disconnect();
    other.disconnect();
    let status = c.stop(0).expect("stops within the bound");
    assert!(status.success(), "{status}\n{}", c.log_text(0));
}
