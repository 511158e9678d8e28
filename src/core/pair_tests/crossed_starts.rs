//! An operator's resync or verify started on each node at once: each start is
//! on the link before the other node sees the peer's (simulator seeds 24542,
//! 95257 and 96459 of make sim-long: a verify on one node, a resync on the
//! other; the verify source became sync target too and the core panicked on
//! "sync source and sync target at once").

use super::*;

/// Both nodes get their admin command in the same round: each acts on its own
/// before the peer's start message reaches it.
fn crossed(p: &mut Pair, alpha: AdminCmd, beta: AdminCmd) {
    let before = [p.replies[0].len(), p.replies[1].len()];
    p.queue[0].push_back(Event::Admin { id: 1, cmd: alpha });
    p.queue[1].push_back(Event::Admin { id: 1, cmd: beta });
    // The first round hands each node its command (nothing else is queued).
    assert!(p.round(&|_, _| false, &mut Vec::new()));
    for (i, b) in before.into_iter().enumerate() {
        let r = p.replies[i].get(b).cloned();
        assert!(matches!(r, Some(Ok(_))), "node {i}: {r:?}");
    }
    p.settle();
}

fn resync(full: bool) -> AdminCmd {
    AdminCmd::Resync {
        full,
        checksum: false,
    }
}

fn replication(p: &Pair, i: usize) -> Replication {
    p.status(i).peer.map(|s| s.replication).expect("connected")
}

fn sync_events(p: &Pair, i: usize) -> Vec<serde_json::Value> {
    p.events[i]
        .iter()
        .filter(|v| {
            v["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("resync-") || e.starts_with("verify-"))
        })
        .cloned()
        .collect()
}

/// A verify here, a resync there: the resync wins, the verify is cut and
/// resumed once the pair is in sync again, and it then finds nothing.
#[test]
fn a_verify_crossed_by_the_peers_resync_gives_way_and_resumes_after_it() {
    let mut p = Pair::in_sync(SLOW);
    p.disks[0][7 * 4096] = 0x77; // alpha's disk differs in block 7, unmarked
    crossed(&mut p, AdminCmd::Verify, resync(true));
    assert_eq!(replication(&p, 0), Replication::SyncTarget);
    assert_eq!(replication(&p, 1), Replication::SyncSource);
    assert!(
        p.named(1, "verify-started").is_empty(),
        "beta, the sync source, ignored alpha's verify: {:?}",
        sync_events(&p, 1)
    );
    p.run_until(60_000, "in sync", |p| p.in_sync_now());
    // beta's full resync overwrote alpha's block 7.
    assert_eq!(p.disks[0], p.disks[1]);
    let stopped = p.named(0, "resync-stopped");
    assert_eq!(stopped.len(), 1, "{:?}", sync_events(&p, 0));
    assert_eq!(stopped[0]["verify"], true);
    let target = p.named(0, "resync-started");
    assert_eq!(target.len(), 1, "{:?}", sync_events(&p, 0));
    assert_eq!(target[0]["role"], "target");
    // The cut verify goes on once in sync, and finds both disks equal.
    p.run_until(60_000, "the resumed verify finished", |p| {
        !p.named(0, "verify-finished").is_empty()
    });
    p.settle();
    assert_eq!(p.named(0, "verify-resumed").len(), 1);
    assert_eq!(p.status(0).sync.last_verify_differing_blocks, Some(0));
    assert!(p.in_sync_now());
    assert!(p.link, "no reconnect was needed");
}

/// The mirror image: alpha resyncs, beta verifies.
#[test]
fn a_resync_crossed_by_the_peers_verify_goes_on() {
    let mut p = Pair::in_sync(SLOW);
    crossed(&mut p, resync(true), AdminCmd::Verify);
    assert_eq!(replication(&p, 0), Replication::SyncSource);
    assert_eq!(replication(&p, 1), Replication::SyncTarget);
    p.run_until(60_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[0], p.disks[1]);
    assert_eq!(p.named(1, "resync-stopped").len(), 1);
    assert_eq!(p.status(0).sync.resyncs_finished, 1);
    assert!(p.link, "no reconnect was needed");
}

/// A resync on each node: neither applies the other's data; they reconnect
/// and the sync decision resyncs the union of their bits in one direction.
#[test]
fn crossed_resyncs_reconnect_and_resync_in_one_direction() {
    let mut p = Pair::in_sync(SLOW);
    let link = p.cur;
    crossed(&mut p, resync(true), resync(true));
    assert!(p.cur > link, "the pair reconnected");
    p.run_until(120_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[0], p.disks[1]);
    let decisions: Vec<String> = p
        .named(0, "sync-decision")
        .iter()
        .map(|v| v["decision"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        decisions.last().map(String::as_str),
        Some("Source { full: false }"),
        "alpha (the name that wins) resyncs the union: {decisions:?}"
    );
}

/// A verify on each node: both run (each only reads) and each ends with its
/// own result; the pair stays connected.
#[test]
fn crossed_verifies_both_finish() {
    let mut p = Pair::in_sync(SLOW);
    crossed(&mut p, AdminCmd::Verify, AdminCmd::Verify);
    p.run_until(60_000, "both verifies finished", |p| {
        (0..2).all(|i| {
            p.named(i, "verify-finished")
                .iter()
                .any(|v| v["role"] == "source")
        })
    });
    p.settle();
    assert!(p.in_sync_now(), "{:?}", p.status(0).peer);
    for i in 0..2 {
        assert_eq!(p.status(i).sync.last_verify_differing_blocks, Some(0));
    }
    assert!(p.link);
}
