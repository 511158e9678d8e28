//! `mirrorctl adjust`: which differences between the running settings and a
//! changed config file can be applied to a running mirrord, and which need a
//! restart. Every field of [`Settings`] is named below without `..`, so a new
//! config key does not compile until it is put in one class or the other.

use std::fmt::Debug;

use super::{NodeConfig, Settings};

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key as written in the file, e.g. `sync.rate`, `node[1].address`.
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

/// What `adjust` would do: apply `live`, unless `restart` is not empty (then nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Differences a running daemon takes: net timeouts, sync, split-brain policies, handlers,
    /// the metrics endpoint's address.
    pub live: Vec<Change>,
    /// Differences that need a restart (or a new resource): disks, addresses, names, ...
    pub restart: Vec<Change>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }
}

fn diff<T: PartialEq + Debug>(out: &mut Vec<Change>, key: &str, old: &T, new: &T) {
    if old != new {
        out.push(Change {
            key: key.to_string(),
            old: format!("{old:?}"),
            new: format!("{new:?}"),
        });
    }
}

/// Compares the running settings with those read from the changed file (for the same node).
pub fn plan(old: &Settings, new: &Settings) -> Plan {
    let mut p = Plan::default();
    let Settings {
        file: _,
        resource,
        protocol,
        allow_two_primaries,
        auto_promote,
        shared_secret_file,
        insecure_no_secret,
        run_dir,
        nbd_listen,
        nbd_busy_poll_us,
        disk,
        sync,
        split_brain,
        handlers,
        fencing,
        net,
        nodes,
        this,
        metrics_listen,
        tls,
    } = new;
    let live = &mut p.live;
    diff(live, "sync.rate", &old.sync.rate, &sync.rate);
    diff(live, "sync.min-rate", &old.sync.min_rate, &sync.min_rate);
    diff(live, "sync.checksum", &old.sync.checksum, &sync.checksum);
    let sb = &old.split_brain;
    diff(
        live,
        "split-brain.after-sb-0pri",
        &sb.after_sb_0pri,
        &split_brain.after_sb_0pri,
    );
    diff(
        live,
        "split-brain.after-sb-1pri",
        &sb.after_sb_1pri,
        &split_brain.after_sb_1pri,
    );
    diff(
        live,
        "split-brain.after-sb-2pri",
        &sb.after_sb_2pri,
        &split_brain.after_sb_2pri,
    );
    diff(
        live,
        "handlers.fence-peer",
        &old.handlers.fence_peer,
        &handlers.fence_peer,
    );
    diff(
        live,
        "handlers.split-brain",
        &old.handlers.split_brain,
        &handlers.split_brain,
    );
    let n = &old.net;
    diff(
        live,
        "net.ping-interval",
        &n.ping_interval_ms,
        &net.ping_interval_ms,
    );
    diff(
        live,
        "net.ping-timeout",
        &n.ping_timeout_ms,
        &net.ping_timeout_ms,
    );
    diff(live, "net.timeout", &n.timeout_ms, &net.timeout_ms);
    diff(live, "net.ko-count", &n.ko_count, &net.ko_count);
    diff(
        live,
        "net.connect-retry",
        &n.connect_retry_ms,
        &net.connect_retry_ms,
    );
    diff(
        live,
        "net.reconnect-grace",
        &n.reconnect_grace_ms,
        &net.reconnect_grace_ms,
    );
    // The daemon binds the new address before it stops the old endpoint (daemon/adjust.rs).
    diff(live, "metrics.listen", &old.metrics_listen, metrics_listen);
    for (i, (o, n)) in old.nodes.iter().zip(nodes).enumerate() {
        diff(
            live,
            &format!("node[{i}].metrics-listen"),
            &o.metrics_listen,
            &n.metrics_listen,
        );
    }

    let rs = &mut p.restart;
    diff(rs, "resource.name", &old.resource, resource);
    diff(rs, "resource.protocol", &old.protocol, protocol);
    diff(
        rs,
        "resource.allow-two-primaries",
        &old.allow_two_primaries,
        allow_two_primaries,
    );
    diff(rs, "resource.auto-promote", &old.auto_promote, auto_promote);
    diff(
        rs,
        "resource.shared-secret-file",
        &old.shared_secret_file,
        shared_secret_file,
    );
    diff(
        rs,
        "resource.insecure-no-secret",
        &old.insecure_no_secret,
        insecure_no_secret,
    );
    // Fencing changes what a freeze under way means; its default follows fence-peer.
    diff(rs, "resource.fencing", &old.fencing, fencing);
    diff(rs, "run-dir (this node)", &old.run_dir, run_dir);
    diff(rs, "nbd listen (this node)", &old.nbd_listen, nbd_listen);
    diff(
        rs,
        "nbd.busy-poll-us",
        &old.nbd_busy_poll_us,
        nbd_busy_poll_us,
    );
    diff(rs, "disk.engine", &old.disk.engine, &disk.engine);
    diff(rs, "disk.direct-io", &old.disk.direct_io, &disk.direct_io);
    diff(
        rs,
        "net.insecure-allow-relay",
        &n.insecure_allow_relay,
        &net.insecure_allow_relay,
    );
    // Read when a peer connection's sender is made.
    diff(
        rs,
        "net.data-integrity",
        &n.data_integrity,
        &net.data_integrity,
    );
    // Certificates and the CA are loaded at start (docs/OPERATIONS.md: restart after renewing).
    diff(rs, "tls (this node)", &old.tls, tls);
    diff(rs, "node (count)", &old.nodes.len(), &nodes.len());
    diff(rs, "this node's index", &old.this, this);
    for (i, (o, n)) in old.nodes.iter().zip(nodes).enumerate() {
        let NodeConfig {
            name,
            address,
            disk,
            meta_disk,
            run_dir,
            nbd_listen,
            // Live: compared above.
            metrics_listen: _,
        } = n;
        diff(rs, &format!("node[{i}].name"), &o.name, name);
        diff(rs, &format!("node[{i}].address"), &o.address, address);
        diff(rs, &format!("node[{i}].disk"), &o.disk, disk);
        diff(rs, &format!("node[{i}].meta-disk"), &o.meta_disk, meta_disk);
        diff(rs, &format!("node[{i}].run-dir"), &o.run_dir, run_dir);
        diff(
            rs,
            &format!("node[{i}].nbd-listen"),
            &o.nbd_listen,
            nbd_listen,
        );
    }
    // A key added inside a table above (say a new [net] key) and named nowhere here is
    // neither applied nor ignored: it needs a restart until it is put in a class.
    let mut want = new.clone();
    want.file = old.file.clone();
    if p.restart.is_empty() && apply(old, new) != want {
        p.restart.push(Change {
            key: "a key adjust does not know".into(),
            old: "-".into(),
            new: "changed".into(),
        });
    }
    p
}

/// `old` with the live keys of `new`: what the daemon runs with after an adjust.
pub fn apply(old: &Settings, new: &Settings) -> Settings {
    let mut s = old.clone();
    s.sync.rate = new.sync.rate;
    s.sync.min_rate = new.sync.min_rate;
    s.sync.checksum = new.sync.checksum;
    s.split_brain = new.split_brain.clone();
    s.handlers.fence_peer = new.handlers.fence_peer.clone();
    s.handlers.split_brain = new.handlers.split_brain.clone();
    let (n, to) = (&new.net, &mut s.net);
    to.ping_interval_ms = n.ping_interval_ms;
    to.ping_timeout_ms = n.ping_timeout_ms;
    to.timeout_ms = n.timeout_ms;
    to.ko_count = n.ko_count;
    to.connect_retry_ms = n.connect_retry_ms;
    to.reconnect_grace_ms = n.reconnect_grace_ms;
    s.metrics_listen = new.metrics_listen;
    for (to, n) in s.nodes.iter_mut().zip(&new.nodes) {
        to.metrics_listen = n.metrics_listen;
    }
    s
}

#[cfg(test)]
mod tests;
