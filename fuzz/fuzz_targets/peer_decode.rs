//! Feeds arbitrary bytes to the peer frame decoder (in chunks the input
//! chooses) and to the peer authenticator. Must never panic, and every
//! decoded message must re-encode to exactly the bytes it was decoded from
//! (with or without the data under the CRC, as the frame's flags say).
//!
//! Input: byte 0 = chunk size, byte 1 = mode bits (bit 0: patch every
//! frame's CRC so the fuzzer reaches payload parsing; bit 1: small payload
//! limit), then the stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_mirror::peer::auth::CHALLENGE_LEN;
use nbd_mirror::peer::frame::{frame_crc, HEADER_LEN};
use nbd_mirror::peer::{
    crc_covered_len, data_crc_of, encode_with, Authenticator, Decoder, DEFAULT_MAX_PAYLOAD,
};

/// Rewrites the CRC field of each frame in `stream` to the right value.
fn patch_crcs(stream: &mut [u8]) {
    let mut at = 0;
    while let Some(header) = stream.get(at..at + HEADER_LEN) {
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(header);
        let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let end = (at + HEADER_LEN).saturating_add(len).min(stream.len());
        let (msg_type, flags) = (
            u16::from_be_bytes([head[4], head[5]]),
            u16::from_be_bytes([head[6], head[7]]),
        );
        let covered = crc_covered_len(msg_type, flags, end - at - HEADER_LEN);
        let crc = frame_crc(
            &head,
            &[&stream[at + HEADER_LEN..at + HEADER_LEN + covered]],
        );
        stream[at + 12..at + 16].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let [chunk, mode, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let mut stream = rest.to_vec();
    if mode & 1 != 0 {
        patch_crcs(&mut stream);
    }
    let max = if mode & 2 != 0 {
        4096
    } else {
        DEFAULT_MAX_PAYLOAD
    };

    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut reencoded = BytesMut::new();
    'outer: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        // Each decoded message consumes at least one header.
        for _ in 0..(buf.len() / HEADER_LEN + 1) {
            let before = buf.clone();
            match dec.decode(&mut buf) {
                Ok(Some(msg)) => {
                    let consumed = before.len() - buf.len();
                    reencoded.clear();
                    let data_crc = data_crc_of(
                        u16::from_be_bytes([before[4], before[5]]),
                        u16::from_be_bytes([before[6], before[7]]),
                    );
                    encode_with(&msg, &mut reencoded, data_crc);
                    assert_eq!(
                        &reencoded[..],
                        &before[..consumed],
                        "not canonical: {msg:?}"
                    );
                }
                Ok(None) => {
                    assert_eq!(buf, before, "incomplete frame was consumed");
                    break;
                }
                Err(_) => break 'outer,
            }
        }
    }

    let Ok(mut auth) =
        Authenticator::with_challenge(b"key", "alpha", "r0", None, [7; CHALLENGE_LEN])
    else {
        return;
    };
    let mut input = BytesMut::new();
    for piece in rest.chunks(chunk) {
        input.extend_from_slice(piece);
        if auth.feed(&mut input).is_err() {
            break;
        }
    }
});
