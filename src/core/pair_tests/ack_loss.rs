//! Writes the peer acknowledged but had not flushed when the link was lost
//! (`md_flags::PEER_MAY_LACK`): the node holding them is the sync source for
//! them, even against a crashed primary (sim-long seed 10316).

use super::*;

/// Two primaries; beta's write of block 6 is acknowledged by alpha (in its
/// page cache only), then alpha loses power: the harness's disks have no
/// cache, so the lost write is put back to its old contents by hand. beta's
/// grace runs out, its client's flush is answered from its own disk (the write
/// is durable now), and beta writes nothing more: no new generation. alpha
/// comes back as a crashed primary with the same generation. Before the fix
/// the crashed-primary rule made alpha the sync source and its old block went
/// over beta's acknowledged, flushed write.
#[test]
fn a_survivor_holding_writes_its_crashed_peer_lost_is_the_sync_source() {
    let mut p = Pair::dual_primary_warm();
    p.queue_write(1, 2, 6, 0xbb);
    p.settle();
    assert_eq!(p.replies_for(1, 2), vec![Ok(None)], "alpha acknowledged it");
    let at = 6 * 4096;
    assert_eq!(p.disks[0][at], 0xbb);
    // Power loss of alpha: the unflushed write is gone from its disk.
    p.crash(0);
    p.disks[0][at..at + 4096].fill(0);
    p.queue[1].push_back(Event::Request {
        conn: 9,
        cookie: 3,
        req: IoRequest::Flush,
    });
    p.settle();
    assert!(
        p.replies_for(1, 3).is_empty(),
        "the flush waits in the pause"
    );
    assert!(
        p.marked(1, 6),
        "beta marked the write alpha had not flushed"
    );
    assert!(
        p.md[1].sb.flags & md_flags::PEER_MAY_LACK != 0,
        "and recorded that alpha may lack it, before answering the flush"
    );
    p.run_ms(9_000);
    assert_eq!(p.replies_for(1, 3), vec![Ok(None)], "answered alone");
    let gis = p.md[1].sb.gis;
    assert_eq!(gis.bitmap, 0, "beta wrote nothing alone: no generation");
    p.boot(0);
    p.settle();
    p.run_until(10_000, "in sync", |p| p.in_sync_now());
    let decisions = p.named(1, "sync-decision");
    assert_eq!(
        decisions.last().map(|d| d["decision"].clone()),
        Some(serde_json::json!("Source { full: false }")),
        "{decisions:?}"
    );
    for i in 0..2 {
        assert_eq!(p.disks[i][at], 0xbb, "node {i} holds beta's flushed write");
        assert_eq!(
            p.md[i].sb.flags & md_flags::PEER_MAY_LACK,
            0,
            "node {i}: cleared once in sync"
        );
    }
}
