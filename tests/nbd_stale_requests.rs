//! Requests read after the client shut down its sending side are stale and are not run
//! (docs/CONFLICTS.md, "A request that arrives twice"): the kernel's NBD client shuts a
//! socket down when a request on it times out and sends every request it has no reply
//! for again elsewhere, so a copy still unread in the shut socket must never land after
//! the resent one. The daemon is stopped (SIGSTOP) while a raw client sends writes, so that
//! they are all still unread when the client shuts down its side; the control sends the
//! same writes without the shutdown, and they are applied.

mod common;

use std::time::{Duration, Instant};

use common::nbd_wire::*;
use common::{pattern, process, Cluster, ClusterSpec, EXPORT, MIB};

const SIZE: u64 = 64 * MIB;
/// The old data, and what the writes would put there.
const AREA: usize = 512 * 1024;
/// Small writes, then (on a Unix socket) one large enough for the daemon's direct-payload /
/// splice path (`DIRECT_PAYLOAD_MIN`, 64 KiB). All of it fits in the socket's buffer while
/// mirrord is stopped; over TCP only a few small ones, within the first receive window, so
/// that the FIN arrives behind them before mirrord reads (bytes held back by the window
/// would be read before the FIN, and rightly run).
const SMALL: usize = 4096;
const SMALL_WRITES: usize = 4;
const LARGE_AT: usize = 256 * 1024;
const LARGE: usize = 96 * 1024;
const CLOSE_BOUND: Duration = Duration::from_secs(10);

/// Every thread of `pid` is stopped (state T), within a bound.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
        let all = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "mirrord {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The writes of one round: (cookie, offset, data).
fn writes(seed: u64, large: bool) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out: Vec<(u64, u64, Vec<u8>)> = (0..SMALL_WRITES)
        .map(|i| {
            let data = pattern::bytes(seed + i as u64, SMALL);
            (100 + i as u64, (i * SMALL) as u64, data)
        })
        .collect();
    if large {
        out.push((200, LARGE_AT as u64, pattern::bytes(seed + 99, LARGE)));
    }
    out
}

/// What the area holds once `w` is applied over `base`.
fn applied(base: &[u8], w: &[(u64, u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = base.to_vec();
    for (_, offset, data) in w {
        let at = *offset as usize;
        out[at..at + data.len()].copy_from_slice(data);
    }
    out
}

/// A cluster of one node whose area holds known, flushed data.
fn seeded(tcp: bool) -> (Cluster, Vec<u8>) {
    let spec = ClusterSpec::new(1).size(SIZE).mirrord_only();
    let c = if tcp { spec.tcp() } else { spec }.start();
    let base = pattern::bytes(7, AREA);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.write_at(0, &base);
    conn.flush();
    conn.disconnect();
    (c, base)
}

/// Sends `w` on `conn` while mirrord is stopped, so that none of it is read yet; with
/// `shut`, the client then shuts down its sending side, still before mirrord reads.
fn send_while_stopped(c: &mut Cluster, conn: &mut RawConn, w: &[(u64, u64, Vec<u8>)], shut: bool) {
    let pid = c.daemon(0).pid();
    assert!(process::signal(pid, libc::SIGSTOP), "SIGSTOP mirrord");
    wait_stopped(pid);
    for (cookie, offset, data) in w {
        let len = u32::try_from(data.len()).expect("fits");
        conn.send_request(0, CMD_WRITE, *cookie, *offset, len, data)
            .expect("send a write");
    }
    if shut {
        conn.shutdown_write();
    }
    assert!(process::signal(pid, libc::SIGCONT), "SIGCONT mirrord");
}

/// The area as a fresh client reads it, and as the backing file holds it.
fn area(c: &Cluster) -> (Vec<u8>, Vec<u8>) {
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let seen = conn.read_at(0, AREA as u32);
    conn.flush();
    conn.disconnect();
    let file = std::fs::read(c.disk_path(0)).expect("read the backing file");
    (seen, file[..AREA].to_vec())
}

fn stale_writes_are_not_applied(tcp: bool) {
    let (mut c, base) = seeded(tcp);
    let stale = writes(1000, !tcp);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    send_while_stopped(&mut c, &mut conn, &stale, true);
    // The connection closes; whatever replies come first are errors (the client shut
    // down only its sending side here, so it can read them; the kernel never does).
    match conn.wait_for_close(CLOSE_BOUND) {
        Ending::Closed => {}
        Ending::SentThenClosed(got) => {
            assert_eq!(got.len() % 16, 0, "only simple replies: {got:02x?}");
            for r in got.chunks(16) {
                let error = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
                assert_ne!(error, 0, "a stale write was answered as done: {r:02x?}");
            }
        }
        Ending::StillOpen(got) => panic!("the shut connection stayed open ({got:02x?})"),
    }
    c.assert_running(0);
    let (seen, file) = area(&c);
    pattern::assert_same(&seen, &base, "the area as read after stale writes");
    pattern::assert_same(&file, &base, "the backing file after stale writes");

    // Control: the same kind of writes without the shutdown are applied, and the node
    // serves this other client as ever.
    let fresh = writes(2000, !tcp);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    send_while_stopped(&mut c, &mut conn, &fresh, false);
    let mut answered: Vec<u64> = (0..fresh.len())
        .map(|_| {
            let r = conn.read_simple_reply().expect("a reply");
            assert_eq!(r.error, 0, "write {} failed", r.cookie);
            r.cookie
        })
        .collect();
    answered.sort_unstable();
    let mut cookies: Vec<u64> = fresh.iter().map(|w| w.0).collect();
    cookies.sort_unstable();
    assert_eq!(answered, cookies, "every write answered once");
    conn.flush();
    conn.disconnect();
    let want = applied(&base, &fresh);
    let (seen, file) = area(&c);
    pattern::assert_same(&seen, &want, "the area as read after the control writes");
    pattern::assert_same(&file, &want, "the backing file after the control writes");
    c.assert_running(0);
}

#[test]
fn writes_read_after_the_client_shut_its_side_are_dropped_unix() {
    stale_writes_are_not_applied(false);
}

#[test]
fn writes_read_after_the_client_shut_its_side_are_dropped_tcp() {
    stale_writes_are_not_applied(true);
}
