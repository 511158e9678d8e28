//! Mutual challenge-response authentication of the two nodes, sans-IO. It
//! runs on a fresh peer connection before any framed message.
//!
//! Both sides run the same [`Authenticator`] at once (no initiator/acceptor
//! distinction): each sends a challenge frame right away, answers the peer's
//! challenge with a response frame, and checks the peer's response.
//!
//! Wire format (big-endian, its own magic so it cannot be mistaken for a
//! message frame):
//!
//! - challenge: magic u32 [`AUTH_MAGIC`], kind u8 = 1, resource (u8 len +
//!   bytes), node (u8 len + UTF-8), challenge 32 random bytes, then the
//!   connection as the sender sees it ([`Endpoints`]: u8 1, the dialer's
//!   address, the acceptor's address; or u8 0 when the sender does not bind
//!   the connection, `insecure-allow-relay`); an address is u8 4 or 6, the
//!   IP (4 or 16 bytes), port u16;
//! - response: magic u32, kind u8 = 2, HMAC-SHA256 tag (32 bytes).
//!
//! The tag a node sends is HMAC-SHA256(secret, [`AUTH_LABEL`] || "response" ||
//! resource || the sender's node name || the receiver's node name || the
//! receiver's challenge || the sender's own challenge || the connection as
//! the sender sees it), every name with its length byte in front. Why this
//! resists the usual attacks:
//!
//! - relay (a party that reaches both peer ports connects to both, or takes
//!   both nodes' dials, and pipes the two connections into each other): each
//!   side binds its tag to the connection's two endpoints as it sees them,
//!   ordered dialer then acceptor, so on a direct TCP connection both sides
//!   bind the same pair, while a relay shows each node a different
//!   connection. A side refuses a challenge whose stated endpoints differ
//!   from its own view before it answers (so a relay gets no tag at all), and
//!   a peer that lies about them cannot produce a tag over the true view.
//!   The price: NAT or a proxy between the nodes is refused too, unless both
//!   sides opt out (`[net] insecure-allow-relay`);
//! - replay: each side's own fresh random challenge is in the tag it checks;
//! - reflection (sending a node's own response, or a response obtained from
//!   it on a second connection, back to it): a node only ever signs with its
//!   own name in the sender position, and refuses a peer that claims its
//!   name, so it never produces a tag it would accept; a peer echoing our
//!   challenge back is refused outright;
//! - cross-resource reuse of one secret: the resource name is in the tag;
//! - a reflection across two connections: also the endpoints differ.
//!
//! Over TLS ([`Authenticator::bind_session`]) the tag also covers 32 bytes of
//! keying material exported from the TLS session (RFC 8446 section 7.5, label
//! [`TLS_EXPORTER_LABEL`]), which both ends of one TLS session share and
//! nobody else knows: a party that terminates TLS towards each node (with
//! certificates from the configured CA) holds two sessions with two
//! different exporters, so the tags do not verify, and the secret proves
//! the session as well as the peer.
//!
//! Tags are compared in constant time (`hmac`'s `verify_slice`).
//!
//! With an empty secret (no `shared-secret-file` configured) the exchange
//! still runs, keyed with the empty string: it then authenticates nothing
//! (anyone can compute the tags), it only checks the resource name and
//! tells each side the other's node name. Nothing after authentication is
//! authenticated or encrypted either way: this keeps unauthorised peers from
//! joining, it does not protect the link against a man in the middle.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// "nma2": nbd-mirror authentication, version 2 (binds the connection).
pub const AUTH_MAGIC: u32 = 0x6e6d_6132;

/// "nma1": version 1, which did not bind the connection; refused with a clear error.
const AUTH_MAGIC_V1: u32 = 0x6e6d_6131;

/// Domain separation label at the front of every tag.
pub const AUTH_LABEL: &[u8] = b"nbd-mirror-auth-v2";

/// The TLS exporter label whose keying material a tag binds over TLS.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-nbd-mirror-peer-auth";

/// Bytes of exported keying material a tag binds.
pub const SESSION_BINDING_LEN: usize = 32;

/// One connection as one side sees it, ordered so that both ends of a direct
/// TCP connection see the same value: the dialer's local address is the
/// acceptor's remote address and the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub dialer: SocketAddr,
    pub acceptor: SocketAddr,
}

impl Endpoints {
    /// The connection seen from a socket with these `local` and `remote`
    /// addresses, which this side `dialed` or accepted. IPv4-mapped IPv6
    /// addresses count as IPv4 and scope ids are dropped, so a dual-stack
    /// listener and a plain IPv4 dialer agree.
    pub fn seen_from(local: SocketAddr, remote: SocketAddr, dialed: bool) -> Endpoints {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (local, remote) = (canon(local), canon(remote));
        if dialed {
            Endpoints {
                dialer: local,
                acceptor: remote,
            }
        } else {
            Endpoints {
                dialer: remote,
                acceptor: local,
            }
        }
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.dialer, self.acceptor)
    }
}

/// Bytes in a challenge.
pub const CHALLENGE_LEN: usize = 32;

/// Bytes in an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// Longest resource or node name (one length byte).
pub const MAX_NAME_LEN: usize = 255;

const KIND_CHALLENGE: u8 = 1;
const KIND_RESPONSE: u8 = 2;

/// Bytes of a response frame.
const RESPONSE_LEN: usize = 4 + 1 + TAG_LEN;

/// What [`Authenticator::feed`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// More input is needed (send [`Authenticator::take_output`] first).
    NeedMore,
    /// The peer proved knowledge of the secret. Still send any output:
    /// the peer may be waiting for this node's response.
    Done { peer_node: String },
}

/// Why authentication failed. `Display` says what failed, suitable after
/// "peer ADDR failed authentication: ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The first bytes are not an nbd-mirror authentication frame.
    BadMagic(u32),
    /// A frame of the wrong kind at this point of the exchange.
    UnexpectedKind { expected: &'static str, got: u8 },
    /// A frame whose fields make no sense.
    Malformed(&'static str),
    /// The peer is configured for another resource.
    ResourceMismatch { ours: String, theirs: String },
    /// The peer claims this node's own name.
    SameNode(String),
    /// The peer sent this node's own challenge back.
    ReflectedChallenge,
    /// The peer's response does not verify under this node's secret.
    WrongSecret,
    /// Over TLS: the peer's response does not verify under this node's secret and
    /// TLS session (the wrong secret, or a party in the middle of the TLS session).
    WrongSecretOrSession,
    /// The peer sees another connection than this node: a relay (or NAT or
    /// a proxy) is between them.
    /// (Boxed: keeps every `Result` of this module small.)
    Relayed {
        ours: Box<Endpoints>,
        theirs: Box<Endpoints>,
    },
    /// Exactly one side binds the connection (`insecure-allow-relay` is set
    /// on one side only).
    BindingMismatch { ours_bound: bool },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::BadMagic(AUTH_MAGIC_V1) => write!(
                f,
                "the peer speaks authentication version 1 (an older nbd-mirror that does not bind \
                 the connection); upgrade it"
            ),
            AuthError::BadMagic(m) => write!(
                f,
                "not an nbd-mirror peer (auth magic 0x{m:08x}, expected 0x{AUTH_MAGIC:08x})"
            ),
            AuthError::UnexpectedKind { expected, got } => {
                write!(f, "expected a {expected} frame, got frame kind {got}")
            }
            AuthError::Malformed(why) => write!(f, "malformed auth frame: {why}"),
            AuthError::ResourceMismatch { ours, theirs } => write!(
                f,
                "peer is for resource `{}`, this node is for `{ours}`",
                theirs.escape_debug()
            ),
            AuthError::SameNode(name) => {
                write!(
                    f,
                    "peer claims to be this node (`{name}`); check the node names"
                )
            }
            AuthError::ReflectedChallenge => {
                write!(
                    f,
                    "peer sent this node's own challenge back (reflection attempt)"
                )
            }
            AuthError::WrongSecret => {
                write!(
                    f,
                    "wrong shared secret (the peer's response does not verify)"
                )
            }
            AuthError::WrongSecretOrSession => write!(
                f,
                "wrong shared secret, or not the same TLS session (the peer's response does \
                 not verify: a party may be in the middle of the TLS session)"
            ),
            AuthError::Relayed { ours, theirs } => write!(
                f,
                "relayed connection: the peer sees it as {theirs}, this node as {ours} \
                 (a relay, NAT or proxy is between the nodes; see [net] insecure-allow-relay)"
            ),
            AuthError::BindingMismatch { ours_bound } => write!(
                f,
                "[net] insecure-allow-relay is set on {} only; set it on both nodes or neither",
                if *ours_bound { "the peer" } else { "this node" }
            ),
        }
    }
}

impl std::error::Error for AuthError {}

#[derive(Debug, Clone)]
enum State {
    /// Our challenge is queued; waiting for the peer's.
    AwaitChallenge,
    /// Our response is queued; waiting for the peer's.
    AwaitResponse {
        peer_node: String,
        peer_challenge: [u8; CHALLENGE_LEN],
    },
    Done {
        peer_node: String,
    },
    Failed(AuthError),
}

/// One side of the mutual authentication.
pub struct Authenticator {
    key: HmacSha256,
    my_node: String,
    resource: String,
    my_challenge: [u8; CHALLENGE_LEN],
    /// The connection as this side sees it; `None`: not bound (`insecure-allow-relay`).
    conn: Option<Endpoints>,
    /// Keying material exported from the TLS session the exchange runs in, if any.
    session: Option<[u8; SESSION_BINDING_LEN]>,
    output: BytesMut,
    state: State,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never prints the key.
        f.debug_struct("Authenticator")
            .field("my_node", &self.my_node)
            .field("resource", &self.resource)
            .field("conn", &self.conn)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Starts the exchange with a fresh random challenge from /dev/urandom
    /// (error if it cannot be read). The challenge frame is queued for
    /// [`take_output`](Self::take_output). Names must be 1..=255 bytes.
    /// `conn` is the connection as this side sees it ([`Endpoints::seen_from`]);
    /// `None` binds no connection, so a relay passes (`insecure-allow-relay`).
    pub fn new(
        secret: &[u8],
        my_node: &str,
        resource: &str,
        conn: Option<Endpoints>,
    ) -> io::Result<Self> {
        Self::with_challenge(secret, my_node, resource, conn, random_challenge()?)
    }

    /// Like [`new`](Self::new) with a given challenge. For tests and fuzzing
    /// only: a challenge that is not fresh and random defeats replay protection.
    pub fn with_challenge(
        secret: &[u8],
        my_node: &str,
        resource: &str,
        conn: Option<Endpoints>,
        challenge: [u8; CHALLENGE_LEN],
    ) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        for (what, name) in [("node", my_node), ("resource", resource)] {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return Err(invalid(format!(
                    "{what} name `{name}` must be 1 to {MAX_NAME_LEN} bytes for peer authentication"
                )));
            }
        }
        let key = HmacSha256::new_from_slice(secret)
            .map_err(|e| invalid(format!("shared secret unusable as an HMAC key: {e}")))?;
        let mut output =
            BytesMut::with_capacity(4 + 1 + 2 + my_node.len() + resource.len() + 32 + 1 + 38);
        output.put_u32(AUTH_MAGIC);
        output.put_u8(KIND_CHALLENGE);
        put_name(&mut output, resource.as_bytes());
        put_name(&mut output, my_node.as_bytes());
        output.put_slice(&challenge);
        put_endpoints(&mut output, conn.as_ref());
        Ok(Self {
            key,
            my_node: my_node.to_owned(),
            resource: resource.to_owned(),
            my_challenge: challenge,
            conn,
            session: None,
            output,
            state: State::AwaitChallenge,
        })
    }

    /// Binds the tags to the TLS session the exchange runs in: `keying_material` is
    /// exported from it with [`TLS_EXPORTER_LABEL`] and no context. Both sides must bind
    /// (both run TLS or neither, since the TLS handshake comes first). Call before the
    /// first [`feed`](Self::feed).
    pub fn bind_session(&mut self, keying_material: [u8; SESSION_BINDING_LEN]) {
        assert!(
            matches!(self.state, State::AwaitChallenge),
            "the TLS session is bound before the exchange"
        );
        self.session = Some(keying_material);
    }

    /// Moves the bytes to send to the peer into `out`.
    pub fn take_output(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.output);
        self.output.clear();
    }

    /// Whether there are bytes to send.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Consumes the peer's authentication frames from the front of `input`
    /// (and nothing after them: framed messages that follow stay in place).
    /// After `Done` or an error, further calls repeat the outcome and
    /// consume nothing.
    pub fn feed(&mut self, input: &mut BytesMut) -> Result<AuthStep, AuthError> {
        // Bounded: each pass either returns or moves the state forward once.
        for _ in 0..3 {
            let next = match &self.state {
                State::Failed(e) => return Err(e.clone()),
                State::Done { peer_node } => {
                    return Ok(AuthStep::Done {
                        peer_node: peer_node.clone(),
                    })
                }
                State::AwaitChallenge => match self.take_challenge(input) {
                    Ok(None) => return Ok(AuthStep::NeedMore),
                    Ok(Some(next)) => next,
                    Err(e) => State::Failed(e),
                },
                State::AwaitResponse {
                    peer_node,
                    peer_challenge,
                } => match self.take_response(input, peer_node, peer_challenge) {
                    Ok(None) => return Ok(AuthStep::NeedMore),
                    Ok(Some(())) => State::Done {
                        peer_node: peer_node.clone(),
                    },
                    Err(e) => State::Failed(e),
                },
            };
            self.state = next;
        }
        debug_assert!(false, "auth state machine did not settle");
        Ok(AuthStep::NeedMore)
    }

    /// Parses the peer's challenge frame; on success queues our response.
    fn take_challenge(&mut self, input: &mut BytesMut) -> Result<Option<State>, AuthError> {
        let Some(frame) = parse_challenge(input)? else {
            return Ok(None);
        };
        input.advance(frame.consumed);
        if frame.resource != self.resource.as_bytes() {
            return Err(AuthError::ResourceMismatch {
                ours: self.resource.clone(),
                theirs: String::from_utf8_lossy(&frame.resource).into_owned(),
            });
        }
        let peer_node = String::from_utf8(frame.node)
            .map_err(|_| AuthError::Malformed("node name is not UTF-8"))?;
        if peer_node == self.my_node {
            return Err(AuthError::SameNode(peer_node));
        }
        if frame.challenge == self.my_challenge {
            return Err(AuthError::ReflectedChallenge);
        }
        match (self.conn, frame.conn) {
            (Some(ours), Some(theirs)) if ours != theirs => {
                return Err(AuthError::Relayed {
                    ours: Box::new(ours),
                    theirs: Box::new(theirs),
                })
            }
            (Some(_), Some(_)) | (None, None) => {}
            (ours, _) => {
                return Err(AuthError::BindingMismatch {
                    ours_bound: ours.is_some(),
                })
            }
        }
        let tag = self
            .tag(
                self.my_node.as_bytes(),
                peer_node.as_bytes(),
                &frame.challenge,
                &self.my_challenge,
            )
            .finalize()
            .into_bytes();
        self.output.put_u32(AUTH_MAGIC);
        self.output.put_u8(KIND_RESPONSE);
        self.output.put_slice(&tag);
        Ok(Some(State::AwaitResponse {
            peer_node,
            peer_challenge: frame.challenge,
        }))
    }

    /// Parses and verifies the peer's response frame.
    fn take_response(
        &self,
        input: &mut BytesMut,
        peer_node: &str,
        peer_challenge: &[u8; CHALLENGE_LEN],
    ) -> Result<Option<()>, AuthError> {
        check_head(input, KIND_RESPONSE, "response")?;
        let Some(frame) = input.get(..RESPONSE_LEN) else {
            return Ok(None);
        };
        let tag = &frame[5..];
        let verified = self
            .tag(
                peer_node.as_bytes(),
                self.my_node.as_bytes(),
                &self.my_challenge,
                peer_challenge,
            )
            .verify_slice(tag);
        input.advance(RESPONSE_LEN);
        verified.map(Some).map_err(|_| match self.session {
            Some(_) => AuthError::WrongSecretOrSession,
            None => AuthError::WrongSecret,
        })
    }

    /// The keyed MAC over everything a tag binds, ready to finalize or verify.
    fn tag(
        &self,
        sender: &[u8],
        receiver: &[u8],
        receiver_challenge: &[u8; CHALLENGE_LEN],
        sender_challenge: &[u8; CHALLENGE_LEN],
    ) -> HmacSha256 {
        debug_assert!(sender.len() <= MAX_NAME_LEN && receiver.len() <= MAX_NAME_LEN);
        let mut mac = self.key.clone();
        let mut prefixed = |bytes: &[u8]| {
            mac.update(&[bytes.len() as u8]);
            mac.update(bytes);
        };
        prefixed(AUTH_LABEL);
        prefixed(b"response");
        prefixed(self.resource.as_bytes());
        prefixed(sender);
        prefixed(receiver);
        mac.update(receiver_challenge);
        mac.update(sender_challenge);
        // Our own view, never the peer's claim: a peer that lies about the
        // endpoints gets past the comparison but not the tag.
        let mut conn = BytesMut::with_capacity(39);
        put_endpoints(&mut conn, self.conn.as_ref());
        mac.update(&conn);
        if let Some(session) = &self.session {
            mac.update(&[TLS_EXPORTER_LABEL.len() as u8]);
            mac.update(TLS_EXPORTER_LABEL);
            mac.update(session);
        }
        mac
    }
}

fn put_name(out: &mut BytesMut, name: &[u8]) {
    debug_assert!(name.len() <= MAX_NAME_LEN);
    out.put_u8(name.len() as u8);
    out.put_slice(name);
}

fn put_endpoints(out: &mut BytesMut, conn: Option<&Endpoints>) {
    let Some(conn) = conn else {
        out.put_u8(0);
        return;
    };
    out.put_u8(1);
    for addr in [conn.dialer, conn.acceptor] {
        match addr.ip() {
            IpAddr::V4(ip) => {
                out.put_u8(4);
                out.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.put_u8(6);
                out.put_slice(&ip.octets());
            }
        }
        out.put_u16(addr.port());
    }
}

/// Parses [`put_endpoints`]' output at `input[*at..]`; `Ok(None)` while
/// incomplete, `Ok(Some(None))` for "not bound".
fn parse_endpoints(input: &[u8], at: &mut usize) -> Result<Option<Option<Endpoints>>, AuthError> {
    let Some(&bound) = input.get(*at) else {
        return Ok(None);
    };
    let mut pos = *at + 1;
    let conn = match bound {
        0 => None,
        1 => {
            let mut addrs = [SocketAddr::from(([0, 0, 0, 0], 0)); 2];
            for addr in &mut addrs {
                let ip_len = match input.get(pos) {
                    None => return Ok(None),
                    Some(4) => 4,
                    Some(6) => 16,
                    Some(_) => return Err(AuthError::Malformed("bad address family")),
                };
                let Some(bytes) = input.get(pos + 1..pos + 1 + ip_len + 2) else {
                    return Ok(None);
                };
                let (ip_bytes, port) = bytes.split_at(ip_len);
                let ip = match <[u8; 4]>::try_from(ip_bytes) {
                    Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
                    Err(_) => {
                        let mut v6 = [0u8; 16];
                        v6.copy_from_slice(ip_bytes);
                        IpAddr::V6(Ipv6Addr::from(v6))
                    }
                };
                *addr = SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]]));
                pos += 1 + ip_len + 2;
            }
            Some(Endpoints {
                dialer: addrs[0],
                acceptor: addrs[1],
            })
        }
        _ => return Err(AuthError::Malformed("bad connection binding flag")),
    };
    *at = pos;
    Ok(Some(conn))
}

fn random_challenge() -> io::Result<[u8; CHALLENGE_LEN]> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut challenge))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading /dev/urandom for the peer auth challenge: {e}"),
            )
        })?;
    Ok(challenge)
}

/// Checks magic and kind as far as they have arrived.
fn check_head(input: &[u8], kind: u8, kind_name: &'static str) -> Result<(), AuthError> {
    if let Some(magic) = input.first_chunk::<4>() {
        let magic = u32::from_be_bytes(*magic);
        if magic != AUTH_MAGIC {
            return Err(AuthError::BadMagic(magic));
        }
    }
    match input.get(4) {
        Some(&got) if got != kind => Err(AuthError::UnexpectedKind {
            expected: kind_name,
            got,
        }),
        _ => Ok(()),
    }
}

struct ChallengeFrame {
    resource: Vec<u8>,
    node: Vec<u8>,
    challenge: [u8; CHALLENGE_LEN],
    conn: Option<Endpoints>,
    consumed: usize,
}

/// Parses a challenge frame at the front of `input` without consuming it;
/// `None` while incomplete.
fn parse_challenge(input: &[u8]) -> Result<Option<ChallengeFrame>, AuthError> {
    check_head(input, KIND_CHALLENGE, "challenge")?;
    let mut at = 5;
    let name = |at: &mut usize| -> Result<Option<Vec<u8>>, AuthError> {
        let Some(&len) = input.get(*at) else {
            return Ok(None);
        };
        if len == 0 {
            return Err(AuthError::Malformed("empty name"));
        }
        let Some(bytes) = input.get(*at + 1..*at + 1 + usize::from(len)) else {
            return Ok(None);
        };
        *at += 1 + usize::from(len);
        Ok(Some(bytes.to_vec()))
    };
    let Some(resource) = name(&mut at)? else {
        return Ok(None);
    };
    let Some(node) = name(&mut at)? else {
        return Ok(None);
    };
    let Some(challenge) = input.get(at..at + CHALLENGE_LEN) else {
        return Ok(None);
    };
    let mut fixed = [0u8; CHALLENGE_LEN];
    fixed.copy_from_slice(challenge);
    at += CHALLENGE_LEN;
    let Some(conn) = parse_endpoints(input, &mut at)? else {
        return Ok(None);
    };
    Ok(Some(ChallengeFrame {
        resource,
        node,
        challenge: fixed,
        conn,
        consumed: at,
    }))
}
