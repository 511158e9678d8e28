//! Shared helpers for the nbd tests: a scripted handshake driver.

use bytes::BytesMut;

use crate::nbd::client::{take_greeting, take_option_reply, OptionReply};
use crate::nbd::consts::*;
use crate::nbd::{
    ExportInfo, ExportQuery, HandshakeError, HandshakeOptions, HandshakeStep, ServerHandshake,
};

pub fn export(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.to_string(),
        description: format!("{name} description"),
        size: 1 << 30,
        flags: crate::nbd::transmission_flags(false),
        min_block: 512,
        preferred_block: 4096,
        max_block: 1 << 25,
    }
}

pub fn options() -> HandshakeOptions {
    HandshakeOptions {
        exports: vec![
            ("disk".to_string(), "the disk".to_string()),
            ("other".to_string(), String::new()),
        ],
        allow_structured_replies: true,
    }
}

/// Answers lookups: "disk" (and the default "") exist, nothing else does.
pub fn lookup(name: &str) -> Result<ExportInfo, String> {
    match name {
        "disk" | "" => Ok(export("disk")),
        other => Err(format!("no export named {other:?}")),
    }
}

/// Everything a handshake run produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    /// Non-`NeedMore` steps and the final error, in order.
    pub steps: Vec<Result<HandshakeStep, HandshakeError>>,
    /// All bytes the server queued (greeting included).
    pub output: Vec<u8>,
    /// Input bytes left unconsumed at the end.
    pub leftover: Vec<u8>,
}

impl Run {
    pub fn last(&self) -> Option<&Result<HandshakeStep, HandshakeError>> {
        self.steps.last()
    }

    /// Whether the run ended with NBD_OPT_EXPORT_NAME's raw (non-reply)
    /// answer in the output.
    pub fn ended_by_export_name(&self) -> bool {
        let n = self.steps.len();
        n >= 2
            && matches!(self.steps[n - 1], Ok(HandshakeStep::Done(_)))
            && matches!(
                self.steps[n - 2],
                Ok(HandshakeStep::ExportLookup {
                    query: ExportQuery::ExportName,
                    ..
                })
            )
    }

    /// The option replies in the output, after the greeting.
    pub fn replies(&self) -> Vec<OptionReply> {
        let mut buf = BytesMut::from(&self.output[..]);
        let flags = take_greeting(&mut buf)
            .expect("greeting magic")
            .expect("whole greeting");
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let mut replies = Vec::new();
        while let Some(reply) = take_option_reply(&mut buf).expect("reply magic") {
            replies.push(reply);
        }
        replies
    }
}

/// Feeds `input` to a fresh handshake in chunks of the given sizes
/// (cycled; the rest in one piece if `chunks` is empty), answering lookups
/// with `lookup`, until the handshake ends or the input runs out.
pub fn run_chunked(opts: HandshakeOptions, input: &[u8], chunks: &[usize]) -> Run {
    let mut hs = ServerHandshake::new(opts);
    let mut out = BytesMut::new();
    let mut buf = BytesMut::new();
    let mut steps = Vec::new();
    let mut pos = 0;
    let mut chunk_index = 0;
    // Bounded: every iteration either consumes input, ends, or answers a
    // lookup (which is followed by a feed that consumes or ends).
    for _ in 0..(input.len() * 4 + 1000) {
        let result = hs.feed(&mut buf);
        hs.take_output(&mut out);
        match result {
            Ok(HandshakeStep::NeedMore) => {
                if pos == input.len() {
                    break;
                }
                let n = if chunks.is_empty() {
                    input.len() - pos
                } else {
                    chunks[chunk_index % chunks.len()].max(1)
                };
                chunk_index += 1;
                let end = (pos + n).min(input.len());
                buf.extend_from_slice(&input[pos..end]);
                pos = end;
            }
            Ok(HandshakeStep::ExportLookup { name, query }) => {
                steps.push(Ok(HandshakeStep::ExportLookup {
                    name: name.clone(),
                    query,
                }));
                hs.answer_export(lookup(&name));
                hs.take_output(&mut out);
            }
            Ok(step) => {
                steps.push(Ok(step));
                break;
            }
            Err(e) => {
                steps.push(Err(e));
                break;
            }
        }
    }
    let mut leftover = buf.to_vec();
    leftover.extend_from_slice(&input[pos..]);
    Run {
        steps,
        output: out.to_vec(),
        leftover,
    }
}

pub fn run(opts: HandshakeOptions, input: &[u8]) -> Run {
    run_chunked(opts, input, &[])
}

/// Client bytes: flags, then each option.
pub fn client_bytes(flags: u32, options: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    crate::nbd::client::put_client_flags(&mut b, flags);
    for (option, data) in options {
        crate::nbd::client::put_option(&mut b, *option, data);
    }
    b.to_vec()
}

pub const FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

pub fn lookup_step(name: &str, query: ExportQuery) -> Result<HandshakeStep, HandshakeError> {
    Ok(HandshakeStep::ExportLookup {
        name: name.to_string(),
        query,
    })
}
