//! `mirrorctl [--config FILE] [--node NAME] COMMAND [RESOURCE]`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueHint};

use super::{ConfigArgs, Resource};

/// Control an nbd-mirror resource.
///
/// mirrorctl talks to the running mirrord of a resource over its control socket
/// ({run-dir}/{resource}.ctl). The resource is named as drbdadm names it
/// (`mirrorctl status r0` reads /etc/nbd-mirror/r0.toml; $MIRROR_CONF_DIR overrides the
/// directory), or its config file is given with --config. create-md, dump-md,
/// check-config and gen-secret work without a daemon. Exit status: 0 success, 1 the
/// operation failed, 2 bad usage or a bad config, 3 the daemon is not reachable.
#[derive(Parser, Debug)]
#[command(name = "mirrorctl", version)]
pub struct Args {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write fresh metadata on this node's disk (all blocks out of sync).
    CreateMd {
        #[command(flatten)]
        res: Resource,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
    },
    /// Print the metadata as JSON.
    DumpMd {
        #[command(flatten)]
        res: Resource,
        /// List every out-of-sync range (default: the first 16).
        #[arg(long)]
        all_ranges: bool,
    },
    /// Validate the config and print the resolved settings for this node.
    CheckConfig {
        #[command(flatten)]
        res: Resource,
    },
    /// Write a new random shared secret (mode 0600); never overwrites one.
    ///
    /// With --config and one argument, the argument is the PATH.
    GenSecret {
        /// The resource (as for the other commands).
        #[arg(value_name = "RESOURCE", value_hint = ValueHint::Other)]
        resource: Option<String>,
        /// Where to write it (default: the config's shared-secret-file; with a path the
        /// config is not read).
        #[arg(value_name = "PATH", value_hint = ValueHint::FilePath)]
        path: Option<PathBuf>,
    },
    /// Show the resource's state.
    Status {
        #[command(flatten)]
        res: Resource,
        /// Print the state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream state changes as JSON lines until interrupted.
    Events {
        #[command(flatten)]
        res: Resource,
    },
    /// Become primary.
    Primary {
        #[command(flatten)]
        res: Resource,
        /// Promote even with an inconsistent or outdated disk; this node's data wins.
        #[arg(long)]
        force: bool,
    },
    /// Become secondary.
    Secondary {
        #[command(flatten)]
        res: Resource,
    },
    /// Start the peer link.
    Connect {
        #[command(flatten)]
        res: Resource,
        /// Resolve a split brain by discarding this node's changes.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Stop the peer link.
    Disconnect {
        #[command(flatten)]
        res: Resource,
    },
    /// Start a resync with this node as the source.
    Resync {
        #[command(flatten)]
        res: Resource,
        /// Resync every block, not only the out-of-sync ones.
        #[arg(long)]
        full: bool,
        /// Compare block checksums first; send only the blocks that differ.
        #[arg(long)]
        checksum: bool,
        /// Show progress until the resync ends.
        #[arg(long)]
        wait: bool,
    },
    /// Online verify: compare every block with the peer.
    Verify {
        #[command(flatten)]
        res: Resource,
        /// Show progress until the verify ends.
        #[arg(long)]
        wait: bool,
    },
    /// Discard this node's data and resync all of it from the peer.
    Invalidate {
        #[command(flatten)]
        res: Resource,
    },
    /// Lift a fencing freeze by hand (the fence-peer handler failed or hangs).
    ResumeIo {
        #[command(flatten)]
        res: Resource,
    },
    /// Restart mirrord in place, keeping its NBD clients connected.
    ///
    /// mirrord answers every request it has read, persists its metadata and re-executes
    /// itself (or --exe, for an upgrade) with the sockets and the disk lock inherited.
    /// Returns once the new process answers.
    Restart {
        #[command(flatten)]
        res: Resource,
        /// The binary to run (default: the path mirrord was started from, so an upgrade
        /// installed there is picked up).
        #[arg(long, value_name = "PATH", value_hint = ValueHint::ExecutablePath)]
        exe: Option<PathBuf>,
        /// Give up waiting for the new process after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 180)]
        timeout: u64,
    },
    /// Apply a changed config file to the running daemon, without a restart.
    ///
    /// mirrord rereads the file it was started with. Net timeouts, the sync rate and
    /// checksum, the split-brain policies, the handlers and the metrics address are
    /// applied at once; when any
    /// other key changed (disks, addresses, node or resource names, the protocol, ...)
    /// nothing is changed and the answer names the keys that need a restart (exit 1).
    Adjust {
        #[command(flatten)]
        res: Resource,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Attach /dev/nbdN to the resource's export through the kernel's netlink interface.
    ///
    /// Long-running: keeps the device attached. After a crash or a failed hand-over of
    /// mirrord it makes fresh connections and hands them to the kernel. SIGTERM
    /// disconnects the device. The RESOURCE must be named (with --config, it must be the
    /// config's resource).
    Attach {
        /// The resource's name.
        #[arg(value_name = "RESOURCE", value_hint = ValueHint::Other)]
        resource: String,
        /// The NBD device, e.g. /dev/nbd0.
        #[arg(value_name = "DEVICE", value_hint = ValueHint::FilePath)]
        device: PathBuf,
        /// Connections (-C of nbd-client); mirrord is multi-connection safe.
        #[arg(long, value_name = "N", default_value_t = 4)]
        connections: usize,
        /// Kernel request timeout: a request without a reply by then is sent again on
        /// another connection. It bounds the pause after a crash (docs/OPERATIONS.md).
        #[arg(long, value_name = "SECONDS", default_value_t = 15)]
        timeout: u64,
        /// Seconds new requests wait while no connection is live; then they fail.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        dead_conn_timeout: u64,
        /// Logical block size in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 4096)]
        block_size: u32,
        /// Seconds the first attach waits for mirrord's export.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        start_timeout: u64,
    },
    /// Wait until connected and both disks are up to date.
    WaitSync {
        #[command(flatten)]
        res: Resource,
        /// Give up after this many seconds and exit 1 (0: wait for ever).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        timeout: u64,
    },
}

impl Cmd {
    /// The RESOURCE named on the command line, if any.
    pub fn resource(&self) -> Option<&str> {
        let res = match self {
            Cmd::GenSecret { resource, .. } => return resource.as_deref(),
            Cmd::Attach { resource, .. } => return Some(resource),
            Cmd::CreateMd { res, .. }
            | Cmd::DumpMd { res, .. }
            | Cmd::CheckConfig { res }
            | Cmd::Status { res, .. }
            | Cmd::Events { res }
            | Cmd::Primary { res, .. }
            | Cmd::Secondary { res }
            | Cmd::Connect { res, .. }
            | Cmd::Disconnect { res }
            | Cmd::Resync { res, .. }
            | Cmd::Verify { res, .. }
            | Cmd::Invalidate { res }
            | Cmd::ResumeIo { res }
            | Cmd::Restart { res, .. }
            | Cmd::Adjust { res, .. }
            | Cmd::WaitSync { res, .. } => res,
        };
        res.resource.as_deref()
    }
}
