//! Socket helpers shared by the NBD connections, the splice path and the peer link: the
//! stream trait they use, reads into a buffer of their own, busy-polling.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::sync::watch;

use crate::storage::engine::IoBuf;

/// Socket send buffer asked for (the kernel caps it at net.core.wmem_max): large READ
/// replies then usually fit in one `sendmsg`, without waiting for the writer task.
const SEND_BUFFER: libc::c_int = 4 << 20;

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

/// Best effort: a larger send buffer than the default (about 200 KiB). Unix sockets only: on
/// TCP a fixed size would switch off the kernel's buffer auto-tuning.
pub(super) fn set_send_buffer(fd: RawFd) {
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

/// Reads `len` bytes into a buffer of their own: first what `buf` already holds, the rest
/// straight from the socket, spinning up to `poll` each time the socket runs dry before it
/// sleeps. A peer that closes before the end is `UnexpectedEof`. With `stop` (an NBD
/// client's payload), a client that pauses for [`STOP_GRACE`] once the daemon is stopping
/// is cut off ([`wait_for_more`]).
pub(super) async fn read_buffered<S: NbdStream>(
    stream: &S,
    buf: &mut BytesMut,
    len: usize,
    poll: Duration,
    mut stop: Option<&mut watch::Receiver<bool>>,
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
                        match stop.as_deref_mut() {
                            Some(stop) => wait_for_more(stream, stop).await?,
                            None => stream.wait_readable().await?,
                        }
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

/// Once the daemon is stopping, how long an NBD client may pause in the middle of a WRITE
/// payload (streamed or buffered) before its write is cut off (the client's socket then
/// closes, and the write is never answered).
pub(super) const STOP_GRACE: Duration = Duration::from_secs(2);

/// Waits until the socket has more of a payload. Once the daemon is stopping, a client that
/// is still sending finishes its write, but one that sends nothing for [`STOP_GRACE`] ends it:
/// Err, and the write is never answered.
pub(super) async fn wait_for_more<S: NbdStream>(
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

/// Whether the other end of `fd` has shut down its sending side: its FIN (TCP) or its
/// `shutdown` (Unix socket) has reached us, even with bytes it sent before still unread
/// (`tcp_poll` and `unix_poll` report POLLRDHUP once the receive side is shut, whatever is
/// queued). One `poll` with a zero timeout. An error counts as not shut: the next read
/// reports it.
pub(super) fn peer_shut_write(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd we own, for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// readiness, which only the reactor sets): Some(result) of the first read that is not
/// `EAGAIN` (bytes appended to `buf`, at most `limit`; 0 = end of stream), None when `poll`
/// ran out first (or is zero).
pub(super) fn poll_read(
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
