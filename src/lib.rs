//! nbd-mirror: a userspace, DRBD-style replicated block device served over NBD.
//!
//! Layers, top to bottom (a layer imports only layers below it):
//! - `daemon`: the tokio edge (NBD listener, peer link, control socket, signals).
//! - `core`: the sans-IO replication state machine.
//! - `nbd`, `peer`: sans-IO codecs.
//! - `storage`: disk engine and on-disk metadata.
//! - `config`: TOML to typed, validated settings.
//!
//! `cli` holds the command lines of the binaries (clap definitions only).

pub mod attach;
pub mod cli;
pub mod config;
pub mod core;
pub mod ctl;
pub mod daemon;
pub mod nbd;
pub mod peer;
pub mod sim;
pub mod storage;
