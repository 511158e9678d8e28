//! Two mirrord processes on loopback: mirroring under protocol C, dual-primary
//! conflicts, flush/FUA durability on the peer, losing the secondary, peer
//! authentication and corrupted peer messages.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::nbd_wire::RawConn;
use common::process::own_binary;
use common::{pattern, require_tool, run, run_client, run_ok, Cluster, ClusterSpec, EXPORT, MIB};

const T: Duration = Duration::from_secs(60);

fn both_connected(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] == "connected"
}

fn in_sync(v: &serde_json::Value) -> bool {
    v["peer"]["connection"] == "connected"
        && v["peer"]["replication"] == "established"
        && v["disk"] == "up-to-date"
        && v["peer"]["disk"] == "up-to-date"
}

/// Starts both nodes, makes node 0's data win the initial sync, waits until in sync.
fn synced_pair(spec: ClusterSpec) -> Cluster {
    let c = spec.mirrord_only().start();
    for i in 0..2 {
        c.wait_status(i, T, "connected", both_connected);
    }
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    for i in 0..2 {
        c.wait_status(i, T, "in sync after the initial full sync", in_sync);
    }
    c
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn assert_disks_identical(c: &Cluster, what: &str) {
    let a = read_file(c.disk_path(0));
    let b = read_file(c.disk_path(1));
    assert_eq!(a.len(), b.len());
    if let Some(at) = pattern::first_difference(&a, &b) {
        panic!(
            "{what}: backing files differ first at byte {at} (block {})",
            at / 4096
        );
    }
}

#[test]
fn protocol_c_256mib_nbdcopy_leaves_identical_disks() {
    require_tool("nbdcopy");
    let c = synced_pair(
        ClusterSpec::new(2)
            .size(256 * MIB)
            .table("[sync]\nrate = \"2GiB\""),
    );
    let src = c.dir.join("random.bin");
    std::fs::write(&src, pattern::bytes(7, (256 * MIB) as usize)).expect("write source");
    run_ok(Command::new("nbdcopy").arg(&src).arg(c.nbd_uri(0)), T);
    // nbdcopy flushes before it exits; under protocol C every acknowledged write
    // is on both disks already, so compare at once, without waiting for anything.
    let want = read_file(&src);
    pattern::assert_same(&read_file(c.disk_path(1)), &want, "peer disk after nbdcopy");
    pattern::assert_same(
        &read_file(c.disk_path(0)),
        &want,
        "local disk after nbdcopy",
    );
    assert!(in_sync(&c.status_json(0)), "{:#}", c.status_json(0));
}

#[derive(Debug)]
struct Tag {
    writer: u32,
    seq: u64,
    slot: u32,
}

fn sector_tag(sector: &[u8]) -> Option<Tag> {
    if &sector[0..4] != b"DPW1" {
        return None;
    }
    let writer = u32::from_be_bytes(sector[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(sector[8..16].try_into().ok()?);
    let slot = u32::from_be_bytes(sector[16..20].try_into().ok()?);
    let fill = ((writer as u64 * 131 + seq * 7) % 251 + 1) as u8;
    if sector[24..].iter().any(|b| *b != fill) {
        return None;
    }
    Some(Tag { writer, seq, slot })
}

#[test]
fn dual_primary_overlapping_writes_converge_to_whole_writes() {
    let seconds = std::env::var("DUAL_PRIMARY_SECONDS").unwrap_or_else(|_| "30".into());
    let c = synced_pair(
        ClusterSpec::new(2)
            .size(16 * MIB)
            .resource_line("allow-two-primaries = true"),
    );
    let slots = 48u32;
    let slot_size = 64 * 1024u32;
    let uris = [c.nbd_uri(0), c.nbd_uri(1)];
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let uri = uris[i].clone();
            let seconds = seconds.clone();
            std::thread::spawn(move || {
                let args = [
                    uri.as_str(),
                    if i == 0 { "1" } else { "2" },
                    &slots.to_string(),
                    &slot_size.to_string(),
                    &seconds,
                    "8",
                    &(100 + i).to_string(),
                    "200000",
                ]
                .map(String::from);
                let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                run_client("dual_primary_writer.py", &a, Duration::from_secs(300))
            })
        })
        .collect();
    let outs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .collect();
    let mut acked: HashMap<(u32, u32), HashSet<u64>> = HashMap::new(); // (writer, slot) -> seqs
    for (i, o) in outs.iter().enumerate() {
        o.assert_success();
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("writer json");
        assert_eq!(v["errors"], 0, "writer {i} saw errors: {}", o.describe());
        let list = v["acked"].as_array().expect("acked list");
        assert!(
            list.len() > 100,
            "writer {i} made only {} writes",
            list.len()
        );
        for a in list {
            let slot = a[0].as_u64().expect("slot") as u32;
            let seq = a[1].as_u64().expect("seq");
            acked.entry((i as u32 + 1, slot)).or_default().insert(seq);
        }
    }
    for i in 0..2 {
        c.wait_status(i, T, "in sync after the writers", in_sync);
    }
    assert_disks_identical(&c, "after concurrent dual-primary writes");
    let disk = read_file(c.disk_path(0));
    let mut by_writer = [0u32; 3];
    for slot in 0..slots {
        let base = (slot * slot_size) as usize;
        let range = &disk[base..base + slot_size as usize];
        let first = sector_tag(&range[..512]);
        let Some(first) = first else {
            // Never written by either writer (only possible for a slot nobody chose).
            assert!(
                !acked.contains_key(&(1, slot)) && !acked.contains_key(&(2, slot)),
                "slot {slot} holds no whole tagged sector but was written"
            );
            continue;
        };
        for (i, sector) in range.chunks(512).enumerate() {
            let t = sector_tag(sector).unwrap_or_else(|| {
                panic!("slot {slot} sector {i} is not a whole sector of any write")
            });
            assert!(
                t.writer == first.writer && t.seq == first.seq && t.slot == slot,
                "slot {slot} mixes writes: sector 0 from writer {} seq {}, sector {i} from writer {} seq {}",
                first.writer,
                first.seq,
                t.writer,
                t.seq
            );
        }
        assert!(
            acked
                .get(&(first.writer, slot))
                .is_some_and(|s| s.contains(&first.seq)),
            "slot {slot} holds writer {} seq {}, which was never acknowledged for it",
            first.writer,
            first.seq
        );
        by_writer[first.writer as usize] += 1;
    }
    // Both writers must have won some slots, or the test did not exercise conflicts.
    assert!(
        by_writer[1] > 0 && by_writer[2] > 0,
        "slots won by writer: {by_writer:?}"
    );
    let conflicts = c.log_text(0).matches("write-conflict").count()
        + c.log_text(1).matches("write-conflict").count();
    eprintln!("dual primary: slots won {by_writer:?}, conflicts resolved (logged): {conflicts}");
}

fn trace_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn flush_and_fua_reach_the_peer_disk_before_the_reply() {
    // Protocol A is the hardest case: plain writes do not wait for the peer at all,
    // so only the FLUSH / FUA rules can make the peer's disk durable before the reply.
    let spec = ClusterSpec::new(2)
        .size(16 * MIB)
        .protocol('A')
        .mirrord_only();
    let mut c = spec.build();
    let trace = c.dir.join("beta-disk.trace");
    c.start(0);
    c.start_with_env(
        1,
        &[("MIRRORD_DISK_TRACE", trace.to_str().expect("utf-8 path"))],
    );
    for i in 0..2 {
        c.wait_status(i, T, "connected", both_connected);
    }
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    for i in 0..2 {
        c.wait_status(i, T, "in sync", in_sync);
    }
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    for round in 0..20u64 {
        // A plain write, then FLUSH: when FLUSH is answered, the peer has completed a
        // flush after that write.
        let off = round * 65536;
        conn.write_at(off, &pattern::bytes(round, 65536));
        let before = trace_lines(&trace).len();
        conn.flush();
        let lines = trace_lines(&trace);
        let w = lines
            .iter()
            .rposition(|l| l == &format!("write {off} 65536"));
        let f = lines.iter().rposition(|l| l == "flush");
        match (w, f) {
            (Some(w), Some(f)) if f > w && f >= before.min(f) => {}
            _ => panic!("round {round}: FLUSH answered before the peer flushed the write; peer trace tail: {:?}", &lines[lines.len().saturating_sub(6)..]),
        }
        // A FUA write: answered only after the peer wrote it with FUA.
        let off2 = 8 * MIB + round * 4096;
        conn.write_fua_at(off2, &pattern::bytes(1000 + round, 4096));
        let lines = trace_lines(&trace);
        assert!(
            lines.iter().any(|l| l == &format!("fua-write {off2} 4096")),
            "round {round}: FUA write answered before the peer's durable write; trace tail {:?}",
            &lines[lines.len().saturating_sub(6)..]
        );
    }
    conn.disconnect();
}

fn dump_md(c: &Cluster, i: usize) -> serde_json::Value {
    let o = c.mirrorctl(i, &["dump-md", "--all-ranges"]);
    o.assert_success();
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("dump-md json: {e}: {}", o.stdout))
}

fn covered(dump: &serde_json::Value, off: u64, len: u64) -> bool {
    let ranges = dump["out_of_sync_ranges_all"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (first, last) = (off / 4096, (off + len).div_ceil(4096));
    (first..last).all(|b| {
        ranges.iter().any(|r| {
            let o = r["offset"].as_u64().unwrap_or(0) / 4096;
            let l = r["length"].as_u64().unwrap_or(0) / 4096;
            o <= b && b < o + l
        })
    })
}

#[test]
fn losing_the_secondary_keeps_serving_and_the_bitmap_covers_every_write() {
    let mut c = synced_pair(ClusterSpec::new(2).size(64 * MIB));
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    // Writes in flight while the secondary dies.
    for k in 0..16u64 {
        conn.write_at(k * MIB, &pattern::bytes(k, 256 * 1024));
    }
    c.kill(1);
    let mut written = Vec::new();
    for k in 0..64u64 {
        let off = (k * 997 * 4096) % (60 * MIB);
        conn.write_at(off, &pattern::bytes(500 + k, 8192));
        written.push((off, 8192u64));
    }
    conn.flush();
    let st = c.status_json(0);
    assert_eq!(st["role"], "primary", "{st:#}");
    assert!(
        st["out_of_sync_bytes"].as_u64().unwrap_or(0) >= 64 * 8192 / 2,
        "{st:#}"
    );
    // The running primary persists its bitmap about once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let d = dump_md(&c, 0);
    for (off, len) in &written {
        assert!(
            covered(&d, *off, *len),
            "running primary: write at {off} not in the persisted bitmap"
        );
    }
    // Now the primary itself dies without persisting anything more.
    for k in 0..32u64 {
        let off = 32 * MIB + k * 12 * 4096;
        conn.write_at(off, &pattern::bytes(900 + k, 4096));
        written.push((off, 4096));
    }
    conn.flush();
    c.kill(0);
    drop(conn);
    c.start(0);
    let d = dump_md(&c, 0);
    for (off, len) in &written {
        assert!(
            covered(&d, *off, *len),
            "after kill -9 and restart: write at {off} not covered"
        );
    }
    // And the secondary comes back and is resynced from the primary.
    c.start(1);
    c.mirrorctl(0, &["wait-sync", "--timeout", "60"])
        .assert_success();
    assert_disks_identical(&c, "after the secondary returned");
}

fn spawn_with_config(c: &mut Cluster, i: usize, config: &Path) {
    let name = c.node_name(i).to_string();
    let mut cmd = Command::new(own_binary("mirrord"));
    cmd.arg("--config")
        .arg(config)
        .arg("--node")
        .arg(&name)
        .env("RUST_LOG", "info");
    let log = c.nodes[i].log.clone();
    let mut d = Daemon::spawn(&name, cmd, log);
    let addr = c.nodes[i].cfg.nbd.clone();
    d.wait_ready(&addr);
    c.nodes[i].daemon = Some(d);
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused() {
    let mut c = ClusterSpec::new(2).size(16 * MIB).mirrord_only().build();
    let text = std::fs::read_to_string(&c.config).expect("config");
    let bad_secret = c.dir.join("wrong.secret");
    std::fs::write(&bad_secret, "not-the-secret\n").expect("secret");
    let secret_path = c.dir.join("r0.secret");
    let bad = text.replace(
        secret_path.to_str().expect("utf-8"),
        bad_secret.to_str().expect("utf-8"),
    );
    assert_ne!(bad, text, "config must name the secret file");
    let bad_cfg = c.dir.join("beta-wrong.toml");
    std::fs::write(&bad_cfg, bad).expect("write config");
    c.start(0);
    spawn_with_config(&mut c, 1, &bad_cfg);
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..2 {
        let st = c.status_json(i);
        assert_ne!(
            st["peer"]["connection"], "connected",
            "node {i} connected despite the wrong secret: {st:#}"
        );
        assert!(
            c.log_text(i).contains("failed authentication"),
            "node {i} log:\n{}",
            c.log_text(i)
        );
    }
    assert!(
        c.log_text(0).contains("127.0.0.1"),
        "the refusal names the peer's address"
    );
    // Nothing was written to either disk by the other node.
    assert!(
        read_file(c.disk_path(1)).iter().all(|b| *b == 0),
        "beta's disk was written"
    );
}

#[test]
fn a_corrupted_peer_message_is_detected_and_not_applied() {
    // The proxy is a relay: both nodes opt out of binding the connection. The data
    // checksum is on, so a flipped bit in a write's data is a CRC error.
    let mut c = ClusterSpec::new(2)
        .size(32 * MIB)
        .mirrord_only()
        .table("[net]\ninsecure-allow-relay = true\ndata-integrity = true")
        .build();
    // alpha reaches beta only through the proxy; beta cannot dial alpha at all.
    let text = std::fs::read_to_string(&c.config).expect("config");
    let beta_addr = c.nodes[1].cfg.peer_addr;
    let alpha_addr = c.nodes[0].cfg.peer_addr;
    let proxy_port = common::config_toml::free_port();
    let dead_port = common::config_toml::free_port();
    let alpha_cfg = c.dir.join("alpha-proxy.toml");
    std::fs::write(
        &alpha_cfg,
        text.replace(&beta_addr.to_string(), &format!("127.0.0.1:{proxy_port}")),
    )
    .expect("cfg");
    let beta_cfg = c.dir.join("beta-noreturn.toml");
    std::fs::write(
        &beta_cfg,
        text.replace(&alpha_addr.to_string(), &format!("127.0.0.1:{dead_port}")),
    )
    .expect("cfg");
    // Flip one bit 3 MiB into the alpha -> beta stream: inside the initial resync data.
    let mut proxy = std::process::Command::new(common::python3())
        .arg(
            c.dir
                .parent()
                .map(|_| {
                    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/faultproxy.py")
                })
                .expect("path"),
        )
        .args([
            proxy_port.to_string(),
            beta_addr.port().to_string(),
            "--corrupt-at".into(),
            (3 * MIB).to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start faultproxy");
    std::thread::sleep(Duration::from_millis(500));
    spawn_with_config(&mut c, 0, &alpha_cfg);
    spawn_with_config(&mut c, 1, &beta_cfg);
    c.wait_status(0, T, "connected", both_connected);
    // Random data on alpha, then the initial sync carries it to beta through the proxy.
    let data = pattern::bytes(77, (32 * MIB) as usize);
    std::fs::write(c.disk_path(0), &data).expect("fill alpha's disk");
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    let deadline = Instant::now() + T;
    loop {
        if in_sync(&c.status_json(0)) && in_sync(&c.status_json(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "no sync: {:#}", c.status_json(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = proxy.kill();
    let out = proxy.wait_with_output().expect("proxy output");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("corrupted offset"),
        "the proxy never corrupted anything: {said}"
    );
    let log = c.log_text(1);
    assert!(
        log.contains("bad message from the peer") && log.to_lowercase().contains("crc"),
        "beta did not report the corruption:\n{log}"
    );
    pattern::assert_same(
        &read_file(c.disk_path(1)),
        &data,
        "beta's disk after the corrupted message and the resync",
    );
}

#[test]
fn the_secondary_refuses_nbd_while_the_peer_is_primary() {
    require_tool("nbdinfo");
    let c = synced_pair(ClusterSpec::new(2).size(16 * MIB));
    // Node 0 is primary (explicitly, from --force); node 1 may not become primary.
    let o = run(Command::new("nbdinfo").arg(c.nbd_uri(1)), T);
    assert!(
        !o.success(),
        "nbdinfo on the secondary succeeded: {}",
        o.describe()
    );
    let log = c.log_text(1);
    assert!(
        log.contains("allow-two-primaries is false"),
        "no clear refusal in the log:\n{log}"
    );
    let o = c.mirrorctl(1, &["primary"]);
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert!(o.stderr.contains("primary"), "{}", o.describe());
    // And node 0 keeps serving.
    run_ok(Command::new("nbdinfo").arg(c.nbd_uri(0)), T);
}
