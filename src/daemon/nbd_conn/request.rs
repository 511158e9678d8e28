//! One decoded NBD request: validated, then answered directly (errors, no-ops,
//! BLOCK_STATUS) or registered with the sink and turned into the core's event.

use std::sync::Arc;

use bytes::Bytes;

use super::sink::ConnSink;
use super::sink_state::Pending;
use crate::core::{BlockStatusView, ConnId, Event, IoRequest};
use crate::daemon::socket::peer_shut_write;
use crate::daemon::splice::Pipe;
use crate::daemon::{backpressure, disk_io, Shared};
use crate::nbd::consts::*;
use crate::nbd::{validate, Command, Decoded, Negotiated, Request};

/// What the reader needs to turn a decoded request into an event for the core.
pub(super) struct ReqCtx<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) conn: ConnId,
    pub(super) sink: &'a Arc<ConnSink>,
    pub(super) neg: &'a Negotiated,
    pub(super) fast_zero: bool,
    /// Our number for the last request handed to the core (its "cookie" there).
    pub(super) idx: u64,
    /// The client sent NBD_CMD_DISC.
    pub(super) disc: bool,
    /// For streamed writes (splice.rs): made at the first, taken while one runs, dropped
    /// when one does not finish.
    pub(super) pipe: Option<Pipe>,
    /// No pipe could be made: no streamed writes on this connection.
    pub(super) no_pipe: bool,
    /// The client has shut down its sending side, and the core was told
    /// (`Event::ClientShut`).
    pub(super) shut: bool,
}

impl ReqCtx<'_> {
    /// One decoded request: its event for the core, or a direct answer.
    pub(super) fn decoded(&mut self, d: Decoded, events: &mut Vec<Event>) {
        match d {
            Decoded::Request { req, payload } => events.extend(self.request(req, payload)),
            Decoded::Oversized { req } => self.sink.direct(req.cookie, req.command, NBD_EINVAL),
        }
    }

    /// Hands the core what was decoded; true when the client sent NBD_CMD_DISC.
    pub(super) fn run_batch(&mut self, events: &mut Vec<Event>) -> bool {
        self.submit(events);
        self.disc
    }

    /// Hands the core `events` (if any), after telling it when the client has shut
    /// down its sending side since the last look: every request handed over later
    /// was read after that (or may have been), and the core drops it
    /// (`Event::ClientShut`, docs/CONFLICTS.md). One `poll` per batch, none once shut.
    pub(super) fn submit(&mut self, events: &mut Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.look_for_shut();
        let shared = self.shared;
        disk_io::batch(shared, || shared.handle_many(events.drain(..)));
        debug_assert!(events.is_empty());
    }

    /// Tells the core, once, that the client shut down its sending side: right before
    /// a request goes to it, so that a request the core takes was read before that.
    /// A client that sent NBD_CMD_DISC in what was read so far closed politely: the
    /// requests before its DISC are outstanding ones the spec says to finish, so its
    /// shutdown does not make them stale.
    fn look_for_shut(&mut self) {
        if self.shut || self.disc || !peer_shut_write(self.sink.fd) {
            return;
        }
        self.shut = true;
        tracing::info!(
            "NBD conn {}: the client shut down its side; requests read from now on are \
             stale (it sends them again elsewhere) and are dropped",
            self.conn
        );
        self.shared.handle(Event::ClientShut { conn: self.conn });
    }

    /// A large plain WRITE the core lets us stream from the socket to the disk (see
    /// splice.rs and `Event::StreamWrite`): its reply registered, the core's disk op id
    /// and the pipe to use. None: handle it the ordinary way ([`ReqCtx::request`]), which
    /// also answers anything invalid.
    pub(super) fn try_stream(&mut self, req: &Request) -> Option<(u64, Pipe)> {
        let plain = matches!(req.command, Command::Write)
            && req.flags & NBD_CMD_FLAG_FUA == 0
            && req.length > 0
            && !self.no_pipe
            && validate(req, self.neg).is_ok()
            && self.shared.disk.caller_writes_ok();
        if !plain {
            return None;
        }
        let pipe = match self.pipe.take().map_or_else(Pipe::new, Ok) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "conn {}: no pipe for splicing writes ({e}); copying them",
                    self.conn
                );
                self.no_pipe = true;
                return None;
            }
        };
        self.look_for_shut();
        let idx = self.idx + 1;
        // Registered first: the core may answer (with an error) before the disk op is done.
        self.sink.register(
            idx,
            Pending {
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                abandoned: false,
                // The payload goes from the socket to the disk, never through our memory:
                // it counts as a request only.
                held: backpressure::REQUEST_MIN_BYTES,
            },
        );
        let (conn, offset, len) = (self.conn, req.offset, req.length);
        let disk_id = self.shared.try_stream_write(conn, idx, offset, len);
        match disk_id {
            Some(id) => {
                self.idx = idx;
                Some((id, pipe))
            }
            None => {
                self.sink.unregister(idx);
                self.pipe = Some(pipe);
                None
            }
        }
    }

    /// Validates one request: answers it directly, or registers it and returns the core's event.
    pub(super) fn request(&mut self, req: Request, payload: Bytes) -> Option<Event> {
        let sink = self.sink;
        if let Err(error) = validate(&req, self.neg) {
            sink.direct(req.cookie, req.command, error);
            return None;
        }
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        let io = match req.command {
            Command::Disc => {
                self.disc = true;
                return None;
            }
            Command::Cache => None,
            Command::BlockStatus => {
                let extents = block_status(
                    self.shared,
                    req.offset,
                    req.length,
                    req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                );
                let context = self.neg.base_allocation_context.unwrap_or(0);
                sink.block_status(req.cookie, context, &extents);
                return None;
            }
            Command::Flush => Some(IoRequest::Flush),
            // Zero-length data commands: success without I/O (FLUSH is handled above).
            _ if req.length == 0 => None,
            Command::Read => Some(IoRequest::Read {
                offset: req.offset,
                len: req.length,
            }),
            Command::Write => Some(IoRequest::Write {
                offset: req.offset,
                data: payload,
                fua,
            }),
            Command::Trim => Some(IoRequest::Trim {
                offset: req.offset,
                len: req.length,
                fua,
            }),
            Command::WriteZeroes => {
                if req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 && !self.fast_zero {
                    sink.direct(req.cookie, req.command, NBD_ENOTSUP);
                    return None;
                }
                Some(IoRequest::WriteZeroes {
                    offset: req.offset,
                    len: req.length,
                    may_trim: req.flags & NBD_CMD_FLAG_NO_HOLE == 0,
                    fua,
                })
            }
            Command::Unknown(_) => {
                sink.direct(req.cookie, req.command, NBD_EINVAL);
                return None;
            }
        };
        let Some(io) = io else {
            sink.direct(req.cookie, req.command, 0);
            return None;
        };
        self.idx += 1;
        sink.register(
            self.idx,
            Pending {
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                abandoned: false,
                held: match req.command {
                    Command::Read | Command::Write => req.length as usize,
                    _ => 0,
                }
                .max(backpressure::REQUEST_MIN_BYTES),
            },
        );
        Some(Event::Request {
            conn: self.conn,
            cookie: self.idx,
            req: io,
        })
    }
}

/// Most of the device one BLOCK_STATUS answer describes: the NBD spec lets a reply cover
/// less than was asked (the client asks again from where it ends). With the engine's
/// extent cap (`storage::engine::MAX_FILE_EXTENTS`) this bounds the `lseek` calls one
/// request costs on a runtime thread.
pub(crate) const BLOCK_STATUS_MAX_RANGE: u32 = 64 << 20;

fn block_status(shared: &Shared, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    debug_assert!(len > 0, "validate.rs refuses a zero-length BLOCK_STATUS");
    let _counted = shared.metrics.block_status(len);
    let len = len.min(BLOCK_STATUS_MAX_RANGE);
    let good = shared.core().block_status_view() == BlockStatusView::Disk;
    let exts = if good {
        shared.disk.block_status(offset, len as u64).ok()
    } else {
        None
    };
    let mut out = Vec::new();
    match exts {
        Some(exts) if !exts.is_empty() => {
            let mut left = len as u64;
            for e in exts {
                if left == 0 {
                    break;
                }
                let l = e.len.min(left).min(u32::MAX as u64 & !4095);
                if l == 0 {
                    break;
                }
                let flags = (if e.hole { NBD_STATE_HOLE } else { 0 })
                    | (if e.zero { NBD_STATE_ZERO } else { 0 });
                out.push((l as u32, flags));
                left -= l;
                if req_one {
                    break;
                }
            }
        }
        _ => out.push((len, 0)),
    }
    out
}
