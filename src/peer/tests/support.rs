//! Shared helpers: proptest strategies for every message, frame builders.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::peer::frame::{frame_crc, FrameHeader, FRAME_MAGIC, HEADER_LEN};
use crate::peer::*;

pub fn role() -> impl Strategy<Value = PeerRole> {
    prop_oneof![Just(PeerRole::Primary), Just(PeerRole::Secondary)]
}

pub fn disk() -> impl Strategy<Value = PeerDisk> {
    prop_oneof![
        Just(PeerDisk::UpToDate),
        Just(PeerDisk::Inconsistent),
        Just(PeerDisk::Outdated),
        Just(PeerDisk::Failed),
        Just(PeerDisk::Diskless),
    ]
}

pub fn gis() -> impl Strategy<Value = Gis> {
    (any::<u64>(), any::<u64>(), any::<[u64; 2]>()).prop_map(|(current, bitmap, history)| Gis {
        current,
        bitmap,
        history,
    })
}

pub fn sync_mode() -> impl Strategy<Value = SyncMode> {
    prop_oneof![
        Just(SyncMode::None),
        Just(SyncMode::Bitmap),
        Just(SyncMode::Full)
    ]
}

/// Data blocks: empty, small, or up to `max` bytes.
pub fn data(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        vec(any::<u8>(), 1..64).prop_map(Bytes::from),
        (0..=max, any::<u8>()).prop_map(|(n, b)| Bytes::from(vec![b; n])),
    ]
}

pub fn write_kind(max_data: usize) -> impl Strategy<Value = WriteKind> {
    prop_oneof![
        data(max_data).prop_map(WriteKind::Data),
        any::<u32>().prop_map(|len| WriteKind::Trim { len }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(len, may_trim)| WriteKind::Zeroes { len, may_trim }),
    ]
}

pub fn hello() -> impl Strategy<Value = Hello> {
    (
        (
            any::<u32>(),
            ".{0,20}",
            "\\PC{0,20}",
            any::<u64>(),
            any::<u8>(),
            any::<bool>(),
        ),
        (
            role(),
            disk(),
            gis(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (version, resource, node, data_size, protocol, two_primaries),
                (
                    role,
                    disk,
                    gis,
                    crashed_primary,
                    peer_may_lack,
                    out_of_sync_blocks,
                    discard_my_data,
                ),
            )| Hello {
                version,
                resource,
                node,
                data_size,
                protocol,
                two_primaries,
                role,
                disk,
                gis,
                crashed_primary,
                peer_may_lack,
                out_of_sync_blocks,
                discard_my_data,
            },
        )
}

/// Every message variant; data blocks up to `max_data` bytes.
pub fn message(max_data: usize) -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        (role(), disk()).prop_map(|(role, disk)| Message::State { role, disk }),
        (any::<u64>(), vec(any::<u64>(), 0..200), any::<bool>()).prop_map(
            |(first_word, words, last)| Message::BitmapChunk {
                first_word,
                words,
                last
            }
        ),
        (sync_mode(), gis()).prop_map(|(mode, source_gis)| Message::StartSync { mode, source_gis }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            write_kind(max_data),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(seq, seen, offset, kind, fua, resync)| Message::Write {
                seq,
                seen,
                offset,
                kind,
                fua,
                resync
            }),
        any::<u64>().prop_map(|seq| Message::RecvAck { seq }),
        (any::<u64>(), any::<u32>()).prop_map(|(seq, error)| Message::WriteAck { seq, error }),
        any::<u64>().prop_map(|id| Message::Flush { id }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, error)| Message::FlushAck { id, error }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(id, offset, len)| Message::ReadRequest { id, offset, len }),
        (any::<u64>(), any::<u32>(), data(max_data))
            .prop_map(|(id, error, data)| Message::ReadReply { id, error, data }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(
            |(id, offset, len, verify)| Message::ChecksumRequest {
                id,
                offset,
                len,
                verify
            }
        ),
        (any::<u64>(), any::<u32>(), vec(any::<u32>(), 0..300))
            .prop_map(|(id, error, sums)| Message::ChecksumReply { id, error, sums }),
        gis().prop_map(|source_gis| Message::SyncDone { source_gis }),
        Just(Message::StartVerify),
        any::<u64>().prop_map(|differing_blocks| Message::VerifyDone { differing_blocks }),
        Just(Message::SplitBrain),
        Just(Message::Ping),
        Just(Message::PingAck),
        "\\PC{0,40}".prop_map(|reason| Message::Bye { reason }),
    ]
}

/// One of each variant, with small fixed contents.
pub fn one_of_each() -> Vec<Message> {
    let gis = Gis {
        current: 0x1111,
        bitmap: 0x2222,
        history: [0x3333, 0x4444],
    };
    vec![
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            resource: "r0".into(),
            node: "alpha".into(),
            data_size: 1 << 30,
            protocol: b'C',
            two_primaries: true,
            role: PeerRole::Primary,
            disk: PeerDisk::UpToDate,
            gis,
            crashed_primary: false,
            peer_may_lack: true,
            out_of_sync_blocks: 7,
            discard_my_data: true,
        }),
        Message::State {
            role: PeerRole::Secondary,
            disk: PeerDisk::Outdated,
        },
        Message::BitmapChunk {
            first_word: 5,
            words: vec![1, u64::MAX, 0],
            last: true,
        },
        Message::StartSync {
            mode: SyncMode::Bitmap,
            source_gis: gis,
        },
        Message::Write {
            seq: 1,
            seen: 2,
            offset: 4096,
            kind: WriteKind::Data(Bytes::from_static(b"hello world")),
            fua: true,
            resync: false,
        },
        Message::Write {
            seq: 3,
            seen: 0,
            offset: 0,
            kind: WriteKind::Trim { len: 65536 },
            fua: false,
            resync: true,
        },
        Message::Write {
            seq: 4,
            seen: 0,
            offset: 8192,
            kind: WriteKind::Zeroes {
                len: 4096,
                may_trim: true,
            },
            fua: false,
            resync: false,
        },
        Message::RecvAck { seq: 9 },
        Message::WriteAck { seq: 9, error: 5 },
        Message::Flush { id: 3 },
        Message::FlushAck { id: 3, error: 0 },
        Message::ReadRequest {
            id: 4,
            offset: 512,
            len: 4096,
        },
        Message::ReadReply {
            id: 4,
            error: 0,
            data: Bytes::from(vec![0xab; 4096]),
        },
        Message::ChecksumRequest {
            id: 6,
            offset: 0,
            len: 1 << 20,
            verify: true,
        },
        Message::ChecksumReply {
            id: 6,
            error: 0,
            sums: vec![1, 2, 3, 0xdead_beef],
        },
        Message::SyncDone { source_gis: gis },
        Message::StartVerify,
        Message::VerifyDone {
            differing_blocks: 12,
        },
        Message::SplitBrain,
        Message::Ping,
        Message::PingAck,
        Message::Bye {
            reason: "shutting down".into(),
        },
    ]
}

pub fn encoded(msg: &Message) -> BytesMut {
    let mut out = BytesMut::new();
    encode(msg, &mut out);
    out
}

/// A frame with the given header fields and payload and a correct CRC.
pub fn raw_frame(msg_type: u16, flags: u16, payload: &[u8]) -> BytesMut {
    let mut header = FrameHeader {
        magic: FRAME_MAGIC,
        msg_type,
        flags,
        len: u32::try_from(payload.len()).expect("test payload fits u32"),
        crc: 0,
    };
    // The part the CRC covers: all of it, unless the flags leave the data out.
    let covered = crc_covered_len(msg_type, flags, payload.len());
    header.crc = frame_crc(&header.to_bytes(), &[&payload[..covered]]);
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes exactly one message from `bytes`, requiring all bytes consumed.
pub fn decode_one(bytes: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let res = Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf);
    if let Ok(Some(_)) = res {
        assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    }
    res
}
