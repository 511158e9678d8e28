//! Two network namespaces joined by a veth pair, for tests that cut the peer
//! link for real: each node's mirrord runs in its own namespace
//! (`ip netns exec`), the link is taken down and up with `ip link set`. The
//! addresses (10.233.0.1 and .2) exist only inside these namespaces; NBD and
//! control sockets stay unix sockets in the file system, reachable from the
//! test as usual. The namespaces are deleted on drop.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct NetPair {
    /// Namespace of node i.
    pub ns: [String; 2],
    pub addr: [IpAddr; 2],
    veth: [String; 2],
}

/// Runs `ip ARGS` (bounded), panicking with its output on failure.
pub fn ip(args: &[&str]) {
    let o = run(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(o.success(), "ip {}: {}", args.join(" "), o.describe());
}

impl NetPair {
    /// Creates the namespaces and the link (up). Needs root.
    pub fn create() -> NetPair {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{k}", std::process::id());
        let ns = [format!("nbdm{tag}a"), format!("nbdm{tag}b")];
        // Interface names are limited to 15 bytes.
        let veth = [format!("nva{tag}"), format!("nvb{tag}")];
        assert!(veth[0].len() <= 15, "interface name {} too long", veth[0]);
        let addr = [
            IpAddr::V4(Ipv4Addr::new(10, 233, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 233, 0, 2)),
        ];
        let pair = NetPair { ns, addr, veth };
        for n in &pair.ns {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link",
            "add",
            &pair.veth[0],
            "netns",
            &pair.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &pair.veth[1],
            "netns",
            &pair.ns[1],
        ]);
        for i in 0..2 {
            let a = format!("{}/24", pair.addr[i]);
            ip(&["-n", &pair.ns[i], "addr", "add", &a, "dev", &pair.veth[i]]);
            ip(&["-n", &pair.ns[i], "link", "set", &pair.veth[i], "up"]);
        }
        pair
    }

    /// Takes node 0's end of the link down: nothing passes either way.
    pub fn cut(&self) {
        ip(&["-n", &self.ns[0], "link", "set", &self.veth[0], "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.ns[0], "link", "set", &self.veth[0], "up"]);
    }

    /// `cmd` to run inside node `i`'s namespace.
    pub fn wrap(&self, i: usize, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]);
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = run(
                Command::new("ip").args(["netns", "del", n]),
                Duration::from_secs(10),
            );
        }
    }
}
