//! Types at the boundary of the node core.

use bytes::Bytes;
use serde::Serialize;

use crate::peer::{Gis, Message};

/// An NBD connection, as numbered by the daemon.
pub type ConnId = u64;

/// An authenticated peer connection, as numbered by the daemon (never reused).
pub type LinkId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    UpToDate,
    Inconsistent,
    Outdated,
    Failed,
    Diskless,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnState {
    Standalone,
    Connecting,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replication {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    VerifySource,
    VerifyTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    A,
    B,
    C,
}

/// What the core needs to know about its resource; built by the daemon from config.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub resource: String,
    pub node: String,
    /// The peer's name, if the resource has two nodes.
    pub peer: Option<String>,
    pub data_size: u64,
    pub protocol: Protocol,
    pub allow_two_primaries: bool,
    pub auto_promote: bool,
    pub al_slots: usize,
    /// Bits of the out-of-sync bitmap per persisted metadata page.
    pub bitmap_bits_per_page: u64,
    /// The resync's pace: adaptive (the default) or a fixed cap (resync_rate.rs).
    pub sync_rate: super::resync_rate::SyncRate,
    pub sync_checksum: bool,
    pub split_brain: crate::config::SplitBrain,
    pub fencing: crate::config::Fencing,
    pub ping_interval_ms: u64,
    /// Pause between dials while no connection is up or in progress.
    pub connect_retry_ms: u64,
    /// How long a broken link between two primaries is a pause (grace.rs); 0: never.
    pub reconnect_grace_ms: u64,
    pub ping_timeout_ms: u64,
    pub timeout_ms: u64,
    pub ko_count: u64,
    /// Largest I/O the NBD side accepts (bytes).
    pub max_io: u32,
    /// How long a TRIM carried out in pieces may run before it starts no
    /// further piece (core/split.rs); [`TRIM_BUDGET_MS`] unless a test sets it.
    pub trim_budget_ms: u64,
    /// Most activity-log extents one piece of a split write spans
    /// ([`MAX_PIECE_EXTENTS`], 64 MiB, unless a test sets fewer).
    pub max_piece_extents: u64,
}

/// The default [`CoreConfig::trim_budget_ms`]: 5 s. The kernel client's request
/// timeout is 15 s with `mirrorctl attach --timeout 15` (90 s with stock
/// nbd-client), and a request it times out is sent again on another connection
/// (with nbd-client 3.24 that connection is gone for good). 5 s leaves the
/// pieces still in flight when the budget runs out (at most two of 64 MiB, on a
/// slow disk some seconds more) and the reply's way back inside those 15 s.
pub const TRIM_BUDGET_MS: u64 = 5_000;

/// Persisted metadata flags (the storage layer stores them as a u32).
pub mod md_flags {
    pub const CONSISTENT: u32 = 1 << 0;
    pub const WAS_UP_TO_DATE: u32 = 1 << 1;
    pub const PRIMARY: u32 = 1 << 2;
    pub const PEER_OUTDATED: u32 = 1 << 3;
    pub const SYNC_TARGET: u32 = 1 << 4;
    pub const FULL_SYNC_NEEDED: u32 = 1 << 5;
    /// The bitmap marks writes the peer acknowledged but had not flushed when
    /// the link was lost: the peer may have lost them (docs/SYNC-DECISION.md).
    pub const PEER_MAY_LACK: u32 = 1 << 6;
}

/// The metadata the core starts from and asks the daemon to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaState {
    pub gis: Gis,
    pub flags: u32,
    pub resync_offset: u64,
}

/// An NBD-level request, already validated against the export by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoRequest {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    /// `fua`: the reply waits for the data to be durable on every up-to-date disk
    /// (the core follows the operation with a flush of its own; a trim has no FUA bit).
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    },
}

/// A disk operation for the daemon's disk engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
}

/// What to persist. The daemon writes these in the order given, durably, then
/// reports [`Event::MetaDone`] with the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaWrite {
    Superblock(MetaState),
    ActivityLog(Vec<u32>),
    /// Bitmap pages, with a snapshot of the whole bitmap to take them from.
    BitmapPages {
        pages: Vec<usize>,
        words: std::sync::Arc<Vec<u64>>,
    },
}

/// Operator commands (from the control socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCmd {
    Primary {
        force: bool,
    },
    Secondary,
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    Resync {
        full: bool,
        checksum: bool,
    },
    Verify,
    Invalidate,
    /// Lift a fencing freeze by hand (DRBD's resume-io).
    ResumeIo,
}

/// NBD errno values the core answers with (the daemon passes them through).
pub mod errno {
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ESHUTDOWN: u32 = 108;
    pub const EPERM: u32 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An NBD request from connection `conn` with the client's `cookie`.
    Request {
        conn: ConnId,
        cookie: u64,
        req: IoRequest,
    },
    DiskDone {
        id: u64,
        result: Result<Option<Bytes>, u32>,
    },
    MetaDone {
        id: u64,
        ok: bool,
    },
    /// A peer connection is authenticated (`dialed`: this node dialed it). Every
    /// connection offered ends with exactly one [`Event::ConnDown`].
    ConnOffered {
        link: LinkId,
        dialed: bool,
    },
    /// A message that arrived on connection `link`, in the order it arrived.
    PeerMsg {
        link: LinkId,
        msg: Message,
    },
    /// Connection `link` is closed: it broke, the peer closed it, or the core
    /// asked for it ([`Action::CloseConn`]). Nothing more arrives on it.
    ConnDown {
        link: LinkId,
        reason: String,
    },
    /// Time passes (milliseconds on a monotonic clock).
    Tick {
        now_ms: u64,
    },
    Admin {
        id: u64,
        cmd: AdminCmd,
    },
    /// The fence-peer handler of [`Action::FencePeer`] `id` ended: its exit
    /// code, or None if it could not run or died of a signal.
    FenceDone {
        id: u64,
        exit: Option<i32>,
    },
    /// An NBD client asks for the export (its handshake's export lookup, or a
    /// connection a previous process handed over). Answered with
    /// [`Action::Attached`].
    ClientAttach {
        conn: ConnId,
    },
    /// The NBD connection is gone and all its requests have been answered.
    ClientDetach {
        conn: ConnId,
    },
    /// The client of NBD connection `conn` has shut down its sending side (the
    /// edge saw POLLRDHUP before handing over the requests it read since): every
    /// request of `conn` that arrives after this is stale and is dropped
    /// (docs/CONFLICTS.md, "A request that arrives twice").
    ClientShut {
        conn: ConnId,
    },
    /// A plain WRITE (no FUA) whose payload the edge could move from the socket to
    /// the disk itself (splice) instead of reading it into memory. Answered with
    /// [`Action::StreamWrite`].
    StreamWrite {
        conn: ConnId,
        cookie: u64,
        offset: u64,
        len: u32,
    },
    /// A clean stop begins (SIGTERM): writes frozen by fencing fail, a pause ends.
    StopBegin,
    /// The clean stop's last step, once no request is left: `data_flushed` is the
    /// result of the edge's flush of the backing disk after the last write.
    StopFinal {
        data_flushed: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Disk {
        id: u64,
        op: DiskOp,
    },
    Reply {
        conn: ConnId,
        cookie: u64,
        result: Result<Option<Bytes>, u32>,
    },
    /// Send `msg` on connection `link` (dropped if it is closed by now).
    Send {
        link: LinkId,
        msg: Message,
    },
    Persist {
        id: u64,
        write: MetaWrite,
    },
    /// Dial the peer once; a connection that results is offered with
    /// [`Event::ConnOffered`] (`dialed: true`). A failed dial is not reported:
    /// the core asks again after its retry interval.
    Dial,
    /// Send what is queued on `link`, then close it; [`Event::ConnDown`] follows.
    CloseConn {
        link: LinkId,
        reason: String,
    },
    AdminReply {
        id: u64,
        result: Result<String, String>,
    },
    /// A state change for `mirrorctl events` and the log.
    Notify(serde_json::Value),
    /// Run the split-brain handler (fire and forget).
    SplitBrainHandler,
    /// Run the fence-peer handler and report its exit with [`Event::FenceDone`].
    FencePeer {
        id: u64,
    },
    /// The answer to [`Event::ClientAttach`]: Ok if this node serves I/O (it
    /// may have auto-promoted), else the reason it does not.
    Attached {
        conn: ConnId,
        result: Result<(), String>,
    },
    /// The answer to [`Event::StreamWrite`]: `Some(id)`: admitted, the edge writes
    /// the payload to the disk itself and reports [`Event::DiskDone`] for `id`
    /// (the reply follows as for any write); None: nothing was done, the edge
    /// reads the payload and sends an ordinary [`Event::Request`].
    StreamWrite {
        conn: ConnId,
        cookie: u64,
        disk_id: Option<u64>,
    },
}

/// What BLOCK_STATUS may tell a client about the disk ([`crate::core::Node::block_status_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatusView {
    /// The local disk is up to date: its holes and zeroes are the device's.
    Disk,
    /// Not up to date: report every block as allocated data, claim nothing.
    AllData,
}

/// A snapshot for `mirrorctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub size_bytes: u64,
    pub out_of_sync_bytes: u64,
    pub nbd_clients: usize,
    pub peer: Option<PeerStatus>,
    pub resync: Option<ResyncStatus>,
    /// Cumulative resync counters (an extension of the documented schema).
    pub sync: SyncCounters,
    pub split_brain: bool,
    pub suspended: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub connection: ConnState,
    pub replication: Replication,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    /// Writes sent to the peer that it has not acknowledged yet (mirrored and resync
    /// writes); read-only, for metrics and `status --json`.
    pub writes_in_flight: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: u64,
    pub verify: bool,
    pub differing_blocks: u64,
    /// On the sync source: what sets the resync's pace now (resync_rate.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pace: Option<ResyncPace>,
}

/// The sync source's pace controller as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncPace {
    /// `adaptive` or `fixed` (`[sync] rate`).
    pub mode: &'static str,
    /// Resync requests (up to 1 MiB each) allowed in flight now.
    pub inflight_limit: usize,
    /// Adaptive: the rate kept while applications write, once known.
    pub floor_bytes_per_sec: Option<u64>,
    /// Adaptive: the rate the resync is held to below one request in flight
    /// while applications write; null when not held.
    pub hold_bytes_per_sec: Option<u64>,
}

/// Resync and verify counters since the daemon started: what a resync
/// actually moved over the link (status `"sync"`, docs/INTERFACE.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncCounters {
    /// Resync data sent to the peer as sync source.
    pub bytes_sent: u64,
    pub blocks_sent: u64,
    /// Resync data received from the peer as sync target.
    pub bytes_received: u64,
    pub blocks_received: u64,
    /// Blocks a checksum resync found equal on both sides and did not send.
    pub blocks_equal: u64,
    /// Resyncs started and finished on this node (as source or target).
    pub resyncs_started: u64,
    pub resyncs_finished: u64,
    /// Differing blocks found by the last completed online verify.
    pub last_verify_differing_blocks: Option<u64>,
}

/// TRIMs that ran out of their time budget (core/split.rs) since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimBudgetStats {
    /// Requests answered with part of their range skipped.
    pub trims_cut_short: u64,
    /// Bytes of those requests never discarded (on neither disk).
    pub bytes_skipped: u64,
}

/// Deliberate bugs for the deterministic simulator (`src/sim`) to prove that
/// its invariants catch real mistakes. All false by default; the daemon never
/// sets them (only `Node::inject_faults` does, called by the simulator's
/// fault tests). Kept in the normal build rather than behind a cargo feature so
/// that the code the simulator tests is the code the daemon runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Protocol C: reply to a write when the local disk is done, without
    /// waiting for the peer's WriteAck.
    pub ack_before_peer: bool,
    /// Resync source: clear a block's out-of-sync bit as soon as its resync
    /// data is queued to the peer, before the target has written it.
    pub clear_resync_bit_early: bool,
    /// Sync decision: for a bitmap-based resync between diverged generations,
    /// pick the wrong sync source.
    pub wrong_sync_direction: bool,
    /// Connection race: the follower answers the leader's Hello on a new
    /// connection but keeps running its session on the old one.
    pub hello_keeps_old_session: bool,
    /// A failed metadata write marks the disk inconsistent (the rule before
    /// the simulator ran with metadata failures): a node holding the only copy
    /// of acknowledged writes then takes a full sync from an older peer.
    pub meta_failure_discards_data: bool,
    /// Split-brain resolution: both sides keep the policy's loser as the sync
    /// source (the decision stays symmetric, so only a check of the winner
    /// against the policy finds it).
    pub sb_loser_wins: bool,
}
