//! Request decoding: framing, WRITE payloads, oversized writes, bad magic.

use bytes::BytesMut;

use crate::nbd::client::put_request;
use crate::nbd::consts::*;
use crate::nbd::request::MAX_DISCARD_PAYLOAD;
use crate::nbd::{Command, Decoded, ProtocolError, Request, RequestDecoder};

fn req(command: Command, length: u32) -> Request {
    Request {
        flags: 0,
        command,
        cookie: 0x0102_0304_0506_0708,
        offset: 4096,
        length,
    }
}

fn decode_all(dec: &mut RequestDecoder, buf: &mut BytesMut) -> Result<Vec<Decoded>, ProtocolError> {
    let mut v = Vec::new();
    while let Some(d) = dec.decode(buf)? {
        v.push(d);
    }
    Ok(v)
}

#[test]
fn header_layout_is_exact() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x03, // FLUSH
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 0, 0, 0, 0x10, 0, // offset
        0, 0, 0x02, 0, // length
    ]);
    let mut dec = RequestDecoder::new(1 << 20);
    let d = dec.decode(&mut buf).expect("valid").expect("complete");
    assert_eq!(
        d,
        Decoded::Request {
            req: Request {
                flags: NBD_CMD_FLAG_FUA,
                command: Command::Flush,
                cookie: 0x0102_0304_0506_0708,
                offset: 0x1000,
                length: 0x200,
            },
            payload: bytes::Bytes::new(),
        }
    );
    assert!(buf.is_empty());
}

#[test]
fn command_codes_round_trip() {
    for code in 0..=u16::MAX {
        assert_eq!(Command::from_u16(code).to_u16(), code);
    }
    assert_eq!(Command::from_u16(7), Command::BlockStatus);
    assert_eq!(Command::from_u16(8), Command::Unknown(8));
}

#[test]
fn write_payload_is_returned_and_stream_stays_in_sync() {
    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Write, 5), b"hello");
    put_request(&mut buf, &req(Command::Unknown(200), 1 << 30), &[]);
    put_request(&mut buf, &req(Command::Read, 512), &[]);
    let mut dec = RequestDecoder::new(1 << 20);
    let got = decode_all(&mut dec, &mut buf).expect("valid");
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0],
        Decoded::Request {
            req: req(Command::Write, 5),
            payload: bytes::Bytes::from_static(b"hello")
        }
    );
    // An unknown command carries no payload even with a huge length.
    assert!(
        matches!(&got[1], Decoded::Request { req, payload } if req.command == Command::Unknown(200) && payload.is_empty())
    );
    assert!(matches!(&got[2], Decoded::Request { req, .. } if req.command == Command::Read));
}

#[test]
fn partial_input_consumes_nothing() {
    let mut full = BytesMut::new();
    put_request(&mut full, &req(Command::Write, 100), &[7u8; 100]);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        let mut dec = RequestDecoder::new(1 << 20);
        assert_eq!(dec.decode(&mut buf), Ok(None), "cut {cut}");
        assert_eq!(buf.len(), cut, "cut {cut}");
    }
}

#[test]
fn bad_magic_is_fatal() {
    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Read, 1), &[]);
    buf[0] = 0x12;
    let mut dec = RequestDecoder::new(1 << 20);
    assert_eq!(
        dec.decode(&mut buf),
        Err(ProtocolError::BadMagic(0x1260_9513))
    );
}

#[test]
fn oversized_write_is_discarded_piecewise_then_reported() {
    let max = 4096;
    let len = 3 * max + 7;
    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Write, len), &[]);
    let mut dec = RequestDecoder::new(max);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert!(buf.is_empty());
    let mut sent = 0;
    while sent + 1000 < len {
        buf.extend_from_slice(&[0u8; 1000]);
        sent += 1000;
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty(), "discarded bytes must not be buffered");
    }
    // The rest of the payload, then the next request in the same buffer.
    buf.extend_from_slice(&vec![0u8; (len - sent) as usize]);
    put_request(&mut buf, &req(Command::Flush, 0), &[]);
    assert_eq!(
        dec.decode(&mut buf),
        Ok(Some(Decoded::Oversized {
            req: req(Command::Write, len)
        }))
    );
    let next = dec.decode(&mut buf).expect("valid").expect("complete");
    assert!(matches!(next, Decoded::Request { req, .. } if req.command == Command::Flush));
}

#[test]
fn write_beyond_discard_limit_is_fatal() {
    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Write, MAX_DISCARD_PAYLOAD), &[]);
    let mut dec = RequestDecoder::new(4096);
    assert_eq!(dec.decode(&mut buf), Ok(None), "at the limit: discarded");

    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Write, MAX_DISCARD_PAYLOAD + 1), &[]);
    let mut dec = RequestDecoder::new(4096);
    assert_eq!(
        dec.decode(&mut buf),
        Err(ProtocolError::WriteTooLarge {
            length: MAX_DISCARD_PAYLOAD + 1,
            limit: MAX_DISCARD_PAYLOAD
        })
    );
}

#[test]
fn max_write_payload_is_inclusive_and_zero_length_write_works() {
    let mut buf = BytesMut::new();
    put_request(&mut buf, &req(Command::Write, 8), &[9u8; 8]);
    put_request(&mut buf, &req(Command::Write, 0), &[]);
    let mut dec = RequestDecoder::new(8);
    let got = decode_all(&mut dec, &mut buf).expect("valid");
    assert_eq!(got.len(), 2);
    assert!(matches!(&got[0], Decoded::Request { payload, .. } if payload.len() == 8));
    assert!(matches!(&got[1], Decoded::Request { payload, .. } if payload.is_empty()));
}

#[test]
fn error_display() {
    assert!(ProtocolError::BadMagic(1)
        .to_string()
        .contains("bad magic 0x00000001"));
}

#[test]
fn large_writes_can_be_taken_header_first() {
    let mut dec = RequestDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let write = req(Command::Write, 100_000);
    put_request(&mut buf, &write, &[]);
    buf.extend_from_slice(&[7u8; 1000]);
    // Too small for the caller's threshold, or not a write: left for decode().
    assert_eq!(dec.take_large_write(&mut buf, 200_000), None);
    let mut flush = BytesMut::new();
    put_request(&mut flush, &req(Command::Flush, 0), &[]);
    assert_eq!(dec.take_large_write(&mut flush, 1), None);
    assert_eq!(flush.len(), REQUEST_HEADER_LEN);
    // Taken: the header is consumed, the partial payload stays for the caller.
    assert_eq!(dec.take_large_write(&mut buf, 65536), Some(write));
    assert_eq!(buf.len(), 1000);
    // The caller consumed the payload; decoding goes on with the next request.
    buf.clear();
    put_request(&mut buf, &req(Command::Flush, 0), &[]);
    assert!(matches!(
        dec.decode(&mut buf),
        Ok(Some(Decoded::Request { .. }))
    ));
    // A complete payload is left to decode() (no copy needed), and so is an oversized one.
    let mut whole = BytesMut::new();
    put_request(&mut whole, &req(Command::Write, 70_000), &vec![1u8; 70_000]);
    assert_eq!(dec.take_large_write(&mut whole, 65536), None);
    let mut huge = BytesMut::new();
    put_request(&mut huge, &req(Command::Write, 2 << 20), &[]);
    assert_eq!(dec.take_large_write(&mut huge, 65536), None);
}

#[test]
fn missing_counts_the_bytes_up_to_the_next_request_boundary() {
    let mut whole = BytesMut::new();
    put_request(&mut whole, &req(Command::Write, 100), &[7u8; 100]);
    put_request(&mut whole, &req(Command::Read, 512), &[]);
    let mut dec = RequestDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    assert_eq!(dec.missing(&buf), 0);
    assert!(dec.at_boundary(&buf));
    // Byte by byte: `missing` never asks for more than the current request.
    let mut fed = 0;
    let mut done = 0;
    while fed < whole.len() {
        let n = dec.missing(&buf).max(1);
        let end = (fed + n).min(whole.len());
        buf.extend_from_slice(&whole[fed..end]);
        fed = end;
        if dec.missing(&buf) == 0 {
            done += decode_all(&mut dec, &mut buf).expect("valid").len();
            assert!(
                dec.at_boundary(&buf),
                "exactly one request read ({fed} bytes)"
            );
        }
    }
    assert_eq!(done, 2);
    buf.extend_from_slice(&whole[..10]);
    assert_eq!(dec.missing(&buf), 18, "the rest of a header");
    assert!(!dec.at_boundary(&buf));
}
