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

use super::socket::{read_buffered, spin_io, wait_for_more, NbdStream};
use crate::storage::engine::Disk;

/// Pipe capacity asked for (F_SETPIPE_SZ; the default, 64 KiB, if refused): how much of a
/// payload is taken from the socket before it is written.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Streamed data reaches the disk in whole blocks of this size (at device offsets that are
/// multiples of it), except for a payload's last bytes: a daemon killed in the middle of a
/// payload then leaves each block with its old or its new contents, never a mix (the page
/// cache copies whole pages before it looks at a fatal signal). Writing each piece as it
/// arrived left a block torn at byte 3,776 after a kill -9 (chaos seed 899370672701).
const WHOLE_BLOCK: u64 = 4096;

/// Of `avail` bytes that follow the first `done` of a `len`-byte payload at `offset`: how
/// many to write now so that the write ends on a [`WHOLE_BLOCK`] boundary (or at the
/// payload's end). The rest waits for more of the payload.
fn whole_blocks(offset: u64, done: usize, avail: usize, len: usize) -> usize {
    assert!(done + avail <= len, "more than the payload");
    if done + avail == len {
        return avail;
    }
    let start = offset + done as u64;
    let end = (start + avail as u64) / WHOLE_BLOCK * WHOLE_BLOCK;
    let n = end.saturating_sub(start) as usize;
    assert!(n <= avail && avail - n < WHOLE_BLOCK as usize);
    n
}

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

    /// Puts `data` (less than a block, into the empty pipe) ahead of what comes from the
    /// socket.
    fn put(&self, data: &[u8]) -> io::Result<()> {
        assert!(
            data.len() < WHOLE_BLOCK as usize,
            "more than the pipe takes at once"
        );
        // SAFETY: a write(2) from a live slice into a pipe we own.
        let n = unsafe { libc::write(self.write.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            // At most PIPE_BUF bytes into an empty pipe: written whole, or not at all.
            n if n as usize == data.len() => Ok(()),
            n => Err(io::Error::other(format!(
                "pipe took {n} of {} bytes",
                data.len()
            ))),
        }
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
/// [`STOP_GRACE`](super::socket::STOP_GRACE). (A client still sending at a stop finishes its
/// write: the stop drains.)
pub(super) async fn stream_payload<S: NbdStream>(
    mut src: Source<'_, S>,
    dest: Dest<'_>,
) -> Streamed {
    match copy_payload(&mut src, dest).await {
        Ok(Ok(())) => Streamed::written(),
        Ok(Err((e, left))) => {
            // What is in the pipe goes with the failed write; the caller drops the pipe.
            let conn = drop_payload(src.stream, src.buf, left, src.poll, src.stop).await;
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
    let head = whole_blocks(offset, 0, have, len);
    let written = disk.write_now(offset, &buf[..head]);
    // The rest of the last block waits in the pipe for the bytes that complete it.
    let queued = written.and_then(|()| pipe.put(&buf[head..have]));
    buf.advance(have);
    if let Err(e) = queued {
        return Ok(Err((e, len - have)));
    }
    let sock = stream.as_raw_fd();
    let mut done = head;
    let mut in_pipe = have - head;
    while done < len {
        debug_assert!(done + in_pipe < len && in_pipe < WHOLE_BLOCK as usize);
        let want = len - done - in_pipe;
        let got = match pipe.fill_from(sock, want) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match spin_io(poll, || pipe.fill_from(sock, want)) {
                    Some(got) => got,
                    None => {
                        // Once more through tokio, so its readiness is cleared before we
                        // wait for the reactor to set it again.
                        match stream.io_op(Interest::READABLE, || pipe.fill_from(sock, want)) {
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
        // The pipe now holds `in_pipe` bytes: write the whole blocks among them.
        in_pipe += n;
        let mut left = whole_blocks(offset, done, in_pipe, len);
        while left > 0 {
            match disk.write_from_pipe(pipe.read.as_fd(), offset + done as u64, left) {
                Ok(moved) => {
                    left -= moved;
                    done += moved;
                    in_pipe -= moved;
                }
                Err(e) => return Ok(Err((e, len - done - in_pipe))),
            }
        }
    }
    assert_eq!(in_pipe, 0, "payload bytes left in the pipe");
    Ok(Ok(()))
}

/// Reads and drops the rest of a payload, so the next request header is next on the socket.
/// A client that pauses through a stop is cut off, as while streaming: the stop waits for
/// this reader.
async fn drop_payload<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        read_buffered(stream, buf, n, poll, Some(&mut *stop)).await?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{whole_blocks, WHOLE_BLOCK};

    const B: usize = WHOLE_BLOCK as usize;

    #[test]
    fn writes_end_on_block_boundaries_until_the_payload_ends() {
        // Aligned payload of 3 blocks, pieces arriving at odd sizes.
        assert_eq!(whole_blocks(0, 0, 3776, 3 * B), 0);
        assert_eq!(whole_blocks(0, 0, B + 10, 3 * B), B);
        assert_eq!(whole_blocks(0, B, 2 * B - 1, 3 * B), B);
        assert_eq!(
            whole_blocks(0, 2 * B, B, 3 * B),
            B,
            "the end is written whole"
        );
        // An unaligned start: the first write ends at the first boundary.
        assert_eq!(whole_blocks(512, 0, B, 3 * B), B - 512);
        // An unaligned end: the last bytes are written at the payload's end only.
        assert_eq!(whole_blocks(0, 0, B + 100, B + 100), B + 100);
        assert_eq!(whole_blocks(0, 0, B + 99, B + 100), B);
    }

    #[test]
    fn what_waits_is_always_less_than_a_block() {
        for offset in [0u64, 512, 4095, 8192] {
            for len in [1usize, 511, B, 3 * B + 7] {
                for done in (0..len).step_by(333) {
                    for avail in (0..=len - done).step_by(97) {
                        let n = whole_blocks(offset, done, avail, len);
                        assert!(n <= avail);
                        assert!(avail - n < B);
                        let end = offset + (done + n) as u64;
                        assert!(done + n == len || end % WHOLE_BLOCK == 0 || n == 0);
                    }
                }
            }
        }
    }
}
