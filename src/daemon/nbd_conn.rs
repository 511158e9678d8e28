//! NBD connections: the listener, the handshake, and the request loop. Each
//! connection has a reader (decodes requests, hands them to the core) and a
//! writer (encodes replies in completion order).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{lock, Shared, MAX_IO};
use crate::config::Listen;
use crate::core::{ConnId, Event, IoRequest};
use crate::nbd::consts::*;
use crate::nbd::{
    chunk_block_status, chunk_error, chunk_none, chunk_offset_data_header, simple_reply,
    transmission_flags, validate, Command, Decoded, ExportInfo, ExportQuery, HandshakeOptions,
    HandshakeStep, Negotiated, RequestDecoder, ServerHandshake,
};

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies with at least this much data are written without copying.
const ZERO_COPY_MIN: usize = 64 * 1024;

/// What the reader (and the core, through the dispatcher) tells the writer.
pub enum ConnMsg {
    /// A request handed to the core as `idx`.
    Register {
        idx: u64,
        cookie: u64,
        command: Command,
        offset: u64,
        flush_after: bool,
    },
    /// The core's answer for `idx`.
    Reply {
        idx: u64,
        result: Result<Option<Bytes>, u32>,
    },
    /// An answer decided without the core (validation errors, no-ops).
    Direct {
        cookie: u64,
        command: Command,
        error: u32,
    },
    BlockStatus {
        cookie: u64,
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    /// The reader stopped: finish what is registered, then close.
    ReaderDone,
}

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
            let _ = std::fs::remove_file(path);
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
                    tokio::spawn(serve(shared.clone(), conn, s, "unix socket".to_string()));
                }
                Err(e) => accept_error(e).await,
            },
            Listener::Tcp(l) => match l.accept().await {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(shared.clone(), conn, s, addr.to_string()));
                }
                Err(e) => accept_error(e).await,
            },
        }
    }
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

async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    shared: Arc<Shared>,
    conn: ConnId,
    stream: S,
    peer: String,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let neg = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&shared, conn, &mut rd, &mut wr, &mut inbuf),
    )
    .await
    {
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
    let (tx, rx) = mpsc::unbounded_channel();
    lock(&shared.conns).insert(conn, tx.clone());
    let writer = tokio::spawn(write_loop(
        shared.clone(),
        conn,
        wr,
        rx,
        neg.structured_replies,
    ));
    if let Err(e) = read_loop(&shared, conn, &mut rd, inbuf, &tx, &neg).await {
        tracing::warn!("NBD client {peer} (conn {conn}): {e}; closing");
    }
    let _ = tx.send(ConnMsg::ReaderDone);
    let _ = writer.await;
    lock(&shared.conns).remove(&conn);
    shared.with_core(|c| c.detach_client(conn));
    tracing::debug!("NBD client {peer} (conn {conn}) detached");
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

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    conn: ConnId,
    rd: &mut R,
    mut buf: BytesMut,
    tx: &mpsc::UnboundedSender<ConnMsg>,
    neg: &Negotiated,
) -> Result<(), String> {
    let mut dec = RequestDecoder::new(MAX_IO);
    let mut idx = 0u64;
    let mut events = Vec::new();
    let fast_zero = shared.disk.fast_zero();
    loop {
        let mut disc = false;
        loop {
            let d = dec.decode(&mut buf).map_err(|e| e.to_string())?;
            let Some(d) = d else { break };
            let (req, payload) = match d {
                Decoded::Request { req, payload } => (req, payload),
                Decoded::Oversized { req } => {
                    let _ = tx.send(ConnMsg::Direct {
                        cookie: req.cookie,
                        command: req.command,
                        error: NBD_EINVAL,
                    });
                    continue;
                }
            };
            if let Err(error) = validate(&req, neg) {
                let _ = tx.send(ConnMsg::Direct {
                    cookie: req.cookie,
                    command: req.command,
                    error,
                });
                continue;
            }
            let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
            let io = match req.command {
                Command::Disc => {
                    disc = true;
                    break;
                }
                Command::Cache => None,
                Command::BlockStatus => {
                    let extents = block_status(
                        shared,
                        req.offset,
                        req.length,
                        req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                    );
                    let context = neg.base_allocation_context.unwrap_or(0);
                    let _ = tx.send(ConnMsg::BlockStatus {
                        cookie: req.cookie,
                        context,
                        extents,
                    });
                    continue;
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
                    if req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 && !fast_zero {
                        let _ = tx.send(ConnMsg::Direct {
                            cookie: req.cookie,
                            command: req.command,
                            error: NBD_ENOTSUP,
                        });
                        continue;
                    }
                    Some(IoRequest::WriteZeroes {
                        offset: req.offset,
                        len: req.length,
                        may_trim: req.flags & NBD_CMD_FLAG_NO_HOLE == 0,
                    })
                }
                Command::Unknown(_) => {
                    let _ = tx.send(ConnMsg::Direct {
                        cookie: req.cookie,
                        command: req.command,
                        error: NBD_EINVAL,
                    });
                    continue;
                }
            };
            let Some(io) = io else {
                let _ = tx.send(ConnMsg::Direct {
                    cookie: req.cookie,
                    command: req.command,
                    error: 0,
                });
                continue;
            };
            idx += 1;
            let flush_after = fua && matches!(req.command, Command::Trim | Command::WriteZeroes);
            let _ = tx.send(ConnMsg::Register {
                idx,
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                flush_after,
            });
            events.push(Event::Request {
                conn,
                cookie: idx,
                req: io,
            });
        }
        if !events.is_empty() {
            shared.handle_many(events.drain(..));
        }
        if disc || shared.is_stopping() {
            return Ok(());
        }
        if buf.capacity() - buf.len() < 128 * 1024 {
            buf.reserve(512 * 1024);
        }
        let mut stop = shared.stop_rx.clone();
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                let n = n.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Ok(());
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

fn block_status(shared: &Shared, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
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

struct Pending {
    cookie: u64,
    command: Command,
    offset: u64,
    flush_after: bool,
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    conn: ConnId,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<ConnMsg>,
    structured: bool,
) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut reader_done = false;
    let mut broken = false;
    let mut next_internal = u64::MAX / 2;
    while !(reader_done && pending.is_empty()) {
        let Some(first) = rx.recv().await else { break };
        let mut msg = Some(first);
        let mut batch = 0;
        while let Some(m) = msg.take() {
            match m {
                ConnMsg::Register {
                    idx,
                    cookie,
                    command,
                    offset,
                    flush_after,
                } => {
                    pending.insert(
                        idx,
                        Pending {
                            cookie,
                            command,
                            offset,
                            flush_after,
                        },
                    );
                }
                ConnMsg::ReaderDone => reader_done = true,
                ConnMsg::Direct {
                    cookie,
                    command,
                    error,
                } => {
                    encode_reply(&mut out, structured, cookie, command, 0, error, None);
                }
                ConnMsg::BlockStatus {
                    cookie,
                    context,
                    extents,
                } => {
                    chunk_block_status(&mut out, cookie, context, &extents, true);
                }
                ConnMsg::Reply { idx, result } => {
                    let Some(p) = pending.remove(&idx) else {
                        tracing::error!("conn {conn}: reply for unknown request {idx}");
                        continue;
                    };
                    if p.flush_after && result.is_ok() {
                        // FUA on trim/zeroes: answer after a flush that follows the operation.
                        next_internal += 1;
                        let idx2 = next_internal;
                        pending.insert(
                            idx2,
                            Pending {
                                flush_after: false,
                                ..p
                            },
                        );
                        shared.handle(Event::Request {
                            conn,
                            cookie: idx2,
                            req: IoRequest::Flush,
                        });
                        continue;
                    }
                    match result {
                        Ok(Some(data)) if data.len() >= ZERO_COPY_MIN && !broken => {
                            encode_reply(
                                &mut out,
                                structured,
                                p.cookie,
                                p.command,
                                p.offset,
                                0,
                                Some(data.len()),
                            );
                            if wr.write_all(&out).await.is_err()
                                || wr.write_all(&data).await.is_err()
                            {
                                broken = true;
                            }
                            out.clear();
                        }
                        Ok(Some(data)) => {
                            encode_reply(
                                &mut out,
                                structured,
                                p.cookie,
                                p.command,
                                p.offset,
                                0,
                                Some(data.len()),
                            );
                            out.extend_from_slice(&data);
                        }
                        Ok(None) => encode_reply(
                            &mut out, structured, p.cookie, p.command, p.offset, 0, None,
                        ),
                        Err(e) => encode_reply(
                            &mut out, structured, p.cookie, p.command, p.offset, e, None,
                        ),
                    }
                }
            }
            batch += 1;
            if out.len() < 256 * 1024 && batch < 64 {
                msg = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            if !broken && wr.write_all(&out).await.is_err() {
                broken = true;
            }
            out.clear();
        }
    }
    if !broken {
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
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
