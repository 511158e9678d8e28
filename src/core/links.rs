//! The peer connections the core knows, and which one carries the peer session.
//!
//! The daemon (or the simulator) dials and accepts, authenticates, and reports
//! each authenticated connection with [`Event::ConnOffered`]; from then on every
//! message that arrives on it is tagged with its id, and it ends with exactly
//! one [`Event::ConnDown`]. Everything else is decided here, once:
//!
//! - The node whose name sorts first (the *leader*) picks the connection: it
//!   sends its Hello on one connection at a time, and only while it has no
//!   session and no other connection in the Hello exchange. Every other
//!   connection is closed. (A session that is half-open because the peer
//!   restarted ends by the ping timeout, or by the reset the next ping draws.)
//! - The other node (the *follower*) never sends a Hello first. The connection
//!   on which the leader's Hello arrives becomes the session, and it answers
//!   there; every other connection is closed.
//!
//! So both sides always run their one handshake on the same connection, each
//! with the Hello it sent on that connection: two connections that complete at
//! once can never both start a handshake, and a second connection can never
//! undo the sync decision of the first.
//!
//! [`Event::ConnOffered`]: super::Event::ConnOffered
//! [`Event::ConnDown`]: super::Event::ConnDown

use std::collections::BTreeMap;

use super::types::{DiskState, LinkId, Role};
use crate::peer::Gis;

/// How long a connection may wait for the Hello exchange before it is closed.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// How long an established session may take from the Hellos to the sync
/// decision (the bitmap exchange) before it is dropped and redialed.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;
/// Most connections known at once (offered, in handshake or closing); more
/// are closed on arrival. A legitimate peer needs two (both dial at once),
/// plus the ones still closing.
pub const MAX_CONNS: usize = 8;

/// What our Hello on a connection told the peer: the basis of its sync decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    pub gis: Gis,
    pub disk: DiskState,
    pub role: Role,
    pub crashed_primary: bool,
    pub peer_may_lack: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Authenticated; no Hello sent or received on it yet.
    Offered,
    /// The leader sent its Hello here and waits for the follower's.
    HelloSent(Announced),
    /// The peer session runs here; our Hello on it said this.
    Session(Announced),
    /// The core closed it; its `ConnDown` has not arrived yet.
    Closing,
}

#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub dialed: bool,
    pub since_ms: u64,
    pub phase: Phase,
}

#[derive(Debug, Default)]
pub struct Links {
    conns: BTreeMap<LinkId, Conn>,
    session: Option<LinkId>,
    /// A dial was asked for at this time and no connection has come of it yet.
    dial_at_ms: Option<u64>,
    /// Connections offered over this node's life, for the simulator's statistics.
    pub offered_total: u64,
}

impl Links {
    fn check(&self) {
        let sessions: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Session(_)))
            .map(|(id, _)| *id)
            .collect();
        assert!(
            sessions.len() <= 1,
            "two peer sessions at once: {sessions:?}"
        );
        assert_eq!(sessions.first().copied(), self.session);
        let candidates = self
            .conns
            .values()
            .filter(|c| matches!(c.phase, Phase::HelloSent(_)))
            .count();
        assert!(
            candidates <= 1,
            "the leader sent its Hello on two connections"
        );
        assert!(
            candidates == 0 || self.session.is_none(),
            "a Hello sent while a session runs"
        );
    }

    pub fn get(&self, link: LinkId) -> Option<&Conn> {
        self.conns.get(&link)
    }

    /// The connection the peer session runs on.
    pub fn session(&self) -> Option<LinkId> {
        self.session
    }

    /// What our Hello on the session's connection announced.
    pub fn session_announced(&self) -> Option<Announced> {
        let id = self.session?;
        match self.conns.get(&id).map(|c| c.phase) {
            Some(Phase::Session(a)) => Some(a),
            other => unreachable!("session {id} in phase {other:?}"),
        }
    }

    /// The leader's connection in the Hello exchange, if any.
    pub fn candidate(&self) -> Option<LinkId> {
        self.conns
            .iter()
            .find(|(_, c)| matches!(c.phase, Phase::HelloSent(_)))
            .map(|(id, _)| *id)
    }

    /// Connections that are neither closing nor the session.
    pub fn pending(&self) -> impl Iterator<Item = (LinkId, &Conn)> {
        self.conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Offered | Phase::HelloSent(_)))
            .map(|(id, c)| (*id, c))
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// A new authenticated connection.
    pub fn offer(&mut self, link: LinkId, dialed: bool, now_ms: u64) {
        self.check();
        assert!(
            !self.conns.contains_key(&link),
            "connection {link} offered twice"
        );
        self.conns.insert(
            link,
            Conn {
                dialed,
                since_ms: now_ms,
                phase: Phase::Offered,
            },
        );
        self.offered_total += 1;
        self.check();
    }

    /// The leader sent its Hello on `link`.
    pub fn hello_sent(&mut self, link: LinkId, a: Announced, now_ms: u64) {
        self.check();
        let c = self
            .conns
            .get_mut(&link)
            .expect("hello on a known connection");
        assert_eq!(c.phase, Phase::Offered);
        c.phase = Phase::HelloSent(a);
        c.since_ms = now_ms;
        self.check();
    }

    /// The session starts on `link`, whose Hello said `a`.
    pub fn establish(&mut self, link: LinkId, a: Announced, now_ms: u64) {
        self.check();
        assert!(self.session.is_none(), "a second session");
        let c = self
            .conns
            .get_mut(&link)
            .expect("session on a known connection");
        assert!(matches!(c.phase, Phase::Offered | Phase::HelloSent(_)));
        c.phase = Phase::Session(a);
        c.since_ms = now_ms;
        self.session = Some(link);
        // When this session ends, the first dial goes out at once.
        self.dial_at_ms = None;
        self.check();
    }

    /// The core closes `link`; returns false if it was already closing. Ends the
    /// session if it ran there (the caller ends it in the node first).
    pub fn close(&mut self, link: LinkId) -> bool {
        self.check();
        let c = self
            .conns
            .get_mut(&link)
            .expect("closing a known connection");
        if c.phase == Phase::Closing {
            return false;
        }
        c.phase = Phase::Closing;
        if self.session == Some(link) {
            self.session = None;
        }
        self.check();
        true
    }

    /// The connection is gone; returns what it was.
    pub fn down(&mut self, link: LinkId) -> Conn {
        self.check();
        let c = self
            .conns
            .remove(&link)
            .expect("ConnDown for a connection the core was offered");
        if self.session == Some(link) {
            self.session = None;
        }
        self.check();
        c
    }

    /// The next dial may go out at once (an operator's `connect`).
    pub fn dial_now(&mut self) {
        self.dial_at_ms = None;
    }

    /// Whether to ask for a dial now: nothing in progress and the last dial is
    /// `retry_ms` old.
    pub fn want_dial(&mut self, now_ms: u64, retry_ms: u64) -> bool {
        if self.session.is_some() || self.pending().next().is_some() {
            return false;
        }
        match self.dial_at_ms {
            Some(t) if now_ms.saturating_sub(t) < retry_ms.max(1) => false,
            _ => {
                self.dial_at_ms = Some(now_ms);
                true
            }
        }
    }
}
