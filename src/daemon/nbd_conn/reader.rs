//! The request loop of one connection: reads and decodes requests, hands them to the core in
//! batches, reads large WRITE payloads into their own buffers or splices them to the disk,
//! holds back under back-pressure, and stops at a request boundary at a stop or a hand-over.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::request::ReqCtx;
use super::sink::ConnSink;
use crate::core::{ConnId, Event};
use crate::daemon::socket::{poll_read, read_buffered, NbdStream};
use crate::daemon::{backpressure, disk_io, splice, Shared, MAX_IO};
use crate::nbd::{Decoded, Negotiated, RequestDecoder};

/// WRITE payloads at least this large are read straight into their own buffer.
const DIRECT_PAYLOAD_MIN: u32 = 64 * 1024;
/// What is read after a large write payload: a header and some.
const SMALL_READ: usize = 4096;
/// How long a reader spins for the rest of a large WRITE payload before it sleeps, unless
/// `[nbd] busy-poll-us` is 0: 1 MiB QD8 writes 2,419 -> 2,799 MiB/s (medians of 6
/// alternating runs; 50 µs gave 2,381 -> 2,494), docs/BENCH.md.
const PAYLOAD_POLL: Duration = Duration::from_micros(150);

/// Why a connection's reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReaderEnd {
    /// The client left, sent NBD_CMD_DISC, or the daemon stops (after every request it had
    /// begun to read went to the core): the connection closes once those are answered.
    Closed,
    /// A restart: stopped between two requests, the socket goes to the next process.
    AtBoundary,
}

/// How long a reader waits, at a stop or a restart, for the rest of a request it has begun to
/// read.
const BOUNDARY_GRACE: Duration = Duration::from_secs(2);

/// The daemon stops or restarts: hands the core every whole request already read, then reads
/// exactly the rest of a request read in part (never a byte of the next one) and hands it
/// over too, so the reader ends at a request boundary. At a restart the next process starts
/// there; at a plain stop the connection closes once those requests are answered (a client
/// that paused in the middle of a request as the stop came still gets its answer, instead of
/// an I/O error for a request it sent whole). The stop waits for this (`Shared::readers`).
async fn stopped<S: NbdStream>(
    stream: &S,
    dec: &mut RequestDecoder,
    buf: &mut BytesMut,
    ctx: &mut ReqCtx<'_>,
    events: &mut Vec<Event>,
) -> Result<ReaderEnd, String> {
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
            return Ok(if ctx.shared.is_handing_over() {
                ReaderEnd::AtBoundary
            } else {
                ReaderEnd::Closed
            });
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
                let instead = if ctx.shared.is_handing_over() {
                    " instead of handing it over"
                } else {
                    ""
                };
                return Err(format!(
                    "the client sent only part of a request within {BOUNDARY_GRACE:?} of the \
                     stop; closing the connection{instead} (that request is not answered)"
                ));
            }
            Ok(Ok(0)) => return Ok(ReaderEnd::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
}

pub(super) async fn read_loop<S: NbdStream>(
    shared: &Arc<Shared>,
    conn: ConnId,
    stream: &S,
    sink: &Arc<ConnSink>,
    mut buf: BytesMut,
    neg: &Negotiated,
) -> Result<ReaderEnd, String> {
    // Counted until this loop ends, however it ends: a stop waits for it.
    let _running = shared.reader_running();
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
        shut: false,
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
                ctx.submit(&mut events);
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
                ctx.submit(&mut events);
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
                        ctx.submit(&mut events);
                        return Err(payload_error(e));
                    }
                } else {
                    let payload = read_payload(
                        stream,
                        &mut buf,
                        req.length as usize,
                        payload_poll,
                        &mut stop,
                    )
                    .await?;
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
/// the rest straight from the socket. Through a stop as a streamed payload: the client
/// finishes its write, unless it pauses for `socket::STOP_GRACE` (then the write is cut off,
/// never answered).
async fn read_payload<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Bytes, String> {
    read_buffered(stream, buf, len, poll, Some(stop))
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
