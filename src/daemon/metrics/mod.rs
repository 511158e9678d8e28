//! Prometheus metrics (`[metrics] listen`, off by default): the counters the daemon keeps
//! as it carries out the core's actions, the state gauges read from the core's `Status`
//! at each scrape, and the HTTP endpoint that serves them in the Prometheus text format.
//!
//! Everything is counted at the edge, in `daemon/mod.rs`, from what passes between the
//! core and the outside: `Event::Request` and `Action::Reply` (NBD requests, timed from
//! one to the other), `Action::Persist` and `Event::MetaDone` (metadata writes),
//! `Action::FencePeer` and `Event::FenceDone` (fencing), Ping and PingAck on the peer link
//! (round trip). Two requests do not pass there: a spliced write is admitted by
//! `Shared::try_stream_write`, and BLOCK_STATUS is answered by the NBD reader
//! (`Metrics::block_status`).

mod fencing;
pub mod http;
mod metadata;
mod nbd_requests;
mod peer_ping;
pub mod server;
mod state;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

use crate::core::{Action, ConnId, Event, Status};
use crate::peer::Message;

pub use nbd_requests::Op;

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "nbd_mirror";

/// The daemon's metrics, or nothing when they are off (then every call is a no-op).
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<Recorder>>);

struct Recorder {
    registry: Registry,
    nbd: nbd_requests::NbdRequests,
    meta: metadata::MetaWrites,
    fence: fencing::FenceCalls,
    ping: peer_ping::PeerPing,
}

impl Metrics {
    pub fn new(on: bool) -> Metrics {
        if !on {
            return Metrics(None);
        }
        let mut registry = Registry::with_prefix(PREFIX);
        let nbd = nbd_requests::NbdRequests::register(&mut registry);
        let meta = metadata::MetaWrites::register(&mut registry);
        let fence = fencing::FenceCalls::register(&mut registry);
        let ping = peer_ping::PeerPing::register(&mut registry);
        Metrics(Some(Arc::new(Recorder {
            registry,
            nbd,
            meta,
            fence,
            ping,
        })))
    }

    /// An event about to be fed to the core.
    pub fn event(&self, ev: &Event) {
        let Some(r) = &self.0 else { return };
        match ev {
            Event::Request { conn, cookie, req } => {
                let (op, bytes) = Op::of(req);
                r.nbd.started(*conn, *cookie, op, bytes, Instant::now());
            }
            Event::MetaDone { id, ok } => r.meta.done(*id, *ok, Instant::now()),
            Event::FenceDone { exit, .. } => r.fence.done(*exit),
            Event::PeerMsg {
                link,
                msg: Message::PingAck,
            } => r.ping.acked(*link, Instant::now()),
            Event::ConnDown { link, .. } => r.ping.link_down(*link),
            _ => {}
        }
    }

    /// An action the core asked for, before it is carried out.
    pub fn action(&self, a: &Action) {
        let Some(r) = &self.0 else { return };
        match a {
            Action::Reply {
                conn,
                cookie,
                result,
            } => r
                .nbd
                .answered(*conn, *cookie, result.is_ok(), Instant::now()),
            Action::Persist { id, write } => r.meta.asked(*id, write, Instant::now()),
            Action::FencePeer { .. } => r.fence.called(),
            Action::Send {
                link,
                msg: Message::Ping,
            } => r.ping.sent(*link, Instant::now()),
            _ => {}
        }
    }

    /// A spliced write of `len` bytes is about to be offered to the core as request
    /// `cookie` of `conn` (it never passes as an `Event::Request`).
    pub fn stream_write_started(&self, conn: ConnId, cookie: u64, len: u32) {
        if let Some(r) = &self.0 {
            r.nbd
                .started(conn, cookie, Op::Write, u64::from(len), Instant::now());
        }
    }

    /// The core did not take that spliced write (it comes again as a plain request).
    pub fn stream_write_refused(&self, conn: ConnId, cookie: u64) {
        if let Some(r) = &self.0 {
            r.nbd.forget(conn, cookie);
        }
    }

    /// Times a BLOCK_STATUS request over `len` bytes answered by the NBD reader: counted
    /// when the returned guard drops.
    pub fn block_status(&self, len: u32) -> BlockStatusTimer {
        BlockStatusTimer {
            metrics: self.clone(),
            len,
            at: Instant::now(),
        }
    }

    /// The whole exposition: the state gauges from `status`, then the counters.
    pub fn render(&self, status: Status) -> Result<String, String> {
        let Some(r) = &self.0 else {
            return Err("metrics are off".into());
        };
        let mut state = Registry::with_prefix(PREFIX);
        state.register_collector(Box::new(state::StateSnapshot(status)));
        let mut out = String::with_capacity(32 * 1024);
        prometheus_text::encode(&mut out, &state)
            .and_then(|()| prometheus_text::encode(&mut out, &r.registry))
            .map_err(|e| format!("cannot encode the metrics: {e}"))?;
        Ok(out)
    }
}

/// See [`Metrics::block_status`].
pub struct BlockStatusTimer {
    metrics: Metrics,
    len: u32,
    at: Instant,
}

impl Drop for BlockStatusTimer {
    fn drop(&mut self) {
        if let Some(r) = &self.metrics.0 {
            r.nbd.record(
                Op::BlockStatus,
                u64::from(self.len),
                true,
                self.at.elapsed(),
            );
        }
    }
}
