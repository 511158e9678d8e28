//! The frame around every peer message, and the errors of decoding one.
//!
//! A frame is a 16-byte header followed by the payload, all big-endian:
//!
//! | offset | size | field                                         |
//! |--------|------|-----------------------------------------------|
//! | 0      | 4    | magic, [`FRAME_MAGIC`]                        |
//! | 4      | 2    | message type (`TYPE_*`)                       |
//! | 6      | 2    | flags (per type, `FLAG_*`; unknown bits are refused) |
//! | 8      | 4    | payload length in bytes                       |
//! | 12     | 4    | CRC32 (IEEE) over bytes 0..12, then the payload |
//! | 16     | len  | payload                                       |
//!
//! A Write of data or a ReadReply sent without a data checksum (`[net]
//! data-integrity = false`, the default) says so in its flags
//! ([`FLAG_WRITE_DATA_UNCHECKED`], [`FLAG_READ_REPLY_DATA_UNCHECKED`]); its CRC
//! then covers the header and the payload's fixed fields, not the data
//! (`codec::crc_covered_len`). The flag is under the CRC, so it cannot be
//! flipped unnoticed.

use std::fmt;

/// "nmp1": nbd-mirror peer protocol, frame layout 1.
pub const FRAME_MAGIC: u32 = 0x6e6d_7031;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;

/// Bytes of the header covered by the CRC (all of it but the CRC itself).
const CRC_COVERED_HEADER: usize = 12;

/// Largest data block a Write or ReadReply carries: the NBD DoS floor, 32 MiB.
pub const MAX_DATA_LEN: u32 = 32 * 1024 * 1024;

/// Default payload limit for [`crate::peer::Decoder::new`]: one maximal data
/// block plus room for the fixed fields of any message.
pub const DEFAULT_MAX_PAYLOAD: u32 = MAX_DATA_LEN + 4096;

// Message type codes.
pub const TYPE_HELLO: u16 = 1;
pub const TYPE_STATE: u16 = 2;
pub const TYPE_BITMAP_CHUNK: u16 = 3;
pub const TYPE_START_SYNC: u16 = 4;
pub const TYPE_WRITE: u16 = 5;
pub const TYPE_RECV_ACK: u16 = 6;
pub const TYPE_WRITE_ACK: u16 = 7;
pub const TYPE_FLUSH: u16 = 8;
pub const TYPE_FLUSH_ACK: u16 = 9;
pub const TYPE_READ_REQUEST: u16 = 10;
pub const TYPE_READ_REPLY: u16 = 11;
pub const TYPE_CHECKSUM_REQUEST: u16 = 12;
pub const TYPE_CHECKSUM_REPLY: u16 = 13;
pub const TYPE_SYNC_DONE: u16 = 14;
pub const TYPE_VERIFY_DONE: u16 = 15;
pub const TYPE_SPLIT_BRAIN: u16 = 16;
pub const TYPE_PING: u16 = 17;
pub const TYPE_PING_ACK: u16 = 18;
pub const TYPE_BYE: u16 = 19;
pub const TYPE_START_VERIFY: u16 = 20;

// Flag bits, per message type.
/// Hello: dual-primary mode is configured.
pub const FLAG_HELLO_TWO_PRIMARIES: u16 = 1 << 0;
/// Hello: the sender crashed while primary.
pub const FLAG_HELLO_CRASHED_PRIMARY: u16 = 1 << 1;
/// Hello: the sender wants its data discarded on split brain.
pub const FLAG_HELLO_DISCARD_MY_DATA: u16 = 1 << 2;
/// Hello: the sender holds writes the receiver acknowledged but may have lost
/// (it had not flushed them when the link was lost). Sent only when true; a
/// peer of an older version refuses the flag (unknown bit) and the pair
/// connects once both run this version.
pub const FLAG_HELLO_PEER_MAY_LACK: u16 = 1 << 3;
/// BitmapChunk: this is the last chunk.
pub const FLAG_BITMAP_LAST: u16 = 1 << 0;
/// Write: force unit access.
pub const FLAG_WRITE_FUA: u16 = 1 << 0;
/// Write: a resync write, not an application write.
pub const FLAG_WRITE_RESYNC: u16 = 1 << 1;
/// Write of zeroes: the receiver may trim instead.
pub const FLAG_WRITE_MAY_TRIM: u16 = 1 << 2;
/// Write of data: the CRC does not cover the data (sent with `data-integrity = false`).
pub const FLAG_WRITE_DATA_UNCHECKED: u16 = 1 << 3;
/// ReadReply: the CRC does not cover the data (sent with `data-integrity = false`).
pub const FLAG_READ_REPLY_DATA_UNCHECKED: u16 = 1 << 0;
/// ChecksumRequest: this is online verify, not checksum resync.
pub const FLAG_CHECKSUM_VERIFY: u16 = 1 << 0;

/// Whether this version knows the message type.
pub fn is_known_type(msg_type: u16) -> bool {
    (TYPE_HELLO..=TYPE_START_VERIFY).contains(&msg_type)
}

/// The name of a message type, for logs and errors.
pub fn type_name(msg_type: u16) -> &'static str {
    match msg_type {
        TYPE_HELLO => "Hello",
        TYPE_STATE => "State",
        TYPE_BITMAP_CHUNK => "BitmapChunk",
        TYPE_START_SYNC => "StartSync",
        TYPE_WRITE => "Write",
        TYPE_RECV_ACK => "RecvAck",
        TYPE_WRITE_ACK => "WriteAck",
        TYPE_FLUSH => "Flush",
        TYPE_FLUSH_ACK => "FlushAck",
        TYPE_READ_REQUEST => "ReadRequest",
        TYPE_READ_REPLY => "ReadReply",
        TYPE_CHECKSUM_REQUEST => "ChecksumRequest",
        TYPE_CHECKSUM_REPLY => "ChecksumReply",
        TYPE_SYNC_DONE => "SyncDone",
        TYPE_VERIFY_DONE => "VerifyDone",
        TYPE_SPLIT_BRAIN => "SplitBrain",
        TYPE_PING => "Ping",
        TYPE_PING_ACK => "PingAck",
        TYPE_BYE => "Bye",
        TYPE_START_VERIFY => "StartVerify",
        _ => "unknown",
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub magic: u32,
    pub msg_type: u16,
    pub flags: u16,
    pub len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Reads the header fields from exactly [`HEADER_LEN`] bytes; checks nothing.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        let be32 = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let be16 = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        Self {
            magic: be32(0),
            msg_type: be16(4),
            flags: be16(6),
            len: be32(8),
            crc: be32(12),
        }
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.msg_type.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.len.to_be_bytes());
        b[12..16].copy_from_slice(&self.crc.to_be_bytes());
        b
    }
}

/// The CRC32 of a frame: over the header without its CRC field, then the
/// payload, given as consecutive pieces (so a bulk data tail need not be copied).
pub fn frame_crc(header: &[u8; HEADER_LEN], payload_parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..CRC_COVERED_HEADER]);
    for part in payload_parts {
        h.update(part);
    }
    h.finalize()
}

/// Why a frame could not be decoded. Any of these means the stream can no
/// longer be trusted: drop the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame does not start with [`FRAME_MAGIC`] (holds what was there).
    BadMagic(u32),
    /// The frame's CRC does not match. `expected` is the CRC carried in the
    /// header, `got` the CRC computed over the bytes that arrived.
    BadCrc {
        expected: u32,
        got: u32,
        msg_type: u16,
    },
    /// A well-formed frame of a type this version does not know.
    UnknownType(u16),
    /// The header announces a payload longer than the decoder's limit.
    TooLong(u32),
    /// The payload does not fit the layout of its type.
    Malformed { msg_type: u16, why: &'static str },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic(m) => write!(
                f,
                "bad peer frame magic 0x{m:08x} (expected 0x{FRAME_MAGIC:08x}): not an nbd-mirror peer, or framing lost"
            ),
            DecodeError::BadCrc { expected, got, msg_type } => write!(
                f,
                "CRC mismatch in {} frame (type {msg_type}): frame carries 0x{expected:08x}, data hashes to 0x{got:08x}",
                type_name(*msg_type)
            ),
            DecodeError::UnknownType(t) => write!(f, "unknown peer message type {t}"),
            DecodeError::TooLong(len) => {
                write!(f, "peer frame announces a {len}-byte payload, over the configured maximum")
            }
            DecodeError::Malformed { msg_type, why } => {
                write!(f, "malformed {} frame (type {msg_type}): {why}", type_name(*msg_type))
            }
        }
    }
}

impl std::error::Error for DecodeError {}
