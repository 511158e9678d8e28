//! NBD connections: the listener, the handshake, and the request loop.
//!
//! Each connection has a reader task and a reply sink. The reader decodes requests and hands
//! them to the core in batches (`disk_io::batch`, where page-cache I/O runs inline on the
//! reader's thread). A reply is sent by whichever thread produces it (the reader itself, a
//! disk engine thread, the peer link) with a non-blocking `sendmsg` on the socket, in
//! completion order; replies produced during one batch leave together at its end. Only when
//! the socket is full does the connection's writer task take over, waiting for the client to
//! drain it, and later replies queue behind, so no thread ever blocks on a slow client.
//!
//! Large WRITE payloads are read from the socket straight into a buffer of their own
//! (recycled, page-aligned), not through the receive buffer: no copy, no reallocation.
//!
//! - `listener.rs`: bind, accept, inherited listeners and connections (hand-over).
//! - `serve.rs`: one connection's life: handshake, request loop, detach or hand-over.
//! - `handshake.rs`: drives `nbd::ServerHandshake` over the socket.
//! - `reader.rs`: the request loop (back-pressure, large payloads, splicing, stop).
//! - `request.rs`: one decoded request to the core's event, or a direct answer.
//! - `sink.rs`, `sink_state.rs`: the reply side; `writer.rs`: its writer task.
//! - `cork.rs`: replies held back until the end of a batch (used by `disk_io::batch`).
//!
//! Imports go one way: this module uses `disk_io`, `splice` and `socket`; `disk_io` uses
//! only `cork` (through `ConnSink`), `splice` only `socket`.

mod cork;
mod handshake;
mod listener;
mod reader;
mod request;
mod serve;
mod sink;
mod sink_state;
mod writer;

pub(super) use cork::Cork;
pub(super) use listener::{accept_loop, bind, spawn_handed, Listener};
pub(super) use sink::{deliver, ConnSink};
