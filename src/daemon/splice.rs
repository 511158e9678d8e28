//! WRITE payloads moved from the client's socket to the disk with splice(2), never through
//! our memory: socket -> pipe (the kernel moves references to the socket's pages) -> page
//! cache (one copy, by the kernel). A 1 MiB write then costs one copy on our side instead of
//! two (socket -> buffer, buffer -> page cache).
//!
//! Only for writes the core admits ([`Event::StreamWrite`](crate::core::Event), nothing
//! but the local disk needs the data). The reader writes each piece as it arrives, so the
//! client keeps sending while the disk side works.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::sync::watch;

use super::socket::{read_buffered, spin_io, NbdStream};
use crate::storage::engine::Disk;

/// Pipe capacity asked for (F_SETPIPE_SZ; the default, 64 KiB, if refused): how much of a
/// payload is taken from the socket before it is written.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Once the daemon is stopping, how long a client may pause in the middle of a streamed
/// payload before its write is cut off (the client's socket then closes, and the write is
/// never answered).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A pipe between a client's socket and the disk. Empty between payloads; dropped (and its
/// contents with it) when a payload does not finish.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Best effort: a smaller pipe only means more rounds.
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { read, write })
    }

    /// One non-blocking splice of at most `len` bytes from `sock` into the pipe.
    fn fill_from(&self, sock: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on valid fds, no offsets.
        let n = unsafe {
            libc::splice(
                sock,
                std::ptr::null_mut(),
                self.write.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Where a streamed payload comes from: the client's socket, what the reader has already
/// read of it (`buf`), the connection's pipe, how long to spin when the socket runs dry,
/// and the daemon's stop signal.
pub(super) struct Source<'a, S> {
    pub stream: &'a S,
    pub buf: &'a mut BytesMut,
    pub pipe: &'a Pipe,
    pub poll: Duration,
    pub stop: &'a mut watch::Receiver<bool>,
}

/// Where a streamed payload goes: `len` bytes at `offset` of `disk`.
pub(super) struct Dest<'a> {
    pub disk: &'a Disk,
    pub offset: u64,
    pub len: usize,
}

/// How a streamed payload ended: what the disk made of it, and whether the connection is
/// still in step (the whole payload read). Both can fail: a disk error, and then the client
/// leaves while the rest of its payload is being dropped.
pub(super) struct Streamed {
    /// Ok: every byte that arrived is in the page cache (all `len` of them when `conn` is
    /// Ok). Err: the disk failed this write; the rest of the payload was read and dropped.
    pub disk: io::Result<()>,
    /// Err: the payload was cut off (the client left, or paused through a stop); the write
    /// must not be answered, and the connection ends. `pipe` may then hold data.
    pub conn: io::Result<()>,
}

impl Streamed {
    fn written() -> Streamed {
        Streamed {
            disk: Ok(()),
            conn: Ok(()),
        }
    }

    fn cut(e: io::Error) -> Streamed {
        Streamed {
            disk: Ok(()),
            conn: Err(e),
        }
    }

    /// The disk failed; `conn` is how dropping the rest of the payload went.
    fn disk_failed(e: io::Error, conn: io::Result<()>) -> Streamed {
        Streamed { disk: Err(e), conn }
    }
}

/// Copies a WRITE payload from `stream` to its [`Dest`]: first what
/// `buf` already holds (a plain write), then socket -> `pipe` -> disk, each piece written
/// while the rest is on its way, spinning up to `poll` when the socket runs dry before it
/// sleeps. The payload is cut off ([`Streamed::conn`]) when the connection fails (the client
/// left mid-payload), or when the daemon is stopping (`stop`) and the client paused for
/// [`STOP_GRACE`]. (A client still sending at a stop finishes its write: the stop drains.)
pub(super) async fn stream_payload<S: NbdStream>(
    mut src: Source<'_, S>,
    dest: Dest<'_>,
) -> Streamed {
    match copy_payload(&mut src, dest).await {
        Ok(Ok(())) => Streamed::written(),
        Ok(Err((e, left))) => {
            // What is in the pipe goes with the failed write; the caller drops the pipe.
            let conn = drop_payload(src.stream, src.buf, left, src.poll).await;
            Streamed::disk_failed(e, conn)
        }
        Err(e) => Streamed::cut(e),
    }
}

/// The copy of [`stream_payload`]. Outer Err: the payload was cut off. Inner Err: the disk
/// failed, with how many payload bytes are still on the socket.
async fn copy_payload<S: NbdStream>(
    src: &mut Source<'_, S>,
    dest: Dest<'_>,
) -> io::Result<Result<(), (io::Error, usize)>> {
    let Source {
        stream,
        ref mut buf,
        pipe,
        poll,
        ref mut stop,
    } = *src;
    let Dest { disk, offset, len } = dest;
    let have = buf.len().min(len);
    let head = disk.write_now(offset, &buf[..have]);
    buf.advance(have);
    if let Err(e) = head {
        return Ok(Err((e, len - have)));
    }
    let sock = stream.as_raw_fd();
    let mut done = have;
    while done < len {
        let got = match pipe.fill_from(sock, len - done) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match spin_io(poll, || pipe.fill_from(sock, len - done)) {
                    Some(got) => got,
                    None => {
                        // Once more through tokio, so its readiness is cleared before we
                        // wait for the reactor to set it again.
                        match stream.io_op(Interest::READABLE, || pipe.fill_from(sock, len - done))
                        {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                wait_for_more(stream, stop).await?;
                                continue;
                            }
                            got => got,
                        }
                    }
                }
            }
            got => got,
        };
        let n = match got {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // The pipe now holds exactly n bytes: write them all before taking more.
        let mut left = n;
        while left > 0 {
            let at = offset + (done + n - left) as u64;
            match disk.write_from_pipe(pipe.read.as_fd(), at, left) {
                Ok(moved) => left -= moved,
                Err(e) => return Ok(Err((e, len - done - n))),
            }
        }
        done += n;
    }
    Ok(Ok(()))
}

/// Waits until the socket has more of the payload. Once the daemon is stopping, a client that
/// is still sending finishes its write, but one that sends nothing for [`STOP_GRACE`] ends it:
/// Err, and the write is never answered.
async fn wait_for_more<S: NbdStream>(
    stream: &S,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    if !*stop.borrow() {
        tokio::select! {
            r = stream.wait_readable() => return r,
            // Err: the sender is gone, which only happens when the daemon is ending.
            _ = stop.changed() => {}
        }
    }
    match tokio::time::timeout(STOP_GRACE, stream.wait_readable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::other(format!(
            "the daemon is stopping and the client sent nothing of the rest of a write \
             payload for {} ms",
            STOP_GRACE.as_millis()
        ))),
    }
}

/// Reads and drops the rest of a payload, so the next request header is next on the socket.
async fn drop_payload<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        read_buffered(stream, buf, n, poll).await?;
        left -= n;
    }
    Ok(())
}
