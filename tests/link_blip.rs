//! A link blip between two primaries is a pause, not a split brain
//! (src/core/grace.rs). Two mirrord processes in their own network namespaces,
//! the veth pair between them really taken down and up; NBD clients on each
//! node's unix socket.
//!
//! - A cut of a few seconds, shorter than `reconnect-grace`, while both nodes
//!   write to blocks of their own and to shared blocks: no client error, no
//!   split brain, no new generation, the disks identical; every block holds one
//!   whole acknowledged write, and a block only one node wrote holds that
//!   node's last acknowledged write.
//! - A cut longer than the grace with one node writing and the other idle: a
//!   one-way resync, no split brain.
//! - A primary killed and started again later than its peer's grace, its
//!   client writing at once: the write waits for the peer (the start pause),
//!   the restarted node becomes the sync target, no split brain.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nbd_wire::RawConn;
use common::pair::*;
use common::{pattern, Cluster, ClusterSpec, EXPORT, MIB};

const SIZE: u64 = 16 * MIB;
/// Blocks only node i writes: [i * 64, i * 64 + 64); shared: [128, 160).
const OWN: u64 = 64;
const SHARED_FIRST: u64 = 128;
const SHARED: u64 = 32;

fn dual_primary(grace: &str) -> Cluster {
    let c = synced_pair(
        ClusterSpec::new(2)
            .size(SIZE)
            .netns()
            .resource_line("allow-two-primaries = true")
            .table(&format!(
                "[net]\nping-interval = \"500ms\"\nping-timeout = \"500ms\"\nreconnect-grace = \"{grace}\""
            )),
    );
    // synced_pair leaves alpha primary; beta becomes primary when its client attaches.
    c
}

/// What one writer did: per block, its acknowledged writes in order (seeds).
type Acked = BTreeMap<u64, Vec<u64>>;

fn block_data(seed: u64) -> Vec<u8> {
    pattern::bytes(seed, BLOCK as usize)
}

/// Writes blocks of its own and shared ones through node `i` until `stop`,
/// each write's data from a seed unique to (node, count); returns what was
/// acknowledged and the longest time one write took.
fn writer(c: &Cluster, i: usize, stop: Arc<AtomicBool>, own: bool) -> (Acked, Duration) {
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(i), EXPORT);
    conn.set_read_timeout(Duration::from_secs(60));
    let mut acked = Acked::new();
    let mut longest = Duration::ZERO;
    let t0 = Instant::now();
    let mut k = 0u64;
    // Bounded: until told to stop, at most 60 s and 20,000 writes.
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) && k < 20_000 {
        k += 1;
        let block = if own && k % 2 == 0 {
            i as u64 * OWN + (k * 7) % OWN
        } else {
            SHARED_FIRST + (k * 5 + i as u64) % SHARED
        };
        let seed = (i as u64 + 1) << 32 | k;
        let started = Instant::now();
        conn.write_at(block * BLOCK, &block_data(seed));
        longest = longest.max(started.elapsed());
        acked.entry(block).or_default().push(seed);
        std::thread::sleep(Duration::from_millis(5));
    }
    conn.flush();
    conn.disconnect();
    (acked, longest)
}

fn events(c: &Cluster, i: usize, name: &str) -> usize {
    c.log_text(i)
        .lines()
        .filter(|l| {
            l.contains("nbd_mirror::events") && l.contains(&format!("\"event\":\"{name}\""))
        })
        .count()
}

/// Node `i`'s sync-decision event lines, in order.
fn sync_decisions(c: &Cluster, i: usize) -> Vec<String> {
    c.log_text(i)
        .lines()
        .filter(|l| l.contains("\"event\":\"sync-decision\""))
        .map(String::from)
        .collect()
}

#[test]
fn a_short_cut_between_two_writing_primaries_is_a_pause() {
    let c = dual_primary("8s");
    let net = c.net.as_ref().expect("namespaces");
    let gens_before = [
        events(&c, 0, "new-current-gi"),
        events(&c, 1, "new-current-gi"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (results, cut_for) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let stop = stop.clone();
                let c = &c;
                s.spawn(move || writer(c, i, stop, true))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        net.cut();
        let cut = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        net.heal();
        let cut_for = cut.elapsed();
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        let r: Vec<_> = hs.into_iter().map(|h| h.join().expect("writer")).collect();
        (r, cut_for)
    });
    wait_in_sync(&c, "in sync after the cut");
    for (i, before) in gens_before.into_iter().enumerate() {
        assert!(
            events(&c, i, "pause-started") >= 1,
            "node {i} did not pause: the cut was not seen"
        );
        assert_eq!(
            events(&c, i, "split-brain"),
            0,
            "node {i} saw a split brain"
        );
        assert_eq!(
            events(&c, i, "new-current-gi"),
            before,
            "node {i} started a new generation"
        );
        assert_eq!(c.status_json(i)["split_brain"], false);
    }
    assert_disks_identical(&c, "after the pause");
    let disk = read_disk(&c, 0);
    let block = |b: u64| &disk[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
    let mut writes = 0;
    for (i, (acked, _)) in results.iter().enumerate() {
        writes += acked.values().map(Vec::len).sum::<usize>();
        for (b, seeds) in acked {
            if *b < SHARED_FIRST {
                let last = seeds.last().expect("a write");
                assert!(
                    block(*b) == block_data(*last).as_slice(),
                    "block {b}, written by node {i} only, does not hold its last acknowledged write"
                );
            }
        }
    }
    for b in SHARED_FIRST..SHARED_FIRST + SHARED {
        let any = results.iter().any(|(acked, _)| {
            acked
                .get(&b)
                .is_some_and(|seeds| seeds.iter().any(|s| block(b) == block_data(*s).as_slice()))
        });
        let written = results.iter().any(|(acked, _)| acked.contains_key(&b));
        assert!(
            !written || any,
            "shared block {b} holds no whole acknowledged write"
        );
    }
    let longest = results.iter().map(|(_, l)| *l).max().unwrap_or_default();
    eprintln!(
        "a {cut_for:?} cut between two writing primaries: {writes} writes acknowledged, none failed; the longest single write took {longest:?}"
    );
}

#[test]
fn a_cut_longer_than_the_grace_with_one_writer_is_a_one_way_resync() {
    let c = dual_primary("2s");
    let net = c.net.as_ref().expect("namespaces");
    // Beta is primary too (a client attached), but idle.
    let (idle, _) = RawConn::handshake(c.nbd_addr(1), EXPORT);
    c.wait_status(1, T, "beta primary", |v| v["role"] == "primary");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = std::thread::scope(|s| {
        let h = {
            let stop = stop.clone();
            let c = &c;
            s.spawn(move || writer(c, 0, stop, true))
        };
        std::thread::sleep(Duration::from_secs(1));
        net.cut();
        std::thread::sleep(Duration::from_secs(6));
        net.heal();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        h.join().expect("writer").0
    });
    drop(idle);
    wait_in_sync(&c, "in sync after the long cut");
    for i in 0..2 {
        assert_eq!(
            events(&c, i, "split-brain"),
            0,
            "node {i} saw a split brain"
        );
    }
    let decisions = sync_decisions(&c, 0);
    assert!(
        decisions.last().is_some_and(|l| l.contains("Source")),
        "alpha, the only writer, was not the sync source: {decisions:?}"
    );
    assert_disks_identical(&c, "after the one-way resync");
    let disk = read_disk(&c, 1);
    for (b, seeds) in &acked {
        let at = (*b * BLOCK) as usize;
        assert!(
            disk[at..at + BLOCK as usize] == block_data(*seeds.last().expect("a write"))[..],
            "block {b} on beta does not hold alpha's last acknowledged write"
        );
    }
}

/// A primary that comes back slower than its peer's grace (`make vm-two-host`,
/// 2026-12-07: a `systemctl restart` that took 8.1 s): the peer went on alone,
/// and the restarted node's client writes at once, before the link is back.
/// The start pause (src/core/grace.rs) holds that write until the peer is
/// back: the restarted node is then the sync target (the peer went on alone),
/// no split brain, and both writes are on both disks. Without it both wrote
/// apart: a split brain.
#[test]
fn a_restart_slower_than_the_peers_grace_is_a_one_way_resync() {
    let mut c = dual_primary("3s");
    let (mut beta, _) = RawConn::handshake(c.nbd_addr(1), EXPORT);
    beta.set_read_timeout(Duration::from_secs(60));
    c.wait_status(1, T, "beta primary", |v| v["role"] == "primary");
    // alpha crashes and stays away longer than beta's grace; beta writes alone.
    c.kill(0);
    c.net.as_ref().expect("namespaces").cut();
    std::thread::sleep(Duration::from_secs(4));
    beta.write_at(10 * BLOCK, &block_data(10));
    assert_eq!(events(&c, 1, "split-brain"), 0);
    // alpha is back (the link still down) and its client writes at once.
    c.start(0);
    let held = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (mut alpha, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
            alpha.set_read_timeout(Duration::from_secs(60));
            let t = Instant::now();
            alpha.write_at(20 * BLOCK, &block_data(20));
            alpha.flush();
            alpha.disconnect();
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !h.is_finished(),
            "alpha answered a write alone right after its start, without its peer"
        );
        c.net.as_ref().expect("namespaces").heal();
        h.join().expect("alpha's writer")
    });
    beta.flush();
    beta.disconnect();
    wait_in_sync(&c, "in sync after the restart");
    for i in 0..2 {
        assert_eq!(
            events(&c, i, "split-brain"),
            0,
            "node {i} saw a split brain"
        );
        assert_eq!(c.status_json(i)["split_brain"], false);
    }
    let decisions = sync_decisions(&c, 0);
    assert!(
        decisions.last().is_some_and(|l| l.contains("Target")),
        "alpha, restarted, was not the sync target of beta, which went on alone: {decisions:?}"
    );
    assert_disks_identical(&c, "after the restart");
    let disk = read_disk(&c, 0);
    for b in [10u64, 20] {
        let at = (b * BLOCK) as usize;
        assert!(
            disk[at..at + BLOCK as usize] == block_data(b)[..],
            "block {b} does not hold its acknowledged write"
        );
    }
    eprintln!("alpha's first write after its restart waited {held:?} for the peer");
}
