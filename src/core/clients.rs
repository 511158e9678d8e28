//! The NBD side of the core: clients attaching and leaving, the admission of a
//! streamed (spliced) write, every reply to a client (and the flush a FUA trim
//! or write-zeroes takes before its reply), and what BLOCK_STATUS may report.
//! The edge decides none of this: it sends the events and carries out the
//! answers ([`Action::Attached`], [`Action::StreamWrite`], [`Action::Reply`]).

use bytes::Bytes;
use serde_json::json;

use super::node::Node;
use super::ordering::Range;
use super::types::*;

impl Node {
    /// [`Event::ClientAttach`]: serve the client if this node is primary, or
    /// auto-promote when allowed; answered with [`Action::Attached`].
    pub(super) fn on_client_attach(&mut self, conn: ConnId) {
        assert!(
            !self.clients.contains(&conn),
            "NBD connection {conn} attached twice"
        );
        let result = self.attach(conn);
        assert_eq!(
            result.is_ok(),
            self.clients.contains(&conn) && self.role == Role::Primary,
            "an attached client is served by a primary"
        );
        self.out.push(Action::Attached { conn, result });
    }

    fn attach(&mut self, conn: ConnId) -> Result<(), String> {
        if self.role != Role::Primary {
            if !self.cfg.auto_promote {
                return Err(format!(
                    "resource {} is secondary on {} (auto-promote is off; run `mirrorctl primary`)",
                    self.cfg.resource, self.cfg.node
                ));
            }
            self.promote(false)?;
            self.auto_promoted = true;
        }
        self.clients.insert(conn);
        self.notify(
            "client-attached",
            json!({ "conn": conn, "clients": self.clients.len() }),
        );
        Ok(())
    }

    /// [`Event::ClientDetach`]: the connection is gone and all its requests were
    /// answered. A connection whose attach was refused (or that never got to ask)
    /// may be detached too: the edge does not track it.
    pub(super) fn on_client_detach(&mut self, conn: ConnId) {
        debug_assert!(
            !self.fua_pending.iter().any(|&(c, _)| c == conn),
            "NBD connection {conn} left with a FUA trim unanswered"
        );
        if self.clients.remove(&conn) {
            self.notify(
                "client-detached",
                json!({ "conn": conn, "clients": self.clients.len() }),
            );
            if self.clients.is_empty() && self.auto_promoted && self.role == Role::Primary {
                self.demote();
            }
        }
        assert!(!self.clients.contains(&conn));
    }

    /// [`Event::StreamWrite`]: admits a local WRITE of `len` bytes at `offset` whose
    /// data the edge copies from the client's connection straight to the disk,
    /// without bringing it into memory (splice): possible only when nothing but the
    /// local disk needs the data, and the write can start at once. That is: a
    /// primary with this client attached, not replicating (so the disk is up to
    /// date), no handshake, suspension, promotion check or identifier write holding
    /// writes, its activity-log extents already active, and no write in flight or
    /// waiting that overlaps it. Then the write is in the disk order (as any local
    /// write, in the bitmap if there is a peer) and the answer carries the disk op
    /// id. Not for FUA writes (the ordinary path handles those).
    pub(super) fn on_stream_write(&mut self, conn: ConnId, cookie: u64, offset: u64, len: u32) {
        let range = Range::new(offset, u64::from(len));
        let now = self.role == Role::Primary
            && self.clients.contains(&conn)
            && !self.freeze.frozen()
            && self.session.handshake.is_none()
            && self.session.promote_confirm.is_none()
            && !self.txn.gated()
            && !self.txn.generation_deferred()
            && !self.replicating()
            && self.disk == DiskState::UpToDate
            && len > 0
            && self.txn.none_waiting()
            && self.txn.al().is_none_or(|al| al.covers(range))
            && !self.order.overlaps(&range);
        let disk_id = if now {
            self.local_write(conn, cookie, range, None, false, None);
            let id = self.stream_grant.take();
            assert!(
                id.is_some(),
                "an admitted streamed write must start at once"
            );
            id
        } else {
            None
        };
        debug_assert!(self.stream_grant.is_none());
        self.out.push(Action::StreamWrite {
            conn,
            cookie,
            disk_id,
        });
    }

    /// Every answer to a client's request leaves through here. A trim or
    /// write-zeroes with FUA that succeeded is not answered yet: it becomes a
    /// flush with the same cookie (after the current event), and the flush's
    /// result is its answer.
    pub(super) fn reply(&mut self, conn: ConnId, cookie: u64, result: Result<Option<Bytes>, u32>) {
        if self.fua_pending.remove(&(conn, cookie)) && result.is_ok() {
            debug_assert!(
                matches!(result, Ok(None)),
                "a trim or write-zeroes returns no data"
            );
            self.fua_flushes.push((conn, cookie));
            return;
        }
        self.out.push(Action::Reply {
            conn,
            cookie,
            result,
        });
    }

    /// A trim or write-zeroes with FUA arrives: its answer waits for a flush. (A
    /// request held during a handshake arrives a second time: the set keeps one.)
    pub(super) fn fua_after(&mut self, conn: ConnId, cookie: u64) {
        self.fua_pending.insert((conn, cookie));
        debug_assert!(self.fua_pending.contains(&(conn, cookie)));
    }

    /// Starts the flushes of FUA trims and write-zeroes that completed during the
    /// event just handled (at most one per such request).
    pub(super) fn run_fua_flushes(&mut self) {
        let flushes = std::mem::take(&mut self.fua_flushes);
        for (conn, cookie) in flushes {
            self.handle(Event::Request {
                conn,
                cookie,
                req: IoRequest::Flush,
            });
        }
        assert!(self.fua_flushes.is_empty(), "a flush is never a FUA trim");
    }

    /// What BLOCK_STATUS may tell a client: the disk's holes and zeroes only while
    /// it is up to date (a sync target's or an outdated disk's are not the
    /// device's).
    pub fn block_status_view(&self) -> BlockStatusView {
        if self.disk == DiskState::UpToDate {
            BlockStatusView::Disk
        } else {
            BlockStatusView::AllData
        }
    }
}
