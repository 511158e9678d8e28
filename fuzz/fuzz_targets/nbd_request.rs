//! Feeds arbitrary bytes to the NBD request decoder (in chunks the input
//! chooses), validates every decoded request and encodes a reply for it.
//! Must never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_mirror::nbd::consts::*;
use nbd_mirror::nbd::{
    chunk_error, chunk_none, simple_reply, transmission_flags, validate, Decoded, ExportInfo,
    Negotiated, RequestDecoder,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, data) = data.split_at(4);
    let chunk = usize::from(head[0]).max(1);
    let max_write = u32::from(head[1]) * 64;
    let structured = head[2] & 1 != 0;
    let neg = Negotiated {
        export: ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: u64::from(head[3]) * 4096,
            flags: transmission_flags(head[2] & 2 != 0) | u16::from(head[2] & 0x80),
            min_block: 1 << (head[2] >> 4 & 0x7),
            preferred_block: 4096,
            max_block: max_write.max(128),
        },
        structured_replies: structured,
        base_allocation_context: (head[2] & 4 != 0).then_some(1),
    };
    let mut dec = RequestDecoder::new(max_write);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    'outer: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        // Each decoded item consumes at least one header.
        for _ in 0..(buf.len() + 2) {
            let decoded = match dec.decode(&mut buf) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(_) => break 'outer,
            };
            let (req, errno) = match decoded {
                Decoded::Request { req, .. } => (req, validate(&req, &neg).err().unwrap_or(0)),
                Decoded::Oversized { req } => (req, NBD_EINVAL),
            };
            if structured {
                if errno == 0 {
                    chunk_none(&mut out, req.cookie);
                } else {
                    chunk_error(&mut out, req.cookie, errno, "refused", true);
                }
            } else {
                simple_reply(&mut out, req.cookie, errno);
            }
            out.clear();
        }
    }
});
