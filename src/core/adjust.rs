//! `mirrorctl adjust`: the part of the config a running node takes without a
//! restart. Every value the core holds in its [`CoreConfig`] is read where it is
//! used (the tick, the resync planner, the split-brain decision), so a change
//! applies from the next use. Which keys are live is decided once, in
//! `config::adjust`; the daemon rebuilds the whole core config from the adjusted
//! settings with the same function it starts the node with.

use serde_json::json;

use super::node::Node;
use super::types::CoreConfig;

impl Node {
    /// Takes the core config built from the adjusted settings and reports the
    /// change as an `adjusted` event. What identifies the node and its disk
    /// cannot change here (config::adjust refuses those keys).
    pub fn adjust(&mut self, new: CoreConfig, changes: Vec<String>) {
        let c = &self.cfg;
        assert_eq!(
            (&c.resource, &c.node, &c.peer, c.data_size),
            (&new.resource, &new.node, &new.peer, new.data_size),
            "adjust changed what identifies the node"
        );
        assert_eq!(
            (c.protocol, c.al_slots, c.bitmap_bits_per_page, c.max_io),
            (
                new.protocol,
                new.al_slots,
                new.bitmap_bits_per_page,
                new.max_io
            ),
            "adjust changed a key that needs a restart"
        );
        self.cfg = new;
        self.notify("adjusted", json!({ "changes": changes }));
    }
}
