//! The daemon's life: SIGTERM during a write workload (exit 0, every
//! acknowledged write kept), restart after SIGKILL (stale socket, unclean
//! metadata), sd_notify READY/STOPPING, and status while serving.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd_wire::{Ending, RawConn};
use common::{client_script, pattern, python3, run_client, ClusterSpec, ServerKind, EXPORT, MIB};

fn ack_count(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn sigterm_mid_write_exits_0_and_keeps_acknowledged_writes() {
    let mut c = ClusterSpec::new(1).size(64 * MIB).start();
    let uri = c.nbd_uri(0);
    let acklog = c.dir.join("acks.txt");
    let writer_log = std::fs::File::create(c.dir.join("writer.log")).expect("writer log");
    let mut writer = Command::new(python3())
        .arg(client_script("sigterm_writer.py"))
        .args(["write", &uri])
        .arg(&acklog)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer_log.try_clone().expect("dup")))
        .stderr(Stdio::from(writer_log))
        .spawn()
        .expect("start writer");

    // Let the workload get going (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ack_count(&acklog) < 64 {
        if Instant::now() > deadline {
            let _ = writer.kill();
            panic!(
                "writer acknowledged only {} writes in 60 s",
                ack_count(&acklog)
            );
        }
        if let Ok(Some(s)) = writer.try_wait() {
            panic!(
                "writer exited early ({s}): {}",
                std::fs::read_to_string(c.dir.join("writer.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let status = c.stop(0);
    let status = status.unwrap_or_else(|| {
        panic!(
            "daemon did not exit within the bound after SIGTERM\n{}",
            c.log_text(0)
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        c.log_text(0)
    );

    // The writer notices the server going away and stops.
    let ws = common::process::wait_bounded(writer, Duration::from_secs(30));
    let wlog = std::fs::read_to_string(c.dir.join("writer.log")).unwrap_or_default();
    assert!(
        ws.is_some(),
        "writer did not stop within 30 s after the server exited\n{wlog}"
    );
    assert!(
        wlog.contains("ended by the server"),
        "writer should have been stopped by the server\n{wlog}"
    );
    let acked = ack_count(&acklog);
    assert!(acked >= 64, "acks: {acked}");

    // Restart on the same disk and metadata; every acknowledged write is there.
    c.start(0);
    let out = run_client(
        "sigterm_writer.py",
        &["verify", &uri, &acklog.display().to_string()],
        Duration::from_secs(120),
    );
    out.assert_success();
    assert!(out.stdout.contains("ok:"), "{}", out.describe());
}

#[test]
fn standalone_status_json_while_serving() {
    let c = ClusterSpec::new(1).size(32 * MIB).start();
    if c.spec.server != ServerKind::Mirrord {
        return; // status is mirrord's own interface
    }
    let v = c.status_json(0);
    assert_eq!(v["resource"], "r0", "{v:#}");
    assert_eq!(v["node"], "alpha", "{v:#}");
    assert_eq!(v["size_bytes"].as_u64(), c.expected_export_size(), "{v:#}");
    assert!(v["nbd_clients"].is_u64(), "{v:#}");
    assert_eq!(v["split_brain"], false, "{v:#}");
    let human = c.mirrorctl(0, &["status"]);
    human.assert_success();
    assert!(human.stdout.contains("r0"), "{}", human.describe());
}

#[test]
fn restart_after_sigkill_serves_flushed_data() {
    let mut c = ClusterSpec::new(1).size(32 * MIB).start();
    let data = pattern::bytes(30, 2 * MIB as usize);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.write_at(3 * MIB, &data);
    conn.flush();
    c.kill(0);
    drop(conn);
    // The unix socket file (if any) is left behind; a restart must cope.
    c.start(0);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    pattern::assert_same(
        &conn.read_at(3 * MIB, 2 * MIB as u32),
        &data,
        "flushed data after SIGKILL and restart",
    );
    conn.disconnect();
}

#[test]
fn sd_notify_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let mut c = ClusterSpec::new(1).size(8 * MIB).mirrord_only().build();
    let path = c.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let path_s = path.display().to_string();
    c.start_with_env(0, &[("NOTIFY_SOCKET", path_s.as_str())]);

    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !got
        .iter()
        .any(|m: &String| m.lines().any(|l| l == "READY=1"))
    {
        assert!(
            Instant::now() < deadline,
            "no READY=1 within 30 s; got {got:?}\n{}",
            c.log_text(0)
        );
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no sd_notify message ({e}); got {got:?}\n{}", c.log_text(0))
        });
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY means the export accepts a full handshake now.
    let (conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.disconnect();

    let status = c.stop(0);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after SIGTERM\n{}",
        c.log_text(0)
    );
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        got.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 after SIGTERM; got {got:?}"
    );
}

/// A client that stops sending in the middle of a large WRITE payload does not hold a
/// SIGTERM up for the whole drain bound (20 s): its write was never acknowledged, and the
/// daemon ends it and exits 0. A write acknowledged before on the same connection is kept.
#[test]
fn sigterm_with_a_client_stalled_mid_payload_exits_0_promptly() {
    let mut c = ClusterSpec::new(1).size(64 * MIB).mirrord_only().start();
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let done = pattern::bytes(3, MIB as usize);
    conn.write_at(0, &done);
    let half = pattern::bytes(4, MIB as usize / 2);
    conn.send_request(
        0,
        common::nbd_wire::CMD_WRITE,
        9,
        4 * MIB,
        MIB as u32,
        &half,
    )
    .expect("send half a write");
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let status = c.stop(0);
    let took = started.elapsed();
    let status = status.unwrap_or_else(|| panic!("needed SIGKILL\n{}", c.log_text(0)));
    assert!(status.success(), "exit {status}\n{}", c.log_text(0));
    assert!(
        took < Duration::from_secs(10),
        "the stop waited {took:?} for a client that sends nothing\n{}",
        c.log_text(0)
    );
    // Half its payload reached the disk: the cut-off write must not be answered.
    let ending = conn.wait_for_close(Duration::from_secs(5));
    assert!(
        matches!(ending, Ending::Closed),
        "the half-sent write was answered (or the socket left open): {ending:?}\n{}",
        c.log_text(0)
    );
    drop(conn);
    let disk = std::fs::read(c.disk_path(0)).expect("read the disk");
    pattern::assert_same(&disk[..MIB as usize], &done, "the acknowledged write");
}

/// A client that pauses in the middle of a large write payload as SIGTERM arrives, and then
/// sends the rest, gets its write done and answered before the daemon exits (the stop drains;
/// only a client that stays silent is cut off). This write may be streamed (spliced) or, when
/// the core cannot admit it at once, buffered; the next test forces the buffered path.
#[test]
fn sigterm_while_a_client_pauses_mid_payload_finishes_its_write() {
    pause_mid_write_at_sigterm(0, MIB as usize, MIB / 4);
}

/// As above with FUA, which is never streamed: the reader buffers the payload, so the core
/// knows nothing of the write until all of it is read, and the stop must wait for the reader
/// (it did not: the daemon exited ~20 ms after SIGTERM, 2 of 10 runs of the test above failed
/// beside three CPU hogs, where the core had not admitted the write for streaming).
#[test]
fn sigterm_while_a_client_pauses_mid_buffered_payload_finishes_its_write() {
    pause_mid_write_at_sigterm(common::nbd_wire::CMD_FLAG_FUA, MIB as usize, MIB / 4);
}

/// A small write (below the size read into a buffer of its own) that the reader has taken in
/// part as SIGTERM arrives: the reader finishes it at the stop, as at a restart.
#[test]
fn sigterm_while_a_client_pauses_mid_small_write_finishes_it() {
    pause_mid_write_at_sigterm(0, 16 * 1024, 0);
}

/// Sends a WRITE of `len` bytes at 4 MiB with half its payload, waits until the daemon's
/// reader has taken all but `left` bytes of it, sends SIGTERM, and 300 ms later the rest: the
/// write must be answered with success, be on the disk, and the daemon exit 0.
fn pause_mid_write_at_sigterm(flags: u16, len: usize, left: u64) {
    let mut c = ClusterSpec::new(1).size(64 * MIB).start();
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let data = pattern::bytes(5, len);
    let half = len / 2;
    conn.send_request(
        flags,
        common::nbd_wire::CMD_WRITE,
        11,
        4 * MIB,
        len as u32,
        &data[..half],
    )
    .expect("send half a write");
    // The daemon is in the middle of the request when SIGTERM comes: it has
    // read the header and taken some of the payload (a fixed 200 ms sleep
    // was not enough on a loaded CI machine: the daemon had read nothing and
    // stopped at the request boundary, closing the connection).
    conn.wait_until_unread_at_most(left, Duration::from_secs(10));
    assert!(
        common::process::signal(c.daemon(0).pid(), libc::SIGTERM),
        "SIGTERM"
    );
    std::thread::sleep(Duration::from_millis(300));
    conn.send(&data[half..])
        .unwrap_or_else(|e| panic!("send the rest of the write: {e}\n{}", c.log_text(0)));
    let reply = conn.read_simple_reply().unwrap_or_else(|e| {
        panic!(
            "no reply to a write finished after SIGTERM: {e}\n{}",
            c.log_text(0)
        )
    });
    assert_eq!(reply.cookie, 11, "reply cookie");
    assert_eq!(reply.error, 0, "write error\n{}", c.log_text(0));
    let status = c.stop(0);
    let status = status.unwrap_or_else(|| panic!("needed SIGKILL\n{}", c.log_text(0)));
    assert!(status.success(), "exit {status}\n{}", c.log_text(0));
    drop(conn);
    let disk = std::fs::read(c.disk_path(0)).expect("read the disk");
    let at = 4 * MIB as usize;
    pattern::assert_same(
        &disk[at..at + len],
        &data,
        "the write finished after SIGTERM",
    );
}
