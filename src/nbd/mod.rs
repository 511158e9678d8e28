//! The NBD protocol, sans-IO, server side. Self-contained: depends only on
//! `bytes` and std, like a vendored library.
//!
//! - `consts`: every magic, code, flag and errno of the protocol.
//! - `handshake`: the fixed newstyle handshake state machine.
//! - `request`: request decoding (and `validate`, in `validate.rs`).
//! - `reply`: simple and structured reply encoders.
//! - `client`: minimal client-side encoders/decoders for tests and tools.
//!
//! Spec: `doc/proto.md` of the NetworkBlockDevice/nbd repository; comments
//! quote it by section name.

pub mod client;
pub mod consts;
pub mod export;
pub mod handshake;
mod options;
pub mod reply;
pub mod request;
mod validate;

#[cfg(test)]
mod tests;

pub use export::{transmission_flags, ExportInfo};
pub use handshake::{
    ExportQuery, HandshakeError, HandshakeOptions, HandshakeStep, Negotiated, ServerHandshake,
};
pub use reply::{
    chunk_block_status, chunk_error, chunk_none, chunk_offset_data_header, encode_reply,
    simple_reply,
};
pub use request::{validate, Command, Decoded, ProtocolError, Request, RequestDecoder};
