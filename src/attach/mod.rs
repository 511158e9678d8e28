//! The attach agent (`mirrorctl attach RESOURCE /dev/nbdN`): connects the
//! kernel's NBD device to mirrord through generic netlink and keeps it
//! connected across restarts and crashes of mirrord (issue 19).
//!
//! - `genl`: generic netlink message encoding/decoding (sans-IO).
//! - `nbd_genl`: the kernel NBD family's commands and attributes (sans-IO).
//! - `handshake`: the NBD client handshake for one kernel socket (sans-IO).
//! - `agent`: the decisions: when to reconnect, when to give up (sans-IO).
//! - `netlink_io`, `run`: the blocking edge that carries them out.

pub mod agent;
pub mod genl;
pub mod handshake;
pub mod nbd_genl;
mod netlink_io;
pub mod run;

#[cfg(test)]
mod tests;
