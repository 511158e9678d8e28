//! Drives the sans-IO NBD handshake (`nbd::ServerHandshake`) over a client socket.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::serve::export_info;
use crate::core::ConnId;
use crate::daemon::Shared;
use crate::nbd::{ExportQuery, HandshakeOptions, HandshakeStep, Negotiated, ServerHandshake};

/// Runs the handshake. Ok(None): the client left or aborted.
pub(super) async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    conn: ConnId,
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
) -> Result<Option<Negotiated>, String> {
    let s = &shared.settings;
    let mut hs = ServerHandshake::new(HandshakeOptions {
        exports: vec![(
            s.resource.clone(),
            format!(
                "nbd-mirror resource {} on node {}",
                s.resource,
                s.node().name
            ),
        )],
        allow_structured_replies: true,
    });
    let mut out = BytesMut::new();
    loop {
        send(&mut hs, wr, &mut out).await?;
        match hs.feed(inbuf).map_err(|e| e.to_string())? {
            HandshakeStep::NeedMore => {
                send(&mut hs, wr, &mut out).await?;
                let n = rd
                    .read_buf(inbuf)
                    .await
                    .map_err(|e| format!("read during handshake: {e}"))?;
                if n == 0 {
                    return Ok(None);
                }
            }
            HandshakeStep::ExportLookup { name, query } => {
                let answer = if name != s.resource && !name.is_empty() {
                    Err(format!(
                        "no export named {name:?}; this server exports {:?}",
                        s.resource
                    ))
                } else if query == ExportQuery::Info {
                    Ok(export_info(shared))
                } else {
                    shared.attach_client(conn).map(|()| export_info(shared))
                };
                if let Err(e) = &answer {
                    tracing::warn!("NBD conn {conn}: refused export {name:?}: {e}");
                }
                hs.answer_export(answer);
            }
            HandshakeStep::Done(neg) => {
                send(&mut hs, wr, &mut out).await?;
                return Ok(Some(neg));
            }
            HandshakeStep::Closed => {
                hs.take_output(&mut out);
                let _ = wr.write_all(&out).await;
                return Ok(None);
            }
        }
    }
}

/// Sends what the handshake has to say, if anything.
async fn send<W: AsyncWrite + Unpin>(
    hs: &mut ServerHandshake,
    wr: &mut W,
    out: &mut BytesMut,
) -> Result<(), String> {
    hs.take_output(out);
    if !out.is_empty() {
        wr.write_all(out)
            .await
            .map_err(|e| format!("write during handshake: {e}"))?;
        out.clear();
    }
    Ok(())
}
