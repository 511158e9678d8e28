//! Messages exchanged between the two nodes of a resource.

use bytes::Bytes;

/// Wire protocol version carried in [`Hello`]; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Primary = 1,
    Secondary = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDisk {
    UpToDate = 1,
    Inconsistent = 2,
    Outdated = 3,
    Failed = 4,
    Diskless = 5,
}

/// Generation identifiers as in DRBD: current, bitmap, two history slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gis {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

/// First message after authentication, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub resource: String,
    pub node: String,
    /// Size of the data area in bytes.
    pub data_size: u64,
    /// 'A', 'B' or 'C' as a byte.
    pub protocol: u8,
    pub two_primaries: bool,
    pub role: PeerRole,
    pub disk: PeerDisk,
    pub gis: Gis,
    /// This node crashed while primary (its activity log was replayed).
    pub crashed_primary: bool,
    /// The sender holds writes this node acknowledged but had not flushed
    /// when the link was lost (it may have lost them in a power cut).
    pub peer_may_lack: bool,
    /// Number of out-of-sync blocks in the sender's bitmap.
    pub out_of_sync_blocks: u64,
    /// The sender wants its data discarded if this is a split brain (`connect --discard-my-data`).
    pub discard_my_data: bool,
}

/// What a mirrored write does to its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteKind {
    Data(Bytes),
    Trim { len: u32 },
    Zeroes { len: u32, may_trim: bool },
}

impl WriteKind {
    pub fn len(&self) -> u64 {
        match self {
            WriteKind::Data(d) => d.len() as u64,
            WriteKind::Trim { len } | WriteKind::Zeroes { len, .. } => *len as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the sync decision on connect came out, sent by the node that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Disks are in sync; nothing to move.
    None,
    /// Resync the blocks set in the merged bitmap.
    Bitmap,
    /// Resync everything.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// Role or disk state changed.
    State {
        role: PeerRole,
        disk: PeerDisk,
    },
    /// The sender's whole out-of-sync bitmap, in chunks, sent after Hello.
    BitmapChunk {
        first_word: u64,
        words: Vec<u64>,
        last: bool,
    },
    /// The sync decision: the receiver becomes sync target (`source_gis` are the
    /// source's identifiers, adopted by the target when the resync ends).
    StartSync {
        mode: SyncMode,
        source_gis: Gis,
    },
    /// A write originated by the sender, `seen` = highest peer seq the sender had received.
    Write {
        seq: u64,
        seen: u64,
        offset: u64,
        kind: WriteKind,
        fua: bool,
        resync: bool,
    },
    /// Protocol B: write received.
    RecvAck {
        seq: u64,
    },
    /// Write completed on the receiver's disk (error 0) or failed (NBD errno).
    WriteAck {
        seq: u64,
        error: u32,
    },
    Flush {
        id: u64,
    },
    FlushAck {
        id: u64,
        error: u32,
    },
    ReadRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    ReadReply {
        id: u64,
        error: u32,
        data: Bytes,
    },
    /// Checksum resync / verify: the sender's CRC32C of each 4 KiB block starting at offset.
    ChecksumRequest {
        id: u64,
        offset: u64,
        len: u32,
        verify: bool,
    },
    ChecksumReply {
        id: u64,
        error: u32,
        sums: Vec<u32>,
    },
    /// Resync has covered every block; identifiers of the source for the target to adopt.
    SyncDone {
        source_gis: Gis,
    },
    /// The sender starts an online verify as verify source.
    StartVerify,
    /// Verify finished (sent by the verify source with its count of differing blocks).
    VerifyDone {
        differing_blocks: u64,
    },
    /// The sender detected a split brain and disconnects.
    SplitBrain,
    Ping,
    PingAck,
    /// Orderly goodbye with a reason.
    Bye {
        reason: String,
    },
}

impl Message {
    /// The message's name, for log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::State { .. } => "State",
            Message::BitmapChunk { .. } => "BitmapChunk",
            Message::StartSync { .. } => "StartSync",
            Message::Write { .. } => "Write",
            Message::RecvAck { .. } => "RecvAck",
            Message::WriteAck { .. } => "WriteAck",
            Message::Flush { .. } => "Flush",
            Message::FlushAck { .. } => "FlushAck",
            Message::ReadRequest { .. } => "ReadRequest",
            Message::ReadReply { .. } => "ReadReply",
            Message::ChecksumRequest { .. } => "ChecksumRequest",
            Message::ChecksumReply { .. } => "ChecksumReply",
            Message::SyncDone { .. } => "SyncDone",
            Message::StartVerify => "StartVerify",
            Message::VerifyDone { .. } => "VerifyDone",
            Message::SplitBrain => "SplitBrain",
            Message::Ping => "Ping",
            Message::PingAck => "PingAck",
            Message::Bye { .. } => "Bye",
        }
    }
}
