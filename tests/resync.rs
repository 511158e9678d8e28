//! Resync between two mirrord processes on loopback (issue 4): incremental
//! resync moves only what changed, the direction after both went down, a
//! full or incremental resync cut at half by kill -9 or SIGTERM of either
//! node continues (issue 18), checksum resync and online verify, reads of a
//! primary that is sync target, and the events stream.
//!
//! Bytes moved are the daemons' own counters (`status --json`, `"sync"`:
//! resync data sent by the source and received by the target). Slow resyncs
//! are made with a `sync.rate` cap, set by rewriting the config and
//! restarting both nodes after the fast initial sync.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::nbd_wire::RawConn;
use common::pair::*;
use common::{pattern, ClusterSpec, EXPORT, MIB};

fn fast_sync() -> String {
    "[sync]\nrate = \"1GiB\"\nchecksum = false".to_string()
}

fn resync_done_bytes(v: &serde_json::Value) -> u64 {
    v["resync"]["done_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn incremental_resync_moves_only_the_changed_blocks() {
    let size = 64 * MIB;
    let c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    c.mirrorctl(0, &["disconnect"]).assert_success();
    for i in 0..2 {
        c.wait_status(i, T, "disconnected", not_connected);
    }
    let before = [moved(&c.status_json(0)), moved(&c.status_json(1))];

    // 1% of the 4 KiB blocks, scattered, written on the primary alone.
    let blocks = size / BLOCK;
    let n = blocks.div_ceil(100) as usize;
    let picked = pick_blocks(11, n, blocks);
    let written = write_blocks(&c, 0, &picked, 11);
    let changed = n as u64 * BLOCK;
    let st = c.status_json(0);
    assert_eq!(
        st["out_of_sync_bytes"].as_u64(),
        Some(changed),
        "the bitmap must hold exactly the written blocks: {st:#}"
    );

    c.mirrorctl(0, &["connect"]).assert_success();
    wait_in_sync(&c, "in sync after the incremental resync");
    let after = [moved(&c.status_json(0)), moved(&c.status_json(1))];
    let sent = after[0].0 - before[0].0;
    let received = after[1].1 - before[1].1;
    eprintln!("incremental: {n} blocks changed ({changed} bytes), resync sent {sent}, received {received}");
    assert!(
        sent >= changed,
        "the source sent {sent} bytes, fewer than the {changed} changed"
    );
    assert!(
        sent * 100 <= changed * 105,
        "the source sent {sent} bytes for {changed} changed bytes (more than 1.05x)"
    );
    assert_eq!(received, sent, "the target received what the source sent");
    assert_eq!(after[1].0, before[1].0, "the target sent resync data");
    assert_eq!(after[0].1, before[0].1, "the source received resync data");
    assert_disks_identical(&c, "after the incremental resync");
    assert_blocks(&read_disk(&c, 1), &written, "target disk");
    for i in 0..2 {
        let st = c.status_json(i);
        assert_eq!(st["out_of_sync_bytes"], 0, "node {i}: {st:#}");
        assert_eq!(st["disk"], "up-to-date", "node {i}: {st:#}");
    }
}

#[test]
fn the_node_that_was_down_becomes_sync_target_even_when_it_restarts_first() {
    let size = 16 * MIB;
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    let blocks = size / BLOCK;
    // Round 1: beta (secondary) goes down; alpha (primary) writes on, then
    // crashes too; beta restarts first. Round 2: the same with the roles of
    // the nodes swapped, so the outcome does not come from the names.
    for (round, (down, up)) in [(1usize, 0usize), (0, 1)].into_iter().enumerate() {
        if round == 1 {
            c.mirrorctl(up, &["primary"]).assert_success();
        }
        c.kill(down);
        c.wait_status(up, T, "alone", not_connected);
        let picked = pick_blocks(100 + round as u64, 64, blocks);
        let written = write_blocks(&c, up, &picked, 100 + round as u64);
        c.kill(up);

        c.start(down);
        std::thread::sleep(Duration::from_secs(2));
        let st = c.status_json(down);
        assert_eq!(st["role"], "secondary", "{st:#}");
        assert!(not_connected(&st), "{st:#}");

        // Both restarted: their counters start from zero.
        c.start(up);
        wait_in_sync(&c, "in sync after both restarted");
        let got = [moved(&c.status_json(0)), moved(&c.status_json(1))];
        assert!(
            got[down].1 > 0 && got[down].0 == 0,
            "round {round}: node {down} (the one that was down) must be the sync target; counters {got:?}"
        );
        assert!(
            got[up].0 > 0 && got[up].1 == 0,
            "round {round}: node {up} must be the sync source; counters {got:?}"
        );
        let decision = c
            .log_text(down)
            .lines()
            .rev()
            .find(|l| l.contains("sync-decision"))
            .map(String::from)
            .unwrap_or_default();
        assert!(
            decision.contains("Target"),
            "round {round}: node {down}'s last sync decision: {decision}"
        );
        assert_disks_identical(&c, &format!("round {round}"));
        assert_blocks(&read_disk(&c, down), &written, "the restarted node");
    }
}

/// How a resync is cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// SIGKILL: a crash; what the node had not persisted is lost.
    Kill9,
    /// SIGTERM: a clean stop, which persists the resync's progress.
    Term,
}

/// Which resync is cut.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Of the whole 32 MiB device (`invalidate` on beta, or `resync --full`
    /// on alpha), with beta's disk holding other data.
    Full,
    /// Of the 32 MiB alpha wrote alone (of a 64 MiB device) while beta was
    /// disconnected.
    Incremental,
}

/// A resync from alpha to beta at 2 MiB/s is cut at half by `cut` of `victim`
/// (0: the source, 1: the target); the victim is started again. The resync
/// continues from what is still out of sync: what crossed the link in all,
/// counted by the node that stayed up, is at least what was out of sync and
/// at most 1.1x it (a node killed -9 loses up to about a second of progress,
/// the interval at which a resync persists its bitmap: 2 MiB of 32), and
/// beta ends with alpha's data.
fn cut_mid_resync(victim: usize, cut: Cut, kind: Kind) {
    let to_sync = 32 * MIB;
    let size = match kind {
        Kind::Full => to_sync,
        Kind::Incremental => 2 * to_sync,
    };
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    let seed = 3000 + victim as u64 * 10 + kind as u64 * 100 + cut as u64;
    let data = pattern::bytes(seed, to_sync as usize);
    // Where alpha's data goes; beta ends with exactly that.
    let at = size - to_sync;
    match kind {
        Kind::Full => {
            // Data on both, then garbage on beta's disk, invisible to the
            // nodes until beta is invalidated or alpha runs `resync --full`.
            // (A source whose activity log still holds the extents it wrote
            // as primary would resend them after its crash, as documented;
            // here alpha restarts cleanly before the resync, so its log is
            // empty.)
            write_range(&c, 0, at, &data);
            for i in 0..2 {
                assert!(c.stop(i).is_some(), "node {i} needed SIGKILL to stop");
            }
            std::fs::write(c.disk_path(1), pattern::bytes(seed + 1, size as usize))
                .expect("garbage");
        }
        Kind::Incremental => {
            c.mirrorctl(0, &["disconnect"]).assert_success();
            for i in 0..2 {
                c.wait_status(i, T, "disconnected", not_connected);
            }
            write_range(&c, 0, at, &data);
            let st = c.status_json(0);
            assert_eq!(st["out_of_sync_bytes"].as_u64(), Some(to_sync), "{st:#}");
            for i in 0..2 {
                assert!(c.stop(i).is_some(), "node {i} needed SIGKILL to stop");
            }
        }
    }
    rewrite_sync_rate(&c, "2MiB");
    c.start_all();
    if let Kind::Full = kind {
        wait_in_sync(&c, "in sync (the garbage is not known yet)");
        if victim == 1 {
            c.mirrorctl(1, &["invalidate"]).assert_success();
        } else {
            c.mirrorctl(0, &["resync", "--full"]).assert_success();
        }
    }
    let source = 0;
    let survivor = 1 - victim;
    let st = c.wait_status(source, T, "half through the resync", |v| {
        resync_done_bytes(v) >= to_sync / 2
    });
    assert_eq!(
        st["resync"]["total_bytes"].as_u64(),
        Some(to_sync),
        "{st:#}"
    );
    match cut {
        Cut::Kill9 => c.kill(victim),
        Cut::Term => {
            let exit = c.stop(victim);
            assert!(
                exit.is_some_and(|e| e.success()),
                "SIGTERM of node {victim} mid-resync: {exit:?}"
            );
        }
    }
    let st = c.wait_status(survivor, T, "alone", not_connected);
    let remaining = st["out_of_sync_bytes"].as_u64().expect("out_of_sync_bytes");
    assert!(
        remaining > 0 && remaining <= to_sync * 6 / 10,
        "{remaining} of {to_sync} bytes left at the cut: {st:#}"
    );

    c.start(victim);
    let st = c.wait_status(source, T, "resyncing again", |v| {
        v["peer"]["replication"] == "sync-source" || in_sync(v)
    });
    let resumed_total = st["resync"]["total_bytes"].as_u64().unwrap_or(0);
    wait_in_sync(&c, "in sync after the resumed resync");
    let (sent, received) = moved(&c.status_json(survivor));
    let total = if survivor == source { sent } else { received };
    eprintln!(
        "{kind:?} resync of {to_sync} bytes cut at half by {cut:?} of node {victim}: \
         {remaining} left at the cut, the resumed resync had {resumed_total}, \
         {total} bytes moved in all ({:.3}x)",
        total as f64 / to_sync as f64
    );
    assert!(
        total >= to_sync && total * 10 <= to_sync * 11,
        "{total} bytes moved in all for {to_sync} out of sync"
    );
    assert_disks_identical(&c, "after the resumed resync");
    pattern::assert_same(&read_disk(&c, 1)[at as usize..], &data, "beta's disk");
}

#[test]
fn kill_9_of_the_sync_target_mid_resync_resumes() {
    cut_mid_resync(1, Cut::Kill9, Kind::Full);
}

#[test]
fn kill_9_of_the_sync_source_mid_resync_resumes() {
    cut_mid_resync(0, Cut::Kill9, Kind::Full);
}

#[test]
fn sigterm_of_the_sync_target_mid_resync_resumes() {
    cut_mid_resync(1, Cut::Term, Kind::Full);
}

#[test]
fn sigterm_of_the_sync_source_mid_resync_resumes() {
    cut_mid_resync(0, Cut::Term, Kind::Full);
}

#[test]
fn kill_9_of_the_target_mid_incremental_resync_resumes() {
    cut_mid_resync(1, Cut::Kill9, Kind::Incremental);
}

#[test]
fn kill_9_of_the_source_mid_incremental_resync_resumes() {
    cut_mid_resync(0, Cut::Kill9, Kind::Incremental);
}

#[test]
fn sigterm_of_the_target_mid_incremental_resync_resumes() {
    cut_mid_resync(1, Cut::Term, Kind::Incremental);
}

#[test]
fn sigterm_of_the_source_mid_incremental_resync_resumes() {
    cut_mid_resync(0, Cut::Term, Kind::Incremental);
}

#[test]
fn checksum_resync_and_verify_find_exactly_the_planted_blocks() {
    let size = 32 * MIB;
    let blocks = size / BLOCK;
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    let data = pattern::bytes(555, size as usize);
    write_range(&c, 0, 0, &data);
    c.mirrorctl(0, &["secondary"]).assert_success();
    assert_disks_identical(&c, "after writing the data");

    // Plant differences on beta's disk while it is stopped: first, last and
    // 35 scattered blocks, one byte flipped in each.
    assert!(c.stop(1).is_some(), "beta needed SIGKILL");
    let mut planted = pick_blocks(9, 35, blocks);
    planted.extend([0, blocks - 1]);
    planted.sort_unstable();
    planted.dedup();
    let mut disk = read_disk(&c, 1);
    for (k, b) in planted.iter().enumerate() {
        let at = (b * BLOCK + (k as u64 * 97) % BLOCK) as usize;
        disk[at] ^= 0x5a;
    }
    std::fs::write(c.disk_path(1), &disk).expect("plant differences");
    c.start(1);
    wait_in_sync(&c, "in sync (the planted blocks are not known yet)");
    for i in 0..2 {
        assert_eq!(c.status_json(i)["out_of_sync_bytes"], 0);
    }

    let n = planted.len() as u64;
    let o = c.mirrorctl(0, &["verify", "--wait"]);
    o.assert_success();
    assert!(
        o.stdout
            .contains(&format!("verify finished: {n} differing blocks")),
        "verify must report {n} differing blocks:\n{}",
        o.describe()
    );
    let st = c.status_json(0);
    assert_eq!(
        st["sync"]["last_verify_differing_blocks"].as_u64(),
        Some(n),
        "{st:#}"
    );
    assert_eq!(st["out_of_sync_bytes"].as_u64(), Some(n * BLOCK), "{st:#}");
    c.wait_status(1, T, "told the verify result", |v| {
        v["sync"]["last_verify_differing_blocks"].as_u64() == Some(n)
    });
    // Exactly the planted blocks are marked (in the persisted bitmap too).
    let marked = marked_blocks(&c, 0, n);
    assert_eq!(marked, planted, "blocks marked by verify vs planted");

    // A full checksum resync moves only the blocks that differ.
    let before = moved(&c.status_json(0)).0;
    let equal_before = c.status_json(0)["sync"]["blocks_equal"]
        .as_u64()
        .expect("blocks_equal");
    let o = c.mirrorctl(0, &["resync", "--full", "--checksum", "--wait"]);
    o.assert_success();
    wait_in_sync(&c, "in sync after the checksum resync");
    let st = c.status_json(0);
    let sent = moved(&st).0 - before;
    let equal = st["sync"]["blocks_equal"].as_u64().expect("blocks_equal") - equal_before;
    eprintln!("checksum resync: {sent} bytes sent for a {size} byte device, {equal} blocks equal");
    assert_eq!(
        sent,
        n * BLOCK,
        "a full checksum resync must send exactly the {n} differing blocks"
    );
    assert_eq!(equal, blocks - n, "blocks found equal");
    assert_disks_identical(&c, "after the checksum resync");
    pattern::assert_same(&read_disk(&c, 1), &data, "beta's disk");

    let o = c.mirrorctl(0, &["verify", "--wait"]);
    o.assert_success();
    assert!(
        o.stdout.contains("verify finished: 0 differing blocks"),
        "{}",
        o.describe()
    );
}

/// Blocks marked out of sync in node `i`'s persisted bitmap, once it holds `n`.
fn marked_blocks(c: &common::Cluster, i: usize, n: u64) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.mirrorctl(i, &["dump-md", "--all-ranges"]);
        o.assert_success();
        let d: serde_json::Value = serde_json::from_str(&o.stdout).expect("dump-md json");
        let mut out = Vec::new();
        for r in d["out_of_sync_ranges_all"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let off = r["offset"].as_u64().expect("offset") / BLOCK;
            let len = r["length"].as_u64().expect("length") / BLOCK;
            out.extend(off..off + len);
        }
        if out.len() as u64 == n || std::time::Instant::now() >= deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_primary_sync_target_reads_missing_blocks_from_the_peer() {
    let size = 32 * MIB;
    let region = 16 * MIB;
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    restart_with_sync_rate(&mut c, "1MiB");
    c.mirrorctl(0, &["disconnect"]).assert_success();
    c.wait_status(1, T, "disconnected", not_connected);
    let mut want = pattern::bytes(4242, region as usize);
    write_range(&c, 0, 0, &want);
    // alpha was auto-promoted for the writes and is secondary again.
    assert_eq!(c.status_json(0)["role"], "secondary");
    c.mirrorctl(0, &["connect"]).assert_success();
    c.wait_status(1, T, "sync target", |v| {
        v["peer"]["replication"] == "sync-target"
    });

    // beta becomes primary (auto-promote) while it is sync target.
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(1), EXPORT);
    let st = c.status_json(1);
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(st["disk"], "inconsistent", "{st:#}");
    let mut got = Vec::with_capacity(region as usize);
    for k in 0..region / MIB {
        got.extend(conn.read_at(k * MIB, MIB as u32));
    }
    // Had these come from beta's own disk, they would be stale: most of the
    // region has not arrived yet.
    let local = read_disk(&c, 1);
    let stale = local[..region as usize]
        .chunks(BLOCK as usize)
        .zip(want.chunks(BLOCK as usize))
        .filter(|(a, b)| a != b)
        .count();
    let st = c.status_json(1);
    eprintln!(
        "read during resync: {stale} of {} blocks still stale on beta's disk when the reads were done",
        region / BLOCK
    );
    assert!(
        stale as u64 > region / BLOCK / 4,
        "the resync was too fast for the test: only {stale} stale blocks ({st:#})"
    );
    assert_eq!(st["peer"]["replication"], "sync-target", "{st:#}");
    pattern::assert_same(&got, &want, "reads of a primary sync target");

    // Writes on the sync target go on too, and the resync does not overwrite
    // them with older data.
    let mut newer = BTreeMap::new();
    for (k, b) in pick_blocks(5, 32, region / BLOCK).into_iter().enumerate() {
        let d = pattern::bytes(9000 + k as u64, BLOCK as usize);
        conn.write_at(b * BLOCK, &d);
        want[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&d);
        newer.insert(b, d);
    }
    conn.flush();
    for (b, d) in &newer {
        pattern::assert_same(&conn.read_at(b * BLOCK, BLOCK as u32), d, "read back");
    }
    conn.disconnect();
    wait_in_sync(&c, "in sync after the resync");
    assert_disks_identical(&c, "after the resync");
    pattern::assert_same(
        &read_disk(&c, 0)[..region as usize],
        &want,
        "the region on both disks",
    );
}

#[test]
fn events_show_resync_start_progress_and_end() {
    let size = 32 * MIB;
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    restart_with_sync_rate(&mut c, "8MiB");
    let ev = [Events::start(&c, 0, "a"), Events::start(&c, 1, "a")];

    // invalidate: beta discards its data and receives all of it.
    let o = c.mirrorctl(1, &["invalidate"]);
    o.assert_success();
    wait_in_sync(&c, "in sync after invalidate");
    ev[1].wait_for(T, "invalidated", |v| v["event"] == "invalidated");
    for (i, role) in [(0, "source"), (1, "target")] {
        let started = ev[i].named("resync-started");
        assert!(
            started.iter().any(|v| v["role"] == role),
            "node {i}: no resync-started as {role}: {started:?}"
        );
        let fin = ev[i].wait_for(T, "resync-finished", |v| v["event"] == "resync-finished");
        assert_eq!(fin["role"], role, "{fin}");
        let progress = ev[i].named("resync-progress");
        assert!(
            progress.len() >= 2,
            "node {i}: {} resync-progress events for a 4 s resync: {progress:?}",
            progress.len()
        );
        let done: Vec<u64> = progress
            .iter()
            .map(|v| v["done_bytes"].as_u64().expect("done_bytes"))
            .collect();
        assert!(
            done.windows(2).all(|w| w[0] <= w[1]) && done.iter().all(|d| *d <= size),
            "node {i}: progress not monotonic or past the total: {done:?}"
        );
        assert!(
            progress
                .iter()
                .all(|v| v["total_bytes"].as_u64() == Some(size) && v["role"] == role),
            "node {i}: {progress:?}"
        );
    }
    let fin = &ev[0].named("resync-finished")[0];
    assert_eq!(fin["bytes_sent"].as_u64(), Some(size), "{fin}");
    assert_disks_identical(&c, "after invalidate");

    // resync --full from alpha, with progress lines on a non-terminal.
    let before = moved(&c.status_json(0)).0;
    let o = c.mirrorctl(0, &["resync", "--full", "--wait"]);
    o.assert_success();
    assert!(
        o.stdout.contains("progress ") && o.stdout.contains("resync finished"),
        "{}",
        o.describe()
    );
    wait_in_sync(&c, "in sync after resync --full");
    assert_eq!(
        moved(&c.status_json(0)).0 - before,
        size,
        "resync --full moves the whole device"
    );
    let fins = ev[0].named("resync-finished");
    assert_eq!(fins.len(), 2, "{fins:?}");
    assert_disks_identical(&c, "after resync --full");
}

/// The initial full sync of a fresh pair (the target shares no identifier with
/// the source before it) is cut twice, once by `disconnect` at about a third
/// and once by kill -9 of the target at about two thirds; each time it
/// continues from what is still out of sync. The source, up all along, counts
/// what crossed the link: at most 1.1x the device (a killed target loses up to
/// about a second of progress, the interval at which it persists its bitmap).
/// `RESYNC_CUT_MIB` sets the device size (default 32; the rate is a sixteenth
/// of it per second).
#[test]
fn an_interrupted_initial_full_sync_continues_where_it_was() {
    let mib: u64 = std::env::var("RESYNC_CUT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let size = mib * MIB;
    let rate = format!(
        "[sync]\nrate = \"{}MiB\"\nchecksum = false",
        (mib / 16).max(1)
    );
    let mut c = ClusterSpec::new(2)
        .size(size)
        .table(&rate)
        .mirrord_only()
        .start();
    for i in 0..2 {
        c.wait_status(i, T, "connected", connected);
    }
    let data = pattern::bytes(4242, size as usize);
    std::fs::write(c.disk_path(0), &data).expect("alpha's data");
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    let left = |v: &serde_json::Value| v["out_of_sync_bytes"].as_u64().unwrap_or(u64::MAX);
    c.wait_status(0, T, "a third synced", |v| left(v) <= size * 2 / 3);
    c.mirrorctl(0, &["disconnect"]).assert_success();
    c.wait_status(1, T, "link down", not_connected);
    let before = left(&c.status_json(0));
    c.mirrorctl(0, &["connect"]).assert_success();
    let st = c.wait_status(0, T, "resyncing again", |v| {
        v["peer"]["replication"] == "sync-source"
    });
    let total = st["resync"]["total_bytes"].as_u64().unwrap_or(0);
    assert!(
        total <= before + size / 20,
        "after the link cut the resync has {total} bytes to go, {before} were left"
    );
    c.wait_status(0, T, "two thirds synced", |v| left(v) <= size / 3);
    c.kill(1);
    c.wait_status(0, T, "alone", not_connected);
    c.start(1);
    wait_in_sync(&c, "in sync after two cuts");
    let (sent, _) = moved(&c.status_json(0));
    eprintln!(
        "initial full sync of {size} bytes cut twice (disconnect, kill -9 of the target): {sent} bytes sent in all ({:.3}x)",
        sent as f64 / size as f64
    );
    assert!(
        sent * 10 <= size * 11,
        "{sent} bytes sent for a {size} byte device"
    );
    assert_disks_identical(&c, "after the interrupted initial sync");
    pattern::assert_same(&read_disk(&c, 1), &data, "beta's disk");
}

/// An online verify cut by a lost link goes on where it stopped once the pair
/// is back in sync (`verify-resumed`), instead of starting over.
#[test]
fn an_interrupted_verify_resumes_where_it_stopped() {
    let size = 32 * MIB;
    let mut c = synced_pair(ClusterSpec::new(2).size(size).table(&fast_sync()));
    restart_with_sync_rate(&mut c, "2MiB");
    let ev = Events::start(&c, 0, "verify");
    c.mirrorctl(0, &["verify"]).assert_success();
    c.wait_status(0, T, "40% verified", |v| {
        resync_done_bytes(v) >= size * 4 / 10
    });
    c.mirrorctl(1, &["disconnect"]).assert_success();
    c.wait_status(0, T, "link down", not_connected);
    c.mirrorctl(1, &["connect"]).assert_success();
    let resumed = ev.wait_for(T, "verify-resumed", |v| v["event"] == "verify-resumed");
    let from = resumed["from_bytes"].as_u64().unwrap_or(0);
    assert!(
        from >= size * 3 / 10,
        "the verify resumed at {from} of {size} bytes: it started over"
    );
    let done = ev.wait_for(T, "verify-finished", |v| {
        v["event"] == "verify-finished" && v["role"] == "source"
    });
    assert_eq!(done["differing_blocks"], 0, "{done}");
    eprintln!("a verify cut at 40% resumed at {from} of {size} bytes");
}

/// Issue 21: an adaptive resync (`[sync] rate = "auto"`, the default) yields
/// to an application that writes. With 4 KiB writes going on from before the
/// resync starts, the sync source comes down to one request in flight and is
/// held to a rate (status `resync.pace.hold_bytes_per_sec`); once the writes
/// stop, the hold ends and the resync completes at full speed. Both disks end
/// equal and every acknowledged write reads back.
#[test]
fn an_adaptive_resync_is_held_while_an_application_writes_and_released_after() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // Large enough that the resync outlasts the ticks it takes to come down
    // to one request (about 0.5 s at full speed).
    let size = 1024 * MIB;
    let c = synced_pair(
        ClusterSpec::new(2)
            .size(size)
            .table("[sync]\nchecksum = false"),
    );
    let st = c.status_json(0);
    assert!(st["resync"].is_null(), "in sync before the test: {st:#}");

    // The application: 4 KiB writes at QD1 over the first 64 MiB, each block
    // once, in a thread until told to stop (at most all of those blocks).
    let stop = Arc::new(AtomicBool::new(false));
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            let blocks = 64 * MIB / BLOCK;
            for b in 0..blocks {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let data = pattern::bytes(0x21_0000 + b, BLOCK as usize);
                conn.write_at(b * BLOCK, &data);
                acked.insert(b, data);
            }
            conn.disconnect();
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    c.mirrorctl(0, &["resync", "--full"]).assert_success();

    // Within the resync, while the writes go on: held at one request.
    let held = c.wait_status(0, T, "the resync held while the application writes", |v| {
        v["resync"].is_null() || v["resync"]["pace"]["hold_bytes_per_sec"].is_u64()
    });
    let pace = held["resync"]["pace"].clone();
    assert!(
        pace["hold_bytes_per_sec"].is_u64(),
        "the resync ended before it was held: {held:#}"
    );
    assert_eq!(pace["mode"], "adaptive", "{held:#}");
    assert_eq!(
        pace["inflight_limit"], 1,
        "held at one request in flight: {held:#}"
    );
    let hold = pace["hold_bytes_per_sec"].as_u64().unwrap_or(0);
    assert!(hold >= 4 * MIB, "the hold is at least 4 MiB/s: {held:#}");
    let done_at_hold = resync_done_bytes(&held);
    assert!(done_at_hold < size, "{held:#}");

    // The writes stop: the hold ends within ticks, while the resync still
    // runs (held, what is left of it takes many seconds; released, about one).
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().expect("the writer thread");
    assert!(!acked.is_empty(), "the application wrote nothing");
    let released = c.wait_status(0, T, "the hold released once the writes stopped", |v| {
        v["resync"].is_null() || v["resync"]["pace"]["hold_bytes_per_sec"].is_null()
    });
    assert!(
        !released["resync"].is_null(),
        "the resync ended still held: the hold outlived the writes: {released:#}"
    );
    wait_in_sync(&c, "in sync after the held resync");
    eprintln!(
        "held at {hold} bytes/s after {done_at_hold} of {size} bytes; {} writes acknowledged; released: {}",
        acked.len(),
        released["resync"]["pace"]
    );
    assert_disks_identical(&c, "after the resync held by application writes");
    assert_blocks(
        &read_disk(&c, 1),
        &acked,
        "beta's disk after the held resync",
    );
}
