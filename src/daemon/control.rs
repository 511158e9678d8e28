//! The control socket: `mirrorctl` sends one JSON request line and reads JSON
//! response lines (a stream of them for `events`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Shared;
use crate::core::AdminCmd;
use crate::ctl::{CtlRequest, CtlResponse};

pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    super::exclusive::remove_stale_socket(path)?;
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on control socket {}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// The control listener a previous mirrord handed over, if it is bound to `path`.
pub fn inherited(path: &Path, fd: std::os::fd::OwnedFd) -> Result<UnixListener, String> {
    let l = std::os::unix::net::UnixListener::from(fd);
    match l.local_addr() {
        Ok(a) if a.as_pathname() == Some(path) => {}
        other => {
            return Err(format!(
                "the inherited control listener is bound to {other:?}, not {}",
                path.display()
            ))
        }
    }
    l.set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .map_err(|e| format!("the inherited control listener cannot be used: {e}"))
}

pub async fn accept_loop(shared: Arc<Shared>, l: UnixListener) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve(shared.clone(), s));
            }
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(shared: Arc<Shared>, s: UnixStream) {
    let (rd, mut wr) = s.into_split();
    let mut lines = BufReader::new(rd.take(64 * 1024)).lines();
    let line = match lines.next_line().await {
        Ok(Some(l)) => l,
        _ => return,
    };
    let reply = |r: CtlResponse| {
        let mut s = serde_json::to_string(&r).unwrap_or_else(|_| "{\"ok\":false}".into());
        s.push('\n');
        s
    };
    let req: CtlRequest = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = wr
                .write_all(
                    reply(CtlResponse {
                        ok: false,
                        message: Some(format!("bad request: {e}")),
                        status: None,
                    })
                    .as_bytes(),
                )
                .await;
            return;
        }
    };
    let cmd = match req {
        CtlRequest::Status => {
            let st = shared.core().status();
            let status = serde_json::to_value(&st).ok();
            let _ = wr
                .write_all(
                    reply(CtlResponse {
                        ok: true,
                        message: None,
                        status,
                    })
                    .as_bytes(),
                )
                .await;
            return;
        }
        CtlRequest::Events => {
            let mut rx = shared.events.subscribe();
            let st = serde_json::to_value(shared.core().status()).ok();
            let first = serde_json::json!({ "event": "status", "status": st }).to_string() + "\n";
            if wr.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(line) => {
                        if wr.write_all((line + "\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let l = serde_json::json!({ "event": "lagged", "missed": n }).to_string()
                            + "\n";
                        if wr.write_all(l.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        }
        CtlRequest::Restart { exe } => {
            let r = shared.request_restart(exe);
            let ok = r.is_ok();
            let _ = wr.write_all(reply(answer(r)).as_bytes()).await;
            if ok {
                // Held open until the new image replaces this one (close-on-exec), so
                // `mirrorctl restart` knows when to ask the new process.
                std::future::pending::<()>().await;
            }
            return;
        }
        CtlRequest::Adjust { dry_run } => {
            let sh = shared.clone();
            let r = tokio::task::spawn_blocking(move || super::adjust::adjust(&sh, dry_run))
                .await
                .unwrap_or_else(|e| Err(format!("adjust failed: {e}")));
            let _ = wr.write_all(reply(answer(r)).as_bytes()).await;
            return;
        }
        CtlRequest::Primary { force } => AdminCmd::Primary { force },
        CtlRequest::Secondary => AdminCmd::Secondary,
        CtlRequest::Connect { discard_my_data } => AdminCmd::Connect { discard_my_data },
        CtlRequest::Disconnect => AdminCmd::Disconnect,
        CtlRequest::Resync { full, checksum } => AdminCmd::Resync { full, checksum },
        CtlRequest::Verify => AdminCmd::Verify,
        CtlRequest::Invalidate => AdminCmd::Invalidate,
        CtlRequest::ResumeIo => AdminCmd::ResumeIo,
    };
    let r = shared.admin(cmd).await;
    let _ = wr.write_all(reply(answer(r)).as_bytes()).await;
}

/// The response for a command's outcome: ok or not, with its message.
fn answer(r: Result<String, String>) -> CtlResponse {
    let ok = r.is_ok();
    let (Ok(message) | Err(message)) = r;
    CtlResponse {
        ok,
        message: Some(message),
        status: None,
    }
}
