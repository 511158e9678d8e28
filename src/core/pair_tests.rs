//! Two node cores wired together in memory (instant disks and metadata, a
//! FIFO link), for tests of resync and split-brain behaviour that need both
//! sides and a crash of one of them. The simulator (`src/sim`) explores
//! timing and faults; these pin down specific outcomes.

use std::collections::VecDeque;
use std::path::Path;

use super::types::*;
use super::Node;
use crate::peer::Gis;

/// The events whose answer a test waits for, as the daemon's `Shared::ask` takes
/// them: the answer is taken out of the node's actions, the rest stay queued.
impl Node {
    fn ask(&mut self, ev: Event) -> Action {
        self.handle(ev);
        let at = self
            .out
            .iter()
            .position(|a| matches!(a, Action::Attached { .. } | Action::StreamWrite { .. }))
            .expect("the core answers");
        self.out.remove(at)
    }

    fn attach_client(&mut self, conn: ConnId) -> Result<(), String> {
        match self.ask(Event::ClientAttach { conn }) {
            Action::Attached { conn: c, result } if c == conn => result,
            other => panic!("ClientAttach answered with {other:?}"),
        }
    }

    fn detach_client(&mut self, conn: ConnId) {
        self.handle(Event::ClientDetach { conn });
    }

    fn try_stream_write(
        &mut self,
        conn: ConnId,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Option<u64> {
        let ev = Event::StreamWrite {
            conn,
            cookie,
            offset,
            len,
        };
        match self.ask(ev) {
            Action::StreamWrite {
                conn: c,
                cookie: k,
                disk_id,
            } if (c, k) == (conn, cookie) => disk_id,
            other => panic!("StreamWrite answered with {other:?}"),
        }
    }

    fn shutdown(&mut self, data_flushed: bool) {
        self.handle(Event::StopFinal { data_flushed });
    }
}

const SIZE: u64 = 16 << 20;

/// What an NBD request got: data for a read, nothing for a write, or an errno.
type NbdResult = Result<Option<bytes::Bytes>, u32>;

/// Picks the superblock write that fails (`Pair::failing_superblock`).
type SuperblockFault = fn(&MetaState) -> bool;

/// What the metadata store holds for one node.
#[derive(Clone, Debug)]
struct Persisted {
    sb: MetaState,
    bitmap: Vec<u64>,
    al: Vec<u32>,
}

struct Pair {
    cfg: [CoreConfig; 2],
    nodes: [Option<Node>; 2],
    disks: [Vec<u8>; 2],
    md: [Persisted; 2],
    /// Events waiting for node i.
    queue: [VecDeque<Event>; 2],
    /// A link is up (both nodes were offered connection `cur`).
    link: bool,
    cur: LinkId,
    now: u64,
    events: [Vec<serde_json::Value>; 2],
    replies: [Vec<Result<String, String>>; 2],
    seed: u64,
    /// Writes to node i's disk fail with EIO.
    broken: [bool; 2],
    /// A write to node i's disk that starts at this offset fails with EIO
    /// (a bad sector; other writes succeed).
    bad_offset: [Option<u64>; 2],
    /// The next superblock write of node i for which this holds fails (EIO)
    /// and is not stored; once (the node writes its superblock again after).
    failing_superblock: [Option<SuperblockFault>; 2],
    /// Every peer message node i sent while the link was up.
    sent: [Vec<crate::peer::Message>; 2],
    /// NBD replies of node i: (cookie, result).
    nbd_replies: [Vec<(u64, NbdResult)>; 2],
}

fn config(node: &str, extra: &str) -> CoreConfig {
    let text = format!(
        "[resource]\nname = \"r0\"\nshared-secret-file = \"/etc/nbd-mirror/r0.secret\"\n{extra}\n\
         [[node]]\nname = \"alpha\"\naddress = \"127.0.0.1:7001\"\ndisk = \"/dev/null\"\n\
         [[node]]\nname = \"beta\"\naddress = \"127.0.0.1:7002\"\ndisk = \"/dev/null\"\n"
    );
    let s = crate::config::parse(Path::new("test.toml"), &text, Some(node))
        .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
    crate::daemon::setup::core_config(&s, SIZE, 61, 32 << 20)
}

/// The superblock of a node in sync with its peer (same identifiers).
fn in_sync_superblock() -> MetaState {
    MetaState {
        gis: Gis {
            current: 0x1000,
            bitmap: 0,
            history: [0, 0],
        },
        flags: md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE,
        resync_offset: 0,
    }
}

impl Pair {
    /// Like [`Pair::in_sync`], with node `i` restarted with an activity log of
    /// `slots` extents (the config is read at boot).
    fn in_sync_with_al_slots(extra: &str, i: usize, slots: usize) -> Pair {
        let mut p = Pair::in_sync(extra);
        p.cfg[i].al_slots = slots;
        p.crash(i);
        p.settle();
        p.boot(i);
        p.settle();
        p
    }

    /// Two nodes in sync (same identifiers, consistent, nothing out of sync),
    /// with `extra` lines added to the config (tables after `[resource]`).
    fn in_sync(extra: &str) -> Pair {
        let sb = in_sync_superblock();
        let words = (SIZE / 4096).div_ceil(64) as usize;
        let md = Persisted {
            sb,
            bitmap: vec![0; words],
            al: Vec::new(),
        };
        let mut p = Pair {
            cfg: [config("alpha", extra), config("beta", extra)],
            nodes: [None, None],
            disks: [vec![0; SIZE as usize], vec![0; SIZE as usize]],
            md: [md.clone(), md],
            queue: [VecDeque::new(), VecDeque::new()],
            link: false,
            cur: 0,
            now: 0,
            events: [Vec::new(), Vec::new()],
            replies: [Vec::new(), Vec::new()],
            seed: 7,
            broken: [false, false],
            bad_offset: [None, None],
            failing_superblock: [None, None],
            sent: [Vec::new(), Vec::new()],
            nbd_replies: [Vec::new(), Vec::new()],
        };
        p.boot(0);
        p.boot(1);
        p.settle();
        p
    }

    fn node(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("node is up")
    }

    fn boot(&mut self, i: usize) {
        // Distinct generators (the core uses `seed | 1`).
        self.seed += 2;
        let md = &self.md[i];
        let node = Node::new(
            self.cfg[i].clone(),
            md.sb.clone(),
            &md.bitmap,
            &md.al,
            self.seed,
        );
        self.nodes[i] = Some(node);
        self.queue[i].push_back(Event::Tick { now_ms: self.now });
    }

    /// kill -9: the process and its link are gone; disk and metadata stay.
    fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
        self.queue[i].clear();
        self.link_down(i, "the peer crashed");
    }

    /// Node `by` closed the link: it reads nothing more; the other node still
    /// reads what was sent before, then sees the link go down.
    fn link_down(&mut self, by: usize, why: &str) {
        if self.link {
            self.link = false;
            let link = self.cur;
            for i in 0..2 {
                if i == by {
                    self.queue[i].retain(|e| !matches!(e, Event::PeerMsg { .. }));
                }
                if self.nodes[i].is_some() {
                    self.queue[i].push_back(Event::ConnDown {
                        link,
                        reason: why.to_string(),
                    });
                }
            }
        }
    }

    /// Both nodes are offered a new connection (alpha dialed it).
    fn open_link(&mut self) {
        self.link = true;
        self.cur += 1;
        for i in 0..2 {
            self.queue[i].push_back(Event::ConnOffered {
                link: self.cur,
                dialed: i == 0,
            });
        }
    }

    fn admin(&mut self, i: usize, cmd: AdminCmd) -> Result<String, String> {
        let before = self.replies[i].len();
        self.queue[i].push_back(Event::Admin { id: 1, cmd });
        self.settle();
        self.replies[i]
            .get(before)
            .cloned()
            .expect("an answer to the admin command")
    }

    fn carry_out(&mut self, i: usize) {
        let actions = self.node(i).take_actions();
        for a in actions {
            match a {
                Action::Disk { id, op } => {
                    let d = &mut self.disks[i];
                    let result = match op {
                        DiskOp::Read { offset, len } => {
                            let (o, l) = (offset as usize, len as usize);
                            Ok(Some(bytes::Bytes::copy_from_slice(&d[o..o + l])))
                        }
                        DiskOp::Write { offset, .. }
                            if self.broken[i] || self.bad_offset[i] == Some(offset) =>
                        {
                            Err(errno::EIO)
                        }
                        DiskOp::Write { offset, data, .. } => {
                            let o = offset as usize;
                            d[o..o + data.len()].copy_from_slice(&data);
                            Ok(None)
                        }
                        DiskOp::Trim { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                            let o = offset as usize;
                            d[o..o + len as usize].fill(0);
                            Ok(None)
                        }
                        DiskOp::Flush => Ok(None),
                    };
                    self.queue[i].push_back(Event::DiskDone { id, result });
                }
                Action::Persist { id, write } => {
                    if let MetaWrite::Superblock(sb) = &write {
                        if self.failing_superblock[i].is_some_and(|f| f(sb)) {
                            self.failing_superblock[i] = None;
                            self.queue[i].push_back(Event::MetaDone { id, ok: false });
                            continue;
                        }
                    }
                    let md = &mut self.md[i];
                    match write {
                        MetaWrite::Superblock(sb) => md.sb = sb,
                        MetaWrite::ActivityLog(set) => md.al = set,
                        MetaWrite::BitmapPages { pages, words } => {
                            let per = (self.cfg[i].bitmap_bits_per_page / 64) as usize;
                            for p in pages {
                                let lo = p * per;
                                let hi = ((p + 1) * per).min(words.len());
                                md.bitmap[lo..hi].copy_from_slice(&words[lo..hi]);
                            }
                        }
                    }
                    self.queue[i].push_back(Event::MetaDone { id, ok: true });
                }
                Action::Send { link, msg }
                    if self.link && link == self.cur && self.nodes[1 - i].is_some() =>
                {
                    self.sent[i].push(msg.clone());
                    self.queue[1 - i].push_back(Event::PeerMsg { link, msg });
                }
                // The harness connects whenever both want a link (`wants_link`):
                // a daemon dials again and again until it gets one.
                Action::Dial => {}
                Action::CloseConn { link, .. } => {
                    assert_eq!(link, self.cur, "node {i} closed an old connection");
                    self.link_down(i, "closed by the peer");
                }
                Action::AdminReply { result, .. } => self.replies[i].push(result),
                Action::Reply { cookie, result, .. } => self.nbd_replies[i].push((cookie, result)),
                Action::Notify(v) => self.events[i].push(v),
                _ => {}
            }
        }
    }

    /// Processes events until nothing is left (no time passes).
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            // A new link once both have seen the old one end (the daemon dials
            // again only after its reader hit the end of the old stream).
            let old_link_pending = self.queue.iter().any(|q| {
                q.iter()
                    .any(|e| matches!(e, Event::PeerMsg { .. } | Event::ConnDown { .. }))
            });
            if !self.link
                && !old_link_pending
                && self.wants_link(0)
                && self.wants_link(1)
                && self.nodes.iter().all(|n| n.is_some())
            {
                self.open_link();
            }
            if !self.round(&|_, _| false, &mut Vec::new()) {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    /// Hands each live node its next event, except one `hold` picks (it goes
    /// to `held` instead), and carries out what the nodes did. False when no
    /// event was waiting.
    fn round(
        &mut self,
        hold: &dyn Fn(usize, &Event) -> bool,
        held: &mut Vec<(usize, Event)>,
    ) -> bool {
        let mut any = false;
        for i in 0..2 {
            if self.nodes[i].is_none() {
                continue;
            }
            if let Some(ev) = self.queue[i].pop_front() {
                any = true;
                if hold(i, &ev) {
                    held.push((i, ev));
                } else {
                    self.node(i).handle(ev);
                }
            }
            self.carry_out(i);
        }
        any
    }

    /// Like `settle`, but sets up no new link and holds back the events
    /// `hold` picks (node, event): returns them in the order they arrived.
    fn step(&mut self, hold: impl Fn(usize, &Event) -> bool) -> Vec<(usize, Event)> {
        let mut held = Vec::new();
        for _ in 0..1_000_000 {
            if !self.round(&hold, &mut held) {
                return held;
            }
        }
        panic!("the pair did not settle");
    }

    /// The network fails: what is in flight is lost, and both nodes see the
    /// link go down (neither closed it).
    fn cut(&mut self) {
        self.link = false;
        let link = self.cur;
        for i in 0..2 {
            self.queue[i].retain(|e| !matches!(e, Event::PeerMsg { .. }));
            if self.nodes[i].is_some() {
                self.queue[i].push_back(Event::ConnDown {
                    link,
                    reason: "the network failed".to_string(),
                });
            }
        }
    }

    /// Lets `ms` milliseconds pass in 100 ms ticks.
    fn run_ms(&mut self, ms: u64) {
        for _ in 0..ms / 100 {
            self.now += 100;
            for i in 0..2 {
                if self.nodes[i].is_some() {
                    self.queue[i].push_back(Event::Tick { now_ms: self.now });
                }
            }
            self.settle();
        }
    }

    /// Runs until `pred` holds, at most `ms`.
    fn run_until(&mut self, ms: u64, what: &str, pred: impl Fn(&Pair) -> bool) {
        for _ in 0..ms / 100 {
            if pred(self) {
                return;
            }
            self.run_ms(100);
        }
        assert!(pred(self), "not {what} within {ms} ms");
    }

    /// One 4 KiB write of `byte`s to `block` through an NBD client of node `i`
    /// (auto-promoting it), which then leaves (auto-demoting it).
    fn write(&mut self, i: usize, block: u64, byte: u8) {
        self.node(i).attach_client(9).expect("node serves I/O");
        self.queue[i].push_back(Event::Request {
            conn: 9,
            cookie: 1,
            req: IoRequest::Write {
                offset: block * 4096,
                data: bytes::Bytes::from(vec![byte; 4096]),
                fua: false,
            },
        });
        self.settle();
        self.node(i).detach_client(9);
        self.settle();
        let at = (block * 4096) as usize;
        assert_eq!(self.disks[i][at], byte, "the write reached node {i}'s disk");
    }

    /// Queues a 4 KiB write of `byte`s to `block` from client 9 of node `i`.
    fn queue_write(&mut self, i: usize, cookie: u64, block: u64, byte: u8) {
        self.queue[i].push_back(Event::Request {
            conn: 9,
            cookie,
            req: IoRequest::Write {
                offset: block * 4096,
                data: bytes::Bytes::from(vec![byte; 4096]),
                fua: false,
            },
        });
    }

    fn connect(&mut self, i: usize, discard_my_data: bool) {
        let r = self.admin(i, AdminCmd::Connect { discard_my_data });
        assert!(r.is_ok(), "{r:?}");
    }

    fn disconnect(&mut self, i: usize) {
        let r = self.admin(i, AdminCmd::Disconnect);
        assert!(r.is_ok(), "{r:?}");
    }

    /// Node `i` is up and looks for the peer.
    fn wants_link(&self, i: usize) -> bool {
        self.nodes[i].is_some()
            && self
                .status(i)
                .peer
                .is_some_and(|p| p.connection == ConnState::Connecting)
    }

    fn standalone(&self, i: usize) -> bool {
        self.status(i)
            .peer
            .is_some_and(|p| p.connection == ConnState::Standalone)
    }

    fn status(&self, i: usize) -> Status {
        self.nodes[i].as_ref().expect("node is up").status()
    }

    fn in_sync_now(&self) -> bool {
        (0..2).all(|i| {
            self.nodes[i].is_some() && {
                let s = self.status(i);
                s.disk == DiskState::UpToDate
                    && s.peer.as_ref().is_some_and(|p| {
                        p.replication == Replication::Established
                            && p.disk == Some(DiskState::UpToDate)
                    })
            }
        })
    }

    fn persisted_out_of_sync(&self, i: usize) -> u64 {
        self.md[i]
            .bitmap
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Whether `block` is marked out of sync in node `i`'s bitmap.
    fn marked(&self, i: usize, block: u64) -> bool {
        let words = self.nodes[i].as_ref().expect("node is up").bitmap_words();
        words[(block / 64) as usize] >> (block % 64) & 1 == 1
    }

    /// Whether `block` is marked out of sync in node `i`'s persisted bitmap.
    fn persisted_marked(&self, i: usize, block: u64) -> bool {
        self.md[i].bitmap[(block / 64) as usize] >> (block % 64) & 1 == 1
    }

    fn named(&self, i: usize, event: &str) -> Vec<serde_json::Value> {
        self.events[i]
            .iter()
            .filter(|v| v["event"] == event)
            .cloned()
            .collect()
    }

    /// Node `i`'s `event`s from its `from`-th event on.
    fn named_since(&self, i: usize, from: usize, event: &str) -> Vec<serde_json::Value> {
        self.events[i][from..]
            .iter()
            .filter(|v| v["event"] == event)
            .cloned()
            .collect()
    }

    /// Node `i`'s NBD replies for `cookie`.
    fn replies_for(&self, i: usize, cookie: u64) -> Vec<NbdResult> {
        self.nbd_replies[i]
            .iter()
            .filter(|(c, _)| *c == cookie)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Two primaries in sync (`allow-two-primaries`), client 9 attached on
    /// both and the activity-log extent of block 5 warm on both sides, so
    /// that later writes go straight to disk and the wire.
    fn dual_primary_warm() -> Pair {
        let mut p = Pair::in_sync("allow-two-primaries = true");
        for i in 0..2 {
            p.node(i).attach_client(9).expect("both may be primary");
        }
        p.settle();
        for (i, byte) in [(0, 1u8), (1, 2u8)] {
            p.queue_write(i, 1, 5, byte);
            p.settle();
        }
        assert!(p.in_sync_now());
        p
    }
}

const SLOW: &str = "[sync]\nrate = \"2MiB\"\nchecksum = false";

#[test]
fn the_pair_starts_in_sync() {
    let p = Pair::in_sync(SLOW);
    assert!(p.in_sync_now());
}

/// An invalidated node (full sync) that crashes half way resumes from its
/// persisted bitmap: it persists progress as sync target, and the full-sync
/// flag no longer forces the whole device again.
#[test]
fn an_interrupted_full_sync_resumes_after_a_crash_of_the_target() {
    let mut p = Pair::in_sync(SLOW);
    let all = SIZE / 4096;
    assert!(p.admin(1, AdminCmd::Invalidate).is_ok());
    p.settle();
    assert_eq!(
        p.status(1).peer.map(|x| x.replication),
        Some(Replication::SyncTarget)
    );
    assert_eq!(
        p.md[1].sb.flags & md_flags::FULL_SYNC_NEEDED,
        0,
        "the full-sync flag is done with once the bitmap records what is left"
    );
    p.run_until(20_000, "half synced", |p| {
        p.status(1).out_of_sync_bytes <= SIZE / 2
    });
    p.run_ms(1500);
    let remaining = p.status(1).out_of_sync_bytes / 4096;
    let persisted = p.persisted_out_of_sync(1);
    assert!(
        persisted < all && persisted <= remaining + 2 * (2 << 20) / 4096,
        "the target persisted no progress: {persisted} of {all} blocks still marked, {remaining} in memory"
    );
    p.crash(1);
    p.settle();
    p.boot(1);
    p.settle();
    let st = p.status(0);
    let total = st.resync.as_ref().map(|r| r.total_bytes).unwrap_or(0) / 4096;
    assert!(
        total > 0 && total < all && total <= persisted + 1024,
        "the resumed resync has {total} blocks, the target had {persisted} marked"
    );
    p.run_until(30_000, "in sync", |p| p.in_sync_now());
    assert!(p.disks[0] == p.disks[1]);
}

/// A resync reports progress as events, on the source and on the target, and
/// the target shows it in its status too.
#[test]
fn progress_events_on_both_sides() {
    let mut p = Pair::in_sync(SLOW);
    p.disks[0][..SIZE as usize / 2].fill(0xab);
    assert!(p
        .admin(
            0,
            AdminCmd::Resync {
                full: true,
                checksum: false
            }
        )
        .is_ok());
    p.run_ms(3000);
    let t = p.status(1).resync.expect("the target shows the resync");
    assert_eq!(t.total_bytes, SIZE);
    assert!(t.done_bytes > 0 && t.done_bytes < SIZE, "{t:?}");
    p.run_until(30_000, "in sync", |p| p.in_sync_now());
    for (i, role) in [(0, "source"), (1, "target")] {
        let ev = p.named(i, "resync-progress");
        assert!(ev.len() >= 3, "node {i}: {ev:?}");
        assert!(ev
            .iter()
            .all(|v| v["role"] == role && v["total_bytes"] == SIZE));
    }
    assert!(p.status(1).resync.is_none());
    assert_eq!(p.status(0).sync.bytes_sent, SIZE);
    assert_eq!(p.status(1).sync.bytes_received, SIZE);
    assert!(p.disks[0] == p.disks[1]);
}

/// A split brain after which `older` was primary before the split (it lost
/// its peer as primary) and the other node was promoted during it; both
/// wrote, both are secondary again and reconnect. Returns the disks as they
/// were before the reconnect.
fn younger_older_split(extra: &str, older: usize) -> (Pair, [Vec<u8>; 2]) {
    let mut p = Pair::in_sync(extra);
    assert!(p.admin(older, AdminCmd::Primary { force: false }).is_ok());
    p.disconnect(older);
    p.disconnect(1 - older);
    p.write(older, 10, 0xaa);
    p.write(older, 11, 0xaa);
    p.write(1 - older, 20, 0xbb);
    assert!(p.admin(older, AdminCmd::Secondary).is_ok());
    let before = p.disks.clone();
    p.connect(0, false);
    p.connect(1, false);
    (p, before)
}

#[test]
fn discard_younger_and_older_primary_go_by_who_was_primary_before_the_split() {
    for older in 0..2 {
        let younger = 1 - older;
        let (mut p, before) = younger_older_split(
            "[split-brain]\nafter-sb-0pri = \"discard-younger-primary\"",
            older,
        );
        p.run_until(10_000, "in sync", |p| p.in_sync_now());
        assert!(
            p.disks[younger] == before[older] && p.disks[older] == before[older],
            "discard-younger-primary, node {older} primary before the split: node {younger}'s data must go"
        );
        let (mut p, before) = younger_older_split(
            "[split-brain]\nafter-sb-0pri = \"discard-older-primary\"",
            older,
        );
        p.run_until(10_000, "in sync", |p| p.in_sync_now());
        assert!(
            p.disks[older] == before[younger] && p.disks[younger] == before[younger],
            "discard-older-primary, node {older} primary before the split: its data must go"
        );
    }
}

/// `connect --discard-my-data` resolves the split brain it was given for,
/// and no later one: the next split brain is detected and left alone.
#[test]
fn discard_my_data_applies_to_one_connection_only() {
    let mut p = Pair::in_sync("");
    p.disconnect(0);
    p.disconnect(1);
    p.write(0, 1, 0x11);
    p.write(1, 2, 0x22);
    p.connect(0, false);
    p.connect(1, false);
    assert!(
        p.standalone(0) && p.standalone(1),
        "split brain under `disconnect`: {:?} {:?}",
        p.status(0),
        p.status(1)
    );
    assert!(p.status(0).split_brain && p.status(1).split_brain);
    p.connect(1, true);
    p.connect(0, false);
    p.run_until(10_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[1][2 * 4096], 0, "beta's write was discarded");
    assert!(p.disks[0] == p.disks[1]);

    // A new split: only alpha disconnects; beta keeps trying to reconnect.
    p.disconnect(0);
    p.write(0, 3, 0x33);
    p.write(1, 4, 0x44);
    p.connect(0, false);
    p.run_ms(500);
    assert!(
        p.status(0).split_brain && p.status(1).split_brain,
        "the second split brain must be detected on both nodes"
    );
    assert!(p.standalone(0) && p.standalone(1));
    assert_eq!(
        p.disks[1][4 * 4096],
        0x44,
        "beta's data was discarded silently"
    );
    assert_eq!(p.disks[0][3 * 4096], 0x33);
}

/// A sync target whose disk fails during the resync (here: its own write as
/// primary, behind the checksum resync's cursor, so the resync still ends)
/// stays failed when the source says it is done, its out-of-sync bits kept.
#[test]
fn a_target_whose_disk_failed_is_not_made_up_to_date() {
    let mut p = Pair::in_sync(SLOW);
    let r = p.admin(
        0,
        AdminCmd::Resync {
            full: true,
            checksum: true,
        },
    );
    assert!(r.is_ok(), "{r:?}");
    p.run_ms(3000);
    p.broken[1] = true;
    p.node(1)
        .attach_client(9)
        .expect("a sync target may serve I/O");
    p.queue[1].push_back(Event::Request {
        conn: 9,
        cookie: 1,
        req: IoRequest::Write {
            offset: 0,
            data: bytes::Bytes::from(vec![1u8; 4096]),
            fua: false,
        },
    });
    p.settle();
    assert_eq!(p.status(1).disk, DiskState::Failed);
    p.run_until(30_000, "the resync over", |p| p.status(0).resync.is_none());
    assert_eq!(p.named(1, "resync-finished").len(), 1, "{:?}", p.events[1]);
    let st = p.status(1);
    assert_eq!(st.disk, DiskState::Failed, "{st:?}");
    assert!(st.out_of_sync_bytes > 0, "{st:?}");
    assert_eq!(
        p.md[1].sb.flags & md_flags::CONSISTENT,
        0,
        "{:?}",
        p.md[1].sb
    );
}

/// A primary whose disk failed starts no new generation when it loses its
/// peer: it took no new data, so it must not look newer than its peer.
#[test]
fn a_primary_with_a_failed_disk_starts_no_generation() {
    let mut p = Pair::in_sync("");
    assert!(p.admin(0, AdminCmd::Primary { force: false }).is_ok());
    p.broken[0] = true;
    p.node(0).attach_client(9).expect("primary serves I/O");
    p.queue[0].push_back(Event::Request {
        conn: 9,
        cookie: 1,
        req: IoRequest::Write {
            offset: 0,
            data: bytes::Bytes::from(vec![1u8; 4096]),
            fua: false,
        },
    });
    p.settle();
    assert_eq!(p.status(0).disk, DiskState::Failed);
    let before = p.node(0).meta().gis;
    p.crash(1);
    p.settle();
    assert_eq!(
        p.node(0).meta().gis,
        before,
        "no new generation on a failed disk"
    );
}

/// The superblock write among `actions`, if any: its id and contents.
fn superblock_write(actions: &[Action]) -> Option<(u64, MetaState)> {
    actions.iter().find_map(|a| match a {
        Action::Persist {
            id,
            write: MetaWrite::Superblock(m),
        } => Some((*id, m.clone())),
        _ => None,
    })
}

/// `primary --force` answers "primary" only once the superblock that makes
/// the disk up to date is durable: a process killed before that comes back
/// with its old, not up-to-date disk, so an earlier "primary" promised good
/// data that was gone (simulator seed 69431: "good data lost").
#[test]
fn a_forced_promotion_is_answered_once_its_superblock_is_durable() {
    let mut p = Pair::in_sync("");
    p.crash(1);
    p.crash(0);
    p.md[0].sb.flags &= !md_flags::WAS_UP_TO_DATE;
    p.boot(0);
    p.settle();
    assert_eq!(p.status(0).disk, DiskState::Outdated);
    p.node(0).handle(Event::Admin {
        id: 7,
        cmd: AdminCmd::Primary { force: true },
    });
    let actions = p.node(0).take_actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::AdminReply { .. })),
        "no answer before the superblock is durable: {actions:?}"
    );
    let sb = superblock_write(&actions);
    // A new generation: its superblock follows a flush of the data disk.
    let flush = actions.iter().find_map(|a| match a {
        Action::Disk {
            id,
            op: DiskOp::Flush,
        } => Some(*id),
        _ => None,
    });
    let Some(flush) = flush else {
        panic!("the data disk is flushed first: {actions:?}");
    };
    assert!(sb.is_none(), "no superblock before the flush: {actions:?}");
    p.node(0).handle(Event::DiskDone {
        id: flush,
        result: Ok(None),
    });
    let actions = p.node(0).take_actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::AdminReply { .. })),
        "no answer before the superblock is durable: {actions:?}"
    );
    let sb = superblock_write(&actions);
    let Some((sb_id, m)) = sb else {
        panic!("the forced superblock is written: {actions:?}");
    };
    assert_ne!(m.flags & md_flags::WAS_UP_TO_DATE, 0, "{m:?}");
    // The superblock lands: now the answer comes.
    p.md[0].sb = m;
    p.queue[0].push_back(Event::MetaDone {
        id: sb_id,
        ok: true,
    });
    p.settle();
    assert_eq!(p.replies[0], vec![Ok("primary".to_string())]);
    assert_eq!(p.status(0).disk, DiskState::UpToDate);
}

/// Dual primaries, overlapping writes in flight: the node whose write wins
/// leaves the peer's write out where they overlap. If its own write then fails,
/// neither is on its disk, so it must not acknowledge the peer's write as
/// written (a NegAck makes the peer mark the block out of sync).
#[test]
fn a_peer_write_left_out_for_a_local_write_that_failed_gets_a_negative_ack() {
    let mut p = Pair::dual_primary_warm();
    // alpha wins conflicts ("alpha" < "beta"); its disk now fails writes.
    p.broken[0] = true;
    for (i, byte) in [(0, 3u8), (1, 4u8)] {
        p.queue_write(i, 2, 5, byte);
    }
    // Run everything except alpha's failing disk completion, which is held
    // until beta's write has reached alpha and waits behind it.
    let held = p.step(|i, e| i == 0 && matches!(e, Event::DiskDone { result: Err(_), .. }));
    assert_eq!(held.len(), 1, "alpha's write is held in flight");
    assert!(
        p.named(0, "write-conflict").len() == 1,
        "beta's write reached alpha while alpha's was in flight: {:?}",
        p.events[0]
    );
    let acks_before = p.queue[1].len();
    for (_, ev) in held {
        p.node(0).handle(ev);
    }
    p.carry_out(0);
    let acks: Vec<u32> = p.queue[1]
        .iter()
        .skip(acks_before)
        .filter_map(|e| match e {
            Event::PeerMsg {
                msg: crate::peer::Message::WriteAck { error, .. },
                ..
            } => Some(*error),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![errno::EIO], "alpha's answer to beta's write");
    assert_eq!(p.status(0).disk, DiskState::Failed);
    p.settle();
    assert!(
        p.status(1).out_of_sync_bytes >= 4096,
        "beta marks the block: {:?}",
        p.status(1)
    );
}

/// A write that arrives during the connection handshake is held; when this
/// node turns out to be the sync source it must be mirrored like any write
/// during a resync (it was released before the resync started, went to this
/// disk only and was acknowledged, while the target read its stale copy).
#[test]
fn a_write_held_during_the_handshake_of_a_sync_source_is_mirrored() {
    let mut p = Pair::in_sync(SLOW);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.settle();
    p.disconnect(0);
    // Same activity-log extent as the held write below: that one goes
    // straight to the disk once released.
    p.queue_write(0, 1, 2001, 0x11);
    p.settle();
    assert!(p.status(0).out_of_sync_bytes > 0, "alpha marked its write");
    p.queue[0].push_back(Event::Admin {
        id: 1,
        cmd: AdminCmd::Connect {
            discard_my_data: false,
        },
    });
    // Step until alpha has taken the new link (its handshake is running),
    // then a client write arrives ahead of the peer's handshake messages.
    let mut handshaking = false;
    for _ in 0..10_000 {
        let before = p.link;
        let mut any = false;
        if !p.link && p.wants_link(0) && p.wants_link(1) {
            p.open_link();
        }
        for i in 0..2 {
            if let Some(ev) = p.queue[i].pop_front() {
                any = true;
                let peer_up = matches!(
                    ev,
                    Event::PeerMsg {
                        msg: crate::peer::Message::Hello(_),
                        ..
                    }
                );
                p.node(i).handle(ev);
                if i == 0 && peer_up {
                    handshaking = true;
                }
            }
            p.carry_out(i);
        }
        if handshaking || (!any && before == p.link) {
            break;
        }
    }
    assert!(handshaking, "alpha saw the link come up");
    p.queue[0].push_front(Event::Request {
        conn: 9,
        cookie: 2,
        req: IoRequest::Write {
            offset: 2000 * 4096,
            data: bytes::Bytes::from(vec![0x22; 4096]),
            fua: false,
        },
    });
    p.settle();
    let mirrored = p.sent[0].iter().any(|m| {
        matches!(m, crate::peer::Message::Write { offset, resync: false, .. } if *offset == 2000 * 4096)
    });
    assert!(mirrored, "the held write went to the peer as a write");
    assert_eq!(p.disks[1][2000 * 4096], 0x22, "beta's disk has it");
    p.run_until(30_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[0], p.disks[1]);
}

/// A primary's disk fails while its link is silently broken: its last write,
/// on its own disk but not on the peer's, is marked out of sync on it. On
/// reconnect the failed side is behind ("FailedDisk"): the up-to-date node
/// must take those marks into its own bitmap, durably, since a later resync
/// from it walks only its bitmap (simulator seed 58588: the peer's marks were
/// dropped, a resync from the up-to-date node skipped the block, and the
/// target cleared its own mark at the end).
#[test]
fn a_failed_disk_handshake_keeps_the_failed_sides_out_of_sync_blocks() {
    let mut p = Pair::in_sync("");
    p.node(1).attach_client(9).expect("beta serves I/O");
    // A first write (mirrored) warms the activity-log extent.
    p.queue_write(1, 1, 299, 0x01);
    p.settle();
    assert_eq!(p.disks[0][299 * 4096], 0x01, "alpha has beta's first write");
    let partitioned = |i: usize, e: &Event| i == 0 && matches!(e, Event::PeerMsg { .. });
    // The link is down without either node knowing: what beta sends is lost.
    p.queue_write(1, 2, 300, 0x11);
    let lost = p.step(partitioned);
    assert!(!lost.is_empty(), "beta mirrored its write");
    assert_eq!(p.disks[1][300 * 4096], 0x11, "beta's disk has the write");
    p.broken[1] = true;
    p.queue_write(1, 3, 301, 0x22);
    p.step(partitioned);
    assert_eq!(p.status(1).disk, DiskState::Failed);
    p.cut();
    p.settle();
    let decision = p.named(0, "sync-decision");
    assert_eq!(
        decision.last().map(|d| d["decision"].clone()),
        Some("FailedDisk".into()),
        "{decision:?}"
    );
    assert!(p.marked(1, 300) && p.marked(1, 301), "beta marked both");
    for block in [300, 301] {
        assert!(
            p.marked(0, block),
            "alpha took beta's mark of block {block}: {:?}",
            p.status(0)
        );
        assert!(
            p.persisted_marked(0, block),
            "alpha persisted beta's mark of block {block}"
        );
    }
    // Beta's disk works again (the fault was transient): a bitmap resync from
    // alpha, beta its target, makes both blocks equal again.
    p.broken[1] = false;
    let r = p.admin(
        0,
        AdminCmd::Resync {
            full: false,
            checksum: false,
        },
    );
    assert!(
        r.as_ref().is_ok_and(|m| m.starts_with("resync started")),
        "{r:?}"
    );
    p.run_until(30_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[0], p.disks[1]);
}

/// A sync source sends a block's resync data, then an application write to
/// it. The target writes the resync data but fails the application write;
/// the source marks the block on that negative acknowledgement. The
/// acknowledgement of the (older) resync data, arriving after it, must not
/// clear that mark (simulator seed 78044: it did, and the block stayed
/// different with no mark on either side). Here beta answers in order over
/// the FIFO link; the test holds the resync write's acknowledgement back so
/// that the two arrive at alpha in the order of that run.
#[test]
fn a_resync_ack_after_a_failed_application_write_leaves_the_block_marked() {
    let mut p = Pair::in_sync(SLOW);
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.settle();
    // Beta's disk fails the write that starts at block 5 (the application
    // write below; the resync write covering it starts at block 0).
    p.bad_offset[1] = Some(5 * 4096);
    let good_ack = |i: usize, e: &Event| {
        i == 0
            && matches!(
                e,
                Event::PeerMsg {
                    msg: crate::peer::Message::WriteAck { error: 0, .. },
                    ..
                }
            )
    };
    // A full resync: its first run (blocks 0-255) goes to beta, beta writes
    // it; its acknowledgement is held.
    p.disks[0][..1 << 20].fill(0xab);
    p.queue[0].push_back(Event::Admin {
        id: 1,
        cmd: AdminCmd::Resync {
            full: true,
            checksum: false,
        },
    });
    let mut held = p.step(good_ack);
    assert_eq!(held.len(), 1, "beta acknowledged the resync write");
    assert_eq!(p.disks[1][4 * 4096], 0xab, "beta wrote the resync data");
    p.queue_write(0, 2, 5, 0x55);
    held.extend(p.step(good_ack));
    assert_eq!(held.len(), 1, "beta acknowledged no other write");
    assert_eq!(p.status(1).disk, DiskState::Failed);
    assert!(p.status(0).resync.is_some(), "the resync still runs");
    assert!(p.marked(0, 5), "alpha marked the write beta failed");
    for (i, ev) in held {
        p.node(i).handle(ev);
        p.carry_out(i);
    }
    assert!(!p.marked(0, 4), "the resync write's ack counts for block 4");
    assert!(
        p.marked(0, 5),
        "block 5 stays marked: beta failed the later write to it"
    );
}

/// Resync writes and the out-of-sync bits of a sync target that is primary.
mod resync_marks {
    use super::*;
    use crate::peer::Message;

    /// What `run` does with the event first in a node's queue.
    enum Next {
        Handle,
        /// Set it aside (returned by `run`).
        Hold,
        /// Leave it first in its queue and return.
        Stop,
    }

    /// Handles events on both nodes as `settle` does (the link stays as it is),
    /// as `pick` says, until none is left or `pick` stops. Returns the events
    /// set aside, with their node, in order.
    fn run(p: &mut Pair, pick: impl Fn(usize, &Event) -> Next) -> Vec<(usize, Event)> {
        let mut held = Vec::new();
        for _ in 0..1_000_000 {
            let mut any = false;
            for i in 0..2 {
                let Some(ev) = p.queue[i].pop_front() else {
                    continue;
                };
                any = true;
                match pick(i, &ev) {
                    Next::Handle => p.node(i).handle(ev),
                    Next::Hold => held.push((i, ev)),
                    Next::Stop => {
                        p.queue[i].push_front(ev);
                        return held;
                    }
                }
                p.carry_out(i);
            }
            if !any {
                return held;
            }
        }
        panic!("the pair did not settle");
    }

    /// For `run`: holds the source's SyncDone for beta, handles the rest.
    fn hold_sync_done_for_beta(i: usize, ev: &Event) -> Next {
        match ev {
            Event::PeerMsg {
                msg: Message::SyncDone { .. },
                ..
            } if i == 1 => Next::Hold,
            _ => Next::Handle,
        }
    }

    /// Makes beta primary (client 9) and has it write block 5 once (its
    /// activity-log extent is active), starts a full resync from alpha to beta,
    /// and runs it as `pick` says (see `run`).
    fn beta_primary_sync_target(
        p: &mut Pair,
        pick: impl Fn(usize, &Event) -> Next,
    ) -> Vec<(usize, Event)> {
        p.node(1).attach_client(9).expect("beta serves I/O");
        p.settle();
        p.queue_write(1, 1, 5, 0x11);
        p.settle();
        assert!(p.in_sync_now());
        p.queue[0].push_back(Event::Admin {
            id: 1,
            cmd: AdminCmd::Resync {
                full: true,
                checksum: false,
            },
        });
        run(p, pick)
    }

    /// A sync target that is also primary applies a resync write around its
    /// own overlapping write the source had not seen (the local write wins:
    /// a hole). The resync write's completion counts only what it wrote as in
    /// sync: the hole's blocks stay marked, the local write's to settle (it
    /// marks them if it fails; SyncDone clears them if not). Simulator seed
    /// 83853, on a base without cd44036: the local write failed, the resync
    /// write's completion cleared the hole with the rest, and the block
    /// differed unmarked. Now the disk order settles the local write first
    /// and a completion on a failed disk clears nothing (cd44036), so the
    /// failing case keeps its mark either way; this pins the hole's
    /// bookkeeping where the local write succeeds.
    #[test]
    fn a_resync_write_around_a_winning_local_write_leaves_the_hole_marked() {
        let mut p = Pair::in_sync("[sync]\nchecksum = false");
        // Up to the first resync write reaching beta (it holds block 5).
        let held = beta_primary_sync_target(&mut p, |i, ev| match ev {
            Event::PeerMsg {
                msg: Message::Write { resync: true, .. },
                ..
            } if i == 1 => Next::Stop,
            _ => Next::Handle,
        });
        assert!(held.is_empty());
        let (offset, len) = match p.queue[1].front() {
            Some(Event::PeerMsg {
                msg: Message::Write { offset, kind, .. },
                ..
            }) => (*offset, kind.len()),
            _ => panic!("a resync write is next for beta"),
        };
        assert!(offset == 0 && len > 6 * 4096, "{offset}+{len}");
        // Beta's write to block 5 goes just before it: alpha read its data
        // before this write arrived there.
        p.queue_write(1, 2, 5, 0x22);
        let w = p.queue[1].pop_back().expect("the write");
        p.queue[1].push_front(w);
        let held = run(&mut p, hold_sync_done_for_beta);
        assert_eq!(held.len(), 1, "the resync is over on alpha");
        assert_eq!(p.named(1, "write-conflict").len(), 1, "{:?}", p.events[1]);
        assert!(
            !p.marked(1, 4) && !p.marked(1, 6),
            "the resync write cleared what it wrote"
        );
        assert!(p.marked(1, 5), "the hole (block 5) stays marked");
        for (i, ev) in held {
            p.queue[i].push_back(ev);
        }
        p.settle();
        assert!(p.in_sync_now());
        assert_eq!(p.disks[1][5 * 4096], 0x22);
        assert!(p.disks[0] == p.disks[1]);
    }

    /// A sync target's write that the source acknowledged but has not flushed
    /// is marked when the activity log evicts its extent. The target's clear-all
    /// at SyncDone must not wipe that mark: the source may still lose the write
    /// in a power cut, and neither log covers it (simulator seed 99235).
    #[test]
    fn an_evicted_unflushed_write_of_a_sync_target_stays_marked_after_sync_done() {
        // Beta's activity log: two extents (4 MiB each).
        let mut p = Pair::in_sync_with_al_slots("[sync]\nchecksum = false", 1, 2);
        let held = beta_primary_sync_target(&mut p, hold_sync_done_for_beta);
        assert_eq!(held.len(), 1, "the resync is over on alpha");
        assert_eq!(
            p.status(1).peer.map(|x| x.replication),
            Some(Replication::SyncTarget)
        );
        // No time passes: no periodic flush to alpha.
        p.queue_write(1, 2, 5, 0x55);
        p.settle();
        assert!(!p.marked(1, 5), "block 5 resynced");
        // Extents 1 and 2: extent 0 (block 5) is evicted.
        p.queue_write(1, 3, 1024, 0x66);
        p.settle();
        p.queue_write(1, 4, 2048, 0x77);
        p.settle();
        assert!(p.marked(1, 5), "the eviction marked the unflushed write");
        for (i, ev) in held {
            p.queue[i].push_back(ev);
        }
        p.settle();
        assert_eq!(p.named(1, "resync-finished").len(), 1, "{:?}", p.events[1]);
        assert_eq!(p.status(1).disk, DiskState::UpToDate);
        assert!(p.marked(1, 5), "block 5 stays marked: {:?}", p.status(1));
        assert!(p.persisted_marked(1, 5), "and persisted");
    }

    /// A sync target's write that the source failed after it had sent
    /// SyncDone stays marked through the target's end of resync (simulator
    /// seed 18775: the NegAck marked it while the SyncDone flush ran, and the
    /// clear-all at the end of the resync wiped the mark).
    #[test]
    fn a_write_the_source_failed_after_sync_done_stays_marked() {
        let mut p = Pair::in_sync("[sync]\nchecksum = false");
        let held = beta_primary_sync_target(&mut p, hold_sync_done_for_beta);
        assert_eq!(held.len(), 1, "the resync is over on alpha");
        // Beta writes block 9; alpha's disk fails that write.
        p.bad_offset[0] = Some(9 * 4096);
        p.queue_write(1, 2, 9, 0x33);
        p.settle();
        assert_eq!(p.status(0).disk, DiskState::Failed);
        assert!(p.marked(1, 9), "the NegAck marked block 9 on beta");
        for (i, ev) in held {
            p.queue[i].push_back(ev);
        }
        p.settle();
        assert_eq!(p.named(1, "resync-finished").len(), 1, "{:?}", p.events[1]);
        assert!(p.marked(1, 9), "block 9 stays marked: {:?}", p.status(1));
        assert!(p.persisted_marked(1, 9), "and persisted");
    }

    /// The source's disk fails after it sent the whole resync (its SyncDone
    /// still comes): the target, up to date now and the only such disk, starts
    /// a new generation, as when the peer's disk fails under an up-to-date
    /// node. Simulator seed 35061: it did not; its later writes were only on
    /// its disk under the common identifiers, its disk failed too, both came
    /// back outdated with the same generation, the direction went by name, and
    /// the failed source's old data overwrote the target's acknowledged write.
    #[test]
    fn a_target_made_up_to_date_after_its_source_failed_starts_a_generation() {
        let mut p = Pair::in_sync("[sync]\nchecksum = false");
        let held = beta_primary_sync_target(&mut p, hold_sync_done_for_beta);
        assert_eq!(held.len(), 1, "the resync is over on alpha");
        // Alpha's disk fails (a write of beta's it cannot store).
        p.bad_offset[0] = Some(9 * 4096);
        p.queue_write(1, 2, 9, 0x33);
        p.settle();
        assert_eq!(p.status(0).disk, DiskState::Failed);
        let alpha_gis = p.node(0).meta().gis;
        for (i, ev) in held {
            p.queue[i].push_back(ev);
        }
        p.settle();
        assert_eq!(p.status(1).disk, DiskState::UpToDate);
        let beta_gis = p.node(1).meta().gis;
        assert_ne!(beta_gis.current, alpha_gis.current, "a new generation");
        assert_eq!(beta_gis.bitmap, alpha_gis.current, "{beta_gis:?}");
        // Beta writes block 10 (only on its disk), then its disk fails too.
        p.bad_offset[0] = None;
        p.queue_write(1, 3, 10, 0x44);
        p.settle();
        assert_eq!(p.replies_for(1, 3), vec![Ok(None)]);
        p.broken[1] = true;
        p.queue_write(1, 4, 11, 0x55);
        p.settle();
        assert_eq!(p.status(1).disk, DiskState::Failed);
        // Both restart with working disks, both outdated: beta's newer data wins.
        p.crash(0);
        p.crash(1);
        p.broken[1] = false;
        p.boot(0);
        p.boot(1);
        p.settle();
        let d = p.named(1, "sync-decision");
        assert_eq!(
            d.last().map(|d| d["decision"].clone()),
            Some("Source { full: false }".into()),
            "{d:?}"
        );
        p.run_ms(5_000);
        for block in [9, 10] {
            let at = block * 4096;
            assert_eq!(p.disks[0][at], p.disks[1][at], "block {block}");
        }
        assert_eq!(p.disks[0][10 * 4096], 0x44, "beta's write reached alpha");
    }
}

/// An operator's resync on a connected pair covers the target's marks too:
/// the target's disk failed a write its peer holds (only the target marked
/// it), and a resync from the peer must send that block (before, the source
/// walked only its own bitmap and the target's end of resync cleared the mark).
#[test]
fn an_operator_resync_also_moves_the_blocks_the_target_marked() {
    let mut p = Pair::in_sync(SLOW);
    p.node(1).attach_client(9).expect("beta serves I/O");
    p.queue_write(1, 1, 4, 0x01);
    p.settle();
    p.bad_offset[1] = Some(5 * 4096);
    p.queue_write(1, 2, 5, 0x22);
    p.settle();
    assert_eq!(p.status(1).disk, DiskState::Failed);
    assert_eq!(p.disks[0][5 * 4096], 0x22, "alpha holds beta's write");
    assert!(p.marked(1, 5) && !p.marked(0, 5), "only beta marked it");
    p.node(1).detach_client(9);
    p.run_ms(100);
    p.bad_offset[1] = None;
    // alpha writes while beta's disk is failed: beta refuses, alpha marks.
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 3, 100, 0x33);
    p.settle();
    assert!(p.marked(0, 100), "alpha marked what beta refused");
    let r = p.admin(
        0,
        AdminCmd::Resync {
            full: false,
            checksum: false,
        },
    );
    assert!(r.is_ok(), "{r:?}");
    p.run_until(60_000, "in sync", |p| p.in_sync_now());
    assert_eq!(p.disks[1][5 * 4096], 0x22, "the resync sent block 5");
    assert_eq!(p.disks[0], p.disks[1]);
}

/// After a failover, a read on the new primary waits for the old primary's
/// writes still queued in its disk order: under protocol B the old primary
/// acknowledged them on our RecvAck, before they reached this disk (simulator
/// seed 3473: the read went straight to the disk and returned older data).
#[test]
fn a_read_after_failover_waits_for_the_peer_writes_still_queued() {
    let mut p = Pair::in_sync("protocol = \"B\"");
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 1, 7, 0x01);
    p.settle();
    // Two overlapping writes; beta's disk completes neither yet (the first is
    // held in flight, so the second waits behind it in beta's disk order).
    p.queue_write(0, 2, 7, 0x02);
    p.queue_write(0, 3, 7, 0x03);
    let held = p.step(|i, e| i == 1 && matches!(e, Event::DiskDone { .. }));
    assert_eq!(held.len(), 1, "beta has one write in flight: {held:?}");
    let acked: Vec<u64> = p.nbd_replies[0]
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(c, _)| *c)
        .collect();
    assert!(acked.contains(&3), "protocol B acknowledged the last write");
    assert_eq!(p.disks[1][7 * 4096], 0x02, "beta's disk has the first only");
    // Failover: alpha's client leaves, beta's arrives and reads the block.
    p.node(0).detach_client(9);
    p.step(|_, _| false);
    p.node(1).attach_client(9).expect("beta may be promoted");
    p.queue[1].push_back(Event::Request {
        conn: 9,
        cookie: 4,
        req: IoRequest::Read {
            offset: 7 * 4096,
            len: 4096,
        },
    });
    let more = p.step(|i, e| {
        i == 1
            && matches!(
                e,
                Event::DiskDone {
                    result: Ok(None),
                    ..
                }
            )
    });
    for (i, ev) in held.into_iter().chain(more) {
        p.queue[i].push_back(ev);
    }
    p.settle();
    let read = p.nbd_replies[1]
        .iter()
        .find(|(c, _)| *c == 4)
        .map(|(_, r)| r.clone());
    let data = match read {
        Some(Ok(Some(d))) => d,
        other => panic!("beta answered the read: {other:?}"),
    };
    assert!(
        data.iter().all(|b| *b == 0x03),
        "the read returns the last acknowledged write, not {:#x}",
        data[0]
    );
}

/// A clean stop empties the activity log only when the edge flushed the data
/// disk first; after a failed flush the log stays, so the next start marks
/// its extents.
#[test]
fn a_clean_stop_keeps_the_activity_log_unless_the_data_was_flushed() {
    for flushed in [false, true] {
        let mut p = Pair::in_sync("");
        p.node(0).attach_client(9).expect("alpha serves I/O");
        p.queue_write(0, 1, 3, 0x44);
        p.settle();
        assert!(!p.md[0].al.is_empty(), "the write's extent is logged");
        p.node(0).detach_client(9);
        p.node(0).shutdown(flushed);
        p.settle();
        assert_eq!(
            p.md[0].al.is_empty(),
            flushed,
            "activity log after a stop with data_flushed = {flushed}"
        );
    }
}

/// Flushes alpha sent to the peer so far.
fn peer_flushes(p: &Pair) -> usize {
    p.sent[0]
        .iter()
        .filter(|m| matches!(m, crate::peer::Message::Flush { .. }))
        .count()
}

/// A clean stop of the primary asks the peer to flush the writes it
/// acknowledged once the clients are idle, and is ready for its final metadata
/// only after the answer: the stop then leaves no `PEER_MAY_LACK`, so a
/// planned failover (the peer promoted, the old primary back later) is an
/// ordinary resync, not a split brain (chaos seed 1057296862449).
#[test]
fn a_clean_stop_flushes_the_peer_before_its_final_metadata() {
    let mut p = Pair::in_sync("");
    p.run_until(5_000, "in sync", |p| p.in_sync_now());
    p.node(0).attach_client(9).expect("alpha serves I/O");
    p.queue_write(0, 1, 3, 0x44);
    p.settle();
    assert_eq!(p.replies_for(0, 1), vec![Ok(None)], "beta acknowledged it");
    p.node(0).detach_client(9);
    p.settle();
    let before = peer_flushes(&p);
    p.node(0).handle(Event::StopBegin);
    assert!(
        !p.node(0).stop_ready(),
        "the stop waits for the peer's flush"
    );
    p.settle();
    assert_eq!(peer_flushes(&p), before + 1, "one flush, sent at the stop");
    assert!(p.node(0).stop_ready(), "answered: the stop may end");
    p.node(0).shutdown(true);
    p.settle();
    assert_eq!(
        p.md[0].sb.flags & md_flags::PEER_MAY_LACK,
        0,
        "nothing the peer acknowledged is left unflushed there"
    );
    // Nothing unflushed at the stop: no flush, and ready at once.
    let mut q = Pair::in_sync("");
    q.run_until(5_000, "in sync", |q| q.in_sync_now());
    let before = peer_flushes(&q);
    q.node(0).handle(Event::StopBegin);
    assert!(q.node(0).stop_ready());
    q.settle();
    assert_eq!(peer_flushes(&q), before, "nothing to flush");
}

/// Local writes whose data the daemon splices from the client's socket to the disk
/// (`Event::StreamWrite`): admitted only when nothing but the local disk needs the data
/// and the write can start at once; otherwise nothing happens at all.
mod stream_writes {
    use super::*;

    const LEN: u32 = 64 * 1024;

    impl Pair {
        /// A pair that was in sync, alpha disconnected and primary for client 9.
        fn disconnected_primary() -> Pair {
            let mut p = Pair::in_sync("");
            p.run_until(5_000, "in sync", |p| p.in_sync_now());
            p.disconnect(0);
            p.node(0).attach_client(9).expect("primary serves I/O");
            p.settle();
            p
        }

        /// What the daemon does for an admitted streamed write: the data reaches the disk,
        /// then the core hears that its disk op is done.
        fn finish_stream(&mut self, i: usize, id: u64, offset: u64, byte: u8) {
            let o = offset as usize;
            self.disks[i][o..o + LEN as usize].fill(byte);
            self.queue[i].push_back(Event::DiskDone {
                id,
                result: Ok(None),
            });
            self.settle();
        }
    }

    #[test]
    fn a_streamed_write_is_refused_while_replicating() {
        let mut p = Pair::in_sync("");
        p.run_until(5_000, "in sync", |p| p.in_sync_now());
        p.node(0).attach_client(9).expect("primary serves I/O");
        // An ordinary write (its extent active now) reaches both disks.
        p.queue_write(0, 1, 0, 0x5a);
        p.settle();
        assert_eq!(p.replies_for(0, 1), vec![Ok(None)]);
        assert_eq!((p.disks[0][0], p.disks[1][0]), (0x5a, 0x5a));
        // The peer needs the data: no streaming.
        assert_eq!(p.node(0).try_stream_write(9, 2, 0, LEN), None);
        p.settle();
        assert!(p.replies_for(0, 2).is_empty(), "{:?}", p.nbd_replies[0]);
    }

    /// Disconnected, a streamed write is admitted once its activity-log extent is active,
    /// answered only after its disk op is done, marked out of sync, and resynced to the
    /// peer when it reconnects.
    #[test]
    fn a_streamed_write_while_disconnected_is_marked_and_resynced() {
        let mut p = Pair::disconnected_primary();
        assert!(p.standalone(0));
        let offset = 8 << 20;
        // Its extent is not in the activity log yet: that would need a transaction first.
        assert_eq!(p.node(0).try_stream_write(9, 1, offset, LEN), None);
        p.settle();
        assert!(p.nbd_replies[0].is_empty(), "{:?}", p.nbd_replies[0]);
        // An ordinary write makes the extent active.
        p.queue_write(0, 2, offset / 4096 + 100, 0x11);
        p.settle();
        assert_eq!(p.replies_for(0, 2), vec![Ok(None)]);

        let id = p
            .node(0)
            .try_stream_write(9, 3, offset, LEN)
            .expect("admitted: not replicating, extent active, nothing overlapping");
        p.settle();
        assert!(
            p.replies_for(0, 3).is_empty(),
            "answered before its data is on the disk"
        );
        for b in 0..u64::from(LEN) / 4096 {
            assert!(
                p.marked(0, offset / 4096 + b),
                "block {b} not marked out of sync"
            );
        }
        p.finish_stream(0, id, offset, 0xab);
        assert_eq!(p.replies_for(0, 3), vec![Ok(None)]);

        p.node(0).detach_client(9);
        p.connect(0, false);
        p.run_until(10_000, "in sync", |p| p.in_sync_now());
        let o = offset as usize;
        assert!(p.disks[1][o..o + LEN as usize].iter().all(|&b| b == 0xab));
        assert!(p.disks[0] == p.disks[1]);
    }

    /// A write in flight over the same range keeps a streamed write out (it would have to
    /// wait, and the daemon cannot hold the client's socket meanwhile); one elsewhere does not.
    #[test]
    fn a_streamed_write_is_refused_behind_an_overlapping_write() {
        let mut p = Pair::disconnected_primary();
        // Two ordinary writes make both extents active.
        p.queue_write(0, 1, 0, 1);
        p.queue_write(0, 2, 8 << 8, 2);
        p.settle();
        // Now one whose disk op stays in flight.
        p.queue_write(0, 3, 0, 3);
        let held = p.step(|i, e| i == 0 && matches!(e, Event::DiskDone { .. }));
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(p.node(0).try_stream_write(9, 4, 0, LEN), None);
        let id = p.node(0).try_stream_write(9, 5, 8 << 20, LEN);
        assert!(id.is_some(), "a write elsewhere is not held up");
        for (i, e) in held {
            p.queue[i].push_back(e);
        }
        p.settle();
        assert_eq!(p.replies_for(0, 3), vec![Ok(None)]);
        assert!(p.replies_for(0, 4).is_empty());
        p.finish_stream(0, id.unwrap_or_default(), 8 << 20, 5);
        assert_eq!(p.replies_for(0, 5), vec![Ok(None)]);
    }

    /// A disk error on a streamed write fails the disk, as for any local write.
    #[test]
    fn a_failed_streamed_write_gets_eio_and_fails_the_disk() {
        let mut p = Pair::disconnected_primary();
        p.queue_write(0, 1, 0, 1);
        p.settle();
        let id = p.node(0).try_stream_write(9, 2, 0, LEN).expect("admitted");
        p.queue[0].push_back(Event::DiskDone {
            id,
            result: Err(errno::EIO),
        });
        p.settle();
        assert_eq!(p.replies_for(0, 2), vec![Err(errno::EIO)]);
        assert_eq!(p.status(0).disk, DiskState::Failed);
        assert_eq!(p.node(0).try_stream_write(9, 3, 0, LEN), None);
    }

    /// Only a primary's attached client streams.
    #[test]
    fn a_streamed_write_needs_an_attached_client_of_a_primary() {
        let mut p = Pair::in_sync("");
        p.run_until(5_000, "in sync", |p| p.in_sync_now());
        p.disconnect(0);
        p.settle();
        assert_eq!(
            p.node(0).try_stream_write(9, 1, 0, LEN),
            None,
            "secondary, client not attached"
        );
        p.node(0).attach_client(9).expect("primary serves I/O");
        p.queue_write(0, 2, 0, 1);
        p.settle();
        assert_eq!(
            p.node(0).try_stream_write(8, 3, 0, LEN),
            None,
            "not attached"
        );
        assert!(p.node(0).try_stream_write(9, 4, 0, LEN).is_some());
    }
}

mod ack_loss;
mod crossed_starts;
mod failed_disk_holder;
mod hostile_peer;
mod start_pause;
mod sync_direction;

/// Local writes wider than the activity log (`split.rs`): a TRIM, WRITE_ZEROES
/// or WRITE is carried out in pieces that each fit in the log, one client reply.
mod large_writes {
    use super::*;
    use crate::peer::{Message, WriteKind};

    const MIB: u64 = 1 << 20;

    /// A pair in sync whose alpha has an activity log of two 4 MiB extents
    /// (half the 16 MiB device), so its pieces are 8 MiB; alpha is primary for
    /// client 9, connected to beta or not.
    fn small_log_pair(connected: bool) -> Pair {
        alpha_configured(connected, |c| c.al_slots = 2)
    }

    /// A pair in sync whose alpha runs with the config `set` makes; alpha is
    /// primary for client 9, connected to beta or not.
    fn alpha_configured(connected: bool, set: impl Fn(&mut CoreConfig)) -> Pair {
        let mut p = Pair::in_sync("");
        set(&mut p.cfg[0]);
        p.crash(0);
        p.settle();
        p.boot(0);
        p.settle();
        p.run_until(5_000, "in sync", |p| p.in_sync_now());
        if !connected {
            p.disconnect(0);
        }
        p.node(0).attach_client(9).expect("primary serves I/O");
        p.settle();
        p
    }

    fn replies(p: &Pair, cookie: u64) -> Vec<NbdResult> {
        p.nbd_replies[0]
            .iter()
            .filter(|(c, _)| *c == cookie)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The lengths of the mirrored writes alpha sent, in order.
    fn mirrored(p: &Pair) -> Vec<u64> {
        p.sent[0]
            .iter()
            .filter_map(|m| match m {
                Message::Write { kind, .. } => Some(kind.len()),
                _ => None,
            })
            .collect()
    }

    fn request(p: &mut Pair, cookie: u64, req: IoRequest) {
        p.queue[0].push_back(Event::Request {
            conn: 9,
            cookie,
            req,
        });
        p.settle();
    }

    fn trim_of_the_whole_device(connected: bool) {
        let mut p = small_log_pair(connected);
        for d in p.disks.iter_mut() {
            d.fill(0xee);
        }
        let before = mirrored(&p).len();
        let len = SIZE as u32;
        request(
            &mut p,
            1,
            IoRequest::Trim {
                offset: 0,
                len,
                fua: false,
            },
        );
        assert_eq!(replies(&p, 1), vec![Ok(None)], "one reply, success");
        assert!(p.disks[0].iter().all(|b| *b == 0), "alpha trimmed");
        if connected {
            assert!(p.disks[1].iter().all(|b| *b == 0), "beta trimmed");
            assert_eq!(
                mirrored(&p)[before..],
                [8 * MIB, 8 * MIB],
                "one peer write per piece"
            );
            assert!(p.sent[0].iter().any(|m| matches!(
                m,
                Message::Write {
                    kind: WriteKind::Trim { .. },
                    ..
                }
            )));
        } else {
            assert_eq!(p.status(0).out_of_sync_bytes, SIZE, "all marked");
        }
        // Writes after it are not stuck behind it.
        p.queue_write(0, 2, 7, 0x11);
        p.settle();
        assert_eq!(replies(&p, 2), vec![Ok(None)]);
        assert_eq!(p.disks[0][7 * 4096], 0x11);
        assert!(p.node(0).clients_idle());
    }

    #[test]
    fn a_trim_wider_than_the_activity_log_completes_connected() {
        trim_of_the_whole_device(true);
    }

    #[test]
    fn a_trim_wider_than_the_activity_log_completes_disconnected() {
        trim_of_the_whole_device(false);
    }

    /// A TRIM or WRITE_ZEROES with FUA is answered (once, with its own cookie)
    /// only after a flush the core makes itself, sent to the peer after the
    /// operation; without FUA there is no flush.
    #[test]
    fn fua_trim_and_write_zeroes_are_answered_after_a_flush_of_the_core() {
        for (fua, zeroes) in [(true, false), (true, true), (false, false), (false, true)] {
            let mut p = small_log_pair(true);
            let before = peer_flushes(&p);
            let (offset, len) = (4096, 8192);
            let req = if zeroes {
                IoRequest::WriteZeroes {
                    offset,
                    len,
                    may_trim: false,
                    fua,
                }
            } else {
                IoRequest::Trim { offset, len, fua }
            };
            request(&mut p, 7, req);
            assert_eq!(replies(&p, 7), vec![Ok(None)], "one reply, success");
            assert_eq!(p.nbd_replies[0].len(), 1, "nothing but that reply");
            let flushes = peer_flushes(&p) - before;
            assert_eq!(flushes, usize::from(fua), "fua {fua} zeroes {zeroes}");
            if fua {
                let sent = &p.sent[0];
                let write = sent
                    .iter()
                    .rposition(|m| matches!(m, Message::Write { .. }));
                let flush = sent
                    .iter()
                    .rposition(|m| matches!(m, Message::Flush { .. }));
                assert!(
                    write.is_some() && flush > write,
                    "the flush follows the operation"
                );
            }
            assert!(p.node(0).clients_idle());
        }
    }

    /// Unaligned ends: pieces end on piece boundaries inside the range only.
    #[test]
    fn write_zeroes_with_unaligned_ends_in_pieces() {
        let mut p = small_log_pair(true);
        for d in p.disks.iter_mut() {
            d.fill(0xee);
        }
        let (offset, len) = (3 * MIB + 512, 12 * MIB + 1000);
        let before = mirrored(&p).len();
        let req = IoRequest::WriteZeroes {
            offset,
            len: len as u32,
            may_trim: false,
            fua: false,
        };
        request(&mut p, 1, req);
        assert_eq!(replies(&p, 1), vec![Ok(None)]);
        // Pieces: to 8 MiB, to 16 MiB (the end of the range).
        assert_eq!(
            mirrored(&p)[before..],
            [8 * MIB - offset, offset + len - 8 * MIB]
        );
        for d in &p.disks {
            let (a, b) = (offset as usize, (offset + len) as usize);
            assert!(d[a..b].iter().all(|x| *x == 0), "zeroed");
            assert_eq!((d[a - 1], d[b]), (0xee, 0xee), "nothing outside");
        }
    }

    /// A data write wider than the log (only possible with a tiny log) too.
    #[test]
    fn a_write_wider_than_the_activity_log_completes() {
        let mut p = small_log_pair(true);
        let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8).collect();
        let req = IoRequest::Write {
            offset: 0,
            data: bytes::Bytes::from(data.clone()),
            fua: true,
        };
        request(&mut p, 1, req);
        assert_eq!(replies(&p, 1), vec![Ok(None)]);
        assert!(p.disks[0] == data && p.disks[1] == data, "on both disks");
    }

    /// A pair in sync with 4 MiB pieces (4 for the device) and a TRIM budget
    /// of 50 ms on alpha, primary for client 9, connected to beta or not.
    fn budget_pair(connected: bool) -> Pair {
        let mut p = alpha_configured(connected, |c| {
            c.trim_budget_ms = 50;
            c.max_piece_extents = 1;
        });
        for d in p.disks.iter_mut() {
            d.fill(0xee);
        }
        if !connected {
            // Alpha's first write alone starts its deferred generation, whose
            // superblock waits for a data flush (100 ms on the slow disk):
            // begin it here (rewriting a block as it is), so the time measured
            // is the trim's own.
            let req = IoRequest::Write {
                offset: 0,
                data: bytes::Bytes::from(vec![0xee; 4096]),
                fua: false,
            };
            request(&mut p, 99, req);
            assert_eq!(replies(&p, 99), vec![Ok(None)]);
        }
        p
    }

    /// Sends `req` as cookie 1 to alpha, on disks that take 100 ms for every
    /// operation (each completion waits for the next tick); returns when it
    /// is answered, and the ms that took.
    fn on_a_slow_disk(p: &mut Pair, req: IoRequest) -> u64 {
        let slow = |_: usize, ev: &Event| matches!(ev, Event::DiskDone { .. });
        p.queue[0].push_back(Event::Request {
            conn: 9,
            cookie: 1,
            req,
        });
        let start = p.now;
        let mut held = p.step(slow);
        while replies(p, 1).is_empty() {
            assert!(p.now - start < 10_000, "no reply within 10 s");
            p.now += 100;
            let now_ms = p.now;
            let due = std::mem::take(&mut held);
            let ticks = (0..2).map(|i| (i, Event::Tick { now_ms }));
            for (i, ev) in ticks.chain(due) {
                if p.nodes[i].is_some() {
                    p.node(i).handle(ev);
                    p.carry_out(i);
                }
            }
            held = p.step(slow);
        }
        for (i, ev) in held {
            p.queue[i].push_back(ev);
        }
        p.settle();
        p.now - start
    }

    /// A TRIM that outlasts its time budget starts no further piece and is
    /// answered success once the pieces in flight are done: the first two
    /// pieces (8 MiB) are discarded on both disks, the rest on neither, and
    /// nothing is marked out of sync for the skipped rest (disconnected: only
    /// the pieces applied are). WRITE_ZEROES is never cut short.
    /// A TRIM, or a WRITE_ZEROES that may trim, of the whole device.
    fn whole_device(zeroes: bool) -> IoRequest {
        let len = SIZE as u32;
        if zeroes {
            IoRequest::WriteZeroes {
                offset: 0,
                len,
                may_trim: true,
                fua: false,
            }
        } else {
            IoRequest::Trim {
                offset: 0,
                len,
                fua: false,
            }
        }
    }

    #[test]
    fn a_trim_past_its_budget_is_answered_early_and_skips_the_rest() {
        for connected in [true, false] {
            let mut p = budget_pair(connected);
            let took = on_a_slow_disk(&mut p, whole_device(false));
            assert_eq!(replies(&p, 1), vec![Ok(None)], "one reply, success");
            assert_eq!(took, 100, "answered with the first two pieces");
            let half = (SIZE / 2) as usize;
            assert!(p.disks[0][..half].iter().all(|b| *b == 0), "applied");
            assert!(p.disks[0][half..].iter().all(|b| *b == 0xee), "skipped");
            let stats = p.node(0).trim_budget_stats();
            assert_eq!((stats.trims_cut_short, stats.bytes_skipped), (1, SIZE / 2));
            let event = p.events[0]
                .iter()
                .find(|e| e["event"] == "trim-budget")
                .expect("a trim-budget event");
            assert_eq!(event["skipped_bytes"], SIZE / 2);
            let message = event["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("applied 8388608 bytes within the 50 ms budget"),
                "{message}"
            );
            if connected {
                assert!(p.disks[0] == p.disks[1], "both disks equal");
                assert_eq!(mirrored(&p).iter().sum::<u64>(), SIZE / 2);
                for i in 0..2 {
                    assert_eq!(p.status(i).out_of_sync_bytes, 0, "node {i}");
                }
            } else {
                assert!(p.disks[1].iter().all(|b| *b == 0xee), "beta untouched");
                assert_eq!(p.status(0).out_of_sync_bytes, SIZE / 2, "applied only");
                p.connect(0, false);
                p.run_until(10_000, "in sync", |p| p.in_sync_now());
                assert!(
                    p.disks[0] == p.disks[1],
                    "both disks equal after the resync"
                );
            }
            assert!(p.node(0).clients_idle());

            // WRITE_ZEROES with the same budget: all of it, however long.
            let mut p = budget_pair(connected);
            let took = on_a_slow_disk(&mut p, whole_device(true));
            assert_eq!(replies(&p, 1), vec![Ok(None)]);
            assert!(took >= 200, "all four pieces: {took} ms");
            assert!(p.disks[0].iter().all(|b| *b == 0), "all zeroed");
            if connected {
                assert!(p.disks[1].iter().all(|b| *b == 0), "all zeroed on beta");
            }
            assert_eq!(p.node(0).trim_budget_stats(), TrimBudgetStats::default());
        }
    }

    /// A piece that fails fails the request (one reply), and no later piece starts.
    #[test]
    fn a_failed_piece_fails_the_request_once() {
        let mut p = small_log_pair(false);
        p.bad_offset[0] = Some(8 * MIB);
        let req = IoRequest::Write {
            offset: 0,
            data: bytes::Bytes::from(vec![0x42; SIZE as usize]),
            fua: false,
        };
        request(&mut p, 1, req);
        assert_eq!(replies(&p, 1), vec![Err(errno::EIO)]);
        assert!(p.node(0).clients_idle());
    }
}

/// A request of a connection whose client shut down its side (`Event::ClientShut`) is stale:
/// dropped, answered with ESHUTDOWN, on neither disk, and not streamed; the count goes out
/// when the connection detaches, and the next connection is served as ever.
#[test]
fn requests_after_the_client_shut_its_side_are_dropped() {
    let mut p = Pair::in_sync("");
    p.node(0).attach_client(9).expect("node serves I/O");
    p.queue_write(0, 1, 3, 0xAB);
    p.settle();
    assert_eq!(
        p.disks[0][3 * 4096],
        0xAB,
        "a request before the shutdown runs"
    );
    p.node(0).handle(Event::ClientShut { conn: 9 });
    assert_eq!(
        p.node(0).try_stream_write(9, 2, 5 * 4096, 4096),
        None,
        "no streamed write after the shutdown"
    );
    p.queue_write(0, 3, 3, 0xCD);
    p.queue_write(0, 4, 4, 0xCD);
    p.settle();
    for i in 0..2 {
        assert_eq!(p.disks[i][3 * 4096], 0xAB, "stale write on node {i}'s disk");
        assert_eq!(p.disks[i][4 * 4096], 0, "stale write on node {i}'s disk");
    }
    let stale: Vec<&(u64, NbdResult)> = p.nbd_replies[0].iter().filter(|r| r.0 >= 3).collect();
    assert_eq!(stale.len(), 2, "each stale request answered once");
    assert!(
        stale.iter().all(|r| r.1 == Err(errno::ESHUTDOWN)),
        "{stale:?}"
    );
    p.node(0).detach_client(9);
    p.settle();
    let dropped: Vec<&serde_json::Value> = p.events[0]
        .iter()
        .filter(|e| e["event"] == "stale-requests-dropped")
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["requests"], 2);
    p.write(0, 4, 0xEF);
}
