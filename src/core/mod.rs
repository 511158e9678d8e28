//! The node core: the sans-IO replication state machine.
//!
//! It owns the role, disk and connection states, the generation identifiers,
//! the per-disk write order, the in-flight request table, the out-of-sync
//! bitmap and the activity log. The daemon (or the simulator) feeds it
//! [`Event`]s and carries out the [`Action`]s it returns; it never does I/O and
//! never reads a clock.

pub mod activity_log;
mod adjust;
pub mod bitmap;
mod client_waits;
mod clients;
mod disk_ops;
mod fencing;
mod freeze;
pub mod gi;
mod grace;
mod links;
mod meta_txn;
mod node;
pub mod ordering;
#[cfg(test)]
mod pair_tests;
mod peer_owed;
mod peer_session;
mod replication;
mod requests;
mod resync;
mod resync_rate;
mod session;
mod split;
mod stop;
mod sync_state;
mod types;
mod write_table;

/// Tables up to this many entries get the O(n) cross-checks of their
/// sub-states (recounts, "not there twice" scans) in debug builds.
pub const SCAN_CHECK_MAX: usize = 1024;

/// Whether a sub-state's O(n) cross-checks run for a table of `n` entries:
/// debug builds (the simulator's, the tests') and at most [`SCAN_CHECK_MAX`]
/// entries. Run on every change, they are quadratic in the table's size: a
/// debug daemon releasing 16,385 requests held by a freeze
/// (tests/held_requests.rs) spent more than 30 s in them before its first reply.
pub fn scan_checks(n: usize) -> bool {
    cfg!(debug_assertions) && n <= SCAN_CHECK_MAX
}

pub use node::Node;
pub use resync_rate::SyncRate;
pub use split::MAX_PIECE_EXTENTS;
pub use types::*;
