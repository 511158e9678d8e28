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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use super::peer_spin::PeerSpin;
use super::peer_tls::{TlsContext, TlsRecords};
use super::{lock, Shared};
use crate::core::{Event, LinkId};
use crate::peer::{
    encode_split_with, AuthStep, Authenticator, DataCrc, Decoder, Endpoints, Message,
    DEFAULT_MAX_PAYLOAD,
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
/// Bytes queued for the peer (messages not yet sent) at which NBD readers stop taking
/// requests (back-pressure, `backpressure::may_take`), and above which a link that sends
/// nothing for `timeout` is disconnected. What fills it is bounded upstream besides (NBD
/// bytes held, the resync window), so only a peer that stops reading gets here.
pub const PEER_SEND_MAX_BYTES: u64 = 256 << 20;
/// Bytes queued on one link at which it is disconnected at once: traffic the NBD
/// back-pressure does not hold (answers to the peer's own requests) cannot grow past it.
pub const PEER_SEND_HARD_MAX_BYTES: u64 = 2 * PEER_SEND_MAX_BYTES;
/// Bytes queued on all links together (the sum of [`OutState::counted`]).
static QUEUED_ALL: AtomicU64 = AtomicU64::new(0);

/// Whether the peer send queues hold [`PEER_SEND_MAX_BYTES`] or more: NBD readers wait.
pub fn send_queue_full() -> bool {
    QUEUED_ALL.load(Ordering::Relaxed) >= PEER_SEND_MAX_BYTES
}
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
    let tls = match (&shared.settings.tls, shared.settings.peer()) {
        (Some(t), Some(p)) => match TlsContext::load(t, &p.name) {
            Ok(ctx) => {
                tracing::info!("peer link: TLS on (CA {})", t.ca.display());
                Some(Arc::new(ctx))
            }
            Err(e) => {
                // Checked before start (setup::check_secret): only a file changed since.
                tracing::error!("peer link: {e}; no peer connections");
                return;
            }
        },
        _ => None,
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
    let slots = Arc::new(Semaphore::new(MAX_AUTHENTICATING));
    let accept = {
        let shared = shared.clone();
        let slots = slots.clone();
        let tls = tls.clone();
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
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            establish(shared, s, addr, false, tls).await;
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
    dial_loop(shared, me, peer, slots, tls).await;
    accept.abort();
}

/// Dials once each time the core asks ([`PeerCtl::want_dial`]), one dial at a time.
async fn dial_loop(
    shared: Arc<Shared>,
    me: SocketAddr,
    peer: SocketAddr,
    slots: Arc<Semaphore>,
    tls: Option<Arc<TlsContext>>,
) {
    let timeout = Duration::from_millis(shared.net().connect_retry_ms).max(Duration::from_secs(1));
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
            Ok(Ok(s)) => establish(shared.clone(), s, peer, true, tls.clone()).await,
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

/// Runs TLS if configured, authenticates, then offers the connection to the core and
/// starts reading it.
async fn establish(
    shared: Arc<Shared>,
    s: TcpStream,
    addr: SocketAddr,
    dialed: bool,
    tls: Option<Arc<TlsContext>>,
) {
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
    // TLS first (if on), then the shared-secret exchange inside it, bound to the session.
    let secured = async {
        match tls {
            None => {
                let mut s = s;
                authenticate(&shared, &mut s, &mut inbuf, &secret, &me, conn, None).await?;
                Ok((s, None))
            }
            Some(ctx) => {
                let mut session = super::peer_tls::handshake(&ctx, s, dialed).await?;
                let binding = session.binding()?;
                authenticate(
                    &shared,
                    session.stream(),
                    &mut inbuf,
                    &secret,
                    &me,
                    conn,
                    Some(binding),
                )
                .await?;
                let (s, records) = session.into_parts();
                Ok::<_, String>((s, Some(Arc::new(records))))
            }
        }
    };
    let (s, records) = match tokio::time::timeout(AUTH_TIMEOUT, secured).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!("peer {addr}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("peer {addr}: no authentication within {AUTH_TIMEOUT:?}");
            return;
        }
    };
    let s = Arc::new(s);
    let data_crc = if shared.settings.net.data_integrity {
        DataCrc::On
    } else {
        DataCrc::Off
    };
    let out = Arc::new(PeerOut::new(s.clone(), records.clone(), data_crc));
    let link = {
        let mut p = lock(&shared.peer);
        p.next_id += 1;
        let link = p.next_id;
        p.links.insert(link, out.clone());
        link
    };
    tracing::info!(
        "peer connection {link} with {addr} authenticated ({}{})",
        if dialed { "dialed" } else { "accepted" },
        if records.is_some() { ", TLS" } else { "" }
    );
    let net = shared.net();
    let stall_limit = Duration::from_millis(net.timeout_ms);
    tokio::spawn(write_loop(s.clone(), out, stall_limit));
    // Offered before anything read on it reaches the core; the reader starts with
    // whatever arrived behind the authentication.
    shared.handle(Event::ConnOffered { link, dialed });
    tokio::spawn(read_loop(shared, link, s, inbuf, records));
}

/// Mutual authentication (the Hello exchange that follows is the core's), bound to the TLS
/// `session` it runs in, if any.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    shared: &Arc<Shared>,
    s: &mut S,
    inbuf: &mut BytesMut,
    secret: &[u8],
    me: &str,
    conn: Option<Endpoints>,
    session: Option<[u8; crate::peer::SESSION_BINDING_LEN]>,
) -> Result<(), String> {
    let mut auth = Authenticator::new(secret, me, &shared.settings.resource, conn)
        .map_err(|e| format!("authentication setup: {e}"))?;
    if let Some(binding) = session {
        auth.bind_session(binding);
    }
    loop {
        send_auth(s, &mut auth).await?;
        match auth
            .feed(inbuf)
            .map_err(|e| format!("failed authentication: {e}"))?
        {
            AuthStep::NeedMore => {
                send_auth(s, &mut auth).await?;
                if s.read_buf(inbuf)
                    .await
                    .map_err(|e| format!("read during authentication: {e}"))?
                    == 0
                {
                    return Err("closed the connection during authentication".into());
                }
            }
            AuthStep::Done { .. } => {
                send_auth(s, &mut auth).await?;
                return Ok(());
            }
        }
    }
}

/// Sends what the authentication has to send (and flushes it out of TLS, if any).
async fn send_auth<S: AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    auth: &mut Authenticator,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    auth.take_output(&mut out);
    if out.is_empty() {
        return Ok(());
    }
    s.write_all(&out)
        .await
        .map_err(|e| format!("write during authentication: {e}"))?;
    s.flush()
        .await
        .map_err(|e| format!("write during authentication: {e}"))
}

async fn read_loop(
    shared: Arc<Shared>,
    link: LinkId,
    rd: Arc<TcpStream>,
    mut buf: BytesMut,
    tls: Option<Arc<TlsRecords>>,
) {
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    // Over TLS: records read and not yet opened (a partial one).
    let mut cipher = BytesMut::new();
    let mut msgs = Vec::new();
    // After a large frame, the next read takes little more than a header, so the next large
    // payload is not read into (and then copied out of) the receive buffer.
    let mut after_large = false;
    let mut spin = PeerSpin::new(shared.settings.nbd_busy_poll_us > 0 && tls.is_none());
    let reason = loop {
        let mut err = None;
        let mut large = None;
        loop {
            // A large frame not yet complete is read straight into its own buffer below.
            if let (Ok(Some(total)), None) = (dec.frame_len(&buf), &tls) {
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
            spin.batch(&msgs);
            // A batch: the peer's writes go to the page cache on this thread (large ones too),
            // and the NBD replies their acks release leave together.
            super::disk_io::batch_with(&shared, super::disk_io::InlineWrites::Any, || {
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
        let read = match &tls {
            None => {
                let (read, gap) = read_some_timed(&rd, &mut buf, limit, spin.poll()).await;
                if let Some(gap) = gap {
                    spin.waited(gap);
                }
                read
            }
            Some(records) => read_tls(&rd, records, &mut cipher, &mut buf).await,
        };
        match read {
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
    super::socket::read_buffered(s, buf, total, Duration::ZERO, None)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
            _ => format!("read from the peer: {e}"),
        })
}

/// Reads records until they open into some plaintext in `buf`: how much (0: the peer
/// closed the connection or the session).
async fn read_tls(
    s: &TcpStream,
    records: &TlsRecords,
    cipher: &mut BytesMut,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    let before = buf.len();
    loop {
        if cipher.capacity() - cipher.len() < 16 * 1024 {
            cipher.reserve(64 * 1024);
        }
        if read_some(s, cipher, usize::MAX).await? == 0 {
            return Ok(0);
        }
        let closed = records.open(cipher, buf)?;
        if buf.len() > before || closed {
            return Ok(buf.len() - before);
        }
    }
}

/// Reads what the socket has, at most `limit` bytes (waiting until it has something).
async fn read_some(s: &TcpStream, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
    read_some_timed(s, buf, limit, Duration::ZERO).await.0
}

/// [`read_some`], first spinning up to `poll` when the socket has nothing; also how long
/// the socket stayed empty if it was empty at first (None if it was not, or if it ended).
async fn read_some_timed(
    s: &TcpStream,
    buf: &mut BytesMut,
    limit: usize,
    poll: Duration,
) -> (io::Result<usize>, Option<Duration>) {
    let mut empty_since = None;
    let mut poll = poll;
    loop {
        let read = match s.try_read_buf(&mut (&mut *buf).limit(limit)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                empty_since.get_or_insert_with(Instant::now);
                if let Some(read) = super::socket::poll_read(s.as_raw_fd(), buf, limit, poll) {
                    read
                } else {
                    // Spun once; after a wake-up without data, sleep again.
                    poll = Duration::ZERO;
                    if let Err(e) = s.readable().await {
                        return (Err(e), None);
                    }
                    continue;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other,
        };
        return (read, empty_since.map(|t: Instant| t.elapsed()));
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
    /// The TLS session's records, when TLS is on: every frame is sealed before it is sent.
    tls: Option<Arc<TlsRecords>>,
    /// Whether frames' CRCs cover their data (`[net] data-integrity`, read at start).
    data_crc: DataCrc,
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
    /// What this link counts for in [`QUEUED_ALL`] (given back when dropped).
    counted: u64,
}

impl OutState {
    fn queued_bytes(&self) -> u64 {
        self.msgs_bytes + self.backlog_bytes
    }

    /// Brings [`QUEUED_ALL`] up to date with this link's queue.
    fn recount(&mut self) {
        let now = self.queued_bytes();
        if now > self.counted {
            QUEUED_ALL.fetch_add(now - self.counted, Ordering::Relaxed);
        } else {
            QUEUED_ALL.fetch_sub(self.counted - now, Ordering::Relaxed);
        }
        self.counted = now;
    }

    fn take_msgs(&mut self) -> VecDeque<Message> {
        self.msgs_bytes = 0;
        self.recount();
        std::mem::take(&mut self.msgs)
    }

    fn take_backlog(&mut self) -> VecDeque<Bytes> {
        self.backlog_bytes = 0;
        self.recount();
        std::mem::take(&mut self.backlog)
    }

    /// Drops everything queued (the link failed).
    fn discard(&mut self) {
        self.take_msgs();
        self.take_backlog();
        debug_assert_eq!(self.counted, 0);
    }

    fn set_backlog(&mut self, chunks: VecDeque<Bytes>) {
        self.backlog_bytes = chunks.iter().map(|c| c.len() as u64).sum();
        self.backlog = chunks;
        self.recount();
    }
}

impl Drop for OutState {
    fn drop(&mut self) {
        self.msgs_bytes = 0;
        self.backlog_bytes = 0;
        self.recount();
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
    fn new(stream: Arc<TcpStream>, tls: Option<Arc<TlsRecords>>, data_crc: DataCrc) -> PeerOut {
        PeerOut {
            fd: stream.as_raw_fd(),
            tls,
            data_crc,
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
            if st.failed.is_some() {
                // The link is going: its ConnDown is on the way to the core.
                return;
            }
            st.msgs_bytes += msg_bytes(&m);
            st.msgs.push_back(m);
            st.recount();
            if st.queued_bytes() >= PEER_SEND_HARD_MAX_BYTES {
                tracing::warn!(
                    "peer connection: {} MiB queued for the peer (hard limit {} MiB); disconnecting",
                    st.queued_bytes() >> 20,
                    PEER_SEND_HARD_MAX_BYTES >> 20
                );
                st.failed = Some("the peer send queue passed its hard limit".into());
                st.discard();
                drop(st);
                self.wake.notify_one();
                return;
            }
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
            let res = encode_all(msgs, self.tls.as_deref(), self.data_crc).and_then(|c| {
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

/// Frames `msgs` in order: fixed fields copied together, bulk data by reference; over TLS,
/// sealed into records (one buffer). A message too large for a frame is an error (the link
/// is dropped, not the daemon). Called by one sender at a time, in the order of sending.
fn encode_all(
    msgs: VecDeque<Message>,
    tls: Option<&TlsRecords>,
    data_crc: DataCrc,
) -> io::Result<VecDeque<Bytes>> {
    let mut chunks = VecDeque::new();
    let mut head = BytesMut::with_capacity(msgs.len() * 64);
    for m in &msgs {
        let tail = encode_split_with(m, &mut head, data_crc).map_err(io::Error::other)?;
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
    match tls {
        Some(records) if !chunks.is_empty() => Ok(VecDeque::from([records.seal(&chunks)?])),
        _ => Ok(chunks),
    }
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
/// A peer that reads nothing for `stall_limit` (`[net] timeout`) while
/// [`PEER_SEND_MAX_BYTES`] or more are queued for it is disconnected, with a log line.
async fn write_loop(s: Arc<TcpStream>, out: Arc<PeerOut>, stall_limit: Duration) {
    let mut closed_at = None;
    let mut over_since: Option<tokio::time::Instant> = None;
    loop {
        let notified = out.wake.notified();
        let owns = {
            let mut st = out.lock();
            if let Some(reason) = st.failed.clone() {
                tracing::debug!("peer connection: {reason}");
                st.discard();
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
            if st.queued_bytes() < PEER_SEND_MAX_BYTES {
                over_since = None;
            } else {
                let since = *over_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= stall_limit {
                    tracing::warn!(
                        "peer connection: the peer has read nothing for {:?} with {} MiB queued for it (limit {} MiB); disconnecting",
                        since.elapsed(),
                        st.queued_bytes() >> 20,
                        PEER_SEND_MAX_BYTES >> 20
                    );
                    st.failed = Some("the peer does not drain its connection".into());
                    continue;
                }
            }
            if st.writer_owns && st.backlog.is_empty() {
                let msgs = st.take_msgs();
                match encode_all(msgs, out.tls.as_deref(), out.data_crc) {
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
        let before = st.backlog_bytes;
        let mut backlog = st.take_backlog();
        match s.try_io(Interest::WRITABLE, || send_chunks(out.fd, &mut backlog)) {
            Ok(()) => {
                if st.msgs.is_empty() {
                    st.writer_owns = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.set_backlog(backlog),
            Err(e) => st.failed = Some(format!("write to the peer: {e}")),
        }
        if st.backlog_bytes < before {
            // The peer reads: a full queue that drains is congestion, not a stall.
            over_since = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::WriteKind;
    use std::time::Instant;

    /// A loopback connection: (this node's end, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = l.local_addr().expect("listener address");
        let near = TcpStream::connect(addr).await.expect("connect loopback");
        let (far, _) = l.accept().await.expect("accept loopback");
        (near, far)
    }

    /// `n` writes of `data` (sharing its buffer) queued and flushed on a new link.
    fn queued_link(near: TcpStream, data: &Bytes, n: u64) -> (Arc<TcpStream>, Arc<PeerOut>) {
        let s = Arc::new(near);
        let out = Arc::new(PeerOut::new(s.clone(), None, DataCrc::On));
        for seq in 0..n {
            out.queue(Message::Write {
                seq,
                seen: 0,
                offset: 0,
                kind: WriteKind::Data(data.clone()),
                fua: false,
                resync: false,
            });
            flush_queued();
        }
        (s, out)
    }

    fn block() -> Bytes {
        Bytes::from(vec![0x5a; 32 << 20])
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_disconnected_after_the_stall_limit() {
        let (near, mut far) = pair().await;
        let (s, out) = queued_link(near, &block(), 9);
        assert!(out.lock().queued_bytes() >= PEER_SEND_MAX_BYTES);
        assert!(out.lock().failed.is_none());
        let t = Instant::now();
        let stall = Duration::from_millis(500);
        tokio::time::timeout(Duration::from_secs(20), write_loop(s, out.clone(), stall))
            .await
            .expect("the writer gives up on a peer that reads nothing");
        let took = t.elapsed();
        assert!(
            took >= stall,
            "disconnected after {took:?}, before the limit"
        );
        assert!(took < stall + Duration::from_secs(5), "took {took:?}");
        {
            let st = out.lock();
            assert_eq!(
                st.failed.as_deref(),
                Some("the peer does not drain its connection")
            );
            assert_eq!(st.queued_bytes(), 0, "what was queued is given back");
        }
        // The peer's end sees the connection end after what reached its buffer.
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0usize;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, far.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got += n,
                Err(_) => panic!("the connection was not shut down ({got} bytes read)"),
            }
        }
        assert!(
            (got as u64) < PEER_SEND_MAX_BYTES,
            "{got} bytes reached the peer"
        );
    }

    #[tokio::test]
    async fn a_slow_peer_over_the_limit_is_not_disconnected_while_it_reads() {
        let (near, mut far) = pair().await;
        let data = block();
        let (s, out) = queued_link(near, &data, 9);
        let stall = Duration::from_secs(1);
        let writer = tokio::spawn(write_loop(s, out.clone(), stall));
        // Slowly (1 MiB per 100 ms), over several stall limits, then all of it.
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0usize;
        let slow_until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < slow_until {
            got += far.read(&mut sink).await.expect("read from the node");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            out.lock().failed.is_none(),
            "a peer that reads was disconnected"
        );
        let end = Instant::now() + Duration::from_secs(60);
        while got < 9 * data.len() && Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, far.read(&mut sink)).await {
                Ok(Ok(0)) => panic!("the node closed the link after {got} bytes"),
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => panic!("read from the node: {e}"),
                Err(_) => break,
            }
        }
        assert!(got >= 9 * data.len(), "only {got} bytes arrived");
        assert!(out.lock().failed.is_none());
        out.close();
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends after close")
            .expect("writer task");
        assert_eq!(out.lock().queued_bytes(), 0);
    }

    #[tokio::test]
    async fn passing_the_hard_limit_disconnects_at_once_and_drops_later_messages() {
        let (near, _far) = pair().await;
        let data = block();
        // What the socket took at once is not queued: one more than the limit holds.
        let n = PEER_SEND_HARD_MAX_BYTES / data.len() as u64 + 1;
        let (s, out) = queued_link(near, &data, n);
        {
            let st = out.lock();
            assert_eq!(
                st.failed.as_deref(),
                Some("the peer send queue passed its hard limit")
            );
            assert_eq!(st.queued_bytes(), 0, "the queue is dropped, not kept");
        }
        out.queue(Message::Ping);
        assert!(
            out.lock().msgs.is_empty(),
            "a failed link queues nothing more"
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            write_loop(s, out, Duration::from_secs(60)),
        )
        .await
        .expect("the writer of a failed link ends at once");
    }
}
