//! Tests for the nbd module, split by topic.

mod handshake_tests;
mod prop_tests;
mod reply_tests;
mod request_tests;
mod support;
mod validate_tests;
