//! The metrics endpoint's listener: a small bounded HTTP/1.1 server over tokio that
//! decides nothing (http.rs parses and answers). Each connection gets one response and is
//! closed. Limits (docs/ARCHITECTURE.md, "Limits"): `MAX_CONNS` at once (more are closed
//! on arrival), the request head within `http::MAX_HEAD` bytes and `READ_TIMEOUT`, the
//! response written within `WRITE_TIMEOUT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::http;

/// Connections served at once (a scrape takes milliseconds; Prometheus uses one).
pub const MAX_CONNS: usize = 4;
/// Time for the whole request head to arrive.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole response to be taken by the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Renders the metrics text, or says why it cannot.
pub type Render = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Binds without awaiting, so `mirrorctl adjust` can bind from its blocking thread (any
/// thread of the runtime, or one of its blocking pool, may call it).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
    Ok(listener)
}

/// Serves until the task is aborted.
pub async fn run(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let (sock, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics: {from} refused: {MAX_CONNS} connections in progress");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(sock, &render).await {
                tracing::debug!("metrics: {from}: {e}");
            }
            drop(slot);
        });
    }
}

async fn serve_one(mut sock: TcpStream, render: &Render) -> Result<(), String> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut sock)).await {
        Err(_) => return Err(format!("no whole request within {READ_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Ok(req))) => http::respond(&req, || render()),
        Ok(Ok(Err(refusal))) => refusal,
    };
    let write = async {
        sock.write_all(&response).await?;
        sock.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Err(_) => Err(format!("response not taken within {WRITE_TIMEOUT:?}")),
        Ok(r) => r.map_err(|e| format!("write: {e}")),
    }
}

/// Reads until the request head is whole: the request, or the response refusing it.
async fn read_request(sock: &mut TcpStream) -> Result<Result<http::Request, Vec<u8>>, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let room = http::MAX_HEAD - buf.len();
        let n = sock
            .read(&mut chunk[..room.min(1024)])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a whole request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match http::parse(&buf) {
            Ok(Some(req)) => return Ok(Ok(req)),
            Ok(None) => {}
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn start(render: Render) -> SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
                tx.send(l.local_addr().expect("addr")).expect("send");
                run(l, render).await;
            });
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("server up")
    }

    fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(req).expect("send");
        let mut out = String::new();
        // A refused connection may end in a reset (our request was left unread): no answer.
        if s.read_to_string(&mut out).is_err() {
            out.clear();
        }
        out
    }

    #[test]
    fn serves_one_response_per_connection_and_refuses_past_the_limit() {
        let addr = start(Arc::new(|| Ok("m 1\n".to_string())));
        // A request that arrives in pieces.
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /metrics HT").expect("send");
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(b"TP/1.1\r\nHost: a\r\n\r\n").expect("send");
        let mut out = String::new();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.read_to_string(&mut out).expect("read");
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nm 1\n"),
            "{out}"
        );

        // MAX_CONNS idle connections hold every slot: the next is closed unanswered...
        let idle: Vec<_> = (0..MAX_CONNS)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n"), "");
        // ...and served again once they are gone.
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            if out.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slots never freed: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_read_timeout() {
        let addr = start(Arc::new(|| Ok(String::new())));
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT + Duration::from_secs(5)))
            .expect("timeout");
        let t0 = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).expect("closed, not timed out");
        assert_eq!(n, 0);
        let took = t0.elapsed();
        assert!(
            took >= READ_TIMEOUT - Duration::from_millis(100),
            "{took:?}"
        );
    }
}
