//! Minimal client-side encoders and decoders, for tests and tools that
//! talk to our server. Not a client implementation: no state machine.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::consts::*;
use super::request::Request;

/// Appends the client flags that answer the greeting.
pub fn put_client_flags(out: &mut BytesMut, flags: u32) {
    out.put_u32(flags);
}

/// Appends one option (`IHAVEOPT`, option, length, data).
pub fn put_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(NBD_IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Data of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
pub fn info_request_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        v.extend_from_slice(&info.to_be_bytes());
    }
    v
}

/// Data of an `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_request_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Appends a request header and, for a WRITE, its payload.
pub fn put_request(out: &mut BytesMut, req: &Request, payload: &[u8]) {
    out.put_u32(NBD_REQUEST_MAGIC);
    out.put_u16(req.flags);
    out.put_u16(req.command.to_u16());
    out.put_u64(req.cookie);
    out.put_u64(req.offset);
    out.put_u32(req.length);
    out.put_slice(payload);
}

/// Takes the 18-byte newstyle greeting; returns the handshake flags.
pub fn take_greeting(buf: &mut BytesMut) -> Result<Option<u16>, String> {
    if buf.len() < 18 {
        return Ok(None);
    }
    let magic = buf.get_u64();
    let ihaveopt = buf.get_u64();
    if magic != NBD_MAGIC || ihaveopt != NBD_IHAVEOPT {
        return Err(format!("bad greeting {magic:#x} {ihaveopt:#x}"));
    }
    Ok(Some(buf.get_u16()))
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Bytes,
}

/// Takes one complete option reply off `buf`.
pub fn take_option_reply(buf: &mut BytesMut) -> Result<Option<OptionReply>, String> {
    if buf.len() < OPTION_REPLY_HEADER_LEN {
        return Ok(None);
    }
    let mut h = &buf[..OPTION_REPLY_HEADER_LEN];
    let magic = h.get_u64();
    if magic != NBD_REP_MAGIC {
        return Err(format!("bad option reply magic {magic:#x}"));
    }
    let option = h.get_u32();
    let reply_type = h.get_u32();
    let len = h.get_u32() as usize;
    if buf.len() < OPTION_REPLY_HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(OPTION_REPLY_HEADER_LEN);
    let data = buf.split_to(len).freeze();
    Ok(Some(OptionReply {
        option,
        reply_type,
        data,
    }))
}

/// One transmission reply: a simple reply header (any READ data stays in
/// the buffer, since its length is only known from the request), or a
/// whole structured chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        payload: Bytes,
    },
}

/// Takes one reply header (simple) or whole chunk (structured) off `buf`.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<Reply>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    match magic {
        NBD_SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_LEN {
                return Ok(None);
            }
            buf.advance(4);
            let error = buf.get_u32();
            let cookie = buf.get_u64();
            Ok(Some(Reply::Simple { error, cookie }))
        }
        NBD_STRUCTURED_REPLY_MAGIC => {
            if buf.len() < STRUCTURED_HEADER_LEN {
                return Ok(None);
            }
            let mut h = &buf[4..STRUCTURED_HEADER_LEN];
            let flags = h.get_u16();
            let chunk_type = h.get_u16();
            let cookie = h.get_u64();
            let len = h.get_u32() as usize;
            if buf.len() < STRUCTURED_HEADER_LEN + len {
                return Ok(None);
            }
            buf.advance(STRUCTURED_HEADER_LEN);
            let payload = buf.split_to(len).freeze();
            Ok(Some(Reply::Chunk {
                flags,
                chunk_type,
                cookie,
                payload,
            }))
        }
        other => Err(format!("bad reply magic {other:#x}")),
    }
}
