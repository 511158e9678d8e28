//! TLS on the peer link (`[tls]`, docs/OPERATIONS.md), mutual: each node presents its
//! certificate, and accepts the peer's only if it chains to the configured CA and names
//! the peer's node (a DNS subject alternative name equal to the `[[node]] name`). TLS 1.3
//! only, rustls with the ring provider.
//!
//! The handshake runs through tokio-rustls ([`handshake`]); the shared-secret
//! authentication then runs inside the session, bound to it by exported keying material
//! (`peer/auth.rs`). After that the session's rustls state is taken out of tokio-rustls
//! and driven sans-IO by the link ([`TlsRecords`]): the senders seal frames into records
//! and send them with the link's non-blocking `sendmsg`, the reader opens what it reads.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::lock;
use crate::config::TlsSettings;
use crate::peer::{SESSION_BINDING_LEN, TLS_EXPORTER_LABEL};

/// Both sides of TLS for this node, loaded once at start.
pub struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The peer's node name, which its certificate must carry.
    peer: ServerName<'static>,
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("[tls] {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "[tls] {what} {}: no certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The ring provider. Deprecated in rustls 0.23.48 because ring has no post-quantum key
/// exchange; chosen over aws-lc-rs, which has it, for a build without cmake and a C
/// toolchain's worth of extra time. Replacing it is this one function.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsContext {
    /// Reads the CA, this node's certificate and key; `peer` is the peer's node name.
    pub fn load(t: &TlsSettings, peer: &str) -> Result<TlsContext, String> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&t.ca, "ca")? {
            roots
                .add(ca)
                .map_err(|e| format!("[tls] ca {}: {e}", t.ca.display()))?;
        }
        let roots = Arc::new(roots);
        let certs = read_certs(&t.cert, "cert")?;
        let key = PrivateKeyDer::from_pem_file(&t.key)
            .map_err(|e| format!("[tls] key {}: {e}", t.key.display()))?;
        let peer = ServerName::try_from(peer.to_string()).map_err(|e| {
            format!("peer node name `{peer}` cannot be checked in a certificate: {e}")
        })?;
        let versions = [&rustls::version::TLS13];
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("[tls] ca {}: {e}", t.ca.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("[tls] cert {} and key: {e}", t.cert.display()))?;
        // No resumption: every connection is a full, mutually authenticated handshake.
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("[tls] cert {} and key: {e}", t.cert.display()))?;
        Ok(TlsContext {
            client: Arc::new(client),
            server: Arc::new(server),
            peer,
        })
    }
}

/// A TLS session after its handshake, before the link takes its records over.
pub enum Session {
    Dialed(tokio_rustls::client::TlsStream<TcpStream>),
    Accepted(tokio_rustls::server::TlsStream<TcpStream>),
}

/// Runs the TLS handshake on `s`, as client if this node `dialed`. The peer's certificate
/// chains to the CA (rustls checks it) and names the peer node (checked here for the
/// client's certificate, by rustls for the server's).
pub async fn handshake(ctx: &TlsContext, s: TcpStream, dialed: bool) -> Result<Session, String> {
    let fail = |e: io::Error| {
        format!(
            "TLS handshake failed: {e} (the peer's certificate must be signed by the CA in \
             [tls] ca and name the peer node `{}`)",
            ctx.peer.to_str()
        )
    };
    if dialed {
        let connector = tokio_rustls::TlsConnector::from(ctx.client.clone());
        let tls = connector.connect(ctx.peer.clone(), s).await.map_err(fail)?;
        return Ok(Session::Dialed(tls));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.server.clone());
    let tls = acceptor.accept(s).await.map_err(fail)?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("TLS: the peer presented no certificate")?;
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&ctx.peer))
        .map_err(|e| {
            format!(
                "TLS: the peer's certificate does not name the peer node `{}`: {e}",
                ctx.peer.to_str()
            )
        })?;
    Ok(Session::Accepted(tls))
}

impl Session {
    /// Keying material both ends of this session share ([`TLS_EXPORTER_LABEL`]).
    pub fn binding(&self) -> Result<[u8; SESSION_BINDING_LEN], String> {
        let out = [0u8; SESSION_BINDING_LEN];
        match self {
            Session::Dialed(t) => {
                t.get_ref()
                    .1
                    .export_keying_material(out, TLS_EXPORTER_LABEL, None)
            }
            Session::Accepted(t) => {
                t.get_ref()
                    .1
                    .export_keying_material(out, TLS_EXPORTER_LABEL, None)
            }
        }
        .map_err(|e| format!("TLS exporter: {e}"))
    }

    /// The stream the authentication runs on.
    pub fn stream(&mut self) -> &mut (dyn AsyncReadWrite + Send) {
        match self {
            Session::Dialed(t) => t,
            Session::Accepted(t) => t,
        }
    }

    /// The socket and the session's record layer, for the link.
    pub fn into_parts(self) -> (TcpStream, TlsRecords) {
        let (s, conn): (TcpStream, rustls::Connection) = match self {
            Session::Dialed(t) => {
                let (s, c) = t.into_inner();
                (s, c.into())
            }
            Session::Accepted(t) => {
                let (s, c) = t.into_inner();
                (s, c.into())
            }
        };
        (
            s,
            TlsRecords {
                conn: Mutex::new(conn),
            },
        )
    }
}

/// What the authentication needs of a stream.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWrite for T {}

/// A session's record layer, shared by the link's reader and its senders (one lock: a
/// record is sealed or opened at a time; senders seal in the order they send, which the
/// link's one-sender-at-a-time rule gives).
pub struct TlsRecords {
    conn: Mutex<rustls::Connection>,
}

impl TlsRecords {
    /// Seals `chunks`, in order, into TLS records (with anything the session has to send
    /// besides, such as an alert).
    pub fn seal(&self, chunks: &VecDeque<Bytes>) -> io::Result<Bytes> {
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        // 22 bytes of record overhead per 16 KiB record, and some.
        let mut out = Vec::with_capacity(len + len / 512 + 256);
        let mut conn = lock(&self.conn);
        for chunk in chunks {
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                // Records made so far leave rustls's buffer first, so it has room.
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                let n = conn.writer().write(rest)?;
                if n == 0 {
                    return Err(io::Error::other("TLS: the session takes no more data"));
                }
                rest = &rest[n..];
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        debug_assert!(out.len() >= len);
        Ok(out.into())
    }

    /// Opens what `cipher` holds (whole records; a partial one stays) into `plain`. True:
    /// the peer closed the session.
    pub fn open(&self, cipher: &mut BytesMut, plain: &mut BytesMut) -> io::Result<bool> {
        let mut conn = lock(&self.conn);
        let mut closed = false;
        while !cipher.is_empty() {
            let n = conn.read_tls(&mut &cipher[..])?;
            cipher.advance(n);
            let state = conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
            let avail = state.plaintext_bytes_to_read();
            closed |= state.peer_has_closed();
            if avail > 0 {
                let at = plain.len();
                plain.resize(at + avail, 0);
                conn.reader().read_exact(&mut plain[at..])?;
            }
            if n == 0 {
                break;
            }
        }
        Ok(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records sealed by one side open on the other, in any cut, and nothing else opens.
    #[test]
    fn sealed_records_open_on_the_other_side_only() {
        let provider = provider();
        let ca = rcgen::generate_simple_self_signed(vec!["beta".into()]).expect("certificate");
        let cert = ca.cert.der().clone();
        let key = PrivateKeyDer::try_from(ca.key_pair.serialize_der()).expect("key");
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).expect("root");
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config");
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("beta").expect("name");
        let mut c: rustls::Connection = rustls::ClientConnection::new(Arc::new(client), name)
            .expect("client")
            .into();
        let mut s: rustls::Connection = rustls::ServerConnection::new(Arc::new(server))
            .expect("server")
            .into();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("client writes");
            }
            s.read_tls(&mut &buf[..]).expect("server reads");
            s.process_new_packets().expect("server processes");
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("server writes");
            }
            c.read_tls(&mut &buf[..]).expect("client reads");
            c.process_new_packets().expect("client processes");
        }
        assert!(!c.is_handshaking() && !s.is_handshaking(), "no handshake");
        let (c, s) = (
            TlsRecords {
                conn: Mutex::new(c),
            },
            TlsRecords {
                conn: Mutex::new(s),
            },
        );
        let payload: VecDeque<Bytes> = (0..5u8)
            .map(|i| Bytes::from(vec![i; 50_000 + i as usize]))
            .collect();
        let want: Vec<u8> = payload.iter().flat_map(|b| b.to_vec()).collect();
        let sealed = c.seal(&payload).expect("seal");
        assert!(
            !sealed.windows(64).any(|w| w == &want[..64]),
            "the plaintext shows in the records"
        );
        let mut plain = BytesMut::new();
        // Delivered in uneven pieces: a partial record waits for its rest.
        for piece in sealed.chunks(7_777) {
            let mut cipher = BytesMut::from(piece);
            assert!(!s.open(&mut cipher, &mut plain).expect("open"));
            assert!(cipher.is_empty(), "rustls buffers what it took");
        }
        assert_eq!(&plain[..], &want[..]);
        // A flipped bit is refused.
        let mut bad = BytesMut::from(&c.seal(&payload).expect("seal")[..]);
        let at = bad.len() / 2;
        bad[at] ^= 1;
        assert!(s.open(&mut bad, &mut BytesMut::new()).is_err());
    }
}
