//! Helpers for two-node resync and split-brain tests: a synced pair, the
//! resync counters of `status --json` (`"sync"`), disk comparison, random
//! block writes over NBD, the sync rate in the config, and a recorder for
//! `mirrorctl events`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{Cluster, ClusterSpec, EXPORT};
use super::nbd_wire::RawConn;
use super::pattern;
use super::process::own_binary;

/// Bound for every wait on a state change.
pub const T: Duration = Duration::from_secs(60);
pub const BLOCK: u64 = 4096;

pub fn connected(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] == "connected"
}

pub fn in_sync(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] == "connected"
        && v["peer"]["replication"] == "established"
        && v["disk"] == "up-to-date"
        && v["peer"]["disk"] == "up-to-date"
}

pub fn not_connected(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] != "connected"
}

/// Waits until both nodes report connected, established and both disks up to date.
pub fn wait_in_sync(c: &Cluster, what: &str) {
    for i in 0..2 {
        c.wait_status(i, T, what, in_sync);
    }
}

/// Starts both nodes, makes node 0's data win the initial full sync (node 0
/// stays primary), and waits until both are in sync.
pub fn synced_pair(spec: ClusterSpec) -> Cluster {
    let c = spec.mirrord_only().start();
    initial_sync(&c);
    c
}

/// On a started pair: makes node 0's data win the initial full sync (node 0
/// stays primary) and waits until both are in sync.
pub fn initial_sync(c: &Cluster) {
    for i in 0..2 {
        c.wait_status(i, T, "connected", connected);
    }
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    wait_in_sync(c, "in sync after the initial full sync");
}

/// Replaces the `rate = ...` line of the `[sync]` table (the spec must have
/// one) and restarts both nodes cleanly so that they read it. Both come back
/// secondary and in sync.
pub fn restart_with_sync_rate(c: &mut Cluster, rate: &str) {
    for i in 0..2 {
        assert!(c.stop(i).is_some(), "node {i} needed SIGKILL to stop");
    }
    rewrite_sync_rate(c, rate);
    c.start_all();
    wait_in_sync(c, "in sync after the restart with a new sync rate");
}

/// Replaces the `rate = ...` line of the `[sync]` table in the config file;
/// daemons read it when they start.
pub fn rewrite_sync_rate(c: &Cluster, rate: &str) {
    let text = std::fs::read_to_string(&c.config).expect("read config");
    let mut found = false;
    let new: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("rate = ") {
                found = true;
                format!("rate = \"{rate}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "the config has no `rate = ` line:\n{text}");
    std::fs::write(&c.config, new.join("\n") + "\n").expect("write config");
}

/// The resync counters of a status: (bytes sent, bytes received).
pub fn moved(st: &serde_json::Value) -> (u64, u64) {
    let s = &st["sync"];
    let get = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("status has no sync.{k}: {st:#}"))
    };
    (get("bytes_sent"), get("bytes_received"))
}

pub fn read_disk(c: &Cluster, i: usize) -> Vec<u8> {
    let p = c.disk_path(i);
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn assert_disks_identical(c: &Cluster, what: &str) {
    let a = read_disk(c, 0);
    let b = read_disk(c, 1);
    assert_eq!(a.len(), b.len(), "{what}: backing files differ in size");
    if let Some(at) = pattern::first_difference(&a, &b) {
        let differing = a
            .chunks(BLOCK as usize)
            .zip(b.chunks(BLOCK as usize))
            .filter(|(x, y)| x != y)
            .count();
        panic!(
            "{what}: backing files differ first at byte {at} (block {}); {differing} blocks differ",
            at as u64 / BLOCK
        );
    }
}

/// `n` distinct block numbers below `blocks`, from `seed`.
pub fn pick_blocks(seed: u64, n: usize, blocks: u64) -> Vec<u64> {
    assert!(n as u64 <= blocks);
    let raw = pattern::bytes(seed, 8 * n * 4 + 64);
    let mut set = std::collections::BTreeSet::new();
    let mut i = 0;
    while set.len() < n {
        if i + 8 > raw.len() {
            // Fall back to a linear scan for the rest (only for tiny devices).
            let mut b = 0;
            while set.len() < n {
                set.insert(b);
                b += 1;
            }
            break;
        }
        let v = u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        set.insert(v % blocks);
        i += 8;
    }
    set.into_iter().collect()
}

/// Writes one 4 KiB block of fresh data to each of `blocks` through node
/// `i`'s NBD export (auto-promoting it if it is not primary), flushes and
/// disconnects. Returns block -> data written.
pub fn write_blocks(c: &Cluster, i: usize, blocks: &[u64], seed: u64) -> BTreeMap<u64, Vec<u8>> {
    let clients = nbd_clients(c, i);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(i), EXPORT);
    let mut out = BTreeMap::new();
    for (k, b) in blocks.iter().enumerate() {
        let data = pattern::bytes(seed.wrapping_mul(1_000_003).wrapping_add(k as u64), 4096);
        conn.write_at(b * BLOCK, &data);
        out.insert(*b, data);
    }
    conn.flush();
    conn.disconnect();
    wait_detached(c, i, clients);
    out
}

fn nbd_clients(c: &Cluster, i: usize) -> u64 {
    c.status_json(i)["nbd_clients"].as_u64().unwrap_or(0)
}

/// The daemon detaches a client once its connection is gone, a moment after
/// the client disconnected: wait for that, so that a `secondary` that
/// follows does not find the client still attached.
fn wait_detached(c: &Cluster, i: usize, clients: u64) {
    c.wait_status(i, T, "the NBD client detached", |v| {
        v["nbd_clients"].as_u64().unwrap_or(0) <= clients
    });
}

/// Writes `data` at `offset` through node `i`'s export in 1 MiB requests,
/// flushes and disconnects.
pub fn write_range(c: &Cluster, i: usize, offset: u64, data: &[u8]) {
    let clients = nbd_clients(c, i);
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(i), EXPORT);
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        conn.write_at(offset + (k as u64) * (1 << 20), chunk);
    }
    conn.flush();
    conn.disconnect();
    wait_detached(c, i, clients);
}

/// Asserts that `disk` holds `want` in each of its blocks.
pub fn assert_blocks(disk: &[u8], want: &BTreeMap<u64, Vec<u8>>, what: &str) {
    for (b, data) in want {
        let at = (*b * BLOCK) as usize;
        pattern::assert_same(
            &disk[at..at + BLOCK as usize],
            data,
            &format!("{what}: block {b}"),
        );
    }
}

/// `mirrorctl events` of one node, recorded to a file until dropped.
pub struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    pub fn start(c: &Cluster, i: usize, tag: &str) -> Events {
        let path = c.dir.join(format!("events-{}-{tag}.jsonl", c.node_name(i)));
        let f = File::create(&path).expect("create events file");
        let child = Command::new(own_binary("mirrorctl"))
            .arg("--config")
            .arg(&c.config)
            .arg("--node")
            .arg(c.node_name(i))
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::null())
            .spawn()
            .expect("start mirrorctl events");
        let e = Events { child, path };
        // The first line (a status snapshot) says the stream is attached.
        e.wait_for(Duration::from_secs(20), "the initial status line", |v| {
            v["event"] == "status"
        });
        e
    }

    /// Every JSON line recorded so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The recorded events named `name`.
    pub fn named(&self, name: &str) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|v| v["event"] == name)
            .collect()
    }

    /// Polls until a recorded line satisfies `pred`; returns it.
    pub fn wait_for(
        &self,
        bound: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(v) = self.lines().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no event {what} within {bound:?}; recorded:\n{}",
                    std::fs::read_to_string(&self.path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
