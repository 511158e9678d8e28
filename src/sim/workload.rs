//! The clients: NBD connections that come and go on either node (which makes
//! the roles change through auto-promote, or through `primary`/`secondary`
//! when it is off), each with requests in flight: reads, writes (some FUA),
//! trims, write-zeroes and flushes, mostly on a small hot area so that they
//! overlap.

use super::cluster::{Client, Ev, Phase, Req, ReqKind, Sim};
use super::data::{self, SECTOR};
use super::model::Kind;
use super::resend::WriteSpec;
use crate::core::{Action, AdminCmd, ConnId, DiskOp, Event, IoRequest, Role};

impl Sim {
    fn workload_on(&self) -> bool {
        matches!(self.phase, Phase::Faults | Phase::Calm)
    }

    pub fn workload_tick(&mut self) {
        if !self.workload_on() {
            return;
        }
        if self.rng_work.chance(0.03) {
            self.favourite = 1 - self.favourite;
        }
        for n in 0..2 {
            if !self.alive(n)
                || self.nodes[n].stopping.is_some()
                || !self.nodes[n].clients.is_empty()
            {
                continue;
            }
            let p = if self.sc.two_primaries || n == self.favourite {
                0.4
            } else {
                0.08
            };
            if self.rng_work.chance(p) {
                self.start_client(n);
            }
        }
        let gap = self.rng_work.range(50_000, 500_000);
        self.world.after(gap, Ev::Workload);
    }

    fn start_client(&mut self, n: usize) {
        if !self.sc.auto_promote && self.role(n) != Some(Role::Primary) {
            self.admin(n, AdminCmd::Primary { force: false });
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let r = self.attach_client(n, conn);
        match r {
            Some(Ok(())) => {
                let close_at = self.now() + self.rng_work.range(300_000, 6_000_000);
                self.nodes[n].clients.insert(
                    conn,
                    Client {
                        close_at,
                        ..Default::default()
                    },
                );
                self.trace_line(Some(n), || format!("client {conn} attached"));
                let inc = self.nodes[n].inc;
                self.world.after(1_000, Ev::Client { node: n, inc, conn });
            }
            Some(Err(e)) => self.trace_line(Some(n), || format!("client {conn} refused: {e}")),
            None => {}
        }
    }

    pub fn client_step(&mut self, n: usize, conn: ConnId) {
        let now = self.now();
        let on = self.workload_on() && self.nodes[n].stopping.is_none();
        let Some(c) = self.nodes[n].clients.get_mut(&conn) else {
            return;
        };
        if !on || now >= c.close_at || c.shut {
            c.closing = true;
        }
        let inc = self.nodes[n].inc;
        if !c.closing && self.timed_out(n, conn) {
            self.time_out(n, conn);
            self.world.after(5_000, Ev::Client { node: n, inc, conn });
            return;
        }
        let Some(c) = self.nodes[n].clients.get_mut(&conn) else {
            return;
        };
        if c.closing {
            if c.inflight.is_empty() {
                self.nodes[n].clients.remove(&conn);
                self.trace_line(Some(n), || format!("client {conn} detaches"));
                self.run_core(n, |core| core.handle(Event::ClientDetach { conn }));
                if !self.sc.auto_promote && self.nodes[n].clients.is_empty() {
                    self.admin(n, AdminCmd::Secondary);
                }
            } else {
                self.world.after(5_000, Ev::Client { node: n, inc, conn });
            }
            return;
        }
        if c.inflight.len() < self.sc.queue_depth {
            self.issue_request(n, conn, None);
        }
        let mean = self.sc.request_gap_us;
        let gap = self.rng_work.range(mean / 4, mean * 2);
        self.world.after(gap, Ev::Client { node: n, inc, conn });
    }

    /// Where the next request goes: `(first sector, sectors)`.
    fn pick_range(&mut self) -> (u64, u64) {
        let sectors = self.model.sectors();
        let r = &mut self.rng_work;
        let len = match r.below(20) {
            0 => r.range(64, 256),
            1..=5 => r.range(8, 64),
            _ => r.range(1, 8),
        };
        let extents = sectors / 8192;
        let first = match r.below(10) {
            0..=4 => r.below(256),
            5 | 6 if extents > 0 => (r.range(1, extents) * 8192).saturating_sub(64) + r.below(128),
            _ => r.below(sectors),
        };
        let first = first.min(sectors - 1);
        (first, len.min(sectors - first))
    }

    /// A trim or write-zeroes pending on node `n`: `large` ones only (wider than
    /// [`Sim::pick_range`] ever makes), or any.
    fn zeroing_pending(&self, n: usize, large: bool) -> bool {
        self.model.pending(n).iter().any(|id| {
            let w = &self.model.writes[*id as usize];
            matches!(w.kind, Kind::Trim | Kind::Zeroes) && (!large || w.n > 256)
        })
    }

    /// In a scenario with `large_zeroing`, now and then a trim or
    /// write-zeroes of the whole device, or from a
    /// random sector to its end: wider than the activity log, so the node
    /// carries it out in pieces (core/split.rs). One at a time per node, and
    /// never beside a small one there (the model tells pieces from whole
    /// requests by their ranges).
    fn large_range(&mut self, n: usize) -> Option<(u64, u64)> {
        if !self.sc.large_zeroing || self.zeroing_pending(n, false) || !self.rng_work.chance(0.15) {
            return None;
        }
        let sectors = self.model.sectors();
        let first = if self.rng_work.chance(0.5) {
            0
        } else {
            self.rng_work.below(sectors / 4)
        };
        Some((first, sectors - first))
    }

    pub fn issue_request(&mut self, n: usize, conn: ConnId, roll: Option<u64>) {
        let (first, count) = self.pick_range();
        let mut roll = roll.unwrap_or_else(|| self.rng_work.below(100));
        if roll >= 85 && self.zeroing_pending(n, true) {
            roll = 75; // a flush instead (see `large_range`)
        }
        let (first, count) = match roll {
            85.. => self.large_range(n).unwrap_or((first, count)),
            _ => (first, count),
        };
        let (offset, len) = (first * SECTOR, count * SECTOR);
        let replicating = self.replicating(n);
        // A connected pair: both ends hold the same live link (not one end that
        // has not noticed yet that the other restarted).
        let paired = replicating
            && self.net.active_link(n).is_some()
            && self.net.active_link(n) == self.net.active_link(1 - n);
        let gen = self.nodes[n].link_gen;
        let step = self.next_step();
        let (kind, req) = match roll {
            0..=34 => (
                ReqKind::Read {
                    first,
                    n: count,
                    linear: paired,
                    gen,
                },
                IoRequest::Read {
                    offset,
                    len: len as u32,
                },
            ),
            35..=74 => {
                let fua = self.rng_work.chance(0.2);
                let id = self.model.issue(n, first, count, Kind::Write, fua, step);
                let vals: Vec<u64> = (first..first + count)
                    .map(|s| data::value_of(id, s))
                    .collect();
                (
                    ReqKind::Write(id),
                    IoRequest::Write {
                        offset,
                        data: data::encode(&vals),
                        fua,
                    },
                )
            }
            75..=84 => {
                let peer_errors = self.nodes[1 - n].disk.errors;
                (
                    ReqKind::Flush {
                        gen: replicating.then_some(gen),
                        peer_errors,
                    },
                    IoRequest::Flush,
                )
            }
            85..=89 => {
                let fua = self.rng_work.chance(0.2);
                self.stats.fua_trims += u64::from(fua);
                let id = self.model.issue(n, first, count, Kind::Trim, fua, step);
                (
                    ReqKind::Write(id),
                    IoRequest::Trim {
                        offset,
                        len: len as u32,
                        fua,
                    },
                )
            }
            _ => {
                let fua = self.rng_work.chance(0.2);
                self.stats.fua_trims += u64::from(fua);
                let id = self.model.issue(n, first, count, Kind::Zeroes, fua, step);
                (
                    ReqKind::Write(id),
                    IoRequest::WriteZeroes {
                        offset,
                        len: len as u32,
                        may_trim: self.rng_work.chance(0.5),
                        fua,
                    },
                )
            }
        };
        let spec = match (&kind, &req) {
            // Plain writes only: each copy has data of its own, so the simulator
            // tells which copy a mirrored write is (trims and write-zeroes it tells
            // by their ranges, the same for every copy).
            (ReqKind::Write(id), IoRequest::Write { .. }) if count <= 256 => {
                let w = &self.model.writes[*id as usize];
                let may_trim = matches!(req, IoRequest::WriteZeroes { may_trim: true, .. });
                Some(WriteSpec {
                    first: w.first,
                    n: w.n,
                    kind: w.kind,
                    fua: w.fua,
                    may_trim,
                })
            }
            _ => None,
        };
        self.send_request(n, conn, kind, req, step, spec, None);
    }

    /// The client sends `req` on `conn`: the node's reader reads it at once, or
    /// later when it is stalled (resend.rs).
    #[allow(clippy::too_many_arguments)]
    pub fn send_request(
        &mut self,
        n: usize,
        conn: ConnId,
        kind: ReqKind,
        req: IoRequest,
        step: u64,
        spec: Option<WriteSpec>,
        group: Option<u64>,
    ) {
        let Some(c) = self.nodes[n].clients.get_mut(&conn) else {
            return;
        };
        let cookie = c.next_cookie;
        c.next_cookie += 1;
        let issued_us = self.world.now;
        c.inflight.insert(
            cookie,
            Req {
                kind: kind.clone(),
                issue: step,
                issued_us,
                read_us: u64::MAX,
                spec,
                group,
            },
        );
        self.stats.requests += 1;
        self.trace_line(Some(n), || {
            format!(
                "request {conn}/{cookie}: {} ({kind:?})",
                super::trace::io_request(&req)
            )
        });
        if self.maybe_unread(n, conn, cookie, &req, step) {
            return;
        }
        self.submit(n, conn, cookie, req, step);
    }

    /// The node's reader reads request `conn`/`cookie` and hands it to the core.
    pub fn submit(&mut self, n: usize, conn: ConnId, cookie: u64, req: IoRequest, step: u64) {
        self.before_submit(n, conn, cookie);
        let now = self.world.now;
        let r = self.nodes[n]
            .clients
            .get_mut(&conn)
            .and_then(|c| c.inflight.get_mut(&cookie))
            .expect("a request sent is in flight until answered");
        r.read_us = now;
        let write = match r.kind {
            ReqKind::Write(id) => Some(id),
            _ => None,
        };
        let replicating = self.replicating(n);
        let gen = self.nodes[n].link_gen;
        // Every other plain write goes the way the daemon's splice path does: admitted by
        // Event::StreamWrite, its data handed to the disk by us (not by an action), DiskDone.
        let streamed = match &req {
            IoRequest::Write {
                offset,
                data,
                fua: false,
            } if step % 2 == 0 => {
                let (offset, data) = (*offset, data.clone());
                let len = data.len() as u32;
                let ev = Event::StreamWrite {
                    conn,
                    cookie,
                    offset,
                    len,
                };
                let admitted = match self.ask(n, ev) {
                    Some(Action::StreamWrite {
                        conn: c,
                        cookie: k,
                        disk_id,
                    }) if (c, k) == (conn, cookie) => disk_id,
                    None => None,
                    Some(other) => panic!("StreamWrite answered with {other:?}"),
                };
                if let Some(id) = admitted {
                    self.stats.streamed += 1;
                    let op = DiskOp::Write {
                        offset,
                        data,
                        fua: false,
                    };
                    self.submit_disk(n, id, op);
                }
                admitted.is_some()
            }
            _ => false,
        };
        if !streamed {
            self.run_core(n, |core| core.handle(Event::Request { conn, cookie, req }));
        }
        if let Some(id) = write {
            self.model.writes[id as usize].replicating_at_issue = replicating.then_some(gen);
        }
    }

    pub fn on_reply(
        &mut self,
        n: usize,
        conn: ConnId,
        cookie: u64,
        result: Result<Option<bytes::Bytes>, u32>,
    ) {
        let Some(c) = self.nodes[n].clients.get_mut(&conn) else {
            if conn >= self.next_conn {
                self.violate(
                    "reply to nobody",
                    format!("{} replied on unknown connection {conn}", Sim::name(n)),
                );
            }
            return;
        };
        let Some(req) = c.inflight.remove(&cookie) else {
            self.violate(
                "duplicate reply",
                format!(
                    "{} replied twice (or unasked) to {conn}/{cookie}",
                    Sim::name(n)
                ),
            );
            return;
        };
        if c.shut {
            self.reply_lost(n, conn, cookie, &result);
            return;
        }
        let group = req.group;
        let step = self.next_step();
        self.stats.replies += 1;
        self.trace_line(Some(n), || {
            let r = match &result {
                Ok(Some(d)) => format!("ok, {} bytes", d.len()),
                Ok(None) => "ok".into(),
                Err(e) => format!("error {e}"),
            };
            format!("reply {conn}/{cookie}: {r}")
        });
        match req.kind {
            ReqKind::Read {
                first,
                n: count,
                linear,
                gen,
            } => match result {
                Ok(Some(data)) => {
                    let paired = self.net.active_link(n).is_some()
                        && self.net.active_link(n) == self.net.active_link(1 - n);
                    let linear =
                        linear && gen == self.nodes[n].link_gen && self.replicating(n) && paired;
                    self.check_read(n, first, count, &data, linear, req.issue);
                }
                Ok(None) => self.violate(
                    "read without data",
                    format!("{} answered a read with no data", Sim::name(n)),
                ),
                Err(_) => {}
            },
            ReqKind::Write(id) => {
                let w = &self.model.writes[id as usize];
                let same_link =
                    w.replicating_at_issue == Some(self.nodes[n].link_gen) && self.replicating(n);
                // A trim cut short by its time budget before its first piece
                // started (held by a handshake, say) wrote nothing to send.
                let nothing = w.applied().is_empty();
                if result.is_ok() && same_link && w.mirror.is_none() && !nothing {
                    self.violate("not mirrored", format!("{} acknowledged write {id} without sending it to the peer it replicated to", Sim::name(n)));
                    return;
                }
                self.check_write_reply(n, id, result.is_ok());
                let own_good = self.nodes[n]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.disk_state() == crate::core::DiskState::UpToDate);
                self.model.writes[id as usize].peer_only = !own_good;
                self.model.reply(id, result.is_ok(), step);
                if let Some(g) = group {
                    self.group_answered(g, id, step);
                }
            }
            ReqKind::Flush { gen, peer_errors } => {
                if result.is_ok() {
                    self.check_flush(n, req.issue, gen, peer_errors);
                }
            }
        }
    }
}
