//! The kernel NBD client's resends (issue 19), in the seeds that have them
//! (`Scenario::resend_timeout_us`):
//!
//! - A request timeout: a write on a connection for longer than the timeout
//!   makes the client shut that connection down (replies on it are lost from
//!   then on) and send every write it has no reply for again on a new
//!   connection, while the first copy may still run in the node.
//! - A stalled reader: now and then a connection's requests wait unread (the
//!   daemon starved), often past the timeout; what its reader reads after the
//!   client shut the connection is stale, and the core must drop it (the
//!   daemon's reader tells it with `Event::ClientShut` before handing it over).
//! - After a crash, the client reconnects to the restarted node and sends the
//!   writes it had no reply for again; some of them twice, on two connections
//!   at once (the first stalls and times out).
//!
//! The copies of one write are separate writes in the model (each its own
//! data), issued when sent: the model accepts whichever landed last, until
//! the client's one reply (the first on a connection it had not shut) ends
//! them all; a write the client issues after that supersedes every copy, so a
//! stale copy that lands after it is a violation.

use super::cluster::{Client, Ev, ReqKind, Sim, Unread};
use super::model::Kind;
use crate::core::{errno, AdminCmd, ConnId, Event, IoRequest, Role};

/// What a write writes: enough to send it again.
#[derive(Debug, Clone, Copy)]
pub struct WriteSpec {
    pub first: u64,
    pub n: u64,
    pub kind: Kind,
    pub fua: bool,
    pub may_trim: bool,
}

/// The copies of one write sent more than once.
#[derive(Debug, Default)]
pub struct Group {
    /// Model write ids of its copies, in the order they were sent.
    pub ids: Vec<u32>,
    pub answered: bool,
}

impl Sim {
    fn resends_on(&self) -> Option<u64> {
        self.sc.resend_timeout_us
    }

    /// Request `conn`/`cookie` may wait unread: its connection's reader is
    /// stalled, or stalls now. True when it waits.
    pub fn maybe_unread(
        &mut self,
        n: usize,
        conn: ConnId,
        cookie: u64,
        req: &IoRequest,
        step: u64,
    ) -> bool {
        let Some(timeout) = self.resends_on() else {
            return false;
        };
        let c = self.nodes[n].clients.get(&conn).expect("the client sends");
        if !c.stalled && !c.shut && self.rng_work.chance(0.02) {
            let stall = self.rng_work.range(10_000, 3 * timeout);
            let inc = self.nodes[n].inc;
            self.world.after(stall, Ev::ConnRead { node: n, inc, conn });
            self.stats.stalls += 1;
            self.trace_line(Some(n), || {
                format!("client {conn}: its reader stalls for {stall} µs")
            });
            self.nodes[n]
                .clients
                .get_mut(&conn)
                .expect("client")
                .stalled = true;
        }
        let c = self.nodes[n].clients.get_mut(&conn).expect("client");
        if !c.stalled {
            return false;
        }
        c.unread.push_back(Unread {
            cookie,
            req: req.clone(),
            step,
        });
        true
    }

    /// The stalled reader of `conn` reads what waits in it.
    pub fn conn_read(&mut self, n: usize, conn: ConnId) {
        let Some(c) = self.nodes[n].clients.get_mut(&conn) else {
            return;
        };
        c.stalled = false;
        let unread = std::mem::take(&mut c.unread);
        self.trace_line(Some(n), || {
            format!("client {conn}: its reader reads {} requests", unread.len())
        });
        for u in unread {
            self.submit(n, conn, u.cookie, u.req, u.step);
        }
    }

    /// The reader rule, as the daemon's (nbd_conn/request.rs): before the first
    /// request read after the client shut the connection, the core is told.
    pub fn before_submit(&mut self, n: usize, conn: ConnId, cookie: u64) {
        let c = self.nodes[n]
            .clients
            .get_mut(&conn)
            .expect("the client sent it");
        if !c.shut {
            return;
        }
        c.stale.insert(cookie);
        self.stats.stale_dropped += 1;
        let tell = !c.told_shut && self.shut_rule;
        c.told_shut = true;
        if tell {
            self.trace_line(Some(n), || {
                format!("client {conn}: its reader sees the shutdown")
            });
            self.run_core(n, |core| core.handle(Event::ClientShut { conn }));
        }
    }

    /// A write of `conn` has waited longer than the client's request timeout.
    pub fn timed_out(&self, n: usize, conn: ConnId) -> bool {
        let Some(timeout) = self.resends_on() else {
            return false;
        };
        let now = self.world.now;
        let c = &self.nodes[n].clients[&conn];
        !c.shut
            && self.nodes[n].stopping.is_none()
            && c.inflight
                .values()
                .any(|r| matches!(r.kind, ReqKind::Write(_)) && now - r.issued_us > timeout)
    }

    /// The client shuts `conn` down and sends every write it has no reply for
    /// again on a new connection, while the first copies may still run.
    pub fn time_out(&mut self, n: usize, conn: ConnId) {
        self.stats.timeouts += 1;
        let c = self.nodes[n].clients.get_mut(&conn).expect("timed out");
        assert!(!c.shut, "a connection is shut once");
        c.shut = true;
        c.closing = true;
        let close_at = c.close_at;
        let writes: Vec<(u32, super::resend::WriteSpec, Option<u64>)> = c
            .inflight
            .values()
            .filter_map(|r| match (&r.kind, r.spec) {
                (ReqKind::Write(id), Some(spec)) => Some((*id, spec, r.group)),
                _ => None,
            })
            .collect();
        self.trace_line(Some(n), || {
            format!(
                "client {conn}: a request timed out; shut down, {} writes sent again",
                writes.len()
            )
        });
        let groups: Vec<(u64, WriteSpec)> = writes
            .into_iter()
            .map(|(id, spec, group)| {
                let g = group.unwrap_or_else(|| self.new_group(id));
                (g, spec)
            })
            .collect();
        let Some(next) = self.reconnect(n, close_at) else {
            let step = self.next_step();
            for (g, _) in groups {
                self.group_failed(g, step);
            }
            return;
        };
        for (g, spec) in groups {
            self.stats.concurrent_copies += 1;
            self.send_copy(n, next, spec, Some(g));
        }
    }

    /// The client's next connection to node `n`: None when it is refused (the
    /// client then fails what it would have sent on it).
    fn reconnect(&mut self, n: usize, close_at: u64) -> Option<ConnId> {
        if !self.sc.auto_promote && self.role(n) != Some(Role::Primary) {
            self.admin(n, AdminCmd::Primary { force: false });
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        match self.attach_client(n, conn) {
            Some(Ok(())) => {}
            other => {
                self.trace_line(Some(n), || format!("client {conn} refused: {other:?}"));
                return None;
            }
        }
        self.nodes[n].clients.insert(
            conn,
            Client {
                close_at,
                ..Default::default()
            },
        );
        self.trace_line(Some(n), || format!("client {conn} attached (a reconnect)"));
        let inc = self.nodes[n].inc;
        self.world.after(1_000, Ev::Client { node: n, inc, conn });
        Some(conn)
    }

    fn new_group(&mut self, id: u32) -> u64 {
        let g = self.next_group;
        self.next_group += 1;
        self.groups.insert(
            g,
            Group {
                ids: vec![id],
                answered: false,
            },
        );
        g
    }

    /// Sends a copy of `spec` on `conn`: a new write in the model, of group `group`.
    fn send_copy(&mut self, n: usize, conn: ConnId, spec: WriteSpec, group: Option<u64>) {
        let step = self.next_step();
        let id = self
            .model
            .issue(n, spec.first, spec.n, spec.kind, spec.fua, step);
        let group = group.unwrap_or_else(|| self.new_group(id));
        let g = self.groups.get_mut(&group).expect("a group");
        assert!(!g.answered, "no copy of an answered write is sent");
        if !g.ids.contains(&id) {
            g.ids.push(id);
        }
        self.stats.copies += 1;
        let (offset, len) = (
            spec.first * super::data::SECTOR,
            spec.n * super::data::SECTOR,
        );
        let req = match spec.kind {
            Kind::Write => {
                let vals: Vec<u64> = spec
                    .sectors()
                    .map(|s| super::data::value_of(id, s))
                    .collect();
                IoRequest::Write {
                    offset,
                    data: super::data::encode(&vals),
                    fua: spec.fua,
                }
            }
            Kind::Trim => IoRequest::Trim {
                offset,
                len: len as u32,
                fua: spec.fua,
            },
            Kind::Zeroes => IoRequest::WriteZeroes {
                offset,
                len: len as u32,
                may_trim: spec.may_trim,
                fua: spec.fua,
            },
        };
        self.send_request(
            n,
            conn,
            ReqKind::Write(id),
            req,
            step,
            Some(spec),
            Some(group),
        );
    }

    /// The client's one reply to the write of group `g` came (for copy `id`):
    /// every other copy ends with it, as one that may or may not have landed.
    pub fn group_answered(&mut self, g: u64, id: u32, step: u64) {
        let group = self.groups.get_mut(&g).expect("a group");
        assert!(!group.answered, "a write is answered once");
        assert!(group.ids.contains(&id));
        group.answered = true;
        let others: Vec<u32> = group.ids.iter().copied().filter(|o| *o != id).collect();
        for o in others {
            let node = self.model.writes[o as usize].node;
            if self.model.pending(node).contains(&o) {
                self.model.reply(o, false, step);
            }
        }
    }

    /// The client gives up on the write of group `g`: every copy failed.
    fn group_failed(&mut self, g: u64, step: u64) {
        let group = self.groups.get_mut(&g).expect("a group");
        group.answered = true;
        for o in group.ids.clone() {
            let node = self.model.writes[o as usize].node;
            if self.model.pending(node).contains(&o) {
                self.model.reply(o, false, step);
            }
        }
    }

    /// A reply on a connection the client shut: lost. A copy read after the
    /// shutdown must have been dropped by the core, never run.
    pub fn reply_lost(
        &mut self,
        n: usize,
        conn: ConnId,
        cookie: u64,
        result: &Result<Option<bytes::Bytes>, u32>,
    ) {
        self.stats.replies_lost += 1;
        let c = self.nodes[n].clients.get_mut(&conn).expect("a shut client");
        let stale = c.stale.remove(&cookie);
        self.trace_line(Some(n), || {
            format!("reply {conn}/{cookie} lost (the client shut the connection; stale {stale})")
        });
        if stale && self.shut_rule && *result != Err(errno::ESHUTDOWN) {
            self.violate(
                "stale request run",
                format!(
                    "{} ran request {conn}/{cookie}, read after the client shut the connection ({result:?})",
                    Sim::name(n)
                ),
            );
        }
    }

    /// Node `n` crashes: the writes its clients had no reply for are sent again
    /// once it is back (each write's live copy: the one on a connection not shut).
    pub fn keep_orphans(&mut self, n: usize) {
        if self.resends_on().is_none() {
            return;
        }
        let orphans: Vec<WriteSpec> = self.nodes[n]
            .clients
            .values()
            .filter(|c| !c.shut)
            .flat_map(|c| c.inflight.values().filter_map(|r| r.spec))
            .collect();
        self.nodes[n].orphans = orphans;
    }

    /// The restarted node's client reconnects and sends its orphans again; now
    /// and then its new connection stalls after some of them and times out, so
    /// that those run twice, on two connections at once.
    pub fn resend_orphans(&mut self, n: usize) {
        let orphans = std::mem::take(&mut self.nodes[n].orphans);
        let on = matches!(
            self.phase,
            super::cluster::Phase::Faults | super::cluster::Phase::Calm
        );
        if !on || !self.alive(n) || self.nodes[n].stopping.is_some() {
            return;
        }
        let close_at = self.now() + self.rng_work.range(300_000, 3_000_000);
        let Some(conn) = self.reconnect(n, close_at) else {
            return;
        };
        self.trace_line(Some(n), || {
            format!(
                "client {conn}: sends {} writes again after the restart",
                orphans.len()
            )
        });
        let twice = self.rng_work.chance(0.5);
        let stall_after = self.rng_work.below(orphans.len() as u64 + 1) as usize;
        for (i, spec) in orphans.into_iter().enumerate() {
            if twice && i == stall_after {
                let stall = self.rng_work.range(10_000, 2_000_000);
                let inc = self.nodes[n].inc;
                self.world.after(stall, Ev::ConnRead { node: n, inc, conn });
                self.stats.stalls += 1;
                self.nodes[n]
                    .clients
                    .get_mut(&conn)
                    .expect("client")
                    .stalled = true;
            }
            self.stats.crash_resends += 1;
            self.send_copy(n, conn, spec, None);
        }
        if twice && self.nodes[n].clients.contains_key(&conn) {
            self.time_out(n, conn);
        }
    }
}

impl WriteSpec {
    pub fn sectors(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.n
    }
}
