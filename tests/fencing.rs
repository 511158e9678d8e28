//! Fencing: a primary that loses its up-to-date peer freezes writes, calls the
//! fence-peer handler, and resumes per its exit code (DRBD's 3–7).
//!
//! The handler used here records its environment, then waits until the test
//! writes the exit code it should return into a release file, so the test can
//! look at the node while the handler runs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nbd_wire::{RawConn, CMD_READ, CMD_WRITE, EIO};
use common::{pattern, Cluster, ClusterSpec, EXPORT, MIB};

const T: Duration = Duration::from_secs(60);

struct Handler {
    dir: PathBuf,
}

impl Handler {
    fn new(tag: &str) -> Handler {
        let dir = std::env::temp_dir().join(format!("nbdm-fence-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("handler dir");
        let script = format!(
            "#!/bin/sh\n\
             echo \"$RESOURCE $NODE $PEER\" >> {d}/calls\n\
             touch {d}/started\n\
             i=0\n\
             while [ ! -s {d}/release ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n\
             exit $(cat {d}/release 2>/dev/null || echo 1)\n",
            d = dir.display()
        );
        let path = dir.join("fence-peer");
        std::fs::write(&path, script).expect("write handler");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod handler");
        Handler { dir }
    }

    fn table(&self) -> String {
        format!(
            "[handlers]\nfence-peer = \"{}\"",
            self.dir.join("fence-peer").display()
        )
    }

    fn wait_started(&self) {
        let deadline = Instant::now() + T;
        while !self.dir.join("started").exists() {
            assert!(
                Instant::now() < deadline,
                "the fence-peer handler was not called"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn release(&self, exit: i32) {
        let tmp = self.dir.join("release.tmp");
        std::fs::write(&tmp, format!("{exit}\n")).expect("write release");
        std::fs::rename(&tmp, self.dir.join("release")).expect("rename release");
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default()
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn in_sync(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] == "connected"
        && v["peer"]["replication"] == "established"
        && v["disk"] == "up-to-date"
        && v["peer"]["disk"] == "up-to-date"
}

/// A synced pair with `fencing` on, node 0 primary with an NBD client.
fn fenced_pair(h: &Handler, fencing: &str) -> (Cluster, RawConn) {
    let c = ClusterSpec::new(2)
        .mirrord_only()
        .size(16 * MIB)
        .resource_line(&format!("fencing = \"{fencing}\""))
        .table(&h.table())
        .start();
    // Promote once connected: a primary without its peer is fenced at once.
    for i in 0..2 {
        c.wait_status(i, T, "connected", |v| {
            v["peer"]["connection"] == "connected"
        });
    }
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    for i in 0..2 {
        c.wait_status(i, T, "in sync", in_sync);
    }
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    // Replicated writes before the loss: no fencing involved.
    conn.write_at(0, &pattern::bytes(1, 65536));
    conn.flush();
    (c, conn)
}

/// Sends a WRITE and returns its cookie without waiting for the reply.
fn send_write(conn: &mut RawConn, cookie: u64, offset: u64, data: &[u8]) {
    conn.send_request(0, CMD_WRITE, cookie, offset, data.len() as u32, data)
        .expect("send write");
}

/// Asserts that no reply arrives within `d` (the write is held).
fn assert_no_reply_within(conn: &mut RawConn, d: Duration, what: &str) {
    conn.set_read_timeout(d);
    let r = conn.read_simple_reply();
    // Only a read timeout means "held": a closed connection is a failure too.
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{what}: expected no reply while frozen, got {r:?}"
    );
    conn.set_read_timeout(Duration::from_secs(30));
}

fn reply_error(conn: &mut RawConn, cookie: u64) -> u32 {
    conn.set_read_timeout(Duration::from_secs(30));
    let r = conn.read_simple_reply().expect("reply after the freeze");
    assert_eq!(r.cookie, cookie);
    r.error
}

fn log_has(c: &Cluster, i: usize, needle: &str) -> bool {
    c.log_text(i).contains(needle)
}

fn wait_log(c: &Cluster, i: usize, needle: &str) {
    let deadline = Instant::now() + T;
    while !log_has(c, i, needle) {
        assert!(
            Instant::now() < deadline,
            "node {i} never logged {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn a_lost_peer_freezes_writes_until_the_handler_outdates_it() {
    let h = Handler::new("outdated");
    let (mut c, mut conn) = fenced_pair(&h, "resource-only");
    assert!(h.calls().is_empty(), "fenced while the peer was connected");
    c.kill(1);
    h.wait_started();
    let data = pattern::bytes(2, 8192);
    send_write(&mut conn, 77, 4 * MIB, &data);
    assert_no_reply_within(&mut conn, Duration::from_millis(1500), "exit pending");
    let st = c.status_json(0);
    assert_eq!(st["suspended"], true, "{st:#}");
    // Reads go on while writes are frozen (on a second connection).
    let (mut reader, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    assert_eq!(reader.read_at(0, 65536), pattern::bytes(1, 65536));
    h.release(4);
    assert_eq!(reply_error(&mut conn, 77), 0, "held write after exit 4");
    wait_log(&c, 0, "\"outcome\":\"peer-outdated\"");
    let st = c.status_json(0);
    assert_eq!(st["suspended"], false, "{st:#}");
    // Writes flow again without delay, and the handler saw its environment.
    conn.write_at(5 * MIB, &pattern::bytes(3, 4096));
    let calls = h.calls();
    let expect = format!("{EXPORT} {} {}", c.node_name(0), c.node_name(1));
    assert_eq!(calls.trim(), expect, "handler calls");
    // The outdated peer returns and is resynced.
    c.start(1);
    c.mirrorctl(0, &["wait-sync", "--timeout", "60"])
        .assert_success();
    conn.flush();
    drop(conn);
    drop(reader);
    c.stop(0);
    c.stop(1);
    let (a, b) = (read_file(c.disk_path(0)), read_file(c.disk_path(1)));
    assert!(a == b, "disks differ after the outdated peer resynced");
    assert_eq!(&a[4 * MIB as usize..4 * MIB as usize + 8192], &data[..]);
}

#[test]
fn a_peer_that_is_primary_makes_the_frozen_writes_fail() {
    let h = Handler::new("primary");
    let (mut c, mut conn) = fenced_pair(&h, "resource-and-stonith");
    c.kill(1);
    h.wait_started();
    send_write(&mut conn, 5, 2 * MIB, &pattern::bytes(4, 4096));
    assert_no_reply_within(&mut conn, Duration::from_millis(1000), "exit 6 pending");
    h.release(6);
    assert_eq!(reply_error(&mut conn, 5), EIO, "held write after exit 6");
    wait_log(&c, 0, "\"outcome\":\"peer-is-primary\"");
    let st = c.status_json(0);
    assert_eq!(st["disk"], "outdated", "{st:#}");
    assert_eq!(st["suspended"], false, "{st:#}");
    // Later writes fail too: this disk no longer holds the newest data.
    let (err, _) = conn.request(0, CMD_WRITE, 3 * MIB, 4096, &pattern::bytes(5, 4096));
    assert_eq!(err, EIO);
    let (err, _) = conn.request(0, CMD_READ, 0, 4096, &[]);
    assert_eq!(err, EIO, "an outdated primary must not serve stale reads");
}

#[test]
fn a_broken_handler_keeps_writes_frozen_until_resume_io() {
    let h = Handler::new("broken");
    let (mut c, mut conn) = fenced_pair(&h, "resource-only");
    let not_frozen = c.mirrorctl(0, &["resume-io"]);
    assert_eq!(not_frozen.code(), Some(1), "{}", not_frozen.describe());
    assert!(not_frozen.stderr.contains("not suspended"));
    c.kill(1);
    h.wait_started();
    send_write(&mut conn, 9, MIB, &pattern::bytes(6, 4096));
    h.release(1);
    wait_log(&c, 0, "\"outcome\":\"handler-failed\"");
    assert_no_reply_within(&mut conn, Duration::from_millis(1500), "after exit 1");
    assert_eq!(c.status_json(0)["suspended"], true);
    c.mirrorctl(0, &["resume-io"]).assert_success();
    assert_eq!(reply_error(&mut conn, 9), 0, "held write after resume-io");
    assert_eq!(conn.read_at(MIB, 4096), pattern::bytes(6, 4096));
}

#[test]
fn the_peer_reconnecting_ends_the_freeze() {
    let h = Handler::new("back");
    let (mut c, mut conn) = fenced_pair(&h, "resource-only");
    c.kill(1);
    h.wait_started();
    send_write(&mut conn, 11, 6 * MIB, &pattern::bytes(7, 4096));
    assert_no_reply_within(&mut conn, Duration::from_millis(1000), "peer away");
    // The handler hangs (never released); the peer comes back instead.
    c.start(1);
    assert_eq!(reply_error(&mut conn, 11), 0, "held write after reconnect");
    c.mirrorctl(0, &["wait-sync", "--timeout", "60"])
        .assert_success();
    wait_log(&c, 0, "\"by\":\"peer-reconnected\"");
    h.release(4); // let the handler end; its answer no longer matters
    conn.flush();
    drop(conn);
    c.stop(0);
    c.stop(1);
    assert!(read_file(c.disk_path(0)) == read_file(c.disk_path(1)));
}

/// A restart fails no frozen write (issue 19): `mirrorctl restart` is refused while writes
/// are frozen, the frozen write is answered when the freeze ends, and then the restart keeps
/// the connection.
#[test]
fn a_restart_during_a_freeze_fails_no_frozen_write() {
    let h = Handler::new("restart");
    let (mut c, mut conn) = fenced_pair(&h, "resource-only");
    c.kill(1);
    h.wait_started();
    let data = pattern::bytes(8, 4096);
    send_write(&mut conn, 21, 7 * MIB, &data);
    assert_no_reply_within(&mut conn, Duration::from_millis(1000), "frozen");
    let r = c.mirrorctl(0, &["restart", "--timeout", "30"]);
    assert_eq!(r.code(), Some(1), "{}", r.describe());
    assert!(r.stderr.contains("frozen"), "{}", r.describe());
    assert_no_reply_within(&mut conn, Duration::from_millis(500), "after the refusal");
    h.release(4);
    assert_eq!(reply_error(&mut conn, 21), 0, "frozen write after exit 4");
    c.mirrorctl(0, &["restart", "--timeout", "60"])
        .assert_success();
    assert_eq!(
        conn.read_at(7 * MIB, 4096),
        data,
        "the same connection, after the restart"
    );
    c.wait_status(0, T, "its client back", |v| v["nbd_clients"] == 1);
}
