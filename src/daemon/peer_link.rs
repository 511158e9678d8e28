//! The peer link's plumbing: listen, dial when the core asks ([`Action::Dial`]),
//! authenticate, then carry framed messages both ways, each tagged with its
//! connection's id. Which connection carries the peer session, when to dial and
//! when to close is the core's decision (`core/links.rs`, `core/session.rs`):
//! every authenticated connection is offered to it ([`Event::ConnOffered`]),
//! every message read is fed to it in order ([`Event::PeerMsg`]), and every
//! offered connection ends with exactly one [`Event::ConnDown`].
//!
//! Sending: the core's messages are queued, in its order, under the core lock
//! ([`PeerCtl::send`]); right after the lock is released the same thread encodes them (CRC
//! included, data by reference) and sends them with one non-blocking `sendmsg`
//! ([`flush_queued`]). Only when the socket is full does the link's writer task take over,
//! waiting for it to drain, with later messages queued behind: no hand-off to another thread
//! in the common case, and no thread blocks on the network.
//!
//! [`Action::Dial`]: crate::core::Action::Dial

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use super::{lock, Shared};
use crate::core::{Event, LinkId};
use crate::peer::{
    encode_split, AuthStep, Authenticator, Decoder, Endpoints, Message, DEFAULT_MAX_PAYLOAD,
};

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being authenticated at once (accepted and dialed); more are
/// refused at once, so unauthenticated parties cannot pile up buffers.
const MAX_AUTHENTICATING: usize = 4;
/// How long a closed connection may take to send what was queued on it.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);
/// Data at least this large is sent from its own buffer (vectored), not copied.
const ZERO_COPY_MIN: usize = 8 * 1024;
/// Frames at least this large are read straight into their own buffer.
const DIRECT_FRAME_MIN: usize = 64 * 1024;
/// What is read after a large frame: a header and some.
const SMALL_READ: usize = 4096;
/// Most slices gathered into one `sendmsg`.
const MAX_IOV: usize = 64;
/// Bytes queued for the peer (messages not yet sent) above which the link counts as not
/// draining; the replication traffic that fills it is bounded upstream (NBD bytes held,
/// the resync window), so only a peer that stops reading gets here.
pub const PEER_SEND_MAX_BYTES: u64 = 256 << 20;
/// How often the writer task looks at a link it is waiting to send on.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// What a queued message counts for besides its data.
const MSG_OVERHEAD: u64 = 64;

/// The open peer connections, by the id the core knows them by.
#[derive(Default)]
pub struct PeerCtl {
    links: HashMap<LinkId, Arc<PeerOut>>,
    next_id: LinkId,
    /// The core asked for a dial that the dialer has not started yet.
    dial_wanted: bool,
}

impl PeerCtl {
    /// Queues `m` on connection `link` (called under the core lock, so messages keep its
    /// order); this thread sends it at its next [`flush_queued`]. A connection that is
    /// gone by now drops it: its `ConnDown` is on the way to the core.
    pub fn send(&self, link: LinkId, m: Message) {
        if let Some(out) = self.links.get(&link) {
            out.queue(m);
        }
    }

    /// Closes `link`: queued messages are still written (for at most [`CLOSE_DRAIN`]),
    /// then the socket is shut down and its reader reports `ConnDown`.
    pub fn close(&mut self, link: LinkId) {
        if let Some(out) = self.links.get(&link) {
            out.close();
        }
    }

    /// Closes every connection (the process is stopping).
    pub fn close_all(&mut self) {
        for out in self.links.values() {
            out.close();
        }
    }

    /// The core wants a dial.
    pub fn want_dial(&mut self) {
        self.dial_wanted = true;
    }
}

pub async fn run(shared: Arc<Shared>) {
    let (Some(me), Some(peer)) = (
        shared.settings.node().address,
        shared.settings.peer().and_then(|p| p.address),
    ) else {
        return;
    };
    if shared.settings.net.insecure_allow_relay {
        tracing::warn!(
            "[net] insecure-allow-relay = true: peer authentication does not bind the connection; \
             anyone who can reach both peer ports can relay it"
        );
    }
    let listener = loop {
        match tokio::net::TcpListener::bind(me).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!("cannot listen for the peer on {me}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_AUTHENTICATING));
    let accept = {
        let shared = shared.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, addr)) => {
                        // As DRBD: only the peer's configured address may connect
                        // (its source port is ephemeral, so the IP only).
                        if addr.ip().to_canonical() != peer.ip().to_canonical() {
                            tracing::warn!(
                                "peer connection from {addr} refused: not the peer's configured address {}",
                                peer.ip()
                            );
                            continue;
                        }
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            tracing::warn!(
                                "peer connection from {addr} refused: {MAX_AUTHENTICATING} connections are being authenticated already"
                            );
                            continue;
                        };
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            establish(shared, s, addr, false).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!("peer accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    dial_loop(shared, me, peer, slots).await;
    accept.abort();
}

/// Dials once each time the core asks ([`PeerCtl::want_dial`]), one dial at a time.
async fn dial_loop(shared: Arc<Shared>, me: SocketAddr, peer: SocketAddr, slots: Arc<Semaphore>) {
    let timeout =
        Duration::from_millis(shared.settings.net.connect_retry_ms).max(Duration::from_secs(1));
    loop {
        let wake = shared.peer_wake.notified();
        let wanted = std::mem::take(&mut lock(&shared.peer).dial_wanted);
        if !wanted {
            wake.await;
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("dialing the peer deferred: connections are being authenticated");
            continue;
        };
        match tokio::time::timeout(timeout, connect_from(me, peer)).await {
            Ok(Ok(s)) => establish(shared.clone(), s, peer, true).await,
            Ok(Err(e)) => tracing::debug!("connecting to peer {peer}: {e}"),
            Err(_) => tracing::debug!("connecting to peer {peer}: timed out"),
        }
        drop(permit);
    }
}

/// Connects to `peer` from this node's configured IP (any port), as DRBD does: the peer
/// accepts connections only from that address, so a host with several addresses must not
/// let routing pick another one.
async fn connect_from(me: SocketAddr, peer: SocketAddr) -> io::Result<TcpStream> {
    let socket = if peer.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if !me.ip().is_unspecified() && me.is_ipv4() == peer.is_ipv4() {
        socket
            .bind(SocketAddr::new(me.ip(), 0))
            .map_err(|e| io::Error::new(e.kind(), format!("binding to {}: {e}", me.ip())))?;
    }
    socket.connect(peer).await
}

/// Authenticates, then offers the connection to the core and starts reading it.
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
    let conn = if shared.settings.net.insecure_allow_relay {
        None
    } else {
        match (s.local_addr(), s.peer_addr()) {
            (Ok(local), Ok(remote)) => Some(Endpoints::seen_from(local, remote, dialed)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("peer {addr}: the connection's addresses: {e}");
                return;
            }
        }
    };
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let me = shared.settings.node().name.clone();
    match tokio::time::timeout(
        AUTH_TIMEOUT,
        authenticate(&shared, &mut s, &mut inbuf, &secret, &me, conn),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!("peer {addr}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("peer {addr}: no authentication within {AUTH_TIMEOUT:?}");
            return;
        }
    }
    let s = Arc::new(s);
    let out = Arc::new(PeerOut::new(s.clone()));
    let link = {
        let mut p = lock(&shared.peer);
        p.next_id += 1;
        let link = p.next_id;
        p.links.insert(link, out.clone());
        link
    };
    tracing::info!(
        "peer connection {link} with {addr} authenticated ({})",
        if dialed { "dialed" } else { "accepted" }
    );
    let net = &shared.settings.net;
    let stall_limit = Duration::from_millis(net.timeout_ms.saturating_mul(net.ko_count));
    tokio::spawn(write_loop(s.clone(), out, stall_limit));
    // Offered before anything read on it reaches the core; the reader starts with
    // whatever arrived behind the authentication.
    shared.handle(Event::ConnOffered { link, dialed });
    tokio::spawn(read_loop(shared, link, s, inbuf));
}

/// Mutual authentication (the Hello exchange that follows is the core's).
async fn authenticate(
    shared: &Arc<Shared>,
    s: &mut TcpStream,
    inbuf: &mut BytesMut,
    secret: &[u8],
    me: &str,
    conn: Option<Endpoints>,
) -> Result<(), String> {
    let mut auth = Authenticator::new(secret, me, &shared.settings.resource, conn)
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
                }
                return Ok(());
            }
        }
    }
}

async fn read_loop(shared: Arc<Shared>, link: LinkId, rd: Arc<TcpStream>, mut buf: BytesMut) {
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
                shared.handle_many(msgs.drain(..).map(|msg| Event::PeerMsg { link, msg }))
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
    link_ended(&shared, link, &reason);
}

/// Reads a frame of `total` bytes into its own buffer: first what `buf` holds, the rest
/// straight from the socket.
async fn read_frame(s: &TcpStream, buf: &mut BytesMut, total: usize) -> Result<Bytes, String> {
    // No busy-polling on the peer link (docs/ARCHITECTURE.md).
    super::socket::read_buffered(s, buf, total, Duration::ZERO)
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
    /// Bytes of `msgs` (data plus [`MSG_OVERHEAD`] each) and of `backlog`.
    msgs_bytes: u64,
    backlog_bytes: u64,
}

impl OutState {
    fn queued_bytes(&self) -> u64 {
        self.msgs_bytes + self.backlog_bytes
    }

    fn take_msgs(&mut self) -> VecDeque<Message> {
        self.msgs_bytes = 0;
        std::mem::take(&mut self.msgs)
    }

    fn set_backlog(&mut self, chunks: VecDeque<Bytes>) {
        self.backlog_bytes = chunks.iter().map(|c| c.len() as u64).sum();
        self.backlog = chunks;
    }
}

/// What `m` counts for in [`OutState::msgs_bytes`].
fn msg_bytes(m: &Message) -> u64 {
    let data = match m {
        Message::Write {
            kind: crate::peer::WriteKind::Data(d),
            ..
        } => d.len(),
        Message::ReadReply { data, .. } => data.len(),
        Message::BitmapChunk { words, .. } => words.len() * 8,
        Message::ChecksumReply { sums, .. } => sums.len() * 4,
        _ => 0,
    };
    data as u64 + MSG_OVERHEAD
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
        {
            let mut st = self.lock();
            st.msgs_bytes += msg_bytes(&m);
            st.msgs.push_back(m);
        }
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
            let msgs = st.take_msgs();
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
                    st.set_backlog(chunks);
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
/// A peer that leaves more than [`PEER_SEND_MAX_BYTES`] queued for longer than
/// `stall_limit` (timeout x ko-count) is disconnected, with a log line.
async fn write_loop(s: Arc<TcpStream>, out: Arc<PeerOut>, stall_limit: Duration) {
    let mut closed_at = None;
    let mut over_since: Option<tokio::time::Instant> = None;
    loop {
        let notified = out.wake.notified();
        let owns = {
            let mut st = out.lock();
            if let Some(reason) = st.failed.clone() {
                tracing::debug!("peer connection: {reason}");
                break;
            }
            if st.closed && closed_at.is_none() {
                closed_at = Some(tokio::time::Instant::now());
            }
            if !st.writer_owns && !st.sending && st.closed {
                if st.msgs.is_empty() {
                    break;
                }
                // Nobody will flush a closed link's last messages: send them from here.
                st.writer_owns = true;
            }
            if st.queued_bytes() <= PEER_SEND_MAX_BYTES {
                over_since = None;
            } else {
                let since = *over_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= stall_limit {
                    tracing::warn!(
                        "peer connection: the peer has left {} MiB unread for {:?} (limit {} MiB); disconnecting",
                        st.queued_bytes() >> 20,
                        since.elapsed(),
                        PEER_SEND_MAX_BYTES >> 20
                    );
                    st.failed = Some("the peer does not drain its connection".into());
                    continue;
                }
            }
            if st.writer_owns && st.backlog.is_empty() {
                let msgs = st.take_msgs();
                match encode_all(msgs) {
                    Ok(chunks) => st.set_backlog(chunks),
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
        // A closed connection gets CLOSE_DRAIN to send what was queued on it; an open one
        // is looked at every STALL_CHECK (is the peer still draining?).
        let deadline = closed_at.map_or(STALL_CHECK, |t: tokio::time::Instant| {
            CLOSE_DRAIN.saturating_sub(t.elapsed())
        });
        match tokio::time::timeout(deadline, s.writable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                out.lock().failed = Some(format!("write to the peer: {e}"));
                continue;
            }
            Err(_) if closed_at.is_none() => continue,
            Err(_) => {
                tracing::debug!("peer connection closed with {CLOSE_DRAIN:?} of data unsent");
                break;
            }
        }
        let mut st = out.lock();
        let mut backlog = std::mem::take(&mut st.backlog);
        st.backlog_bytes = 0;
        match s.try_io(Interest::WRITABLE, || send_chunks(out.fd, &mut backlog)) {
            Ok(()) => {
                if st.msgs.is_empty() {
                    st.writer_owns = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.set_backlog(backlog),
            Err(e) => st.failed = Some(format!("write to the peer: {e}")),
        }
    }
    // Both ways: the reader then ends and reports ConnDown.
    // SAFETY: plain syscall on the socket, which `s` keeps open.
    unsafe { libc::shutdown(out.fd, libc::SHUT_RDWR) };
}

/// The reader of `link` ended: the connection is gone, and the core hears it once.
fn link_ended(shared: &Arc<Shared>, link: LinkId, reason: &str) {
    let out = lock(&shared.peer).links.remove(&link);
    let Some(out) = out else {
        unreachable!("connection {link} ended twice");
    };
    out.close();
    tracing::info!("peer connection {link} closed: {reason}");
    shared.handle(Event::ConnDown {
        link,
        reason: reason.to_string(),
    });
}
