//! A relay between the two nodes is refused by both (issue 20).
//!
//! alpha and beta run in two network namespaces that have no route to each
//! other; a third namespace, the relay, is connected to both. Each node's
//! config names the relay's address on its side as the peer (as if the relay
//! held the peer's address), so the relay's connections pass the address
//! check and only the connection binding of the authentication stands in the
//! way. The relay connects to both peer ports and pipes the two connections
//! into each other, as in the issue's measurement. Both nodes must refuse it
//! ("relayed connection"), neither may offer it to its core (no
//! "authenticated" line, never connected), and no peer message (so no Hello)
//! may cross the relay. A connection from another address of the relay
//! namespace is refused by the address check.
//!
//! Needs root (`ip netns`). Every address is in 10.231.0.0/16 and lives only
//! inside the namespaces the test creates and deletes.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::netns::ip;
use common::process::own_binary;
use common::{python3, ClusterSpec, MIB};

const PORT: u16 = 7789;
const ALPHA_IP: &str = "10.231.1.1";
const RELAY_A_IP: &str = "10.231.1.9";
const STRAY_IP: &str = "10.231.1.10";
const BETA_IP: &str = "10.231.2.1";
const RELAY_B_IP: &str = "10.231.2.9";

/// The relay: connects to both peer ports (from the given source addresses),
/// pipes the two connections, reports what crossed; then one stray
/// connection from another address. Every wait is bounded.
const RELAY_PY: &str = r#"
import socket, sys, threading, time
a, src_a, b, src_b, stray_src, rounds = sys.argv[1:7]
port = 7789
MSG_MAGIC = b"nmp1"

def pipe(src, dst, seen):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            seen["bytes"] += len(data)
            seen["data"] += data[:4096]
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

for i in range(int(rounds)):
    try:
        sa = socket.create_connection((a, port), timeout=5, source_address=(src_a, 0))
        sb = socket.create_connection((b, port), timeout=5, source_address=(src_b, 0))
    except OSError as e:
        print(f"round {i}: connect failed: {e}", flush=True)
        time.sleep(0.5)
        continue
    for s in (sa, sb):
        s.settimeout(15)
    a2b = {"bytes": 0, "data": b""}
    b2a = {"bytes": 0, "data": b""}
    ts = [threading.Thread(target=pipe, args=(sa, sb, a2b)),
          threading.Thread(target=pipe, args=(sb, sa, b2a))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    magic = MSG_MAGIC in a2b["data"] or MSG_MAGIC in b2a["data"]
    print(f"round {i}: piped alpha->beta {a2b['bytes']} bytes, beta->alpha {b2a['bytes']} bytes, "
          f"message magic {'SEEN' if magic else 'never'}", flush=True)

s = socket.create_connection((a, port), timeout=5, source_address=(stray_src, 0))
s.settimeout(10)
try:
    got = s.recv(100)
    print(f"stray: closed by alpha after {len(got)} bytes", flush=True)
except OSError as e:
    print(f"stray: {e}", flush=True)
print("relay done", flush=True)
"#;

/// Three namespaces, deleted on drop (with whatever links are in them).
struct Namespaces {
    alpha: String,
    beta: String,
    relay: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let id = std::process::id();
        let ns = Namespaces {
            alpha: format!("nbdm-relay-{id}-a"),
            beta: format!("nbdm-relay-{id}-b"),
            relay: format!("nbdm-relay-{id}-r"),
        };
        for n in [&ns.alpha, &ns.beta, &ns.relay] {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        // alpha <-> relay and beta <-> relay; the relay does not forward
        // (a fresh namespace has ip_forward 0), and alpha and beta have only
        // their own /24: no route between them.
        for (node, dev, rdev, addr, raddrs) in [
            (&ns.alpha, "a0", "ra", ALPHA_IP, vec![RELAY_A_IP, STRAY_IP]),
            (&ns.beta, "b0", "rb", BETA_IP, vec![RELAY_B_IP]),
        ] {
            ip(&[
                "-n", node, "link", "add", dev, "type", "veth", "peer", "name", rdev, "netns",
                &ns.relay,
            ]);
            ip(&["-n", node, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", node, "link", "set", dev, "up"]);
            for r in raddrs {
                ip(&[
                    "-n",
                    &ns.relay,
                    "addr",
                    "add",
                    &format!("{r}/24"),
                    "dev",
                    rdev,
                ]);
            }
            ip(&["-n", &ns.relay, "link", "set", rdev, "up"]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.alpha, &self.beta, &self.relay] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_relay_between_the_nodes_is_refused_by_both() {
    let ns = Namespaces::create();
    let mut c = ClusterSpec::new(2).size(8 * MIB).mirrord_only().build();
    let text = std::fs::read_to_string(&c.config).expect("config");
    let (alpha_addr, beta_addr) = (c.nodes[0].cfg.peer_addr, c.nodes[1].cfg.peer_addr);
    // Each node's own address, and the relay's address on its side as the peer's.
    let configs = [
        (ALPHA_IP, RELAY_A_IP, "alpha-ns.toml", &ns.alpha),
        (RELAY_B_IP, BETA_IP, "beta-ns.toml", &ns.beta),
    ];
    let mut cfg_paths = Vec::new();
    for (a, b, file, _) in &configs {
        let path = c.dir.join(file);
        let t = text
            .replace(&alpha_addr.to_string(), &format!("{a}:{PORT}"))
            .replace(&beta_addr.to_string(), &format!("{b}:{PORT}"));
        std::fs::write(&path, t).expect("write config");
        cfg_paths.push(path);
    }
    for (i, ((_, _, _, netns), cfg)) in configs.iter().zip(&cfg_paths).enumerate() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns.as_str()])
            .arg(own_binary("mirrord"))
            .arg("--config")
            .arg(cfg)
            .arg("--node")
            .arg(&c.nodes[i].cfg.name)
            .env("RUST_LOG", "info");
        let label = format!("mirrord node {} in {netns}", c.nodes[i].cfg.name);
        let mut d = Daemon::spawn(&label, cmd, c.nodes[i].log.clone());
        d.wait_ready(&c.nodes[i].cfg.nbd);
        c.nodes[i].daemon = Some(d);
    }

    let script = c.dir.join("relay.py");
    std::fs::write(&script, RELAY_PY).expect("write relay");
    let relay = Command::new("ip")
        .args(["netns", "exec", &ns.relay])
        .arg(python3())
        .arg(&script)
        .args([ALPHA_IP, RELAY_A_IP, BETA_IP, RELAY_B_IP, STRAY_IP, "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay");
    let mut relay = KillOnDrop(relay);

    // The relay ends by itself (3 rounds, each bounded); bound the wait anyway.
    let deadline = Instant::now() + Duration::from_secs(120);
    while relay.0.try_wait().expect("relay wait").is_none() {
        assert!(Instant::now() < deadline, "relay did not finish in 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let child = std::mem::replace(
        &mut relay.0,
        Command::new("true").spawn().expect("spawn true"),
    );
    let out = child.wait_with_output().expect("relay output");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("relay said:\n{said}{err}");
    assert!(
        out.status.success() && said.contains("relay done"),
        "{said}{err}"
    );
    assert_eq!(
        said.matches("piped alpha->beta").count(),
        3,
        "every round connected to both: {said}"
    );
    assert!(
        !said.contains("SEEN"),
        "a peer message crossed the relay: {said}"
    );
    assert!(
        said.contains("stray: closed by alpha after 0 bytes"),
        "{said}"
    );

    // Both refused every relayed connection, before their core saw it.
    for i in 0..2 {
        let log = c.log_text(i);
        let refusals = log
            .matches("relayed connection: the peer sees it as")
            .count();
        assert!(refusals >= 3, "node {i}: {refusals} relay refusals:\n{log}");
        assert!(
            !log.contains("authenticated ("),
            "node {i} authenticated:\n{log}"
        );
        let v = c.status_json(i);
        assert_ne!(v["peer"]["connection"], "connected", "node {i}: {v:#}");
    }
    let alpha_log = c.log_text(0);
    assert!(
        alpha_log.contains(&format!("peer connection from {STRAY_IP}:"))
            && alpha_log.contains(&format!("not the peer's configured address {RELAY_A_IP}")),
        "the stray connection was not refused by address:\n{alpha_log}"
    );
    drop(c);
    drop(ns);
}
