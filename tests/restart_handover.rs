//! A planned restart under a running client (issue 19, loopback part): `mirrorctl restart`
//! three times and once into a copy of the binary at another path (an upgrade), and three
//! SIGTERM + start cycles through a stand-in for systemd's fd store, while a python3-libnbd
//! client with two connections writes and reads with verification. The client must see no
//! error, no lost or doubly answered request, every acknowledged write must read back, and
//! the daemon's client count must come back each time.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::fake_systemd::FakeSystemd;
use common::process::own_binary;
use common::{client_script, python3, Cluster, ClusterSpec};

/// Connections the client opens (tests/clients/restart_writer.py).
const CONNECTIONS: u64 = 2;
/// The client gives up (and fails) if it is not told to stop within this time.
const CLIENT_LIMIT_S: &str = "240";
const CLIENT_WAIT: Duration = Duration::from_secs(300);

fn clients(st: &serde_json::Value) -> u64 {
    st["nbd_clients"].as_u64().unwrap_or(u64::MAX)
}

/// tests/clients/restart_writer.py, running until told to stop.
struct Writer {
    child: Child,
    stop: PathBuf,
    out: PathBuf,
}

impl Writer {
    /// Starts the client and waits until both its connections are attached.
    fn start(c: &Cluster, before: u64) -> Writer {
        let stop = c.dir.join("stop-client");
        let out = c.dir.join("client.out");
        let child = Command::new(python3())
            .arg(client_script("restart_writer.py"))
            .arg(c.nbd_uri(0))
            .arg(&stop)
            .arg(CLIENT_LIMIT_S)
            .stdout(Stdio::from(
                std::fs::File::create(&out).expect("client output"),
            ))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the python client");
        c.wait_status(0, Duration::from_secs(30), "serving the client", |st| {
            clients(st) == before + CONNECTIONS
        });
        Writer { child, stop, out }
    }

    /// Panics unless the client is still running.
    fn assert_running(&mut self, what: &str) {
        assert!(
            self.child.try_wait().expect("client status").is_none(),
            "the client ended during {what}: {}",
            std::fs::read_to_string(&self.out).unwrap_or_default()
        );
    }

    /// Lets the client run a little longer, tells it to stop, waits (bounded), checks its
    /// report and that the daemon is back to `before` clients; returns the report.
    fn finish(mut self, c: &Cluster, before: u64) -> serde_json::Value {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(&self.stop, b"").expect("tell the client to stop");
        let deadline = Instant::now() + CLIENT_WAIT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("client status") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("the client did not finish within {CLIENT_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let report = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(
            status.success(),
            "client failed: {report}\n--- log ---\n{}",
            c.log_text(0)
        );
        let v: serde_json::Value = serde_json::from_str(report.trim()).expect("client JSON");
        assert!(v["writes"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(v["slots_verified"].as_u64().unwrap_or(0) > 0, "{v}");
        c.wait_status(
            0,
            Duration::from_secs(30),
            "back to its client count",
            |st| clients(st) == before,
        );
        v
    }
}

fn restarts_under_a_running_client(spec: ClusterSpec) {
    let mut c = spec.mirrord_only().start();
    let before = clients(&c.status_json(0));
    let pid = c.daemon(0).pid();
    let mut client = Writer::start(&c, before);

    // The upgrade: the same program at another path, as a new package would install it.
    let upgrade = c.dir.join("mirrord-upgraded");
    std::fs::copy(common::process::own_binary("mirrord"), &upgrade).expect("copy mirrord");
    std::fs::set_permissions(&upgrade, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let upgrade_arg = upgrade.to_str().expect("utf-8 path").to_string();

    // The fewest of a few samples: a control connection may come and go meanwhile.
    let open_fds = || {
        (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
            })
            .min()
            .unwrap_or(0)
    };
    let mut fds_after = Vec::new();
    let mut took = Vec::new();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        let args: Vec<&str> = if round == 3 {
            vec!["restart", "--exe", &upgrade_arg, "--timeout", "60"]
        } else {
            vec!["restart", "--timeout", "60"]
        };
        let t = Instant::now();
        let r = c.mirrorctl(0, &args);
        took.push(t.elapsed());
        if !r.success() {
            panic!(
                "restart {round} failed: {}\n--- log ---\n{}",
                r.describe(),
                c.log_text(0)
            );
        }
        c.assert_running(0);
        assert_eq!(c.daemon(0).pid(), pid, "a restart keeps the process");
        c.wait_status(
            0,
            Duration::from_secs(30),
            "serving the client again",
            |st| clients(st) == before + CONNECTIONS,
        );
        fds_after.push(open_fds());
        client.assert_running(&format!("restart {round}"));
    }
    assert!(
        fds_after.windows(2).all(|w| w[0] == w[1]),
        "no descriptor leaks across restarts: {fds_after:?}"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    assert_eq!(exe, upgrade, "the last restart ran the upgraded binary");

    let v = client.finish(&c, before);
    let log = c.log_text(0);
    assert_eq!(
        log.matches("taken over from the previous process").count() as u64,
        4 * CONNECTIONS,
        "every connection taken over at every restart"
    );
    eprintln!("client: {v}; mirrorctl restart took {took:?}; open fds {fds_after:?}");
}

#[test]
fn restart_under_libnbd_on_a_unix_socket() {
    restarts_under_a_running_client(ClusterSpec::new(1));
}

#[test]
fn restart_under_libnbd_over_tcp() {
    restarts_under_a_running_client(ClusterSpec::new(1).tcp());
}

/// Starts mirrord as systemd would, with what the fake fd store holds.
fn start_as_service(c: &mut Cluster, sd: &FakeSystemd, label: &str) {
    let config = c.config.clone();
    let node = c.node_name(0).to_string();
    let args = [
        "--config".as_ref(),
        config.as_os_str(),
        "--node".as_ref(),
        node.as_ref(),
    ];
    let (mut cmd, passed) = sd.start_command(&own_binary("mirrord"), &args);
    cmd.env("MIRRORD_FDSTORE", "1").env("RUST_LOG", "info");
    let mut d = Daemon::spawn(label, cmd, c.nodes[0].log.clone());
    drop(passed);
    d.wait_ready(c.nbd_addr(0));
    c.nodes[0].daemon = Some(d);
}

/// `systemctl restart` with the unit as shipped: SIGTERM hands every descriptor to the fd
/// store and exits 0; the next start takes them back and empties the store.
#[test]
fn restart_through_systemds_fd_store() {
    let mut c = ClusterSpec::new(1).mirrord_only().build();
    let sd = FakeSystemd::new(&c.dir);
    start_as_service(&mut c, &sd, "mirrord (service start 0)");
    let before = clients(&c.status_json(0));
    let mut client = Writer::start(&c, before);
    let mut took = Vec::new();
    for round in 1..=3 {
        std::thread::sleep(Duration::from_millis(1500));
        let t = Instant::now();
        let exit = c.stop(0).expect("mirrord stops after SIGTERM");
        assert!(
            exit.success(),
            "round {round}: exit {exit:?}\n{}",
            c.log_text(0)
        );
        let stored = sd.stored();
        assert_eq!(
            stored.iter().filter(|n| n.starts_with("client-")).count() as u64,
            CONNECTIONS,
            "round {round}: {stored:?}"
        );
        assert_eq!(
            stored.last().map(String::as_str),
            Some("handover-state"),
            "{stored:?}"
        );
        start_as_service(&mut c, &sd, &format!("mirrord (service start {round})"));
        c.wait_status(
            0,
            Duration::from_secs(30),
            "serving the client again",
            |st| clients(st) == before + CONNECTIONS,
        );
        took.push(t.elapsed());
        // Every stored descriptor is taken back out: a crash now closes the connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sd.stored().is_empty() {
            assert!(Instant::now() < deadline, "still stored: {:?}", sd.stored());
            std::thread::sleep(Duration::from_millis(20));
        }
        client.assert_running(&format!("service restart {round}"));
    }
    let v = client.finish(&c, before);
    assert!(sd.messages().iter().any(|m| m.contains("STOPPING=1")));
    eprintln!("client: {v}; stop + start took {took:?}");
}

/// What a crash during a hand-over leaves in the fd store (the state is stored last, so it is
/// missing), then a state that does not parse: mirrord refuses either, closes the client
/// sockets (the client sees its connection end, not hang), empties the store and starts
/// fresh.
#[test]
fn a_refused_handover_closes_the_stored_connections() {
    use std::io::{Read, Write};
    let mut c = ClusterSpec::new(1).mirrord_only().build();
    let sd = FakeSystemd::new(&c.dir);
    for (round, state) in [(0, None), (1, Some(&b"{\"version\": 1, \"resou"[..]))] {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        sd.put("client-1", theirs.into());
        if let Some(text) = state {
            let path = c.dir.join("bad-state");
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text))
                .expect("write the state");
            let f = std::fs::File::open(&path).expect("open the state");
            sd.put("handover-state", f.into());
        }
        start_as_service(&mut c, &sd, &format!("mirrord (refused hand-over {round})"));
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        assert_eq!(
            ours.read(&mut byte)
                .expect("the connection ends, not hangs"),
            0,
            "round {round}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sd.stored().is_empty() {
            assert!(Instant::now() < deadline, "still stored: {:?}", sd.stored());
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = c.log_text(0);
        let why = if state.is_none() {
            "no hand-over state"
        } else {
            "not valid JSON"
        };
        assert!(log.contains(why), "round {round}: {log}");
        assert!(log.contains("starting fresh"), "{log}");
        assert_eq!(clients(&c.status_json(0)), 0);
        // `systemctl stop`: SIGTERM (a hand-over to the store), then the store is flushed.
        assert!(c.stop(0).expect("stops").success());
        sd.flush("FDNAME=handover-state");
    }
}
