//! The Prometheus endpoint (`[metrics] listen`), checked with Prometheus's own tools:
//! `promtool check metrics` on what a running node serves, `promtool check rules` and
//! `promtool test rules` on the shipped alerting rules, and a real Prometheus server that
//! scrapes a running pair, answers queries for its series and evaluates those rules.
//! `mirrorctl adjust` turns the endpoint on, moves it and stops it on a running node.
//! Both tools come from Debian's `prometheus` package (tools/install-deps.sh); without
//! them the test fails, naming the package.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::config_toml::free_port;
use common::nbd_wire::RawConn;
use common::{pair, require_tool, run, Cluster, ClusterSpec, EXPORT, MIB};

const BLOCK: usize = 4096;

fn require_prometheus_tools() {
    for tool in ["promtool", "prometheus"] {
        require_tool(tool);
    }
}

/// Sets `metrics-listen` on each node of a built (not started) cluster.
fn with_metrics(c: &Cluster) -> Vec<SocketAddr> {
    let mut text = std::fs::read_to_string(&c.config).expect("read config");
    let mut addrs = Vec::new();
    for i in 0..c.nodes.len() {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let name = format!("name = \"{}\"\n", c.node_name(i));
        assert_eq!(text.matches(&name).count(), 1, "one node named so:\n{text}");
        text = text.replace(&name, &format!("{name}metrics-listen = \"{addr}\"\n"));
        addrs.push(addr);
    }
    std::fs::write(&c.config, text).expect("write config");
    addrs
}

/// One HTTP/1.0 GET; (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) =
        http_get(addr, "/metrics").unwrap_or_else(|e| panic!("scrape of {addr}: {e}"));
    assert_eq!(status, "HTTP/1.1 200 OK", "scrape of {addr}:\n{body}");
    body
}

/// Scrapes `addr` every 100 ms (at most `bound`) until `series` is at least `min`.
fn scrape_until(addr: SocketAddr, series: &str, min: f64, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let body = scrape(addr);
        if value(&body, series).is_some_and(|v| v >= min) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{series} not at least {min} within {bound:?}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one series, written as the daemon writes it (`name{a="x",b="y"}`).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| match l.rsplit_once(' ') {
            Some((s, v)) if s == series => v.parse().ok(),
            _ => None,
        })
}

fn expect_all(body: &str, want: &[(String, f64)]) {
    for (series, v) in want {
        expect(body, series, *v);
    }
}

fn expect(body: &str, series: &str, want: f64) {
    assert_eq!(
        value(body, series),
        Some(want),
        "{series} should be {want}; served:\n{body}"
    );
}

/// `promtool check metrics` on `body`: no format error, no lint problem.
fn promtool_check_metrics(dir: &Path, name: &str, body: &str) {
    let file = dir.join(format!("{name}.prom"));
    std::fs::write(&file, body).expect("write metrics file");
    let out = run(
        Command::new("sh")
            .arg("-c")
            .arg("promtool check metrics < \"$1\"")
            .arg("sh")
            .arg(&file),
        Duration::from_secs(30),
    );
    assert!(
        out.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "promtool check metrics found problems in {}\n{}",
        file.display(),
        out.describe()
    );
}

/// `[metrics] listen` is live: a node started without it serves /metrics after
/// `mirrorctl adjust`, with the requests made before (counting is always on); a changed
/// address that cannot be bound is refused and the old endpoint keeps serving; a changed
/// address moves the endpoint (the old port is closed); removing the key stops it.
#[test]
fn adjust_turns_the_endpoint_on_moves_it_and_stops_it() {
    let c = ClusterSpec::new(1).size(16 * MIB).mirrord_only().start();
    let original = std::fs::read_to_string(&c.config).expect("read config");
    let listen_on = |addr: Option<SocketAddr>| {
        let text = match addr {
            Some(a) => format!("{original}\n[metrics]\nlisten = \"{a}\"\n"),
            None => original.clone(),
        };
        std::fs::write(&c.config, text).expect("write config");
    };
    let adjust = |want: &str| {
        let out = c.mirrorctl(0, &["adjust"]);
        out.assert_success();
        assert!(out.stdout.contains(want), "{}", out.describe());
    };
    let closed = |addr: SocketAddr| {
        let r = http_get(addr, "/metrics");
        assert!(r.is_err(), "{addr} still serves: {r:?}");
    };
    let writes_ok = "nbd_mirror_nbd_requests_total{op=\"write\",result=\"ok\"}";

    let (mut nbd, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    for i in 0..3u64 {
        nbd.write_at(i * BLOCK as u64, &[0x5a_u8; BLOCK]);
    }
    let first = SocketAddr::from(([127, 0, 0, 1], free_port()));
    closed(first);
    listen_on(Some(first));
    adjust("metrics.listen: None -> Some(");
    expect(&scrape(first), writes_ok, 3.0);

    // An address taken by someone else: refused, nothing changed.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let second = taken.local_addr().expect("local address");
    listen_on(Some(second));
    let out = c.mirrorctl(0, &["adjust"]);
    assert_eq!(out.code(), Some(1), "want a refusal\n{}", out.describe());
    assert!(
        out.stderr.contains("nothing changed") && out.stderr.contains(&second.to_string()),
        "{}",
        out.describe()
    );
    nbd.write_at(0, &[0xa5_u8; BLOCK]);
    expect(&scrape(first), writes_ok, 4.0);

    // Free again: the endpoint moves there, the first port is closed.
    drop(taken);
    adjust(&format!("-> Some({second})"));
    closed(first);
    expect(&scrape(second), writes_ok, 4.0);

    listen_on(None);
    adjust("-> None");
    closed(second);
    // The node still serves NBD.
    nbd.write_at(BLOCK as u64, &[0x11_u8; BLOCK]);
    assert_eq!(
        nbd.read_at(BLOCK as u64, BLOCK as u32),
        vec![0x11_u8; BLOCK]
    );
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/prometheus")
}

#[test]
fn shipped_alerting_rules_pass_promtool() {
    require_prometheus_tools();
    let dir = rules_dir();
    let check = run(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(dir.join("alerts.yml")),
        Duration::from_secs(30),
    );
    check.assert_success();
    assert!(
        check.stdout.contains("SUCCESS: 4 rules found"),
        "{}",
        check.describe()
    );
    // Each alert fires on its own series at its time, and not on the others.
    let test = run(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["test", "rules", "alerts-test.yml"]),
        Duration::from_secs(30),
    );
    test.assert_success();
    // docs/OPERATIONS.md shows the rules as they are.
    let file = std::fs::read_to_string(dir.join("alerts.yml")).expect("read alerts.yml");
    let rules = &file[file.find("groups:").expect("a groups: key")..];
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md");
    let docs = std::fs::read_to_string(docs).expect("read docs/OPERATIONS.md");
    assert!(
        docs.contains(rules),
        "docs/OPERATIONS.md no longer shows tools/prometheus/alerts.yml as it is"
    );
}

/// A single node: every kind of NBD request the core serves is counted once, with its
/// bytes, spliced large writes included; the output passes `promtool check metrics`.
#[test]
fn a_node_counts_each_nbd_request() {
    require_prometheus_tools();
    let mut c = ClusterSpec::new(1).size(16 * MIB).mirrord_only().build();
    let addr = with_metrics(&c)[0];
    c.start(0);
    let before = scrape(addr);
    expect(
        &before,
        "nbd_mirror_nbd_requests_total{op=\"write\",result=\"ok\"}",
        0.0,
    );

    let (mut nbd, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let small = vec![0x5a_u8; BLOCK];
    for i in 0..5u64 {
        nbd.write_at(i * BLOCK as u64, &small);
    }
    // 1 MiB writes to one range: past the first (which may wait for the activity log) the
    // node moves them from the socket to the disk itself (splice.rs).
    let large = vec![0xa5_u8; MIB as usize];
    for _ in 0..3 {
        nbd.write_at(MIB, &large);
    }
    for i in 0..3u64 {
        assert_eq!(nbd.read_at(i * BLOCK as u64, BLOCK as u32), small);
    }
    nbd.flush();
    let (err, _) = nbd.request(0, 4, 8 * MIB, 64 * 1024, &[]); // TRIM
    assert_eq!(err, 0, "TRIM failed");
    let (err, _) = nbd.request(0, 6, 9 * MIB, 3 * BLOCK as u32, &[]); // WRITE_ZEROES
    assert_eq!(err, 0, "WRITE_ZEROES failed");

    let body = scrape(addr);
    let ok = |op: &str| format!("nbd_mirror_nbd_requests_total{{op=\"{op}\",result=\"ok\"}}");
    let bytes = |op: &str| format!("nbd_mirror_nbd_request_bytes_total{{op=\"{op}\"}}");
    let in_flight = "nbd_mirror_nbd_requests_in_flight".to_string();
    let info = "nbd_mirror_node_info{resource=\"r0\",node=\"alpha\",peer=\"\"}".to_string();
    expect_all(
        &body,
        &[
            (ok("write"), 8.0),
            (bytes("write"), (5 * BLOCK) as f64 + 3.0 * MIB as f64),
            (ok("read"), 3.0),
            (bytes("read"), (3 * BLOCK) as f64),
            (ok("flush"), 1.0),
            (ok("trim"), 1.0),
            (bytes("trim"), 65536.0),
            (ok("write_zeroes"), 1.0),
            (bytes("write_zeroes"), (3 * BLOCK) as f64),
            (
                "nbd_mirror_nbd_requests_total{op=\"write\",result=\"error\"}".to_string(),
                0.0,
            ),
            (
                "nbd_mirror_nbd_request_duration_seconds_count{op=\"write\"}".to_string(),
                8.0,
            ),
            (in_flight, 0.0),
            ("nbd_mirror_nbd_clients".to_string(), 1.0),
            ("nbd_mirror_role{role=\"primary\"}".to_string(), 1.0),
            (info, 1.0),
        ],
    );
    assert!(
        !body.contains("nbd_mirror_peer_connection_state"),
        "a standalone node has no peer series:\n{body}"
    );
    let sb_writes = value(
        &body,
        "nbd_mirror_metadata_writes_total{kind=\"superblock\"}",
    );
    assert!(
        sb_writes.is_some_and(|v| v >= 1.0),
        "promotion persists the superblock:\n{body}"
    );
    nbd.disconnect();
    promtool_check_metrics(&c.dir, "single", &body);

    // BLOCK_STATUS, answered by the NBD reader itself: nbdinfo --map asks for the whole
    // device (16 MiB) from its start, then from where each answer ends.
    require_tool("nbdinfo");
    run(
        Command::new("nbdinfo").arg("--map").arg(c.nbd_uri(0)),
        Duration::from_secs(60),
    )
    .assert_success();
    let body = scrape(addr);
    let asked = value(
        &body,
        "nbd_mirror_nbd_request_bytes_total{op=\"block_status\"}",
    );
    let answered = value(
        &body,
        "nbd_mirror_nbd_requests_total{op=\"block_status\",result=\"ok\"}",
    );
    assert!(
        answered.is_some_and(|n| n >= 1.0) && asked.is_some_and(|b| b >= 16.0 * MIB as f64),
        "block_status: {answered:?} requests over {asked:?} bytes\n{body}"
    );

    // The endpoint answers nothing but GET/HEAD of /metrics (and a pointer at /).
    let (status, _) = http_get(addr, "/nothing").expect("GET /nothing");
    assert!(status.starts_with("HTTP/1.1 404 "), "{status}");
}

/// A running Prometheus with a temp config and storage, listening on loopback.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[SocketAddr]) -> Prometheus {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: nbd-mirror\n    static_configs:\n      - targets: [{}]\n",
                rules_dir().join("alerts.yml").display(),
                list.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus.log"))
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, log }
    }

    /// An instant query's result vector (`data.result`), or why there is none yet.
    fn query(&self, q: &str) -> Result<Vec<serde_json::Value>, String> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", url(q)))
            .map_err(|e| format!("query: {e}"))?;
        if !status.contains(" 200 ") {
            return Err(format!("{status}: {body}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        v["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no data.result in {body}"))
    }

    /// Polls `q` (every 250 ms, at most `bound`) until `pred` holds for its result.
    fn wait(
        &mut self,
        q: &str,
        bound: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + bound;
        let mut last = Err(String::from("not asked yet"));
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("prometheus exited ({st}):\n{}", self.log_text());
            }
            last = self.query(q);
            if let Ok(r) = &last {
                if pred(r) {
                    return r.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "prometheus: `{q}` not as expected within {bound:?}; last answer: {last:?}\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query string value.
fn url(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The sample value of a one-element instant-query result.
fn sample(r: &[serde_json::Value]) -> Option<f64> {
    match r {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// A synced pair, both nodes serving metrics: the state gauges agree with `status --json`,
/// the output passes `promtool check metrics`; a real Prometheus scrapes both, answers
/// a query for a counter with the number of writes made, and, once the peer is killed,
/// evaluates the shipped NbdMirrorDisconnected rule as pending for the survivor.
#[test]
fn prometheus_scrapes_a_running_pair() {
    require_prometheus_tools();
    let t0 = Instant::now();
    // Fencing on, with a handler that says the peer is now outdated (exit 4).
    let handler_dir = tempfile::tempdir().expect("handler dir");
    let handler = handler_dir.path().join("fence-peer");
    std::fs::write(&handler, "#!/bin/sh\nexit 4\n").expect("write handler");
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755))
        .expect("chmod handler");
    let mut c = ClusterSpec::new(2)
        .size(8 * MIB)
        .mirrord_only()
        .resource_line("fencing = \"resource-only\"")
        .table(&format!(
            "[handlers]\nfence-peer = \"{}\"",
            handler.display()
        ))
        .build();
    let addrs = with_metrics(&c);
    c.start_all();
    pair::initial_sync(&c);

    let (mut nbd, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    let data = vec![0x3c_u8; BLOCK];
    for i in 0..5u64 {
        nbd.write_at(i * 2 * BLOCK as u64, &data);
    }
    nbd.flush();

    // Pings go every ping-interval (2 s): wait for one answered.
    let rtt = "nbd_mirror_peer_ping_round_trip_seconds_count";
    let body = scrape_until(addrs[0], rtt, 1.0, Duration::from_secs(15));
    let last_rtt = value(&body, "nbd_mirror_peer_last_ping_round_trip_seconds");
    assert!(
        last_rtt.is_some_and(|v| v > 0.0 && v < 5.0),
        "last round trip {last_rtt:?}"
    );
    expect_all(
        &body,
        &[
            (
                "nbd_mirror_nbd_requests_total{op=\"write\",result=\"ok\"}".to_string(),
                5.0,
            ),
            (
                "nbd_mirror_nbd_request_bytes_total{op=\"write\"}".to_string(),
                (5 * BLOCK) as f64,
            ),
            ("nbd_mirror_role{role=\"primary\"}".to_string(), 1.0),
            (
                "nbd_mirror_peer_connection_state{state=\"connected\"}".to_string(),
                1.0,
            ),
            (
                "nbd_mirror_peer_replication_state{state=\"established\"}".to_string(),
                1.0,
            ),
            ("nbd_mirror_peer_role{role=\"secondary\"}".to_string(), 1.0),
            (
                "nbd_mirror_peer_disk_state{state=\"up-to-date\"}".to_string(),
                1.0,
            ),
            ("nbd_mirror_peer_writes_in_flight".to_string(), 0.0),
            ("nbd_mirror_split_brain".to_string(), 0.0),
            ("nbd_mirror_resync_running".to_string(), 0.0),
            ("nbd_mirror_fence_peer_calls_total".to_string(), 0.0),
        ],
    );

    // The state and resync counters are those `mirrorctl status` shows.
    let mut bodies = vec![body];
    bodies.push(scrape(addrs[1]));
    for (i, body) in bodies.iter().enumerate() {
        let st = c.status_json(i);
        let role = st["role"].as_str().expect("role");
        expect(body, &format!("nbd_mirror_role{{role=\"{role}\"}}"), 1.0);
        let disk = st["disk"].as_str().expect("disk");
        expect(
            body,
            &format!("nbd_mirror_disk_state{{state=\"{disk}\"}}"),
            1.0,
        );
        let num = |v: &serde_json::Value| v.as_u64().expect("number") as f64;
        expect(
            body,
            "nbd_mirror_out_of_sync_bytes",
            num(&st["out_of_sync_bytes"]),
        );
        expect(body, "nbd_mirror_device_size_bytes", num(&st["size_bytes"]));
        for (series, key) in [
            ("nbd_mirror_resync_sent_bytes_total", "bytes_sent"),
            ("nbd_mirror_resync_received_bytes_total", "bytes_received"),
            ("nbd_mirror_resync_equal_blocks_total", "blocks_equal"),
            ("nbd_mirror_resyncs_started_total", "resyncs_started"),
            ("nbd_mirror_resyncs_finished_total", "resyncs_finished"),
        ] {
            expect(body, series, num(&st["sync"][key]));
        }
        expect(body, "nbd_mirror_resyncs_finished_total", 1.0);
        promtool_check_metrics(&c.dir, &format!("node{i}"), body);
    }
    expect(&bodies[1], "nbd_mirror_role{role=\"secondary\"}", 1.0);
    expect(
        &bodies[1],
        "nbd_mirror_nbd_requests_total{op=\"write\",result=\"ok\"}",
        0.0,
    );

    let mut prom = Prometheus::start(&c.dir, &addrs);
    let writes = format!(
        "nbd_mirror_nbd_requests_total{{instance=\"{}\",op=\"write\",result=\"ok\"}}",
        addrs[0]
    );
    let r = prom.wait(&writes, Duration::from_secs(20), |r| sample(r).is_some());
    assert_eq!(sample(&r), Some(5.0), "{r:?}");
    let up = prom.wait(
        "up{job=\"nbd-mirror\"} == 1",
        Duration::from_secs(10),
        |r| r.len() == 2,
    );
    assert_eq!(up.len(), 2, "{up:?}");

    // The peer dies: the survivor fences it (one handler run, exit 4), its link is down
    // and the shipped rule sees it.
    c.kill(1);
    let outdated = "nbd_mirror_fence_peer_results_total{outcome=\"peer_outdated\"}";
    let body = scrape_until(addrs[0], outdated, 1.0, Duration::from_secs(20));
    expect_all(
        &body,
        &[
            (outdated.to_string(), 1.0),
            ("nbd_mirror_fence_peer_calls_total".to_string(), 1.0),
            (
                "nbd_mirror_fence_peer_results_total{outcome=\"failed\"}".to_string(),
                0.0,
            ),
            (
                "nbd_mirror_peer_connection_state{state=\"connected\"}".to_string(),
                0.0,
            ),
        ],
    );
    let alert = format!(
        "ALERTS{{alertname=\"NbdMirrorDisconnected\",instance=\"{}\"}}",
        addrs[0]
    );
    let r = prom.wait(&alert, Duration::from_secs(20), |r| r.len() == 1);
    assert_eq!(r[0]["metric"]["alertstate"], "pending", "{r:?}");
    assert_eq!(r[0]["metric"]["severity"], "warning", "{r:?}");
    nbd.disconnect();
    eprintln!("prometheus_scrapes_a_running_pair took {:?}", t0.elapsed());
}
