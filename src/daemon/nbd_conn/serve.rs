//! One NBD connection's life: the handshake, then the request loop, then detach (or, at a
//! restart, the hand-over of its socket).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::handshake::handshake;
use super::reader::{read_loop, ReaderEnd};
use super::sink::ConnSink;
use super::writer::write_loop;
use crate::core::{ConnId, Event};
use crate::daemon::socket::{set_send_buffer, NbdStream};
use crate::daemon::{handover, lock, Shared, MAX_IO};
use crate::nbd::{transmission_flags, ExportInfo, Negotiated};

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What this node exports: the resource, its size and block sizes.
pub(super) fn export_info(shared: &Shared) -> ExportInfo {
    let s = &shared.settings;
    let min_block = if s.disk.direct_io {
        shared.disk.logical_block_size()
    } else {
        1
    };
    ExportInfo {
        name: s.resource.clone(),
        description: format!(
            "nbd-mirror resource {} on node {}",
            s.resource,
            s.node().name
        ),
        size: shared.disk.size(),
        flags: transmission_flags(false),
        min_block,
        preferred_block: 4096.max(min_block),
        max_block: MAX_IO,
    }
}

pub(super) async fn serve<S: NbdStream>(
    shared: Arc<Shared>,
    conn: ConnId,
    mut stream: S,
    peer: String,
    unix: bool,
) {
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let hs = {
        let (mut rd, mut wr) = tokio::io::split(&mut stream);
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake(&shared, conn, &mut rd, &mut wr, &mut inbuf),
        )
        .await
    };
    let neg = match hs {
        Ok(Ok(Some(neg))) => neg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!("NBD client {peer} (conn {conn}): {e}; closing");
            shared.handle(Event::ClientDetach { conn });
            return;
        }
        Err(_) => {
            tracing::warn!("NBD client {peer} (conn {conn}): handshake not finished within {HANDSHAKE_TIMEOUT:?}; closing");
            shared.handle(Event::ClientDetach { conn });
            return;
        }
    };
    tracing::debug!("NBD client {peer} (conn {conn}) attached");
    serve_negotiated(shared, conn, stream, peer, unix, neg, inbuf).await;
}

/// Serves a connection a previous mirrord handed over (`handover.rs`): the handshake is
/// done, and the client's next byte starts a request.
pub(super) async fn serve_handed<S: NbdStream>(
    shared: Arc<Shared>,
    client: handover::Client,
    stream: S,
) {
    let desc = export_info(&shared).description;
    let neg = client.negotiated(desc);
    tracing::info!(
        "NBD client {} (conn {}) taken over from the previous process",
        client.peer,
        client.conn
    );
    let inbuf = BytesMut::with_capacity(64 * 1024);
    serve_negotiated(
        shared,
        client.conn,
        stream,
        client.peer,
        client.unix,
        neg,
        inbuf,
    )
    .await;
}

/// The request loop of an attached connection, until it ends; at a restart it ends at a
/// request boundary with every request answered, and the socket goes to `Shared::handed`.
async fn serve_negotiated<S: NbdStream>(
    shared: Arc<Shared>,
    conn: ConnId,
    stream: S,
    peer: String,
    unix: bool,
    neg: Negotiated,
    inbuf: BytesMut,
) {
    if unix {
        set_send_buffer(stream.as_raw_fd());
    }
    let stream = Arc::new(stream);
    let sink = Arc::new(ConnSink::new(
        conn,
        stream.clone(),
        stream.as_raw_fd(),
        neg.structured_replies,
    ));
    lock(&shared.conns).insert(conn, sink.clone());
    let writer = tokio::spawn(write_loop(stream.clone(), sink.clone()));
    let end = match read_loop(&shared, conn, &*stream, &sink, inbuf, &neg).await {
        Ok(end) => end,
        Err(e) => {
            tracing::warn!("NBD client {peer} (conn {conn}): {e}; closing");
            ReaderEnd::Closed
        }
    };
    if end == ReaderEnd::AtBoundary {
        sink.lock().keep_open = true;
    }
    sink.reader_finished();
    let _ = writer.await;
    // Every request it sent is answered: a hand-over takes the socket as it is.
    let handed = end == ReaderEnd::AtBoundary && !sink.lock().broken;
    if handed {
        match handover::dup(stream.as_raw_fd()) {
            Ok(fd) => {
                let client = handover::Client::new(fd.as_raw_fd(), conn, unix, peer.clone(), &neg);
                lock(&shared.handed).push((client, fd));
            }
            Err(e) => tracing::error!("NBD client {peer} (conn {conn}): not handed over: {e}"),
        }
    }
    lock(&shared.conns).remove(&conn);
    if handed {
        // Still attached, in the next process.
        tracing::info!("NBD client {peer} (conn {conn}) ready for the hand-over");
        return;
    }
    shared.handle(Event::ClientDetach { conn });
    tracing::debug!("NBD client {peer} (conn {conn}) detached");
}
