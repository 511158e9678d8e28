//! Handshake: every option, every refusal, every fatal error.

use bytes::{Buf, BytesMut};

use super::support::*;
use crate::nbd::client::{info_request_data, meta_request_data, OptionReply};
use crate::nbd::consts::*;
use crate::nbd::handshake::{BASE_ALLOCATION_ID, MAX_OPTIONS, MAX_OPTION_DISCARD, MAX_OPTION_LEN};
use crate::nbd::{
    ExportQuery, HandshakeError, HandshakeOptions, HandshakeStep, Negotiated, ServerHandshake,
};

fn go(name: &str, infos: &[u16]) -> (u32, Vec<u8>) {
    (NBD_OPT_GO, info_request_data(name, infos))
}

fn info(name: &str, infos: &[u16]) -> (u32, Vec<u8>) {
    (NBD_OPT_INFO, info_request_data(name, infos))
}

fn structured() -> (u32, Vec<u8>) {
    (NBD_OPT_STRUCTURED_REPLY, Vec::new())
}

fn set_meta(export: &str, queries: &[&str]) -> (u32, Vec<u8>) {
    (NBD_OPT_SET_META_CONTEXT, meta_request_data(export, queries))
}

fn list_meta(export: &str, queries: &[&str]) -> (u32, Vec<u8>) {
    (
        NBD_OPT_LIST_META_CONTEXT,
        meta_request_data(export, queries),
    )
}

fn reply(option: u32, reply_type: u32, data: &[u8]) -> OptionReply {
    OptionReply {
        option,
        reply_type,
        data: bytes::Bytes::copy_from_slice(data),
    }
}

fn info_export_data(size: u64, flags: u16) -> Vec<u8> {
    let mut v = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn info_block_size_data(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut v = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [min, pref, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn info_string_data(info_type: u16, s: &str) -> Vec<u8> {
    let mut v = info_type.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn meta_context_data(id: u32) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(b"base:allocation");
    v
}

fn done(structured: bool, context: Option<u32>) -> Result<HandshakeStep, HandshakeError> {
    Ok(HandshakeStep::Done(Negotiated {
        export: export("disk"),
        structured_replies: structured,
        base_allocation_context: context,
    }))
}

#[test]
fn greeting_is_exact() {
    let mut hs = ServerHandshake::new(options());
    assert!(hs.has_output());
    let mut out = BytesMut::new();
    hs.take_output(&mut out);
    assert_eq!(&out[..], b"NBDMAGICIHAVEOPT\x00\x03");
    assert!(!hs.has_output());
    let mut input = BytesMut::new();
    assert_eq!(hs.feed(&mut input), Ok(HandshakeStep::NeedMore));
}

#[test]
fn full_go_with_structured_replies_and_base_allocation() {
    let mut input = client_bytes(
        FLAGS,
        &[
            structured(),
            set_meta("disk", &["base:allocation"]),
            go("disk", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION]),
        ],
    );
    // A pipelined transmission request must stay unconsumed.
    input.extend_from_slice(b"\x25\x60\x95\x13rest");
    let r = run(options(), &input);
    assert_eq!(
        r.steps,
        vec![
            lookup_step("disk", ExportQuery::Go),
            done(true, Some(BASE_ALLOCATION_ID))
        ]
    );
    assert_eq!(r.leftover, b"\x25\x60\x95\x13rest");
    let flags = crate::nbd::transmission_flags(false);
    assert_eq!(
        r.replies(),
        vec![
            reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]),
            reply(
                NBD_OPT_SET_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &meta_context_data(BASE_ALLOCATION_ID)
            ),
            reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]),
            reply(NBD_OPT_GO, NBD_REP_INFO, &info_export_data(1 << 30, flags)),
            reply(
                NBD_OPT_GO,
                NBD_REP_INFO,
                &info_string_data(NBD_INFO_NAME, "disk")
            ),
            reply(
                NBD_OPT_GO,
                NBD_REP_INFO,
                &info_string_data(NBD_INFO_DESCRIPTION, "disk description")
            ),
            reply(
                NBD_OPT_GO,
                NBD_REP_INFO,
                &info_block_size_data(512, 4096, 1 << 25)
            ),
            reply(NBD_OPT_GO, NBD_REP_ACK, &[]),
        ]
    );
}

#[test]
fn go_without_requests_still_sends_export_and_block_size() {
    let r = run(options(), &client_bytes(FLAGS, &[go("", &[])]));
    assert_eq!(r.last(), Some(&done(false, None)));
    let types: Vec<_> = r
        .replies()
        .iter()
        .map(|x| (x.reply_type, x.data.get(..2).map(|d| d.to_vec())))
        .collect();
    assert_eq!(
        types,
        vec![
            (NBD_REP_INFO, Some(vec![0, 0])),
            (NBD_REP_INFO, Some(vec![0, 3])),
            (NBD_REP_ACK, None),
        ]
    );
}

#[test]
fn info_then_go_gives_same_information_and_info_does_not_end() {
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                info("disk", &[NBD_INFO_BLOCK_SIZE]),
                go("disk", &[NBD_INFO_BLOCK_SIZE]),
            ],
        ),
    );
    assert_eq!(
        r.steps,
        vec![
            lookup_step("disk", ExportQuery::Info),
            lookup_step("disk", ExportQuery::Go),
            done(false, None)
        ]
    );
    let replies = r.replies();
    assert_eq!(replies.len(), 6);
    for i in 0..3 {
        assert_eq!(replies[i].option, NBD_OPT_INFO);
        assert_eq!(replies[i + 3].option, NBD_OPT_GO);
        assert_eq!(replies[i].reply_type, replies[i + 3].reply_type);
        assert_eq!(replies[i].data, replies[i + 3].data);
    }
}

#[test]
fn unknown_export_gets_err_unknown_and_session_goes_on() {
    let r = run(
        options(),
        &client_bytes(FLAGS, &[go("nope", &[]), go("disk", &[])]),
    );
    assert_eq!(
        r.steps,
        vec![
            lookup_step("nope", ExportQuery::Go),
            lookup_step("disk", ExportQuery::Go),
            done(false, None)
        ]
    );
    let replies = r.replies();
    assert_eq!(
        replies[0],
        reply(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"no export named \"nope\"")
    );
    assert_eq!(replies.last().map(|x| x.reply_type), Some(NBD_REP_ACK));
}

#[test]
fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
    for (flags, zeroes) in [(FLAGS, 0usize), (NBD_FLAG_C_FIXED_NEWSTYLE, 124), (0, 124)] {
        let r = run(
            options(),
            &client_bytes(flags, &[(NBD_OPT_EXPORT_NAME, b"disk".to_vec())]),
        );
        assert_eq!(
            r.steps,
            vec![
                lookup_step("disk", ExportQuery::ExportName),
                done(false, None)
            ]
        );
        let mut out = BytesMut::from(&r.output[18..]);
        assert_eq!(out.len(), 10 + zeroes, "client flags {flags:#x}");
        assert_eq!(out.get_u64(), 1 << 30);
        assert_eq!(out.get_u16(), crate::nbd::transmission_flags(false));
        assert!(out.iter().all(|&b| b == 0));
    }
}

#[test]
fn export_name_refused_closes_without_output() {
    let r = run(
        options(),
        &client_bytes(FLAGS, &[(NBD_OPT_EXPORT_NAME, b"nope".to_vec())]),
    );
    assert_eq!(
        r.steps,
        vec![
            lookup_step("nope", ExportQuery::ExportName),
            Ok(HandshakeStep::Closed)
        ]
    );
    assert_eq!(r.output.len(), 18);
}

#[test]
fn export_name_with_bad_name_is_fatal() {
    for name in [&b"a\0b"[..], &[0xff][..], &[b'a'; 4097][..]] {
        let r = run(
            options(),
            &client_bytes(FLAGS, &[(NBD_OPT_EXPORT_NAME, name.to_vec())]),
        );
        assert!(matches!(
            r.last(),
            Some(Err(HandshakeError::BadExportName(_)))
        ));
    }
}

#[test]
fn export_name_meta_context_binding_by_name() {
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                structured(),
                set_meta("disk", &["base:allocation"]),
                (NBD_OPT_EXPORT_NAME, b"disk".to_vec()),
            ],
        ),
    );
    assert_eq!(r.last(), Some(&done(true, Some(BASE_ALLOCATION_ID))));
}

#[test]
fn abort_acks_and_closes() {
    let mut input = client_bytes(FLAGS, &[(NBD_OPT_ABORT, b"ignored".to_vec())]);
    input.extend_from_slice(b"junk");
    let r = run(options(), &input);
    assert_eq!(r.steps, vec![Ok(HandshakeStep::Closed)]);
    assert_eq!(r.replies(), vec![reply(NBD_OPT_ABORT, NBD_REP_ACK, &[])]);
}

#[test]
fn unknown_client_flags_are_fatal() {
    for flags in [4u32, 1 << 31, FLAGS | 8] {
        let r = run(options(), &client_bytes(flags, &[go("disk", &[])]));
        assert_eq!(
            r.steps,
            vec![Err(HandshakeError::UnknownClientFlags(flags))]
        );
        assert_eq!(r.output.len(), 18);
    }
}

#[test]
fn bad_option_magic_is_fatal_and_handshake_stays_closed() {
    let mut input = client_bytes(FLAGS, &[]);
    input.extend_from_slice(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    let mut hs = ServerHandshake::new(options());
    let mut buf = BytesMut::from(&input[..]);
    assert_eq!(
        hs.feed(&mut buf),
        Err(HandshakeError::BadOptionMagic(u64::from_be_bytes(
            *b"IHAVEOPX"
        )))
    );
    assert_eq!(hs.feed(&mut buf), Ok(HandshakeStep::Closed));
}

#[test]
fn unknown_options_get_unsup_and_session_goes_on() {
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                (NBD_OPT_STARTTLS, vec![]),
                (99, b"whatever".to_vec()),
                (NBD_OPT_PEEK_EXPORT, vec![]),
                go("disk", &[]),
            ],
        ),
    );
    assert_eq!(r.last(), Some(&done(false, None)));
    let replies = r.replies();
    assert_eq!(
        replies[..3]
            .iter()
            .map(|x| (x.option, x.reply_type))
            .collect::<Vec<_>>(),
        vec![
            (NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP),
            (99, NBD_REP_ERR_UNSUP),
            (NBD_OPT_PEEK_EXPORT, NBD_REP_ERR_UNSUP)
        ]
    );
}

#[test]
fn list_sends_each_export_then_ack() {
    let r = run(options(), &client_bytes(FLAGS, &[(NBD_OPT_LIST, vec![])]));
    assert_eq!(r.steps, vec![]);
    let mut disk = 4u32.to_be_bytes().to_vec();
    disk.extend_from_slice(b"diskthe disk");
    let mut other = 5u32.to_be_bytes().to_vec();
    other.extend_from_slice(b"other");
    assert_eq!(
        r.replies(),
        vec![
            reply(NBD_OPT_LIST, NBD_REP_SERVER, &disk),
            reply(NBD_OPT_LIST, NBD_REP_SERVER, &other),
            reply(NBD_OPT_LIST, NBD_REP_ACK, &[]),
        ]
    );
}

#[test]
fn list_with_data_is_invalid() {
    let r = run(options(), &client_bytes(FLAGS, &[(NBD_OPT_LIST, vec![1])]));
    let replies = r.replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, NBD_REP_ERR_INVALID);
}

#[test]
fn structured_reply_refused_when_disabled_or_with_data() {
    let opts = HandshakeOptions {
        allow_structured_replies: false,
        ..options()
    };
    let r = run(opts, &client_bytes(FLAGS, &[structured(), go("disk", &[])]));
    assert_eq!(r.replies()[0].reply_type, NBD_REP_ERR_UNSUP);
    assert_eq!(r.last(), Some(&done(false, None)));

    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[(NBD_OPT_STRUCTURED_REPLY, vec![0]), go("disk", &[])],
        ),
    );
    assert_eq!(r.replies()[0].reply_type, NBD_REP_ERR_INVALID);
    assert_eq!(r.last(), Some(&done(false, None)));
}

#[test]
fn set_meta_context_rules() {
    // Without structured replies: invalid, nothing selected.
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[set_meta("disk", &["base:allocation"]), go("disk", &[])],
        ),
    );
    assert_eq!(r.replies()[0].reply_type, NBD_REP_ERR_INVALID);
    assert_eq!(r.last(), Some(&done(false, None)));

    // Selected for another export than the one used: not bound.
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                structured(),
                set_meta("other", &["base:allocation"]),
                go("disk", &[]),
            ],
        ),
    );
    assert_eq!(r.last(), Some(&done(true, None)));

    // A later SET with no queries replaces the selection.
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                structured(),
                set_meta("disk", &["base:allocation"]),
                set_meta("disk", &[]),
                go("disk", &[]),
            ],
        ),
    );
    assert_eq!(r.last(), Some(&done(true, None)));
    assert_eq!(
        r.replies()[3],
        reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
    );

    // A failed SET also replaces it.
    let mut bad = meta_request_data("disk", &["base:allocation"]);
    bad.push(0);
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                structured(),
                set_meta("disk", &["base:allocation"]),
                (NBD_OPT_SET_META_CONTEXT, bad),
                go("disk", &[]),
            ],
        ),
    );
    assert_eq!(r.replies()[3].reply_type, NBD_REP_ERR_INVALID);
    assert_eq!(r.last(), Some(&done(true, None)));

    // "base:" is ignored on SET; unknown namespaces and leaves too; a
    // duplicate selects once.
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[
                structured(),
                set_meta(
                    "disk",
                    &[
                        "base:",
                        "x-foo:bar",
                        "base:nothing",
                        "base:allocation",
                        "base:allocation",
                    ],
                ),
                go("disk", &[]),
            ],
        ),
    );
    let replies = r.replies();
    assert_eq!(
        replies[1..3]
            .iter()
            .map(|x| x.reply_type)
            .collect::<Vec<_>>(),
        vec![NBD_REP_META_CONTEXT, NBD_REP_ACK]
    );
    assert_eq!(r.last(), Some(&done(true, Some(BASE_ALLOCATION_ID))));

    // Only "base:" selects nothing.
    let r = run(
        options(),
        &client_bytes(
            FLAGS,
            &[structured(), set_meta("disk", &["base:"]), go("disk", &[])],
        ),
    );
    assert_eq!(
        r.replies()[1],
        reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
    );
    assert_eq!(r.last(), Some(&done(true, None)));
}

#[test]
fn list_meta_context_rules() {
    let cases: [(&[&str], bool); 5] = [
        (&[], true),
        (&["base:"], true),
        (&["base:allocation"], true),
        (&["x-foo:"], false),
        (&["base:other"], false),
    ];
    for (queries, listed) in cases {
        let r = run(
            options(),
            &client_bytes(
                FLAGS,
                &[structured(), list_meta("disk", queries), go("disk", &[])],
            ),
        );
        let replies = r.replies();
        if listed {
            assert_eq!(
                replies[1],
                reply(
                    NBD_OPT_LIST_META_CONTEXT,
                    NBD_REP_META_CONTEXT,
                    &meta_context_data(0)
                ),
                "{queries:?}"
            );
            assert_eq!(
                replies[2],
                reply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK, &[])
            );
        } else {
            assert_eq!(
                replies[1],
                reply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK, &[]),
                "{queries:?}"
            );
        }
        // Listing selects nothing.
        assert_eq!(r.last(), Some(&done(true, None)));
    }
    let r = run(options(), &client_bytes(FLAGS, &[list_meta("disk", &[])]));
    assert_eq!(r.replies()[0].reply_type, NBD_REP_ERR_INVALID);
}

#[test]
fn malformed_go_payloads_are_invalid() {
    let good = info_request_data("disk", &[NBD_INFO_NAME]);
    let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    let mut long = good.clone();
    long.push(7);
    cases.push(long);
    cases.push(info_request_data("a\0b", &[]));
    for data in cases {
        let r = run(
            options(),
            &client_bytes(FLAGS, &[(NBD_OPT_GO, data.clone()), go("disk", &[])]),
        );
        let replies = r.replies();
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_INVALID, "data {data:?}");
        assert_eq!(r.last(), Some(&done(false, None)), "data {data:?}");
    }
}

#[test]
fn over_long_option_is_discarded_with_too_big() {
    let big = vec![0xaa; MAX_OPTION_LEN as usize + 1];
    let input = client_bytes(
        FLAGS,
        &[(NBD_OPT_GO, big.clone()), (123, big), go("disk", &[])],
    );
    // Fed in 4 KiB chunks: the discard must work across pieces.
    let r = run_chunked(options(), &input, &[4096]);
    assert_eq!(r.last(), Some(&done(false, None)));
    let replies = r.replies();
    assert_eq!(replies[0].option, NBD_OPT_GO);
    assert_eq!(replies[0].reply_type, NBD_REP_ERR_TOO_BIG);
    assert_eq!(replies[1].option, 123);
    assert_eq!(replies[1].reply_type, NBD_REP_ERR_TOO_BIG);
}

#[test]
fn discarded_bytes_are_not_buffered() {
    let mut hs = ServerHandshake::new(options());
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&client_bytes(FLAGS, &[]));
    crate::nbd::client::put_option(&mut buf, NBD_OPT_GO, &[]);
    // Patch the length to a large (but discardable) claim.
    let n = buf.len();
    buf[n - 4..].copy_from_slice(&MAX_OPTION_DISCARD.to_be_bytes());
    assert_eq!(hs.feed(&mut buf), Ok(HandshakeStep::NeedMore));
    for _ in 0..16 {
        buf.extend_from_slice(&[0u8; 1 << 20]);
        assert_eq!(hs.feed(&mut buf), Ok(HandshakeStep::NeedMore));
        assert!(buf.is_empty(), "discarded bytes must be consumed at once");
    }
    let mut out = BytesMut::new();
    hs.take_output(&mut out);
    assert!(out.len() > 18, "TOO_BIG reply after the last byte");
}

#[test]
fn absurd_option_lengths_are_fatal() {
    let mut input = client_bytes(FLAGS, &[(NBD_OPT_GO, vec![])]);
    let n = input.len();
    input[n - 4..].copy_from_slice(&(MAX_OPTION_DISCARD + 1).to_be_bytes());
    let r = run(options(), &input);
    assert_eq!(
        r.steps,
        vec![Err(HandshakeError::OptionTooLarge {
            option: NBD_OPT_GO,
            length: MAX_OPTION_DISCARD + 1
        })]
    );

    // EXPORT_NAME cannot be answered with an error: over the buffer cap is fatal.
    let mut input = client_bytes(FLAGS, &[(NBD_OPT_EXPORT_NAME, vec![])]);
    let n = input.len();
    input[n - 4..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    let r = run(options(), &input);
    assert!(matches!(
        r.last(),
        Some(Err(HandshakeError::OptionTooLarge { .. }))
    ));

    let mut input = client_bytes(FLAGS, &[(NBD_OPT_GO, vec![])]);
    let n = input.len();
    input[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    let r = run(options(), &input);
    assert!(matches!(
        r.last(),
        Some(Err(HandshakeError::OptionTooLarge { .. }))
    ));
}

#[test]
fn too_many_options_is_fatal() {
    let opts: Vec<_> = (0..MAX_OPTIONS).map(|_| (NBD_OPT_LIST, vec![])).collect();
    let r = run(options(), &client_bytes(FLAGS, &opts));
    assert_eq!(r.steps, vec![]);
    let mut more = opts.clone();
    more.push((NBD_OPT_LIST, vec![]));
    let r = run(options(), &client_bytes(FLAGS, &more));
    assert_eq!(
        r.steps,
        vec![Err(HandshakeError::TooManyOptions(MAX_OPTIONS + 1))]
    );
}

#[test]
fn every_truncation_needs_more_and_never_fails() {
    let input = client_bytes(
        FLAGS,
        &[
            structured(),
            set_meta("disk", &["base:allocation"]),
            list_meta("disk", &[]),
            (NBD_OPT_LIST, vec![]),
            info("disk", &[NBD_INFO_NAME]),
            go("disk", &[NBD_INFO_DESCRIPTION]),
        ],
    );
    let full = run(options(), &input);
    assert_eq!(full.last(), Some(&done(true, Some(BASE_ALLOCATION_ID))));
    for cut in 0..input.len() {
        let r = run(options(), &input[..cut]);
        for step in &r.steps {
            assert!(
                matches!(step, Ok(HandshakeStep::ExportLookup { .. })),
                "cut {cut}: {step:?}"
            );
        }
        // What was produced so far is a prefix of the full output.
        assert!(full.output.starts_with(&r.output), "cut {cut}");
    }
}

#[test]
fn one_byte_chunks_give_the_same_result() {
    let mut input = client_bytes(
        FLAGS,
        &[
            (77, b"x".to_vec()),
            structured(),
            set_meta("disk", &["base:allocation"]),
            go("missing", &[]),
            (NBD_OPT_LIST, vec![]),
            go("disk", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]),
        ],
    );
    input.extend_from_slice(&[1, 2, 3]);
    let whole = run(options(), &input);
    let bytewise = run_chunked(options(), &input, &[1]);
    assert_eq!(whole, bytewise);
    assert_eq!(whole.leftover, vec![1, 2, 3]);
}

#[test]
fn done_and_closed_are_sticky_and_consume_nothing() {
    let mut hs = ServerHandshake::new(options());
    let mut buf = BytesMut::from(&client_bytes(FLAGS, &[go("disk", &[])])[..]);
    assert_eq!(hs.feed(&mut buf), lookup_step("disk", ExportQuery::Go));
    // Feeding again before answering repeats the lookup.
    assert_eq!(hs.feed(&mut buf), lookup_step("disk", ExportQuery::Go));
    hs.answer_export(lookup("disk"));
    buf.extend_from_slice(b"request bytes");
    let first = hs.feed(&mut buf);
    assert_eq!(first, done(false, None));
    assert_eq!(hs.feed(&mut buf), first);
    assert_eq!(&buf[..], b"request bytes");
}

#[test]
fn read_only_and_df_flags() {
    // SEND_DF is stripped without structured replies, kept with them.
    let mut input = client_bytes(FLAGS, &[go("disk", &[])]);
    let mut hs = ServerHandshake::new(options());
    let mut buf = BytesMut::from(&input[..]);
    assert!(matches!(
        hs.feed(&mut buf),
        Ok(HandshakeStep::ExportLookup { .. })
    ));
    let mut e = export("disk");
    e.flags |= NBD_FLAG_SEND_DF | NBD_FLAG_READ_ONLY;
    hs.answer_export(Ok(e.clone()));
    match hs.feed(&mut buf) {
        Ok(HandshakeStep::Done(n)) => {
            assert_eq!(n.export.flags, e.flags & !NBD_FLAG_SEND_DF);
        }
        other => panic!("unexpected {other:?}"),
    }

    input = client_bytes(FLAGS, &[structured(), go("disk", &[])]);
    let mut hs = ServerHandshake::new(options());
    let mut buf = BytesMut::from(&input[..]);
    assert!(matches!(
        hs.feed(&mut buf),
        Ok(HandshakeStep::ExportLookup { .. })
    ));
    hs.answer_export(Ok(e.clone()));
    match hs.feed(&mut buf) {
        Ok(HandshakeStep::Done(n)) => assert_eq!(n.export.flags, e.flags),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn long_strings_are_cut_to_4096_bytes() {
    let long = "é".repeat(3000); // 6000 bytes, 2-byte chars
    let opts = HandshakeOptions {
        exports: vec![(long.clone(), long.clone())],
        allow_structured_replies: true,
    };
    let r = run(opts, &client_bytes(FLAGS, &[(NBD_OPT_LIST, vec![])]));
    let replies = r.replies();
    let data = &replies[0].data;
    let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    assert_eq!(name_len, 4096);
    assert_eq!(data.len(), 4 + 4096 + 4096);
    assert!(std::str::from_utf8(&data[4..]).is_ok());
}

#[test]
fn error_display_names_the_client_fault() {
    let e = HandshakeError::UnknownClientFlags(4);
    assert!(e.to_string().contains("unknown client flags 0x4"));
    let e = HandshakeError::OptionTooLarge {
        option: 7,
        length: 99,
    };
    assert!(e.to_string().contains("99"));
}
