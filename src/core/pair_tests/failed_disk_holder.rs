//! A failed disk or a lost peer disk and the acknowledged writes only one side
//! holds (sim-long seeds 36115, 58093).

use super::*;

/// When the peer's disk fails, this node starts a new generation: it now holds
/// the only good data, including the peer's acknowledged writes that are only
/// in its cache. Its disk is flushed before that superblock is written, as DRBD
/// writes a new current UUID with a preflush (sim-long seed 36115: the new
/// identifier was durable, the data before it not; a power cut then lost the
/// peer's acknowledged write, and the resync from the newer generation went
/// over the failed peer's copy). The harness's disks have no cache, so the
/// test checks the order: no new identifier on the medium while the flush is
/// in flight.
#[test]
fn a_new_generation_is_durable_only_after_the_data_before_it() {
    let mut p = Pair::in_sync("");
    assert!(p.admin(0, AdminCmd::Primary { force: false }).is_ok());
    p.node(0).attach_client(9).expect("primary serves I/O");
    let old = p.md[0].sb.gis;
    // beta's disk fails the mirrored write: alpha learns its disk is gone.
    p.broken[1] = true;
    p.queue_write(0, 1, 3, 0xaa);
    let flushes = |i: usize, e: &Event| {
        i == 0
            && matches!(
                e,
                Event::DiskDone {
                    result: Ok(None),
                    ..
                }
            )
    };
    let held = p.step(flushes);
    assert_eq!(p.status(1).disk, DiskState::Failed);
    assert_ne!(
        p.node(0).meta().gis.current,
        old.current,
        "alpha started a generation"
    );
    assert_eq!(
        p.md[0].sb.gis, old,
        "its superblock waits for the data flush"
    );
    assert!(!held.is_empty());
    for (i, e) in held {
        p.queue[i].push_back(e);
    }
    p.settle();
    let now = p.node(0).meta().gis;
    assert_eq!(p.md[0].sb.gis, now, "durable after it");
    assert_ne!(p.md[0].sb.gis.current, old.current);
}

/// Protocol A: alpha answers its write once sent, the partition loses it, and
/// alpha's disk fails before the link is found gone. alpha's failed disk holds
/// the only copy of an acknowledged write: it records that beta may lack it,
/// and the failed-disk decision waits for alpha's disk instead of letting
/// beta's older block serve alpha's reads (sim-long seed 58093).
#[test]
fn a_failed_disk_holding_unconfirmed_protocol_a_writes_is_ahead() {
    let mut p = Pair::in_sync("protocol = \"A\"");
    assert!(p.admin(0, AdminCmd::Primary { force: false }).is_ok());
    p.node(0).attach_client(9).expect("primary serves I/O");
    // The partition: nothing alpha sends reaches beta from now on.
    let lost = |i: usize, e: &Event| i == 1 && matches!(e, Event::PeerMsg { .. });
    p.queue_write(0, 1, 5, 0xaa);
    p.step(lost);
    assert_eq!(p.replies_for(0, 1), vec![Ok(None)], "answered once sent");
    // alpha's disk fails (a later write of it).
    p.broken[0] = true;
    p.queue_write(0, 2, 7, 0xbb);
    p.step(lost);
    assert_eq!(p.status(0).disk, DiskState::Failed);
    p.cut();
    p.settle();
    assert!(
        p.md[0].sb.flags & md_flags::PEER_MAY_LACK != 0,
        "alpha holds an acknowledged write beta may lack"
    );
    let decisions = p.named(0, "sync-decision");
    assert_eq!(
        decisions.last().map(|d| d["decision"].clone()),
        Some(serde_json::json!("FailedDiskAhead")),
        "{decisions:?}"
    );
    assert_eq!(p.disks[1][5 * 4096], 0, "beta never got it");
    // alpha's read of the block is not served with beta's old data.
    p.queue[0].push_back(Event::Request {
        conn: 9,
        cookie: 3,
        req: IoRequest::Read {
            offset: 5 * 4096,
            len: 4096,
        },
    });
    p.settle();
    let replies = p.replies_for(0, 3);
    assert_eq!(replies.len(), 1);
    assert!(replies[0].is_err(), "{replies:?}");
}

/// The data flush before an activity-log transaction that evicts an extent
/// fails. The writes in that extent may never reach the disk, and the log is
/// about to forget the extent: the bitmap marks it, durably, before the log's
/// write (sim-long seed 38407: the write reached the peer, this node lost
/// power, and the resync after it skipped the block).
#[test]
fn a_failed_flush_before_an_eviction_marks_the_evicted_extent() {
    let mut p = Pair::in_sync_with_al_slots("", 0, 2);
    assert!(p.in_sync_now());
    assert!(p.admin(0, AdminCmd::Primary { force: false }).is_ok());
    p.node(0).attach_client(9).expect("primary serves I/O");
    // Extents 0 and 1 become active; beta flushes what it got.
    p.queue_write(0, 1, 5, 0xaa);
    p.queue_write(0, 2, 1024, 0xbb);
    p.settle();
    p.queue[0].push_back(Event::Request {
        conn: 9,
        cookie: 3,
        req: IoRequest::Flush,
    });
    p.settle();
    assert_eq!(p.replies_for(0, 3), vec![Ok(None)]);
    assert!(!p.persisted_marked(0, 5), "block 5 is on both disks");
    // A write to extent 2 evicts extent 0: its data flush fails.
    p.queue_write(0, 4, 2048, 0xcc);
    let flush_of_alpha = |i: usize, e: &Event| i == 0 && matches!(e, Event::DiskDone { .. });
    let held = p.step(flush_of_alpha);
    assert_eq!(
        held.len(),
        1,
        "only the activity log's data flush: {held:?}"
    );
    let (i, Event::DiskDone { id, .. }) = &held[0] else {
        panic!("held {held:?}");
    };
    assert_eq!(*i, 0);
    p.queue[0].push_back(Event::DiskDone {
        id: *id,
        result: Err(5),
    });
    p.settle();
    assert_eq!(p.status(0).disk, DiskState::Failed);
    assert!(!p.md[0].al.contains(&0), "the log forgot extent 0");
    assert!(
        p.persisted_marked(0, 5) && p.persisted_marked(0, 1023),
        "the bitmap keeps the whole evicted extent"
    );
}
