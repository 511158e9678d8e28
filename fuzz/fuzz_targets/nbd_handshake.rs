//! Feeds arbitrary client bytes to the NBD server handshake, in chunks
//! whose size the input chooses. Must never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_mirror::nbd::{
    transmission_flags, ExportInfo, HandshakeOptions, HandshakeStep, ServerHandshake,
};

fn export(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.to_string(),
        description: "fuzz".to_string(),
        size: 1 << 30,
        flags: transmission_flags(false),
        min_block: 512,
        preferred_block: 4096,
        max_block: 1 << 25,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut hs = ServerHandshake::new(HandshakeOptions {
        exports: vec![("disk".into(), "a disk".into())],
        allow_structured_replies: chunk % 2 == 0,
    });
    let mut out = BytesMut::new();
    let mut buf = BytesMut::new();
    let mut pieces = data.chunks(chunk);
    // Each round consumes input, answers a lookup, or ends.
    for _ in 0..(2 * data.len() + 16) {
        let step = match hs.feed(&mut buf) {
            Ok(step) => step,
            Err(_) => break,
        };
        hs.take_output(&mut out);
        match step {
            HandshakeStep::NeedMore => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => break,
            },
            HandshakeStep::ExportLookup { name, .. } => {
                if name == "disk" || name.is_empty() {
                    hs.answer_export(Ok(export("disk")));
                } else {
                    hs.answer_export(Err(format!("no export {name}")));
                }
            }
            HandshakeStep::Done(_) | HandshakeStep::Closed => break,
        }
    }
    hs.take_output(&mut out);
});
