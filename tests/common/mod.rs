//! Shared harness for the integration tests: temp dirs, configs, backing
//! files and server processes ([`cluster`]), bounded external commands
//! ([`process`]), a raw NBD client for malformed input ([`nbd_wire`]) and
//! deterministic data ([`pattern`]).
//!
//! Each test binary uses only part of it, hence the allowances below.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod config_toml;
pub mod daemon;
pub mod fake_systemd;
pub mod link_proxy;
pub mod nbd_wire;
pub mod netns;
pub mod pair;
pub mod pattern;
pub mod process;

pub use cluster::{Cluster, ClusterSpec, ServerKind, EXPORT, MIB};
pub use config_toml::NbdAddr;
pub use process::{client_script, python3, require_tool, run, run_ok, CmdOutput};

use std::process::Command;
use std::time::Duration;

/// Runs a python client script from `tests/clients/` with Debian's python3.
pub fn run_client(script: &str, args: &[&str], timeout: Duration) -> CmdOutput {
    let mut cmd = Command::new(python3());
    cmd.arg(client_script(script)).args(args);
    run(&mut cmd, timeout)
}
