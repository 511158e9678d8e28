//! Unit tests of the attach agent's sans-IO parts.

use bytes::BytesMut;

use super::agent::{Action, Agent, Event, Timing};
use super::genl::{self, Attr, Msg, MsgBuilder};
use super::handshake::{block_size_for, check_same_export, ClientHandshake, ExportSeen};
use super::nbd_genl::{self, DeviceParams, Geometry};
use super::run::device_index;
use crate::nbd::{ExportInfo, HandshakeOptions, HandshakeStep, ServerHandshake};

fn params() -> DeviceParams {
    DeviceParams {
        index: 3,
        timeout_secs: 15,
        dead_conn_timeout_secs: 60,
        backend: "nbd-mirror:r0:unix:/run/nbd-mirror/r0.nbd".into(),
    }
}

fn find<'a>(attrs: &'a [Attr<'a>], kind: u16) -> &'a Attr<'a> {
    attrs
        .iter()
        .find(|a| a.kind == kind)
        .unwrap_or_else(|| panic!("no attribute {kind}"))
}

fn u64_of(a: &Attr<'_>) -> u64 {
    u64::from_ne_bytes(a.data.try_into().expect("8 bytes"))
}

#[test]
fn connect_request_round_trips() {
    let g = Geometry {
        size_bytes: 1 << 30,
        block_size: 4096,
        server_flags: 0x0d6d,
    };
    let msg = nbd_genl::connect_request(0x1b, 77, &params(), &g, &[5, 6, 7, 9]);
    assert_eq!(msg.len() % 4, 0);
    assert_eq!(
        u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
        msg.len()
    );
    let flags = u16::from_ne_bytes(msg[6..8].try_into().unwrap());
    assert_eq!(flags, genl::NLM_F_REQUEST | genl::NLM_F_ACK);
    let msgs = genl::parse_datagram(&msg).expect("parses");
    assert_eq!(msgs.len(), 1);
    let Msg::Genl {
        family,
        seq,
        cmd,
        attrs,
    } = &msgs[0]
    else {
        panic!("not a genl message: {:?}", msgs[0]);
    };
    assert_eq!((*family, *seq, *cmd), (0x1b, 77, nbd_genl::CMD_CONNECT));
    assert_eq!(msg[17], nbd_genl::VERSION);
    assert_eq!(nbd_genl::index_of(attrs), Some(3));
    assert_eq!(u64_of(find(attrs, nbd_genl::ATTR_SIZE_BYTES)), 1 << 30);
    assert_eq!(u64_of(find(attrs, nbd_genl::ATTR_BLOCK_SIZE_BYTES)), 4096);
    assert_eq!(u64_of(find(attrs, nbd_genl::ATTR_SERVER_FLAGS)), 0x0d6d);
    assert_eq!(u64_of(find(attrs, nbd_genl::ATTR_TIMEOUT)), 15);
    assert_eq!(u64_of(find(attrs, nbd_genl::ATTR_DEAD_CONN_TIMEOUT)), 60);
    let backend = find(attrs, nbd_genl::ATTR_BACKEND_IDENTIFIER);
    assert_eq!(backend.data.last(), Some(&0), "NUL-terminated");
    assert_eq!(backend.str().unwrap(), params().backend);
    let socks = find(attrs, nbd_genl::ATTR_SOCKETS).nested().unwrap();
    let fds: Vec<u32> = socks
        .iter()
        .map(|item| {
            assert_eq!(item.kind, nbd_genl::SOCK_ITEM);
            let f = item.nested().unwrap();
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].kind, nbd_genl::SOCK_FD);
            f[0].u32().unwrap()
        })
        .collect();
    assert_eq!(fds, vec![5, 6, 7, 9]);
}

#[test]
fn nested_attributes_carry_the_nested_flag_on_the_wire() {
    let msg = nbd_genl::reconfigure_request(0x1b, 1, &params(), &[4]);
    // Find the SOCKETS header by scanning the attribute area.
    let body = &msg[genl::NLMSG_HDRLEN + genl::GENL_HDRLEN..];
    let mut off = 0;
    let mut seen = false;
    while off + 4 <= body.len() {
        let len = u16::from_ne_bytes([body[off], body[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([body[off + 2], body[off + 3]]);
        if kind & !genl::NLA_F_NESTED == nbd_genl::ATTR_SOCKETS {
            assert_ne!(kind & genl::NLA_F_NESTED, 0);
            seen = true;
        }
        off += genl::align4(len);
    }
    assert!(seen);
    let msgs = genl::parse_datagram(&msg).unwrap();
    let Msg::Genl { cmd, attrs, .. } = &msgs[0] else {
        panic!()
    };
    assert_eq!(*cmd, nbd_genl::CMD_RECONFIGURE);
    assert!(
        attrs.iter().all(|a| a.kind != nbd_genl::ATTR_SIZE_BYTES),
        "RECONFIGURE keeps the size"
    );
}

#[test]
fn disconnect_and_family_requests() {
    let msg = nbd_genl::disconnect_request(0x1b, 9, 2);
    let msgs = genl::parse_datagram(&msg).unwrap();
    let Msg::Genl { cmd, attrs, .. } = &msgs[0] else {
        panic!()
    };
    assert_eq!(
        (*cmd, nbd_genl::index_of(attrs)),
        (nbd_genl::CMD_DISCONNECT, Some(2))
    );

    let msg = genl::get_family_request(4, "nbd");
    let msgs = genl::parse_datagram(&msg).unwrap();
    let Msg::Genl {
        family, cmd, attrs, ..
    } = &msgs[0]
    else {
        panic!()
    };
    assert_eq!(
        (*family, *cmd),
        (genl::GENL_ID_CTRL, genl::CTRL_CMD_GETFAMILY)
    );
    assert_eq!(
        find(attrs, genl::CTRL_ATTR_FAMILY_NAME).str().unwrap(),
        "nbd"
    );
}

/// The controller's answer as the kernel lays it out (id u16, groups nested twice).
fn family_answer(seq: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(genl::GENL_ID_CTRL, 0, seq, 1, 2);
    m.put_bytes(genl::CTRL_ATTR_FAMILY_ID, &0x1bu16.to_ne_bytes())
        .put_str(genl::CTRL_ATTR_FAMILY_NAME, "nbd")
        .begin_nested(genl::CTRL_ATTR_MCAST_GROUPS)
        .begin_nested(1)
        .put_u32(genl::CTRL_ATTR_MCAST_GRP_ID, 0x2a)
        .put_str(genl::CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
        .end_nested()
        .end_nested();
    m.finish()
}

fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&36u32.to_ne_bytes());
    v.extend_from_slice(&genl::NLMSG_ERROR.to_ne_bytes());
    v.extend_from_slice(&0u16.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&errno.to_ne_bytes());
    v.extend_from_slice(&[0u8; 16]); // the request's header, echoed
    v
}

#[test]
fn family_answer_and_ack_in_one_datagram() {
    let mut dgram = family_answer(5);
    dgram.extend_from_slice(&ack(5, 0));
    let msgs = genl::parse_datagram(&dgram).unwrap();
    assert_eq!(msgs.len(), 2);
    let Msg::Genl { attrs, .. } = &msgs[0] else {
        panic!()
    };
    let fam = genl::parse_family(attrs).unwrap();
    assert_eq!(fam.id, 0x1b);
    assert_eq!(fam.group("nbd_mc_group"), Some(0x2a));
    assert_eq!(fam.group("other"), None);
    assert_eq!(msgs[1], Msg::Error { seq: 5, errno: 0 });
    let busy = ack(6, -libc::EBUSY);
    let err = genl::parse_datagram(&busy).unwrap();
    assert_eq!(
        err[0],
        Msg::Error {
            seq: 6,
            errno: -libc::EBUSY
        }
    );
}

#[test]
fn malformed_datagrams_are_errors_not_panics() {
    let good = family_answer(1);
    for cut in [17, 20, 25, good.len() - 1] {
        let mut bad = good[..cut].to_vec();
        // Keep the header's length claiming the whole message.
        if bad.len() >= 4 {
            bad[0..4].copy_from_slice(&(good.len() as u32).to_ne_bytes());
        }
        assert!(genl::parse_datagram(&bad).is_err(), "cut at {cut}");
    }
    // An attribute whose length runs past its area.
    let mut bad = good.clone();
    let first_attr = genl::NLMSG_HDRLEN + genl::GENL_HDRLEN;
    bad[first_attr..first_attr + 2].copy_from_slice(&500u16.to_ne_bytes());
    assert!(genl::parse_datagram(&bad).is_err());
    assert!(genl::parse_family(&[]).is_err());
}

fn server_export() -> ExportInfo {
    ExportInfo {
        name: "r0".into(),
        description: String::new(),
        size: 1 << 30,
        flags: crate::nbd::transmission_flags(false),
        min_block: 512,
        preferred_block: 4096,
        max_block: 32 << 20,
    }
}

/// Runs our client against the project's own server state machine.
fn pump(
    export: &str,
    answer: Result<ExportInfo, String>,
) -> (Result<ExportSeen, String>, Option<bool>) {
    let mut server = ServerHandshake::new(HandshakeOptions {
        exports: vec![("r0".into(), String::new())],
        allow_structured_replies: true,
    });
    let mut client = ClientHandshake::new(export);
    let (mut to_client, mut to_server) = (BytesMut::new(), BytesMut::new());
    let mut answer = Some(answer);
    for _ in 0..20 {
        server.take_output(&mut to_client);
        match client.feed(&mut to_client) {
            Ok(Some(seen)) => {
                // The server must have finished too, without structured replies.
                client.take_output(&mut to_server);
                let step = server.feed(&mut to_server).unwrap();
                let structured = match step {
                    HandshakeStep::Done(n) => Some(n.structured_replies),
                    _ => None,
                };
                return (Ok(seen), structured);
            }
            Ok(None) => {}
            Err(e) => return (Err(e), None),
        }
        client.take_output(&mut to_server);
        match server.feed(&mut to_server).unwrap() {
            HandshakeStep::ExportLookup { .. } => {
                server.answer_export(answer.take().expect("one lookup"));
            }
            HandshakeStep::Done(n) => {
                server.take_output(&mut to_client);
                let seen = client.feed(&mut to_client);
                return (seen.map(|s| s.expect("done")), Some(n.structured_replies));
            }
            _ => {}
        }
    }
    panic!("handshake did not end");
}

#[test]
fn handshake_against_our_server() {
    let (seen, structured) = pump("r0", Ok(server_export()));
    let seen = seen.expect("handshake succeeds");
    assert_eq!(seen.size, 1 << 30);
    assert_eq!(seen.flags, crate::nbd::transmission_flags(false));
    assert_eq!(seen.block_sizes, Some((512, 4096, 32 << 20)));
    assert_eq!(structured, Some(false), "the kernel needs simple replies");
}

#[test]
fn handshake_refusal_names_the_reason() {
    let (seen, _) = pump("r0", Err("not primary and auto-promote is off".into()));
    let e = seen.expect_err("refused");
    assert!(e.contains("not primary"), "{e}");
    assert!(e.contains("\"r0\""), "{e}");
}

#[test]
fn handshake_rejects_a_non_nbd_server() {
    let mut c = ClientHandshake::new("r0");
    let mut junk = BytesMut::from(&b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"[..]);
    assert!(c.feed(&mut junk).is_err());
}

#[test]
fn reconnect_must_present_the_same_export() {
    let a = ExportSeen {
        size: 1 << 30,
        flags: 0x1ed,
        block_sizes: None,
    };
    assert!(check_same_export(&a, &a).is_ok());
    let bigger = ExportSeen { size: 2 << 30, ..a };
    assert!(check_same_export(&a, &bigger).unwrap_err().contains("size"));
    let ro = ExportSeen { flags: 0x1ef, ..a };
    assert!(check_same_export(&a, &ro).is_err());
}

#[test]
fn block_size_rules() {
    let seen = ExportSeen {
        size: 1 << 30,
        flags: 1,
        block_sizes: Some((1024, 4096, 1 << 25)),
    };
    assert_eq!(block_size_for(&seen, 4096), Ok(4096));
    assert!(
        block_size_for(&seen, 512).is_err(),
        "below the server's minimum"
    );
    assert!(block_size_for(&seen, 3000).is_err());
    assert!(block_size_for(&seen, 8192).is_err());
    let odd = ExportSeen {
        size: (1 << 30) + 512,
        block_sizes: None,
        ..seen
    };
    assert!(block_size_for(&odd, 4096).is_err());
    assert_eq!(block_size_for(&odd, 512), Ok(512));
}

#[test]
fn device_names() {
    assert_eq!(device_index(std::path::Path::new("/dev/nbd0")), Ok(0));
    assert_eq!(device_index(std::path::Path::new("/dev/nbd15")), Ok(15));
    assert!(device_index(std::path::Path::new("/dev/sda")).is_err());
    assert!(device_index(std::path::Path::new("/dev/nbd0p1")).is_err());
}

fn timing() -> Timing {
    Timing {
        settle_ms: 100,
        retry_min_ms: 100,
        retry_max_ms: 1_000,
        dead_conn_ms: 5_000,
    }
}

/// Ticks every 10 ms from `from` until the agent asks for a round; its time.
fn tick_until_round(a: &mut Agent, from: u64, limit: u64) -> Option<u64> {
    let mut t = from;
    while t <= limit {
        let acts = a.handle(Event::Tick { now: t });
        if acts.contains(&Action::Round) {
            return Some(t);
        }
        t += 10;
    }
    None
}

#[test]
fn agent_reconnects_once_per_burst_of_deaths() {
    let mut a = Agent::attached(0, timing());
    assert!(a.handle(Event::Tick { now: 0 }).is_empty());
    // Another device's death is not ours.
    a.handle(Event::LinkDead { now: 10, index: 1 });
    assert_eq!(tick_until_round(&mut a, 10, 2_000), None);
    // A crash: four sockets die within a few ms; one round after the settle delay.
    for i in 0..4 {
        a.handle(Event::LinkDead {
            now: 3_000 + i,
            index: 0,
        });
    }
    assert!(!a.is_attached());
    assert_eq!(tick_until_round(&mut a, 3_000, 5_000), Some(3_100));
    // No second round while one is running.
    assert!(a.handle(Event::Tick { now: 3_200 }).is_empty());
    let acts = a.handle(Event::RoundDone { now: 3_300 });
    assert!(
        matches!(&acts[..], [Action::Log(m)] if m.contains("300 ms")),
        "{acts:?}"
    );
    assert!(a.is_attached());
    assert_eq!(a.rounds(), 1);
    assert_eq!(tick_until_round(&mut a, 3_300, 6_000), None);
}

#[test]
fn agent_backs_off_while_mirrord_is_down_then_recovers() {
    let mut a = Agent::attached(0, timing());
    a.handle(Event::LinkDead { now: 0, index: 0 });
    let mut t = tick_until_round(&mut a, 0, 1_000).unwrap();
    let mut gaps = Vec::new();
    for n in 0..8 {
        let acts = a.handle(Event::RoundFailed {
            now: t,
            why: "connect: refused".into(),
        });
        // Logged on the first failure only (then every tenth).
        assert_eq!(
            acts.iter().any(|x| matches!(x, Action::Log(_))),
            n == 0,
            "{acts:?}"
        );
        let next = tick_until_round(&mut a, t, t + 5_000).unwrap();
        gaps.push(next - t);
        t = next;
    }
    assert_eq!(gaps, vec![100, 200, 400, 800, 1_000, 1_000, 1_000, 1_000]);
    a.handle(Event::RoundDone { now: t });
    assert!(a.is_attached());
}

#[test]
fn agent_warns_once_when_the_dead_conn_timeout_passes() {
    let mut a = Agent::attached(0, timing());
    a.handle(Event::LinkDead { now: 0, index: 0 });
    let mut warnings = 0;
    let mut t = 0;
    while t < 12_000 {
        for act in a.handle(Event::Tick { now: t }) {
            match act {
                Action::Log(m) if m.contains("dead-conn-timeout") => warnings += 1,
                Action::Round => {
                    a.handle(Event::RoundFailed {
                        now: t,
                        why: "down".into(),
                    });
                }
                _ => {}
            }
        }
        t += 50;
    }
    assert_eq!(warnings, 1);
}

#[test]
fn a_death_during_a_round_gets_its_own_round() {
    let mut a = Agent::attached(0, timing());
    a.handle(Event::LinkDead { now: 0, index: 0 });
    let t = tick_until_round(&mut a, 0, 1_000).unwrap();
    // Reported while the round ran: its slot may not have been dead yet.
    a.handle(Event::LinkDead {
        now: t + 5,
        index: 0,
    });
    a.handle(Event::RoundDone { now: t + 20 });
    assert!(!a.is_attached());
    assert_eq!(tick_until_round(&mut a, t + 20, t + 1_000), Some(t + 120));
    a.handle(Event::RoundDone { now: t + 150 });
    assert!(a.is_attached());
    // A lost multicast (ENOBUFS) also means a round.
    a.handle(Event::Missed { now: 2_000 });
    assert!(tick_until_round(&mut a, 2_000, 3_000).is_some());
}

#[test]
fn agent_stop_disconnects_and_a_gone_device_ends_it() {
    let mut a = Agent::attached(2, timing());
    let acts = a.handle(Event::Stop);
    assert_eq!(acts[0], Action::Disconnect);
    assert!(matches!(&acts[1], Action::Exit { code: 0, .. }));
    assert!(a.ended());

    let mut b = Agent::attached(2, timing());
    let acts = b.handle(Event::DeviceGone);
    assert!(matches!(&acts[..], [Action::Exit { code: 1, why }] if why.contains("nbd2")));
}
