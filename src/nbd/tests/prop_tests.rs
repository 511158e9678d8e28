//! Property tests: round trips, chunking invariance, no panics on garbage.

use bytes::{Buf, BytesMut};
use proptest::prelude::*;

use super::support::*;
use crate::nbd::client::{info_request_data, meta_request_data, put_request, take_reply, Reply};
use crate::nbd::consts::*;
use crate::nbd::{
    chunk_block_status, chunk_error, chunk_offset_data_header, simple_reply, transmission_flags,
    validate, Command, Decoded, ExportInfo, Negotiated, Request, RequestDecoder,
};

/// One client option: valid, malformed or unknown.
fn option_strategy() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let name = prop_oneof![Just("disk".to_string()), Just(String::new()), "[a-z]{0,6}"];
    let infos = proptest::collection::vec(0u16..6, 0..4);
    let queries = proptest::collection::vec(
        prop_oneof![
            Just("base:allocation".to_string()),
            Just("base:".to_string()),
            "[a-z]{1,4}:[a-z]{0,4}",
        ],
        0..3,
    );
    prop_oneof![
        (name.clone(), infos.clone()).prop_map(|(n, i)| (NBD_OPT_INFO, info_request_data(&n, &i))),
        (name.clone(), infos).prop_map(|(n, i)| (NBD_OPT_GO, info_request_data(&n, &i))),
        Just((NBD_OPT_STRUCTURED_REPLY, vec![])),
        Just((NBD_OPT_LIST, vec![])),
        (name.clone(), queries.clone()).prop_map(|(n, q)| {
            let q: Vec<&str> = q.iter().map(|s| s.as_str()).collect();
            (NBD_OPT_SET_META_CONTEXT, meta_request_data(&n, &q))
        }),
        (name, queries).prop_map(|(n, q)| {
            let q: Vec<&str> = q.iter().map(|s| s.as_str()).collect();
            (NBD_OPT_LIST_META_CONTEXT, meta_request_data(&n, &q))
        }),
        (0u32..20, proptest::collection::vec(any::<u8>(), 0..40)),
        Just((NBD_OPT_ABORT, vec![])),
        "[a-z]{0,5}".prop_map(|n| (NBD_OPT_EXPORT_NAME, n.into_bytes())),
    ]
}

fn negotiated_strategy() -> impl Strategy<Value = Negotiated> {
    (
        any::<u16>(),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
        0u32..4,
        0u64..(1 << 24),
        any::<u32>(),
    )
        .prop_map(|(flags, structured, ctx, min_shift, size, max)| {
            let min = 1u32 << (min_shift * 3);
            Negotiated {
                export: ExportInfo {
                    name: "d".into(),
                    description: String::new(),
                    size,
                    flags: flags | NBD_FLAG_HAS_FLAGS,
                    min_block: min,
                    preferred_block: 4096,
                    max_block: max,
                },
                structured_replies: structured,
                base_allocation_context: ctx,
            }
        })
}

fn command_strategy() -> impl Strategy<Value = Command> {
    prop_oneof![
        (0u16..10).prop_map(Command::from_u16),
        any::<u16>().prop_map(Command::from_u16)
    ]
}

fn request_strategy() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        command_strategy(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn handshake_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                          chunk in 1usize..64) {
        let _ = run_chunked(options(), &bytes, &[chunk]);
    }

    #[test]
    fn handshake_never_panics_after_valid_flags(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = FLAGS.to_be_bytes().to_vec();
        input.extend_from_slice(b"IHAVEOPT");
        input.extend_from_slice(&bytes);
        let r = run(options(), &input);
        // Whatever happened, the output parses as greeting + option replies
        // (EXPORT_NAME's raw answer aside).
        if !r.ended_by_export_name() {
            let _ = r.replies();
        }
    }

    #[test]
    fn handshake_result_does_not_depend_on_chunking(
        opts in proptest::collection::vec(option_strategy(), 0..8),
        chunks in proptest::collection::vec(1usize..40, 1..6),
        trailing in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut input = client_bytes(FLAGS, &opts);
        input.extend_from_slice(&trailing);
        let whole = run(options(), &input);
        let chunked = run_chunked(options(), &input, &chunks);
        prop_assert_eq!(&whole, &chunked);
        let bytewise = run_chunked(options(), &input, &[1]);
        prop_assert_eq!(&whole, &bytewise);
        // The output parses as option replies, each to an option sent.
        if !whole.ended_by_export_name() {
            for reply in whole.replies() {
                prop_assert!(opts.iter().any(|(o, _)| *o == reply.option));
            }
        }
    }

    #[test]
    fn request_stream_round_trips_in_any_chunking(
        reqs in proptest::collection::vec((request_strategy(), proptest::collection::vec(any::<u8>(), 0..64)), 1..8),
        chunk in 1usize..50,
    ) {
        let mut stream = BytesMut::new();
        let mut expected = Vec::new();
        for (mut req, payload) in reqs {
            let payload = if req.command == Command::Write {
                req.length = payload.len() as u32;
                payload
            } else {
                Vec::new()
            };
            put_request(&mut stream, &req, &payload);
            expected.push(Decoded::Request { req, payload: bytes::Bytes::from(payload) });
        }
        let mut dec = RequestDecoder::new(64);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(d) = dec.decode(&mut buf).expect("valid stream") {
                got.push(d);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                    max in 0u32..128, chunk in 1usize..64) {
        let mut dec = RequestDecoder::new(max);
        let mut buf = BytesMut::new();
        'outer: for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn validate_ok_means_in_range_aligned_and_allowed(req in request_strategy(), neg in negotiated_strategy()) {
        let result = validate(&req, &neg);
        if let Err(errno) = result {
            prop_assert!([NBD_EINVAL, NBD_ENOSPC, NBD_EPERM].contains(&errno));
        }
        if result.is_ok() {
            let e = &neg.export;
            prop_assert!(!matches!(req.command, Command::Unknown(_)));
            match req.command {
                Command::Disc => {}
                Command::Flush => prop_assert!(req.offset == 0 && req.length == 0),
                _ => {
                    prop_assert!(req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= e.size));
                    prop_assert_eq!(req.offset % u64::from(e.min_block), 0);
                    prop_assert_eq!(req.length % e.min_block, 0);
                }
            }
            if req.command != Command::Disc {
                prop_assert_eq!(req.flags & !NBD_CMD_FLAGS_KNOWN, 0);
                if req.flags & NBD_CMD_FLAG_FUA != 0 {
                    prop_assert!(e.flags & NBD_FLAG_SEND_FUA != 0);
                }
                if e.flags & NBD_FLAG_READ_ONLY != 0 {
                    prop_assert!(!matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes));
                }
            }
            if req.command == Command::BlockStatus {
                prop_assert!(neg.structured_replies && neg.base_allocation_context.is_some());
            }
        }
    }

    #[test]
    fn write_past_end_is_enospc_unless_refused_earlier(offset in any::<u64>(), length in 1u32..(1 << 20)) {
        let neg = Negotiated {
            export: ExportInfo {
                name: "d".into(),
                description: String::new(),
                size: 1 << 20,
                flags: transmission_flags(false),
                min_block: 1,
                preferred_block: 4096,
                max_block: u32::MAX,
            },
            structured_replies: false,
            base_allocation_context: None,
        };
        let req = Request { flags: 0, command: Command::Write, cookie: 0, offset, length };
        let past_end = offset.checked_add(u64::from(length)).is_none_or(|end| end > 1 << 20);
        prop_assert_eq!(validate(&req, &neg), if past_end { Err(NBD_ENOSPC) } else { Ok(()) });
    }

    #[test]
    fn simple_reply_round_trips(cookie in any::<u64>(), error in any::<u32>()) {
        let mut out = BytesMut::new();
        simple_reply(&mut out, cookie, error);
        prop_assert_eq!(take_reply(&mut out), Ok(Some(Reply::Simple { error, cookie })));
        prop_assert!(out.is_empty());
    }

    #[test]
    fn chunks_round_trip(cookie in any::<u64>(), offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..100),
                         error in 1u32.., message in ".{0,50}", done in any::<bool>(), ctx in any::<u32>(),
                         extents in proptest::collection::vec((1u32.., any::<u32>()), 1..20)) {
        let done_flag = if done { NBD_REPLY_FLAG_DONE } else { 0 };
        let mut out = BytesMut::new();
        chunk_offset_data_header(&mut out, cookie, offset, data.len() as u32, done);
        out.extend_from_slice(&data);
        match take_reply(&mut out) {
            Ok(Some(Reply::Chunk { flags, chunk_type, cookie: c, mut payload })) => {
                prop_assert_eq!((flags, chunk_type, c), (done_flag, NBD_REPLY_TYPE_OFFSET_DATA, cookie));
                prop_assert_eq!(payload.get_u64(), offset);
                prop_assert_eq!(&payload[..], &data[..]);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        chunk_error(&mut out, cookie, error, &message, done);
        match take_reply(&mut out) {
            Ok(Some(Reply::Chunk { flags, chunk_type, mut payload, .. })) => {
                prop_assert_eq!((flags, chunk_type), (done_flag, NBD_REPLY_TYPE_ERROR));
                prop_assert_eq!(payload.get_u32(), error);
                prop_assert_eq!(payload.get_u16() as usize, message.len());
                prop_assert_eq!(&payload[..], message.as_bytes());
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        chunk_block_status(&mut out, cookie, ctx, &extents, done);
        match take_reply(&mut out) {
            Ok(Some(Reply::Chunk { flags, chunk_type, mut payload, .. })) => {
                prop_assert_eq!((flags, chunk_type), (done_flag, NBD_REPLY_TYPE_BLOCK_STATUS));
                prop_assert_eq!(payload.get_u32(), ctx);
                let mut got = Vec::new();
                while payload.has_remaining() {
                    got.push((payload.get_u32(), payload.get_u32()));
                }
                prop_assert_eq!(got, extents);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        prop_assert!(out.is_empty());
    }
}
