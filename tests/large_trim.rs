//! TRIM and WRITE_ZEROES of any size (issue 18): two mirrord processes on
//! loopback with 6 GiB sparse disks; a whole-device TRIM through python3-libnbd
//! (in requests of at most 4 GiB - 4 KiB) with the pair connected, and with the
//! peer not running; the largest requests NBD carries (4 GiB - 4 KiB, and an
//! unaligned 4 GiB - 1 TRIM and WRITE_ZEROES). Each is followed by writes that
//! must complete and read back. The times are printed (`--nocapture`), never
//! asserted: the bound is the client script's timeout, well inside the kernel
//! client's 30 s request timeout only as a sanity check.

mod common;

use std::time::Duration;

use common::pair::{connected, in_sync, not_connected, write_range, T};
use common::{run_client, Cluster, ClusterSpec, MIB};
use nbd_mirror::storage::meta::{self, MetaLocation, MetaStore};

const SIZE: u64 = 6 * 1024 * MIB;

/// The whole client run: trims and writes. Generous for a loaded debug build;
/// a hang (the bug) would exceed it.
const CLIENT_BOUND: Duration = Duration::from_secs(240);

fn spec() -> ClusterSpec {
    ClusterSpec::new(2).size(SIZE).mirrord_only()
}

/// Two blank (all-zero, sparse) disks are in sync: give both nodes' metadata
/// one generation, consistent and up to date, nothing out of sync (what DRBD's
/// `new-current-uuid --clear-bitmap` does for blank devices). The initial full
/// sync of 6 GiB would take minutes in a debug build.
fn declare_blank_pair_in_sync(c: &Cluster) {
    for node in &c.nodes {
        let md = node.cfg.meta.clone().expect("external metadata");
        let loc = MetaLocation::External(md);
        let (mut store, loaded) = MetaStore::open(&loc, SIZE, common::EXPORT, &node.cfg.name)
            .unwrap_or_else(|e| panic!("open metadata of {}: {e}", node.cfg.name));
        let mut sb = loaded.superblock.clone();
        sb.gi = meta::GenerationIds {
            current: 0x5EED_0000_0000_1000,
            bitmap: 0,
            history: [0, 0],
        };
        sb.flags = meta::flags::CONSISTENT | meta::flags::WAS_UP_TO_DATE;
        let clear = vec![0u64; loaded.bitmap.len()];
        let pages: Vec<usize> = (0..store.bitmap_page_count()).collect();
        store
            .write_bitmap_pages(&clear, &pages)
            .expect("clear bitmap");
        store.write_superblock(&sb).expect("write superblock");
    }
}

/// Node 0 primary with the peer (node 1) never started.
fn alone() -> Cluster {
    let mut c = spec().build();
    c.start(0);
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    c.wait_status(0, T, "primary, standalone", |v| {
        v["role"] == "primary" && not_connected(v)
    });
    c
}

/// Offsets the client's own writes after the trim leave alone (it writes
/// 64 KiB at multiples of 384 MiB): data planted there must be trimmed.
const PLANTED: [u64; 3] = [
    MIB + 12 * 1024,
    3 * 1024 * MIB + MIB + 20 * 1024,
    SIZE - 4096,
];

fn plant(c: &Cluster) {
    for at in PLANTED {
        write_range(c, 0, at, &[0xa5; 4096]);
    }
}

/// Asserts that the planted blocks read as zeros in node `i`'s backing file.
fn assert_planted_trimmed(c: &Cluster, i: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(c.disk_path(i)).expect("open backing file");
    for at in PLANTED {
        let mut buf = [0xffu8; 4096];
        f.read_exact_at(&mut buf, at).expect("read backing file");
        assert!(
            buf.iter().all(|b| *b == 0),
            "node {i}: block at {at} not trimmed"
        );
    }
}

fn client(c: &Cluster, mode: &str) -> serde_json::Value {
    let out = run_client("large_trim.py", &[mode, &c.nbd_uri(0)], CLIENT_BOUND);
    assert!(
        out.success(),
        "large_trim.py {mode} failed: {}\n{}",
        out.stderr,
        out.stdout
    );
    let line = out.stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {}", out.stdout));
    eprintln!("large_trim.py {mode}: {v}");
    v
}

#[test]
fn whole_device_trim_of_a_6gib_pair_connected() {
    let mut c = spec().build();
    declare_blank_pair_in_sync(&c);
    c.start_all();
    for i in 0..2 {
        c.wait_status(i, T, "in sync", in_sync);
    }
    plant(&c);
    let v = client(&c, "whole");
    assert_planted_trimmed(&c, 0);
    assert_planted_trimmed(&c, 1);
    assert_eq!(v["requests"].as_array().map(Vec::len), Some(2), "{v}");
    // Still connected: no piece took the peer past its ko-count.
    let st = c.wait_status(0, T, "connected", connected);
    assert_eq!(st["out_of_sync_bytes"], 0, "{st:#}");
    assert_eq!(st["split_brain"], false);
}

#[test]
fn whole_device_trim_of_a_6gib_node_whose_peer_is_not_running() {
    let c = alone();
    plant(&c);
    let v = client(&c, "whole");
    assert_planted_trimmed(&c, 0);
    assert_eq!(v["requests"].as_array().map(Vec::len), Some(2), "{v}");
    let st = c.status_json(0);
    assert_eq!(
        st["out_of_sync_bytes"], SIZE,
        "all marked for the peer: {st:#}"
    );
}

#[test]
fn largest_trim_and_write_zeroes_nbd_carries() {
    let c = alone();
    let v = client(&c, "edges");
    assert_eq!(v["requests"].as_array().map(Vec::len), Some(3), "{v}");
}
