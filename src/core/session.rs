//! The peer session's lifecycle on the node: connections offered and closed,
//! the Hello exchange, dialing, and the handshake deadlines. Which connection
//! carries the session is decided here and nowhere else (see `links.rs`).

use serde_json::json;

use super::links::{Announced, Phase, HANDSHAKE_TIMEOUT_MS, HELLO_TIMEOUT_MS, MAX_CONNS};
use super::node::Node;
use super::types::*;
use crate::peer::{Hello, Message};

impl Node {
    /// The connection the peer session runs on, if one does.
    pub fn session_link(&self) -> Option<LinkId> {
        self.links.session()
    }

    /// Whether the session waits for the sync decision (the bitmap exchange).
    pub fn in_handshake(&self) -> bool {
        self.session.handshake.is_some()
    }

    /// Connections offered to this core since it started.
    pub fn links_offered(&self) -> u64 {
        self.links.offered_total
    }

    /// Whether this node may take a new peer connection now.
    fn link_allowed(&self) -> bool {
        self.cfg.peer.is_some() && self.want_connect && self.boot_flushed && !self.stopping
    }

    fn announce_now(&self) -> Announced {
        Announced {
            gis: self.meta.gis,
            disk: self.disk,
            role: self.role,
            crashed_primary: self.crashed_primary,
            peer_may_lack: self.peer_may_lack(),
        }
    }

    /// Sends our Hello on `link`; returns what it announced.
    fn send_hello(&mut self, link: LinkId) -> Announced {
        let a = self.announce_now();
        let msg = Message::Hello(self.hello_now());
        self.out.push(Action::Send { link, msg });
        a
    }

    /// Closes `link` (not the session's: that goes through `drop_peer`).
    pub(super) fn close_conn(&mut self, link: LinkId, reason: &str) {
        assert_ne!(
            self.links.session(),
            Some(link),
            "the session ends in drop_peer"
        );
        if self.links.close(link) {
            self.out.push(Action::CloseConn {
                link,
                reason: reason.to_string(),
            });
        }
    }

    fn close_pending_except(&mut self, keep: Option<LinkId>, reason: &str) {
        let others: Vec<LinkId> = self
            .links
            .pending()
            .map(|(id, _)| id)
            .filter(|id| Some(*id) != keep)
            .collect();
        for id in others {
            self.close_conn(id, reason);
        }
    }

    pub(super) fn on_conn_offered(&mut self, link: LinkId, dialed: bool) {
        self.links.offer(link, dialed, self.now_ms);
        if !self.link_allowed() {
            self.close_conn(link, "not connecting to the peer now");
            return;
        }
        if self.links.len() > MAX_CONNS {
            self.close_conn(link, "too many peer connections at once");
            return;
        }
        if !self.local_wins() {
            // The follower waits for the leader's Hello on one of its connections.
            return;
        }
        if self.links.session().is_some() {
            // A half-open session (the peer restarted) ends by its ping timeout or
            // the reset our next message draws; until then new ones wait.
            self.close_conn(link, "a peer session runs already");
            return;
        }
        if self.links.candidate().is_some() {
            self.close_conn(link, "another connection is in its Hello exchange");
            return;
        }
        let a = self.send_hello(link);
        self.links.hello_sent(link, a, self.now_ms);
        debug_assert_eq!(self.links.candidate(), Some(link));
    }

    /// A message on `link`: the session's go to the replication logic; on a
    /// connection still in the Hello exchange only a Hello is allowed.
    pub(super) fn on_link_msg(&mut self, link: LinkId, msg: Message) {
        let phase = match self.links.get(link) {
            Some(c) => c.phase,
            None => unreachable!("a message on connection {link}, which was never offered"),
        };
        match phase {
            // Already in flight when the core closed it.
            Phase::Closing => {}
            Phase::Session(_) => self.on_peer_msg(msg),
            Phase::Offered | Phase::HelloSent(_) => match msg {
                Message::Hello(h) => self.on_hello(link, phase, h),
                other => self.close_conn(
                    link,
                    &format!("protocol error: {} before the Hello exchange", other.kind()),
                ),
            },
        }
    }

    fn on_hello(&mut self, link: LinkId, phase: Phase, hello: Hello) {
        let announced = if self.local_wins() {
            let Phase::HelloSent(a) = phase else {
                self.close_conn(link, "protocol error: the peer sent its Hello first");
                return;
            };
            a
        } else {
            debug_assert_eq!(phase, Phase::Offered);
            if !self.link_allowed() {
                self.close_conn(link, "not connecting to the peer now");
                return;
            }
            if self.links.session().is_some() {
                if self.faults.hello_keeps_old_session {
                    // Fault injection (simulator only): answer, keep the old session.
                    self.send_hello(link);
                    return;
                }
                // The leader picked a new connection: ours is stale on its side.
                self.drop_peer("the peer started a new connection", true);
            }
            self.send_hello(link)
        };
        self.links.establish(link, announced, self.now_ms);
        let raced = self.links.pending().count();
        self.close_pending_except(Some(link), "another connection carries the peer session");
        let dialed = self.links.get(link).is_some_and(|c| c.dialed);
        self.notify(
            "peer-session",
            json!({ "link": link, "dialed": dialed, "other_connections_closed": raced }),
        );
        self.on_peer_up(hello);
        debug_assert!(self.links.pending().next().is_none() || self.links.session().is_none());
    }

    pub(super) fn on_conn_down(&mut self, link: LinkId, reason: &str) {
        let c = self.links.down(link);
        if let Phase::Session(_) = c.phase {
            self.on_link_lost(reason);
        }
        debug_assert_ne!(self.links.session(), Some(link));
        self.maybe_dial();
    }

    /// Ends the peer session (Bye, then its connection closes) and, without
    /// `reconnect`, stays standalone until `connect`.
    pub(super) fn drop_peer(&mut self, reason: &str, reconnect: bool) {
        if !reconnect {
            self.want_connect = false;
        }
        if let Some(link) = self.links.session() {
            self.send(Message::Bye {
                reason: reason.to_string(),
            });
            self.links.close(link);
            self.out.push(Action::CloseConn {
                link,
                reason: reason.to_string(),
            });
        }
        if !self.want_connect {
            self.close_pending_except(None, reason);
        }
        self.on_peer_down(reason);
        debug_assert!(self.links.session().is_none());
    }

    /// The session's connection is closed because the peer fell silent: a
    /// pause (grace.rs) or the end of the session, as if the link went down.
    pub(super) fn lose_link(&mut self, reason: &str) {
        if let Some(link) = self.links.session() {
            self.links.close(link);
            self.out.push(Action::CloseConn {
                link,
                reason: reason.to_string(),
            });
        }
        self.on_link_lost(reason);
        debug_assert!(self.links.session().is_none());
    }

    /// Asks for a dial when the node wants a link and has no connection.
    pub(super) fn maybe_dial(&mut self) {
        if self.link_allowed() && self.links.want_dial(self.now_ms, self.cfg.connect_retry_ms) {
            self.out.push(Action::Dial);
        }
    }

    /// Deadlines of the Hello exchange and of the handshake, then a dial if due.
    pub(super) fn link_tick(&mut self) {
        let now = self.now_ms;
        let late: Vec<LinkId> = self
            .links
            .pending()
            .filter(|(_, c)| now.saturating_sub(c.since_ms) > HELLO_TIMEOUT_MS)
            .map(|(id, _)| id)
            .collect();
        for id in late {
            self.close_conn(
                id,
                &format!("no Hello exchange within {HELLO_TIMEOUT_MS} ms"),
            );
        }
        if let Some(link) = self.links.session() {
            let since = self.links.get(link).map(|c| c.since_ms).unwrap_or(now);
            if self.session.handshake.is_some() && now.saturating_sub(since) > HANDSHAKE_TIMEOUT_MS
            {
                self.notify(
                    "handshake-timeout",
                    json!({ "after_ms": now.saturating_sub(since) }),
                );
                self.drop_peer(
                    &format!(
                        "the connection handshake did not finish within {HANDSHAKE_TIMEOUT_MS} ms"
                    ),
                    true,
                );
            }
        }
        self.maybe_dial();
    }

    /// Whether our state still matches the Hello the peer decides from.
    pub(super) fn announced_still_true(&self) -> bool {
        self.links
            .session_announced()
            .is_none_or(|a| a == self.announce_now())
    }
}
