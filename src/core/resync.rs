//! Resync and online verify, driven by the sync source: it walks the out-of-sync
//! bitmap (or, for verify, every block), reads through the disk order so
//! application writes and resync data reach the peer in disk order, and sends
//! the data as resync writes that take the normal peer write path.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::json;

use super::bitmap::BLOCK;
use super::node::{gis_json, read_reply, Io, Node, Origin};
use super::ordering::Range;
use super::types::*;
use crate::peer::{Gis, Message, SyncMode, WriteKind, MAX_DATA_LEN};

/// Largest run of blocks moved by one resync request (1 MiB). Resync writes
/// are durable (FUA) on the target: with 256 KiB runs the target's disk did a
/// sync write per 256 KiB and a 2 GiB full resync ran at 0.85x a plain TCP
/// copy; with 1 MiB runs it is on par or faster (tools/bench/resync_bench.sh).
pub(super) const RUN_BLOCKS: u64 = 256;
/// A `resync-progress` / `verify-progress` event at most this often.
const PROGRESS_EVERY_MS: u64 = 1000;

#[derive(Debug)]
struct Batch {
    range: Range,
    /// The peer's checksums, for checksum resync and verify.
    sums: Option<Vec<u32>>,
    /// Resync writes sent for this batch and not yet acknowledged.
    writes_out: u32,
    /// Local writes issued while this batch's read was in the disk order: they
    /// went to the peer before the read's (older) data will, so the blocks they
    /// touch must not be sent from this read. Once the read's data is sent:
    /// ranges marked out of sync since (writes the peer failed), which the
    /// acknowledgement of that data must not clear.
    dirtied: Vec<Range>,
    /// The peer's writes this node had placed in its disk order when the read
    /// was ordered: the data reflects those and no later ones.
    seen: u64,
}

#[derive(Debug)]
pub(super) struct Resync {
    pub verify: bool,
    pub checksum: bool,
    total_blocks: u64,
    done_blocks: u64,
    /// Next block to consider.
    cursor: u64,
    started_ms: u64,
    batches: HashMap<u64, Batch>,
    /// Disk-order entry id -> batch id for reads in flight.
    reads: HashMap<u64, u64>,
    pub bytes_sent: u64,
    pub differing_blocks: u64,
    /// The source's start flush in flight (see `Io::ResyncStartFlush`).
    start_flush: Option<u64>,
    last_event_ms: u64,
}

impl Resync {
    fn status(&self, now_ms: u64, pace: ResyncPace) -> ResyncStatus {
        ResyncStatus {
            pace: Some(pace),
            ..progress(
                self.started_ms,
                now_ms,
                self.done_blocks,
                self.total_blocks,
                self.verify,
                self.differing_blocks,
            )
        }
    }
}

/// A resync as its target sees it: what is still to come is its bitmap.
#[derive(Debug)]
pub(super) struct TargetProgress {
    started_ms: u64,
    /// Blocks received and durable since it started.
    done_blocks: u64,
    last_event_ms: u64,
}

impl TargetProgress {
    /// A received resync starting at `now_ms`.
    pub(super) fn new(now_ms: u64) -> TargetProgress {
        TargetProgress {
            started_ms: now_ms,
            done_blocks: 0,
            last_event_ms: now_ms,
        }
    }
}

fn progress(
    started_ms: u64,
    now_ms: u64,
    done_blocks: u64,
    total_blocks: u64,
    verify: bool,
    differing_blocks: u64,
) -> ResyncStatus {
    let elapsed = now_ms.saturating_sub(started_ms).max(1);
    let done = done_blocks * BLOCK;
    let total = total_blocks * BLOCK;
    let rate = done * 1000 / elapsed;
    let eta = total.saturating_sub(done).checked_div(rate).unwrap_or(0);
    ResyncStatus {
        done_bytes: done,
        total_bytes: total,
        rate_bytes_per_sec: rate,
        eta_seconds: eta,
        verify,
        differing_blocks,
        pace: None,
    }
}

fn block_sums(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK as usize).map(crc32fast::hash).collect()
}

impl Node {
    fn new_resync(&mut self, verify: bool, checksum: bool) -> Resync {
        self.resync_rate.begin(self.cfg.sync_rate);
        let total = if verify {
            self.bitmap.bits()
        } else {
            self.bitmap.count()
        };
        Resync {
            verify,
            checksum: checksum || verify,
            total_blocks: total,
            done_blocks: 0,
            cursor: 0,
            started_ms: self.now_ms,
            batches: HashMap::new(),
            reads: HashMap::new(),
            bytes_sent: 0,
            differing_blocks: 0,
            start_flush: None,
            last_event_ms: self.now_ms,
        }
    }

    /// The running resync or verify, as its source or as its target.
    pub(super) fn resync_status(&self) -> Option<ResyncStatus> {
        if let Some(r) = self.sync.source() {
            let mode = self.cfg.sync_rate;
            let pace = ResyncPace {
                mode: mode.name(),
                inflight_limit: self.resync_rate.window(),
                floor_bytes_per_sec: self.resync_rate.floor_rate(mode),
                hold_bytes_per_sec: self.resync_rate.hold_rate(),
            };
            return Some(r.status(self.now_ms, pace));
        }
        let t = self.sync.target()?;
        (self.repl == Replication::SyncTarget).then(|| {
            progress(
                t.started_ms,
                self.now_ms,
                t.done_blocks,
                t.done_blocks + self.bitmap.count(),
                false,
                0,
            )
        })
    }

    /// A progress event about once a second while a resync or verify runs.
    fn progress_event(&mut self) {
        let now = self.now_ms;
        let due = |last: &mut u64| {
            let go = now.saturating_sub(*last) >= PROGRESS_EVERY_MS;
            if go {
                *last = now;
            }
            go
        };
        let role = if let Some(r) = self.sync.source_mut() {
            if !due(&mut r.last_event_ms) {
                return;
            }
            "source"
        } else if let Some(t) = self.sync.target_mut() {
            if !due(&mut t.last_event_ms) {
                return;
            }
            "target"
        } else {
            return; // no resync driven or received: nothing to report
        };
        // Only a running resync has progress to report (a received one's
        // progress is kept while the link is down, with no status then).
        let Some(st) = self.resync_status() else {
            return;
        };
        let event = if st.verify {
            "verify-progress"
        } else {
            "resync-progress"
        };
        let mut detail = json!({
            "role": role,
            "done_bytes": st.done_bytes,
            "total_bytes": st.total_bytes,
            "rate_bytes_per_sec": st.rate_bytes_per_sec,
            "eta_seconds": st.eta_seconds,
        });
        if st.verify {
            detail["differing_blocks"] = json!(st.differing_blocks);
        }
        self.notify(event, detail);
    }

    pub(super) fn start_resync_as_source(&mut self, full: bool, checksum: bool) {
        if full {
            self.bitmap.set_all();
        }
        let mode = if full {
            SyncMode::Full
        } else {
            SyncMode::Bitmap
        };
        self.repl = Replication::SyncSource;
        let flush = self.new_id();
        let mut r = self.new_resync(false, checksum);
        r.start_flush = Some(flush);
        self.sync.begin_source(r, true);
        self.ops.begin(flush, Io::ResyncStartFlush);
        self.out.push(Action::Disk {
            id: flush,
            op: DiskOp::Flush,
        });
        self.send(Message::StartSync {
            mode,
            source_gis: self.meta.gis,
        });
        self.notify(
            "resync-started",
            json!({ "role": "source", "full": full, "checksum": checksum, "total_bytes": self.bitmap.bytes() }),
        );
        self.resync_pump();
    }

    /// This node receives a resync: its disk is inconsistent until it ends.
    pub(super) fn become_sync_target(&mut self, source: Gis) {
        self.repl = Replication::SyncTarget;
        self.sync.begin_target(self.now_ms);
        self.disk = DiskState::Inconsistent;
        // From here the bitmap (all set when a full sync is needed: create-md and
        // invalidate set every bit) records what is left, persisted as the resync
        // goes, so the full-sync flag is done with. Kept, it made an interrupted
        // full sync start over from zero after a restart of the target.
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        self.meta.flags &= !(md_flags::CONSISTENT | md_flags::FULL_SYNC_NEEDED);
        self.meta.flags |= md_flags::SYNC_TARGET;
        // Remember whose data this disk is on its way to: after a cut the next
        // decision then finds the two related, and the resync continues from
        // the bits still set instead of starting a full sync over (an initial
        // sync's target shares no identifier with its source before). The
        // identifier is the one the source's bitmap counts from (its bitmap
        // identifier, or its current one if it has none: the identifier its
        // next generation would move there), as DRBD's target takes the sync
        // UUID, the source's bitmap UUID, as its current at the start
        // (P_SYNC_UUID). It is never the source's current into this node's
        // history: that says this disk went on from the source's data, newer
        // than it. If the source's end was durable and SyncDone lost (the
        // target's flush or the source's metadata failed), the source's history
        // held this node's current and this history the source's: each found
        // the other older, and with a failed disk the two decided opposite
        // directions (simulator seed 5828 and 17 more). The target's own
        // identifiers stay otherwise: this disk holds no data newer than the
        // source's (it is inconsistent until SyncDone, which adopts all of the
        // source's identifiers).
        let base = if source.bitmap != 0 {
            source.bitmap
        } else {
            source.current
        };
        let g = &mut self.meta.gis;
        if base != 0 && g.current != source.current {
            g.current = base;
            g.bitmap = 0;
        }
        self.persist_superblock(false);
        self.send_state();
        self.notify(
            "resync-started",
            json!({ "role": "target", "total_bytes": self.bitmap.bytes() }),
        );
    }

    pub(super) fn on_start_sync(&mut self, mode: SyncMode, source_gis: Gis) {
        if mode != SyncMode::None {
            if let Some(verify) = self.sync.source().map(|r| r.verify) {
                // This node started a resync or verify as source while the
                // peer's StartSync was on the way: the two starts crossed on
                // the link (simulator finding: seeds 24542, 95257 and 96459 of
                // make sim-long, an operator's verify here and resync there;
                // becoming sync target too broke "source or target, never
                // both").
                if !verify {
                    // Two resyncs, each node the source: neither may apply the
                    // other's data. The peer, receiving our StartSync, does the
                    // same; nothing of either resync was applied yet (each sent
                    // its StartSync before any resync data). The bits stay set,
                    // and the next connection's decision picks one direction
                    // for their union.
                    self.drop_peer(
                        "the peer started a resync while this node drove one; reconnecting to decide the direction",
                        true,
                    );
                    return;
                }
                // Our verify against the peer's resync: the resync wins. A verify
                // only compares, and the peer, a sync source, ignores our
                // StartVerify; ours is cut as a lost link cuts it, resumed once
                // the pair is in sync again (`maybe_resume_verify`). Replies to
                // its checksum requests still on the way find no batch.
                self.stop_resync();
                self.repl = Replication::Established;
            }
        }
        assert!(
            mode == SyncMode::None || self.sync.source().is_none(),
            "a sync target drives no resync"
        );
        match mode {
            SyncMode::None => {}
            SyncMode::Full => {
                self.bitmap.set_all();
                if self.repl != Replication::SyncTarget {
                    self.become_sync_target(source_gis);
                }
            }
            SyncMode::Bitmap => {
                if self.repl != Replication::SyncTarget {
                    // An operator's resync on a connected pair: the source sent
                    // only its own bitmap. Send ours back so it resyncs the union,
                    // as a connect does (simulator finding: this disk had failed a
                    // write the source holds; the source never sent that block,
                    // and the end of the resync cleared its bit here).
                    self.send_bitmap();
                    self.become_sync_target(source_gis);
                }
            }
        }
    }

    pub(super) fn stop_resync(&mut self) {
        self.sync.end_target();
        if let Some(r) = self.sync.take_source() {
            if r.verify {
                // Resumed from the first block not verified yet once the pair
                // is back in sync (`maybe_resume_verify`).
                let from = r
                    .batches
                    .values()
                    .map(|b| b.range.start / BLOCK)
                    .min()
                    .unwrap_or(r.cursor)
                    .min(r.cursor);
                debug_assert!(from <= self.bitmap.bits());
                self.sync.set_verify_resume(from, r.differing_blocks);
            }
            self.notify(
                "resync-stopped",
                json!({ "done_bytes": r.done_blocks * BLOCK, "total_bytes": r.total_blocks * BLOCK, "verify": r.verify }),
            );
        }
        assert!(self.sync.source().is_none() && self.sync.target().is_none());
    }

    pub(super) fn admin_resync(&mut self, full: bool, checksum: bool) -> Result<String, String> {
        if !self.replicating() {
            return Err("not connected to the peer".into());
        }
        if self.disk != DiskState::UpToDate {
            return Err("this node's disk is not up to date; it cannot be the sync source".into());
        }
        if self.sync.source().is_some() || self.repl != Replication::Established {
            return Err("a resync or verify is already running".into());
        }
        if full {
            self.bitmap.set_all();
        }
        if self.bitmap.count() == 0 {
            return Ok("nothing to resync: no out-of-sync blocks".into());
        }
        // Tell the target which blocks will come (it serves reads of them from us).
        self.send_bitmap();
        self.start_resync_as_source(full, checksum || self.cfg.sync_checksum);
        Ok(format!("resync started: {} bytes", self.bitmap.bytes()))
    }

    /// A verify cut by a lost link goes on where it stopped once the pair is
    /// connected and in sync again, with both disks up to date (called on
    /// each tick). Kept in memory only: a restart of the node starts over.
    pub(super) fn maybe_resume_verify(&mut self) {
        // Called on every tick; most find no verify to resume.
        let Some((from, differing)) = self.sync.verify_resume() else {
            return;
        };
        if self.sync.source().is_some() || self.start_verify(from, differing).is_err() {
            return;
        }
        self.sync.forget_verify_resume();
        self.notify(
            "verify-resumed",
            json!({ "from_bytes": from * BLOCK, "differing_blocks": differing }),
        );
    }

    pub(super) fn admin_verify(&mut self) -> Result<String, String> {
        self.start_verify(0, 0)
    }

    /// Starts a verify at block `from`, with `differing` blocks found before.
    fn start_verify(&mut self, from: u64, differing: u64) -> Result<String, String> {
        if !self.replicating() || self.repl != Replication::Established {
            return Err("verify needs a connected peer with no resync running".into());
        }
        if self.disk != DiskState::UpToDate
            || self
                .session
                .peer
                .as_ref()
                .is_none_or(|p| p.disk != DiskState::UpToDate)
        {
            return Err("verify needs both disks up to date".into());
        }
        self.repl = Replication::VerifySource;
        let mut r = self.new_resync(true, true);
        r.cursor = from.min(self.bitmap.bits());
        r.done_blocks = r.cursor;
        r.differing_blocks = differing;
        self.sync.begin_source(r, false);
        self.send(Message::StartVerify);
        self.notify(
            "verify-started",
            json!({ "role": "source", "total_bytes": self.cfg.data_size, "from_bytes": from * BLOCK }),
        );
        self.resync_pump();
        Ok("verify started".into())
    }

    pub(super) fn admin_invalidate(&mut self) -> Result<String, String> {
        if self.role == Role::Primary {
            return Err("refusing to invalidate a primary; make it secondary first".into());
        }
        if self.sync.source().is_some() {
            return Err("a resync or verify is running".into());
        }
        self.bitmap.set_all();
        self.disk = DiskState::Inconsistent;
        self.meta.flags &= !(md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE);
        self.meta.flags |= md_flags::FULL_SYNC_NEEDED;
        self.persist_superblock(false);
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        self.notify("invalidated", json!({}));
        if self.conn == ConnState::Connected {
            // Reconnect so that the sync decision makes this node a full sync target.
            self.drop_peer("invalidated: reconnecting to resync from the peer", true);
            debug_assert!(self.want_connect);
            self.maybe_dial();
            Ok("invalidated; full resync from the peer follows".into())
        } else {
            Ok("invalidated; a full resync follows when the peer connects".into())
        }
    }

    /// Called on each tick: the pace controller (resync_rate.rs) learns from
    /// the last tick and sets the window; then send more.
    pub(super) fn resync_tick(&mut self) {
        self.progress_event();
        let sample = super::resync_rate::TickSample {
            now_ms: self.now_ms,
            app_inflight: (self.reqs.len() + self.waits.held_len()) as u64,
            resync_running: self.sync.source().is_some(),
            done_bytes: self.sync.source().map_or(0, |r| r.done_blocks * BLOCK),
        };
        // Called on every tick: with no resync it learns the application's baseline.
        self.resync_rate.tick(self.cfg.sync_rate, sample);
        self.resync_pump();
    }

    /// Starts as many resync requests as the pace controller allows.
    fn resync_pump(&mut self) {
        let mode = self.cfg.sync_rate;
        loop {
            // A batch that failed at once may have ended the resync inside this loop.
            let Some(r) = self.sync.source() else {
                return;
            };
            if !self.resync_rate.may_start(mode, r.batches.len()) || r.start_flush.is_some() {
                return;
            }
            // Each round adds a batch: the loop ends within MAX_WINDOW rounds.
            assert!(
                r.cursor <= self.bitmap.bits(),
                "the resync cursor is inside the device"
            );
            let verify = r.verify;
            let cursor = r.cursor;
            let bits = self.bitmap.bits();
            // Next run: for verify every block in order, else the next set bits.
            let start = if verify {
                (cursor < bits).then_some(cursor)
            } else {
                self.bitmap.next_set(cursor)
            };
            let Some(first) = start else {
                self.maybe_finish_resync();
                return;
            };
            let mut last = first + 1;
            while last < bits && last - first < RUN_BLOCKS && (verify || self.bitmap.get(last)) {
                last += 1;
            }
            let offset = first * BLOCK;
            let end = (last * BLOCK).min(self.cfg.data_size);
            let range = Range { start: offset, end };
            let checksum = r.checksum;
            let bid = self.new_id();
            self.resync_rate.started(mode, range.len());
            if let Some(r) = self.sync.source_mut() {
                r.cursor = last;
                r.batches.insert(
                    bid,
                    Batch {
                        range,
                        sums: None,
                        writes_out: 0,
                        dirtied: Vec::new(),
                        seen: 0,
                    },
                );
            }
            if checksum {
                self.send(Message::ChecksumRequest {
                    id: bid,
                    offset,
                    len: range.len() as u32,
                    verify,
                });
            } else {
                self.resync_read(bid, range);
            }
        }
    }

    /// The sync source's start flush is done: the resync may read and send.
    pub(super) fn on_resync_start_flush_done(
        &mut self,
        io: u64,
        result: Result<Option<Bytes>, u32>,
    ) {
        // The resync may have stopped (link lost) while its start flush ran.
        let Some(r) = self.sync.source_mut() else {
            return;
        };
        if r.start_flush != Some(io) {
            return; // a resync since stopped
        }
        r.start_flush = None;
        if result.is_err() {
            self.disk_failed("flush at the start of a resync");
            self.stop_resync();
            return;
        }
        self.resync_pump();
    }

    /// Reads a batch through the disk order.
    fn resync_read(&mut self, bid: u64, range: Range) {
        let wid = self.ordered_read(range, Origin::ResyncRead);
        let seen = self.session.peer_seen;
        if let Some(r) = self.sync.source_mut() {
            r.reads.insert(wid, bid);
            if let Some(b) = r.batches.get_mut(&bid) {
                b.seen = seen;
            }
        }
    }

    pub(super) fn on_resync_read_done(&mut self, wid: u64, result: Result<Option<Bytes>, u32>) {
        if let Some(Origin::PeerRead { id }) = self.writes.get(&wid).map(|e| &e.origin) {
            // A read the peer asked for, ordered behind its earlier writes.
            let id = *id;
            self.write_done_after_read(wid);
            self.send(read_reply(id, result));
            return;
        }
        if let Some(Origin::LocalRead { conn, cookie }) = self.writes.get(&wid).map(|e| &e.origin) {
            // An NBD read, ordered behind writes in flight that overlapped it.
            let (conn, cookie) = (*conn, *cookie);
            self.write_done_after_read(wid);
            self.local_read_done(conn, cookie, result);
            return;
        }
        if let Some(Origin::ChecksumRead { id, verify }) = self.writes.get(&wid).map(|e| &e.origin)
        {
            let (id, verify) = (*id, *verify);
            self.write_done_after_read(wid);
            self.on_checksum_read_done(id, verify, result);
            return;
        }
        let bid = self.sync.source_mut().and_then(|r| r.reads.remove(&wid));
        let Some(bid) = bid else {
            // The resync stopped meanwhile: just leave the order.
            self.write_done_after_read(wid);
            return;
        };
        let data = match result {
            Ok(d) => d.unwrap_or_default(),
            Err(_) => {
                self.write_done_after_read(wid);
                self.disk_failed("read error during resync");
                self.stop_resync();
                return;
            }
        };
        let Some(batch) = self.sync.source_mut().and_then(|r| r.batches.remove(&bid)) else {
            self.write_done_after_read(wid);
            return;
        };
        let verify = self.sync.source().is_some_and(|r| r.verify);
        let first_block = batch.range.start / BLOCK;
        // Which blocks to send: all, or those whose checksums differ.
        let mine = block_sums(&data);
        let differs: Vec<bool> = match &batch.sums {
            Some(theirs) => mine
                .iter()
                .enumerate()
                .map(|(i, s)| theirs.get(i) != Some(s))
                .collect(),
            None => vec![true; mine.len()],
        };
        let mut writes_out = 0;
        if verify {
            let n = differs.iter().filter(|d| **d).count() as u64;
            for (i, d) in differs.iter().enumerate() {
                if *d {
                    self.bitmap
                        .set_range(Range::new((first_block + i as u64) * BLOCK, BLOCK));
                }
            }
            if let Some(r) = self.sync.source_mut() {
                r.differing_blocks += n;
                r.done_blocks += differs.len() as u64;
            }
        } else {
            // Blocks a later local write touched: that write reached the peer before
            // this (older) data would. Leave them out of sync; the next round reads
            // them again, behind the write in the disk order.
            let skip: Vec<bool> = (0..differs.len() as u64)
                .map(|i| {
                    let b = Range::new((first_block + i) * BLOCK, BLOCK);
                    batch.dirtied.iter().any(|d| d.overlaps(&b))
                })
                .collect();
            let mut i = 0;
            while i < differs.len() {
                if skip[i] {
                    i += 1;
                    continue;
                }
                if !differs[i] {
                    // Equal on both sides: in sync.
                    let b = first_block + i as u64;
                    self.bitmap.clear_blocks(b..b + 1);
                    self.sync.stats_mut().blocks_equal += 1;
                    if let Some(r) = self.sync.source_mut() {
                        r.done_blocks += 1;
                    }
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < differs.len() && differs[j] && !skip[j] {
                    j += 1;
                }
                let start = i * BLOCK as usize;
                let end = (j * BLOCK as usize).min(data.len());
                self.session.seq += 1;
                let seq = self.session.seq;
                let offset = batch.range.start + start as u64;
                let piece = data.slice(start..end);
                let range = Range::new(offset, piece.len() as u64);
                if let Some(r) = self.sync.source_mut() {
                    r.bytes_sent += piece.len() as u64;
                }
                self.sync.stats_mut().bytes_sent += piece.len() as u64;
                self.sync.stats_mut().blocks_sent += (piece.len() as u64).div_ceil(BLOCK);
                if self.faults.clear_resync_bit_early {
                    // Fault injection (simulator only): count the blocks as synced
                    // once queued, before the target has written them.
                    let n = self
                        .bitmap
                        .clear_blocks(range.start / BLOCK..range.end.div_ceil(BLOCK));
                    if let Some(r) = self.sync.source_mut() {
                        r.done_blocks += n;
                    }
                } else {
                    self.owed.write_sent(
                        seq,
                        super::peer_owed::Recent {
                            range,
                            req: None,
                            redo: None,
                        },
                    );
                    writes_out += 1;
                }
                // `seen` as of the read, not now: peer writes ordered after the read
                // are not in this data, so the target must not let it overwrite
                // them (simulator finding).
                self.send(Message::Write {
                    seq,
                    seen: batch.seen,
                    offset,
                    kind: WriteKind::Data(piece),
                    fua: true,
                    resync: true,
                });
                i = j;
            }
        }
        // The data is queued to the peer: application writes behind it may go now.
        self.write_done_after_read(wid);
        if writes_out > 0 {
            if let Some(r) = self.sync.source_mut() {
                r.batches.insert(
                    bid,
                    Batch {
                        range: batch.range,
                        sums: None,
                        writes_out,
                        dirtied: Vec::new(),
                        seen: batch.seen,
                    },
                );
            }
        }
        self.resync_pump();
    }

    /// A local write to `range` was just sent to the peer: resync reads already
    /// in the disk order ahead of it must not send their older data for it.
    pub(super) fn resync_note_local_write(&mut self, range: Range) {
        // Called for every local write sent to the peer; most find no resync.
        let Some(r) = self.sync.source_mut() else {
            return;
        };
        if r.verify {
            return;
        }
        for bid in r.reads.values() {
            if let Some(b) = r.batches.get_mut(bid) {
                if b.range.overlaps(&range) {
                    b.dirtied.push(range);
                }
            }
        }
    }

    /// `range` was just marked out of sync because the peer failed a write to
    /// it: resync writes to it still unacknowledged carry older data, so their
    /// acknowledgements must not clear it.
    pub(super) fn resync_note_marked(&mut self, range: Range) {
        // Called for every range marked after a failed peer write; most find no resync.
        let Some(r) = self.sync.source_mut() else {
            return;
        };
        for b in r.batches.values_mut() {
            if b.writes_out > 0 && b.range.overlaps(&range) {
                b.dirtied.push(range);
            }
        }
    }

    fn write_done_after_read(&mut self, wid: u64) {
        if let Some(e) = self.writes.get_mut(&wid) {
            e.parts_pending = 0;
        }
        self.write_done(wid);
    }

    /// A resync write we sent was acknowledged (on the source).
    pub(super) fn resync_write_acked(&mut self, range: Range, error: u32) {
        // Acks of resync writes may arrive after the resync ended (link lost, stopped).
        let Some(r) = self.sync.source_mut() else {
            return;
        };
        let bid = r
            .batches
            .iter()
            .find(|(_, b)| b.range.start <= range.start && range.end <= b.range.end)
            .map(|(k, _)| *k);
        // An ack (from the peer) for a batch already ended: nothing left to account.
        let Some(bid) = bid else { return };
        let Some(b) = r.batches.get_mut(&bid) else {
            unreachable!("resync batch {bid} just found is gone");
        };
        assert!(
            b.writes_out > 0,
            "resync batch {bid} acked with no write out"
        );
        b.writes_out -= 1;
        let marked = b.dirtied.clone();
        if b.writes_out == 0 {
            r.batches.remove(&bid);
        }
        if error == 0 {
            // Blocks marked since this data was sent (a later write the peer
            // failed) stay out of sync: this older data does not hold that write
            // (simulator finding: the ack of a resync write cleared the bit of an
            // application write the peer had failed meanwhile, and the block was
            // never resynced).
            let mut n = 0;
            for b in range.start / BLOCK..range.end.div_ceil(BLOCK) {
                let block = Range::new(b * BLOCK, BLOCK);
                if !marked.iter().any(|m| m.overlaps(&block)) {
                    self.bitmap.clear_blocks(b..b + 1);
                    n += 1;
                }
            }
            if let Some(r) = self.sync.source_mut() {
                r.done_blocks += n;
            }
        } else {
            self.bitmap.set_range(range);
            self.stop_resync();
            self.notify(
                "resync-failed",
                json!({ "reason": "the peer failed to write resync data" }),
            );
            return;
        }
        self.resync_pump();
    }

    /// A resync write is durable on this node (the target).
    pub(super) fn resync_write_durable(&mut self, range: Range) {
        let first = range.start.div_ceil(BLOCK);
        let last = range.end / BLOCK;
        if first < last {
            let n = self.bitmap.clear_blocks(first..last);
            if let Some(t) = self.sync.target_mut() {
                t.done_blocks += n;
            }
        }
    }

    fn maybe_finish_resync(&mut self) {
        // Called after every resync step; the resync may be over already.
        let Some(r) = self.sync.source() else {
            return;
        };
        if !r.batches.is_empty() || !r.reads.is_empty() {
            return;
        }
        let r = self.sync.take_source().expect("checked just above");
        if r.verify {
            self.repl = Replication::Established;
            self.sync.verify_finished(r.differing_blocks);
            self.send(Message::VerifyDone {
                differing_blocks: r.differing_blocks,
            });
            self.notify(
                "verify-finished",
                json!({ "differing_blocks": r.differing_blocks, "role": "source" }),
            );
            let pages = self.bitmap.take_dirty();
            self.persist_bitmap_pages(pages);
            return;
        }
        if self.bitmap.count() > 0 {
            // Blocks dirtied behind the cursor (write errors): go round again.
            let again = self.new_resync(false, r.checksum);
            self.sync.begin_source(again, false);
            self.resync_pump();
            return;
        }
        let g = &mut self.meta.gis;
        if g.bitmap != 0 {
            g.history = [g.bitmap, g.history[0]];
            g.bitmap = 0;
        }
        self.crashed_primary = false;
        self.meta.flags |= md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
        // The peer holds every marked block now (as source: it acknowledged
        // each durable; as target: this disk holds the source's).
        self.meta.flags &=
            !(md_flags::FULL_SYNC_NEEDED | md_flags::SYNC_TARGET | md_flags::PEER_MAY_LACK);
        self.repl = Replication::Established;
        self.outdated_now_current();
        // The peer adopts our current identifier at SyncDone: only once our
        // cleared bitmap identifier is durable (simulator finding: the source was
        // killed before it persisted the end of the resync, came back with its old
        // bitmap identifier, was promoted without a new generation, and its new
        // writes were later discarded as 'unchanged').
        self.session.sync_done_wait = true;
        self.persist_superblock(false);
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        self.sync.stats_mut().resyncs_finished += 1;
        self.notify(
            "resync-finished",
            json!({ "role": "source", "bytes_sent": r.bytes_sent, "total_bytes": r.total_blocks * BLOCK, "gis": gis_json(&self.meta.gis) }),
        );
    }

    pub(super) fn on_sync_done(&mut self, source_gis: Gis) {
        self.sync.end_target();
        if matches!(self.disk, DiskState::Failed | DiskState::Diskless) {
            // The disk failed during the resync: it is no good copy, whatever the
            // source sent. It stays failed, with its bitmap and metadata (simulator
            // finding: such a target became up to date, its out-of-sync bits
            // cleared, with a block it had failed to write).
            self.repl = Replication::Established;
            self.notify(
                "resync-finished",
                json!({ "role": "target", "disk": "failed" }),
            );
            return;
        }
        // Everything this disk holds becomes the up-to-date copy: what it had
        // cached from before the resync must be on its medium first (simulator
        // finding: a block it had not flushed since a split brain was lost in a
        // power cut after the sync, and its data later won).
        let io = self.new_id();
        self.ops.begin(
            io,
            Io::SyncDoneFlush {
                source_gis,
                epoch: self.link_epoch,
            },
        );
        self.out.push(Action::Disk {
            id: io,
            op: DiskOp::Flush,
        });
    }

    /// The target's flush at SyncDone is done: up to date now, if still the
    /// same resync.
    pub(super) fn on_sync_done_flush(
        &mut self,
        source_gis: Gis,
        epoch: u64,
        result: Result<Option<Bytes>, u32>,
    ) {
        if result.is_err() {
            self.disk_failed("flush at the end of a resync");
            return;
        }
        if epoch != self.link_epoch
            || self.repl != Replication::SyncTarget
            || matches!(self.disk, DiskState::Failed | DiskState::Diskless)
        {
            return; // the link went meanwhile: the next connection finishes it
        }
        let n = self.bitmap.bits();
        self.bitmap.clear_blocks(0..n);
        // But writes of ours the peer acknowledged and may still lose in a power
        // cut stay marked where the activity log no longer covers them, as an
        // eviction marked them (simulator finding: an eviction during the resync
        // marked one, this cleared it, the peer lost it in a power cut, and the
        // block differed unmarked).
        let active = self.txn.al().map(|al| al.active()).unwrap_or_default();
        let uncovered: Vec<Range> = self
            .owed
            .unflushed()
            .filter(|r| {
                !r.is_empty() && super::activity_log::extents_of(**r).any(|e| !active.contains(&e))
            })
            .copied()
            .collect();
        for r in uncovered {
            self.bitmap.set_range(r);
        }
        // And so do our writes the source failed during the resync, up to this
        // flush: they are on this disk, not on the peer's, and no resync data
        // will bring them there (simulator finding: the source's disk failed our
        // write after it had sent SyncDone; the error ack marked the range here
        // while this flush ran, the clear-all above wiped it, and the block
        // differed unmarked once this node was up to date). In DRBD a bit a
        // NegAck set (got_NegAck -> drbd_set_out_of_sync) stays until resynced.
        for r in self.sync.take_target_failed() {
            self.bitmap.set_range(r);
        }
        self.meta.gis = Gis {
            bitmap: 0,
            ..source_gis
        };
        self.disk = DiskState::UpToDate;
        self.crashed_primary = false;
        self.meta.flags |= md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE;
        // The peer holds every marked block now (as source: it acknowledged
        // each durable; as target: this disk holds the source's).
        self.meta.flags &=
            !(md_flags::FULL_SYNC_NEEDED | md_flags::SYNC_TARGET | md_flags::PEER_MAY_LACK);
        self.repl = Replication::Established;
        self.sync.stats_mut().resyncs_finished += 1;
        self.persist_superblock(false);
        let pages = self.bitmap.take_dirty();
        self.persist_bitmap_pages(pages);
        self.send_state();
        self.notify(
            "resync-finished",
            json!({ "role": "target", "gis": gis_json(&self.meta.gis) }),
        );
        // The source's disk may have failed after it sent everything (its
        // SyncDone still comes): this disk is now the only up-to-date one, and
        // what is written from here on is only here. Without a new generation
        // both disks later came back outdated with the same identifiers and the
        // direction went by name: the failed source's old data overwrote this
        // node's writes (simulator seed 35061).
        let peer_disk_gone = self
            .session
            .peer
            .as_ref()
            .is_some_and(|p| matches!(p.disk, DiskState::Failed | DiskState::Diskless));
        if peer_disk_gone {
            self.new_generation_without_peer_disk();
        }
    }

    pub(super) fn on_checksum_request(&mut self, id: u64, offset: u64, len: u32, verify: bool) {
        if len == 0
            || offset
                .checked_add(len as u64)
                .is_none_or(|e| e > self.cfg.data_size)
        {
            self.drop_peer("protocol error: checksum request outside the device", true);
            return;
        }
        if len > MAX_DATA_LEN {
            self.drop_peer(
                &format!("protocol error: checksum request of {len} bytes, over the {MAX_DATA_LEN}-byte limit"),
                true,
            );
            return;
        }
        if verify {
            self.checksum_read(id, verify, offset, len);
            return;
        }
        // Checksum resync clears the source's bit when the sums match, so what
        // matched must be on this disk's medium, not only in its cache: flush
        // first (simulator finding: a block acknowledged but not yet flushed here
        // matched, its bit was cleared, then a power loss here lost it).
        let io = self.new_id();
        self.ops.begin(io, Io::ChecksumFlush { id, offset, len });
        self.out.push(Action::Disk {
            id: io,
            op: DiskOp::Flush,
        });
    }

    /// The flush before a checksum resync read is done: read now.
    pub(super) fn on_checksum_flush_done(
        &mut self,
        id: u64,
        offset: u64,
        len: u32,
        result: Result<Option<Bytes>, u32>,
    ) {
        if let Err(error) = result {
            self.send(Message::ChecksumReply {
                id,
                error,
                sums: Vec::new(),
            });
            return;
        }
        self.checksum_read(id, false, offset, len);
    }

    /// Reads what a checksum request covers, behind any write in flight here
    /// that overlaps it.
    fn checksum_read(&mut self, id: u64, verify: bool, offset: u64, len: u32) {
        self.read_behind_writes(
            Range::new(offset, len as u64),
            Origin::ChecksumRead { id, verify },
            Io::ChecksumRead { id, verify },
        );
    }

    pub(super) fn on_checksum_read_done(
        &mut self,
        id: u64,
        _verify: bool,
        result: Result<Option<Bytes>, u32>,
    ) {
        let m = match result {
            Ok(d) => Message::ChecksumReply {
                id,
                error: 0,
                sums: block_sums(&d.unwrap_or_default()),
            },
            Err(error) => Message::ChecksumReply {
                id,
                error,
                sums: Vec::new(),
            },
        };
        self.send(m);
    }

    pub(super) fn on_checksum_reply(&mut self, id: u64, error: u32, sums: Vec<u32>) {
        let asked = self
            .sync
            .source()
            .and_then(|r| r.batches.get(&id))
            .map(|b| b.range.len().div_ceil(BLOCK));
        if let (0, Some(blocks)) = (error, asked) {
            if blocks != sums.len() as u64 {
                self.drop_peer(
                    &format!(
                        "protocol error: checksum reply {id} carries {} sums for {blocks} blocks",
                        sums.len()
                    ),
                    true,
                );
                return;
            }
        }
        let Some(range) = self.sync.source_mut().and_then(|r| {
            let b = r.batches.get_mut(&id)?;
            if error == 0 {
                b.sums = Some(sums);
            }
            Some(b.range)
        }) else {
            return; // from the peer: a reply for a batch or resync since ended
        };
        self.resync_read(id, range);
    }
}
