//! A TCP proxy between the two nodes' peer ports (loopback only) that can stop
//! forwarding one way (a peer that stops reading) and records the first bytes of
//! each direction (what a party on the path sees).
//!
//! The nodes then see a relayed connection: the configs need
//! `[net] insecure-allow-relay = true` ([`Cluster::start_via_proxy`] writes them).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cluster::Cluster;

/// Bytes kept of each direction; later ones are counted only.
const RECORD_MAX: usize = 256 << 20;

#[derive(Default)]
struct Shared {
    /// Stop reading what the dialing node sends (its peer "stops reading").
    hold_forward: AtomicBool,
    /// Bytes seen dialer -> target and target -> dialer.
    recorded: [Mutex<Vec<u8>>; 2],
    seen: [AtomicU64; 2],
    /// Connections accepted.
    conns: AtomicU64,
}

pub struct LinkProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the link proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(dialer) = conn else { continue };
                let Ok(up) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                s.conns.fetch_add(1, Ordering::Relaxed);
                let (d2, u2) = match (dialer.try_clone(), up.try_clone()) {
                    (Ok(d), Ok(u)) => (d, u),
                    _ => continue,
                };
                let (a, b) = (s.clone(), s.clone());
                std::thread::spawn(move || pump(dialer, up, &a, 0));
                std::thread::spawn(move || pump(u2, d2, &b, 1));
            }
        });
        LinkProxy { port, shared }
    }

    /// While true, nothing more is read from the dialing node: its sends pile up.
    pub fn hold_forward(&self, hold: bool) {
        self.shared.hold_forward.store(hold, Ordering::SeqCst);
    }

    /// The first bytes seen in each direction (dialer -> target, target -> dialer).
    pub fn recorded(&self) -> [Vec<u8>; 2] {
        [0, 1].map(|i| {
            self.shared.recorded[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Bytes forwarded in each direction.
    pub fn seen(&self) -> [u64; 2] {
        [0, 1].map(|i| self.shared.seen[i].load(Ordering::Relaxed))
    }

    pub fn connections(&self) -> u64 {
        self.shared.conns.load(Ordering::Relaxed)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, s: &Shared, dir: usize) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if dir == 0 && s.hold_forward.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut rec = s.recorded[dir].lock().unwrap_or_else(|e| e.into_inner());
            let room = RECORD_MAX.saturating_sub(rec.len()).min(n);
            rec.extend_from_slice(&buf[..room]);
        }
        s.seen[dir].fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Cluster {
    /// Starts node 0 dialing node 1 through `proxy`, and node 1 unable to dial node 0 (so
    /// every connection passes the proxy). Both configs allow a relayed connection.
    pub fn start_via_proxy(&mut self, proxy: &LinkProxy) {
        let text = std::fs::read_to_string(&self.config).expect("read the config");
        assert!(
            text.contains("insecure-allow-relay = true"),
            "a proxied pair needs [net] insecure-allow-relay = true"
        );
        let beta = self.nodes[1].cfg.peer_addr.to_string();
        let alpha = self.nodes[0].cfg.peer_addr.to_string();
        let dead = format!("127.0.0.1:{}", super::config_toml::free_port());
        let via = format!("127.0.0.1:{}", proxy.port);
        let configs: [PathBuf; 2] = [
            self.dir.join("alpha-via-proxy.toml"),
            self.dir.join("beta-no-dial.toml"),
        ];
        std::fs::write(&configs[0], text.replace(&beta, &via)).expect("write alpha's config");
        std::fs::write(&configs[1], text.replace(&alpha, &dead)).expect("write beta's config");
        for (i, cfg) in configs.iter().enumerate() {
            self.start_with_config(i, cfg);
        }
    }
}
