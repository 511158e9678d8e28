//! Tests for the peer module, split by topic.

mod auth_tests;
mod codec_tests;
mod prop_tests;
mod support;
