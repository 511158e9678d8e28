//! Two node cores over an authenticated link (in memory: instant disks and
//! metadata, a FIFO link), with arbitrary but well-formed peer messages from
//! one side (issue 20). beta's genuine messages flow as usual; the input adds
//! messages "from beta" to alpha, NBD requests on alpha, time passing and
//! reconnects. Checked: no panic (the core's own assertions included), and no
//! single allocation larger than `ALLOC_LIMIT`, which is what a limit-breaking
//! number from the peer would cause.
//!
//! Well-formed: each generated message is encoded and decoded by the peer
//! codec first; one the wire cannot carry is skipped.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use nbd_mirror::core::{md_flags, Action, AdminCmd, DiskOp, Event, IoRequest, MetaState, Node};
use nbd_mirror::peer::{
    encode_split, Decoder, Gis, Message, PeerDisk, PeerRole, SyncMode, WriteKind,
    DEFAULT_MAX_PAYLOAD,
};

/// Disk size of both nodes.
const SIZE: u64 = 4 << 20;
/// Largest single allocation allowed: a 32 MiB data block plus its frame and
/// some slack. The harness's own disks are 4 MiB.
const ALLOC_LIMIT: usize = 40 << 20;
/// Operations taken from one input, and events per settle: bounds on work.
const MAX_OPS: usize = 256;
const MAX_EVENTS: usize = 200_000;

struct Checked;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Checked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Checked = Checked;

/// Reads numbers from the input; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else {
            return 0;
        };
        self.data = rest;
        b
    }

    fn raw64(&mut self) -> u64 {
        (0..8).fold(0u64, |v, _| (v << 8) | u64::from(self.u8()))
    }

    /// A number biased to the interesting ones: small, block-aligned,
    /// around the device size and the data limit, extremes.
    fn num(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => u64::from(self.u8()),
            1 => u64::from(self.u8()) * 4096,
            2 => SIZE - 4096 * u64::from(self.u8() % 4),
            3 => (32 << 20) + u64::from(self.u8()) - 128,
            4 => u64::MAX - u64::from(self.u8()),
            5 => u64::from(u32::MAX) - u64::from(self.u8()),
            _ => self.raw64(),
        }
    }

    fn u32(&mut self) -> u32 {
        self.num() as u32
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    fn gis(&mut self) -> Gis {
        let mut pick = || match self.u8() % 4 {
            0 => 0,
            1 => 0x1000,
            2 => 0x1000 | 1,
            _ => self.raw64(),
        };
        Gis {
            current: pick(),
            bitmap: pick(),
            history: [pick(), pick()],
        }
    }

    fn role(&mut self) -> PeerRole {
        if self.bool() {
            PeerRole::Primary
        } else {
            PeerRole::Secondary
        }
    }

    fn disk(&mut self) -> PeerDisk {
        match self.u8() % 5 {
            0 => PeerDisk::UpToDate,
            1 => PeerDisk::Inconsistent,
            2 => PeerDisk::Outdated,
            3 => PeerDisk::Failed,
            _ => PeerDisk::Diskless,
        }
    }

    fn data(&mut self) -> Bytes {
        let len = match self.u8() % 4 {
            0 => 4096,
            1 => usize::from(self.u8()) * 16,
            2 => 64 << 10,
            _ => 512,
        };
        Bytes::from(vec![self.u8(); len])
    }

    fn message(&mut self, hello: &Option<Message>) -> Option<Message> {
        let m = match self.u8() % 20 {
            0 => {
                let Some(Message::Hello(h)) = hello.clone() else {
                    return None;
                };
                let mut h = h;
                match self.u8() % 6 {
                    0 => h.data_size = self.num(),
                    1 => h.gis = self.gis(),
                    2 => h.role = self.role(),
                    3 => h.disk = self.disk(),
                    4 => h.out_of_sync_blocks = self.num(),
                    _ => h.discard_my_data = self.bool(),
                }
                Message::Hello(h)
            }
            1 => Message::State {
                role: self.role(),
                disk: self.disk(),
            },
            2 => {
                let n = usize::from(self.u8() % 8);
                Message::BitmapChunk {
                    first_word: self.num(),
                    words: (0..n).map(|_| self.raw64()).collect(),
                    last: self.bool(),
                }
            }
            3 => Message::StartSync {
                mode: match self.u8() % 3 {
                    0 => SyncMode::None,
                    1 => SyncMode::Bitmap,
                    _ => SyncMode::Full,
                },
                source_gis: self.gis(),
            },
            4 | 5 => Message::Write {
                seq: self.num(),
                seen: self.num(),
                offset: self.num(),
                kind: match self.u8() % 3 {
                    0 => WriteKind::Data(self.data()),
                    1 => WriteKind::Trim { len: self.u32() },
                    _ => WriteKind::Zeroes {
                        len: self.u32(),
                        may_trim: self.bool(),
                    },
                },
                fua: self.bool(),
                resync: self.bool(),
            },
            6 => Message::RecvAck { seq: self.num() },
            7 => Message::WriteAck {
                seq: self.num(),
                error: self.u32(),
            },
            8 => Message::Flush { id: self.num() },
            9 => Message::FlushAck {
                id: self.num(),
                error: self.u32(),
            },
            10 => Message::ReadRequest {
                id: self.num(),
                offset: self.num(),
                len: self.u32(),
            },
            11 => Message::ReadReply {
                id: self.num(),
                error: self.u32(),
                data: self.data(),
            },
            12 => Message::ChecksumRequest {
                id: self.num(),
                offset: self.num(),
                len: self.u32(),
                verify: self.bool(),
            },
            13 => {
                let n = usize::from(self.u8());
                Message::ChecksumReply {
                    id: self.num(),
                    error: self.u32(),
                    sums: (0..n).map(|_| self.raw64() as u32).collect(),
                }
            }
            14 => Message::SyncDone {
                source_gis: self.gis(),
            },
            15 => Message::StartVerify,
            16 => Message::VerifyDone {
                differing_blocks: self.num(),
            },
            17 => Message::SplitBrain,
            18 => Message::Ping,
            _ => Message::PingAck,
        };
        well_formed(m)
    }
}

/// `m` as the peer's decoder would deliver it, or None if the wire cannot
/// carry it.
fn well_formed(m: Message) -> Option<Message> {
    let mut buf = BytesMut::new();
    let tail = encode_split(&m, &mut buf).ok()?;
    buf.extend_from_slice(&tail);
    Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf).ok()?
}

struct Pair {
    nodes: [Node; 2],
    queue: [VecDeque<Event>; 2],
    /// The current connection, if up.
    link: Option<u64>,
    next_link: u64,
    now: u64,
    /// beta's last genuine Hello, for mutated copies.
    hello: Option<Message>,
}

fn node(name: &str) -> Node {
    let text = "[resource]\nname = \"r0\"\nshared-secret-file = \"/etc/nbd-mirror/r0.secret\"\n\
         [[node]]\nname = \"alpha\"\naddress = \"127.0.0.1:7001\"\ndisk = \"/dev/null\"\n\
         [[node]]\nname = \"beta\"\naddress = \"127.0.0.1:7002\"\ndisk = \"/dev/null\"\n";
    let s =
        nbd_mirror::config::parse(Path::new("fuzz.toml"), text, Some(name)).expect("fuzz config");
    let cfg = nbd_mirror::daemon::setup::core_config(&s, SIZE, 61, 32 << 20);
    // Both in sync: the same identifiers, consistent, nothing out of sync.
    let gis = Gis {
        current: 0x1000,
        ..Gis::default()
    };
    let flags = md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
    let sb = MetaState {
        gis,
        flags,
        resync_offset: 0,
    };
    let words = vec![0u64; (SIZE / 4096).div_ceil(64) as usize];
    Node::new(cfg, sb, &words, &[], if name == "alpha" { 3 } else { 5 })
}

impl Pair {
    fn new() -> Pair {
        let mut p = Pair {
            nodes: [node("alpha"), node("beta")],
            queue: [VecDeque::new(), VecDeque::new()],
            link: None,
            next_link: 0,
            now: 0,
            hello: None,
        };
        for q in &mut p.queue {
            q.push_back(Event::Tick { now_ms: 0 });
        }
        p.open_link();
        p.settle();
        p.queue[0].push_back(Event::Admin {
            id: 1,
            cmd: AdminCmd::Primary { force: false },
        });
        // The answer (Action::Attached) is one of the actions `settle` carries out.
        p.nodes[0].handle(Event::ClientAttach { conn: 1 });
        assert_eq!(p.nodes[0].status().nbd_clients, 1, "the primary serves the client");
        p.settle();
        p
    }

    fn open_link(&mut self) {
        self.next_link += 1;
        self.link = Some(self.next_link);
        for (i, q) in self.queue.iter_mut().enumerate() {
            q.push_back(Event::ConnOffered {
                link: self.next_link,
                dialed: i == 0,
            });
        }
    }

    fn link_down(&mut self) {
        if let Some(link) = self.link.take() {
            for q in &mut self.queue {
                q.push_back(Event::ConnDown {
                    link,
                    reason: "closed".into(),
                });
            }
        }
    }

    fn carry_out(&mut self, i: usize) {
        for a in self.nodes[i].take_actions() {
            match a {
                Action::Disk { id, op } => {
                    // Contents do not matter here; that the core stays inside
                    // the device does, whatever the peer sent.
                    let (offset, len) = match &op {
                        DiskOp::Read { offset, len } => (*offset, u64::from(*len)),
                        DiskOp::Trim { offset, len } => (*offset, *len as u64),
                        DiskOp::WriteZeroes { offset, len, .. } => (*offset, *len as u64),
                        DiskOp::Write { offset, data, .. } => (*offset, data.len() as u64),
                        DiskOp::Flush => (0, 0),
                    };
                    assert!(
                        offset.checked_add(len).is_some_and(|end| end <= SIZE),
                        "node {i}: a disk operation outside the device: {op:?}"
                    );
                    let result = match op {
                        DiskOp::Read { len, .. } => Ok(Some(Bytes::from(vec![0u8; len as usize]))),
                        _ => Ok(None),
                    };
                    self.queue[i].push_back(Event::DiskDone { id, result });
                }
                Action::Persist { id, .. } => {
                    self.queue[i].push_back(Event::MetaDone { id, ok: true });
                }
                Action::Send { link, msg } if Some(link) == self.link => {
                    if i == 1 && matches!(msg, Message::Hello(_)) {
                        self.hello = Some(msg.clone());
                    }
                    self.queue[1 - i].push_back(Event::PeerMsg { link, msg });
                }
                Action::CloseConn { link, .. } if Some(link) == self.link => self.link_down(),
                Action::FencePeer { id } => {
                    self.queue[i].push_back(Event::FenceDone { id, exit: Some(7) })
                }
                _ => {}
            }
        }
    }

    fn settle(&mut self) {
        for _ in 0..MAX_EVENTS {
            let Some(i) = (0..2).find(|&i| !self.queue[i].is_empty()) else {
                return;
            };
            let ev = self.queue[i].pop_front().expect("not empty");
            self.nodes[i].handle(ev);
            self.carry_out(i);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut p = Pair::new();
    let mut input = Input { data };
    let mut cookie = 0u64;
    for _ in 0..MAX_OPS {
        if input.data.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0..=3 => {
                if let (Some(link), Some(msg)) = (p.link, input.message(&p.hello)) {
                    p.queue[0].push_back(Event::PeerMsg { link, msg });
                }
            }
            4 => {
                cookie += 1;
                let offset = u64::from(input.u8()) * 4096 % SIZE;
                let req = if input.bool() {
                    IoRequest::Write {
                        offset,
                        data: Bytes::from(vec![input.u8(); 4096]),
                        fua: false,
                    }
                } else {
                    IoRequest::Read { offset, len: 4096 }
                };
                p.queue[0].push_back(Event::Request {
                    conn: 1,
                    cookie,
                    req,
                });
            }
            5 | 6 => {
                p.now += u64::from(input.u8()) * 100;
                for q in &mut p.queue {
                    q.push_back(Event::Tick { now_ms: p.now });
                }
            }
            _ => {
                if p.link.is_none() {
                    p.open_link();
                }
            }
        }
        p.settle();
        assert!(
            LARGEST.load(Ordering::Relaxed) <= ALLOC_LIMIT,
            "an allocation of {} bytes (limit {ALLOC_LIMIT})",
            LARGEST.load(Ordering::Relaxed)
        );
    }
});
