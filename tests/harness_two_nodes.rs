//! The harness's two-node setup works end to end: both daemons start from
//! one config, find each other over loopback, and after the initial
//! `primary --force` + sync a write through one node's export is on the
//! other's disk (protocol C).
//! Replication behaviour proper is tested elsewhere; this guards the
//! harness the replication tests are built on.

mod common;

use std::time::Duration;

use common::nbd_wire::RawConn;
use common::{pattern, ClusterSpec, EXPORT, MIB};

#[test]
fn two_nodes_start_and_connect() {
    let c = ClusterSpec::new(2).size(16 * MIB).mirrord_only().start();
    for i in 0..2 {
        let v = c.wait_status(i, Duration::from_secs(30), "connected to its peer", |v| {
            v["peer"]["connection"] == "connected"
        });
        assert_eq!(v["node"], c.node_name(i), "{v:#}");
        assert_eq!(v["peer"]["name"], c.node_name(1 - i), "{v:#}");
    }
}

#[test]
fn protocol_c_write_reaches_the_peer_disk() {
    let c = ClusterSpec::new(2).size(16 * MIB).mirrord_only().start();
    // Fresh metadata on both sides: neither disk is up to date until an
    // operator picks one (as with drbdadm primary --force), then it syncs.
    c.wait_status(0, Duration::from_secs(30), "connected", |v| {
        v["peer"]["connection"] == "connected"
    });
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    c.mirrorctl(0, &["wait-sync", "--timeout", "60"])
        .assert_success();
    for i in 0..2 {
        c.wait_status(
            i,
            Duration::from_secs(30),
            "up to date on both sides",
            |v| v["disk"] == "up-to-date" && v["peer"]["disk"] == "up-to-date",
        );
    }
    let data = pattern::bytes(40, MIB as usize);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.write_at(5 * MIB, &data);
    conn.flush();
    conn.disconnect();
    // External metadata: the data area is the whole disk file, offset 0.
    let peer_disk = std::fs::read(c.disk_path(1)).expect("read peer disk");
    let got = &peer_disk[(5 * MIB) as usize..(6 * MIB) as usize];
    pattern::assert_same(got, &data, "peer disk after a flushed protocol C write");
}
