//! The peer session: everything that lives exactly as long as one session with
//! the peer (from the Hello exchange on its connection to its end), owned here
//! so that starting and ending a session is one reset (`PeerSession::new`), not
//! a field-by-field reset in several places. What the peer owes us in the
//! session (writes and flushes it has not answered, reads sent to it) is in
//! `peer_owed.rs`, taken whole in the same place (`replication.rs`
//! `end_session_state`) and settled by its callers.

use std::collections::BTreeSet;

use super::types::*;

/// What the peer told us about itself.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub role: Role,
    pub disk: DiskState,
    pub hello: crate::peer::Hello,
}

/// Between the peer's Hello and the sync decision.
#[derive(Debug, Default)]
pub struct Handshake {
    pub peer_words: Vec<u64>,
    pub bitmap_done: bool,
}

#[derive(Debug)]
pub struct PeerFlush {
    pub id: u64,
    pub waiting: BTreeSet<u64>,
}

/// The state of one peer session (see the module comment).
#[derive(Debug)]
pub struct PeerSession {
    pub peer: Option<PeerView>,
    pub handshake: Option<Handshake>,
    /// A finished resync's SyncDone waits for our superblock (bitmap identifier
    /// cleared) to be durable.
    pub sync_done_wait: bool,
    pub seq: u64,
    pub peer_seen: u64,
    pub peer_flushes: Vec<PeerFlush>,
    /// When the session last received anything from the peer.
    pub last_heard_ms: u64,
    /// When the peer last completed something we asked of it (an ack, a reply),
    /// or when we last had nothing pending there: the ko-count clock.
    pub last_progress_ms: u64,
    pub last_ping_ms: u64,
    pub ping_outstanding: Option<u64>,
    /// Pings sent and PingAcks received on this link (the peer answers in order).
    pub pings_sent: u64,
    pub pings_acked: u64,
    /// Promoted while connected: I/O waits until the peer answered a ping sent
    /// after our new role (then it knows we are primary), or the link goes.
    pub promote_confirm: Option<u64>,
}

impl PeerSession {
    /// A session that starts (or the lack of one) at `now_ms`: no peer view, no
    /// handshake, no sequence numbers, pings or flushes yet.
    pub fn new(now_ms: u64) -> PeerSession {
        let s = PeerSession {
            peer: None,
            handshake: None,
            sync_done_wait: false,
            seq: 0,
            peer_seen: 0,
            peer_flushes: Vec::new(),
            last_heard_ms: now_ms,
            last_progress_ms: now_ms,
            last_ping_ms: now_ms,
            ping_outstanding: None,
            pings_sent: 0,
            pings_acked: 0,
            promote_confirm: None,
        };
        debug_assert!(s.is_fresh());
        s
    }

    /// Nothing of a session is left.
    pub fn is_fresh(&self) -> bool {
        self.peer.is_none()
            && self.handshake.is_none()
            && !self.sync_done_wait
            && self.seq == 0
            && self.peer_seen == 0
            && self.peer_flushes.is_empty()
            && self.ping_outstanding.is_none()
            && self.pings_sent == 0
            && self.pings_acked == 0
            && self.promote_confirm.is_none()
    }
}
