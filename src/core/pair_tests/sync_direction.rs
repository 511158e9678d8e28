//! The generation identifiers a resync leaves behind, and the sync decision
//! both nodes take from them afterwards.

use super::*;

/// The last sync decision of node `i`.
fn last_decision(p: &Pair, i: usize) -> serde_json::Value {
    let d = p.named(i, "sync-decision");
    d.last().map(|v| v["decision"].clone()).unwrap_or_default()
}

/// beta misses a write of alpha's (alpha starts a generation), then is
/// alpha's sync target. alpha finishes the resync, but the superblock write
/// that ends it fails (alpha's disk fails, SyncDone is never sent): alpha's
/// identifiers in memory say the resync ended (beta's current in its
/// history), beta's are those of a target that never heard the end. On the
/// next connect both must take the same direction: alpha's failed disk holds
/// the newer data, so neither serves and they wait for alpha's disk. Before,
/// the target recorded the source's current in its history at the start of
/// the resync: each history then held the other's current, each node found
/// the other older, alpha decided "FailedDisk" (beta behind) and beta
/// "FailedDiskAhead" (simulator seeds 5828, 27662 and 16 more).
#[test]
fn a_resync_whose_end_fails_on_the_source_leaves_one_direction() {
    let mut p = Pair::in_sync("");
    let common = p.node(0).meta().gis.current;
    p.crash(1);
    p.settle();
    p.write(0, 7, 0x77);
    let alpha_gen = p.node(0).meta().gis;
    assert_ne!(
        alpha_gen.current, common,
        "alpha's write started a generation"
    );
    assert_eq!(alpha_gen.bitmap, common);
    // The superblock write with alpha's bitmap identifier cleared (the end of
    // its resync as source) fails.
    p.failing_superblock[0] = Some(|sb| sb.gis.bitmap == 0);
    // And alpha's SyncDone does not reach beta before the link breaks (after
    // the failure alpha writes its superblock again and may send it).
    p.boot(1);
    p.step(|_, _| false);
    p.open_link();
    let held = p.step(|i, e| {
        i == 1
            && matches!(
                e,
                Event::PeerMsg {
                    msg: crate::peer::Message::SyncDone { .. },
                    ..
                }
            )
    });
    assert_eq!(held.len(), 1, "alpha sent SyncDone once: {held:?}");
    assert_eq!(
        p.named(0, "resync-finished").len(),
        1,
        "alpha ended the resync: {:?}",
        p.events[0]
    );
    assert_eq!(p.status(0).disk, DiskState::Failed, "{:?}", p.events[0]);
    assert!(
        p.named(1, "resync-finished").is_empty(),
        "beta never heard the end: {:?}",
        p.events[1]
    );
    let (a, b) = (p.node(0).meta().gis, p.node(1).meta().gis);
    assert!(a.history.contains(&common), "{a:?}");
    assert!(
        !b.history.contains(&a.current),
        "beta's history holds alpha's current: {b:?} (alpha {a:?})"
    );
    // The link breaks, SyncDone lost with it; a new connection: both
    // decide from these identifiers.
    p.cut();
    p.settle();
    let (da, db) = (last_decision(&p, 0), last_decision(&p, 1));
    assert_eq!(da, db, "alpha {da}, beta {db}");
    assert_eq!(da, "FailedDiskAhead");
}

/// A sync target's identifiers at the start of its resync name the source's
/// data it is on its way to (the source's bitmap identifier), so a cut resync
/// resumes as a bitmap resync; its history gets nothing of the source's.
#[test]
fn a_cut_resync_resumes_from_the_targets_bits() {
    let mut p = Pair::in_sync(SLOW);
    let common = p.node(0).meta().gis.current;
    p.crash(1);
    p.settle();
    p.node(0).attach_client(9).expect("alpha serves I/O");
    for block in 0..2048 {
        p.queue_write(0, block + 1, block, 0x5a);
    }
    p.settle();
    p.boot(1);
    p.settle();
    p.run_ms(1000);
    assert_eq!(
        p.status(1).disk,
        DiskState::Inconsistent,
        "beta is a target"
    );
    let (a, b) = (p.node(0).meta().gis, p.node(1).meta().gis);
    assert_eq!(a.bitmap, common, "{a:?}");
    assert_eq!(b.current, common, "{b:?}");
    assert!(!b.history.contains(&a.current), "{b:?}");
    assert_eq!(p.md[1].sb.gis, b, "persisted");
    let oos = p.status(1).out_of_sync_bytes;
    assert!(
        oos > 0 && oos < 2048 * 4096,
        "part of the resync left: {oos}"
    );
    p.crash(1);
    p.settle();
    p.boot(1);
    p.settle();
    assert_eq!(
        last_decision(&p, 0),
        serde_json::json!("Source { full: false }")
    );
    p.run_until(60_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[0], p.disks[1]);
    let a = p.node(0).meta().gis;
    assert_eq!(p.node(1).meta().gis, a, "beta adopted alpha's identifiers");
}
