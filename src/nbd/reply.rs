//! Transmission-phase reply encoders: simple replies and structured reply
//! chunks. Encoders for data-carrying replies write only the header, so
//! the caller can send the data buffer separately (vectored write).

use bytes::BufMut;
use bytes::BytesMut;

use super::consts::*;
use super::handshake::truncate_str;
use super::request::Command;

/// Largest data length one `NBD_REPLY_TYPE_OFFSET_DATA` chunk can carry
/// (its length field also covers the 8-byte offset).
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// Size of the bytes `chunk_offset_data_header` writes.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// Simple reply header ("Simple reply message"): magic, error, cookie. For
/// a successful READ without structured replies the caller sends the
/// *length* bytes of data right after it; on error, no data follows.
pub fn simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.reserve(SIMPLE_REPLY_LEN);
    out.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Structured reply chunk header ("Structured reply chunk message").
fn chunk_header(out: &mut BytesMut, cookie: u64, chunk_type: u16, length: u32, done: bool) {
    out.reserve(STRUCTURED_HEADER_LEN);
    out.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    out.put_u16(if done { NBD_REPLY_FLAG_DONE } else { 0 });
    out.put_u16(chunk_type);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (chunk header plus the
/// 64-bit offset); the caller sends `data_len` bytes of data after it.
/// `data_len` must be in `1..=MAX_OFFSET_DATA_LEN` ("*length* MUST be at
/// least 9"); a READ of length 0 is answered with `chunk_none` instead.
pub fn chunk_offset_data_header(
    out: &mut BytesMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    debug_assert!(data_len >= 1, "OFFSET_DATA must carry at least one byte");
    debug_assert!(data_len <= MAX_OFFSET_DATA_LEN, "OFFSET_DATA too long");
    let length = data_len.saturating_add(8);
    chunk_header(out, cookie, NBD_REPLY_TYPE_OFFSET_DATA, length, done);
    out.put_u64(offset);
}

/// `NBD_REPLY_TYPE_NONE`: the final chunk of a successful reply ("This
/// chunk type MUST always be used with the NBD_REPLY_FLAG_DONE bit set").
pub fn chunk_none(out: &mut BytesMut, cookie: u64) {
    chunk_header(out, cookie, NBD_REPLY_TYPE_NONE, 0, true);
}

/// `NBD_REPLY_TYPE_ERROR` with a human-readable message. `error` must be
/// nonzero; the message is cut to 4096 bytes ("*message length* MUST NOT
/// exceed the 4096 bytes string length limit").
pub fn chunk_error(out: &mut BytesMut, cookie: u64, error: u32, message: &str, done: bool) {
    debug_assert!(error != 0, "an error chunk needs a nonzero error");
    let message = truncate_str(message, NBD_MAX_STRING);
    // message.len() <= 4096, so both casts are exact.
    let length = 6 + message.len() as u32;
    chunk_header(out, cookie, NBD_REPLY_TYPE_ERROR, length, done);
    out.reserve(length as usize);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

/// Largest number of extents one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk can
/// carry (its 32-bit length covers 4 + 8 per extent).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = ((u32::MAX - 4) / 8) as usize;

/// `NBD_REPLY_TYPE_BLOCK_STATUS` for one metadata context: extents as
/// (length, status flags). There must be at least one extent and every
/// length must be nonzero ("a list of one or more descriptors", "MUST be
/// nonzero").
pub fn chunk_block_status(
    out: &mut BytesMut,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    debug_assert!(
        !extents.is_empty(),
        "block status needs at least one extent"
    );
    debug_assert!(extents.len() <= MAX_BLOCK_STATUS_EXTENTS);
    debug_assert!(
        extents.iter().all(|&(len, _)| len != 0),
        "zero-length extent"
    );
    let extents = &extents[..extents.len().min(MAX_BLOCK_STATUS_EXTENTS)];
    let length = 4 + 8 * extents.len() as u32;
    chunk_header(out, cookie, NBD_REPLY_TYPE_BLOCK_STATUS, length, done);
    out.reserve(length as usize);
    out.put_u32(context_id);
    for &(len, flags) in extents {
        out.put_u32(len);
        out.put_u32(flags);
    }
}

/// One reply: simple, or structured for READ and BLOCK_STATUS when structured replies were
/// negotiated.
/// `data_len`: the READ data that follows (written by the caller).
pub fn encode_reply(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    command: Command,
    offset: u64,
    error: u32,
    data_len: Option<usize>,
) {
    let structured_read = structured && matches!(command, Command::Read | Command::BlockStatus);
    if !structured_read {
        simple_reply(out, cookie, error);
        return;
    }
    if error != 0 {
        chunk_error(out, cookie, error, "", true);
        return;
    }
    match data_len {
        Some(n) if n > 0 => chunk_offset_data_header(out, cookie, offset, n as u32, true),
        _ => chunk_none(out, cookie),
    }
}
