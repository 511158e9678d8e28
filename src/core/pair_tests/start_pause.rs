//! The start pause (grace.rs): a dual-primary node that starts waits for its
//! peer before it writes alone, for at most the grace.

use super::*;

/// Node `i`'s `event`s (pause-started or pause-ended) of the start pause, or
/// of link pauses.
fn pauses(p: &Pair, i: usize, event: &str, at_start: bool) -> Vec<serde_json::Value> {
    p.named(i, event)
        .into_iter()
        .filter(|v| (v["reason"] == "start" || v["at_start"] == true) == at_start)
        .collect()
}

/// Both primary and in sync, the activity log warm; then alpha crashes and
/// beta's grace runs out: beta goes on alone and writes block 20.
fn beta_went_on_alone() -> Pair {
    let mut p = Pair::dual_primary_warm();
    p.crash(0);
    p.settle();
    assert_eq!(
        pauses(&p, 1, "pause-started", false).len(),
        1,
        "{:?}",
        p.events[1]
    );
    p.run_ms(9_000);
    let ended = pauses(&p, 1, "pause-ended", false);
    assert_eq!(ended.len(), 1, "{:?}", p.events[1]);
    assert_eq!(ended[0]["reconnected"], false);
    p.queue_write(1, 2, 20, 0xbb);
    p.settle();
    assert_eq!(p.replies_for(1, 2), vec![Ok(None)], "beta writes alone");
    p
}

/// alpha restarts (slower than beta's grace) and its kernel writes at once on
/// the sockets it was handed: the write waits for the peer, so alpha starts no
/// generation of its own; on reconnect alpha is beta's sync target (beta went
/// on alone), no split brain, and the held write is mirrored. Before the start
/// pause this was a split brain under OCFS2 (`make vm-two-host`, 2026-12-07).
#[test]
fn a_restarted_primary_waits_for_its_peer_and_becomes_its_sync_target() {
    let mut p = beta_went_on_alone();
    p.boot(0);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 3, 30, 0xaa);
    // Everything but a new link: the write is held, nothing reached the disk.
    let held = p.step(|_, _| false);
    assert!(held.is_empty());
    assert!(p.replies_for(0, 3).is_empty(), "{:?}", p.nbd_replies[0]);
    assert_eq!(
        p.disks[0][30 * 4096],
        0,
        "the held write is not on alpha's disk"
    );
    assert!(p.status(0).suspended, "alpha's writes are held at start");
    let ours = p.events[0].len();
    assert_eq!(
        pauses(&p, 0, "pause-started", true).len(),
        2,
        "at both boots: {:?}",
        p.events[0]
    );
    assert!(p.named(0, "new-current-gi").is_empty(), "{:?}", p.events[0]);
    // The link is back within alpha's grace.
    p.run_until(10_000, "in sync", |p| p.in_sync_now());
    for i in 0..2 {
        assert!(
            p.named(i, "split-brain").is_empty(),
            "node {i}: {:?}",
            p.events[i]
        );
    }
    let ended = p.named_since(0, ours, "pause-ended");
    assert_eq!(ended.len(), 1, "{:?}", p.events[0]);
    assert_eq!(ended[0]["reconnected"], true);
    assert_eq!(ended[0]["at_start"], true);
    assert_eq!(
        p.replies_for(0, 3),
        vec![Ok(None)],
        "alpha's held write is answered"
    );
    assert_eq!(
        p.disks[0][20 * 4096],
        0xbb,
        "beta's write alone reached alpha"
    );
    assert_eq!(
        p.disks[1][30 * 4096],
        0xaa,
        "alpha's held write reached beta"
    );
    assert!(p.disks[0] == p.disks[1], "both disks are identical");
}

/// Without the peer, the start pause ends after the grace, counted from the
/// first tick: the held write then goes to this disk alone, in a new
/// generation, and is answered.
#[test]
fn the_start_pause_ends_after_the_grace_without_the_peer() {
    let mut p = beta_went_on_alone();
    p.crash(1);
    p.boot(0);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 3, 30, 0xaa);
    let ours = p.events[0].len();
    p.run_ms(7_000);
    assert!(p.replies_for(0, 3).is_empty(), "held within the grace");
    p.run_ms(2_000);
    let ended = p.named_since(0, ours, "pause-ended");
    assert_eq!(ended.len(), 1, "{:?}", p.events[0]);
    assert_eq!(ended[0]["reconnected"], false);
    assert_eq!(ended[0]["at_start"], true);
    assert_eq!(p.replies_for(0, 3), vec![Ok(None)], "{:?}", p.events[0]);
    assert_eq!(p.disks[0][30 * 4096], 0xaa);
    assert!(!p.status(0).suspended);
    let gis = p.named_since(0, ours, "new-current-gi");
    assert_eq!(gis.len(), 1, "{:?}", p.events[0]);
}

/// A single-primary pair (no allow-two-primaries) has no start pause.
#[test]
fn a_single_primary_pair_has_no_start_pause() {
    let mut p = Pair::in_sync("");
    p.crash(1);
    p.crash(0);
    p.boot(0);
    p.settle();
    assert!(!p.status(0).suspended);
    assert!(p.named(0, "pause-started").is_empty(), "{:?}", p.events[0]);
    p.queue_write(0, 3, 30, 0xaa);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.settle();
    assert_eq!(p.replies_for(0, 3), vec![Ok(None)], "written alone at once");
}

/// The operator's way out of the wait (DRBD's "skip" at wfc): `mirrorctl
/// disconnect` ends the start pause at once; the held write goes on alone.
#[test]
fn disconnect_ends_the_start_pause_at_once() {
    let mut p = beta_went_on_alone();
    p.crash(1);
    p.boot(0);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 3, 30, 0xaa);
    p.run_ms(1_000);
    assert!(p.replies_for(0, 3).is_empty(), "held within the grace");
    p.disconnect(0);
    assert_eq!(p.replies_for(0, 3), vec![Ok(None)], "{:?}", p.events[0]);
    assert!(!p.status(0).suspended);
}
