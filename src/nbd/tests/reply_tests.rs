//! Reply encoders: exact bytes, and decoding with the client helpers.

use bytes::{Buf, BytesMut};

use crate::nbd::client::{take_reply, Reply};
use crate::nbd::consts::*;
use crate::nbd::reply::OFFSET_DATA_HEADER_LEN;
use crate::nbd::{
    chunk_block_status, chunk_error, chunk_none, chunk_offset_data_header, simple_reply,
};

#[test]
fn simple_reply_bytes() {
    let mut out = BytesMut::new();
    simple_reply(&mut out, 0x0102_0304_0506_0708, NBD_EIO);
    assert_eq!(
        &out[..],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
    );
}

#[test]
fn offset_data_header_bytes() {
    let mut out = BytesMut::new();
    chunk_offset_data_header(&mut out, 9, 0x1000, 512, true);
    assert_eq!(out.len(), OFFSET_DATA_HEADER_LEN);
    assert_eq!(
        &out[..],
        &[
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 1, // DONE
            0, 1, // OFFSET_DATA
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 2, 8, // length 512 + 8
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset
        ]
    );
    // With the data appended the client sees one whole chunk.
    out.extend_from_slice(&[0xab; 512]);
    match take_reply(&mut out) {
        Ok(Some(Reply::Chunk {
            flags,
            chunk_type,
            cookie,
            payload,
        })) => {
            assert_eq!(
                (flags, chunk_type, cookie),
                (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 9)
            );
            assert_eq!(payload.len(), 520);
            assert!(payload[8..].iter().all(|&b| b == 0xab));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(out.is_empty());
}

#[test]
fn none_chunk_always_done() {
    let mut out = BytesMut::new();
    chunk_none(&mut out, 77);
    assert_eq!(
        take_reply(&mut out),
        Ok(Some(Reply::Chunk {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: NBD_REPLY_TYPE_NONE,
            cookie: 77,
            payload: bytes::Bytes::new()
        }))
    );
}

#[test]
fn error_chunk_layout_and_message_cut() {
    let mut out = BytesMut::new();
    chunk_error(&mut out, 5, NBD_EINVAL, "bad flags", false);
    match take_reply(&mut out) {
        Ok(Some(Reply::Chunk {
            flags,
            chunk_type,
            cookie,
            mut payload,
        })) => {
            assert_eq!((flags, chunk_type, cookie), (0, NBD_REPLY_TYPE_ERROR, 5));
            assert_eq!(payload.get_u32(), NBD_EINVAL);
            assert_eq!(payload.get_u16(), 9);
            assert_eq!(&payload[..], b"bad flags");
        }
        other => panic!("unexpected {other:?}"),
    }
    let long = "ü".repeat(3000); // 6000 bytes
    chunk_error(&mut out, 5, NBD_EIO, &long, true);
    match take_reply(&mut out) {
        Ok(Some(Reply::Chunk {
            mut payload, flags, ..
        })) => {
            assert_eq!(flags, NBD_REPLY_FLAG_DONE);
            assert_eq!(payload.get_u32(), NBD_EIO);
            assert_eq!(payload.get_u16(), 4096);
            assert_eq!(payload.len(), 4096);
            assert!(std::str::from_utf8(&payload).is_ok());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn block_status_chunk_layout() {
    let mut out = BytesMut::new();
    chunk_block_status(
        &mut out,
        3,
        1,
        &[(4096, NBD_STATE_HOLE | NBD_STATE_ZERO), (512, 0)],
        true,
    );
    assert_eq!(out.len(), STRUCTURED_HEADER_LEN + 4 + 16);
    match take_reply(&mut out) {
        Ok(Some(Reply::Chunk {
            flags,
            chunk_type,
            cookie,
            mut payload,
        })) => {
            assert_eq!(
                (flags, chunk_type, cookie),
                (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 3)
            );
            assert_eq!(payload.get_u32(), 1);
            assert_eq!((payload.get_u32(), payload.get_u32()), (4096, 3));
            assert_eq!((payload.get_u32(), payload.get_u32()), (512, 0));
            assert!(payload.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
}
