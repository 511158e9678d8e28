//! The NBD listener: bind, accept, and the listener and connections a previous mirrord
//! handed over.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::serve::{serve, serve_handed};
use crate::config::Listen;
use crate::daemon::Shared;

pub(crate) enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

pub(crate) async fn bind(listen: &Listen) -> Result<Listener, String> {
    match listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            crate::daemon::exclusive::remove_stale_socket(path)?;
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

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: Listener) {
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
    pub(crate) fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// The listener a previous mirrord handed over (`handover.rs`), if it listens where the
    /// config says.
    pub(crate) fn inherited(listen: &Listen, fd: OwnedFd) -> Result<Listener, String> {
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
pub(crate) fn spawn_handed(
    shared: &Arc<Shared>,
    client: crate::daemon::handover::Client,
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
