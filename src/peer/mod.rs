//! The peer wire protocol, sans-IO: message types, framing with CRC32, and the
//! mutual HMAC authentication that precedes every other message.

pub mod auth;
pub mod codec;
pub mod frame;
pub mod message;

pub use auth::{
    AuthError, AuthStep, Authenticator, Endpoints, SESSION_BINDING_LEN, TLS_EXPORTER_LABEL,
};
pub use codec::{
    crc_covered_len, data_crc_of, encode, encode_split, encode_split_with, encode_with, msg_type,
    DataCrc, Decoder, EncodeError,
};
pub use frame::{DecodeError, DEFAULT_MAX_PAYLOAD, MAX_DATA_LEN};
pub use message::*;

#[cfg(test)]
mod tests;
