//! A planned restart under a running client (issue 19, loopback part): `mirrorctl restart`
//! three times and once into a copy of the binary at another path (an upgrade), while a
//! python3-libnbd client with two connections writes and reads with verification. The
//! client must see no error, no lost or doubly answered request, every acknowledged write
//! must read back, and the daemon's client count must come back each time.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client_script, python3, ClusterSpec};

/// Connections the client opens (tests/clients/restart_writer.py).
const CONNECTIONS: u64 = 2;
/// The client gives up (and fails) if it is not told to stop within this time.
const CLIENT_LIMIT_S: &str = "240";
const CLIENT_WAIT: Duration = Duration::from_secs(300);

fn clients(st: &serde_json::Value) -> u64 {
    st["nbd_clients"].as_u64().unwrap_or(u64::MAX)
}

fn restarts_under_a_running_client(spec: ClusterSpec) {
    let mut c = spec.mirrord_only().start();
    let before = clients(&c.status_json(0));
    let pid = c.daemon(0).pid();
    let stop = c.dir.join("stop-client");
    let out = c.dir.join("client.out");
    let mut client = Command::new(python3())
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

    // The upgrade: the same program at another path, as a new package would install it.
    let upgrade = c.dir.join("mirrord-upgraded");
    std::fs::copy(common::process::own_binary("mirrord"), &upgrade).expect("copy mirrord");
    std::fs::set_permissions(&upgrade, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let upgrade_arg = upgrade.to_str().expect("utf-8 path").to_string();

    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
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
        assert!(
            client.try_wait().expect("client status").is_none(),
            "the client ended during restart {round}: {}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
    }
    assert!(
        fds_after.windows(2).all(|w| w[0] == w[1]),
        "no descriptor leaks across restarts: {fds_after:?}"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    assert_eq!(exe, upgrade, "the last restart ran the upgraded binary");

    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop, b"").expect("tell the client to stop");
    let deadline = Instant::now() + CLIENT_WAIT;
    let status = loop {
        if let Some(st) = client.try_wait().expect("client status") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = client.kill();
            panic!("the client did not finish within {CLIENT_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = std::fs::read_to_string(&out).unwrap_or_default();
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
