//! The peer link: both nodes listen and dial; after mutual authentication and
//! the Hello exchange one connection becomes the active link. When both dial at
//! once, the connection dialed by the node whose name sorts first wins, on both
//! sides. Messages are framed by the peer codec; the core decides everything else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{lock, Shared};
use crate::core::Event;
use crate::peer::{encode, AuthStep, Authenticator, Decoder, Hello, Message, DEFAULT_MAX_PAYLOAD};

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

struct Active {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
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
    pub fn send(&self, m: Message) {
        if let Some(a) = &self.active {
            let _ = a.tx.send(m);
        }
    }

    /// Closes the active link: queued messages are still written, nothing more is read.
    pub fn drop_active(&mut self) {
        if let Some(a) = self.active.take() {
            a.reader.abort();
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
    let (rd, wr) = s.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
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
    tokio::spawn(write_loop(shared.clone(), id, wr, rx));
    let reader = tokio::spawn(read_loop(shared.clone(), id, rd, inbuf));
    {
        let mut p = lock(&shared.peer);
        p.active = Some(Active {
            id,
            tx,
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

async fn read_loop(
    shared: Arc<Shared>,
    id: u64,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
) {
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    let reason = loop {
        let mut msgs = Vec::new();
        let mut err = None;
        loop {
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
            shared.with_core(|c| {
                if lock(&shared.peer).is_active(id) {
                    for m in msgs {
                        c.handle(Event::PeerMsg(m));
                    }
                }
            });
        }
        if let Some(e) = err {
            break e;
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(1 << 20);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "the peer closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read from the peer: {e}"),
        }
    };
    link_ended(&shared, id, &reason);
}

async fn write_loop(
    shared: Arc<Shared>,
    id: u64,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Message>,
) {
    let mut out = BytesMut::with_capacity(256 * 1024);
    while let Some(m) = rx.recv().await {
        encode(&m, &mut out);
        while out.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(m) => encode(&m, &mut out),
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&out).await {
            link_ended(&shared, id, &format!("write to the peer: {e}"));
            return;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
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
