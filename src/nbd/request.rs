//! Transmission-phase requests: the command set and a streaming decoder.
//!
//! The decoder only frames the stream (header, and a WRITE's payload); it
//! does not judge whether a request is allowed. That is `validate`'s job,
//! so every request that can be framed gets an answer with the right
//! errno and the stream stays in sync.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use super::consts::*;

pub use super::validate::validate;

/// Longest WRITE payload read and discarded (answered with `Oversized`)
/// instead of disconnecting. Spec, Block size constraints: "either the
/// server or the client MAY initiate a hard disconnect if the payload of an
/// NBD_CMD_WRITE request ... would be large enough to be deemed a denial
/// of service attack; however, for maximum portability, any *length* less
/// than 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
/// service attack (even if the advertised maximum block size is smaller)".
/// We discard anything up to twice that floor, without buffering it, and
/// disconnect above it.
pub const MAX_DISCARD_PAYLOAD: u32 = 2 * NBD_DOS_PAYLOAD_FLOOR;

/// A request type ("Request types").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Disc,
    Cache,
    BlockStatus,
    /// A type this implementation does not know. It has no payload (only
    /// NBD_CMD_WRITE is followed by data).
    Unknown(u16),
}

impl Command {
    pub fn from_u16(code: u16) -> Self {
        match code {
            NBD_CMD_READ => Self::Read,
            NBD_CMD_WRITE => Self::Write,
            NBD_CMD_DISC => Self::Disc,
            NBD_CMD_FLUSH => Self::Flush,
            NBD_CMD_TRIM => Self::Trim,
            NBD_CMD_CACHE => Self::Cache,
            NBD_CMD_WRITE_ZEROES => Self::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Self::Read => NBD_CMD_READ,
            Self::Write => NBD_CMD_WRITE,
            Self::Disc => NBD_CMD_DISC,
            Self::Flush => NBD_CMD_FLUSH,
            Self::Trim => NBD_CMD_TRIM,
            Self::Cache => NBD_CMD_CACHE,
            Self::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Self::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Self::Unknown(code) => code,
        }
    }
}

/// One request header ("Request message"). `cookie` is the spec's
/// "handle", echoed in every reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// One decoded unit of the request stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A request; `payload` holds the WRITE data and is empty otherwise.
    Request { req: Request, payload: Bytes },
    /// A WRITE whose payload exceeded `max_write_payload`; the payload was
    /// read and discarded. Answer it with `NBD_EINVAL` ("The server SHOULD
    /// report an NBD_EINVAL error if ... [the request] is larger than the
    /// advertised maximum block size").
    Oversized { req: Request },
}

/// A fatal framing error: the connection must be closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The request did not start with `NBD_REQUEST_MAGIC`; the stream
    /// cannot be resynchronised.
    BadMagic(u32),
    /// A WRITE claimed more payload than we are willing to even discard.
    WriteTooLarge { length: u32, limit: u32 },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(magic) => {
                write!(f, "client sent a request with bad magic {magic:#010x}")
            }
            Self::WriteTooLarge { length, limit } => write!(
                f,
                "client sent a write of {length} bytes, above the {limit} byte limit"
            ),
        }
    }
}

impl std::error::Error for ProtocolError {}

#[derive(Clone, Copy, Debug)]
enum DecoderState {
    Header,
    /// Discarding the payload of an oversized WRITE.
    Discard {
        req: Request,
        remaining: u32,
    },
}

/// Streaming request decoder. Feed it the receive buffer; it takes whole
/// requests off the front and leaves partial ones in place.
#[derive(Debug)]
pub struct RequestDecoder {
    max_write_payload: u32,
    state: DecoderState,
}

impl RequestDecoder {
    /// `max_write_payload`: the longest WRITE payload that is buffered and
    /// returned; normally the export's maximum block size.
    pub fn new(max_write_payload: u32) -> Self {
        Self {
            max_write_payload,
            state: DecoderState::Header,
        }
    }

    /// Takes the next request off `buf`. `Ok(None)` means more bytes are
    /// needed (the decoder may have consumed some, when discarding).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, ProtocolError> {
        if let DecoderState::Discard { req, remaining } = self.state {
            let n = (remaining as usize).min(buf.len());
            buf.advance(n);
            let remaining = remaining - n as u32;
            if remaining > 0 {
                self.state = DecoderState::Discard { req, remaining };
                return Ok(None);
            }
            self.state = DecoderState::Header;
            return Ok(Some(Decoded::Oversized { req }));
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let req = parse_header(&buf[..REQUEST_HEADER_LEN])?;
        if req.command != Command::Write {
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some(Decoded::Request {
                req,
                payload: Bytes::new(),
            }));
        }
        if req.length > self.max_write_payload {
            if req.length > MAX_DISCARD_PAYLOAD {
                return Err(ProtocolError::WriteTooLarge {
                    length: req.length,
                    limit: MAX_DISCARD_PAYLOAD,
                });
            }
            buf.advance(REQUEST_HEADER_LEN);
            self.state = DecoderState::Discard {
                req,
                remaining: req.length,
            };
            return self.decode(buf);
        }
        let total = REQUEST_HEADER_LEN + req.length as usize;
        if buf.len() < total {
            // Bounded by max_write_payload, which the caller chose.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_LEN);
        let payload = buf.split_to(req.length as usize).freeze();
        Ok(Some(Decoded::Request { req, payload }))
    }
}

impl RequestDecoder {
    /// For callers that read large WRITE payloads straight into a buffer of their own instead
    /// of through `buf`: if the next request in `buf` is a WRITE whose payload is at least
    /// `min_len` bytes, at most `max_write_payload`, and not yet entirely in `buf`, consumes
    /// its header and returns it. The caller must then take exactly `req.length` payload
    /// bytes, first from the front of `buf`, the rest from the stream, before decoding on.
    /// Otherwise consumes nothing and returns None (call [`RequestDecoder::decode`]).
    pub fn take_large_write(&mut self, buf: &mut BytesMut, min_len: u32) -> Option<Request> {
        if !matches!(self.state, DecoderState::Header) || buf.len() < REQUEST_HEADER_LEN {
            return None;
        }
        let req = parse_header(&buf[..REQUEST_HEADER_LEN]).ok()?;
        let wanted = req.command == Command::Write
            && req.length >= min_len
            && req.length <= self.max_write_payload
            && buf.len() < REQUEST_HEADER_LEN + req.length as usize;
        if !wanted {
            return None;
        }
        buf.advance(REQUEST_HEADER_LEN);
        Some(req)
    }
}

impl RequestDecoder {
    /// How many more bytes complete the request at the front of `buf`: 0 when `buf` holds
    /// a whole request (decode it) or nothing at all (a request boundary, when
    /// [`RequestDecoder::at_boundary`]). For a reader that must stop between requests: it
    /// reads exactly this much, never into the next request.
    pub fn missing(&self, buf: &[u8]) -> usize {
        if let DecoderState::Discard { remaining, .. } = self.state {
            return (remaining as usize).saturating_sub(buf.len());
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return if buf.is_empty() {
                0
            } else {
                REQUEST_HEADER_LEN - buf.len()
            };
        }
        match parse_header(&buf[..REQUEST_HEADER_LEN]) {
            Ok(req) if req.command == Command::Write && req.length <= MAX_DISCARD_PAYLOAD => {
                (REQUEST_HEADER_LEN + req.length as usize).saturating_sub(buf.len())
            }
            _ => 0,
        }
    }

    /// Nothing of a request is buffered or half-consumed.
    pub fn at_boundary(&self, buf: &[u8]) -> bool {
        matches!(self.state, DecoderState::Header) && buf.is_empty()
    }
}

/// Parses a 28-byte request header.
fn parse_header(mut h: &[u8]) -> Result<Request, ProtocolError> {
    debug_assert_eq!(h.len(), REQUEST_HEADER_LEN);
    let magic = h.get_u32();
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let flags = h.get_u16();
    let command = Command::from_u16(h.get_u16());
    let cookie = h.get_u64();
    let offset = h.get_u64();
    let length = h.get_u32();
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}
