//! Server side of the fixed newstyle handshake, as a sans-IO state machine.
//!
//! Use: `new` queues the greeting; send what `take_output` yields; pass
//! received bytes to `feed` (it consumes what it can) and act on the step:
//! - `NeedMore`: send pending output, read more, feed again;
//! - `ExportLookup`: call `answer_export`, then `feed` again;
//! - `Done`: send pending output, then enter transmission; bytes left in
//!   the input buffer belong to the transmission phase;
//! - `Closed`: send pending output, then close the connection.
//!
//! `Done` and `Closed` are final: later `feed` calls return them again
//! without consuming input. After an `Err` the handshake is `Closed`.

use std::fmt;

use bytes::{Buf, BufMut, BytesMut};

use super::consts::*;
use super::export::ExportInfo;
use super::options::{
    parse_info_request, parse_meta_request, parse_string, query_selects_base_allocation,
    InfoRequest,
};

/// Longest option payload we buffer. The largest legitimate payload we
/// serve is NBD_OPT_GO/INFO: 4 + 4096 (name) + 2 + 2 per info request.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Longest option payload we read and discard (answering
/// `NBD_REP_ERR_TOO_BIG`, "The request or the reply is too large to
/// process") before giving up on the client. A longer claim is treated as
/// a denial of service: "if a server believes a client's behaviour
/// constitutes a denial of service, it MAY initiate a hard disconnect"
/// (Termination of the session during option haggling). Discarded bytes
/// are never buffered.
pub const MAX_OPTION_DISCARD: u32 = 16 * 1024 * 1024;

/// Options a client may send before we disconnect (same denial of service
/// clause as above). Real clients send fewer than a dozen.
pub const MAX_OPTIONS: u32 = 256;

/// Metadata context id we assign to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Which option asked for an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportQuery {
    Go,
    Info,
    ExportName,
}

/// Server configuration for one handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeOptions {
    /// (name, description) of each export, listed by `NBD_OPT_LIST`.
    pub exports: Vec<(String, String)>,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` is accepted.
    pub allow_structured_replies: bool,
}

/// What the handshake agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export, with the transmission flags actually sent.
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Context id of `base:allocation` when the client selected it for
    /// this export (by the name it used in `NBD_OPT_GO`/`EXPORT_NAME`).
    pub base_allocation_context: Option<u32>,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send pending output and read more input.
    NeedMore,
    /// Look the export up and call `answer_export`.
    ExportLookup { name: String, query: ExportQuery },
    /// Send pending output and start transmission.
    Done(Negotiated),
    /// Send pending output and close (client sent `NBD_OPT_ABORT`, or
    /// `NBD_OPT_EXPORT_NAME` named an export we refused).
    Closed,
}

/// A fatal client error: the connection must be closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set flags we did not advertise ("the server MUST drop
    /// the TCP connection if the client sets an unknown flag").
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// An option claimed a payload too large to discard, or an
    /// `NBD_OPT_EXPORT_NAME` (which cannot be answered with an error)
    /// claimed more than we buffer.
    OptionTooLarge { option: u32, length: u32 },
    /// `NBD_OPT_EXPORT_NAME` carried a name that is not a valid string.
    BadExportName(&'static str),
    /// The client sent more options than we allow.
    TooManyOptions(u32),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownClientFlags(flags) => {
                write!(f, "client sent unknown client flags {flags:#x}")
            }
            Self::BadOptionMagic(magic) => {
                write!(f, "client sent an option with bad magic {magic:#018x}")
            }
            Self::OptionTooLarge { option, length } => write!(
                f,
                "client sent option {option} claiming {length} bytes of data, more than we accept"
            ),
            Self::BadExportName(why) => {
                write!(f, "client sent NBD_OPT_EXPORT_NAME with a bad name: {why}")
            }
            Self::TooManyOptions(n) => {
                write!(
                    f,
                    "client sent {n} options, more than the {MAX_OPTIONS} allowed"
                )
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

/// An export request waiting for `answer_export`.
#[derive(Clone, Debug)]
struct Pending {
    query: ExportQuery,
    info: InfoRequest,
}

#[derive(Clone, Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    Discard { option: u32, remaining: usize },
    AwaitExport(Pending),
    Done(Negotiated),
    Closed,
}

/// Metadata contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug)]
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// The server side of one handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    opts: HandshakeOptions,
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options_seen: u32,
}

impl ServerHandshake {
    /// Starts a handshake; the greeting is queued in the output.
    pub fn new(opts: HandshakeOptions) -> Self {
        let mut out = BytesMut::with_capacity(64);
        out.put_u64(NBD_MAGIC);
        out.put_u64(NBD_IHAVEOPT);
        out.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        Self {
            opts,
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            structured: false,
            meta: None,
            options_seen: 0,
        }
    }

    /// Moves the bytes waiting to be sent into `out`.
    pub fn take_output(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.out);
        self.out.clear();
    }

    /// Whether bytes are waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Consumes what it can of `input` and says what to do next.
    pub fn feed(&mut self, input: &mut BytesMut) -> Result<HandshakeStep, HandshakeError> {
        let result = self.feed_inner(input);
        if result.is_err() {
            self.state = State::Closed;
        }
        result
    }

    fn feed_inner(&mut self, input: &mut BytesMut) -> Result<HandshakeStep, HandshakeError> {
        loop {
            match &self.state {
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let flags = input.get_u32();
                    // "Clients MUST NOT set any other flags; the server MUST
                    // drop the TCP connection if the client sets an unknown
                    // flag" (Client flags). A client without
                    // NBD_FLAG_C_FIXED_NEWSTYLE is served anyway: "Servers MAY
                    // choose to honour fixed newstyle from clients that didn't
                    // set this bit"; a non-fixed client only sends
                    // NBD_OPT_EXPORT_NAME, whose answer is the same.
                    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let magic = input.get_u64();
                    let option = input.get_u32();
                    let length = input.get_u32();
                    if magic != NBD_IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    self.options_seen += 1;
                    if self.options_seen > MAX_OPTIONS {
                        return Err(HandshakeError::TooManyOptions(self.options_seen));
                    }
                    if option == NBD_OPT_ABORT {
                        // "The server MUST reply with NBD_REP_ACK"; any data
                        // is ignored ("a server SHOULD ignore any data").
                        self.reply(option, NBD_REP_ACK, &[]);
                        self.state = State::Closed;
                        return Ok(HandshakeStep::Closed);
                    }
                    let too_big_to_buffer = length > MAX_OPTION_LEN;
                    if length > MAX_OPTION_DISCARD
                        || (option == NBD_OPT_EXPORT_NAME && too_big_to_buffer)
                    {
                        return Err(HandshakeError::OptionTooLarge { option, length });
                    }
                    // Both limits are far below usize::MAX on every target.
                    let len = length as usize;
                    self.state = if too_big_to_buffer {
                        State::Discard {
                            option,
                            remaining: len,
                        }
                    } else {
                        State::OptionData { option, len }
                    };
                }
                State::Discard { option, remaining } => {
                    let (option, remaining) = (*option, *remaining);
                    let n = remaining.min(input.len());
                    input.advance(n);
                    if n < remaining {
                        self.state = State::Discard {
                            option,
                            remaining: remaining - n,
                        };
                        return Ok(HandshakeStep::NeedMore);
                    }
                    self.reply_error(option, NBD_REP_ERR_TOO_BIG, "option data too large");
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, len } => {
                    let (option, len) = (*option, *len);
                    if input.len() < len {
                        input.reserve(len - input.len());
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let data = input.split_to(len);
                    self.state = State::OptionHeader;
                    if let Some(step) = self.handle_option(option, &data)? {
                        return Ok(step);
                    }
                }
                State::AwaitExport(pending) => {
                    return Ok(HandshakeStep::ExportLookup {
                        name: pending.info.name.clone(),
                        query: pending.query,
                    });
                }
                State::Done(negotiated) => return Ok(HandshakeStep::Done(negotiated.clone())),
                State::Closed => return Ok(HandshakeStep::Closed),
            }
        }
    }

    /// Answers one complete option. Returns a step when the caller must act.
    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<HandshakeStep>, HandshakeError> {
        match option {
            NBD_OPT_EXPORT_NAME => {
                let name = parse_string(data).map_err(HandshakeError::BadExportName)?;
                let info = InfoRequest {
                    name,
                    want_name: false,
                    want_description: false,
                    want_block_size: false,
                };
                return Ok(Some(self.await_export(ExportQuery::ExportName, info)));
            }
            NBD_OPT_INFO | NBD_OPT_GO => match parse_info_request(data) {
                Ok(info) => {
                    let query = if option == NBD_OPT_GO {
                        ExportQuery::Go
                    } else {
                        ExportQuery::Info
                    };
                    return Ok(Some(self.await_export(query, info)));
                }
                Err(why) => self.reply_error(option, NBD_REP_ERR_INVALID, why),
            },
            NBD_OPT_LIST => {
                // "The client MUST NOT send any additional data with the
                // option, and the server SHOULD reject a request that
                // includes data with NBD_REP_ERR_INVALID."
                if !data.is_empty() {
                    self.reply_error(option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    self.reply_list();
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !self.opts.allow_structured_replies {
                    self.reply_error(option, NBD_REP_ERR_UNSUP, "structured replies disabled");
                } else if !data.is_empty() {
                    // "the server SHOULD reject a request that includes data
                    // with NBD_REP_ERR_INVALID".
                    self.reply_error(
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_SET_META_CONTEXT => self.set_meta_context(data),
            NBD_OPT_LIST_META_CONTEXT => self.list_meta_context(data),
            _ => {
                // NBD_OPT_STARTTLS lands here too: in NOTLS mode the server
                // MUST respond with NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP.
                self.reply_error(option, NBD_REP_ERR_UNSUP, "option not supported");
            }
        }
        Ok(None)
    }

    fn await_export(&mut self, query: ExportQuery, info: InfoRequest) -> HandshakeStep {
        let step = HandshakeStep::ExportLookup {
            name: info.name.clone(),
            query,
        };
        self.state = State::AwaitExport(Pending { query, info });
        step
    }

    fn reply_list(&mut self) {
        let exports = std::mem::take(&mut self.opts.exports);
        for (name, description) in &exports {
            let name = truncate_str(name, NBD_MAX_STRING);
            let description = truncate_str(description, NBD_MAX_STRING);
            let mut data = Vec::with_capacity(4 + name.len() + description.len());
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(description.as_bytes());
            self.reply(NBD_OPT_LIST, NBD_REP_SERVER, &data);
        }
        self.opts.exports = exports;
        self.reply(NBD_OPT_LIST, NBD_REP_ACK, &[]);
    }

    fn set_meta_context(&mut self, data: &[u8]) {
        let option = NBD_OPT_SET_META_CONTEXT;
        // "Issuing this command replaces all previously-set metadata
        // contexts (including when this command fails)".
        self.meta = None;
        // "This option MUST NOT be requested unless structured replies have
        // been negotiated first. If a client attempts to do so, a server
        // SHOULD send NBD_REP_ERR_INVALID."
        if !self.structured {
            self.reply_error(
                option,
                NBD_REP_ERR_INVALID,
                "structured replies not negotiated",
            );
            return;
        }
        let request = match parse_meta_request(data) {
            Ok(request) => request,
            Err(why) => {
                self.reply_error(option, NBD_REP_ERR_INVALID, why);
                return;
            }
        };
        // The export name is not checked here: the selection only counts if
        // it names the same export as the final NBD_OPT_GO/EXPORT_NAME.
        let base_allocation = request
            .queries
            .iter()
            .any(|q| query_selects_base_allocation(q, false));
        if base_allocation {
            self.reply_meta_context(option, BASE_ALLOCATION_ID);
        }
        self.reply(option, NBD_REP_ACK, &[]);
        self.meta = Some(MetaSelection {
            export: request.export,
            base_allocation,
        });
    }

    fn list_meta_context(&mut self, data: &[u8]) {
        let option = NBD_OPT_LIST_META_CONTEXT;
        // "This option SHOULD NOT be requested unless structured replies
        // have been negotiated first. If a client attempts to do so, a
        // server MAY send NBD_REP_ERR_INVALID."
        if !self.structured {
            self.reply_error(
                option,
                NBD_REP_ERR_INVALID,
                "structured replies not negotiated",
            );
            return;
        }
        let request = match parse_meta_request(data) {
            Ok(request) => request,
            Err(why) => {
                self.reply_error(option, NBD_REP_ERR_INVALID, why);
                return;
            }
        };
        // "If zero queries are sent, then the server MUST return all the
        // metadata contexts that are available".
        let listed = request.queries.is_empty()
            || request
                .queries
                .iter()
                .any(|q| query_selects_base_allocation(q, true));
        if listed {
            // "The metadata context ID in these replies is reserved and
            // SHOULD be set to zero".
            self.reply_meta_context(option, 0);
        }
        self.reply(option, NBD_REP_ACK, &[]);
    }

    fn reply_meta_context(&mut self, option: u32, id: u32) {
        let mut data = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        data.extend_from_slice(&id.to_be_bytes());
        data.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.reply(option, NBD_REP_META_CONTEXT, &data);
    }

    /// Answers the pending `ExportLookup`. `Err(message)` refuses the
    /// export: `NBD_REP_ERR_UNKNOWN` ("The requested export is not
    /// available") with the message for GO/INFO, after which the client
    /// may try again; for `NBD_OPT_EXPORT_NAME`, which has no error reply,
    /// the handshake is `Closed` ("the server MUST terminate the session").
    pub fn answer_export(&mut self, answer: Result<ExportInfo, String>) {
        let pending = match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitExport(pending) => pending,
            other => {
                debug_assert!(false, "answer_export without a pending ExportLookup");
                self.state = other;
                return;
            }
        };
        let query = pending.query;
        let info = pending.info;
        let option = match query {
            ExportQuery::Go => NBD_OPT_GO,
            ExportQuery::Info => NBD_OPT_INFO,
            ExportQuery::ExportName => NBD_OPT_EXPORT_NAME,
        };
        let mut export = match answer {
            Ok(export) => export,
            Err(message) => {
                if query == ExportQuery::ExportName {
                    self.state = State::Closed;
                } else {
                    self.reply_error(option, NBD_REP_ERR_UNKNOWN, &message);
                    self.state = State::OptionHeader;
                }
                return;
            }
        };
        debug_assert!(export.flags & NBD_FLAG_HAS_FLAGS != 0, "HAS_FLAGS missing");
        debug_assert!(
            export.block_sizes_valid(),
            "invalid block sizes: {export:?}"
        );
        // NBD_FLAG_SEND_DF: the server "MUST leave this flag clear if
        // structured replies have not been negotiated".
        if !self.structured {
            export.flags &= !NBD_FLAG_SEND_DF;
        }
        if query == ExportQuery::ExportName {
            self.out.put_u64(export.size);
            self.out.put_u16(export.flags);
            if !self.no_zeroes {
                self.out.put_bytes(0, 124);
            }
        } else {
            self.reply_infos(option, &export, &info);
            self.reply(option, NBD_REP_ACK, &[]);
        }
        self.state = if query == ExportQuery::Info {
            State::OptionHeader
        } else {
            let base_allocation_context = match &self.meta {
                Some(m) if self.structured && m.base_allocation && m.export == info.name => {
                    Some(BASE_ALLOCATION_ID)
                }
                _ => None,
            };
            State::Done(Negotiated {
                export,
                structured_replies: self.structured,
                base_allocation_context,
            })
        };
    }

    /// The `NBD_REP_INFO` replies for a successful GO/INFO: always
    /// `NBD_INFO_EXPORT` ("MUST send"), always `NBD_INFO_BLOCK_SIZE` (we
    /// always enforce our constraints; "The server MAY send information
    /// requests back which are not explicitly requested"), name and
    /// description when asked.
    fn reply_infos(&mut self, option: u32, export: &ExportInfo, info: &InfoRequest) {
        let mut data = Vec::with_capacity(14);
        data.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        data.extend_from_slice(&export.size.to_be_bytes());
        data.extend_from_slice(&export.flags.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &data);
        if info.want_name {
            self.reply_info_string(option, NBD_INFO_NAME, &export.name);
        }
        if info.want_description {
            self.reply_info_string(option, NBD_INFO_DESCRIPTION, &export.description);
        }
        data.clear();
        data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&export.min_block.to_be_bytes());
        data.extend_from_slice(&export.preferred_block.to_be_bytes());
        data.extend_from_slice(&export.max_block.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &data);
    }

    fn reply_info_string(&mut self, option: u32, info_type: u16, s: &str) {
        let s = truncate_str(s, NBD_MAX_STRING);
        let mut data = Vec::with_capacity(2 + s.len());
        data.extend_from_slice(&info_type.to_be_bytes());
        data.extend_from_slice(s.as_bytes());
        self.reply(option, NBD_REP_INFO, &data);
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        debug_assert!(reply_type & NBD_REP_FLAG_ERROR != 0);
        let message = truncate_str(message, NBD_MAX_STRING);
        self.reply(option, reply_type, message.as_bytes());
    }

    /// Queues one option reply.
    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        // Every caller bounds `data` far below 4 GiB (strings are cut at
        // 4096 bytes).
        debug_assert!(data.len() <= MAX_OPTION_LEN as usize);
        self.out.reserve(OPTION_REPLY_HEADER_LEN + data.len());
        self.out.put_u64(NBD_REP_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(reply_type);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
