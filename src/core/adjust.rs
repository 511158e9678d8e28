//! `mirrorctl adjust`: the part of the config a running node takes without a
//! restart. Every value here is read where it is used (the tick, the resync
//! planner, the split-brain decision), so a change applies from the next use.

use serde_json::json;

use super::node::Node;

/// The adjustable settings of [`super::CoreConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunables {
    pub sync_rate: u64,
    pub sync_checksum: bool,
    pub split_brain: crate::config::SplitBrain,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub timeout_ms: u64,
    pub ko_count: u64,
    pub connect_retry_ms: u64,
    pub reconnect_grace_ms: u64,
}

impl Node {
    /// Takes new tunables and reports the change as an `adjusted` event.
    pub fn adjust(&mut self, t: Tunables, changes: Vec<String>) {
        let c = &mut self.cfg;
        c.sync_rate = t.sync_rate;
        c.sync_checksum = t.sync_checksum;
        c.split_brain = t.split_brain;
        c.ping_interval_ms = t.ping_interval_ms;
        c.ping_timeout_ms = t.ping_timeout_ms;
        c.timeout_ms = t.timeout_ms;
        c.ko_count = t.ko_count;
        c.connect_retry_ms = t.connect_retry_ms;
        c.reconnect_grace_ms = t.reconnect_grace_ms;
        self.notify("adjusted", json!({ "changes": changes }));
    }
}
