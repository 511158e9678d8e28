//! A backing store that fails a write part-way (a file on a full tmpfs: ENOSPC after the
//! first bytes). The write gets EIO, the disk is failed as for any I/O error, and the
//! connection stays in step: the rest of the payload is consumed, not read as requests, so
//! the next request on the same connection is answered. Once for a large plain write (the
//! reader splices it from the socket to the disk) and once with FUA (the disk engine writes
//! it from memory). Needs root, for the tmpfs mount.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::nbd_wire::*;
use common::{pattern, Cluster, ClusterSpec, EXPORT, MIB};

const SIZE: u64 = 64 * MIB;
/// The tmpfs holds this much data: the export's first MiB fits, a 2 MiB write after it not.
const ROOM: &str = "2m";

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf) -> Tmpfs {
        std::fs::create_dir_all(&at).expect("create mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={ROOM}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} failed (this test needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// One standalone node whose disk is a sparse 64 MiB file on a 2 MiB tmpfs.
fn node_on_small_tmpfs() -> (Cluster, Tmpfs) {
    let mut c = ClusterSpec::new(1).size(SIZE).mirrord_only().build();
    let fs = Tmpfs::mount(c.dir.join("small"));
    let disk = fs.0.join("disk.img");
    let f = std::fs::File::create(&disk).expect("create disk on tmpfs");
    f.set_len(SIZE).expect("size disk on tmpfs");
    let img = c.disk_path(0).to_path_buf();
    std::fs::remove_file(&img).expect("remove the default disk");
    std::os::unix::fs::symlink(&disk, &img).expect("link the disk");
    c.start_all();
    (c, fs)
}

fn write_past_the_room(flags: u16) {
    let (mut c, _fs) = node_on_small_tmpfs();
    let first = pattern::bytes(1, MIB as usize);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.set_read_timeout(Duration::from_secs(30));
    conn.write_at(0, &first);

    // 2 MiB at 8 MiB: the first part fits in what is left of the tmpfs, the rest not.
    let big = pattern::bytes(2, 2 * MIB as usize);
    conn.send_request(flags, CMD_WRITE, 7, 8 * MIB, big.len() as u32, &big)
        .expect("send the write");
    let r = conn
        .read_simple_reply()
        .expect("a reply to the failing write");
    assert_eq!((r.cookie, r.error), (7, EIO), "the failing write");

    // The same connection goes on: the rest of the payload was not taken for requests.
    conn.send_request(0, CMD_FLUSH, 8, 0, 0, &[])
        .expect("send a flush");
    let r = conn
        .read_simple_reply()
        .expect("a reply to the next request on the same connection");
    assert_eq!(r.cookie, 8, "the flush's reply");
    let (err, _) = conn.request(0, CMD_READ, 0, 4096, &[]);
    assert_eq!(err, EIO, "a failed disk without a peer serves no reads");
    conn.disconnect();

    c.assert_running(0);
    assert!(
        c.log_text(0).contains("disk I/O failed"),
        "the log names the failure:\n{}",
        c.log_text(0)
    );
    let st = c.status_json(0);
    assert_eq!(st["disk"], "failed", "{st}");
    // What was acknowledged before is on the disk.
    let on_disk = std::fs::read(c.disk_path(0)).expect("read the disk");
    pattern::assert_same(
        &on_disk[..MIB as usize],
        &first,
        "the acknowledged first MiB",
    );
}

#[test]
fn a_large_write_the_disk_fails_part_way_gets_eio_and_the_connection_goes_on() {
    write_past_the_room(0);
}

#[test]
fn a_fua_write_the_disk_fails_part_way_gets_eio_and_the_connection_goes_on() {
    write_past_the_room(CMD_FLAG_FUA);
}

/// The disk fails a spliced write, and the client leaves while the rest of its payload is
/// being dropped: the write is never answered, and the disk is still failed (the error is
/// not lost with the connection).
#[test]
fn a_client_leaving_after_the_disk_failed_its_write_still_leaves_the_disk_failed() {
    let (mut c, _fs) = node_on_small_tmpfs();
    let first = pattern::bytes(1, MIB as usize);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.set_read_timeout(Duration::from_secs(30));
    conn.write_at(0, &first);

    // A 4 MiB write at 8 MiB, of which 1.5 MiB is sent: more than the tmpfs has left.
    let part = pattern::bytes(3, 3 * MIB as usize / 2);
    conn.send_request(0, CMD_WRITE, 9, 8 * MIB, 4 * MIB as u32, &part)
        .expect("send part of the write");
    // The reader has taken the request and is streaming its payload before the client
    // leaves: a request read after the client shut its side would be dropped unrun
    // (docs/CONFLICTS.md), and the disk would never see this write.
    conn.wait_until_unread_at_most(part.len() as u64 - 256 * 1024, Duration::from_secs(20));
    conn.shutdown_write();
    let ending = conn.wait_for_close(Duration::from_secs(10));
    assert!(
        matches!(ending, Ending::Closed),
        "the cut-off write was answered (or the socket left open): {ending:?}\n{}",
        c.log_text(0)
    );

    c.assert_running(0);
    let st = c.wait_status(0, Duration::from_secs(10), "disk failed", |v| {
        v["disk"] == "failed"
    });
    assert_eq!(st["disk"], "failed", "{st}");
    assert!(
        c.log_text(0).contains("disk I/O failed"),
        "the log names the failure:\n{}",
        c.log_text(0)
    );
    let on_disk = std::fs::read(c.disk_path(0)).expect("read the disk");
    pattern::assert_same(
        &on_disk[..MIB as usize],
        &first,
        "the acknowledged first MiB",
    );
}
