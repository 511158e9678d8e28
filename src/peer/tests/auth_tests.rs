//! Tests of the mutual authentication exchange.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use std::net::SocketAddr;

use crate::peer::auth::{AUTH_MAGIC, CHALLENGE_LEN};
use crate::peer::*;

const ALPHA: &str = "10.231.1.1:7789";
const BETA: &str = "10.231.2.1:7789";
const RELAY_A: &str = "10.231.1.9:40000";
const RELAY_B: &str = "10.231.2.9:40001";

fn addr(a: &str) -> SocketAddr {
    a.parse().expect("address")
}

/// The connection as `node` sees it when alpha dialed beta directly.
fn direct(node: &str) -> Option<Endpoints> {
    Some(match node {
        "alpha" => Endpoints::seen_from(addr("10.231.1.1:40000"), addr(BETA), true),
        _ => Endpoints::seen_from(addr(BETA), addr("10.231.1.1:40000"), false),
    })
}

fn side(secret: &[u8], node: &str, resource: &str) -> Authenticator {
    Authenticator::new(secret, node, resource, direct(node)).expect("authenticator")
}

fn side_on(node: &str, conn: Option<Endpoints>) -> Authenticator {
    Authenticator::new(b"k", node, "r0", conn).expect("authenticator")
}

/// Runs both sides against each other, delivering `chunk` bytes at a time,
/// until both finish. Returns each side's outcome.
fn run(
    a: &mut Authenticator,
    b: &mut Authenticator,
    chunk: usize,
) -> (Result<AuthStep, AuthError>, Result<AuthStep, AuthError>) {
    let (mut a_to_b, mut b_to_a) = (BytesMut::new(), BytesMut::new());
    let (mut b_in, mut a_in) = (BytesMut::new(), BytesMut::new());
    let mut ra = Ok(AuthStep::NeedMore);
    let mut rb = Ok(AuthStep::NeedMore);
    for _ in 0..10_000 {
        a.take_output(&mut a_to_b);
        b.take_output(&mut b_to_a);
        let n = chunk.min(a_to_b.len());
        b_in.extend_from_slice(&a_to_b.split_to(n));
        let n = chunk.min(b_to_a.len());
        a_in.extend_from_slice(&b_to_a.split_to(n));
        if ra == Ok(AuthStep::NeedMore) {
            ra = a.feed(&mut a_in);
        }
        if rb == Ok(AuthStep::NeedMore) {
            rb = b.feed(&mut b_in);
        }
        let settled = |r: &Result<AuthStep, AuthError>| r != &Ok(AuthStep::NeedMore);
        if settled(&ra) && settled(&rb) && !a.has_output() && !b.has_output() {
            break;
        }
        if a_to_b.is_empty() && b_to_a.is_empty() && !a.has_output() && !b.has_output() {
            break; // nothing in flight: a stuck side stays NeedMore
        }
    }
    (ra, rb)
}

fn done(node: &str) -> Result<AuthStep, AuthError> {
    Ok(AuthStep::Done {
        peer_node: node.to_string(),
    })
}

#[test]
fn same_secret_both_sides_succeed_and_learn_names() {
    for chunk in [1, 3, 7, 1000] {
        let mut a = side(b"s3cret", "alpha", "r0");
        let mut b = side(b"s3cret", "beta", "r0");
        assert_eq!(
            run(&mut a, &mut b, chunk),
            (done("beta"), done("alpha")),
            "chunk {chunk}"
        );
        // Repeated feeds repeat the outcome.
        assert_eq!(a.feed(&mut BytesMut::new()), done("beta"));
    }
}

#[test]
fn bytes_after_the_auth_frames_stay_for_the_message_decoder() {
    let mut a = side(b"k", "alpha", "r0");
    let mut b = side(b"k", "beta", "r0");
    let mut a_out = BytesMut::new();
    let mut b_out = BytesMut::new();
    a.take_output(&mut a_out);
    b.take_output(&mut b_out);
    assert_eq!(b.feed(&mut a_out), Ok(AuthStep::NeedMore));
    assert!(a_out.is_empty());
    b.take_output(&mut b_out); // b's challenge, then its response
    encode(&Message::Ping, &mut b_out); // pipelined right after auth
    assert_eq!(a.feed(&mut b_out), done("beta"));
    assert_eq!(
        Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut b_out),
        Ok(Some(Message::Ping))
    );
    a.take_output(&mut a_out);
    assert_eq!(b.feed(&mut a_out), done("alpha"));
    assert!(a_out.is_empty());
}

#[test]
fn a_bound_tls_session_must_be_the_same_on_both_sides() {
    let bound = |node: &str, session: u8| {
        let mut a = side(b"k", node, "r0");
        a.bind_session([session; 32]);
        a
    };
    let (mut a, mut b) = (bound("alpha", 7), bound("beta", 7));
    assert_eq!(run(&mut a, &mut b, 1000), (done("beta"), done("alpha")));
    // A party in the middle of TLS holds two sessions: two exporters.
    let (mut a, mut b) = (bound("alpha", 7), bound("beta", 8));
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(ra, Err(AuthError::WrongSecretOrSession));
    assert_eq!(rb, Err(AuthError::WrongSecretOrSession));
    assert!(ra.unwrap_err().to_string().contains("TLS session"));
    // The same session with the wrong secret fails too.
    let mut a = side(b"right", "alpha", "r0");
    a.bind_session([7; 32]);
    let mut b = side(b"wrong", "beta", "r0");
    b.bind_session([7; 32]);
    let (ra, _) = run(&mut a, &mut b, 1000);
    assert_eq!(ra, Err(AuthError::WrongSecretOrSession));
}

#[test]
fn wrong_secret_fails_on_both_sides() {
    let mut a = side(b"right", "alpha", "r0");
    let mut b = side(b"wrong", "beta", "r0");
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(ra, Err(AuthError::WrongSecret));
    assert_eq!(rb, Err(AuthError::WrongSecret));
    assert!(ra.unwrap_err().to_string().contains("wrong shared secret"));
    // The failure is sticky.
    assert_eq!(a.feed(&mut BytesMut::new()), Err(AuthError::WrongSecret));
}

#[test]
fn empty_secret_only_matches_empty_secret() {
    let mut a = side(b"", "alpha", "r0");
    let mut b = side(b"", "beta", "r0");
    assert_eq!(run(&mut a, &mut b, 1000), (done("beta"), done("alpha")));
    let mut a = side(b"", "alpha", "r0");
    let mut b = side(b"x", "beta", "r0");
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(
        (ra, rb),
        (Err(AuthError::WrongSecret), Err(AuthError::WrongSecret))
    );
}

#[test]
fn different_resource_fails_on_both_sides() {
    let mut a = side(b"k", "alpha", "r0");
    let mut b = side(b"k", "beta", "r1");
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(
        ra,
        Err(AuthError::ResourceMismatch {
            ours: "r0".into(),
            theirs: "r1".into()
        })
    );
    assert_eq!(
        rb,
        Err(AuthError::ResourceMismatch {
            ours: "r1".into(),
            theirs: "r0".into()
        })
    );
    let text = ra.unwrap_err().to_string();
    assert!(text.contains("`r1`") && text.contains("`r0`"), "{text}");
}

/// Builds a challenge frame as an attacker would, stating alpha's view of
/// the direct connection.
fn challenge_frame(resource: &str, node: &str, challenge: &[u8; CHALLENGE_LEN]) -> BytesMut {
    let mut f = challenge_head(resource, node, challenge);
    put_conn(&mut f, direct("alpha").expect("bound"));
    f
}

/// The wire form of a bound connection (IPv4 test addresses).
fn put_conn(f: &mut BytesMut, conn: Endpoints) {
    f.put_u8(1);
    for a in [conn.dialer, conn.acceptor] {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            unreachable!("test addresses are IPv4")
        };
        f.put_u8(4);
        f.put_slice(&ip.octets());
        f.put_u16(a.port());
    }
}

/// A challenge frame up to the challenge, without the connection.
fn challenge_head(resource: &str, node: &str, challenge: &[u8; CHALLENGE_LEN]) -> BytesMut {
    let mut f = BytesMut::new();
    f.put_u32(AUTH_MAGIC);
    f.put_u8(1);
    f.put_u8(resource.len() as u8);
    f.put_slice(resource.as_bytes());
    f.put_u8(node.len() as u8);
    f.put_slice(node.as_bytes());
    f.put_slice(challenge);
    f
}

/// Splits a side's output into its challenge (the first frame) and the
/// bytes after it.
fn challenge_of(out: &[u8], resource: &str, node: &str) -> [u8; CHALLENGE_LEN] {
    let at = 4 + 1 + 1 + resource.len() + 1 + node.len();
    let mut c = [0u8; CHALLENGE_LEN];
    c.copy_from_slice(&out[at..at + CHALLENGE_LEN]);
    c
}

#[test]
fn reflected_response_fails() {
    // The attacker, claiming to be beta, answers alpha with alpha's own response.
    let mut a = side(b"k", "alpha", "r0");
    let mut a_out = BytesMut::new();
    a.take_output(&mut a_out);
    let mut input = challenge_frame("r0", "beta", &[7u8; CHALLENGE_LEN]);
    assert_eq!(a.feed(&mut input), Ok(AuthStep::NeedMore));
    let mut response = BytesMut::new();
    a.take_output(&mut response);
    assert_eq!(a.feed(&mut response), Err(AuthError::WrongSecret));
}

#[test]
fn response_obtained_from_a_second_session_fails() {
    // The classic reflection attack, in its strongest order. Session 1: the
    // attacker (claiming beta) gets alpha's challenge c1 and holds back its own.
    let mut a1 = side(b"k", "alpha", "r0");
    let mut out1 = BytesMut::new();
    a1.take_output(&mut out1);
    let c1 = challenge_of(&out1, "r0", "alpha");

    // Session 2: alpha sends c2; the attacker sends c1 as its own challenge,
    // so alpha signs (c1, c2).
    let mut a2 = side(b"k", "alpha", "r0");
    let mut out2 = BytesMut::new();
    a2.take_output(&mut out2);
    let c2 = challenge_of(&out2, "r0", "alpha");
    let mut input = challenge_frame("r0", "beta", &c1);
    assert_eq!(a2.feed(&mut input), Ok(AuthStep::NeedMore));
    let mut tag_c1_c2 = BytesMut::new();
    a2.take_output(&mut tag_c1_c2);
    assert_eq!(tag_c1_c2.len(), 37, "only the response is pending");

    // Back in session 1 the attacker claims c2 as its challenge and offers
    // alpha's tag over (c1, c2): refused, because alpha signed as alpha.
    let mut input = challenge_frame("r0", "beta", &c2);
    input.extend_from_slice(&tag_c1_c2);
    assert_eq!(a1.feed(&mut input), Err(AuthError::WrongSecret));
}

#[test]
fn replayed_session_fails() {
    // Record beta's side of a good session with alpha.
    let mut a = side(b"k", "alpha", "r0");
    let mut b = side(b"k", "beta", "r0");
    let mut a_out = BytesMut::new();
    a.take_output(&mut a_out);
    assert_eq!(b.feed(&mut a_out), Ok(AuthStep::NeedMore));
    let mut recorded = BytesMut::new();
    b.take_output(&mut recorded);
    assert_eq!(a.feed(&mut recorded.clone()), done("beta"));

    // Replaying it to a new session of alpha fails: its challenge is fresh.
    let mut a2 = side(b"k", "alpha", "r0");
    assert_eq!(a2.feed(&mut recorded), Err(AuthError::WrongSecret));
}

#[test]
fn echoed_challenge_is_refused() {
    let mut a = side(b"k", "alpha", "r0");
    let mut out = BytesMut::new();
    a.take_output(&mut out);
    let c = challenge_of(&out, "r0", "alpha");
    let mut input = challenge_frame("r0", "beta", &c);
    assert_eq!(a.feed(&mut input), Err(AuthError::ReflectedChallenge));
    // No response was produced for the echoed challenge.
    assert!(!a.has_output());
}

#[test]
fn peer_claiming_our_name_is_refused() {
    let mut a = side(b"k", "alpha", "r0");
    let mut input = challenge_frame("r0", "alpha", &[1u8; CHALLENGE_LEN]);
    assert_eq!(a.feed(&mut input), Err(AuthError::SameNode("alpha".into())));
    let mut a = side(b"k", "alpha", "r0");
    let mut b = side(b"k", "alpha", "r0");
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(
        (ra, rb),
        (
            Err(AuthError::SameNode("alpha".into())),
            Err(AuthError::SameNode("alpha".into()))
        )
    );
}

#[test]
fn non_auth_input_is_refused_early() {
    let mut a = side(b"k", "alpha", "r0");
    let mut ping = BytesMut::new();
    encode(&Message::Ping, &mut ping);
    let res = a.feed(&mut ping);
    assert_eq!(res, Err(AuthError::BadMagic(0x6e6d_7031)));
    // A wrong magic is seen as soon as 4 bytes are in.
    let mut a = side(b"k", "alpha", "r0");
    assert_eq!(
        a.feed(&mut BytesMut::from(&b"GET "[..])),
        Err(AuthError::BadMagic(0x4745_5420))
    );
    // A response frame where a challenge is due.
    let mut a = side(b"k", "alpha", "r0");
    let mut f = BytesMut::new();
    f.put_u32(AUTH_MAGIC);
    f.put_u8(2);
    assert_eq!(
        a.feed(&mut f),
        Err(AuthError::UnexpectedKind {
            expected: "challenge",
            got: 2
        })
    );
    // Empty names.
    let mut a = side(b"k", "alpha", "r0");
    let mut f = challenge_frame("r0", "", &[1u8; CHALLENGE_LEN]);
    assert_eq!(a.feed(&mut f), Err(AuthError::Malformed("empty name")));
}

#[test]
fn names_must_fit_and_challenges_are_random() {
    assert!(Authenticator::new(b"k", "", "r0", None).is_err());
    assert!(Authenticator::new(b"k", "alpha", &"r".repeat(256), None).is_err());
    assert!(Authenticator::new(b"k", &"n".repeat(255), "r0", None).is_ok());
    let (mut x, mut y) = (BytesMut::new(), BytesMut::new());
    side(b"k", "alpha", "r0").take_output(&mut x);
    side(b"k", "alpha", "r0").take_output(&mut y);
    assert_eq!(x.len(), y.len());
    assert_ne!(x, y, "two challenges are equal");
}

#[test]
fn debug_output_does_not_show_the_secret() {
    let a = side(b"topsecretvalue", "alpha", "r0");
    let text = format!("{a:?}");
    assert!(
        text.contains("alpha") && !text.contains("topsecret"),
        "{text}"
    );
}

/// What alpha and beta see when a relay connected to both their peer ports.
fn relayed_views() -> (Endpoints, Endpoints) {
    (
        Endpoints::seen_from(addr(ALPHA), addr(RELAY_A), false),
        Endpoints::seen_from(addr(BETA), addr(RELAY_B), false),
    )
}

#[test]
fn direct_connection_gives_both_sides_the_same_view() {
    let (a, b) = (direct("alpha"), direct("beta"));
    assert_eq!(a, b);
    // An IPv4-mapped address (dual-stack listener) is the same connection.
    let mapped = Endpoints::seen_from(
        addr("[::ffff:10.231.2.1]:7789"),
        addr("[::ffff:10.231.1.1]:40000"),
        false,
    );
    assert_eq!(Some(mapped), a);
    let mut x = side_on("alpha", a);
    let mut y = side_on("beta", Some(mapped));
    assert_eq!(run(&mut x, &mut y, 5), (done("beta"), done("alpha")));
}

#[test]
fn relayed_connection_is_refused_by_both_before_either_answers() {
    // The relay connected to both peer ports and pipes the two connections.
    let (va, vb) = relayed_views();
    let mut a = side_on("alpha", Some(va));
    let mut b = side_on("beta", Some(vb));
    let mut a_out = BytesMut::new();
    let mut b_out = BytesMut::new();
    a.take_output(&mut a_out);
    b.take_output(&mut b_out);
    let (ra, rb) = (a.feed(&mut b_out), b.feed(&mut a_out));
    assert_eq!(
        ra,
        Err(AuthError::Relayed {
            ours: Box::new(va),
            theirs: Box::new(vb)
        })
    );
    assert_eq!(
        rb,
        Err(AuthError::Relayed {
            ours: Box::new(vb),
            theirs: Box::new(va)
        })
    );
    // No response (no tag) went to the relay.
    assert!(!a.has_output() && !b.has_output());
    let text = ra.unwrap_err().to_string();
    assert!(
        text.contains("relayed") && text.contains(RELAY_A) && text.contains(BETA),
        "{text}"
    );
    // The same when the relay takes both nodes' dials instead.
    let va = Endpoints::seen_from(addr("10.231.1.1:40000"), addr("10.231.1.9:7789"), true);
    let vb = Endpoints::seen_from(addr("10.231.2.1:40000"), addr("10.231.2.9:7789"), true);
    let mut a = side_on("alpha", Some(va));
    let mut b = side_on("beta", Some(vb));
    let (ra, rb) = run(&mut a, &mut b, 7);
    assert!(matches!(ra, Err(AuthError::Relayed { .. })), "{ra:?}");
    assert!(matches!(rb, Err(AuthError::Relayed { .. })), "{rb:?}");
}

#[test]
fn relay_that_rewrites_the_stated_endpoints_fails_on_the_tags() {
    // The relay makes each side's challenge state the other side's view: the
    // comparison passes, but each tag covers its sender's true view.
    let (va, vb) = relayed_views();
    let mut a = side_on("alpha", Some(va));
    let mut b = side_on("beta", Some(vb));
    let rewrite = |out: &BytesMut, node: &str, view: Endpoints| {
        let head = 4 + 1 + 1 + 2 + 1 + node.len() + CHALLENGE_LEN;
        let mut f = BytesMut::from(&out[..head]);
        put_conn(&mut f, view);
        f
    };
    let (mut a_out, mut b_out) = (BytesMut::new(), BytesMut::new());
    a.take_output(&mut a_out);
    b.take_output(&mut b_out);
    let mut to_b = rewrite(&a_out, "alpha", vb);
    let mut to_a = rewrite(&b_out, "beta", va);
    assert_eq!(a.feed(&mut to_a), Ok(AuthStep::NeedMore));
    assert_eq!(b.feed(&mut to_b), Ok(AuthStep::NeedMore));
    let (mut a_resp, mut b_resp) = (BytesMut::new(), BytesMut::new());
    a.take_output(&mut a_resp);
    b.take_output(&mut b_resp);
    assert_eq!(a.feed(&mut b_resp), Err(AuthError::WrongSecret));
    assert_eq!(b.feed(&mut a_resp), Err(AuthError::WrongSecret));
}

#[test]
fn response_from_another_connection_is_refused() {
    // Reflection across connections: a tag alpha made on one connection
    // (as if from beta's seat, by naming the attacker `beta`) does not
    // verify on another one, even with every other input equal.
    let other = Endpoints::seen_from(addr("10.231.1.1:40002"), addr(BETA), true);
    let mk = |conn| {
        Authenticator::with_challenge(b"k", "alpha", "r0", Some(conn), [3u8; CHALLENGE_LEN])
            .expect("authenticator")
    };
    let mut beta =
        Authenticator::with_challenge(b"k", "beta", "r0", Some(other), [9u8; CHALLENGE_LEN])
            .expect("authenticator");
    // beta's genuine response on the other connection, to a challenge of alpha's...
    let mut a_other = mk(other);
    let mut a_other_out = BytesMut::new();
    a_other.take_output(&mut a_other_out);
    assert_eq!(beta.feed(&mut a_other_out), Ok(AuthStep::NeedMore));
    let mut recorded = BytesMut::new();
    beta.take_output(&mut recorded);
    // ...replayed to alpha on this connection, whose challenge is the same:
    // only the connection differs, and that is enough.
    let mut a = mk(direct("alpha").expect("bound"));
    let head = 4 + 1 + 1 + 2 + 1 + 4 + CHALLENGE_LEN;
    let mut input = BytesMut::from(&recorded[..head]);
    put_conn(&mut input, direct("alpha").expect("bound"));
    input.extend_from_slice(&recorded[recorded.len() - 37..]);
    assert_eq!(a.feed(&mut input), Err(AuthError::WrongSecret));
}

#[test]
fn binding_must_be_on_both_sides_or_neither() {
    let mut a = side_on("alpha", direct("alpha"));
    let mut b = side_on("beta", None);
    let (ra, rb) = run(&mut a, &mut b, 1000);
    assert_eq!(ra, Err(AuthError::BindingMismatch { ours_bound: true }));
    assert_eq!(rb, Err(AuthError::BindingMismatch { ours_bound: false }));
    assert!(ra
        .unwrap_err()
        .to_string()
        .contains("insecure-allow-relay is set on the peer only"));
    // Neither binds (both opted out): a relay passes, as documented.
    let mut a = side_on("alpha", None);
    let mut b = side_on("beta", None);
    assert_eq!(run(&mut a, &mut b, 1000), (done("beta"), done("alpha")));
}

#[test]
fn version_1_peer_is_told_apart() {
    let mut a = side(b"k", "alpha", "r0");
    let mut f = BytesMut::new();
    f.put_u32(0x6e6d_6131);
    let e = a.feed(&mut f).unwrap_err();
    assert!(e.to_string().contains("version 1"), "{e}");
}

#[test]
fn malformed_connection_fields_are_refused() {
    for (flag, family) in [(2u8, 4u8), (1, 5)] {
        let mut a = side(b"k", "alpha", "r0");
        let mut f = challenge_head("r0", "beta", &[1u8; CHALLENGE_LEN]);
        f.put_u8(flag);
        f.put_u8(family);
        assert!(matches!(a.feed(&mut f), Err(AuthError::Malformed(_))));
    }
}

proptest! {
    #[test]
    fn garbage_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), chunk in 1usize..50) {
        let mut a = Authenticator::with_challenge(b"k", "alpha", "r0", direct("alpha"), [3u8; CHALLENGE_LEN])
            .expect("authenticator");
        let mut input = BytesMut::new();
        for piece in data.chunks(chunk) {
            input.extend_from_slice(piece);
            if a.feed(&mut input).is_err() {
                break;
            }
        }
    }

    #[test]
    fn valid_looking_challenges_never_pass_without_the_secret(
        node in "[a-z]{1,10}",
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        tag in any::<[u8; 32]>(),
    ) {
        prop_assume!(node != "alpha");
        let mut a = Authenticator::with_challenge(b"k", "alpha", "r0", direct("alpha"), [3u8; CHALLENGE_LEN])
            .expect("authenticator");
        let mut input = challenge_frame("r0", &node, &challenge);
        input.put_u32(AUTH_MAGIC);
        input.put_u8(2);
        input.put_slice(&tag);
        prop_assert_eq!(a.feed(&mut input), Err(AuthError::WrongSecret));
    }
}
