//! The client side of the NBD handshake for one kernel socket, sans-IO:
//! fixed newstyle, `NBD_OPT_GO` for the resource's export asking for its
//! block sizes, and nothing else. No `NBD_OPT_STRUCTURED_REPLY`: the kernel
//! parses only simple replies.

use bytes::{Buf, BytesMut};

use crate::nbd::client::{
    info_request_data, put_client_flags, put_option, take_greeting, take_option_reply,
};
use crate::nbd::consts::*;

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportSeen {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Replies,
    Done,
}

/// Feed it what the server sends; send what `take_output` gives.
#[derive(Debug)]
pub struct ClientHandshake {
    export: String,
    state: State,
    out: BytesMut,
    size_flags: Option<(u64, u16)>,
    block_sizes: Option<(u32, u32, u32)>,
}

impl ClientHandshake {
    pub fn new(export: &str) -> Self {
        Self {
            export: export.to_string(),
            state: State::Greeting,
            out: BytesMut::new(),
            size_flags: None,
            block_sizes: None,
        }
    }

    /// Moves the bytes to send into `out`.
    pub fn take_output(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.out);
        self.out.clear();
    }

    /// Consumes server bytes; `Ok(Some(export))` once the server has
    /// acknowledged `NBD_OPT_GO` (the socket is then in transmission).
    pub fn feed(&mut self, input: &mut BytesMut) -> Result<Option<ExportSeen>, String> {
        assert!(self.state != State::Done, "handshake fed after it ended");
        if self.state == State::Greeting {
            let Some(flags) = take_greeting(input)? else {
                return Ok(None);
            };
            if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
                return Err(format!(
                    "the server is not fixed newstyle (flags {flags:#x})"
                ));
            }
            let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
            if flags & NBD_FLAG_NO_ZEROES != 0 {
                cflags |= NBD_FLAG_C_NO_ZEROES;
            }
            put_client_flags(&mut self.out, cflags);
            let data = info_request_data(&self.export, &[NBD_INFO_BLOCK_SIZE]);
            put_option(&mut self.out, NBD_OPT_GO, &data);
            self.state = State::Replies;
        }
        // Each reply consumes its bytes, so this ends with the input.
        while let Some(r) = take_option_reply(input)? {
            if r.option != NBD_OPT_GO {
                return Err(format!(
                    "a reply to option {} while waiting for NBD_OPT_GO",
                    r.option
                ));
            }
            match r.reply_type {
                NBD_REP_INFO => self.take_info(&r.data)?,
                NBD_REP_ACK => {
                    let (size, flags) = self
                        .size_flags
                        .ok_or("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")?;
                    self.state = State::Done;
                    return Ok(Some(ExportSeen {
                        size,
                        flags,
                        block_sizes: self.block_sizes,
                    }));
                }
                t if t & NBD_REP_FLAG_ERROR != 0 => {
                    return Err(format!(
                        "the server refused export {:?} (reply type {t:#x}): {}",
                        self.export,
                        String::from_utf8_lossy(&r.data)
                    ))
                }
                t => return Err(format!("unexpected reply type {t:#x} to NBD_OPT_GO")),
            }
        }
        Ok(None)
    }

    fn take_info(&mut self, data: &[u8]) -> Result<(), String> {
        let mut d = data;
        if d.len() < 2 {
            return Err("NBD_REP_INFO shorter than its type".into());
        }
        match d.get_u16() {
            NBD_INFO_EXPORT if d.len() == 10 => {
                self.size_flags = Some((d.get_u64(), d.get_u16()));
            }
            NBD_INFO_BLOCK_SIZE if d.len() == 12 => {
                self.block_sizes = Some((d.get_u32(), d.get_u32(), d.get_u32()));
            }
            NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => {
                return Err(format!("NBD_REP_INFO of wrong length {}", data.len()))
            }
            _ => {} // name, description: not needed
        }
        Ok(())
    }
}

/// Checks a fresh connection against what the device was configured with:
/// the kernel keeps the old size and flags, so a reconnect to an export
/// that changed would hand it a different device.
pub fn check_same_export(first: &ExportSeen, now: &ExportSeen) -> Result<(), String> {
    if first.size != now.size || first.flags != now.flags {
        return Err(format!(
            "the export changed: size {} flags {:#x} at attach, now size {} flags {:#x}",
            first.size, first.flags, now.size, now.flags
        ));
    }
    Ok(())
}

/// The kernel's logical block size for this export: `wanted`, which must be
/// a power of two from 512 to 4096 (the page size) and at least the
/// server's minimum.
pub fn block_size_for(seen: &ExportSeen, wanted: u32) -> Result<u64, String> {
    if !(512..=4096).contains(&wanted) || !wanted.is_power_of_two() {
        return Err(format!(
            "block size {wanted}: not a power of two from 512 to 4096"
        ));
    }
    if let Some((min, _, _)) = seen.block_sizes {
        if wanted < min {
            return Err(format!(
                "block size {wanted} is below the server's minimum {min}"
            ));
        }
    }
    if seen.size % u64::from(wanted) != 0 {
        return Err(format!(
            "export size {} is not a multiple of block size {wanted}",
            seen.size
        ));
    }
    Ok(u64::from(wanted))
}
