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

pub use node::Node;
pub use resync_rate::SyncRate;
pub use split::MAX_PIECE_EXTENTS;
pub use types::*;
