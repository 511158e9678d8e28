//! The node's state at scrape time, from the core's `Status` (the snapshot behind
//! `mirrorctl status`): role, disk and connection states as one gauge per possible value
//! (1 for the current one, 0 for the others), out-of-sync bytes, resync and verify
//! progress, split brain. Label values are those of `status --json`.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::core::{ConnState, DiskState, Replication, Role, Status};

const ROLES: [(Role, &str); 2] = [(Role::Primary, "primary"), (Role::Secondary, "secondary")];
const DISKS: [(DiskState, &str); 5] = [
    (DiskState::UpToDate, "up-to-date"),
    (DiskState::Inconsistent, "inconsistent"),
    (DiskState::Outdated, "outdated"),
    (DiskState::Failed, "failed"),
    (DiskState::Diskless, "diskless"),
];
const CONNS: [(ConnState, &str); 3] = [
    (ConnState::Standalone, "standalone"),
    (ConnState::Connecting, "connecting"),
    (ConnState::Connected, "connected"),
];
const REPLS: [(Replication, &str); 6] = [
    (Replication::Off, "off"),
    (Replication::Established, "established"),
    (Replication::SyncSource, "sync-source"),
    (Replication::SyncTarget, "sync-target"),
    (Replication::VerifySource, "verify-source"),
    (Replication::VerifyTarget, "verify-target"),
];

/// One scrape's state gauges.
#[derive(Debug)]
pub struct StateSnapshot(pub Status);

impl Collector for StateSnapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let st = &self.0;
        let peer_name = st.peer.as_ref().map_or("", |p| p.name.as_str());
        let mut info = enc.encode_descriptor(
            "node",
            "The resource and node this daemon serves, and its peer (empty when standalone).",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[
            ("resource", st.resource.as_str()),
            ("node", st.node.as_str()),
            ("peer", peer_name),
        ])?;
        one_of(
            &mut enc,
            "role",
            "This node's role",
            "role",
            &ROLES,
            Some(st.role),
        )?;
        one_of(
            &mut enc,
            "disk_state",
            "This node's disk state",
            "state",
            &DISKS,
            Some(st.disk),
        )?;
        gauge(
            &mut enc,
            "device_size_bytes",
            "Size of the exported device",
            st.size_bytes,
        )?;
        gauge(
            &mut enc,
            "out_of_sync_bytes",
            "Bytes marked out of sync between this node and its peer",
            st.out_of_sync_bytes,
        )?;
        gauge(
            &mut enc,
            "nbd_clients",
            "NBD clients connected",
            st.nbd_clients as u64,
        )?;
        gauge(
            &mut enc,
            "split_brain",
            "1 while a split brain is detected and not resolved",
            u64::from(st.split_brain),
        )?;
        gauge(
            &mut enc,
            "io_suspended",
            "1 while writes are frozen (fencing, or a link pause between two primaries)",
            u64::from(st.suspended),
        )?;
        if let Some(p) = &st.peer {
            one_of(
                &mut enc,
                "peer_connection_state",
                "State of the link to the peer",
                "state",
                &CONNS,
                Some(p.connection),
            )?;
            one_of(
                &mut enc,
                "peer_replication_state",
                "Replication with the peer",
                "state",
                &REPLS,
                Some(p.replication),
            )?;
            one_of(
                &mut enc,
                "peer_role",
                "The peer's role as last announced (all 0: unknown)",
                "role",
                &ROLES,
                p.role,
            )?;
            one_of(
                &mut enc,
                "peer_disk_state",
                "The peer's disk state as last announced (all 0: unknown)",
                "state",
                &DISKS,
                p.disk,
            )?;
            gauge(
                &mut enc,
                "peer_writes_in_flight",
                "Writes sent to the peer and not acknowledged by it yet",
                p.writes_in_flight as u64,
            )?;
        }
        progress(&mut enc, st)?;
        sync_counters(&mut enc, st)
    }
}

/// Resync and online verify in progress (all 0 while none runs).
fn progress(enc: &mut DescriptorEncoder, st: &Status) -> fmt::Result {
    for (kind, verify) in [("resync", false), ("verify", true)] {
        let r = st.resync.as_ref().filter(|r| r.verify == verify);
        let (a_what, what) = if verify {
            ("an online verify", "online verify")
        } else {
            ("a resync", "resync")
        };
        let mut g =
            |suffix: &str, help: String, v: u64| gauge(enc, &format!("{kind}_{suffix}"), &help, v);
        g(
            "running",
            format!("1 while {a_what} runs on this node (source or target)"),
            u64::from(r.is_some()),
        )?;
        g(
            "done_bytes",
            format!("Bytes the running {what} has done"),
            r.map_or(0, |r| r.done_bytes),
        )?;
        g(
            "total_bytes",
            format!("Bytes the running {what} covers"),
            r.map_or(0, |r| r.total_bytes),
        )?;
        g(
            "rate_bytes_per_second",
            format!("Current rate of the running {what}"),
            r.map_or(0, |r| r.rate_bytes_per_sec),
        )?;
        g(
            "eta_seconds",
            format!("Estimated time left for the running {what}"),
            r.map_or(0, |r| r.eta_seconds),
        )?;
    }
    let differing = st
        .resync
        .as_ref()
        .filter(|r| r.verify)
        .map(|r| r.differing_blocks)
        .or(st.sync.last_verify_differing_blocks);
    if let Some(d) = differing {
        gauge(
            enc,
            "verify_differing_blocks",
            "Blocks found different by the running online verify, else by the last one",
            d,
        )?;
    }
    Ok(())
}

/// What resyncs moved since the daemon started (status `"sync"`).
fn sync_counters(enc: &mut DescriptorEncoder, st: &Status) -> fmt::Result {
    let s = &st.sync;
    counter(
        enc,
        "resync_sent_bytes",
        "Resync data sent to the peer as sync source",
        s.bytes_sent,
    )?;
    counter(
        enc,
        "resync_received_bytes",
        "Resync data received from the peer as sync target",
        s.bytes_received,
    )?;
    counter(
        enc,
        "resync_equal_blocks",
        "Blocks a checksum resync found equal and did not send",
        s.blocks_equal,
    )?;
    counter(enc, "resyncs_started", "Resyncs started", s.resyncs_started)?;
    counter(
        enc,
        "resyncs_finished",
        "Resyncs finished",
        s.resyncs_finished,
    )
}

// Help texts end with a period, as the registry writes those of the counters.

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, &format!("{help}."), None, MetricType::Gauge)?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, &format!("{help}."), None, MetricType::Counter)?)
}

/// One series per possible value: 1 for `current`, 0 for the others.
fn one_of<T: PartialEq + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(T, &'static str)],
    current: Option<T>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, &format!("{help}."), None, MetricType::Gauge)?;
    for (v, text) in values {
        let g = ConstGauge::new(u64::from(current == Some(*v)));
        g.encode(m.encode_family(&[(label, *text)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{PeerStatus, ResyncStatus, SyncCounters};
    use prometheus_client::encoding::prometheus_text::encode;
    use prometheus_client::registry::Registry;

    fn status() -> Status {
        Status {
            resource: "r0".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            size_bytes: 1 << 20,
            out_of_sync_bytes: 8192,
            nbd_clients: 2,
            peer: Some(PeerStatus {
                name: "beta".into(),
                connection: ConnState::Connected,
                replication: Replication::SyncSource,
                role: Some(Role::Secondary),
                disk: None,
                writes_in_flight: 3,
            }),
            resync: Some(ResyncStatus {
                done_bytes: 4096,
                total_bytes: 12288,
                rate_bytes_per_sec: 1000,
                eta_seconds: 8,
                verify: false,
                differing_blocks: 0,
                pace: None,
            }),
            sync: SyncCounters {
                bytes_sent: 4096,
                resyncs_started: 1,
                last_verify_differing_blocks: Some(5),
                ..SyncCounters::default()
            },
            split_brain: false,
            suspended: true,
        }
    }

    fn text(st: Status) -> String {
        let mut reg = Registry::with_prefix("t");
        reg.register_collector(Box::new(StateSnapshot(st)));
        let mut out = String::new();
        encode(&mut out, &reg).expect("encode");
        out
    }

    #[test]
    fn states_are_one_series_per_value() {
        let out = text(status());
        for line in [
            "t_node_info{resource=\"r0\",node=\"alpha\",peer=\"beta\"} 1\n",
            "t_role{role=\"primary\"} 1\n",
            "t_role{role=\"secondary\"} 0\n",
            "t_disk_state{state=\"up-to-date\"} 1\n",
            "t_disk_state{state=\"failed\"} 0\n",
            "t_peer_connection_state{state=\"connected\"} 1\n",
            "t_peer_connection_state{state=\"standalone\"} 0\n",
            "t_peer_replication_state{state=\"sync-source\"} 1\n",
            "t_peer_role{role=\"secondary\"} 1\n",
            "t_peer_disk_state{state=\"up-to-date\"} 0\n",
            "t_peer_writes_in_flight 3\n",
            "t_out_of_sync_bytes 8192\n",
            "t_nbd_clients 2\n",
            "t_split_brain 0\n",
            "t_io_suspended 1\n",
            "t_resync_running 1\n",
            "t_resync_done_bytes 4096\n",
            "t_resync_total_bytes 12288\n",
            "t_resync_rate_bytes_per_second 1000\n",
            "t_resync_eta_seconds 8\n",
            "t_verify_running 0\n",
            "t_verify_total_bytes 0\n",
            "t_verify_differing_blocks 5\n",
            "t_resync_sent_bytes_total 4096\n",
            "t_resyncs_started_total 1\n",
            "t_resyncs_finished_total 0\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert!(!out.contains("t_peer_disk_state{state=\"up-to-date\"} 1"));
    }

    #[test]
    fn a_standalone_node_has_no_peer_series_and_a_verify_is_not_a_resync() {
        let mut st = status();
        st.peer = None;
        st.split_brain = true;
        if let Some(r) = st.resync.as_mut() {
            r.verify = true;
            r.differing_blocks = 2;
        }
        let out = text(st);
        assert!(!out.contains("t_peer_"), "{out}");
        for line in [
            "t_node_info{resource=\"r0\",node=\"alpha\",peer=\"\"} 1\n",
            "t_split_brain 1\n",
            "t_resync_running 0\n",
            "t_verify_running 1\n",
            "t_verify_done_bytes 4096\n",
            "t_verify_differing_blocks 2\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }
}
