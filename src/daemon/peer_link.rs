//! The peer link: both nodes listen and dial; after mutual authentication and
//! the Hello exchange one connection becomes the active link. When both dial at
//! once, the connection dialed by the node whose name sorts first wins, on both
//! sides. Messages are framed by the peer codec; the core decides everything else.
//!
//! Sending: the core's messages are queued, in its order, under the core lock
//! ([`PeerCtl::send`]); right after the lock is released the same thread encodes them (CRC
//! included, data by reference) and sends them with one non-blocking `sendmsg`
//! ([`flush_queued`]). Only when the socket is full does the link's writer task take over,
//! waiting for it to drain, with later messages queued behind: no hand-off to another thread
//! in the common case, and no thread blocks on the network.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{lock, Shared};
use crate::core::Event;
use crate::peer::{
    encode, encode_split, AuthStep, Authenticator, Decoder, Hello, Message, DEFAULT_MAX_PAYLOAD,
};

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Data at least this large is sent from its own buffer (vectored), not copied.
const ZERO_COPY_MIN: usize = 8 * 1024;
/// Frames at least this large are read straight into their own buffer.
const DIRECT_FRAME_MIN: usize = 64 * 1024;
/// What is read after a large frame: a header and some.
const SMALL_READ: usize = 4096;
/// Most slices gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

struct Active {
    id: u64,
    out: Arc<PeerOut>,
    /// Dialed by the node whose name sorts first.
    preferred: bool,
    reader: tokio::task::AbortHandle,
}

#[derive(Default)]
pub struct PeerCtl {
    /// The core wants a link.
    pub want: bool,
    active: Option<Active>,
    next_id: u64,
}

impl PeerCtl {
    /// Queues `m` on the active link (called under the core lock, so messages keep its
    /// order); this thread sends it at its next [`flush_queued`].
    pub fn send(&self, m: Message) {
        if let Some(a) = &self.active {
            a.out.queue(m);
        }
    }

    /// Closes the active link: queued messages are still written, nothing more is read.
    pub fn drop_active(&mut self) {
        if let Some(a) = self.active.take() {
            a.reader.abort();
            a.out.close();
        }
    }

    fn is_active(&self, id: u64) -> bool {
        self.active.as_ref().is_some_and(|a| a.id == id)
    }
}

pub async fn run(shared: Arc<Shared>) {
    let (Some(me), Some(peer)) = (
        shared.settings.node().address,
        shared.settings.peer().and_then(|p| p.address),
    ) else {
        return;
    };
    let listener = loop {
        match tokio::net::TcpListener::bind(me).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!("cannot listen for the peer on {me}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let accept = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, addr)) => {
                        tokio::spawn(establish(shared.clone(), s, addr, false));
                    }
                    Err(e) => {
                        tracing::warn!("peer accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    dial_loop(shared, peer).await;
    accept.abort();
}

fn i_sort_first(shared: &Shared) -> bool {
    shared
        .settings
        .peer()
        .is_some_and(|p| shared.settings.node().name < p.name)
}

async fn dial_loop(shared: Arc<Shared>, peer: SocketAddr) {
    let retry = Duration::from_millis(shared.settings.net.connect_retry_ms);
    loop {
        let (want, active) = {
            let p = lock(&shared.peer);
            (p.want, p.active.is_some())
        };
        if !want || active {
            let wake = shared.peer_wake.notified();
            tokio::select! {
                _ = wake => {},
                _ = tokio::time::sleep(retry) => {},
            }
            continue;
        }
        if !i_sort_first(&shared) {
            // Give the preferred direction a head start so both rarely dial at once.
            tokio::time::sleep(retry / 2).await;
            if lock(&shared.peer).active.is_some() {
                continue;
            }
        }
        match tokio::time::timeout(retry.max(Duration::from_secs(1)), TcpStream::connect(peer))
            .await
        {
            Ok(Ok(s)) => establish(shared.clone(), s, peer, true).await,
            Ok(Err(e)) => tracing::debug!("connecting to peer {peer}: {e}"),
            Err(_) => tracing::debug!("connecting to peer {peer}: timed out"),
        }
        tokio::time::sleep(retry).await;
    }
}

/// Authenticates, exchanges Hello, and makes the link active if it should be.
async fn establish(shared: Arc<Shared>, mut s: TcpStream, addr: SocketAddr, dialed: bool) {
    let _ = s.set_nodelay(true);
    if shared.is_stopping() {
        return;
    }
    let secret = match super::setup::secret(&shared.settings) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let me = shared.settings.node().name.clone();
    let hello = match tokio::time::timeout(
        AUTH_TIMEOUT,
        greet(&shared, &mut s, &mut inbuf, &secret, &me),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!("peer {addr}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("peer {addr}: no authentication and Hello within {AUTH_TIMEOUT:?}");
            return;
        }
    };
    let preferred = dialed == i_sort_first(&shared);
    let s = Arc::new(s);
    let id;
    {
        let mut p = lock(&shared.peer);
        if !p.want {
            return;
        }
        if let Some(a) = &p.active {
            if a.preferred || !preferred {
                tracing::debug!("peer {addr}: a link is already up; closing this one");
                return;
            }
        }
        p.next_id += 1;
        id = p.next_id;
    }
    // Replacing a non-preferred link: the core sees it go down first.
    let replaced = {
        let mut p = lock(&shared.peer);
        let had = p.active.is_some();
        p.drop_active();
        had
    };
    if replaced {
        shared.handle(Event::PeerDown {
            reason: "replaced by the preferred connection".into(),
        });
    }
    let out = Arc::new(PeerOut::new(s.clone()));
    tokio::spawn(write_loop(shared.clone(), id, s.clone(), out.clone()));
    let reader = tokio::spawn(read_loop(shared.clone(), id, s, inbuf));
    {
        let mut p = lock(&shared.peer);
        p.active = Some(Active {
            id,
            out,
            preferred,
            reader: reader.abort_handle(),
        });
    }
    tracing::info!(
        "peer link up with {} at {addr} ({})",
        hello.node,
        if dialed { "dialed" } else { "accepted" }
    );
    // PeerUp is fed under the core lock only if this link is still the active one.
    shared.with_core(|c| {
        if lock(&shared.peer).is_active(id) {
            c.handle(Event::PeerUp { hello });
        }
    });
}

/// Mutual authentication, then our Hello out and the peer's Hello in.
async fn greet(
    shared: &Arc<Shared>,
    s: &mut TcpStream,
    inbuf: &mut BytesMut,
    secret: &[u8],
    me: &str,
) -> Result<Hello, String> {
    let mut auth = Authenticator::new(secret, me, &shared.settings.resource)
        .map_err(|e| format!("authentication setup: {e}"))?;
    let mut out = BytesMut::new();
    loop {
        auth.take_output(&mut out);
        if !out.is_empty() {
            s.write_all(&out)
                .await
                .map_err(|e| format!("write during authentication: {e}"))?;
            out.clear();
        }
        match auth
            .feed(inbuf)
            .map_err(|e| format!("failed authentication: {e}"))?
        {
            AuthStep::NeedMore => {
                auth.take_output(&mut out);
                if !out.is_empty() {
                    s.write_all(&out)
                        .await
                        .map_err(|e| format!("write during authentication: {e}"))?;
                    out.clear();
                }
                if s.read_buf(inbuf)
                    .await
                    .map_err(|e| format!("read during authentication: {e}"))?
                    == 0
                {
                    return Err("closed the connection during authentication".into());
                }
            }
            AuthStep::Done { .. } => {
                auth.take_output(&mut out);
                if !out.is_empty() {
                    s.write_all(&out)
                        .await
                        .map_err(|e| format!("write during authentication: {e}"))?;
                    out.clear();
                }
                break;
            }
        }
    }
    let hello = shared.core().hello();
    encode(&Message::Hello(hello), &mut out);
    s.write_all(&out)
        .await
        .map_err(|e| format!("write of Hello: {e}"))?;
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    loop {
        match dec
            .decode(inbuf)
            .map_err(|e| format!("bad message before Hello: {e}"))?
        {
            Some(Message::Hello(h)) => return Ok(h),
            Some(other) => return Err(format!("expected Hello, got {other:?}")),
            None => {
                if s.read_buf(inbuf)
                    .await
                    .map_err(|e| format!("read of Hello: {e}"))?
                    == 0
                {
                    return Err("closed the connection before Hello".into());
                }
            }
        }
    }
}

async fn read_loop(shared: Arc<Shared>, id: u64, rd: Arc<TcpStream>, mut buf: BytesMut) {
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    let mut msgs = Vec::new();
    // After a large frame, the next read takes little more than a header, so the next large
    // payload is not read into (and then copied out of) the receive buffer.
    let mut after_large = false;
    let reason = loop {
        let mut err = None;
        let mut large = None;
        loop {
            // A large frame not yet complete is read straight into its own buffer below.
            if let Ok(Some(total)) = dec.frame_len(&buf) {
                if total >= DIRECT_FRAME_MIN && buf.len() < total {
                    large = Some(total);
                    break;
                }
            }
            match dec.decode(&mut buf) {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    err = Some(format!("bad message from the peer: {e}"));
                    break;
                }
            }
        }
        if !msgs.is_empty() {
            // A batch: the peer's writes go to the page cache on this thread, and the NBD
            // replies their acks release leave together.
            super::disk_io::batch(&shared, || {
                shared.with_core(|c| {
                    if lock(&shared.peer).is_active(id) {
                        for m in msgs.drain(..) {
                            c.handle(Event::PeerMsg(m));
                        }
                    }
                })
            });
            msgs.clear();
        }
        if let Some(e) = err {
            break e;
        }
        if let Some(total) = large {
            match read_frame(&rd, &mut buf, total).await {
                Ok(frame) => match dec.decode_frame(frame) {
                    Ok(m) => {
                        msgs.push(m);
                        after_large = true;
                    }
                    Err(e) => break format!("bad message from the peer: {e}"),
                },
                Err(e) => break e,
            }
            continue;
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        let limit = if std::mem::take(&mut after_large) {
            SMALL_READ
        } else {
            usize::MAX
        };
        match read_some(&rd, &mut buf, limit).await {
            Ok(0) => break "the peer closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read from the peer: {e}"),
        }
    };
    link_ended(&shared, id, &reason);
}

/// Reads a frame of `total` bytes into its own buffer: first what `buf` holds, the rest
/// straight from the socket.
async fn read_frame(s: &TcpStream, buf: &mut BytesMut, total: usize) -> Result<Bytes, String> {
    // No busy-polling on the peer link (docs/ARCHITECTURE.md).
    super::nbd_conn::read_buffered(s, buf, total, Duration::ZERO)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
            _ => format!("read from the peer: {e}"),
        })
}

/// Reads what the socket has, at most `limit` bytes (waiting until it has something).
async fn read_some(s: &TcpStream, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
    loop {
        match s.try_read_buf(&mut (&mut *buf).limit(limit)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.readable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

thread_local! {
    /// The link this thread queued messages on and has not sent yet.
    static QUEUED: RefCell<Option<Arc<PeerOut>>> = const { RefCell::new(None) };
}

/// Sends what this thread queued under the core lock. Called right after the lock is released.
pub fn flush_queued() {
    if let Some(out) = QUEUED.with(|q| q.borrow_mut().take()) {
        out.flush();
    }
}

/// The sending side of one link (see the module comment).
pub struct PeerOut {
    fd: RawFd,
    /// Keeps the socket (and so `fd`) open for as long as anyone may send on it.
    _stream: Arc<TcpStream>,
    state: Mutex<OutState>,
    /// Wakes the writer task: the socket is full, the link failed or was closed.
    wake: Notify,
}

#[derive(Default)]
struct OutState {
    /// Queued in the core's order, not yet encoded.
    msgs: VecDeque<Message>,
    /// A thread is encoding and sending (others only queue).
    sending: bool,
    /// Encoded but not sent: the socket was full, and the writer task owns the sending.
    backlog: VecDeque<Bytes>,
    writer_owns: bool,
    /// The link was dropped: send what is queued, then shut the socket down.
    closed: bool,
    /// Sending failed.
    failed: Option<String>,
}

impl PeerOut {
    fn new(stream: Arc<TcpStream>) -> PeerOut {
        PeerOut {
            fd: stream.as_raw_fd(),
            _stream: stream,
            state: Mutex::new(OutState::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        lock(&self.state)
    }

    fn queue(self: &Arc<Self>, m: Message) {
        self.lock().msgs.push_back(m);
        QUEUED.with(|q| {
            let mut q = q.borrow_mut();
            match q.as_ref() {
                Some(other) if Arc::ptr_eq(other, self) => {}
                Some(other) => {
                    // Queued on a link that has since been replaced: the writer task of the
                    // old one sends (or drops) what it holds.
                    other.wake.notify_one();
                    *q = Some(self.clone());
                }
                None => *q = Some(self.clone()),
            }
        });
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Encodes and sends everything queued, without blocking; if the socket fills up, the
    /// writer task takes over what is left.
    fn flush(&self) {
        let mut st = self.lock();
        if st.sending || st.writer_owns || st.failed.is_some() || st.msgs.is_empty() {
            return;
        }
        st.sending = true;
        loop {
            let msgs = std::mem::take(&mut st.msgs);
            drop(st);
            let mut chunks = VecDeque::new();
            let res = encode_all(msgs).and_then(|c| {
                chunks = c;
                send_chunks(self.fd, &mut chunks)
            });
            st = self.lock();
            match res {
                Ok(()) if st.msgs.is_empty() => {
                    st.sending = false;
                    if st.closed {
                        self.wake.notify_one();
                    }
                    return;
                }
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    st.backlog = chunks;
                    st.writer_owns = true;
                    st.sending = false;
                    self.wake.notify_one();
                    return;
                }
                Err(e) => {
                    st.failed = Some(format!("write to the peer: {e}"));
                    st.sending = false;
                    self.wake.notify_one();
                    return;
                }
            }
        }
    }
}

/// Frames `msgs` in order: fixed fields copied together, bulk data by reference. A message
/// too large for a frame is an error (the link is dropped, not the daemon).
fn encode_all(msgs: VecDeque<Message>) -> io::Result<VecDeque<Bytes>> {
    let mut chunks = VecDeque::new();
    let mut head = BytesMut::with_capacity(msgs.len() * 64);
    for m in &msgs {
        let tail = encode_split(m, &mut head).map_err(io::Error::other)?;
        if tail.len() >= ZERO_COPY_MIN {
            chunks.push_back(head.split().freeze());
            chunks.push_back(tail);
        } else if !tail.is_empty() {
            head.extend_from_slice(&tail);
        }
    }
    if !head.is_empty() {
        chunks.push_back(head.freeze());
    }
    Ok(chunks)
}

/// Sends `chunks` with non-blocking vectored writes until all are out (Ok) or the socket is
/// full (WouldBlock); sent bytes are removed from `chunks`.
fn send_chunks(fd: RawFd, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !chunks.is_empty() {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for c in chunks.iter().take(MAX_IOV) {
            iov[n] = libc::iovec {
                iov_base: c.as_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            };
            n += 1;
        }
        // SAFETY: a zeroed msghdr is valid; it points at `n` iovecs over `chunks`, which stay
        // alive and unchanged during the call.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut left = sent as usize;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            let take = left.min(front.len());
            front.advance(take);
            left -= take;
            if front.is_empty() {
                chunks.pop_front();
            }
        }
    }
    Ok(())
}

/// Sends what the socket could not take at once (and what is queued after it), reports a
/// failed link, and after [`PeerOut::close`] sends what is left and shuts the socket down.
async fn write_loop(shared: Arc<Shared>, id: u64, s: Arc<TcpStream>, out: Arc<PeerOut>) {
    loop {
        let notified = out.wake.notified();
        let owns = {
            let mut st = out.lock();
            if let Some(reason) = st.failed.clone() {
                drop(st);
                link_ended(&shared, id, &reason);
                return;
            }
            if !st.writer_owns && !st.sending && st.closed {
                if st.msgs.is_empty() {
                    break;
                }
                // Nobody will flush a closed link's last messages: send them from here.
                st.writer_owns = true;
            }
            if st.writer_owns && st.backlog.is_empty() {
                let msgs = std::mem::take(&mut st.msgs);
                match encode_all(msgs) {
                    Ok(chunks) => st.backlog = chunks,
                    Err(e) => {
                        st.failed = Some(format!("write to the peer: {e}"));
                        continue;
                    }
                }
                if st.backlog.is_empty() {
                    st.writer_owns = false;
                }
            }
            st.writer_owns
        };
        if !owns {
            notified.await;
            continue;
        }
        if let Err(e) = s.writable().await {
            out.lock().failed = Some(format!("write to the peer: {e}"));
            continue;
        }
        let mut st = out.lock();
        let mut backlog = std::mem::take(&mut st.backlog);
        match s.try_io(Interest::WRITABLE, || send_chunks(out.fd, &mut backlog)) {
            Ok(()) => {
                if st.msgs.is_empty() {
                    st.writer_owns = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.backlog = backlog,
            Err(e) => st.failed = Some(format!("write to the peer: {e}")),
        }
    }
    // SAFETY: plain syscall on the socket, which `s` keeps open.
    unsafe { libc::shutdown(out.fd, libc::SHUT_WR) };
}

fn link_ended(shared: &Arc<Shared>, id: u64, reason: &str) {
    let was_active = {
        let mut p = lock(&shared.peer);
        if p.is_active(id) {
            p.drop_active();
            true
        } else {
            false
        }
    };
    if was_active {
        tracing::warn!("peer link lost: {reason}");
        shared.handle(Event::PeerDown {
            reason: reason.to_string(),
        });
        shared.peer_wake.notify_one();
    }
}
