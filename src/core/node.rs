//! The node state machine: local NBD requests, the disk order, the activity log,
//! roles and metadata. Peer messages are in `replication.rs`, resync in `resync.rs`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde_json::json;

use super::activity_log::{ActivityLog, Admit, EXTENT};
use super::bitmap::{Bitmap, BLOCK};
use super::meta_txn::SbDone;
use super::ordering::Range;
use super::peer_owed::Recent;
use super::requests::Answer;
use super::types::*;
use crate::peer::{Gis, Message, PeerDisk, PeerRole};

#[derive(Debug)]
pub(super) enum Io {
    /// One piece of a write entry.
    WritePart {
        write: u64,
    },
    Read {
        conn: ConnId,
        cookie: u64,
    },
    Flush {
        req: u64,
    },
    /// A flush the peer asked for.
    PeerFlush {
        id: u64,
    },
    /// The flush every start begins with: what an earlier process of this
    /// node wrote may still sit in the page cache, not on the disk. A sync
    /// source must not send such data before it is durable here (simulator
    /// finding: after a kill -9 and restart the new process sent cached blocks
    /// as resync data, then lost them in a power cut, and the disks differed
    /// with no out-of-sync bit set). The peer link starts once it is done.
    BootFlush,
    /// The flush a sync source starts with: blocks it finds equal (checksum
    /// resync) or sends must be on its own medium before their bits go
    /// (simulator finding: a mirrored write still in the source's cache matched,
    /// its bit was cleared, and a power cut on the source lost it).
    ResyncStartFlush,
    /// The sync target's flush before it becomes up to date.
    SyncDoneFlush {
        source_gis: crate::peer::Gis,
        epoch: u64,
    },
    /// A read the peer asked for (we are its sync source).
    PeerRead {
        id: u64,
    },
    /// Resync or checksum read of the local disk.
    ResyncRead {
        write: u64,
    },
    /// Read to answer a peer's checksum request.
    ChecksumRead {
        id: u64,
        verify: bool,
    },
    /// Data flush before a superblock write that starts a new generation
    /// (`MetaTxns::flush_before_superblock`).
    SuperblockFlush,
    /// Data flush before an activity-log transaction that evicts extents.
    AlFlush {
        set: Vec<u32>,
        /// The extents the transaction drops from the log.
        evicted: Vec<u32>,
    },
    /// Flush before the read that answers a checksum-resync request.
    ChecksumFlush {
        id: u64,
        offset: u64,
        len: u32,
    },
}

#[derive(Debug)]
pub(super) enum Origin {
    Local {
        req: u64,
    },
    Peer {
        seq: u64,
        resync: bool,
        epoch: u64,
        /// Parts of a resync write left to overlapping local writes that win.
        holes: Vec<Range>,
    },
    /// A resync read on the sync source; holds the order until its data is queued.
    ResyncRead,
    /// A read the peer asked for, behind the peer's earlier writes in the order.
    PeerRead {
        id: u64,
    },
    /// A read answering the peer's checksum request, behind writes in flight
    /// here (simulator finding: a checksum read that overtook a local write
    /// still in flight matched the source, the bit was cleared, and the write
    /// then landed: the disks differed with no bit set).
    ChecksumRead {
        id: u64,
        verify: bool,
    },
    /// An NBD read ordered behind the overlapping writes in flight or waiting
    /// here: after a failover the old primary's last writes, acknowledged to
    /// its client on our RecvAck (protocol B) or before (A), may still be in
    /// this disk order, not on the disk.
    LocalRead {
        conn: ConnId,
        cookie: u64,
    },
}

/// An entry of the disk order.
#[derive(Debug)]
pub(super) struct WriteEntry {
    pub range: Range,
    pub origin: Origin,
    /// What to submit once it may start (a trimmed peer write may have several pieces or none).
    pub pieces: Vec<DiskOp>,
    /// A local write whose data the daemon copies from the client's connection to the disk
    /// itself ([`Node::try_stream_write`]): no piece, one part, no `Action::Disk`.
    pub streamed: bool,
    pub parts_pending: u32,
    pub ready: bool,
    pub al_ok: bool,
    pub submitted: bool,
    pub error: u32,
}

pub struct Node {
    /// The peer session: what lives exactly as long as one (peer_session.rs).
    pub(super) session: super::peer_session::PeerSession,
    pub(super) cfg: CoreConfig,
    pub(super) rng: u64,
    pub(super) role: Role,
    pub(super) disk: DiskState,
    pub(super) meta: MetaState,
    pub(super) conn: ConnState,
    pub(super) repl: Replication,
    pub(super) want_connect: bool,
    pub(super) discard_my_data: bool,
    /// Requests held, FUA trims waiting for their flush, the stream grant (client_waits.rs).
    pub(super) waits: super::client_waits::ClientWaits,
    pub(super) clients: BTreeSet<ConnId>,
    /// Attached connections whose client shut down its sending side
    /// ([`Event::ClientShut`]), with the requests dropped since (clients.rs).
    pub(super) shut_clients: BTreeMap<ConnId, u64>,
    /// The id counter and the disk operations in flight (disk_ops.rs).
    pub(super) ops: super::disk_ops::DiskOps,
    /// The NBD requests in flight and the large writes in pieces (requests.rs).
    pub(super) reqs: super::requests::Requests,
    /// The disk order and its entries (write_table.rs).
    pub(super) writes: super::write_table::WriteTable,
    pub(super) bitmap: Bitmap,
    /// The activity log and the metadata writes in flight (meta_txn.rs).
    pub(super) txn: super::meta_txn::MetaTxns,
    /// A clean stop has begun (`Node::begin_stop`).
    pub(super) stopping: bool,
    /// The flush a clean stop sent the peer once its clients were idle (stop.rs).
    pub(super) stop_peer_flush: Option<u64>,
    /// What the peer owes us in this session: writes, flushes, reads (peer_owed.rs).
    pub(super) owed: super::peer_owed::PeerOwed,
    pub(super) now_ms: u64,
    /// The resync's pace controller (resync_rate.rs).
    pub(super) resync_rate: super::resync_rate::ResyncRate,
    /// The peer connections and which one carries the session (links.rs).
    pub(super) links: super::links::Links,
    /// The flush every start begins with is done: the peer link may start.
    pub(super) boot_flushed: bool,
    pub(super) out: Vec<Action>,
    pub(super) split_brain: bool,
    /// What holds local writes: fencing's suspension, a pause (freeze.rs).
    pub(super) freeze: super::freeze::Freeze,
    /// This node crashed while primary and has not synced since.
    pub(super) crashed_primary: bool,
    /// Primary because an NBD client arrived: demoted when the last one leaves.
    pub(super) auto_promoted: bool,
    /// Admin commands (`primary`) answered once the superblock of a forced
    /// promotion is durable: "primary" before that was a promise a process
    /// kill could break (simulator seed 69431).
    pub(super) force_replies: Vec<u64>,
    /// Incremented on every new peer connection; acks of older links are dropped.
    pub(super) link_epoch: u64,
    /// The resync this node drives or receives, verify results (sync_state.rs).
    pub(super) sync: super::sync_state::SyncState,
    /// TRIMs cut short by their time budget (core/split.rs).
    pub(super) trim_budget_stats: TrimBudgetStats,
    /// Deliberate bugs for the simulator's fault tests (never set by the daemon).
    pub(super) faults: Faults,
}

impl Node {
    /// A node starting from persisted metadata. `bitmap_words` and `active_extents`
    /// come from the metadata store; `seed` feeds the generator of new identifiers.
    pub fn new(
        cfg: CoreConfig,
        meta: MetaState,
        bitmap_words: &[u64],
        active_extents: &[u32],
        seed: u64,
    ) -> Node {
        let mut bitmap = Bitmap::from_words(cfg.data_size, cfg.bitmap_bits_per_page, bitmap_words);
        let crashed = meta.flags & md_flags::PRIMARY != 0;
        // Whatever was hot in the activity log may differ from the peer: mark it.
        let mut replayed = 0;
        for e in active_extents {
            let start = *e as u64 * EXTENT;
            if start < cfg.data_size {
                let len = EXTENT.min(cfg.data_size - start);
                replayed += bitmap.set_range(Range::new(start, len));
            }
        }
        let disk = if meta.flags & md_flags::CONSISTENT == 0 {
            DiskState::Inconsistent
        } else if meta.flags & md_flags::WAS_UP_TO_DATE == 0 {
            DiskState::Outdated
        } else {
            DiskState::UpToDate
        };
        let al = cfg
            .peer
            .as_ref()
            .map(|_| ActivityLog::new(cfg.al_slots, &[]));
        let mut node = Node {
            rng: seed | 1,
            role: Role::Secondary,
            disk,
            conn: ConnState::Standalone,
            repl: Replication::Off,
            want_connect: cfg.peer.is_some(),
            discard_my_data: false,
            waits: super::client_waits::ClientWaits::default(),
            clients: BTreeSet::new(),
            shut_clients: BTreeMap::new(),
            ops: super::disk_ops::DiskOps::default(),
            reqs: super::requests::Requests::default(),
            writes: super::write_table::WriteTable::new(),
            bitmap,
            txn: super::meta_txn::MetaTxns::new(al),
            stopping: false,
            stop_peer_flush: None,
            owed: super::peer_owed::PeerOwed::default(),
            now_ms: 0,
            resync_rate: super::resync_rate::ResyncRate::new(0),
            session: super::peer_session::PeerSession::new(0),
            links: super::links::Links::default(),
            boot_flushed: false,
            out: Vec::new(),
            split_brain: false,
            freeze: super::freeze::Freeze::default(),
            crashed_primary: false,
            auto_promoted: false,
            force_replies: Vec::new(),
            link_epoch: 0,
            sync: super::sync_state::SyncState::default(),
            trim_budget_stats: TrimBudgetStats::default(),
            faults: Faults::default(),
            meta: meta.clone(),
            cfg,
        };
        if crashed || replayed > 0 || !active_extents.is_empty() {
            // Persist the replayed bitmap and an empty activity log, keep the crash mark
            // (it tells the peer this node was a crashed primary) until the next sync.
            let pages = node.bitmap.take_dirty();
            node.persist_bitmap_pages(pages);
            if node.txn.al().is_some() {
                let id = node.new_id();
                node.out.push(Action::Persist {
                    id,
                    write: MetaWrite::ActivityLog(Vec::new()),
                });
            }
            node.notify(
                "activity-log-replayed",
                json!({ "blocks": replayed, "crashed_primary": crashed }),
            );
        }
        // The primary mark is set again on promotion; the crash is remembered
        // (and told to the peer) until the next completed sync.
        node.meta.flags &= !md_flags::PRIMARY;
        node.crashed_primary = crashed;
        let id = node.new_id();
        node.ops.begin(id, Io::BootFlush);
        node.out.push(Action::Disk {
            id,
            op: DiskOp::Flush,
        });
        if node.cfg.peer.is_some() {
            // The first dial follows when the boot flush is done.
            node.conn = ConnState::Connecting;
        }
        if node.start_pause_applies() {
            node.begin_start_pause();
        }
        node
    }

    /// Takes the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// Appends the actions produced so far to `out`.
    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.out);
    }

    pub(super) fn new_id(&mut self) -> u64 {
        self.ops.new_id()
    }

    /// A fresh, nonzero generation identifier with the low bit clear.
    pub(super) fn new_gi(&mut self) -> u64 {
        loop {
            // splitmix64
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let v = z & !1;
            if v != 0 {
                return v;
            }
        }
    }

    /// Turns on deliberate bugs (see [`Faults`]). Only the simulator's fault
    /// tests call this; the daemon never does.
    pub fn inject_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// TRIMs cut short by their time budget since the start.
    pub fn trim_budget_stats(&self) -> TrimBudgetStats {
        self.trim_budget_stats
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk_state(&self) -> DiskState {
        self.disk
    }

    pub fn meta(&self) -> &MetaState {
        &self.meta
    }

    /// The client request (connection, cookie) whose write went to the peer
    /// as write `seq` of this session and is not acknowledged yet; None for a
    /// resync write or one not tracked. Read-only, for the simulator's checker
    /// (a trim or write-zeroes carries no data that tells whose it is).
    pub fn peer_write_origin(&self, seq: u64) -> Option<(ConnId, u64)> {
        let rid = self.owed.write_req(seq)?;
        self.reqs.origin(rid)
    }

    pub fn bitmap_words(&self) -> &[u64] {
        self.bitmap.words()
    }

    pub fn out_of_sync_blocks(&self) -> u64 {
        self.bitmap.count()
    }

    /// Disk operations decided but not yet handed to the disk (waiting in the
    /// disk order, e.g. a peer's write behind an overlapping one): each may
    /// still land. For the simulator's model.
    pub fn queued_disk_ops(&self) -> impl Iterator<Item = &DiskOp> {
        self.writes.queued_ops()
    }

    /// No NBD request is in flight or held (what a clean stop waits for).
    pub fn clients_idle(&self) -> bool {
        self.reqs.is_empty()
            && self.waits.none_held()
            && self.reqs.no_splits()
            && !self.owed.has_reads()
            && !self.ops.client_read_in_flight()
            && !self.writes.any_local_read()
    }

    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty()
            && self.reqs.no_splits()
            && self.writes.is_empty()
            && self.ops.is_empty()
            && self.sync.source().is_none()
    }

    pub(super) fn notify(&mut self, event: &str, mut detail: serde_json::Value) {
        if let Some(obj) = detail.as_object_mut() {
            obj.insert("event".into(), json!(event));
            obj.insert("resource".into(), json!(self.cfg.resource));
            obj.insert("node".into(), json!(self.cfg.node));
        }
        self.out.push(Action::Notify(detail));
    }

    pub(super) fn peer_disk_of(d: DiskState) -> PeerDisk {
        match d {
            DiskState::UpToDate => PeerDisk::UpToDate,
            DiskState::Inconsistent => PeerDisk::Inconsistent,
            DiskState::Outdated => PeerDisk::Outdated,
            DiskState::Failed => PeerDisk::Failed,
            DiskState::Diskless => PeerDisk::Diskless,
        }
    }

    pub(super) fn peer_role_of(r: Role) -> PeerRole {
        match r {
            Role::Primary => PeerRole::Primary,
            Role::Secondary => PeerRole::Secondary,
        }
    }

    /// Whether writes are currently mirrored to the peer.
    pub(super) fn replicating(&self) -> bool {
        self.conn == ConnState::Connected
            && self.session.handshake.is_none()
            && self.repl != Replication::Off
    }

    /// Sends `msg` on the session's connection (nothing while there is none).
    pub(super) fn send(&mut self, msg: Message) {
        if let Some(link) = self.links.session() {
            debug_assert_eq!(self.conn, ConnState::Connected);
            self.out.push(Action::Send { link, msg });
        }
    }

    pub(super) fn send_state(&mut self) {
        let m = Message::State {
            role: Self::peer_role_of(self.role),
            disk: Self::peer_disk_of(self.disk),
        };
        self.send(m);
    }

    // ----- events -----

    pub fn handle(&mut self, ev: Event) {
        debug_assert!(self.waits.between_events());
        match ev {
            Event::Request { conn, cookie, req } => self.on_request(conn, cookie, req),
            Event::DiskDone { id, result } => self.on_disk_done(id, result),
            Event::MetaDone { id, ok } => self.on_meta_done(id, ok),
            Event::ConnOffered { link, dialed } => self.on_conn_offered(link, dialed),
            Event::PeerMsg { link, msg } => self.on_link_msg(link, msg),
            Event::ConnDown { link, reason } => self.on_conn_down(link, &reason),
            Event::Tick { now_ms } => self.on_tick(now_ms),
            Event::Admin { id, cmd } => self.on_admin(id, cmd),
            Event::FenceDone { id, exit } => self.on_fence_done(id, exit),
            Event::ClientAttach { conn } => self.on_client_attach(conn),
            Event::ClientDetach { conn } => self.on_client_detach(conn),
            Event::ClientShut { conn } => self.on_client_shut(conn),
            Event::StreamWrite {
                conn,
                cookie,
                offset,
                len,
            } => self.on_stream_write(conn, cookie, offset, len),
            Event::StopBegin => self.on_stop_begin(),
            Event::StopFinal { data_flushed } => self.on_stop_final(data_flushed),
        }
        if self.waits.fua_flushes_due() {
            self.run_fua_flushes();
        }
        debug_assert!(self.waits.between_events());
    }

    pub fn status(&self) -> Status {
        Status {
            resource: self.cfg.resource.clone(),
            node: self.cfg.node.clone(),
            role: self.role,
            disk: self.disk,
            size_bytes: self.cfg.data_size,
            out_of_sync_bytes: self.bitmap.bytes(),
            nbd_clients: self.clients.len(),
            peer: self.cfg.peer.as_ref().map(|name| PeerStatus {
                name: name.clone(),
                connection: self.conn,
                replication: if self.conn == ConnState::Connected {
                    self.repl
                } else {
                    Replication::Off
                },
                role: self.session.peer.as_ref().map(|p| p.role),
                disk: self.session.peer.as_ref().map(|p| p.disk),
                writes_in_flight: self.owed.writes_in_flight(),
            }),
            resync: self.resync_status(),
            sync: SyncCounters {
                last_verify_differing_blocks: self.sync.last_verify(),
                ..self.sync.stats()
            },
            split_brain: self.split_brain,
            suspended: self.freeze.frozen(),
        }
    }

    // ----- roles -----

    pub(super) fn promote(&mut self, force: bool) -> Result<(), String> {
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.session.handshake.is_some() {
            return Err("the peer link is in its handshake; try again in a moment".into());
        }
        if let Some(p) = &self.session.peer {
            if self.conn == ConnState::Connected
                && p.role == Role::Primary
                && !self.cfg.allow_two_primaries
            {
                return Err(format!(
                    "peer {} is primary and allow-two-primaries is false",
                    self.cfg.peer.clone().unwrap_or_default()
                ));
            }
        }
        match self.disk {
            DiskState::UpToDate => {}
            DiskState::Inconsistent
                if self.repl == Replication::SyncTarget
                    && !force
                    && self
                        .session.peer
                        .as_ref()
                        .is_some_and(|p| p.disk == DiskState::UpToDate) =>
            {
                // A sync target may be primary: it reads missing blocks from the
                // source, while the source's disk is up to date.
            }
            DiskState::Inconsistent | DiskState::Outdated if force => {
                if self.repl == Replication::SyncTarget {
                    return Err("cannot force primary while being sync target".into());
                }
                self.disk = DiskState::UpToDate;
                self.meta.flags |= md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
                self.meta.flags &= !(md_flags::FULL_SYNC_NEEDED | md_flags::SYNC_TARGET);
                self.bump_current_gi();
                self.notify("forced-up-to-date", json!({}));
            }
            other => {
                return Err(format!(
                    "disk is {} on {}; refusing to become primary (use --force to make this node's data the one that wins)",
                    serde_json::to_value(other).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                    self.cfg.node
                ))
            }
        }
        self.role = Role::Primary;
        self.meta.flags |= md_flags::PRIMARY;
        let peer_disk_gone = self
            .session
            .peer
            .as_ref()
            .is_some_and(|p| matches!(p.disk, DiskState::Failed | DiskState::Diskless));
        if self.cfg.peer.is_some()
            && self.disk == DiskState::UpToDate
            && (!self.replicating() || peer_disk_gone)
            && self.meta.gis.bitmap == 0
        {
            // Writes from now on are not on the peer (it is away, or its disk
            // is): a new data generation starts with the first of them, unless one
            // already started since the last sync (a set bitmap identifier), as
            // DRBD does. Another generation would push the last common one out of
            // the two-slot history: after a few promotions on both sides the nodes
            // became unrelated (simulator finding).
            if peer_disk_gone {
                self.bump_current_gi();
            } else {
                self.defer_generation(false);
            }
        }
        self.persist_superblock(true);
        self.send_state();
        if self.replicating() && !self.cfg.allow_two_primaries {
            // The peer may have become primary too, its State still on the way (or
            // the link silently dead): serve nothing until it answers a ping sent
            // after our State. Both nodes otherwise served I/O as primaries on a
            // "connected" pair, reads missing the other's writes (simulator finding).
            self.session.pings_sent += 1;
            self.session.promote_confirm = Some(self.session.pings_sent);
            if self.session.ping_outstanding.is_none() {
                self.session.ping_outstanding = Some(self.now_ms);
            }
            self.send(Message::Ping);
        }
        self.notify("role", json!({ "role": "primary" }));
        // Primary without the peer, which may be up to date: outdate it first.
        self.maybe_fence(None, "promoted without the peer");
        if force && self.replicating() {
            if let Some(p) = &self.session.peer {
                if p.disk != DiskState::UpToDate {
                    self.start_resync_as_source(true, false);
                }
            }
        }
        Ok(())
    }

    pub(super) fn demote(&mut self) {
        self.auto_promoted = false;
        if self.role == Role::Secondary {
            return;
        }
        self.role = Role::Secondary;
        self.meta.flags &= !md_flags::PRIMARY;
        self.persist_superblock(false);
        self.send_state();
        self.notify("role", json!({ "role": "secondary" }));
        // A secondary writes nothing: held requests are refused, not frozen.
        self.resume_io("role changed to secondary");
    }

    /// The next local write the peer does not get starts a new data generation;
    /// `primary_before`: this node was primary when it lost the peer.
    pub(super) fn defer_generation(&mut self, primary_before: bool) {
        let mark = self.txn.defer_generation(primary_before);
        self.notify("generation-deferred", json!({ "primary_before": mark }));
    }

    /// A local write the peer does not get is about to be issued: if a generation
    /// was deferred, it starts now, and the write waits until the new identifier
    /// is durable (`gate_writes`), so no data of the new generation is on the
    /// disk under the old identifier.
    fn start_deferred_generation(&mut self) {
        // Called before every unreplicated local write; most find no deferred generation.
        let Some(mark) = self.txn.take_deferred_generation() else {
            return;
        };
        debug_assert!(!self.replicating());
        if self.role == Role::Primary
            && self.disk == DiskState::UpToDate
            && self.meta.gis.bitmap == 0
        {
            self.new_generation(mark);
            self.persist_superblock(true);
            debug_assert!(self.txn.gated());
        }
        debug_assert!(!self.txn.generation_deferred());
    }

    /// The peer's disk is gone (failed or detached) while this one is up to
    /// date: what is written from now on is only here. With a primary on either
    /// side, start a new generation, as DRBD does when it loses the peer's disk
    /// (simulator finding: without one, both disks later came back with the same
    /// generation and the sync direction went by name, discarding the writes
    /// made meanwhile). Called when the peer's disk goes, and when this disk
    /// becomes up to date after the peer's went (the end of a resync whose
    /// source failed after sending it all: simulator seed 35061).
    pub(super) fn new_generation_without_peer_disk(&mut self) {
        let Some(peer) = self.session.peer.as_ref() else {
            return; // no peer session: on_peer_down decides about generations
        };
        debug_assert!(matches!(peer.disk, DiskState::Failed | DiskState::Diskless));
        if self.disk == DiskState::UpToDate
            && (self.role == Role::Primary || peer.role == Role::Primary)
            && self.meta.gis.bitmap == 0
        {
            self.new_generation(self.role == Role::Primary);
            self.persist_superblock(true);
        }
    }

    /// Starts a new data generation: this node's data now differs from the last common one.
    pub(super) fn bump_current_gi(&mut self) {
        self.new_generation(false);
    }

    /// [`Node::bump_current_gi`]; `lost_peer`: a primary that lost its peer starts
    /// it. The low bit of `current` marks such a generation (the node was primary
    /// before any split brain that follows, as the low bit of DRBD's UUIDs does),
    /// and later generations keep it until the next sync; discard-younger-primary
    /// and discard-older-primary read it.
    pub(super) fn new_generation(&mut self, lost_peer: bool) {
        let g = &mut self.meta.gis;
        let mark = lost_peer as u64 | ((g.bitmap != 0) as u64 & g.current & 1);
        if g.bitmap == 0 {
            g.bitmap = g.current;
        } else if g.current != g.bitmap {
            g.history = [g.current, g.history[0]];
        }
        let new = self.new_gi() | mark;
        self.meta.gis.current = new;
        // Everything this disk completed before is flushed before the new
        // identifier can be durable, as DRBD writes its new current UUID with
        // a preflush: the new generation says this disk holds the only good
        // data, which includes the peer's acknowledged writes still in its
        // cache here (sim-long seed 36115: the peer's disk failed on a metadata
        // write, this node started a generation, lost power with the peer's
        // acknowledged write unflushed, and the resync from its newer
        // generation went over the peer's copy).
        self.txn.flush_before_superblock();
        self.notify("new-current-gi", json!({ "gis": gis_json(&self.meta.gis) }));
    }

    // ----- metadata -----

    /// This node holds writes its peer acknowledged but had not flushed when
    /// the link was lost (`md_flags::PEER_MAY_LACK`, told in the Hello).
    pub(super) fn peer_may_lack(&self) -> bool {
        self.meta.flags & md_flags::PEER_MAY_LACK != 0
    }

    /// The link was lost with `unflushed` writes the peer acknowledged but had
    /// not flushed: a peer that lost power lacks them, and this node may make
    /// them durable alone (its flushes answered without the peer). Recorded in
    /// the superblock, queued before any such flush is answered, so that the
    /// next sync decision takes them from here (docs/SYNC-DECISION.md). Only an
    /// up-to-date disk holds data another node should take.
    pub(super) fn mark_peer_may_lack(&mut self, unflushed: &[Range]) {
        if unflushed.is_empty() || self.disk != DiskState::UpToDate || self.peer_may_lack() {
            return;
        }
        self.meta.flags |= md_flags::PEER_MAY_LACK;
        self.persist_superblock(false);
        debug_assert!(self.peer_may_lack());
    }

    /// The link was lost with `unconfirmed` writes answered to their clients
    /// before the peer acknowledged them (protocol A, B): the peer may never
    /// have received them, so this node holds acknowledged writes the peer may
    /// lack, as for [`Node::mark_peer_may_lack`]. They reached this disk while
    /// it was up to date; a disk that failed since still holds them, and the
    /// flag makes the sync decision wait for it rather than let the peer's
    /// older data serve (docs/SYNC-DECISION.md).
    pub(super) fn mark_unconfirmed_acknowledged(&mut self, unconfirmed: &[Range]) {
        if unconfirmed.is_empty()
            || !matches!(self.disk, DiskState::UpToDate | DiskState::Failed)
            || self.peer_may_lack()
        {
            return;
        }
        self.meta.flags |= md_flags::PEER_MAY_LACK;
        self.persist_superblock(false);
        debug_assert!(self.peer_may_lack());
    }

    /// Queues a superblock write; with `gate`, local writes wait until it is durable.
    pub(super) fn persist_superblock(&mut self, gate: bool) {
        if !self.txn.want_superblock(gate) {
            return; // written again when the write in flight is done
        }
        let id = self.new_id();
        if self.txn.begin_superblock(id) {
            self.ops.begin(id, Io::SuperblockFlush);
            self.out.push(Action::Disk {
                id,
                op: DiskOp::Flush,
            });
            return;
        }
        self.out.push(Action::Persist {
            id,
            write: MetaWrite::Superblock(self.meta.clone()),
        });
    }

    /// The data flush before a new generation's superblock is done: the
    /// superblock (as it is now) is written. A failed flush fails the disk:
    /// what it held may not be durable, so it must not count as the only good
    /// data (its superblock says so once written).
    fn on_superblock_flush_done(&mut self, result: Result<Option<Bytes>, u32>) {
        if result.is_err() {
            self.disk_failed("flush error");
        }
        let id = self.new_id();
        self.txn.superblock_flushed(id);
        self.out.push(Action::Persist {
            id,
            write: MetaWrite::Superblock(self.meta.clone()),
        });
    }

    pub(super) fn persist_bitmap_pages(&mut self, pages: Vec<usize>) {
        if pages.is_empty() {
            return;
        }
        let id = self.new_id();
        let words = std::sync::Arc::new(self.bitmap.words().to_vec());
        self.out.push(Action::Persist {
            id,
            write: MetaWrite::BitmapPages { pages, words },
        });
    }

    fn on_meta_done(&mut self, id: u64, ok: bool) {
        if !ok {
            self.meta_write_failed();
        }
        if self.txn.end_al_txn(id) {
            self.readmit_al_waiters();
        }
        match self.txn.end_superblock(id) {
            SbDone::Other => {}
            SbDone::Again => self.persist_superblock(false),
            SbDone::Durable { ungated } => {
                if ungated {
                    // In id (arrival) order: HashMap order would make the disk
                    // submission order, hence replays, differ from run to run.
                    for w in self.writes.ids_sorted() {
                        self.try_start(w);
                    }
                }
                if !self.force_replies.is_empty() {
                    self.answer_forced_promotions();
                }
                if std::mem::take(&mut self.session.sync_done_wait)
                    && ok
                    && self.conn == ConnState::Connected
                {
                    self.send(Message::SyncDone {
                        source_gis: self.meta.gis,
                    });
                }
            }
        }
    }

    /// A superblock is durable: the forced promotions waiting for it are
    /// answered (it carries their up-to-date flags, unless the disk failed or
    /// the node was demoted meanwhile).
    fn answer_forced_promotions(&mut self) {
        let lasted = self.disk == DiskState::UpToDate && self.role == Role::Primary;
        for id in std::mem::take(&mut self.force_replies) {
            let result = if lasted {
                Ok("primary".to_string())
            } else {
                Err(format!(
                    "the forced promotion did not last: disk {:?}, role {:?}",
                    self.disk, self.role
                ))
            };
            self.out.push(Action::AdminReply { id, result });
        }
        assert!(self.force_replies.is_empty());
    }

    /// A metadata write failed (EIO): what is on the metadata disk (bitmap,
    /// activity log, identifiers) may no longer say what differs from the peer.
    /// The disk fails now (as DRBD detaches on a meta-data I/O error), like a
    /// data-disk error: it takes no more writes, and after a restart it is
    /// outdated until a sync. Its data stays what it was (it may be the only copy
    /// of acknowledged writes: marking it inconsistent threw those away in a sync
    /// from an older peer, simulator finding), but every block counts as out of
    /// sync, so the next resync, in whichever direction the identifiers decide,
    /// moves all of it (simulator finding: a lost bitmap page made a bitmap-based
    /// resync miss blocks).
    fn meta_write_failed(&mut self) {
        if self.cfg.peer.is_some() {
            self.meta.flags |= md_flags::FULL_SYNC_NEEDED;
            self.bitmap.set_all();
            // Every page, not only the changed ones: the failed write may have
            // been pages whose bits were already set in memory (seed 489).
            self.bitmap.take_dirty();
            let last = self.bitmap.page_of(self.bitmap.bits().saturating_sub(1));
            self.persist_bitmap_pages((0..=last).collect());
            if self.faults.meta_failure_discards_data {
                // Fault injection (simulator only): the old rule.
                self.meta.flags &= !md_flags::CONSISTENT;
            }
        }
        self.disk_failed("metadata write failed");
        self.persist_superblock(false);
        assert_eq!(self.disk, DiskState::Failed);
        assert!(self.cfg.peer.is_none() || self.bitmap.count() == self.bitmap.bits());
    }

    pub(super) fn disk_failed(&mut self, why: &str) {
        if self.disk != DiskState::Failed {
            self.disk = DiskState::Failed;
            self.notify("disk-failed", json!({ "reason": why }));
            self.send_state();
            if self.repl == Replication::SyncSource {
                // What it sent may not be what its disk holds any more: the
                // resync must not finish and declare the target up to date
                // (simulator finding: it did, and a block differed unmarked).
                self.stop_resync();
            }
            if self.cfg.peer.is_some() {
                // It may miss writes: after a restart it is outdated (no promotion
                // without --force) until a sync. Coming back up to date let it be
                // promoted and serve stale data, then become a sync source that
                // discarded acknowledged writes (simulator finding).
                self.meta.flags &= !md_flags::WAS_UP_TO_DATE;
                self.persist_superblock(false);
            }
            // No write can succeed here any more: frozen ones fail now instead
            // of waiting for a fencing answer (simulator finding: a stop then
            // waited on them forever).
            self.resume_io("local disk failed");
        }
    }

    // ----- local requests -----

    fn on_request(&mut self, conn: ConnId, cookie: u64, req: IoRequest) {
        if self.stale_request(conn, cookie) {
            return;
        }
        if self.role != Role::Primary || !self.clients.contains(&conn) {
            self.reply(conn, cookie, Err(errno::EPERM));
            return;
        }
        let frozen = (self.freeze.frozen()) && !matches!(req, IoRequest::Read { .. });
        if self.session.handshake.is_some() || self.session.promote_confirm.is_some() || frozen {
            self.hold(conn, cookie, req);
            return;
        }
        let (range, op, fua) = match req {
            IoRequest::Read { offset, len } => return self.local_read(conn, cookie, offset, len),
            IoRequest::Flush => return self.local_flush(conn, cookie),
            IoRequest::Write { offset, data, fua } => (
                Range::new(offset, data.len() as u64),
                DiskOp::Write { offset, data, fua },
                fua,
            ),
            IoRequest::Trim { offset, len, fua } => {
                if fua {
                    self.fua_after(conn, cookie);
                }
                (
                    Range::new(offset, u64::from(len)),
                    DiskOp::Trim {
                        offset,
                        len: u64::from(len),
                    },
                    false,
                )
            }
            IoRequest::WriteZeroes {
                offset,
                len,
                may_trim,
                fua,
            } => {
                if fua {
                    self.fua_after(conn, cookie);
                }
                (
                    Range::new(offset, u64::from(len)),
                    DiskOp::WriteZeroes {
                        offset,
                        len: u64::from(len),
                        may_trim,
                    },
                    false,
                )
            }
        };
        if self.needs_split(range) {
            self.start_split(conn, cookie, range, op, fua);
        } else {
            self.local_write(conn, cookie, range, Some(op), fua, None);
        }
    }

    /// Holds request (conn, cookie): writes are frozen, a handshake runs or a
    /// promotion waits for the peer's confirmation.
    pub(super) fn hold(&mut self, conn: ConnId, cookie: u64, req: IoRequest) {
        let why = self.session.handshake.is_some()
            || self.session.promote_confirm.is_some()
            || self.freeze.frozen();
        self.waits.hold(why, conn, cookie, req);
    }

    /// Requests held during the connection handshake go on now (after the
    /// writes a pause left unanswered, issued again first).
    pub(super) fn release_held(&mut self) {
        if self.freeze.grace().is_some() && self.replicating() {
            self.end_pause_reconnected();
        }
        if !self.txn.none_waiting() {
            self.readmit_al_waiters();
        }
        for (conn, cookie, req) in self.waits.take_held() {
            self.on_request(conn, cookie, req);
        }
        if !self.reqs.no_splits() {
            self.resume_splits();
        }
    }

    /// Whether local data can answer a read of `r`.
    fn local_data_good(&self, r: Range) -> bool {
        match self.disk {
            DiskState::UpToDate => true,
            DiskState::Inconsistent => {
                self.repl == Replication::SyncTarget && !self.bitmap.any_in(r)
            }
            _ => false,
        }
    }

    fn local_read(&mut self, conn: ConnId, cookie: u64, offset: u64, len: u32) {
        let r = Range::new(offset, len as u64);
        if len == 0 {
            self.reply(conn, cookie, Ok(Some(Bytes::new())));
            return;
        }
        if self.local_data_good(r) {
            // Read behind the writes in flight on this disk, as DRBD makes a
            // local read wait for conflicting peer writes (simulator finding,
            // seed 3473: the peer demoted, this node was promoted and read a
            // block straight from the disk while the peer's last write to it,
            // acknowledged to its client on our RecvAck, still waited in the
            // disk order: the read returned the older data).
            self.read_behind_writes(
                r,
                Origin::LocalRead { conn, cookie },
                Io::Read { conn, cookie },
            );
        } else if self.replicating()
            && self
                .session
                .peer
                .as_ref()
                .is_some_and(|p| p.disk == DiskState::UpToDate)
        {
            let id = self.new_id();
            self.owed.read_sent(id, conn, cookie, len);
            self.send(Message::ReadRequest { id, offset, len });
        } else {
            self.reply(conn, cookie, Err(errno::EIO));
        }
    }

    /// A local read's data (straight from the disk or through the disk order).
    pub(super) fn local_read_done(
        &mut self,
        conn: ConnId,
        cookie: u64,
        result: Result<Option<Bytes>, u32>,
    ) {
        if result.is_err() {
            self.disk_failed("read error");
        }
        self.reply(conn, cookie, result);
    }

    fn local_flush(&mut self, conn: ConnId, cookie: u64) {
        // As for writes: with no up-to-date disk reachable, nothing can be made
        // durable where it counts (simulator finding: a sync target's flush
        // succeeded locally after its source was lost, the data then was not).
        if !self.has_good_copy() {
            self.reply(conn, cookie, Err(errno::EIO));
            return;
        }
        let rid = self.new_id();
        let mirrored = self.replicating();
        self.reqs.add_flush(rid, conn, cookie, mirrored);
        let id = self.new_id();
        self.ops.begin(id, Io::Flush { req: rid });
        self.out.push(Action::Disk {
            id,
            op: DiskOp::Flush,
        });
        if mirrored {
            self.send_peer_flush(rid);
        }
    }

    /// Whether writes can reach an up-to-date disk: ours, or the peer's over the link.
    fn has_good_copy(&self) -> bool {
        let peer_good = self.replicating()
            && self
                .session
                .peer
                .as_ref()
                .is_some_and(|p| p.disk == DiskState::UpToDate);
        self.disk == DiskState::UpToDate || peer_good
    }

    /// A local write of `range`: `op` carries it out, or None when the daemon streams the data
    /// itself (see [`Node::try_stream_write`]). `split`: it is a piece of that split.
    pub(super) fn local_write(
        &mut self,
        conn: ConnId,
        cookie: u64,
        range: Range,
        op: Option<DiskOp>,
        fua: bool,
        split: Option<u64>,
    ) {
        debug_assert!(
            op.is_none()
                || range.is_empty()
                || self.txn.al().is_none_or(|al| {
                    super::activity_log::extents_of(range).count() <= al.slots()
                }),
            "a local write wider than the activity log must be split: {range:?}"
        );
        // A disk that is not up to date, without an up-to-date peer (e.g. a sync
        // target that lost its source) holds no good copy: a write acknowledged
        // there would be overwritten by the next resync (simulator finding).
        if matches!(self.disk, DiskState::Failed | DiskState::Diskless) || !self.has_good_copy() {
            self.answer(conn, cookie, split, Err(errno::EIO));
            return;
        }
        let rid = self.new_id();
        self.reqs.add_write(rid, conn, cookie, range, split);
        self.enter_local_write(rid, range, op, fua);
    }

    /// Request `rid`'s write of `range` waits for the activity log, then is issued.
    pub(super) fn enter_local_write(
        &mut self,
        rid: u64,
        range: Range,
        op: Option<DiskOp>,
        fua: bool,
    ) {
        let redo = self.reqs.entering_write(rid);
        let wid = self.new_id();
        // First come, first served: while a write waits for the activity log, later
        // ones wait behind it, else a stream of writes to active extents starves a
        // write that needs an extent loaded (simulator finding).
        // A write issued again after a pause goes first: its original holds
        // the same extents, so they are active, and it must not wait behind
        // writes that need extents only its original's end can free.
        let queue_empty = self.txn.none_waiting() || redo;
        let al_ok = match self.txn.al_mut() {
            None => true,
            Some(al) => queue_empty && al.admit(range) == Admit::Go,
        };
        assert!(
            al_ok || !redo,
            "a write issued again found its extents inactive"
        );
        if al_ok {
            self.reqs.hold_al(rid, self.txn.al().is_some());
        }
        self.writes.add_waiting(
            wid,
            WriteEntry {
                range,
                origin: Origin::Local { req: rid },
                streamed: op.is_none(),
                pieces: op.into_iter().collect(),
                parts_pending: 0,
                ready: false,
                al_ok,
                submitted: false,
                error: 0,
            },
        );
        if al_ok {
            self.issue_local_write(wid, fua);
        } else {
            self.txn.wait_for_al(wid);
            self.try_al_transaction();
        }
    }

    /// A local write whose extents are in the durable activity log enters the
    /// disk order and goes to the peer, both at once: it must not reach the peer
    /// before its extent is in the activity log, or a crash leaves the peer with
    /// data nobody marks (simulator finding), and entering the disk order at the
    /// same moment keeps both nodes' order of it against peer writes the same.
    pub(super) fn issue_local_write(&mut self, wid: u64, fua: bool) {
        if self.hold_for_pause(wid, fua) {
            return;
        }
        let Some(e) = self.writes.get(&wid) else {
            panic!("local write {wid} to issue is not in the disk order");
        };
        let Origin::Local { req: rid } = e.origin else {
            panic!("write {wid} issued as local is {:?}", e.origin);
        };
        if matches!(self.disk, DiskState::Failed | DiskState::Diskless) || !self.has_good_copy() {
            // It waited for the activity log while the last good copy went away
            // (simulator finding: a sync target's write, admitted after its source
            // was lost, was acknowledged and then overwritten by the next resync).
            self.writes.drop_waiting(wid);
            self.reqs.local_done(rid, errno::EIO);
            self.maybe_finish(rid);
            return;
        }
        let range = e.range;
        let mirrored = self.replicating();
        assert!(
            !(e.streamed && mirrored),
            "a streamed write is only admitted while not replicating (its data is not here)"
        );
        let kind = match e.pieces.first() {
            _ if !mirrored => None,
            Some(DiskOp::Write { data, .. }) => Some(crate::peer::WriteKind::Data(data.clone())),
            Some(DiskOp::Trim { len, .. }) => {
                Some(crate::peer::WriteKind::Trim { len: *len as u32 })
            }
            Some(DiskOp::WriteZeroes { len, may_trim, .. }) => {
                Some(crate::peer::WriteKind::Zeroes {
                    len: *len as u32,
                    may_trim: *may_trim,
                })
            }
            other => unreachable!("not a write: {other:?}"),
        };
        let (wait_recv, wait_ack) = match (mirrored, self.cfg.protocol) {
            (false, _) => (false, false),
            // Fault injection (simulator only): ack before the peer's disk.
            (true, Protocol::C) => (false, !self.faults.ack_before_peer),
            (true, Protocol::B) => (!fua, fua),
            (true, Protocol::A) => (false, fua),
        };
        // Without an up-to-date local disk the peer holds the only good copy: the
        // write is done when the peer's disk has it, whatever the protocol
        // (simulator finding: protocol A acked a sync target's write that was then lost).
        let wait_ack = wait_ack || (mirrored && self.disk != DiskState::UpToDate);
        let wait_recv = wait_recv && !wait_ack;
        self.reqs.issued(rid, wait_recv, wait_ack, mirrored);
        if let Some(kind) = kind {
            self.session.seq += 1;
            let seq = self.session.seq;
            let redo = self
                .writes
                .get(&wid)
                .and_then(|e| e.pieces.first().cloned())
                .map(|op| (op, fua));
            debug_assert!(redo.is_some(), "a mirrored local write has its operation");
            self.owed.write_sent(
                seq,
                Recent {
                    range,
                    req: Some(rid),
                    redo,
                },
            );
            self.send(Message::Write {
                seq,
                seen: self.session.peer_seen,
                offset: range.start,
                kind,
                fua,
                resync: false,
            });
            // This write overtakes the data of resync reads queued before it (simulator finding).
            self.resync_note_local_write(range);
        } else if self.cfg.peer.is_some() {
            self.start_deferred_generation();
            self.bitmap.set_range(range);
        }
        self.writes.enter_order(wid, range);
        self.try_start(wid);
    }

    // ----- activity log -----

    pub(super) fn try_al_transaction(&mut self) {
        // No transaction in flight and a write waiting, or nothing to do.
        let Some(first) = self.txn.next_to_plan() else {
            return;
        };
        // For the first waiting write only (the others wait behind it). A
        // write waits for the activity log with its entry admitted.
        let Some(e) = self.writes.get(&first) else {
            unreachable!("write {first} waits for the activity log without its entry");
        };
        let ranges = vec![e.range];
        // A write waits for the activity log only when the node keeps one
        // (`MetaTxns` asserts it).
        let Some(al) = self.txn.al_mut() else {
            unreachable!("write {first} waits for an activity log the node does not keep");
        };
        // No transaction possible now (every slot held by writes in flight): it
        // is tried again when one is released.
        let Some((set, evicted)) = al.plan(&ranges) else {
            return;
        };
        // Bits of evicted extents must be durable before the log forgets them.
        let evicting = !evicted.is_empty();
        // So must the knowledge of writes there that the peer has not flushed: if
        // both nodes crashed, no replay would look at them (simulator finding).
        // They stay in `unflushed`: a sync target's end clears its whole bitmap
        // and marks them again from there.
        for e in &evicted {
            let ext = Range::new(*e as u64 * EXTENT, EXTENT);
            for r in self.owed.unflushed() {
                if r.overlaps(&ext) {
                    self.bitmap.set_range(*r);
                }
            }
        }
        self.persist_extent_bits(&evicted);
        let id = self.new_id();
        self.txn.begin_al_txn(id);
        if evicting {
            // What was written in the evicted extents may still sit in the disk's
            // volatile cache: flush it before the log forgets them, or a crash
            // loses it where no replay looks (simulator finding).
            self.ops.begin(id, Io::AlFlush { set, evicted });
            self.out.push(Action::Disk {
                id,
                op: DiskOp::Flush,
            });
        } else {
            self.out.push(Action::Persist {
                id,
                write: MetaWrite::ActivityLog(set),
            });
        }
    }

    /// Persists the changed bitmap pages of activity-log `extents`.
    fn persist_extent_bits(&mut self, extents: &[u32]) {
        let mut pages = Vec::new();
        for e in extents {
            let first = *e as u64 * EXTENT / BLOCK;
            let last = ((*e as u64 + 1) * EXTENT / BLOCK).min(self.bitmap.bits());
            pages.extend(self.bitmap.take_dirty_in(first..last));
        }
        pages.sort_unstable();
        pages.dedup();
        self.persist_bitmap_pages(pages);
    }

    /// The data flush before an evicting activity-log transaction is done.
    fn on_al_flush_done(
        &mut self,
        set: Vec<u32>,
        evicted: Vec<u32>,
        result: Result<Option<Bytes>, u32>,
    ) {
        assert!(
            !evicted.is_empty(),
            "a data flush for a transaction that evicts nothing"
        );
        assert!(
            evicted.iter().all(|e| !set.contains(e)),
            "an evicted extent stays in the new set"
        );
        if result.is_err() {
            self.disk_failed("flush error");
            // What was written in the evicted extents may never reach the disk
            // now, and the log is about to forget them: the bitmap keeps them,
            // durable before the log's write (metadata writes land in order).
            // Without this a power loss lost such a write where no replay and
            // no bitmap looked (sim-long seed 38407: the peer had it, and the
            // bitmap resync after the disk's repair skipped the block).
            for e in &evicted {
                self.bitmap
                    .set_range(Range::new(*e as u64 * EXTENT, EXTENT));
            }
            self.persist_extent_bits(&evicted);
        }
        let id = self.new_id();
        self.txn.al_txn_write(id);
        self.out.push(Action::Persist {
            id,
            write: MetaWrite::ActivityLog(set),
        });
    }

    fn readmit_al_waiters(&mut self) {
        if self.session.handshake.is_some() {
            // A write issued now would be neither in the bitmap we sent nor
            // mirrored (simulator finding: the peer, a primary sync target, then
            // read its stale copy of the block). The handshake's end readmits.
            return;
        }
        let waiting = self.txn.take_waiting();
        let mut still = Vec::new();
        for wid in waiting {
            let Some(range) = self.writes.get(&wid).map(|e| e.range) else {
                continue;
            };
            // In order: once one must wait, so do the ones behind it.
            let go = still.is_empty()
                && self
                    .txn
                    .al_mut()
                    .map(|al| al.admit(range) == Admit::Go)
                    .unwrap_or(true);
            if go {
                let mut fua = false;
                if let Some(e) = self.writes.get_mut(&wid) {
                    e.al_ok = true;
                    fua = matches!(e.pieces.first(), Some(DiskOp::Write { fua: true, .. }));
                    if let Origin::Local { req } = e.origin {
                        self.reqs.hold_al(req, self.txn.al().is_some());
                    }
                }
                self.issue_local_write(wid, fua);
            } else {
                still.push(wid);
            }
        }
        self.txn.put_back_waiting(still);
        self.try_al_transaction();
    }

    // ----- the disk order -----

    /// Submits a write entry if it is first in line for its range and admitted.
    pub(super) fn try_start(&mut self, wid: u64) {
        let gate = self.txn.gated();
        let Some(e) = self.writes.get_mut(&wid) else {
            panic!("write {wid} to start is not in the disk order");
        };
        let local = matches!(e.origin, Origin::Local { .. });
        if e.submitted || !e.ready || !e.al_ok || (local && gate) {
            return;
        }
        e.submitted = true;
        if e.streamed {
            // The daemon writes the data and reports this id's DiskDone.
            e.parts_pending = 1;
            let id = self.new_id();
            self.ops.begin(id, Io::WritePart { write: wid });
            self.waits.grant_stream(id);
            return;
        }
        let pieces = std::mem::take(&mut e.pieces);
        e.parts_pending = pieces.len() as u32;
        if pieces.is_empty() {
            self.write_done(wid);
            return;
        }
        for op in pieces {
            let id = self.new_id();
            let io = if matches!(op, DiskOp::Read { .. }) {
                Io::ResyncRead { write: wid }
            } else {
                Io::WritePart { write: wid }
            };
            self.ops.begin(id, io);
            self.out.push(Action::Disk { id, op });
        }
    }

    fn on_disk_done(&mut self, id: u64, result: Result<Option<Bytes>, u32>) {
        let Some(io) = self.ops.complete(id) else {
            debug_assert!(false, "completion for unknown disk op {id}");
            return;
        };
        match io {
            Io::WritePart { write } => {
                let Some(e) = self.writes.get_mut(&write) else {
                    panic!("disk op {id} completes a piece of write {write}, which is gone");
                };
                if let Err(code) = result {
                    e.error = code;
                }
                e.parts_pending -= 1;
                if e.parts_pending == 0 {
                    self.write_done(write);
                }
            }
            Io::Read { conn, cookie } => self.local_read_done(conn, cookie, result),
            Io::Flush { req } => {
                self.reqs.local_done(req, result.err().unwrap_or(0));
                self.maybe_finish(req);
            }
            Io::BootFlush => {
                if result.is_err() {
                    self.disk_failed("flush at start");
                }
                self.boot_flushed = true;
                self.maybe_dial();
            }
            Io::PeerFlush { id } => {
                let error = result.err().unwrap_or(0);
                if error != 0 {
                    // The peer's acknowledged writes may not be on this disk: it
                    // fails before the peer hears of the flush (simulator
                    // finding, seed 301: a node whose flush for the peer failed
                    // was chosen as sync source next and overwrote with older
                    // data a write the peer had acknowledged).
                    self.disk_failed("flush for the peer failed");
                }
                self.send(Message::FlushAck { id, error });
            }
            Io::PeerRead { id } => self.send(read_reply(id, result)),
            Io::ResyncRead { write } => self.on_resync_read_done(write, result),
            Io::ResyncStartFlush => self.on_resync_start_flush_done(id, result),
            Io::SyncDoneFlush { source_gis, epoch } => {
                self.on_sync_done_flush(source_gis, epoch, result)
            }
            Io::ChecksumRead { id, verify } => self.on_checksum_read_done(id, verify, result),
            Io::AlFlush { set, evicted } => self.on_al_flush_done(set, evicted, result),
            Io::SuperblockFlush => self.on_superblock_flush_done(result),
            Io::ChecksumFlush { id, offset, len } => {
                self.on_checksum_flush_done(id, offset, len, result)
            }
        }
    }

    /// A read that enters the disk order (it waits for overlapping writes
    /// ahead of it); its completion comes back as `Io::ResyncRead`.
    pub(super) fn ordered_read(&mut self, range: Range, origin: Origin) -> u64 {
        let read = DiskOp::Read {
            offset: range.start,
            len: range.len() as u32,
        };
        self.enter_disk_order(range, origin, vec![read])
    }

    /// Puts an entry (whose activity-log extents need nothing more) into the
    /// disk order, and starts it if nothing overlapping is ahead of it.
    pub(super) fn enter_disk_order(
        &mut self,
        range: Range,
        origin: Origin,
        pieces: Vec<DiskOp>,
    ) -> u64 {
        let wid = self.new_id();
        self.writes.enter(
            wid,
            WriteEntry {
                range,
                origin,
                pieces,
                streamed: false,
                parts_pending: 0,
                ready: false,
                al_ok: true,
                submitted: false,
                error: 0,
            },
        );
        self.try_start(wid);
        wid
    }

    /// Reads `range` behind any write in flight that overlaps it (through the
    /// disk order, as `ordered`), else straight from the disk (as `direct`).
    pub(super) fn read_behind_writes(&mut self, range: Range, ordered: Origin, direct: Io) {
        if !range.is_empty() && self.writes.overlaps_any(&range) {
            self.ordered_read(range, ordered);
            return;
        }
        let io = self.new_id();
        self.ops.begin(io, direct);
        self.out.push(Action::Disk {
            id: io,
            op: DiskOp::Read {
                offset: range.start,
                len: range.len() as u32,
            },
        });
    }

    /// Every piece of a disk-order entry is done.
    pub(super) fn write_done(&mut self, wid: u64) {
        let e = self.writes.take(wid);
        if e.error != 0 {
            // Before the writes waiting behind this one start: a peer write whose
            // overlap this write won (it was left out) must not be acknowledged
            // as on this disk (simulator finding: the winner failed with EIO and
            // the loser was acknowledged, on neither copy here).
            match e.origin {
                Origin::Local { .. } => {
                    // The peer may have the write, this disk not (or partly): mark
                    // it, durably, or the next connect finds nothing to resync
                    // (simulator finding).
                    if self.cfg.peer.is_some() {
                        self.bitmap.set_range(e.range);
                    }
                    self.disk_failed("write error");
                }
                Origin::Peer { .. } => self.disk_failed("write error on a peer's write"),
                _ => {}
            }
        }
        for next in self.writes.complete_in_order(wid) {
            self.writes.mark_ready(next);
            self.try_start(next);
        }
        match e.origin {
            Origin::Local { req } => {
                // Keeps an error the peer side already set (no good copy left)
                // unless this one failed too.
                self.reqs.local_done(req, e.error);
                if e.error != 0 {
                    let pages = self.bitmap.take_dirty();
                    self.persist_bitmap_pages(pages);
                }
                self.maybe_finish(req);
            }
            Origin::Peer {
                seq,
                resync,
                epoch,
                holes,
            } => {
                // A failed disk acknowledges nothing as written: the parts a local
                // write won may not be there (see above); the NegAck makes the
                // peer mark the range out of sync.
                let disk_gone = matches!(self.disk, DiskState::Failed | DiskState::Diskless);
                let error = match e.error {
                    0 if disk_gone => errno::EIO,
                    code => code,
                };
                if error == 0 && resync {
                    // Only what this write put on the disk is in sync: a hole is
                    // the winning local write's, which marks it if it fails
                    // (simulator finding: the local write failed, this cleared
                    // its bits anyway, and the block differed unmarked).
                    for p in super::ordering::subtract(e.range, &holes) {
                        self.resync_write_durable(p);
                    }
                }
                if epoch == self.link_epoch {
                    self.send(Message::WriteAck { seq, error });
                }
                self.peer_write_finished(wid);
            }
            Origin::ResyncRead
            | Origin::PeerRead { .. }
            | Origin::ChecksumRead { .. }
            | Origin::LocalRead { .. } => {}
        }
    }

    /// Replies when the protocol allows, and forgets the request when all is done.
    pub(super) fn maybe_finish(&mut self, rid: u64) {
        // Callers look again after every ack and completion; the request may
        // have finished at an earlier one (a late ack of a request answered and
        // done when the link went down, e.g.).
        let Some((answer, finished)) = self.reqs.settle(rid, self.freeze.suspended()) else {
            return;
        };
        let mut piece_answer = None;
        match answer {
            Some(Answer::Client {
                conn,
                cookie,
                result,
            }) => {
                self.resync_rate.app_answered();
                self.reply(conn, cookie, result);
            }
            Some(Answer::Parent { parent, error }) => {
                self.reqs.answer_parent(parent, error);
                self.maybe_finish(parent);
            }
            Some(Answer::Piece { split, result }) => piece_answer = Some((split, result)),
            None => {}
        }
        if finished {
            let d = self.reqs.finish(rid);
            if d.al_held {
                if let Some(al) = self.txn.al_mut() {
                    al.release(d.range);
                }
                if !self.txn.none_waiting() {
                    self.try_al_transaction();
                }
            }
        }
        // Last: a piece's answer may start the next piece of its split, which
        // then finds the extents this one released.
        if let Some((sid, result)) = piece_answer {
            self.piece_done(sid, &result);
        }
    }

    /// A local request's answer: to its client, or to its split if it is a piece.
    pub(super) fn answer(
        &mut self,
        conn: ConnId,
        cookie: u64,
        split: Option<u64>,
        result: Result<Option<Bytes>, u32>,
    ) {
        match split {
            None => self.reply(conn, cookie, result),
            Some(sid) => self.piece_done(sid, &result),
        }
    }

    // ----- time -----

    fn on_tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.grace_tick();
        self.link_tick();
        if self.conn == ConnState::Connected {
            if self.liveness_tick(now_ms) {
                return;
            }
            // Keep the peer's unflushed writes few: they would all be resynced if
            // the peer lost power.
            if self.owed.flush_due(now_ms, 1000) {
                let id = self.new_id();
                self.send_peer_flush(id);
            }
            self.stop_flush_tick();
        }
        self.resync_tick();
        self.maybe_resume_verify();
        if !self.reqs.no_splits() {
            // A split waiting for the peer's flush goes on (split.rs).
            self.resume_splits();
        }
        // Keep the persisted bitmap close to memory while it changes (resync, or
        // writes without the peer): an interrupted resync resumes near where it was,
        // and `dump-md` on a running node shows what is out of sync.
        // The sync target too: its bitmap is what an interrupted resync resumes from.
        let changing = self.sync.source().is_some()
            || self.repl == Replication::SyncTarget
            || (self.cfg.peer.is_some() && !self.replicating());
        if changing && self.bitmap.has_dirty() && self.txn.bitmap_save_due(now_ms) {
            let pages = self.bitmap.take_dirty();
            self.persist_bitmap_pages(pages);
        }
    }

    /// Whether the peer owes us an answer: writes not yet acknowledged, reads,
    /// checksum requests or flushes outstanding.
    fn peer_work_pending(&self) -> bool {
        self.owed.owes_answers()
    }

    /// Liveness comes from progress (docs/ARCHITECTURE.md): the peer is dropped
    /// only when it completes nothing for `timeout x ko-count` while it owes us
    /// something, or when a ping goes unanswered for `ping-timeout` and nothing
    /// at all came from the peer since it was sent. A ping queued behind bulk
    /// data is late, but the acks of that data keep the link alive. Returns
    /// true when the link was dropped.
    fn liveness_tick(&mut self, now_ms: u64) -> bool {
        debug_assert_eq!(self.conn, ConnState::Connected);
        if !self.peer_work_pending() {
            self.session.last_progress_ms = now_ms;
        }
        let ko = self.cfg.timeout_ms.saturating_mul(self.cfg.ko_count.max(1));
        if now_ms.saturating_sub(self.session.last_progress_ms) > ko {
            self.drop_peer(
                &format!(
                    "the peer completed nothing it owes us within {ko} ms (timeout x ko-count)"
                ),
                true,
            );
            return true;
        }
        if let Some(sent) = self.session.ping_outstanding {
            let since = sent.max(self.session.last_heard_ms);
            if now_ms.saturating_sub(since) > self.cfg.ping_timeout_ms {
                self.lose_link("ping timeout: nothing heard from the peer since the ping");
                return true;
            }
        } else if now_ms.saturating_sub(self.session.last_ping_ms) >= self.cfg.ping_interval_ms {
            self.session.last_ping_ms = now_ms;
            self.session.ping_outstanding = Some(now_ms);
            self.session.pings_sent += 1;
            self.send(Message::Ping);
        }
        false
    }

    // ----- admin -----

    fn on_admin(&mut self, id: u64, cmd: AdminCmd) {
        let result = match cmd {
            AdminCmd::Primary { force } => {
                let forcing = force && self.disk != DiskState::UpToDate;
                match self.promote(force) {
                    Ok(()) => {
                        // An explicit promotion stays until `secondary`.
                        self.auto_promoted = false;
                        // A forced promotion makes this disk the up-to-date one
                        // only once its superblock says so: answer then, as
                        // DRBD's `primary --force` returns after its meta-data
                        // sync (simulator seed 69431: the process was killed
                        // right after "primary", before the superblock landed,
                        // and came back inconsistent: no good data anywhere).
                        // Writes wait for that superblock already (the gate).
                        let forced = forcing && self.disk == DiskState::UpToDate;
                        if forced || !self.force_replies.is_empty() {
                            debug_assert!(self.txn.gated() || !forced);
                            self.force_replies.push(id);
                            return;
                        }
                        Ok("primary".to_string())
                    }
                    Err(e) => Err(e),
                }
            }
            AdminCmd::Secondary => {
                if !self.clients.is_empty() {
                    Err(format!(
                        "{} NBD client(s) attached; disconnect them first",
                        self.clients.len()
                    ))
                } else {
                    self.demote();
                    Ok("secondary".into())
                }
            }
            AdminCmd::Connect { discard_my_data } => self.admin_connect(discard_my_data),
            AdminCmd::Disconnect => {
                self.want_connect = false;
                if self.cfg.peer.is_none() {
                    Err("this resource has no peer".into())
                } else {
                    self.drop_peer("disconnected by the operator", false);
                    Ok("standalone".into())
                }
            }
            AdminCmd::Resync { full, checksum } => self.admin_resync(full, checksum),
            AdminCmd::Verify => {
                // An operator's verify starts from the beginning.
                self.sync.forget_verify_resume();
                self.admin_verify()
            }
            AdminCmd::Invalidate => self.admin_invalidate(),
            AdminCmd::ResumeIo => self.admin_resume_io(),
        };
        self.out.push(Action::AdminReply { id, result });
    }
}

pub(super) fn gis_json(g: &Gis) -> serde_json::Value {
    json!({
        "current": format!("{:016X}", g.current),
        "bitmap": format!("{:016X}", g.bitmap),
        "history": [format!("{:016X}", g.history[0]), format!("{:016X}", g.history[1])],
    })
}

/// The answer to the peer's read request `id`.
pub(super) fn read_reply(id: u64, result: Result<Option<Bytes>, u32>) -> Message {
    match result {
        Ok(data) => Message::ReadReply {
            id,
            error: 0,
            data: data.unwrap_or_default(),
        },
        Err(error) => Message::ReadReply {
            id,
            error,
            data: Bytes::new(),
        },
    }
}
