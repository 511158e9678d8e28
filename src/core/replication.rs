//! The peer side of the node core: connection handshake, mirrored writes,
//! acknowledgements, flushes, remote reads, and losing the peer.

use serde_json::json;

use super::gi::{self, Decision, Side};
use super::node::{gis_json, Node, Origin};
use super::ordering::{subtract, Range};
use super::peer_owed::Owed;
use super::peer_session::{Handshake, PeerFlush, PeerSession, PeerView};
use super::types::*;
use crate::config::SbPolicy;
use crate::peer::{Hello, Message, PeerDisk, PeerRole, WriteKind, MAX_DATA_LEN, PROTOCOL_VERSION};

/// Words of the bitmap per BitmapChunk message (32 KiB).
const BITMAP_CHUNK_WORDS: usize = 4096;

fn role_of(r: PeerRole) -> Role {
    match r {
        PeerRole::Primary => Role::Primary,
        PeerRole::Secondary => Role::Secondary,
    }
}

fn disk_of(d: PeerDisk) -> DiskState {
    match d {
        PeerDisk::UpToDate => DiskState::UpToDate,
        PeerDisk::Inconsistent => DiskState::Inconsistent,
        PeerDisk::Outdated => DiskState::Outdated,
        PeerDisk::Failed => DiskState::Failed,
        PeerDisk::Diskless => DiskState::Diskless,
    }
}

impl Node {
    /// Our Hello as of now (sent by `session.rs` on the connection it picks).
    pub(super) fn hello_now(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            resource: self.cfg.resource.clone(),
            node: self.cfg.node.clone(),
            data_size: self.cfg.data_size,
            protocol: match self.cfg.protocol {
                Protocol::A => b'A',
                Protocol::B => b'B',
                Protocol::C => b'C',
            },
            two_primaries: self.cfg.allow_two_primaries,
            role: Self::peer_role_of(self.role),
            disk: Self::peer_disk_of(self.disk),
            gis: self.meta.gis,
            crashed_primary: self.crashed_primary,
            peer_may_lack: self.peer_may_lack(),
            out_of_sync_blocks: self.bitmap.count(),
            discard_my_data: self.discard_my_data,
        }
    }

    /// True on the node whose name sorts first: its writes win concurrent conflicts.
    pub(super) fn local_wins(&self) -> bool {
        self.cfg
            .peer
            .as_deref()
            .is_some_and(|p| self.cfg.node.as_str() < p)
    }

    pub(super) fn admin_connect(&mut self, discard_my_data: bool) -> Result<String, String> {
        if self.cfg.peer.is_none() {
            return Err("this resource has no peer".into());
        }
        self.want_connect = true;
        self.discard_my_data = discard_my_data;
        self.links.dial_now();
        if self.conn == ConnState::Standalone {
            self.conn = ConnState::Connecting;
            self.split_brain = false;
        }
        self.maybe_dial();
        Ok("connecting".into())
    }

    pub(super) fn on_peer_up(&mut self, hello: Hello) {
        let refuse = |why: String| Some(why);
        let problem = if hello.version != PROTOCOL_VERSION {
            refuse(format!(
                "peer speaks protocol version {}, we speak {}",
                hello.version, PROTOCOL_VERSION
            ))
        } else if hello.resource != self.cfg.resource {
            refuse(format!(
                "peer serves resource {}, not {}",
                hello.resource, self.cfg.resource
            ))
        } else if Some(&hello.node) != self.cfg.peer.as_ref() {
            refuse(format!(
                "peer calls itself {}, expected {}",
                hello.node,
                self.cfg.peer.clone().unwrap_or_default()
            ))
        } else if hello.data_size != self.cfg.data_size {
            refuse(format!(
                "device size mismatch: peer {} has {} bytes, we have {}",
                hello.node, hello.data_size, self.cfg.data_size
            ))
        } else if hello.protocol != self.hello_now().protocol {
            refuse(format!(
                "peer uses protocol {}, we use {}",
                hello.protocol as char,
                self.hello_now().protocol as char
            ))
        } else if hello.two_primaries != self.cfg.allow_two_primaries {
            refuse("allow-two-primaries differs between the nodes".to_string())
        } else if hello.role == PeerRole::Primary
            && self.role == Role::Primary
            && !self.cfg.allow_two_primaries
        {
            refuse("both nodes are primary and allow-two-primaries is false".to_string())
        } else {
            None
        };
        self.conn = ConnState::Connected;
        self.link_epoch += 1;
        // A session starts fresh; the previous one was ended by on_peer_down.
        debug_assert!(self.session.handshake.is_none() && self.session.peer.is_none());
        debug_assert!(self.owed.is_empty());
        self.session = PeerSession::new(self.now_ms);
        if let Some(why) = problem {
            self.notify("connect-refused", json!({ "reason": why }));
            self.drop_peer(&why, false);
            return;
        }
        self.session.peer = Some(PeerView {
            role: role_of(hello.role),
            disk: disk_of(hello.disk),
            hello,
        });
        self.session.handshake = Some(Handshake::default());
        self.fencing_peer_back();
        self.notify("peer-connected", json!({ "peer": self.cfg.peer }));
        self.send_bitmap();
    }

    /// Sends our whole bitmap in chunks.
    pub(super) fn send_bitmap(&mut self) {
        let words = self.bitmap.words().to_vec();
        if words.is_empty() {
            self.send(Message::BitmapChunk {
                first_word: 0,
                words: Vec::new(),
                last: true,
            });
            return;
        }
        let n = words.len().div_ceil(BITMAP_CHUNK_WORDS);
        for (i, chunk) in words.chunks(BITMAP_CHUNK_WORDS).enumerate() {
            self.send(Message::BitmapChunk {
                first_word: (i * BITMAP_CHUNK_WORDS) as u64,
                words: chunk.to_vec(),
                last: i + 1 == n,
            });
        }
    }

    pub(super) fn on_peer_down(&mut self, reason: &str) {
        let was_connected = self.conn == ConnState::Connected;
        let peer_disk = self.session.peer.as_ref().map(|p| p.disk);
        let was_replicating = self.replicating();
        let owed = self.end_session_state();
        if was_connected {
            self.notify("peer-disconnected", json!({ "reason": reason }));
            // Freeze before the writes in flight complete below: their replies
            // must wait for the fence-peer handler (simulator finding: a write
            // acknowledged here at the moment the link broke was then
            // overwritten on the peer by its own later write).
            self.maybe_fence(peer_disk, reason);
        }
        // Writes the peer acknowledged but had not flushed may be lost if it lost
        // power (simulator finding: nobody marked them, the disks stayed different).
        self.mark_peer_may_lack(&owed.unflushed);
        // So may the writes answered before the peer confirmed them (protocol A
        // and B): they may have been lost on the way. They are on this disk (a
        // write is answered before the peer's acknowledgement only when its
        // local part succeeded on an up-to-date disk), even if the disk failed
        // since (sim-long seed 58093: the failed side held the only copy of
        // protocol A writes cut off by a partition, and the good side served
        // reads without them).
        let unconfirmed: Vec<Range> = owed
            .recent
            .values()
            .filter(|r| r.req.is_some_and(|q| self.reqs.answered_before_peer(q)))
            .map(|r| r.range)
            .collect();
        self.mark_unconfirmed_acknowledged(&unconfirmed);
        for r in owed.unflushed {
            self.bitmap.set_range(r);
        }
        // Everything the peer did not acknowledge may differ now.
        let recent = owed.recent;
        let wrote_apart = recent.values().any(|r| r.req.is_some());
        let local_good = self.disk == DiskState::UpToDate;
        for (_, r) in recent {
            self.bitmap.set_range(r.range);
            if let Some(req) = r.req {
                self.answer_without_peer(req, local_good);
            }
        }
        // In id order (a deterministic reply order). Without a good local disk
        // the peer's flush was the only one that counted (simulator finding: a
        // primary with a failed disk acknowledged a flush its crashed peer never
        // made, and the data was lost).
        for f in self.reqs.flushes_awaiting_peer() {
            self.answer_without_peer(f, local_good);
        }
        self.fail_peer_reads(owed.reads);
        // Only an up-to-date disk starts a new generation, as in DRBD (simulator
        // findings: with one, a failed node's outdated data later became the sync
        // source over its up-to-date peer, as the newer generation; and a sync
        // target that lost its source took a generation of its own, after which
        // the pair looked unrelated).
        let disk_ok = self.disk == DiskState::UpToDate;
        if was_replicating && self.role == Role::Primary && disk_ok && self.meta.gis.bitmap == 0 {
            if wrote_apart {
                // Writes the peer did not acknowledge are answered now, from this
                // disk alone: they belong to a new generation already.
                self.new_generation(true);
                self.persist_superblock(true);
            } else {
                // The generation starts with the first write (docs/SYNC-DECISION.md):
                // a primary that writes nothing while apart (a link blip, the
                // other primary of a dual-primary pair) causes no split brain.
                self.defer_generation(true);
            }
        }
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        // A pause that was running ends here too: the session is over for good.
        self.end_pause_alone();
        self.release_held();
        // Postconditions: nothing of the session is left waiting for the peer.
        assert!(
            !self.replicating() && self.session.handshake.is_none() && self.session.peer.is_none()
        );
        assert!(self.owed.is_empty());
        debug_assert!(self.reqs.flushes_awaiting_peer().is_empty());
    }

    /// The peer session is gone: its connection state, handshake, pings,
    /// resync and sequence numbers end, and what the peer owed is taken whole
    /// (the one place a session ends; what it left unanswered is the caller's
    /// to settle).
    #[must_use]
    pub(super) fn end_session_state(&mut self) -> Owed {
        self.conn = if self.want_connect {
            ConnState::Connecting
        } else {
            ConnState::Standalone
        };
        self.repl = Replication::Off;
        self.session = PeerSession::new(self.now_ms);
        let owed = self.owed.end_session();
        self.stop_resync();
        assert!(
            !self.replicating() && self.sync.source().is_none() && self.session.handshake.is_none()
        );
        assert!(matches!(
            self.conn,
            ConnState::Connecting | ConnState::Standalone
        ));
        assert!(self.owed.is_empty());
        owed
    }

    /// The peer will not answer request `req` (a write or flush it owed): it is
    /// done as far as the peer goes, and fails (EIO) unless this disk
    /// (`local_good`) holds a good copy.
    pub(super) fn answer_without_peer(&mut self, req: u64, local_good: bool) {
        self.reqs.peer_gone(req, local_good);
        self.maybe_finish(req);
    }

    /// Reads sent to the peer (`reads`, from [`Owed`]) fail: it will not answer them.
    pub(super) fn fail_peer_reads(&mut self, reads: Vec<(ConnId, u64)>) {
        // Precondition: only when the session that owed the answers is over.
        debug_assert!(!self.replicating() && !self.owed.has_reads());
        for (conn, cookie) in reads {
            self.reply(conn, cookie, Err(errno::EIO));
        }
    }

    pub(super) fn on_peer_msg(&mut self, m: Message) {
        if self.conn != ConnState::Connected {
            return;
        }
        self.session.last_heard_ms = self.now_ms;
        if matches!(
            m,
            Message::WriteAck { .. }
                | Message::RecvAck { .. }
                | Message::FlushAck { .. }
                | Message::ReadReply { .. }
                | Message::ChecksumReply { .. }
        ) {
            self.session.last_progress_ms = self.now_ms;
        }
        match m {
            Message::Hello(_) => self.drop_peer("protocol error: a second Hello", true),
            Message::State { role, disk } => {
                let (role, disk) = (role_of(role), disk_of(disk));
                let gone = |d: DiskState| matches!(d, DiskState::Failed | DiskState::Diskless);
                let had_disk = self.session.peer.as_ref().is_some_and(|p| !gone(p.disk));
                if let Some(p) = self.session.peer.as_mut() {
                    p.role = role;
                    p.disk = disk;
                }
                if had_disk && gone(disk) {
                    self.new_generation_without_peer_disk();
                }
                self.notify("peer-state", json!({ "role": role, "disk": disk }));
                if role == Role::Primary
                    && self.role == Role::Primary
                    && !self.cfg.allow_two_primaries
                {
                    self.drop_peer(
                        "both nodes became primary and allow-two-primaries is false",
                        false,
                    );
                }
            }
            Message::BitmapChunk {
                first_word,
                words,
                last,
            } => self.on_bitmap_chunk(first_word, words, last),
            Message::Write {
                seq,
                seen,
                offset,
                kind,
                fua,
                resync,
            } => self.on_peer_write(seq, seen, offset, kind, fua, resync),
            Message::RecvAck { seq } => {
                if let Some(req) = self.owed.write_req(seq) {
                    self.reqs.peer_received(req);
                    self.maybe_finish(req);
                }
            }
            Message::WriteAck { seq, error } => self.on_write_ack(seq, error),
            Message::Flush { id } => {
                let waiting = self.writes.peer_write_ids();
                if waiting.is_empty() {
                    self.peer_flush_now(id);
                } else {
                    self.session.peer_flushes.push(PeerFlush { id, waiting });
                }
            }
            Message::FlushAck { id, error } => {
                // Without an error, everything we had sent before this flush is
                // durable on the peer.
                self.owed.flush_acked(id, error == 0);
                self.reqs.peer_flushed(id);
                if error != 0 {
                    // The peer's disk failed to flush: it is no longer a durable copy.
                    // The client's data is durable here; the peer will be resynced.
                    self.drop_peer("the peer failed to flush its disk", true);
                }
                self.maybe_finish(id);
            }
            Message::ReadRequest { id, offset, len } => {
                if offset
                    .checked_add(len as u64)
                    .is_none_or(|e| e > self.cfg.data_size)
                {
                    self.drop_peer("protocol error: read request past the end", true);
                    return;
                }
                if len > MAX_DATA_LEN {
                    self.drop_peer(
                        &format!("protocol error: read request of {len} bytes, over the {MAX_DATA_LEN}-byte limit"),
                        true,
                    );
                    return;
                }
                if self.disk != DiskState::UpToDate {
                    self.send(Message::ReadReply {
                        id,
                        error: errno::EIO,
                        data: bytes::Bytes::new(),
                    });
                    return;
                }
                // Writes the peer sent before this request may still be in the
                // disk order: read behind them, or the peer gets data older than
                // its own acknowledged writes (simulator finding: a primary whose
                // disk failed read its last writes back stale).
                self.read_behind_writes(
                    Range::new(offset, len as u64),
                    Origin::PeerRead { id },
                    super::node::Io::PeerRead { id },
                );
            }
            Message::ReadReply { id, error, data } => {
                if let Some((conn, cookie, len)) = self.owed.read(id) {
                    if error == 0 && data.len() != len as usize {
                        self.drop_peer(
                            &format!(
                                "protocol error: read reply {id} carries {} bytes, {len} were asked for",
                                data.len()
                            ),
                            true,
                        );
                        return;
                    }
                    self.owed.read_answered(id);
                    let result = if error == 0 {
                        Ok(Some(data))
                    } else {
                        Err(error)
                    };
                    self.reply(conn, cookie, result);
                }
            }
            Message::StartSync { mode, source_gis } => self.on_start_sync(mode, source_gis),
            Message::StartVerify => {
                match self.sync.source().map(|r| r.verify) {
                    // Our resync start crossed the peer's verify start: the
                    // peer cuts its verify when our StartSync (sent before
                    // this arrived) reaches it (`on_start_sync`). Its checksum
                    // requests until then are answered as any.
                    Some(false) => {}
                    // Both started a verify at once: both run, each answering
                    // the other's checksum requests (a verify only reads); this
                    // node stays verify source until its own ends.
                    Some(true) => {
                        self.notify("verify-started", json!({ "role": "target" }));
                    }
                    None => {
                        self.repl = Replication::VerifyTarget;
                        self.notify("verify-started", json!({ "role": "target" }));
                    }
                }
            }
            Message::ChecksumRequest {
                id,
                offset,
                len,
                verify,
            } => self.on_checksum_request(id, offset, len, verify),
            Message::ChecksumReply { id, error, sums } => self.on_checksum_reply(id, error, sums),
            Message::SyncDone { source_gis } => self.on_sync_done(source_gis),
            Message::VerifyDone { differing_blocks } => {
                if self.sync.source().is_none() {
                    // Else our own verify, started as the peer's did, still runs.
                    self.repl = Replication::Established;
                }
                self.sync.peer_verify_finished(differing_blocks);
                self.notify(
                    "verify-finished",
                    json!({ "differing_blocks": differing_blocks, "role": "target" }),
                );
            }
            Message::SplitBrain => {
                self.split_brain = true;
                self.drop_peer("the peer detected a split brain", false);
            }
            Message::Ping => self.send(Message::PingAck),
            Message::PingAck => {
                self.session.ping_outstanding = None;
                self.session.pings_acked += 1;
                if self
                    .session
                    .promote_confirm
                    .is_some_and(|n| self.session.pings_acked >= n)
                {
                    self.session.promote_confirm = None;
                    self.release_held();
                }
            }
            Message::Bye { reason } => {
                self.drop_peer(&format!("the peer said goodbye: {reason}"), true)
            }
        }
    }

    /// Asks the peer to flush; its FlushAck makes our writes sent so far durable there.
    pub(super) fn send_peer_flush(&mut self, id: u64) {
        self.owed.flush_sent(id, self.session.seq, self.now_ms);
        self.send(Message::Flush { id });
    }

    fn peer_flush_now(&mut self, id: u64) {
        let io = self.new_id();
        self.ops.begin(io, super::node::Io::PeerFlush { id });
        self.out.push(Action::Disk {
            id: io,
            op: DiskOp::Flush,
        });
    }

    /// A peer-originated entry left the disk order.
    pub(super) fn peer_write_finished(&mut self, wid: u64) {
        let mut ready = Vec::new();
        for f in self.session.peer_flushes.iter_mut() {
            f.waiting.remove(&wid);
            if f.waiting.is_empty() {
                ready.push(f.id);
            }
        }
        self.session.peer_flushes.retain(|f| !f.waiting.is_empty());
        for id in ready {
            self.peer_flush_now(id);
        }
    }

    fn on_write_ack(&mut self, seq: u64, error: u32) {
        // From the peer (outside input): an ack of a write we no longer track
        // (issued again after a pause under a new sequence number) is ignored.
        let Some(r) = self.owed.write_acked(seq) else {
            return;
        };
        if error != 0 {
            self.bitmap.set_range(r.range);
            if r.req.is_some() {
                self.resync_note_marked(r.range);
            }
            if self.repl == Replication::SyncTarget {
                // The source does not hold this write: the end of the resync
                // must not clear its bit (see `on_sync_done_flush`).
                self.sync.target_write_failed(r.range);
            }
        } else if r.req.is_some() {
            // On the peer's disk, not yet on its medium (resync writes are FUA).
            self.owed.write_unflushed(seq, r.range);
        }
        let local_good = self.disk == DiskState::UpToDate;
        match r.req {
            Some(req) => {
                self.reqs.peer_acked(req, error, local_good);
                self.maybe_finish(req);
            }
            None => self.resync_write_acked(r.range, error),
        }
    }

    fn on_peer_write(
        &mut self,
        seq: u64,
        seen: u64,
        offset: u64,
        kind: WriteKind,
        fua: bool,
        resync: bool,
    ) {
        if seq != self.session.peer_seen + 1 {
            self.drop_peer(
                &format!(
                    "protocol error: write seq {} after {}",
                    seq, self.session.peer_seen
                ),
                true,
            );
            return;
        }
        let len = kind.len();
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.cfg.data_size)
        {
            self.drop_peer(
                &format!("protocol error: write of {len} bytes at {offset} outside the device"),
                true,
            );
            return;
        }
        if !self.replicating() || matches!(self.disk, DiskState::Failed | DiskState::Diskless) {
            // Not applied: the peer sees the NegAck and marks the range out of sync.
            self.session.peer_seen = seq;
            self.send(Message::WriteAck {
                seq,
                error: errno::EIO,
            });
            return;
        }
        self.session.peer_seen = seq;
        if resync {
            let stats = self.sync.stats_mut();
            stats.bytes_received += len;
            stats.blocks_received += len.div_ceil(super::bitmap::BLOCK);
        }
        if self.cfg.protocol == Protocol::B {
            self.send(Message::RecvAck { seq });
        }
        let range = Range::new(offset, len);
        // Local writes the peer had not seen and that overlap: concurrent.
        let wins = resync || self.local_wins();
        let mut holes = Vec::new();
        if wins {
            for r in self.owed.unseen_by_peer(seen) {
                if r.req.is_some() && r.range.overlaps(&range) {
                    holes.push(r.range);
                }
            }
        }
        if !holes.is_empty() {
            self.notify("write-conflict", json!({ "offset": offset, "len": len, "resolved": "local write wins", "resync": resync }));
        }
        let pieces: Vec<DiskOp> = subtract(range, &holes)
            .into_iter()
            .map(|p| {
                let rel = (p.start - offset) as usize;
                match &kind {
                    WriteKind::Data(d) => DiskOp::Write {
                        offset: p.start,
                        data: d.slice(rel..rel + p.len() as usize),
                        fua: fua || resync,
                    },
                    WriteKind::Trim { .. } => DiskOp::Trim {
                        offset: p.start,
                        len: p.len(),
                    },
                    WriteKind::Zeroes { may_trim, .. } => DiskOp::WriteZeroes {
                        offset: p.start,
                        len: p.len(),
                        may_trim: *may_trim,
                    },
                }
            })
            .collect();
        let mut pieces = pieces;
        if fua && !holes.is_empty() {
            // The winner's bytes now stand for this FUA write: make them durable
            // too before acknowledging (simulator finding: the ack came with the
            // range still volatile).
            pieces.push(DiskOp::Flush);
        }
        let origin = Origin::Peer {
            seq,
            resync,
            epoch: self.link_epoch,
            holes,
        };
        self.enter_disk_order(range, origin, pieces);
    }

    fn on_bitmap_chunk(&mut self, first_word: u64, words: Vec<u64>, last: bool) {
        let Some(hs) = self.session.handshake.as_mut() else {
            // Outside the handshake: the sync source shares the blocks it will send.
            let ours = self.bitmap.words().len() as u64;
            let fits = first_word
                .checked_add(words.len() as u64)
                .is_some_and(|end| end <= ours);
            if !fits {
                self.drop_peer(
                    &format!(
                        "protocol error: bitmap chunk of {} words at word {first_word}, past our {ours} words",
                        words.len()
                    ),
                    true,
                );
                return;
            }
            self.bitmap.merge_at(first_word as usize, &words);
            return;
        };
        if first_word as usize != hs.peer_words.len() {
            self.drop_peer("protocol error: bitmap chunks out of order", true);
            return;
        }
        hs.peer_words.extend(words);
        if hs.peer_words.len() > self.bitmap.words().len() {
            self.drop_peer("protocol error: bitmap larger than the device", true);
            return;
        }
        if last {
            hs.bitmap_done = true;
            self.decide_sync();
        }
    }

    fn side_of_self(&self) -> Side {
        Side {
            gis: self.meta.gis,
            consistent: matches!(self.disk, DiskState::UpToDate | DiskState::Outdated),
            up_to_date: self.disk == DiskState::UpToDate,
            crashed_primary: self.crashed_primary,
            peer_may_lack: self.peer_may_lack(),
            full_sync_needed: self.meta.flags & md_flags::FULL_SYNC_NEEDED != 0,
        }
    }

    fn decide_sync(&mut self) {
        let Some(peer) = self.session.peer.clone() else {
            panic!("a sync decision without the peer's Hello");
        };
        let Some(hs) = self.session.handshake.take() else {
            panic!("a sync decision outside a handshake");
        };
        // Precondition: both bitmaps are in (the peer's last chunk arrived).
        assert!(
            hs.bitmap_done,
            "a sync decision before the peer's whole bitmap"
        );
        let h = &peer.hello;
        let peer_side = Side {
            gis: h.gis,
            consistent: matches!(disk_of(h.disk), DiskState::UpToDate | DiskState::Outdated),
            up_to_date: h.disk == PeerDisk::UpToDate,
            crashed_primary: h.crashed_primary,
            peer_may_lack: h.peer_may_lack,
            full_sync_needed: false,
        };
        let me = self.side_of_self();
        if !self.announced_still_true() {
            // The peer decides from our Hello: if we changed since (e.g. promoted
            // and started a new generation before the link was up on our side),
            // the two decisions disagree (simulator finding: both became sync
            // source). Start over with fresh Hellos.
            self.drop_peer(
                "our state changed during the connection handshake; reconnecting",
                true,
            );
            return;
        }
        let failed = |d: DiskState| matches!(d, DiskState::Failed | DiskState::Diskless);
        let (me_failed, peer_failed) = (failed(self.disk), failed(disk_of(h.disk)));
        if me_failed || peer_failed {
            // A failed disk cannot be resynced now: if the other side holds the
            // same or newer data it serves the I/O, else neither has the latest
            // data reachable and the link is dropped until the failed disk is
            // back (then the normal decision, split-brain detection included).
            let failed_side_behind =
                gi::failed_side_behind(&me, &peer_side, me_failed, peer_failed, self.local_wins());
            self.notify(
                "sync-decision",
                json!({ "decision": if failed_side_behind { "FailedDisk" } else { "FailedDiskAhead" }, "gis": gis_json(&self.meta.gis), "peer_gis": gis_json(&h.gis) }),
            );
            if failed_side_behind {
                // Keep the peer's out-of-sync blocks too, as the other decisions
                // do: a later resync from here walks only this bitmap (simulator
                // finding: the failed side's own write, in flight when its link
                // broke, was never resynced, and the target then cleared its bit).
                self.bitmap.merge(&hs.peer_words);
                let pages = self.bitmap.take_dirty();
                self.persist_bitmap_pages(pages);
                self.repl = Replication::Established;
                if peer_failed && !me_failed {
                    // This disk serves both nodes now: its writes from here on
                    // are a generation the failed disk lacks, as when the
                    // peer's disk goes on a connected pair (sim-long seed 98070:
                    // the peer's disk had failed while the link was down, no
                    // generation started, this primary's flushed writes then
                    // had the common identifiers, and after its power loss the
                    // peer's outdated disk was the source and overwrote them).
                    self.new_generation_without_peer_disk();
                }
                self.release_held();
            } else {
                self.drop_peer(
                    "a failed disk holds data the peer lacks; waiting for it to come back",
                    !me_failed,
                );
            }
            return;
        }
        let mut decision = gi::decide(&me, &peer_side, self.local_wins());
        if decision == Decision::InSync {
            // Same generation, yet blocks may differ: a node replayed its activity
            // log after a crash, or a write failed on one side. Clearing the bits
            // would leave those blocks different for good (simulator finding), so
            // resync them: from the side that has bits, by name if both have.
            let mine = self.bitmap.count() > 0;
            let theirs = hs.peer_words.iter().any(|w| *w != 0);
            decision = match (mine, theirs) {
                (false, false) => Decision::InSync,
                // An outdated disk (it failed) never wins over an up-to-date one.
                _ if me.up_to_date && !peer_side.up_to_date => Decision::Source { full: false },
                _ if !me.up_to_date && peer_side.up_to_date => Decision::Target { full: false },
                (true, false) => Decision::Source { full: false },
                (false, true) => Decision::Target { full: false },
                (true, true) if self.local_wins() => Decision::Source { full: false },
                (true, true) => Decision::Target { full: false },
            };
        }
        if self.faults.wrong_sync_direction && me.gis.current != peer_side.gis.current {
            // Fault injection (simulator only): the wrong side of a bitmap resync
            // between diverged generations becomes the source.
            if let Decision::Source { full: false } | Decision::Target { full: false } = decision {
                decision = decision.mirrored();
            }
        }
        self.notify(
            "sync-decision",
            json!({ "decision": format!("{decision:?}"), "gis": gis_json(&self.meta.gis), "peer_gis": gis_json(&h.gis), "peer_disk": format!("{:?}", disk_of(h.disk)) }),
        );
        // `connect --discard-my-data` applies to this connection only, as in DRBD:
        // kept, it silently discarded this node's data in a later split brain.
        let discard_mine = std::mem::take(&mut self.discard_my_data);
        if let Decision::SplitBrain { full } = decision {
            self.split_brain = true;
            self.out.push(Action::SplitBrainHandler);
            self.notify("split-brain", json!({ "peer": h.node }));
            decision = match self.resolve_split_brain(&hs.peer_words, full, discard_mine) {
                Some(d) => d,
                None => {
                    self.drop_peer("split brain detected; resolve it manually (`mirrorctl connect --discard-my-data` on the victim)", false);
                    return;
                }
            };
        }
        match decision {
            Decision::Unrelated => {
                self.drop_peer("the peers' data is unrelated (no common generation identifier); refusing to sync", false);
            }
            Decision::NoGoodData => {
                self.repl = Replication::Established;
                self.notify("no-good-data", json!({ "hint": "neither disk is up to date: run `mirrorctl primary --force` on the node whose data should win" }));
                self.release_held();
            }
            Decision::InSync => {
                self.repl = Replication::Established;
                let n = self.bitmap.bits();
                self.bitmap.clear_blocks(0..n);
                self.outdated_now_current();
                if self.crashed_primary {
                    self.crashed_primary = false;
                }
                // Nothing marked on either side: nothing the peer may lack.
                self.meta.flags &= !md_flags::PEER_MAY_LACK;
                self.split_brain = false;
                self.persist_superblock(false);
                let pages = self.bitmap.take_dirty();
                self.persist_bitmap_pages(pages);
                self.release_held();
            }
            Decision::Source { full } => {
                if full {
                    self.bitmap.set_all();
                } else {
                    self.bitmap.merge(&hs.peer_words);
                }
                self.split_brain = false;
                // Held requests go on once the resync has started, so writes
                // among them are mirrored to the target like any write during a
                // resync. Released before, the link was not replicating yet: a
                // write frozen during the disconnect went to this disk only,
                // was acknowledged, and the target, a primary reading blocks
                // its bitmap called in sync locally, returned its stale copy
                // (simulator finding, seed 23066).
                self.start_resync_as_source(full, self.cfg.sync_checksum && !full);
                self.release_held();
            }
            Decision::Target { full } => {
                if full {
                    self.bitmap.set_all();
                } else {
                    self.bitmap.merge(&hs.peer_words);
                }
                self.split_brain = false;
                self.become_sync_target(h.gis);
                self.release_held();
            }
            Decision::SplitBrain { .. } => unreachable!("resolved above"),
        }
    }

    /// An outdated disk (it had failed) holds the same data as its peer now.
    pub(super) fn outdated_now_current(&mut self) {
        if self.disk == DiskState::Outdated {
            self.disk = DiskState::UpToDate;
            self.meta.flags |= md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
            self.send_state();
        }
    }

    /// The after-sb-* policies. Returns the decision, or None to disconnect.
    fn resolve_split_brain(
        &mut self,
        peer_words: &[u64],
        full: bool,
        me_discard: bool,
    ) -> Option<Decision> {
        let peer = self.session.peer.clone()?;
        let peer_discard = peer.hello.discard_my_data;
        if me_discard != peer_discard {
            // The operator chose the victim (`connect --discard-my-data`).
            let d = if me_discard {
                Decision::Target { full }
            } else {
                Decision::Source { full }
            };
            self.notify(
                "split-brain-resolved",
                json!({ "decision": format!("{d:?}"), "discard_my_data": me_discard, "peer_discard_my_data": peer_discard }),
            );
            return Some(d);
        }
        let my_role = self.role;
        let primaries = (my_role == Role::Primary) as u8 + (peer.role == Role::Primary) as u8;
        let policy = match primaries {
            0 => self.cfg.split_brain.after_sb_0pri.clone(),
            1 => self.cfg.split_brain.after_sb_1pri.clone(),
            _ => self.cfg.split_brain.after_sb_2pri.clone(),
        };
        let my_changes = self.bitmap.count();
        let peer_changes: u64 = peer_words.iter().map(|w| w.count_ones() as u64).sum();
        let mut d = self.sb_policy_0pri(&policy, my_changes, peer_changes, &peer, full)?;
        if self.faults.sb_loser_wins {
            // Fault injection (simulator only): both sides keep the policy's loser.
            d = d.mirrored();
        }
        assert!(matches!(
            d,
            Decision::Source { .. } | Decision::Target { .. }
        ));
        // The policy's inputs go with the event: the simulator checks the winner
        // against its own reading of the policy (src/sim/policy.rs).
        self.notify(
            "split-brain-resolved",
            json!({
                "decision": format!("{d:?}"),
                "primary": my_role == Role::Primary,
                "peer_primary": peer.role == Role::Primary,
                "changes": my_changes,
                "peer_changes": peer_changes,
                "older_primary": self.meta.gis.current & 1 == 1,
                "peer_older_primary": peer.hello.gis.current & 1 == 1,
            }),
        );
        Some(d)
    }

    fn sb_policy_0pri(
        &mut self,
        policy: &SbPolicy,
        mine: u64,
        theirs: u64,
        peer: &PeerView,
        full: bool,
    ) -> Option<Decision> {
        let me_first = self.local_wins();
        let by_name = |lose_me: bool| {
            if lose_me {
                Decision::Target { full }
            } else {
                Decision::Source { full }
            }
        };
        match policy {
            SbPolicy::Disconnect => None,
            SbPolicy::DiscardZeroChanges => match (mine, theirs) {
                (0, 0) => Some(by_name(!me_first)),
                (0, _) => Some(Decision::Target { full }),
                (_, 0) => Some(Decision::Source { full }),
                _ => None,
            },
            SbPolicy::DiscardLeastChanges => Some(if mine == theirs {
                by_name(!me_first)
            } else {
                by_name(mine < theirs)
            }),
            SbPolicy::DiscardYoungerPrimary | SbPolicy::DiscardOlderPrimary => {
                // The older primary was primary before the split: its generation
                // began when it lost its peer (low bit of `current`, see
                // `new_generation`); the younger one was promoted during the split.
                // (This used the current roles and, with none primary, the names:
                // discard-younger-primary always discarded beta.)
                let older_me = self.meta.gis.current & 1 == 1;
                let older_peer = peer.hello.gis.current & 1 == 1;
                if older_me == older_peer {
                    // Both or neither: as DRBD, use discard-least-changes instead.
                    return self.sb_policy_0pri(
                        &SbPolicy::DiscardLeastChanges,
                        mine,
                        theirs,
                        peer,
                        full,
                    );
                }
                let discard_me = match policy {
                    SbPolicy::DiscardYoungerPrimary => !older_me,
                    _ => older_me,
                };
                Some(by_name(discard_me))
            }
            SbPolicy::DiscardNode(name) => Some(by_name(*name == self.cfg.node)),
            SbPolicy::DiscardSecondary => match (self.role, peer.role) {
                (Role::Secondary, Role::Primary) => Some(Decision::Target { full }),
                (Role::Primary, Role::Secondary) => Some(Decision::Source { full }),
                _ => None,
            },
            SbPolicy::Consensus => {
                // Discard the secondary if after-sb-0pri would discard it too.
                let zero = self.sb_policy_0pri(
                    &self.cfg.split_brain.after_sb_0pri.clone(),
                    mine,
                    theirs,
                    peer,
                    full,
                );
                let sec =
                    self.sb_policy_0pri(&SbPolicy::DiscardSecondary, mine, theirs, peer, full);
                if zero.is_some() && zero == sec {
                    zero
                } else {
                    None
                }
            }
            SbPolicy::CallPriLostAfterSb | SbPolicy::ViolentlyAs0p => {
                let d = self.sb_policy_0pri(
                    &self.cfg.split_brain.after_sb_0pri.clone(),
                    mine,
                    theirs,
                    peer,
                    full,
                )?;
                if matches!(policy, SbPolicy::CallPriLostAfterSb)
                    && matches!(d, Decision::Target { .. })
                    && self.role == Role::Primary
                {
                    // The losing primary must give up its role: it is demoted if no client holds it.
                    self.notify("pri-lost-after-sb", json!({}));
                    if !self.clients.is_empty() {
                        return None;
                    }
                    self.demote();
                }
                Some(d)
            }
        }
    }
}
