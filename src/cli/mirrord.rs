//! `mirrord [RESOURCE] [--config FILE] [--node NAME] [--log-level FILTER]`.

use clap::Parser;

use super::{ConfigArgs, Resource};

/// Serve one replicated resource over NBD and mirror it to its peer.
///
/// mirrord runs one resource in the foreground: it serves the NBD export, keeps the peer
/// link to the other node, and answers mirrorctl on the control socket
/// ({run-dir}/{resource}.ctl). Logs go to stderr, one event a line. Exit status: 0 after
/// SIGTERM, 1 when running failed, 2 for bad usage or a bad config.
#[derive(Parser, Debug)]
#[command(name = "mirrord", version)]
pub struct Args {
    #[command(flatten)]
    pub target: Resource,
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Log filter, e.g. "info" or "nbd_mirror=debug" (default: $RUST_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}
