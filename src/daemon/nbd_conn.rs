//! NBD connections: the listener, the handshake, and the request loop.
//!
//! Each connection has a reader task and a reply sink. The reader decodes requests and hands
//! them to the core in batches (`disk_io::run_batch`, where page-cache I/O runs inline on the
//! reader's thread). A reply is sent by whichever thread produces it (the reader itself, a
//! disk engine thread, the peer link) with a non-blocking `sendmsg` on the socket, in
//! completion order; replies produced during one batch leave together at its end. Only when
//! the socket is full does the connection's writer task take over, waiting for the client to
//! drain it, and later replies queue behind, so no thread ever blocks on a slow client.
//!
//! Large WRITE payloads are read from the socket straight into a buffer of their own
//! (recycled, page-aligned), not through the receive buffer: no copy, no reallocation.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::sync::Notify;

use super::{backpressure, disk_io, lock, splice, Shared, MAX_IO};
use crate::config::Listen;
use crate::core::{ConnId, Event, IoRequest};
use crate::nbd::consts::*;
use crate::nbd::{
    chunk_block_status, chunk_error, chunk_none, chunk_offset_data_header, simple_reply,
    transmission_flags, validate, Command, Decoded, ExportInfo, ExportQuery, HandshakeOptions,
    HandshakeStep, Negotiated, Request, RequestDecoder, ServerHandshake,
};
use crate::storage::engine::IoBuf;
use splice::Pipe;

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// WRITE payloads at least this large are read straight into their own buffer.
const DIRECT_PAYLOAD_MIN: u32 = 64 * 1024;
/// What is read after a large write payload: a header and some.
const SMALL_READ: usize = 4096;
/// READ data at least this large is sent from its own buffer (vectored), not copied.
const ZERO_COPY_MIN: usize = 8 * 1024;
/// Replies held back while a batch runs are sent at once when they reach this size.
const CORK_MAX: usize = 256 * 1024;
/// Socket send buffer asked for (the kernel caps it at net.core.wmem_max): large READ
/// replies then usually fit in one `sendmsg`, without waiting for the writer task.
const SEND_BUFFER: libc::c_int = 4 << 20;
/// How long a reader spins for the rest of a large WRITE payload before it sleeps, unless
/// `[nbd] busy-poll-us` is 0: 1 MiB QD8 writes 2,419 -> 2,799 MiB/s (medians of 6
/// alternating runs; 50 µs gave 2,381 -> 2,494), docs/BENCH.md.
const PAYLOAD_POLL: Duration = Duration::from_micros(150);
/// Most slices gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// A client socket (unix or TCP) as this module uses it: tokio's `&self` readiness API, so the
/// reader task, the writer task and reply senders on other threads can share it.
pub trait NbdStream: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + Sync + 'static {
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn wait_writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn read_some_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize>;
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Runs a raw I/O call; a `WouldBlock` clears tokio's readiness for `interest`.
    fn io_op<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! nbd_stream {
    ($t:ty) => {
        impl NbdStream for $t {
            fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                self.readable()
            }
            fn wait_writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                self.writable()
            }
            fn read_some_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
                self.try_read_buf(buf)
            }
            fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
                self.try_read(buf)
            }
            fn io_op<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                self.try_io(interest, f)
            }
        }
    };
}
nbd_stream!(tokio::net::UnixStream);
nbd_stream!(tokio::net::TcpStream);

pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

pub async fn bind(listen: &Listen) -> Result<Listener, String> {
    match listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            super::exclusive::remove_stale_socket(path)?;
            tokio::net::UnixListener::bind(path)
                .map(Listener::Unix)
                .map_err(|e| format!("cannot listen on unix:{}: {e}", path.display()))
        }
        Listen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}")),
    }
}

pub async fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    loop {
        let conn = shared
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &listener {
            Listener::Unix(l) => match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(
                        shared.clone(),
                        conn,
                        s,
                        "unix socket".to_string(),
                        true,
                    ));
                }
                Err(e) => accept_error(e).await,
            },
            Listener::Tcp(l) => match l.accept().await {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(shared.clone(), conn, s, addr.to_string(), false));
                }
                Err(e) => accept_error(e).await,
            },
        }
    }
}

impl Listener {
    pub fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// The listener a previous mirrord handed over (`handover.rs`), if it listens where the
    /// config says.
    pub fn inherited(listen: &Listen, fd: OwnedFd) -> Result<Listener, String> {
        let bad =
            |what: String| format!("the inherited NBD listener {what}; the config says {listen}");
        match listen {
            Listen::Unix(path) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                let addr = l
                    .local_addr()
                    .map_err(|e| bad(format!("has no address: {e}")))?;
                if addr.as_pathname() != Some(path.as_path()) {
                    return Err(bad(format!("listens on {addr:?}")));
                }
                l.set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixListener::from_std(l))
                    .map(Listener::Unix)
                    .map_err(|e| bad(format!("cannot be used: {e}")))
            }
            Listen::Tcp(want) => {
                let l = std::net::TcpListener::from(fd);
                let addr = l
                    .local_addr()
                    .map_err(|e| bad(format!("has no address: {e}")))?;
                if addr != *want && !(want.port() == 0 && addr.ip() == want.ip()) {
                    return Err(bad(format!("listens on {addr}")));
                }
                l.set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(l))
                    .map(Listener::Tcp)
                    .map_err(|e| bad(format!("cannot be used: {e}")))
            }
        }
    }
}

/// Starts serving a connection a previous mirrord handed over.
pub(super) fn spawn_handed(
    shared: &Arc<Shared>,
    client: super::handover::Client,
    fd: OwnedFd,
) -> Result<(), String> {
    let what = format!("inherited NBD connection {} ({})", client.conn, client.peer);
    if client.unix {
        let s = std::os::unix::net::UnixStream::from(fd);
        let s = s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(s))
            .map_err(|e| format!("{what}: {e}"))?;
        tokio::spawn(serve_handed(shared.clone(), client, s));
    } else {
        let s = std::net::TcpStream::from(fd);
        let s = s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(s))
            .map_err(|e| format!("{what}: {e}"))?;
        let _ = s.set_nodelay(true);
        tokio::spawn(serve_handed(shared.clone(), client, s));
    }
    Ok(())
}

async fn accept_error(e: std::io::Error) {
    tracing::warn!("NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn export_info(shared: &Shared) -> ExportInfo {
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

async fn serve<S: NbdStream>(
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
            shared.with_core(|c| c.detach_client(conn));
            return;
        }
        Err(_) => {
            tracing::warn!("NBD client {peer} (conn {conn}): handshake not finished within {HANDSHAKE_TIMEOUT:?}; closing");
            shared.with_core(|c| c.detach_client(conn));
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
    client: super::handover::Client,
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
        match super::handover::dup(stream.as_raw_fd()) {
            Ok(fd) => {
                let client =
                    super::handover::Client::new(fd.as_raw_fd(), conn, unix, peer.clone(), &neg);
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
    shared.with_core(|c| c.detach_client(conn));
    tracing::debug!("NBD client {peer} (conn {conn}) detached");
}

/// Why a connection's reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderEnd {
    /// The client left, sent NBD_CMD_DISC, or the daemon stops: the connection closes.
    Closed,
    /// A restart: stopped between two requests, the socket goes to the next process.
    AtBoundary,
}

/// How long a reader waits, at a restart, for the rest of a request it has begun to read.
const BOUNDARY_GRACE: Duration = Duration::from_secs(2);

/// The daemon stops. Without a restart the connection closes (what was read and not
/// decoded is dropped: the client was told nothing of it). At a restart: hands the core every
/// whole request already read, then reads exactly the rest of a request read in part (never
/// a byte of the next one), so the next process starts at a request boundary.
async fn stopped<S: NbdStream>(
    stream: &S,
    dec: &mut RequestDecoder,
    buf: &mut BytesMut,
    ctx: &mut ReqCtx<'_>,
    events: &mut Vec<Event>,
) -> Result<ReaderEnd, String> {
    if !ctx.shared.is_handing_over() {
        return Ok(ReaderEnd::Closed);
    }
    let deadline = tokio::time::Instant::now() + BOUNDARY_GRACE;
    loop {
        while let Some(d) = dec.decode(buf).map_err(|e| e.to_string())? {
            ctx.decoded(d, events);
            if ctx.disc {
                break;
            }
        }
        if ctx.run_batch(events) {
            return Ok(ReaderEnd::Closed);
        }
        if dec.at_boundary(buf) {
            return Ok(ReaderEnd::AtBoundary);
        }
        let need = dec.missing(buf);
        assert!(need > 0, "a partial request always misses bytes");
        buf.reserve(need);
        let read = tokio::time::timeout_at(deadline, async {
            loop {
                stream.wait_readable().await?;
                match stream.read_some_buf(&mut (&mut *buf).limit(need)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        })
        .await;
        match read {
            Err(_) => {
                return Err(format!(
                    "the client sent only part of a request within {BOUNDARY_GRACE:?} of the \
                     restart; closing the connection instead of handing it over"
                ))
            }
            Ok(Ok(0)) => return Ok(ReaderEnd::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
}

/// Best effort: a larger send buffer than the default (about 200 KiB). Unix sockets only: on
/// TCP a fixed size would switch off the kernel's buffer auto-tuning.
fn set_send_buffer(fd: RawFd) {
    let size = SEND_BUFFER;
    // SAFETY: setsockopt reads an int from a valid pointer; fd is our open socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Runs the handshake. Ok(None): the client left or aborted.
async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    conn: ConnId,
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
) -> Result<Option<Negotiated>, String> {
    let s = &shared.settings;
    let mut hs = ServerHandshake::new(HandshakeOptions {
        exports: vec![(
            s.resource.clone(),
            format!(
                "nbd-mirror resource {} on node {}",
                s.resource,
                s.node().name
            ),
        )],
        allow_structured_replies: true,
    });
    let mut out = BytesMut::new();
    loop {
        hs.take_output(&mut out);
        if !out.is_empty() {
            wr.write_all(&out)
                .await
                .map_err(|e| format!("write during handshake: {e}"))?;
            out.clear();
        }
        match hs.feed(inbuf).map_err(|e| e.to_string())? {
            HandshakeStep::NeedMore => {
                hs.take_output(&mut out);
                if !out.is_empty() {
                    wr.write_all(&out)
                        .await
                        .map_err(|e| format!("write during handshake: {e}"))?;
                    out.clear();
                }
                let n = rd
                    .read_buf(inbuf)
                    .await
                    .map_err(|e| format!("read during handshake: {e}"))?;
                if n == 0 {
                    return Ok(None);
                }
            }
            HandshakeStep::ExportLookup { name, query } => {
                let answer = if name != s.resource && !name.is_empty() {
                    Err(format!(
                        "no export named {name:?}; this server exports {:?}",
                        s.resource
                    ))
                } else if query == ExportQuery::Info {
                    Ok(export_info(shared))
                } else {
                    shared
                        .with_core(|c| c.attach_client(conn))
                        .map(|_| export_info(shared))
                };
                if let Err(e) = &answer {
                    tracing::warn!("NBD conn {conn}: refused export {name:?}: {e}");
                }
                hs.answer_export(answer);
            }
            HandshakeStep::Done(neg) => {
                hs.take_output(&mut out);
                wr.write_all(&out)
                    .await
                    .map_err(|e| format!("write during handshake: {e}"))?;
                return Ok(Some(neg));
            }
            HandshakeStep::Closed => {
                hs.take_output(&mut out);
                let _ = wr.write_all(&out).await;
                return Ok(None);
            }
        }
    }
}

async fn read_loop<S: NbdStream>(
    shared: &Arc<Shared>,
    conn: ConnId,
    stream: &S,
    sink: &Arc<ConnSink>,
    mut buf: BytesMut,
    neg: &Negotiated,
) -> Result<ReaderEnd, String> {
    let mut dec = RequestDecoder::new(MAX_IO);
    let mut ctx = ReqCtx {
        shared,
        conn,
        sink,
        neg,
        fast_zero: shared.disk.fast_zero(),
        idx: 0,
        disc: false,
        pipe: None,
        no_pipe: false,
    };
    let mut events = Vec::new();
    let mut stop = shared.stop_rx.clone();
    // After a large write, the next read takes little more than a header, so the next large
    // payload is not read into (and then copied out of) the receive buffer.
    let mut after_large = false;
    let mut last_len = 0u32;
    let busy_poll = Duration::from_micros(shared.settings.nbd_busy_poll_us);
    // The rest of a payload is on its way (the client is sending it): worth a longer spin.
    let payload_poll = if busy_poll.is_zero() {
        Duration::ZERO
    } else {
        PAYLOAD_POLL
    };
    loop {
        loop {
            if !backpressure::may_take(sink.held()) {
                // What was decoded goes to the core first: its answers are what frees room.
                if !events.is_empty() {
                    disk_io::batch(shared, || shared.handle_many(events.drain(..)));
                }
                tracing::debug!(
                    "NBD conn {conn}: {} bytes of requests and unsent replies held; reading no \
                     more requests until the client reads its replies",
                    sink.held()
                );
                if !backpressure::wait_for_room(|| sink.held(), &mut stop).await {
                    return stopped(stream, &mut dec, &mut buf, &mut ctx, &mut events).await;
                }
            }
            if let Some(req) = dec.take_large_write(&mut buf, DIRECT_PAYLOAD_MIN) {
                // What came before goes to the core before we wait for this payload.
                if !events.is_empty() {
                    disk_io::batch(shared, || shared.handle_many(events.drain(..)));
                }
                last_len = req.length;
                after_large = true;
                if let Some((id, pipe)) = ctx.try_stream(&req) {
                    let (offset, len) = (req.offset, req.length);
                    let streamed = splice::stream_payload(
                        splice::Source {
                            stream,
                            buf: &mut buf,
                            pipe: &pipe,
                            poll: payload_poll,
                            stop: &mut stop,
                        },
                        splice::Dest {
                            disk: &shared.disk,
                            offset,
                            len: len as usize,
                        },
                    )
                    .await;
                    if streamed.disk.is_ok() && streamed.conn.is_ok() {
                        // Empty: kept for the next one (otherwise it goes, with what it
                        // holds).
                        ctx.pipe = Some(pipe);
                    }
                    if streamed.conn.is_err() {
                        // Not all of the payload reached the disk, so the client must never
                        // hear "done": its reply is dropped. NBD leaves what an unanswered
                        // write left on the disk unspecified, so the core finishes it as
                        // done (in the bitmap if there is a peer), or as failed when the
                        // disk failed it.
                        sink.abandon(ctx.idx);
                    }
                    events.push(disk_io::streamed(shared, id, offset, len, streamed.disk));
                    if let Err(e) = streamed.conn {
                        disk_io::batch(shared, || shared.handle_many(events.drain(..)));
                        return Err(payload_error(e));
                    }
                } else {
                    let payload =
                        read_payload(stream, &mut buf, req.length as usize, payload_poll).await?;
                    events.extend(ctx.request(req, payload));
                }
            } else {
                let Some(d) = dec.decode(&mut buf).map_err(|e| e.to_string())? else {
                    break;
                };
                if let Decoded::Request { req, .. } = &d {
                    last_len = req.length;
                }
                ctx.decoded(d, &mut events);
            }
            if ctx.disc {
                break;
            }
        }
        if ctx.run_batch(&mut events) {
            return Ok(ReaderEnd::Closed);
        }
        if shared.is_stopping() {
            return stopped(stream, &mut dec, &mut buf, &mut ctx, &mut events).await;
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        let limit = if std::mem::take(&mut after_large) {
            SMALL_READ
        } else {
            usize::MAX
        };
        loop {
            let read = match stream.read_some_buf(&mut (&mut buf).limit(limit)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A client that sends small requests one at a time sends the next soon
                    // after our reply: spinning for it saves a sleep and a cross-CPU wake-up.
                    let poll = if last_len < DIRECT_PAYLOAD_MIN && sink.idle() {
                        busy_poll
                    } else {
                        Duration::ZERO
                    };
                    match poll_read(stream.as_raw_fd(), &mut buf, limit, poll) {
                        Some(read) => read,
                        None => {
                            tokio::select! {
                                r = stream.wait_readable() => r.map_err(|e| format!("read: {e}"))?,
                                _ = stop.changed() => {
                                    return stopped(stream, &mut dec, &mut buf, &mut ctx, &mut events).await;
                                }
                            }
                            continue;
                        }
                    }
                }
                read => read,
            };
            match read {
                Ok(0) => return Ok(ReaderEnd::Closed),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Reads a WRITE payload of `len` bytes into its own buffer: first what `buf` already holds,
/// the rest straight from the socket.
async fn read_payload<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
) -> Result<Bytes, String> {
    read_buffered(stream, buf, len, poll)
        .await
        .map_err(payload_error)
}

/// Why a connection ended while its reader waited for a WRITE payload.
fn payload_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the client left in the middle of a write payload".into(),
        _ => format!("read: {e}"),
    }
}

/// Reads `len` bytes into a buffer of their own: first what `buf` holds, the
/// rest straight from the socket (no copy through the receive buffer), spinning
/// up to `poll` each time the socket runs dry before it sleeps. A peer that
/// closes before the end is `UnexpectedEof`.
pub(super) async fn read_buffered<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
) -> io::Result<Bytes> {
    let mut out = IoBuf::new(len);
    let dst = out.as_mut_slice();
    let have = buf.len().min(len);
    dst[..have].copy_from_slice(&buf[..have]);
    buf.advance(have);
    let mut filled = have;
    while filled < len {
        let read = match stream.read_some(&mut dst[filled..]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match poll_recv(stream.as_raw_fd(), &mut dst[filled..], poll) {
                    Some(read) => read,
                    None => {
                        stream.wait_readable().await?;
                        continue;
                    }
                }
            }
            read => read,
        };
        match read {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out.freeze())
}

/// What the reader needs to turn a decoded request into an event for the core.
struct ReqCtx<'a> {
    shared: &'a Arc<Shared>,
    conn: ConnId,
    sink: &'a Arc<ConnSink>,
    neg: &'a Negotiated,
    fast_zero: bool,
    /// Our number for the last request handed to the core (its "cookie" there).
    idx: u64,
    /// The client sent NBD_CMD_DISC.
    disc: bool,
    /// For streamed writes (splice.rs): made at the first, taken while one runs, dropped
    /// when one does not finish.
    pipe: Option<Pipe>,
    /// No pipe could be made: no streamed writes on this connection.
    no_pipe: bool,
}

impl ReqCtx<'_> {
    /// One decoded request: its event for the core, or a direct answer.
    fn decoded(&mut self, d: Decoded, events: &mut Vec<Event>) {
        match d {
            Decoded::Request { req, payload } => events.extend(self.request(req, payload)),
            Decoded::Oversized { req } => self.sink.direct(req.cookie, req.command, NBD_EINVAL),
        }
    }

    /// Hands the core what was decoded; true when the client sent NBD_CMD_DISC.
    fn run_batch(&mut self, events: &mut Vec<Event>) -> bool {
        let shared = self.shared;
        if !events.is_empty() {
            disk_io::batch(shared, || shared.handle_many(events.drain(..)));
        }
        self.disc
    }

    /// A large plain WRITE the core lets us stream from the socket to the disk (see
    /// splice.rs and `Node::try_stream_write`): its reply registered, the core's disk op id
    /// and the pipe to use. None: handle it the ordinary way ([`ReqCtx::request`]), which
    /// also answers anything invalid.
    fn try_stream(&mut self, req: &Request) -> Option<(u64, Pipe)> {
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
        let idx = self.idx + 1;
        // Registered first: the core may answer (with an error) before the disk op is done.
        self.sink.register(
            idx,
            Pending {
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                flush_after: false,
                abandoned: false,
                // The payload goes from the socket to the disk, never through our memory:
                // it counts as a request only.
                held: backpressure::REQUEST_MIN_BYTES,
            },
        );
        let (conn, offset, len) = (self.conn, req.offset, req.length);
        match self.shared.try_stream_write(conn, idx, offset, len) {
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
    fn request(&mut self, req: Request, payload: Bytes) -> Option<Event> {
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
        let flush_after = fua && matches!(req.command, Command::Trim | Command::WriteZeroes);
        sink.register(
            self.idx,
            Pending {
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                flush_after,
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
pub const BLOCK_STATUS_MAX_RANGE: u32 = 64 << 20;

fn block_status(shared: &Shared, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    debug_assert!(len > 0, "validate.rs refuses a zero-length BLOCK_STATUS");
    let _counted = shared.metrics.block_status(len);
    let len = len.min(BLOCK_STATUS_MAX_RANGE);
    let good = shared.core().disk_state() == crate::core::DiskState::UpToDate;
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

/// A request handed to the core, waiting for its answer.
struct Pending {
    cookie: u64,
    command: Command,
    offset: u64,
    flush_after: bool,
    /// Its payload never fully arrived (a streamed write cut off): whatever the core
    /// answers, the client is told nothing, since not all of its data reached the disk.
    abandoned: bool,
    /// Bytes it holds until answered (READ length, WRITE payload, at least
    /// `backpressure::REQUEST_MIN_BYTES`), for back-pressure.
    held: usize,
}

/// The reply side of one connection (see the module comment).
pub struct ConnSink {
    conn: ConnId,
    fd: RawFd,
    /// Keeps the socket (and so `fd`) open for as long as anyone may send on it.
    _stream: Arc<dyn Send + Sync>,
    structured: bool,
    state: Mutex<SinkState>,
    /// Wakes the writer task: the socket is full, or the connection may be finished.
    wake: Notify,
}

#[derive(Default)]
struct SinkState {
    /// Requests handed to the core, by our number for them.
    pending: HashMap<u64, Pending>,
    next_internal: u64,
    /// Output not yet sent, in order: `queue` first, then `out`.
    queue: VecDeque<Bytes>,
    queued: usize,
    out: BytesMut,
    /// The socket was full: the writer task sends until everything is out; others only queue.
    writer_owns: bool,
    /// Sending failed (the client is gone): output is dropped.
    broken: bool,
    reader_done: bool,
    /// The reader stopped for a hand-over: the socket stays open for the next process (no
    /// shutdown of its sending side when the last reply is out).
    keep_open: bool,
    /// Bytes the pending requests hold (`Pending::held`).
    held: usize,
    /// This connection's part of the total (backpressure.rs), updated at every unlock.
    share: backpressure::Share,
}

impl SinkState {
    fn unsent(&self) -> usize {
        self.queued + self.out.len()
    }

    /// What this connection holds in memory: pending requests and unsent replies.
    fn held(&self) -> usize {
        self.held + self.unsent()
    }

    fn insert_pending(&mut self, idx: u64, p: Pending) {
        self.held += p.held;
        let old = self.pending.insert(idx, p);
        assert!(old.is_none(), "request {idx} registered twice");
    }

    fn remove_pending(&mut self, idx: u64) -> Option<Pending> {
        let p = self.pending.remove(&idx)?;
        self.held -= p.held;
        debug_assert!(
            !self.pending.is_empty() || self.held == 0,
            "held bytes leaked"
        );
        Some(p)
    }

    /// Appends a data buffer after everything encoded so far, without copying it.
    fn push_data(&mut self, data: Bytes) {
        if !self.out.is_empty() {
            let head = self.out.split().freeze();
            self.queued += head.len();
            self.queue.push_back(head);
        }
        if !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    /// Drops the first `n` sent bytes.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                self.out.advance(n.min(self.out.len()));
                return;
            };
            let take = n.min(front.len());
            front.advance(take);
            self.queued -= take;
            n -= take;
            if front.is_empty() {
                self.queue.pop_front();
            }
        }
    }

    fn discard_output(&mut self) {
        self.queue.clear();
        self.queued = 0;
        self.out.clear();
    }

    /// Whether the writer task may finish: the reader is gone, every request answered, and
    /// everything sent (or the client gone).
    fn finished(&self) -> bool {
        self.reader_done && self.pending.is_empty() && (self.broken || self.unsent() == 0)
    }
}

thread_local! {
    /// Sinks with replies held back until this thread's batch ends; Some inside a batch.
    static CORK: RefCell<Option<Vec<Arc<ConnSink>>>> = const { RefCell::new(None) };
}

/// While alive (on this thread, never across an await), replies are held back and sent
/// together when the outermost `Cork` drops.
pub(super) struct Cork {
    outer: bool,
}

impl Cork {
    pub(super) fn new() -> Cork {
        let outer = CORK.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                false
            } else {
                *c = Some(Vec::new());
                true
            }
        });
        Cork { outer }
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let sinks = CORK.with(|c| c.borrow_mut().take()).unwrap_or_default();
        for sink in sinks {
            let mut st = sink.lock();
            sink.send_now(&mut st);
        }
    }
}

/// Carries out the core's `Action::Reply` for NBD connection `conn`.
pub(super) fn deliver(
    shared: &Arc<Shared>,
    conn: ConnId,
    idx: u64,
    result: Result<Option<Bytes>, u32>,
) {
    let sink = lock(&shared.conns).get(&conn).cloned();
    if let Some(sink) = sink {
        sink.reply(shared, idx, result);
    }
}

impl ConnSink {
    fn new(conn: ConnId, stream: Arc<dyn Send + Sync>, fd: RawFd, structured: bool) -> ConnSink {
        ConnSink {
            conn,
            fd,
            _stream: stream,
            structured,
            state: Mutex::new(SinkState {
                out: BytesMut::with_capacity(64 * 1024),
                ..SinkState::default()
            }),
            wake: Notify::new(),
        }
    }

    /// Nothing of this connection is in the core or waiting to be sent.
    fn idle(&self) -> bool {
        let st = self.lock();
        st.pending.is_empty() && st.unsent() == 0
    }

    fn lock(&self) -> SinkGuard<'_> {
        SinkGuard(lock(&self.state))
    }

    /// What this connection holds in memory (see `SinkState::held`).
    fn held(&self) -> usize {
        self.lock().held()
    }

    fn register(&self, idx: u64, p: Pending) {
        self.lock().insert_pending(idx, p);
    }

    /// Takes back a registration whose request never reached the core.
    fn unregister(&self, idx: u64) {
        self.lock().remove_pending(idx);
    }

    /// Request `idx` will get no reply, whatever the core answers (see `Pending::abandoned`).
    fn abandon(&self, idx: u64) {
        if let Some(p) = self.lock().pending.get_mut(&idx) {
            p.abandoned = true;
        }
    }

    fn reader_finished(&self) {
        self.lock().reader_done = true;
        self.wake.notify_one();
    }

    /// An answer decided without the core (validation errors, no-ops).
    fn direct(self: &Arc<Self>, cookie: u64, command: Command, error: u32) {
        let mut st = self.lock();
        encode_reply(
            &mut st.out,
            self.structured,
            cookie,
            command,
            0,
            error,
            None,
        );
        self.emit(st);
    }

    fn block_status(self: &Arc<Self>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
        let mut st = self.lock();
        chunk_block_status(&mut st.out, cookie, context, extents, true);
        self.emit(st);
    }

    /// The core's answer for request `idx`.
    fn reply(self: &Arc<Self>, shared: &Arc<Shared>, idx: u64, result: Result<Option<Bytes>, u32>) {
        let mut st = self.lock();
        let Some(p) = st.remove_pending(idx) else {
            tracing::error!("conn {}: reply for unknown request {idx}", self.conn);
            return;
        };
        if p.abandoned {
            tracing::debug!("conn {}: request {idx} abandoned; no reply", self.conn);
            if st.reader_done && st.pending.is_empty() {
                self.wake.notify_one();
            }
            return;
        }
        if p.flush_after && result.is_ok() {
            // FUA on trim/zeroes: answer after a flush that follows the operation.
            st.next_internal += 1;
            let idx2 = u64::MAX / 2 + st.next_internal;
            st.insert_pending(
                idx2,
                Pending {
                    flush_after: false,
                    held: 0,
                    ..p
                },
            );
            drop(st);
            shared.handle(Event::Request {
                conn: self.conn,
                cookie: idx2,
                req: IoRequest::Flush,
            });
            return;
        }
        let structured = self.structured;
        match result {
            Ok(Some(data)) => {
                encode_reply(
                    &mut st.out,
                    structured,
                    p.cookie,
                    p.command,
                    p.offset,
                    0,
                    Some(data.len()),
                );
                if data.len() >= ZERO_COPY_MIN {
                    st.push_data(data);
                } else {
                    st.out.extend_from_slice(&data);
                }
            }
            Ok(None) => encode_reply(
                &mut st.out,
                structured,
                p.cookie,
                p.command,
                p.offset,
                0,
                None,
            ),
            Err(e) => encode_reply(
                &mut st.out,
                structured,
                p.cookie,
                p.command,
                p.offset,
                e,
                None,
            ),
        }
        if st.reader_done && st.pending.is_empty() {
            self.wake.notify_one();
        }
        self.emit(st);
    }

    /// Sends what was just encoded now, or at the end of this thread's batch.
    fn emit(self: &Arc<Self>, mut st: SinkGuard<'_>) {
        if st.writer_owns || st.broken {
            if st.broken {
                st.discard_output();
            }
            return;
        }
        if st.unsent() < CORK_MAX {
            let corked = CORK.with(|c| match c.borrow_mut().as_mut() {
                Some(list) => {
                    if !list.iter().any(|s| Arc::ptr_eq(s, self)) {
                        list.push(self.clone());
                    }
                    true
                }
                None => false,
            });
            if corked {
                return;
            }
        }
        self.send_now(&mut st);
    }

    /// Sends unsent output without blocking; if the socket fills up, the writer task takes over.
    fn send_now(&self, st: &mut SinkState) {
        if st.writer_owns || st.broken || st.unsent() == 0 {
            return;
        }
        match self.push_out(st) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                st.writer_owns = true;
                self.wake.notify_one();
            }
            Err(e) => self.break_off(st, &e),
        }
    }

    fn break_off(&self, st: &mut SinkState, e: &io::Error) {
        tracing::debug!("NBD conn {}: send failed: {e}", self.conn);
        st.broken = true;
        st.discard_output();
        self.wake.notify_one();
    }

    /// Sends unsent output until all of it is out (Ok) or the socket is full (WouldBlock).
    fn push_out(&self, st: &mut SinkState) -> io::Result<()> {
        while st.unsent() > 0 {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let mut n = 0;
            for chunk in st.queue.iter().take(MAX_IOV) {
                iov[n] = libc::iovec {
                    iov_base: chunk.as_ptr() as *mut libc::c_void,
                    iov_len: chunk.len(),
                };
                n += 1;
            }
            if n < MAX_IOV && !st.out.is_empty() {
                iov[n] = libc::iovec {
                    iov_base: st.out.as_ptr() as *mut libc::c_void,
                    iov_len: st.out.len(),
                };
                n += 1;
            }
            // SAFETY: a zeroed msghdr is valid; it points at `n` iovecs over buffers that the
            // state (locked by our caller) keeps alive and unchanged during the call.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            st.consume(sent as usize);
        }
        Ok(())
    }
}

/// The sink's state, locked; at unlock the connection's share of the back-pressure total is
/// brought up to date, so every change to what it holds is counted.
struct SinkGuard<'a>(MutexGuard<'a, SinkState>);

impl std::ops::Deref for SinkGuard<'_> {
    type Target = SinkState;
    fn deref(&self) -> &SinkState {
        &self.0
    }
}

impl std::ops::DerefMut for SinkGuard<'_> {
    fn deref_mut(&mut self) -> &mut SinkState {
        &mut self.0
    }
}

impl Drop for SinkGuard<'_> {
    fn drop(&mut self) {
        let held = self.0.held();
        self.0.share.update(held);
    }
}

/// Sends what the socket could not take at once, then ends the connection's output when the
/// reader is gone and every request is answered.
async fn write_loop<S: NbdStream>(stream: Arc<S>, sink: Arc<ConnSink>) {
    loop {
        let notified = sink.wake.notified();
        let owns = {
            let st = sink.lock();
            if st.finished() {
                break;
            }
            st.writer_owns && !st.broken
        };
        if !owns {
            notified.await;
            continue;
        }
        if let Err(e) = stream.wait_writable().await {
            sink.break_off(&mut sink.lock(), &e);
            continue;
        }
        let mut st = sink.lock();
        match stream.io_op(Interest::WRITABLE, || sink.push_out(&mut st)) {
            Ok(()) => st.writer_owns = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => sink.break_off(&mut st, &e),
        }
    }
    let st = sink.lock();
    if !st.broken && !st.keep_open {
        drop(st);
        // SAFETY: plain syscall on the socket, which `sink` keeps open.
        unsafe { libc::shutdown(sink.fd, libc::SHUT_WR) };
    }
}

/// One reply: simple, or structured for READ when structured replies were negotiated.
/// `data_len`: the READ data that follows (written by the caller).
fn encode_reply(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    command: Command,
    offset: u64,
    error: u32,
    data_len: Option<usize>,
) {
    let structured_read = structured && matches!(command, Command::Read | Command::BlockStatus);
    if !structured_read {
        simple_reply(out, cookie, error);
        return;
    }
    if error != 0 {
        chunk_error(out, cookie, error, "", true);
        return;
    }
    match data_len {
        Some(n) if n > 0 => chunk_offset_data_header(out, cookie, offset, n as u32, true),
        _ => chunk_none(out, cookie),
    }
}

/// Busy-polls `fd` for up to `poll` (a non-blocking `recv` in a loop, bypassing tokio's
/// readiness, which only the reactor sets): Some(result) of the first read that is not
/// `EAGAIN` (bytes appended to `buf`, at most `limit`; 0 = end of stream), None when `poll`
/// ran out first (or is zero).
fn poll_read(
    fd: RawFd,
    buf: &mut BytesMut,
    limit: usize,
    poll: Duration,
) -> Option<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(limit);
    debug_assert!(len > 0, "the reader reserves room before it reads");
    // SAFETY: `len` bytes of spare capacity that `buf` owns and we borrow mutably.
    let got = unsafe { poll_recv_raw(fd, spare.as_mut_ptr().cast(), len, poll) };
    if let Some(Ok(n)) = got {
        // SAFETY: recv initialised the first n (<= len) bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
    got
}

/// [`poll_read`] into a slice.
fn poll_recv(fd: RawFd, dst: &mut [u8], poll: Duration) -> Option<io::Result<usize>> {
    // SAFETY: `dst` is valid for writes of its length.
    unsafe { poll_recv_raw(fd, dst.as_mut_ptr(), dst.len(), poll) }
}

/// Some(result) of the first non-blocking `recv` of at most `len` bytes into `dst` that is
/// not `EAGAIN`, None when `poll` ran out first (or is zero).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn poll_recv_raw(
    fd: RawFd,
    dst: *mut u8,
    len: usize,
    poll: Duration,
) -> Option<io::Result<usize>> {
    spin_io(poll, || {
        // SAFETY: the caller guarantees `dst` takes `len` bytes.
        let n = unsafe { libc::recv(fd, dst.cast(), len, libc::MSG_DONTWAIT) };
        if n >= 0 {
            Ok(n as usize)
        } else {
            Err(io::Error::last_os_error())
        }
    })
}

/// Calls the non-blocking `op` in a loop for up to `poll`: Some(result) of the first call
/// that does not say `EAGAIN` (or `EINTR`), None when `poll` ran out first (or is zero).
pub(super) fn spin_io(
    poll: Duration,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    if poll.is_zero() {
        return None;
    }
    let start = std::time::Instant::now();
    loop {
        match op() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            done => return Some(done),
        }
        if start.elapsed() >= poll {
            return None;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod poll_tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn poll_read_returns_data_that_arrives_while_it_spins() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(b"hello").unwrap();
            theirs
        });
        let mut buf = BytesMut::with_capacity(64);
        let got = poll_read(ours.as_raw_fd(), &mut buf, 3, Duration::from_secs(5));
        assert_eq!(got.map(|r| r.unwrap()), Some(3), "at most `limit` bytes");
        assert_eq!(&buf[..], b"hel");
        let theirs = writer.join().unwrap();
        drop(theirs);
        let got = poll_read(ours.as_raw_fd(), &mut buf, 64, Duration::from_secs(5));
        assert_eq!(got.map(|r| r.unwrap()), Some(2));
        assert_eq!(&buf[..], b"hello");
        let got = poll_read(ours.as_raw_fd(), &mut buf, 64, Duration::from_secs(5));
        assert_eq!(
            got.map(|r| r.unwrap()),
            Some(0),
            "end of stream once the peer is gone"
        );
    }

    #[test]
    fn poll_read_gives_up_after_its_time() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut buf = BytesMut::with_capacity(64);
        assert!(poll_read(ours.as_raw_fd(), &mut buf, 64, Duration::ZERO).is_none());
        let start = Instant::now();
        let got = poll_read(ours.as_raw_fd(), &mut buf, 64, Duration::from_micros(2000));
        assert!(got.is_none(), "nothing was sent");
        assert!(start.elapsed() >= Duration::from_micros(2000));
        assert!(buf.is_empty());
    }
}
