//! A peer that sends numbers past our limits: each is a protocol error that
//! drops the link (a log line in the daemon), never an allocation sized by the
//! peer or a panic; the pair reconnects and its data is unharmed.

use super::*;
use crate::peer::{Message, MAX_DATA_LEN};

/// Checks that node `i` dropped the link for a protocol error mentioning
/// `why`, and that the pair then reconnects and gets in sync, its data equal.
fn dropped_then_in_sync(p: &mut Pair, i: usize, why: &str) {
    let reasons: Vec<String> = p
        .named(i, "peer-disconnected")
        .iter()
        .map(|v| v["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("protocol error") && r.contains(why)),
        "node {i}: no protocol error about {why:?}: {reasons:?}"
    );
    p.run_until(20_000, "in sync again", |p| p.in_sync_now());
    assert!(p.disks[0] == p.disks[1]);
}

/// Feeds node 1 `m` as if alpha had sent it: it must drop the link.
fn refused(p: &mut Pair, m: Message, why: &str) {
    let link = p.cur;
    p.queue[1].push_back(Event::PeerMsg { link, msg: m });
    p.settle();
    dropped_then_in_sync(p, 1, why);
}

#[test]
fn a_bitmap_chunk_past_the_bitmap_outside_the_handshake_drops_the_link() {
    let mut p = Pair::in_sync(SLOW);
    let words = (SIZE / 4096).div_ceil(64);
    for first_word in [u64::MAX, 1 << 40, words] {
        let m = Message::BitmapChunk {
            first_word,
            words: vec![u64::MAX],
            last: true,
        };
        refused(&mut p, m, "bitmap chunk");
    }
    // Words that fit are merged: those blocks are resynced.
    let before = p.events[1].len();
    let link = p.cur;
    p.queue[1].push_back(Event::PeerMsg {
        link,
        msg: Message::BitmapChunk {
            first_word: words - 1,
            words: vec![1],
            last: true,
        },
    });
    p.settle();
    assert!(p.marked(1, (words - 1) * 64));
    assert_eq!(
        p.events[1][before..]
            .iter()
            .filter(|v| v["event"] == "peer-disconnected")
            .count(),
        0
    );
}

#[test]
fn a_checksum_reply_with_the_wrong_number_of_sums_drops_the_link() {
    let mut p = Pair::in_sync("[sync]\nrate = \"2MiB\"\nchecksum = true");
    p.disconnect(1);
    p.write(0, 5, 0xcd);
    p.queue[1].push_back(Event::Admin {
        id: 1,
        cmd: AdminCmd::Connect {
            discard_my_data: false,
        },
    });
    p.step(|_, _| false);
    assert!(p.wants_link(0) && p.wants_link(1));
    // The new link, as `settle` makes it, but run with `step` to hold messages.
    p.open_link();
    let held = p.step(|i, ev| {
        i == 0
            && matches!(
                ev,
                Event::PeerMsg {
                    msg: Message::ChecksumReply { error: 0, .. },
                    ..
                }
            )
    });
    p.settle();
    let Some((
        _,
        Event::PeerMsg {
            link,
            msg: Message::ChecksumReply { id, mut sums, .. },
        },
    )) = held.into_iter().next()
    else {
        panic!("alpha got no checksum reply to hold back");
    };
    sums.push(0);
    p.queue[0].push_back(Event::PeerMsg {
        link,
        msg: Message::ChecksumReply { id, error: 0, sums },
    });
    p.settle();
    dropped_then_in_sync(&mut p, 0, "checksum reply");
}

#[test]
fn a_read_reply_of_another_length_than_asked_fails_the_read_and_drops_the_link() {
    let mut p = Pair::in_sync(SLOW);
    assert!(p.admin(1, AdminCmd::Invalidate).is_ok());
    p.settle();
    p.node(1)
        .attach_client(9)
        .expect("a sync target may be primary");
    let last = SIZE / 4096 - 1;
    assert!(p.marked(1, last), "the block is read from the peer");
    p.queue[1].push_back(Event::Request {
        conn: 9,
        cookie: 77,
        req: IoRequest::Read {
            offset: last * 4096,
            len: 4096,
        },
    });
    let held = p.step(|i, ev| {
        i == 1
            && matches!(
                ev,
                Event::PeerMsg {
                    msg: Message::ReadReply { .. },
                    ..
                }
            )
    });
    let Some((
        _,
        Event::PeerMsg {
            link,
            msg: Message::ReadReply { id, error, data },
        },
    )) = held.into_iter().next()
    else {
        panic!("beta got no read reply to hold back");
    };
    assert_eq!((error, data.len()), (0, 4096));
    let longer = bytes::Bytes::from(vec![0u8; 8192]);
    p.queue[1].push_back(Event::PeerMsg {
        link,
        msg: Message::ReadReply {
            id,
            error: 0,
            data: longer,
        },
    });
    p.settle();
    let got: Vec<_> = p.nbd_replies[1].iter().filter(|(c, _)| *c == 77).collect();
    assert_eq!(got, vec![&(77, Err(errno::EIO))], "the read fails, once");
    dropped_then_in_sync(&mut p, 1, "read reply");
}

/// A lone node on a 1 GiB device (bigger than any request), linked to a peer
/// whose messages the test writes: the handshake done, nothing out of sync.
fn linked_node() -> Node {
    let size = 1 << 30;
    let make = |name: &str| {
        let mut cfg = config(name, SLOW);
        cfg.data_size = size;
        Node::new(cfg, in_sync_superblock(), &[], &[], 9)
    };
    let (mut alpha, beta) = (make("alpha"), make("beta"));
    alpha.handle(Event::Tick { now_ms: 0 });
    // The boot flush, then a connection alpha (the leader) sends its Hello on.
    for a in alpha.take_actions() {
        if let Action::Disk { id, .. } = a {
            alpha.handle(Event::DiskDone {
                id,
                result: Ok(None),
            });
        }
    }
    alpha.handle(Event::ConnOffered {
        link: 1,
        dialed: true,
    });
    alpha.handle(Event::PeerMsg {
        link: 1,
        msg: Message::Hello(beta.hello_now()),
    });
    let words = (size / 4096).div_ceil(64) as usize;
    alpha.handle(Event::PeerMsg {
        link: 1,
        msg: Message::BitmapChunk {
            first_word: 0,
            words: vec![0; words],
            last: true,
        },
    });
    let st = alpha.status();
    assert_eq!(
        st.peer.map(|p| p.replication),
        Some(Replication::Established)
    );
    alpha.take_actions();
    alpha
}

/// What `m` made the node do: it must drop the link for a protocol error
/// naming the limit, and start no disk I/O.
fn refused_alone(m: Message) {
    let mut node = linked_node();
    node.handle(Event::PeerMsg {
        link: 1,
        msg: m.clone(),
    });
    let actions = node.take_actions();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Disk { .. })),
        "{m:?} started disk I/O: {actions:?}"
    );
    let dropped = actions.iter().any(|a| {
        matches!(a, Action::CloseConn { reason, .. }
            if reason.starts_with("protocol error") && reason.contains(&MAX_DATA_LEN.to_string()))
    });
    assert!(dropped, "{m:?} did not drop the link: {actions:?}");
}

#[test]
fn a_read_request_over_the_limit_drops_the_link() {
    for len in [MAX_DATA_LEN + 1, 1 << 29] {
        refused_alone(Message::ReadRequest {
            id: 1,
            offset: 0,
            len,
        });
    }
    // The limit itself is served.
    let mut node = linked_node();
    node.handle(Event::PeerMsg {
        link: 1,
        msg: Message::ReadRequest {
            id: 1,
            offset: 0,
            len: MAX_DATA_LEN,
        },
    });
    let actions = node.take_actions();
    assert!(
        actions.iter().any(|a| matches!(a, Action::Disk { .. })),
        "{actions:?}"
    );
}

#[test]
fn a_checksum_request_over_the_limit_drops_the_link() {
    for verify in [false, true] {
        for len in [MAX_DATA_LEN + 1, 1 << 29] {
            refused_alone(Message::ChecksumRequest {
                id: 1,
                offset: 0,
                len,
                verify,
            });
        }
    }
}
