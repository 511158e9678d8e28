//! The deterministic simulator: two production node cores (`core::Node`)
//! driven through simulated disks, metadata stores, network, clients and
//! operator, with faults, all from one u64 seed; invariants are checked as the
//! run goes and at its end. `mirror-sim` (src/bin/mirror-sim.rs) runs many seeds;
//! a failing seed replays exactly with `--seed S --trace`.
//!
//! Files: `world.rs` (time, event queue), `rng.rs`, `scenario.rs` (what a seed
//! draws), `cluster.rs` (nodes and the event loop), `dispatch.rs` (carrying out
//! core actions, delivering messages), `net.rs`, `disk.rs`, `meta.rs`,
//! `data.rs` (sector contents), `workload.rs` (clients), `faults.rs` (faults and
//! operator), `model.rs` (acknowledged data), `invariants.rs`, `policy.rs` (whose data a
//! handshake keeps), `run.rs`
//! (phases and final checks), `trace.rs`.

mod cluster;
mod data;
mod disk;
mod dispatch;
mod faults;
mod invariants;
mod meta;
mod model;
mod net;
mod policy;
mod resend;
mod rng;
mod run;
mod scenario;
mod trace;
mod workload;
mod world;

pub use cluster::{Stats, Violation};
pub use run::{quiet_panics, run_seed, Options, Outcome};

/// The deliberate core bugs by name (for `mirror-sim --fault NAME`).
pub const FAULT_NAMES: [&str; 6] = [
    "ack-before-peer",
    "clear-resync-bit-early",
    "wrong-sync-direction",
    "hello-keeps-old-session",
    "meta-failure-discards-data",
    "sb-loser-wins",
];

/// Turns a fault's name on in `faults`; false if the name is unknown.
pub fn set_fault(faults: &mut crate::core::Faults, name: &str) -> bool {
    match name {
        "ack-before-peer" => faults.ack_before_peer = true,
        "clear-resync-bit-early" => faults.clear_resync_bit_early = true,
        "wrong-sync-direction" => faults.wrong_sync_direction = true,
        "hello-keeps-old-session" => faults.hello_keeps_old_session = true,
        "meta-failure-discards-data" => faults.meta_failure_discards_data = true,
        "sb-loser-wins" => faults.sb_loser_wins = true,
        _ => return false,
    }
    true
}
