//! Property tests: round trips of every variant, chunking invariance,
//! corruption detection, no panics and canonical encoding on any input.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use super::support::*;
use crate::peer::frame::{is_known_type, HEADER_LEN, TYPE_START_VERIFY};
use crate::peer::*;

/// Decodes `bytes` delivered in pieces ending at the given cut points.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Message> {
    let mut dec = Decoder::new(DEFAULT_MAX_PAYLOAD);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let cut = cut.clamp(from, bytes.len());
        buf.extend_from_slice(&bytes[from..cut]);
        from = cut;
        // Bounded: at most one message per byte delivered so far.
        for _ in 0..=bytes.len() {
            match dec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => panic!("decode error on a valid stream: {e}"),
            }
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    out
}

/// The decoder must never accept a message from a damaged frame, however
/// many bytes follow it. (The limit is set a little above the frame so a
/// flip in a high length bit is refused quickly instead of padded by MiBs.)
fn assert_not_accepted(bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    let limit = u32::try_from(bytes.len() + 4096).expect("test frame fits u32");
    let mut dec = Decoder::new(limit);
    match dec.decode(&mut buf) {
        Err(_) => {}
        Ok(Some(m)) => panic!("damaged frame accepted as {m:?}"),
        Ok(None) => {
            // The length grew: deliver zeroes up to the announced length.
            let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
            let want = HEADER_LEN + len;
            assert!(want > bytes.len(), "waited although the frame was complete");
            buf.resize(want, 0);
            let res = dec.decode(&mut buf);
            assert!(res.is_err(), "damaged, padded frame gave {res:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(msg in message(70_000)) {
        let bytes = encoded(&msg);
        prop_assert_eq!(decode_one(&bytes), Ok(Some(msg.clone())));
        // Zero-copy path gives the same bytes.
        let mut head = BytesMut::new();
        let tail = encode_split(&msg, &mut head).expect("fits a frame");
        head.extend_from_slice(&tail);
        prop_assert_eq!(head, bytes);
    }

    #[test]
    fn any_chunking_gives_the_same_messages(
        msgs in vec(message(3000), 1..6),
        mut cuts in vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut bytes = BytesMut::new();
        for m in &msgs {
            encode(m, &mut bytes);
        }
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts), msgs);
    }

    #[test]
    fn split_at_every_byte(msg in message(200)) {
        let bytes = encoded(&msg);
        for split in 0..=bytes.len() {
            let got = decode_in_pieces(&bytes, &[split]);
            prop_assert_eq!(&got, &vec![msg.clone()], "split at {}", split);
        }
        let every: Vec<usize> = (1..bytes.len()).collect();
        prop_assert_eq!(decode_in_pieces(&bytes, &every), vec![msg]);
    }

    #[test]
    fn any_single_bit_flip_is_detected(msg in message(300)) {
        let bytes = encoded(&msg);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.to_vec();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert_not_accepted(&damaged);
        }
    }

    #[test]
    fn bit_flips_in_big_frames_are_detected(
        msg in message(100_000),
        bits in vec(any::<prop::sample::Index>(), 1..16),
    ) {
        let bytes = encoded(&msg);
        for bit in bits {
            let bit = bit.index(bytes.len() * 8);
            let mut damaged = bytes.to_vec();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert_not_accepted(&damaged);
        }
    }

    #[test]
    fn garbage_never_panics(data in vec(any::<u8>(), 0..600), max in 0u32..1000) {
        let mut buf = BytesMut::from(&data[..]);
        let mut dec = Decoder::new(max);
        for _ in 0..=data.len() {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Frames with a valid header and CRC but arbitrary type, flags and
    /// payload: never a panic, and whatever decodes re-encodes to the very
    /// same bytes (the encoding is canonical).
    #[test]
    fn valid_crc_garbage_is_refused_or_canonical(
        msg_type in 0u16..=TYPE_START_VERIFY + 2,
        flags in prop_oneof![0u16..8, any::<u16>()],
        payload in prop_oneof![
            vec(any::<u8>(), 0..120),
            vec(prop_oneof![Just(0u8), Just(1u8), Just(2u8)], 0..120),
        ],
    ) {
        let frame = raw_frame(msg_type, flags, &payload);
        match decode_one(&frame) {
            Ok(Some(m)) => {
                let mut again = BytesMut::new();
                encode_with(&m, &mut again, data_crc_of(msg_type, flags));
                prop_assert_eq!(again, frame)
            }
            Ok(None) => prop_assert!(false, "complete frame reported incomplete"),
            Err(DecodeError::UnknownType(t)) => {
                prop_assert_eq!(t, msg_type);
                prop_assert!(!is_known_type(t));
            }
            Err(DecodeError::Malformed { msg_type: t, .. }) => prop_assert_eq!(t, msg_type),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}
