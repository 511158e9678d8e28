//! Unit tests of framing and payload layouts.

use bytes::{Bytes, BytesMut};

use super::support::*;
use crate::peer::frame::*;
use crate::peer::*;

#[test]
fn every_variant_round_trips_and_consumes_its_frame() {
    for msg in one_of_each() {
        let bytes = encoded(&msg);
        assert_eq!(decode_one(&bytes), Ok(Some(msg.clone())), "{msg:?}");
    }
}

#[test]
fn every_variant_has_a_distinct_known_type() {
    let mut seen = std::collections::HashSet::new();
    for msg in one_of_each() {
        let t = msg_type(&msg);
        assert!(is_known_type(t), "{msg:?} type {t}");
        assert_ne!(type_name(t), "unknown");
        // Two Write kinds share a type; all other variants differ.
        if !matches!(msg, Message::Write { .. }) || !seen.contains(&t) {
            assert!(seen.insert(t), "type {t} used twice");
        }
    }
    for t in 0..=u16::from(u8::MAX) {
        assert_eq!(is_known_type(t), type_name(t) != "unknown", "type {t}");
    }
}

#[test]
fn ping_frame_bytes_are_as_documented() {
    let bytes = encoded(&Message::Ping);
    assert_eq!(bytes.len(), HEADER_LEN);
    assert_eq!(&bytes[0..4], b"nmp1");
    assert_eq!(&bytes[4..6], &TYPE_PING.to_be_bytes());
    assert_eq!(&bytes[6..8], &[0, 0]);
    assert_eq!(&bytes[8..12], &[0, 0, 0, 0]);
    let crc = crc32fast::hash(&bytes[0..12]);
    assert_eq!(&bytes[12..16], &crc.to_be_bytes());
}

#[test]
fn write_frame_layout_is_big_endian_with_flags_in_header() {
    let msg = Message::Write {
        seq: 0x0102_0304_0506_0708,
        seen: 9,
        offset: 0x1000,
        kind: WriteKind::Data(Bytes::from_static(b"xyz")),
        fua: true,
        resync: true,
    };
    let bytes = encoded(&msg);
    assert_eq!(&bytes[4..6], &TYPE_WRITE.to_be_bytes());
    assert_eq!(
        &bytes[6..8],
        &(FLAG_WRITE_FUA | FLAG_WRITE_RESYNC).to_be_bytes()
    );
    assert_eq!(&bytes[8..12], &(25u32 + 3).to_be_bytes());
    let p = &bytes[HEADER_LEN..];
    assert_eq!(&p[0..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&p[8..16], &9u64.to_be_bytes());
    assert_eq!(&p[16..24], &0x1000u64.to_be_bytes());
    assert_eq!(p[24], 0, "kind: data");
    assert_eq!(&p[25..], b"xyz");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[0..12]);
    crc.update(p);
    assert_eq!(&bytes[12..16], &crc.finalize().to_be_bytes());
}

#[test]
fn encode_split_plus_tail_equals_encode() {
    for msg in one_of_each() {
        let mut head = BytesMut::new();
        let tail = encode_split(&msg, &mut head).expect("fits a frame");
        let has_bulk = matches!(
            msg,
            Message::Write {
                kind: WriteKind::Data(_),
                ..
            } | Message::ReadReply { .. }
        );
        assert_eq!(!tail.is_empty(), has_bulk, "{msg:?}");
        head.extend_from_slice(&tail);
        assert_eq!(head, encoded(&msg), "{msg:?}");
    }
}

#[test]
fn encode_appends_after_existing_bytes() {
    let mut out = BytesMut::from(&b"prefix"[..]);
    encode(&Message::Flush { id: 1 }, &mut out);
    encode(&Message::Ping, &mut out);
    assert_eq!(&out[..6], b"prefix");
    let mut rest = out.split_off(6);
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    assert_eq!(dec.decode(&mut rest), Ok(Some(Message::Flush { id: 1 })));
    assert_eq!(dec.decode(&mut rest), Ok(Some(Message::Ping)));
    assert_eq!(dec.decode(&mut rest), Ok(None));
    assert!(rest.is_empty());
}

#[test]
fn back_to_back_frames_decode_in_order_and_keep_the_rest() {
    let msgs = one_of_each();
    let mut buf = BytesMut::new();
    for m in &msgs {
        encode(m, &mut buf);
    }
    buf.extend_from_slice(&encoded(&Message::Ping)[..5]);
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    for m in &msgs {
        assert_eq!(dec.decode(&mut buf).as_ref(), Ok(&Some(m.clone())));
    }
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(buf.len(), 5, "partial frame left in place");
}

#[test]
fn truncated_frames_wait_without_consuming() {
    for msg in one_of_each() {
        let bytes = encoded(&msg);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            let res = Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf);
            assert_eq!(res, Ok(None), "{msg:?} cut at {cut}");
            assert_eq!(&buf[..], &bytes[..cut]);
        }
    }
}

#[test]
fn oversized_length_is_rejected_before_allocating() {
    for len in [1001u32, 1 << 20, u32::MAX] {
        let mut header = FrameHeader {
            magic: FRAME_MAGIC,
            msg_type: TYPE_WRITE,
            flags: 0,
            len,
            crc: 0,
        };
        header.crc = 0x1234_5678;
        let mut buf = BytesMut::with_capacity(HEADER_LEN);
        buf.extend_from_slice(&header.to_bytes());
        let cap = buf.capacity();
        let res = Decoder::new(1000).decode(&mut buf);
        assert_eq!(res, Err(DecodeError::TooLong(len)));
        assert_eq!(buf.capacity(), cap, "no allocation for a refused length");
        assert_eq!(buf.len(), HEADER_LEN, "nothing consumed");
    }
    // Exactly at the limit is accepted.
    let frame = raw_frame(TYPE_READ_REPLY, 0, &[0u8; 1000]);
    let res = Decoder::new(1000).decode(&mut BytesMut::from(&frame[..]));
    assert!(
        matches!(res, Ok(Some(Message::ReadReply { .. }))),
        "{res:?}"
    );
}

#[test]
fn acceptable_length_reserves_room_for_the_frame() {
    let frame = raw_frame(TYPE_READ_REPLY, 0, &[7u8; 100_000]);
    let mut buf = BytesMut::from(&frame[..HEADER_LEN + 10]);
    assert_eq!(Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= frame.len(), "capacity {}", buf.capacity());
}

#[test]
fn a_payload_over_the_limit_is_an_encode_error_not_a_panic() {
    let data = Bytes::from(vec![0u8; DEFAULT_MAX_PAYLOAD as usize]);
    let msg = Message::ReadReply {
        id: 1,
        error: 0,
        data,
    };
    let mut out = BytesMut::from(&b"prefix"[..]);
    let err = encode_split(&msg, &mut out).expect_err("over the limit");
    assert_eq!(err.msg_type, TYPE_READ_REPLY);
    assert_eq!(err.payload_len, DEFAULT_MAX_PAYLOAD as usize + 12);
    assert_eq!(&out[..], b"prefix", "nothing is left of the refused frame");
    assert!(err.to_string().contains("ReadReply"), "{err}");
}

#[test]
fn largest_data_block_fits_the_default_limit() {
    let data = Bytes::from(vec![0x5a; MAX_DATA_LEN as usize]);
    for msg in [
        Message::Write {
            seq: u64::MAX,
            seen: u64::MAX,
            offset: u64::MAX,
            kind: WriteKind::Data(data.clone()),
            fua: true,
            resync: true,
        },
        Message::ReadReply {
            id: u64::MAX,
            error: u32::MAX,
            data,
        },
    ] {
        let bytes = encoded(&msg);
        assert_eq!(decode_one(&bytes), Ok(Some(msg)));
    }
}

#[test]
fn data_is_sliced_out_of_the_input_without_copying() {
    let data = Bytes::from(vec![0x42; 8192]);
    for msg in [
        Message::Write {
            seq: 1,
            seen: 0,
            offset: 0,
            kind: WriteKind::Data(data.clone()),
            fua: false,
            resync: false,
        },
        Message::ReadReply {
            id: 1,
            error: 0,
            data: data.clone(),
        },
    ] {
        let mut buf = encoded(&msg);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let decoded = Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf);
        let got = match decoded {
            Ok(Some(Message::Write {
                kind: WriteKind::Data(d),
                ..
            })) => d,
            Ok(Some(Message::ReadReply { data, .. })) => data,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(got, data);
        assert!(range.contains(&(got.as_ptr() as usize)), "data was copied");
    }
}

#[test]
fn bad_magic_is_reported_with_what_was_there() {
    let mut bytes = encoded(&Message::Ping);
    bytes[0..4].copy_from_slice(b"NBDM");
    let res = decode_one(&bytes);
    assert_eq!(
        res,
        Err(DecodeError::BadMagic(u32::from_be_bytes(*b"NBDM")))
    );
    let text = res.unwrap_err().to_string();
    assert!(
        text.contains("0x4e42444d") && text.contains("magic"),
        "{text}"
    );
}

#[test]
fn corrupted_payload_is_a_crc_error() {
    let mut bytes = encoded(&Message::Flush { id: 77 });
    bytes[HEADER_LEN + 3] ^= 0x10;
    let res = decode_one(&bytes);
    let Err(DecodeError::BadCrc {
        expected,
        got,
        msg_type,
    }) = res.clone()
    else {
        panic!("expected BadCrc, got {res:?}");
    };
    assert_eq!(msg_type, TYPE_FLUSH);
    assert_eq!(
        expected,
        u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]])
    );
    assert_ne!(expected, got);
    let text = res.unwrap_err().to_string();
    assert!(text.contains("CRC") && text.contains("Flush"), "{text}");
}

fn data_write(data: &[u8]) -> Message {
    Message::Write {
        seq: 9,
        seen: 8,
        offset: 4096,
        kind: WriteKind::Data(Bytes::copy_from_slice(data)),
        fua: false,
        resync: false,
    }
}

fn encoded_with(msg: &Message, data_crc: DataCrc) -> BytesMut {
    let mut out = BytesMut::new();
    encode_with(msg, &mut out, data_crc);
    out
}

#[test]
fn a_corrupted_write_payload_with_the_data_checksum_on_is_a_crc_error() {
    let msg = data_write(&[0x5a; 4096]);
    let mut bytes = encoded_with(&msg, DataCrc::On);
    assert_eq!(bytes, encoded(&msg), "On is what encode does");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    assert!(
        matches!(
            decode_one(&bytes),
            Err(DecodeError::BadCrc {
                msg_type: TYPE_WRITE,
                ..
            })
        ),
        "{:?}",
        decode_one(&bytes)
    );
}

#[test]
fn with_the_data_checksum_off_the_crc_covers_header_and_fixed_fields_only() {
    let msg = data_write(&[0x5a; 4096]);
    let bytes = encoded_with(&msg, DataCrc::Off);
    let flags = u16::from_be_bytes([bytes[6], bytes[7]]);
    assert_eq!(flags, FLAG_WRITE_DATA_UNCHECKED);
    assert_eq!(data_crc_of(TYPE_WRITE, flags), DataCrc::Off);
    assert_eq!(decode_one(&bytes), Ok(Some(msg.clone())));
    // The data is not checked: a flipped data bit decodes (TCP's checksum is the guard).
    let mut data_flip = bytes.clone();
    let last = data_flip.len() - 1;
    data_flip[last] ^= 0x01;
    assert_ne!(decode_one(&data_flip), Ok(Some(msg.clone())));
    assert!(matches!(
        decode_one(&data_flip),
        Ok(Some(Message::Write { .. }))
    ));
    // The fixed fields (here the offset) and the flag itself still are.
    for at in [HEADER_LEN + 17, 7] {
        let mut flip = bytes.clone();
        flip[at] ^= 0x08;
        assert!(
            matches!(decode_one(&flip), Err(DecodeError::BadCrc { .. })),
            "byte {at}: {:?}",
            decode_one(&flip)
        );
    }
    // Messages without data are encoded the same either way.
    for other in one_of_each() {
        if !matches!(
            other,
            Message::Write {
                kind: WriteKind::Data(_),
                ..
            } | Message::ReadReply { .. }
        ) {
            assert_eq!(
                encoded_with(&other, DataCrc::Off),
                encoded(&other),
                "{other:?}"
            );
        }
    }
    let reply = Message::ReadReply {
        id: 3,
        error: 0,
        data: Bytes::from_static(&[1; 512]),
    };
    let bytes = encoded_with(&reply, DataCrc::Off);
    assert_eq!(
        u16::from_be_bytes([bytes[6], bytes[7]]),
        FLAG_READ_REPLY_DATA_UNCHECKED
    );
    assert_eq!(decode_one(&bytes), Ok(Some(reply)));
}

#[test]
fn the_data_unchecked_flag_on_a_write_without_data_is_malformed() {
    let msg = Message::Write {
        seq: 1,
        seen: 0,
        offset: 0,
        kind: WriteKind::Trim { len: 4096 },
        fua: false,
        resync: false,
    };
    let mut bytes = encoded(&msg);
    bytes[7] |= FLAG_WRITE_DATA_UNCHECKED as u8;
    let mut head = [0u8; HEADER_LEN];
    head.copy_from_slice(&bytes[..HEADER_LEN]);
    let covered = crc_covered_len(
        TYPE_WRITE,
        FLAG_WRITE_DATA_UNCHECKED,
        bytes.len() - HEADER_LEN,
    );
    let crc = frame_crc(&head, &[&bytes[HEADER_LEN..HEADER_LEN + covered]]);
    bytes[12..16].copy_from_slice(&crc.to_be_bytes());
    assert!(
        matches!(
            decode_one(&bytes),
            Err(DecodeError::Malformed {
                msg_type: TYPE_WRITE,
                ..
            })
        ),
        "{:?}",
        decode_one(&bytes)
    );
}

#[test]
fn unknown_type_with_good_crc_is_consumed_and_reported() {
    let mut buf = raw_frame(999, 0, b"abc");
    buf.extend_from_slice(&encoded(&Message::Ping));
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    assert_eq!(dec.decode(&mut buf), Err(DecodeError::UnknownType(999)));
    assert_eq!(
        dec.decode(&mut buf),
        Ok(Some(Message::Ping)),
        "stream stays framed"
    );
    assert_eq!(raw_frame(0, 0, b"").len(), HEADER_LEN);
    assert_eq!(
        decode_one(&raw_frame(0, 0, b"")),
        Err(DecodeError::UnknownType(0))
    );
}

fn malformed(msg_type: u16, flags: u16, payload: &[u8]) -> &'static str {
    match decode_one(&raw_frame(msg_type, flags, payload)) {
        Err(DecodeError::Malformed { msg_type: t, why }) => {
            assert_eq!(t, msg_type);
            why
        }
        other => panic!("type {msg_type}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn malformed_payloads_say_what_is_wrong() {
    assert_eq!(
        malformed(TYPE_PING, 0, b"x"),
        "trailing bytes after the last field"
    );
    assert_eq!(
        malformed(TYPE_PING, 1, b""),
        "unknown flag bits for this type"
    );
    assert_eq!(
        malformed(TYPE_FLUSH, 0, &[0; 7]),
        "payload ends inside a field"
    );
    assert_eq!(malformed(TYPE_STATE, 0, &[3, 1]), "unknown role code");
    assert_eq!(malformed(TYPE_STATE, 0, &[1, 0]), "unknown disk state code");
    assert_eq!(
        malformed(TYPE_START_SYNC, 0, &[3; 33]),
        "unknown sync mode code"
    );
    assert_eq!(
        malformed(TYPE_BITMAP_CHUNK, 0, &[0; 12]),
        "bitmap words are not a multiple of 8 bytes"
    );
    assert_eq!(
        malformed(TYPE_CHECKSUM_REPLY, 0, &[0; 14]),
        "checksums are not a multiple of 4 bytes"
    );
    assert_eq!(malformed(TYPE_BYE, 0, &[0xff, 0xfe]), "reason is not UTF-8");
    let mut write = vec![0u8; 24];
    write.push(7);
    assert_eq!(malformed(TYPE_WRITE, 0, &write), "unknown write kind");
    write[24] = 0;
    assert_eq!(
        malformed(TYPE_WRITE, FLAG_WRITE_MAY_TRIM, &write),
        "may-trim flag on a write that is not of zeroes"
    );
    write[24] = 1;
    write.extend_from_slice(&[0, 0, 0, 1, 9]);
    assert_eq!(
        malformed(TYPE_WRITE, 0, &write),
        "trailing bytes after the last field"
    );

    // A Hello whose node-name length runs past the end.
    let hello = one_of_each().remove(0);
    let bytes = encoded(&hello);
    let mut payload = bytes[HEADER_LEN..].to_vec();
    let node_len_at = payload.len() - "alpha".len() - 4;
    payload[node_len_at..node_len_at + 4].copy_from_slice(&6u32.to_be_bytes());
    let flags = u16::from_be_bytes([bytes[6], bytes[7]]);
    assert_eq!(
        malformed(TYPE_HELLO, flags, &payload),
        "string length runs past the payload"
    );
    payload[node_len_at..node_len_at + 4].copy_from_slice(&5u32.to_be_bytes());
    let last = payload.len() - 1;
    payload[last] = 0xc3;
    assert_eq!(
        malformed(TYPE_HELLO, flags, &payload),
        "string is not UTF-8"
    );

    let text = DecodeError::Malformed {
        msg_type: TYPE_HELLO,
        why: "x",
    }
    .to_string();
    assert_eq!(text, "malformed Hello frame (type 1): x");
    assert!(DecodeError::TooLong(5)
        .to_string()
        .contains("5-byte payload"));
    assert!(DecodeError::UnknownType(42).to_string().contains("42"));
}

#[test]
fn whole_frames_decode_from_their_own_buffer_like_the_stream_decoder() {
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    for msg in one_of_each() {
        let bytes = encoded(&msg);
        // The header alone tells the frame's length.
        assert_eq!(dec.frame_len(&bytes[..HEADER_LEN - 1]), Ok(None));
        assert_eq!(dec.frame_len(&bytes[..HEADER_LEN]), Ok(Some(bytes.len())));
        assert_eq!(dec.frame_len(&bytes), Ok(Some(bytes.len())));
        let frame = Bytes::copy_from_slice(&bytes);
        assert_eq!(dec.decode_frame(frame), Ok(msg.clone()), "{msg:?}");
    }
    // A corrupted frame is refused as by decode().
    let mut bad = encoded(&one_of_each()[0]).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        dec.decode_frame(Bytes::from(bad.clone())),
        Err(DecodeError::BadCrc { .. })
    ));
    // Not exactly one frame: an error, never a panic.
    bad.truncate(last);
    assert!(dec.decode_frame(Bytes::from(bad)).is_err());
    assert!(dec.decode_frame(Bytes::from_static(b"nope")).is_err());
    let mut two = encoded(&Message::Ping).to_vec();
    two.extend_from_slice(&encoded(&Message::Ping));
    assert!(dec.decode_frame(Bytes::from(two)).is_err());
    // Bad magic and oversized lengths are told from the header.
    assert!(matches!(
        dec.frame_len(&[0u8; HEADER_LEN]),
        Err(DecodeError::BadMagic(_))
    ));
    let small = Decoder::new(8);
    let big = encoded(&Message::Write {
        seq: 1,
        seen: 0,
        offset: 0,
        kind: WriteKind::Data(Bytes::from(vec![1u8; 100])),
        fua: false,
        resync: false,
    });
    assert!(matches!(
        small.frame_len(&big),
        Err(DecodeError::TooLong(_))
    ));
}
