//! Encoding and decoding of [`Message`]s as frames (see `frame.rs` for the
//! header). Payload layouts, all integers big-endian, booleans as header flags:
//!
//! | type | payload |
//! |------|---------|
//! | Hello | version u32, data_size u64, protocol u8, role u8, disk u8, gis (4 x u64), out_of_sync_blocks u64, resource (u32 len + UTF-8), node (u32 len + UTF-8) |
//! | State | role u8, disk u8 |
//! | BitmapChunk | first_word u64, words (u64 each, to the end) |
//! | StartSync | mode u8, gis |
//! | Write | seq u64, seen u64, offset u64, kind u8 (0 data, 1 trim, 2 zeroes), then the data (to the end) or len u32 |
//! | RecvAck | seq u64 |
//! | WriteAck, FlushAck | seq/id u64, error u32 |
//! | Flush | id u64 |
//! | ReadRequest | id u64, offset u64, len u32 |
//! | ReadReply | id u64, error u32, data (to the end) |
//! | ChecksumRequest | id u64, offset u64, len u32 |
//! | ChecksumReply | id u64, error u32, sums (u32 each, to the end) |
//! | SyncDone | gis |
//! | VerifyDone | differing_blocks u64 |
//! | StartVerify, SplitBrain, Ping, PingAck | empty |
//! | Bye | reason, UTF-8 (to the end) |
//!
//! Role: 1 primary, 2 secondary. Disk: 1 up-to-date, 2 inconsistent,
//! 3 outdated, 4 failed, 5 diskless. Sync mode: 0 none, 1 bitmap, 2 full.
//!
//! Decoding is strict: unknown flag bits, unknown enum values, trailing or
//! missing bytes are all [`DecodeError::Malformed`], so every frame that
//! decodes re-encodes to the same bytes (with the same [`DataCrc`], which
//! [`data_crc_of`] reads from the frame's header).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::*;
use super::message::*;

const WRITE_KIND_DATA: u8 = 0;
const WRITE_KIND_TRIM: u8 = 1;
const WRITE_KIND_ZEROES: u8 = 2;

/// Bytes of a Write payload before its data.
const WRITE_PREFIX_LEN: usize = 8 + 8 + 8 + 1;
/// Bytes of a ReadReply payload before its data.
const READ_REPLY_PREFIX_LEN: usize = 8 + 4;

/// Whether a frame's CRC covers its bulk data (Write data, ReadReply data): `[net]
/// data-integrity`. The header and the fixed fields are covered either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataCrc {
    On,
    Off,
}

/// Bytes of a `len`-byte payload the frame's CRC covers: all of them, or for a Write of data or
/// a ReadReply sent without a data checksum, the fixed fields before the data.
pub fn crc_covered_len(msg_type: u16, flags: u16, len: usize) -> usize {
    let prefix = match data_crc_of(msg_type, flags) {
        DataCrc::On => return len,
        DataCrc::Off if msg_type == TYPE_WRITE => WRITE_PREFIX_LEN,
        DataCrc::Off => READ_REPLY_PREFIX_LEN,
    };
    prefix.min(len)
}

/// Whether a frame of this type and flags was sent with its data under the CRC.
pub fn data_crc_of(msg_type: u16, flags: u16) -> DataCrc {
    let off = match msg_type {
        TYPE_WRITE => flags & FLAG_WRITE_DATA_UNCHECKED != 0,
        TYPE_READ_REPLY => flags & FLAG_READ_REPLY_DATA_UNCHECKED != 0,
        _ => false,
    };
    if off {
        DataCrc::Off
    } else {
        DataCrc::On
    }
}

/// The flag that marks `msg`'s data as outside the CRC (0 for a message without data).
fn data_unchecked_flag(msg: &Message) -> u16 {
    match msg {
        Message::Write {
            kind: WriteKind::Data(_),
            ..
        } => FLAG_WRITE_DATA_UNCHECKED,
        Message::ReadReply { .. } => FLAG_READ_REPLY_DATA_UNCHECKED,
        _ => 0,
    }
}

/// Streaming frame decoder. Feed it the receive buffer; it consumes one
/// whole frame per decoded message and leaves partial frames in place.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: u32,
}

impl Decoder {
    /// A decoder refusing payloads longer than `max_payload` bytes
    /// ([`DEFAULT_MAX_PAYLOAD`] fits every message the daemon sends).
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Decodes the frame at the front of `buf`.
    ///
    /// - `Ok(None)`: the frame is not complete yet; nothing consumed (the
    ///   buffer may have been given capacity for the rest of the frame, once
    ///   its length was found acceptable).
    /// - `Ok(Some(msg))`: one frame consumed. Write and ReadReply data share
    ///   `buf`'s allocation (no copy).
    /// - `Err(BadMagic | TooLong | BadCrc)`: nothing consumed.
    /// - `Err(UnknownType | Malformed)`: the offending frame was consumed.
    ///
    /// After any error the stream is not trustworthy; drop the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        let Some((head_bytes, header)) = self.checked_header(buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        check_crc(&head_bytes, &header, &buf[HEADER_LEN..total])?;
        let mut payload = buf.split_to(total);
        payload.advance(HEADER_LEN);
        decode_payload(header.msg_type, header.flags, payload.freeze()).map(Some)
    }

    /// The header at the front of `buf`, once it is all there, with its magic
    /// and length checked.
    fn checked_header(
        &self,
        buf: &[u8],
    ) -> Result<Option<([u8; HEADER_LEN], FrameHeader)>, DecodeError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut head_bytes = [0u8; HEADER_LEN];
        head_bytes.copy_from_slice(head);
        let header = FrameHeader::parse(&head_bytes);
        if header.magic != FRAME_MAGIC {
            return Err(DecodeError::BadMagic(header.magic));
        }
        if header.len > self.max_payload {
            return Err(DecodeError::TooLong(header.len));
        }
        Ok(Some((head_bytes, header)))
    }

    /// For readers that take large frames into a buffer of their own instead of through the
    /// receive buffer: the total length (header and payload) of the frame at the front of
    /// `buf`, once its header is there. Errors as [`Decoder::decode`] (bad magic, too long).
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        Ok(self
            .checked_header(buf)?
            .map(|(_, header)| HEADER_LEN + header.len as usize))
    }

    /// Decodes one whole frame (exactly [`Decoder::frame_len`] bytes), checked like
    /// [`Decoder::decode`]; Write and ReadReply data share `frame`'s buffer.
    pub fn decode_frame(&mut self, frame: Bytes) -> Result<Message, DecodeError> {
        let mut buf = BytesMut::new();
        match self.frame_len(&frame)? {
            Some(total) if total == frame.len() => {}
            _ => {
                // Not exactly one frame: let the checks below report it as decode would.
                buf.extend_from_slice(&frame);
                return match self.decode(&mut buf)? {
                    Some(m) if buf.is_empty() => Ok(m),
                    _ => Err(DecodeError::Malformed {
                        msg_type: 0,
                        why: "not exactly one frame",
                    }),
                };
            }
        }
        let mut head_bytes = [0u8; HEADER_LEN];
        head_bytes.copy_from_slice(&frame[..HEADER_LEN]);
        let header = FrameHeader::parse(&head_bytes);
        check_crc(&head_bytes, &header, &frame[HEADER_LEN..])?;
        let mut payload = frame;
        payload.advance(HEADER_LEN);
        decode_payload(header.msg_type, header.flags, payload)
    }
}

/// The frame's CRC against header and payload (the part of it the CRC covers).
fn check_crc(
    head_bytes: &[u8; HEADER_LEN],
    header: &FrameHeader,
    payload: &[u8],
) -> Result<(), DecodeError> {
    let covered = crc_covered_len(header.msg_type, header.flags, payload.len());
    debug_assert!(covered <= payload.len());
    let got = frame_crc(head_bytes, &[&payload[..covered]]);
    if got != header.crc {
        return Err(DecodeError::BadCrc {
            expected: header.crc,
            got,
            msg_type: header.msg_type,
        });
    }
    Ok(())
}

/// Appends one whole frame for `msg` to `out`.
///
/// # Panics
/// If the payload would exceed [`DEFAULT_MAX_PAYLOAD`] (data blocks are at most
/// [`MAX_DATA_LEN`]; a bigger one is a bug in the caller). Senders of data use
/// [`encode_split`], which returns the error instead.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    encode_with(msg, out, DataCrc::On)
}

/// [`encode`] with the data under the CRC or not.
pub fn encode_with(msg: &Message, out: &mut BytesMut, data_crc: DataCrc) {
    match encode_split_with(msg, out, data_crc) {
        Ok(tail) => out.extend_from_slice(&tail),
        Err(e) => panic!("{e}"),
    }
}

/// A message too large for a frame any peer accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    pub msg_type: u16,
    pub payload_len: usize,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peer {} payload of {} bytes is over the {DEFAULT_MAX_PAYLOAD}-byte frame limit",
            type_name(self.msg_type),
            self.payload_len
        )
    }
}

impl std::error::Error for EncodeError {}

/// Zero-copy encoding: appends the frame header and the payload's fixed
/// fields to `out` and returns the bulk data tail (Write / ReadReply data,
/// a cheap reference-counted clone; empty for other messages). The caller
/// must send `out`'s new bytes immediately followed by the tail, e.g. with a
/// vectored write. A payload over [`DEFAULT_MAX_PAYLOAD`] (the peer's decoder
/// would refuse it) is an error, and `out` is left as it was.
pub fn encode_split(msg: &Message, out: &mut BytesMut) -> Result<Bytes, EncodeError> {
    encode_split_with(msg, out, DataCrc::On)
}

/// [`encode_split`] with the data under the CRC ([`DataCrc::On`]) or not: `Off` marks a Write
/// of data or a ReadReply with its data-unchecked flag and leaves the data out of the CRC (the
/// header and fixed fields stay covered); other messages are encoded as with `On`.
pub fn encode_split_with(
    msg: &Message,
    out: &mut BytesMut,
    data_crc: DataCrc,
) -> Result<Bytes, EncodeError> {
    let start = out.len();
    out.put_bytes(0, HEADER_LEN);
    let (msg_type, mut flags, tail) = put_fixed_fields(msg, out);
    let unchecked = match data_crc {
        DataCrc::On => 0,
        DataCrc::Off => data_unchecked_flag(msg),
    };
    debug_assert_eq!(flags & unchecked, 0);
    flags |= unchecked;
    let fixed_len = out.len() - start - HEADER_LEN;
    let payload_len = fixed_len + tail.len();
    let len = match u32::try_from(payload_len) {
        Ok(len) if len <= DEFAULT_MAX_PAYLOAD => len,
        _ => {
            out.truncate(start);
            return Err(EncodeError {
                msg_type,
                payload_len,
            });
        }
    };
    let mut header = FrameHeader {
        magic: FRAME_MAGIC,
        msg_type,
        flags,
        len,
        crc: 0,
    };
    let data: &[u8] = if unchecked == 0 { &tail } else { &[] };
    header.crc = frame_crc(&header.to_bytes(), &[&out[start + HEADER_LEN..], data]);
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    debug_assert_eq!(out.len() - start, HEADER_LEN + fixed_len);
    Ok(tail)
}

/// The message type code of `msg`.
pub fn msg_type(msg: &Message) -> u16 {
    match msg {
        Message::Hello(_) => TYPE_HELLO,
        Message::State { .. } => TYPE_STATE,
        Message::BitmapChunk { .. } => TYPE_BITMAP_CHUNK,
        Message::StartSync { .. } => TYPE_START_SYNC,
        Message::Write { .. } => TYPE_WRITE,
        Message::RecvAck { .. } => TYPE_RECV_ACK,
        Message::WriteAck { .. } => TYPE_WRITE_ACK,
        Message::Flush { .. } => TYPE_FLUSH,
        Message::FlushAck { .. } => TYPE_FLUSH_ACK,
        Message::ReadRequest { .. } => TYPE_READ_REQUEST,
        Message::ReadReply { .. } => TYPE_READ_REPLY,
        Message::ChecksumRequest { .. } => TYPE_CHECKSUM_REQUEST,
        Message::ChecksumReply { .. } => TYPE_CHECKSUM_REPLY,
        Message::SyncDone { .. } => TYPE_SYNC_DONE,
        Message::StartVerify => TYPE_START_VERIFY,
        Message::VerifyDone { .. } => TYPE_VERIFY_DONE,
        Message::SplitBrain => TYPE_SPLIT_BRAIN,
        Message::Ping => TYPE_PING,
        Message::PingAck => TYPE_PING_ACK,
        Message::Bye { .. } => TYPE_BYE,
    }
}

fn flag(on: bool, bit: u16) -> u16 {
    if on {
        bit
    } else {
        0
    }
}

fn put_gis(out: &mut BytesMut, gis: &Gis) {
    out.put_u64(gis.current);
    out.put_u64(gis.bitmap);
    out.put_u64(gis.history[0]);
    out.put_u64(gis.history[1]);
}

fn put_str(out: &mut BytesMut, s: &str) {
    let len = u32::try_from(s.len())
        .unwrap_or_else(|_| panic!("string of {} bytes in a peer message", s.len()));
    out.put_u32(len);
    out.put_slice(s.as_bytes());
}

/// Writes the payload's fixed fields; returns type, flags and bulk tail.
fn put_fixed_fields(msg: &Message, out: &mut BytesMut) -> (u16, u16, Bytes) {
    let ty = msg_type(msg);
    let mut flags = 0u16;
    let mut tail = Bytes::new();
    match msg {
        Message::Hello(h) => {
            flags = flag(h.two_primaries, FLAG_HELLO_TWO_PRIMARIES)
                | flag(h.crashed_primary, FLAG_HELLO_CRASHED_PRIMARY)
                | flag(h.discard_my_data, FLAG_HELLO_DISCARD_MY_DATA)
                | flag(h.peer_may_lack, FLAG_HELLO_PEER_MAY_LACK);
            out.put_u32(h.version);
            out.put_u64(h.data_size);
            out.put_u8(h.protocol);
            out.put_u8(h.role as u8);
            out.put_u8(h.disk as u8);
            put_gis(out, &h.gis);
            out.put_u64(h.out_of_sync_blocks);
            put_str(out, &h.resource);
            put_str(out, &h.node);
        }
        Message::State { role, disk } => {
            out.put_u8(*role as u8);
            out.put_u8(*disk as u8);
        }
        Message::BitmapChunk {
            first_word,
            words,
            last,
        } => {
            flags = flag(*last, FLAG_BITMAP_LAST);
            out.reserve(8 + words.len() * 8);
            out.put_u64(*first_word);
            for w in words {
                out.put_u64(*w);
            }
        }
        Message::StartSync { mode, source_gis } => {
            out.put_u8(sync_mode_code(*mode));
            put_gis(out, source_gis);
        }
        Message::Write {
            seq,
            seen,
            offset,
            kind,
            fua,
            resync,
        } => {
            flags = flag(*fua, FLAG_WRITE_FUA) | flag(*resync, FLAG_WRITE_RESYNC);
            out.put_u64(*seq);
            out.put_u64(*seen);
            out.put_u64(*offset);
            match kind {
                WriteKind::Data(data) => {
                    out.put_u8(WRITE_KIND_DATA);
                    tail = data.clone();
                }
                WriteKind::Trim { len } => {
                    out.put_u8(WRITE_KIND_TRIM);
                    out.put_u32(*len);
                }
                WriteKind::Zeroes { len, may_trim } => {
                    flags |= flag(*may_trim, FLAG_WRITE_MAY_TRIM);
                    out.put_u8(WRITE_KIND_ZEROES);
                    out.put_u32(*len);
                }
            }
        }
        Message::RecvAck { seq } => out.put_u64(*seq),
        Message::WriteAck { seq: id, error } | Message::FlushAck { id, error } => {
            out.put_u64(*id);
            out.put_u32(*error);
        }
        Message::Flush { id } => out.put_u64(*id),
        Message::ReadRequest { id, offset, len } => {
            out.put_u64(*id);
            out.put_u64(*offset);
            out.put_u32(*len);
        }
        Message::ReadReply { id, error, data } => {
            out.put_u64(*id);
            out.put_u32(*error);
            tail = data.clone();
        }
        Message::ChecksumRequest {
            id,
            offset,
            len,
            verify,
        } => {
            flags = flag(*verify, FLAG_CHECKSUM_VERIFY);
            out.put_u64(*id);
            out.put_u64(*offset);
            out.put_u32(*len);
        }
        Message::ChecksumReply { id, error, sums } => {
            out.reserve(12 + sums.len() * 4);
            out.put_u64(*id);
            out.put_u32(*error);
            for s in sums {
                out.put_u32(*s);
            }
        }
        Message::SyncDone { source_gis } => put_gis(out, source_gis),
        Message::VerifyDone { differing_blocks } => out.put_u64(*differing_blocks),
        Message::StartVerify | Message::SplitBrain | Message::Ping | Message::PingAck => {}
        Message::Bye { reason } => out.put_slice(reason.as_bytes()),
    }
    (ty, flags, tail)
}

fn sync_mode_code(mode: SyncMode) -> u8 {
    match mode {
        SyncMode::None => 0,
        SyncMode::Bitmap => 1,
        SyncMode::Full => 2,
    }
}

/// A bounds-checked reader over a payload's fixed fields.
struct Reader<'a> {
    rest: &'a [u8],
}

const SHORT: &str = "payload ends inside a field";

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or(SHORT)?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn gis(&mut self) -> Result<Gis, &'static str> {
        Ok(Gis {
            current: self.u64()?,
            bitmap: self.u64()?,
            history: [self.u64()?, self.u64()?],
        })
    }

    fn string(&mut self) -> Result<String, &'static str> {
        let len = self.u32()? as usize;
        if len > self.rest.len() {
            return Err("string length runs past the payload");
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
    }

    fn role(&mut self) -> Result<PeerRole, &'static str> {
        match self.u8()? {
            1 => Ok(PeerRole::Primary),
            2 => Ok(PeerRole::Secondary),
            _ => Err("unknown role code"),
        }
    }

    fn disk(&mut self) -> Result<PeerDisk, &'static str> {
        match self.u8()? {
            1 => Ok(PeerDisk::UpToDate),
            2 => Ok(PeerDisk::Inconsistent),
            3 => Ok(PeerDisk::Outdated),
            4 => Ok(PeerDisk::Failed),
            5 => Ok(PeerDisk::Diskless),
            _ => Err("unknown disk state code"),
        }
    }

    fn sync_mode(&mut self) -> Result<SyncMode, &'static str> {
        match self.u8()? {
            0 => Ok(SyncMode::None),
            1 => Ok(SyncMode::Bitmap),
            2 => Ok(SyncMode::Full),
            _ => Err("unknown sync mode code"),
        }
    }

    /// Requires that every byte was read.
    fn finish(&self) -> Result<(), &'static str> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes after the last field")
        }
    }
}

/// The flag bits a type may carry.
fn allowed_flags(msg_type: u16) -> u16 {
    match msg_type {
        TYPE_HELLO => {
            FLAG_HELLO_TWO_PRIMARIES
                | FLAG_HELLO_CRASHED_PRIMARY
                | FLAG_HELLO_DISCARD_MY_DATA
                | FLAG_HELLO_PEER_MAY_LACK
        }
        TYPE_BITMAP_CHUNK => FLAG_BITMAP_LAST,
        TYPE_WRITE => {
            FLAG_WRITE_FUA | FLAG_WRITE_RESYNC | FLAG_WRITE_MAY_TRIM | FLAG_WRITE_DATA_UNCHECKED
        }
        TYPE_READ_REPLY => FLAG_READ_REPLY_DATA_UNCHECKED,
        TYPE_CHECKSUM_REQUEST => FLAG_CHECKSUM_VERIFY,
        _ => 0,
    }
}

fn decode_payload(msg_type: u16, flags: u16, payload: Bytes) -> Result<Message, DecodeError> {
    if !is_known_type(msg_type) {
        return Err(DecodeError::UnknownType(msg_type));
    }
    let malformed = |why| DecodeError::Malformed { msg_type, why };
    if flags & !allowed_flags(msg_type) != 0 {
        return Err(malformed("unknown flag bits for this type"));
    }
    parse_payload(msg_type, flags, payload).map_err(malformed)
}

fn parse_payload(msg_type: u16, flags: u16, mut payload: Bytes) -> Result<Message, &'static str> {
    let has = |bit: u16| flags & bit != 0;
    let mut r = Reader { rest: &payload[..] };
    let msg = match msg_type {
        TYPE_HELLO => {
            let version = r.u32()?;
            let data_size = r.u64()?;
            let protocol = r.u8()?;
            let role = r.role()?;
            let disk = r.disk()?;
            let gis = r.gis()?;
            let out_of_sync_blocks = r.u64()?;
            let resource = r.string()?;
            let node = r.string()?;
            Message::Hello(Hello {
                version,
                resource,
                node,
                data_size,
                protocol,
                two_primaries: has(FLAG_HELLO_TWO_PRIMARIES),
                role,
                disk,
                gis,
                crashed_primary: has(FLAG_HELLO_CRASHED_PRIMARY),
                peer_may_lack: has(FLAG_HELLO_PEER_MAY_LACK),
                out_of_sync_blocks,
                discard_my_data: has(FLAG_HELLO_DISCARD_MY_DATA),
            })
        }
        TYPE_STATE => Message::State {
            role: r.role()?,
            disk: r.disk()?,
        },
        TYPE_BITMAP_CHUNK => {
            let first_word = r.u64()?;
            if r.rest.len() % 8 != 0 {
                return Err("bitmap words are not a multiple of 8 bytes");
            }
            let mut words = Vec::with_capacity(r.rest.len() / 8);
            while !r.rest.is_empty() {
                words.push(r.u64()?);
            }
            Message::BitmapChunk {
                first_word,
                words,
                last: has(FLAG_BITMAP_LAST),
            }
        }
        TYPE_START_SYNC => Message::StartSync {
            mode: r.sync_mode()?,
            source_gis: r.gis()?,
        },
        TYPE_WRITE => {
            let seq = r.u64()?;
            let seen = r.u64()?;
            let offset = r.u64()?;
            let kind_code = r.u8()?;
            if kind_code != WRITE_KIND_ZEROES && has(FLAG_WRITE_MAY_TRIM) {
                return Err("may-trim flag on a write that is not of zeroes");
            }
            if kind_code != WRITE_KIND_DATA && has(FLAG_WRITE_DATA_UNCHECKED) {
                return Err("data-unchecked flag on a write without data");
            }
            let kind = match kind_code {
                WRITE_KIND_DATA => {
                    debug_assert_eq!(payload.len() - r.rest.len(), WRITE_PREFIX_LEN);
                    payload.advance(WRITE_PREFIX_LEN);
                    WriteKind::Data(payload)
                }
                WRITE_KIND_TRIM => {
                    let len = r.u32()?;
                    r.finish()?;
                    WriteKind::Trim { len }
                }
                WRITE_KIND_ZEROES => {
                    let len = r.u32()?;
                    r.finish()?;
                    WriteKind::Zeroes {
                        len,
                        may_trim: has(FLAG_WRITE_MAY_TRIM),
                    }
                }
                _ => return Err("unknown write kind"),
            };
            return Ok(Message::Write {
                seq,
                seen,
                offset,
                kind,
                fua: has(FLAG_WRITE_FUA),
                resync: has(FLAG_WRITE_RESYNC),
            });
        }
        TYPE_RECV_ACK => Message::RecvAck { seq: r.u64()? },
        TYPE_WRITE_ACK => Message::WriteAck {
            seq: r.u64()?,
            error: r.u32()?,
        },
        TYPE_FLUSH => Message::Flush { id: r.u64()? },
        TYPE_FLUSH_ACK => Message::FlushAck {
            id: r.u64()?,
            error: r.u32()?,
        },
        TYPE_READ_REQUEST => Message::ReadRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        TYPE_READ_REPLY => {
            let id = r.u64()?;
            let error = r.u32()?;
            debug_assert_eq!(payload.len() - r.rest.len(), READ_REPLY_PREFIX_LEN);
            payload.advance(READ_REPLY_PREFIX_LEN);
            return Ok(Message::ReadReply {
                id,
                error,
                data: payload,
            });
        }
        TYPE_CHECKSUM_REQUEST => Message::ChecksumRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
            verify: has(FLAG_CHECKSUM_VERIFY),
        },
        TYPE_CHECKSUM_REPLY => {
            let id = r.u64()?;
            let error = r.u32()?;
            if r.rest.len() % 4 != 0 {
                return Err("checksums are not a multiple of 4 bytes");
            }
            let mut sums = Vec::with_capacity(r.rest.len() / 4);
            while !r.rest.is_empty() {
                sums.push(r.u32()?);
            }
            Message::ChecksumReply { id, error, sums }
        }
        TYPE_SYNC_DONE => Message::SyncDone {
            source_gis: r.gis()?,
        },
        TYPE_VERIFY_DONE => Message::VerifyDone {
            differing_blocks: r.u64()?,
        },
        TYPE_START_VERIFY => Message::StartVerify,
        TYPE_SPLIT_BRAIN => Message::SplitBrain,
        TYPE_PING => Message::Ping,
        TYPE_PING_ACK => Message::PingAck,
        TYPE_BYE => {
            let reason = std::str::from_utf8(r.rest).map_err(|_| "reason is not UTF-8")?;
            let reason = reason.to_owned();
            r.rest = &[];
            Message::Bye { reason }
        }
        _ => return Err("unknown message type"),
    };
    r.finish()?;
    Ok(msg)
}
