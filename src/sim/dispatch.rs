//! Carrying out what a core asks (its `Action`s), and delivering what the
//! network carries to the receiving core.

use bytes::BytesMut;

use super::cluster::{Ev, ReqKind, Sim};
use super::data::{self, SECTOR};
use super::disk::SimDisk;
use super::model::Kind;
use super::net::Step;
use crate::core::{Action, DiskOp, Event};
use crate::peer::{Decoder, Message, WriteKind, DEFAULT_MAX_PAYLOAD};

impl Sim {
    /// Hands node `n`'s disk op `id` to its simulated disk, which completes it later.
    pub fn submit_disk(&mut self, n: usize, id: u64, op: DiskOp) {
        self.trace_line(Some(n), || {
            format!("disk {id}: {}", super::trace::disk_op(&op))
        });
        let now = self.now();
        let (sid, delay) = self.nodes[n].disk.submit(id, op, now, &mut self.rng_disk);
        let inc = self.nodes[n].inc;
        self.world.after(
            delay,
            Ev::DiskDone {
                node: n,
                inc,
                op: sid,
            },
        );
    }

    pub fn dispatch(&mut self, n: usize, actions: Vec<Action>) {
        for a in actions {
            self.mix(n as u64 + 1);
            match a {
                Action::Disk { id, op } => self.submit_disk(n, id, op),
                Action::Reply {
                    conn,
                    cookie,
                    result,
                } => self.on_reply(n, conn, cookie, result),
                Action::Send { link, msg } => self.on_send(n, link, msg),
                Action::Persist { id, write } => {
                    self.trace_line(Some(n), || {
                        format!("persist {id}: {}", super::trace::meta_write(&write))
                    });
                    if self.nodes[n].meta.push(id, write) {
                        let d = self.rng_disk.range(100, 3_000);
                        let inc = self.nodes[n].inc;
                        self.world.after(d, Ev::MetaDone { node: n, inc });
                    }
                }
                Action::Dial => {
                    self.trace_line(Some(n), || "dials the peer".into());
                    let d = self.rng_net.range(100, 2_000);
                    let inc = self.nodes[n].inc;
                    self.world.after(d, Ev::Connect { from: n, inc });
                }
                Action::CloseConn { link, reason } => {
                    self.trace_line(Some(n), || format!("closes link {link}: {reason}"));
                    let offered = self.net.links.get(&link).is_some_and(|l| l.offered[n]);
                    assert!(
                        offered,
                        "{} closed link {link}, which it does not hold",
                        Sim::name(n)
                    );
                    self.net.close(link, n);
                    let d = self.rng_net.range(50, 2_000);
                    let inc = self.nodes[n].inc;
                    self.world.after(d, Ev::ConnDown { link, node: n, inc });
                    self.wake_links();
                }
                Action::AdminReply { id, result } => {
                    self.trace_line(Some(n), || format!("admin {id} -> {result:?}"));
                    if let Some(at) = self.forcing.iter().position(|f| f.0 == id) {
                        self.forcing.swap_remove(at);
                        if result.is_ok() {
                            self.good_data = true;
                            self.set_reference(n, "primary --force");
                        }
                    }
                }
                Action::Notify(v) => self.on_notify(n, v),
                // The fence-peer handler: mostly "peer outdated", sometimes
                // another of DRBD's answers or a broken handler.
                Action::FencePeer { id } => {
                    let exit = match self.rng_fault.below(20) {
                        0..=11 => Some(4),
                        12 | 13 => Some(3),
                        14 | 15 => Some(5),
                        16 => Some(6),
                        17 => Some(7),
                        18 => Some(1),
                        _ => None,
                    };
                    let delay = self.rng_fault.range(1_000, 800_000);
                    self.trace_line(Some(n), || {
                        format!("fence-peer {id}: handler answers {exit:?} in {delay} us")
                    });
                    let inc = self.nodes[n].inc;
                    self.world.after(
                        delay,
                        Ev::FenceDone {
                            node: n,
                            inc,
                            id,
                            exit,
                        },
                    );
                }
                Action::Attached { .. } | Action::StreamWrite { .. } => {
                    unreachable!("answers are taken by Sim::ask")
                }
                Action::SplitBrainHandler => {
                    self.trace_line(Some(n), || "runs the split-brain handler".into())
                }
            }
        }
    }

    /// The simulator's write id for an application write node `n` mirrors.
    fn mirrored_write(
        &mut self,
        n: usize,
        link: u64,
        seq: u64,
        offset: u64,
        kind: &WriteKind,
    ) -> Option<u32> {
        match kind {
            WriteKind::Data(d) => {
                let vals = match data::decode(d) {
                    Ok(v) => v,
                    Err(e) => {
                        self.violate(
                            "corrupt data sent",
                            format!(
                                "{} mirrored a write at {offset} whose bytes are not ours: {e}",
                                Sim::name(n)
                            ),
                        );
                        return None;
                    }
                };
                let id = vals.first().and_then(|v| data::write_of(*v))?;
                let piece = offset / SECTOR..offset / SECTOR + vals.len() as u64;
                let ok = self.model.rec(id).is_some_and(|w| {
                    w.node == n && w.first <= piece.start && piece.end <= w.first + w.n
                });
                if !ok {
                    self.violate(
                        "wrong data sent",
                        format!(
                            "{} mirrored write {id} at {offset} with data that is not that write's",
                            Sim::name(n)
                        ),
                    );
                    return None;
                }
                Some(id)
            }
            WriteKind::Trim { len } | WriteKind::Zeroes { len, .. } => {
                let want = if matches!(kind, WriteKind::Trim { .. }) {
                    Kind::Trim
                } else {
                    Kind::Zeroes
                };
                let (first, count) = (offset / SECTOR, *len as u64 / SECTOR);
                // The core says which client request it sent (its request table);
                // the guesses below are for a request the simulator's client no
                // longer tracks (a copy held on a connection it shut). Seeds
                // 9472, 16917, 21098 and 4 more of make sim-long: two identical
                // write-zeroes pending on one connection, the latest was taken,
                // and the first one's reply looked unmirrored.
                let origin = self.nodes[n]
                    .core
                    .as_ref()
                    .and_then(|c| c.peer_write_origin(seq))
                    .and_then(|(conn, cookie)| {
                        self.nodes[n].clients.get(&conn)?.inflight.get(&cookie)
                    })
                    .and_then(|r| match r.kind {
                        ReqKind::Write(id) => Some(id),
                        _ => None,
                    })
                    .filter(|id| {
                        let w = &self.model.writes[*id as usize];
                        w.kind == want && w.first <= first && first + count <= w.first + w.n
                    });
                if origin.is_some() {
                    return origin;
                }
                let pending = self.model.pending(n);
                // A trim carries no data to tell whose it is. With client resends
                // two identical ones may be pending: a copy held on a connection
                // the client shut, and its new copy (seeds 12949 and 29 more of
                // make sim-long: the held one took the new one's send, and the new
                // one's reply then looked unmirrored). The latest issued is taken;
                // the other is paired with the next identical send.
                let whole = pending
                    .iter()
                    .copied()
                    .filter(|id| {
                        let w = &self.model.writes[*id as usize];
                        w.kind == want && w.first == first && w.n == count && w.mirror.is_none()
                    })
                    .max_by_key(|id| self.model.writes[*id as usize].issue);
                // Else a piece of a split one (the workload has no other trim
                // or write-zeroes pending on a node with a large one pending;
                // with pieces of one extent small ones that cross an extent
                // boundary are split too): each end of a piece is an end of
                // its write or a piece boundary.
                let piece = self.sc.max_piece_extents.min(self.sc.al_slots as u64).max(1)
                    * (4 << 20) // an activity-log extent
                    / SECTOR;
                // Two small ones that cross the same extent boundary have the
                // same piece after it (seeds 42053 and 96723 of make sim-long:
                // both such pieces were taken for the first write, whose count
                // then waited for the second's ack). A write takes a piece
                // only once per link, and the one whose previous piece ends
                // where this one starts comes first (a split sends its pieces
                // in order).
                let candidates: Vec<u32> = pending
                    .iter()
                    .copied()
                    .filter(|id| {
                        let w = &self.model.writes[*id as usize];
                        let end = first + count;
                        w.kind == want
                            && w.n > count
                            && w.first <= first
                            && end <= w.first + w.n
                            && (first == w.first || first % piece == 0)
                            && (end == w.first + w.n || end % piece == 0)
                            && !w.piece_sent_at(link, first)
                    })
                    .collect();
                whole.or_else(|| {
                    candidates
                        .iter()
                        .copied()
                        .find(|id| self.model.writes[*id as usize].piece_ends_at(link, first))
                        .or_else(|| candidates.first().copied())
                })
            }
        }
    }

    fn on_send(&mut self, n: usize, link: u64, m: Message) {
        self.trace_line(Some(n), || {
            format!("send on link {link}: {}", super::trace::message(&m))
        });
        if self.net.links.get(&link).is_none_or(|l| l.closed[n]) {
            self.trace_line(Some(n), || "  (link closed: dropped)".into());
            return;
        }
        match &m {
            Message::BitmapChunk { words, last, .. } => {
                let d = &mut self.net.links.get_mut(&link).expect("active link").dirs[n];
                if !d.bitmap_done {
                    d.bitmap.extend_from_slice(words);
                    d.bitmap_done = *last;
                }
            }
            Message::Write {
                seq,
                offset,
                kind,
                resync: false,
                ..
            } => {
                if let Some(id) = self.mirrored_write(n, link, *seq, *offset, kind) {
                    let first = *offset / SECTOR;
                    let piece = first..first + kind.len() / SECTOR;
                    self.model.writes[id as usize].piece_sent(link, *seq, piece.clone());
                    self.net.links.get_mut(&link).expect("active link").dirs[n]
                        .writes
                        .insert(*seq, (id, piece));
                }
            }
            Message::WriteAck { seq, error: 0 } => {
                let piece = self.net.links[&link].dirs[1 - n].writes.get(seq).cloned();
                if let Some((id, sectors)) = piece {
                    self.check_peer_has_write(n, id, sectors);
                }
            }
            _ => {}
        }
        let now = self.now();
        if let Some(t) = self.net.push(link, n, m, now, &mut self.rng_net) {
            self.world.at(t, Ev::Deliver { link, dir: n });
        }
    }

    /// The next delivery on direction `dir` (from node `dir`) of `link`.
    pub fn deliver(&mut self, link: u64, dir: usize) {
        let now = self.now();
        let to = 1 - dir;
        let waiting = self
            .net
            .links
            .get(&link)
            .is_some_and(|l| !l.offered[to] && !l.closed[to]);
        if waiting {
            // Not offered to its core yet: the bytes wait (the offer wakes the link).
            self.net.unschedule(link, dir);
            return;
        }
        match self.net.pop(link, dir, now) {
            Step::Nothing => {}
            Step::Eof => {
                let l = &self.net.links[&link];
                if !l.closed[to] {
                    let offered = l.offered[to];
                    self.net.close(link, to);
                    if offered {
                        self.trace_line(Some(to), || {
                            format!("link {link}: the peer closed the connection")
                        });
                        self.run_core(to, |c| {
                            c.handle(Event::ConnDown {
                                link,
                                reason: "the peer closed the connection".into(),
                            })
                        });
                    }
                    self.wake_links();
                }
            }
            Step::Msg(m, corrupt) => {
                if corrupt {
                    self.deliver_corrupt(link, to, &m);
                } else {
                    self.round_trip(&m);
                    self.deliver_msg(link, to, m);
                }
            }
        }
        if let Some(t) = self.net.wake(link, dir, self.now()) {
            self.world.at(t, Ev::Deliver { link, dir });
        }
    }

    /// Every message goes through the real codec once, as on the wire.
    fn round_trip(&mut self, m: &Message) {
        let mut buf = BytesMut::new();
        crate::peer::encode(m, &mut buf);
        match Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf) {
            Ok(Some(back)) if &back == m && buf.is_empty() => {}
            other => self.violate(
                "codec",
                format!(
                    "{} does not survive encode/decode: {other:?}",
                    super::trace::message(m)
                ),
            ),
        }
    }

    /// A frame with a flipped bit reaches node `to`: its decoder must refuse it.
    fn deliver_corrupt(&mut self, link: u64, to: usize, m: &Message) {
        let mut buf = BytesMut::new();
        crate::peer::encode(m, &mut buf);
        let bit = self.rng_net.below(buf.len() as u64 * 8) as usize;
        buf[bit / 8] ^= 1 << (bit % 8);
        self.net.corrupted += 1;
        let reason = match Decoder::new(DEFAULT_MAX_PAYLOAD).decode(&mut buf) {
            Ok(Some(back)) => {
                self.violate(
                    "corruption accepted",
                    format!(
                        "a {} with bit {bit} flipped decoded as {}",
                        super::trace::message(m),
                        super::trace::message(&back)
                    ),
                );
                return;
            }
            // A longer length field: the reader waits for bytes that belong to
            // later frames, whose CRC then fails.
            Ok(None) => "bad message from the peer: framing lost".to_string(),
            Err(e) => format!("bad message from the peer: {e}"),
        };
        self.trace_line(Some(to), || {
            format!(
                "link {link}: corrupted {} refused: {reason}",
                super::trace::message(m)
            )
        });
        let offered = self.net.links[&link].offered[to];
        self.net.close(link, to);
        if offered {
            self.run_core(to, |c| c.handle(Event::ConnDown { link, reason }));
        }
        self.wake_links();
    }

    fn deliver_msg(&mut self, link: u64, to: usize, m: Message) {
        if !self.alive(to) || self.net.links[&link].closed[to] {
            return;
        }
        self.trace_line(Some(to), || {
            format!("recv on link {link}: {}", super::trace::message(&m))
        });
        if !self.net.links[&link].active[to] {
            // The Hello exchange, or a connection the core is closing: no bookkeeping.
            self.run_core(to, |c| c.handle(Event::PeerMsg { link, msg: m }));
            return;
        }
        match &m {
            Message::BitmapChunk { last: true, .. } => {
                if let Some(c) = self.nodes[to].core.as_ref() {
                    self.nodes[to].bitmap_before = c.bitmap_words().to_vec();
                }
            }
            Message::WriteAck { seq, error } => {
                let d = &mut self.net.links.get_mut(&link).expect("delivering link").dirs[to];
                if let Some((id, _)) = d.writes.get(seq) {
                    let w = &mut self.model.writes[*id as usize];
                    // An answer with no RecvAck before it (the peer's disk had
                    // failed) answers the piece for protocol B too, as in the
                    // core (seeds 37208 and 72052 of make sim-long: one piece
                    // received, the other failed, and the write counted as not
                    // received).
                    if d.received.insert(*seq) {
                        w.piece_received();
                    }
                    w.piece_acked(*error);
                }
            }
            Message::RecvAck { seq } => {
                let d = &mut self.net.links.get_mut(&link).expect("delivering link").dirs[to];
                if let Some((id, _)) = d.writes.get(seq) {
                    if d.received.insert(*seq) {
                        self.model.writes[*id as usize].piece_received();
                    }
                }
            }
            _ => {}
        }
        self.run_core(to, |c| c.handle(Event::PeerMsg { link, msg: m }));
    }

    fn on_notify(&mut self, n: usize, v: serde_json::Value) {
        let event = v
            .get("event")
            .and_then(|e| e.as_str())
            .unwrap_or("")
            .to_string();
        self.trace_line(Some(n), || format!("event {v}"));
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        if event == "resync-started" && s("role") == "target" {
            // Also an operator's resync (`resync --full` on either node): the
            // source's data is the one the cluster keeps (seed 92700: a full
            // resync from bravo made alpha, the reference until then, its target).
            // Taken when the target starts, not the source: a source may start
            // on a Hello its peer had outdated on the way, and that peer refuses
            // the session; the resync it began stands for nothing (sim-long
            // seed 81690: bravo started as a source on alpha's old identifiers,
            // alpha had begun a generation of its own meanwhile and reconnected).
            // A resync that a `primary --force` started before it was answered
            // is part of that command: the source holds good data once the
            // answer says so (its new generation durable), not before; a kill
            // until then undoes both (sim-long seed 39401).
            // A target that decided on a Hello its peer had outdated on the way
            // starts a resync its peer refuses (sim-long seeds 2727 26938 82348:
            // alpha was invalidated, or began a generation, while its Hello was
            // on the way). An operator's resync has no decision at that instant.
            let by_stale_decision =
                self.nodes[n].decision_at == Some(self.now()) && !self.nodes[n].decision_fresh;
            if !self.forcing_now(1 - n) && !by_stale_decision {
                self.set_reference(1 - n, "resync target started");
            }
        }
        match event.as_str() {
            "peer-session"
                if v.get("other_connections_closed").and_then(|x| x.as_u64()) > Some(0) =>
            {
                self.stats.races += 1;
            }
            "trim-budget" => {
                self.stats.trims_cut_short += 1;
                let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                let skipped = num("skipped_bytes");
                self.stats.trim_bytes_skipped += skipped;
                // Its reply follows: the skipped sectors promise nothing.
                let (first, count) = (num("offset") / SECTOR, num("len") / SECTOR);
                let id = self.model.pending(n).iter().copied().find(|id| {
                    let w = &self.model.writes[*id as usize];
                    w.kind == Kind::Trim && w.first == first && w.n == count
                });
                match id {
                    Some(id) => {
                        let end = (num("offset") + num("len") - skipped) / SECTOR;
                        self.model.writes[id as usize].skipped_from = Some(end);
                    }
                    None => self.violate(
                        "unknown trim cut short",
                        format!("{} cut short a trim that is not pending: {v}", Sim::name(n)),
                    ),
                }
            }
            "pause-started" if v.get("reason").and_then(|x| x.as_str()) == Some("start") => {
                self.stats.start_pauses += 1;
            }
            "pause-started" => {
                self.stats.pauses += 1;
                let ranges: Vec<(u64, u64)> = v
                    .get("ranges")
                    .and_then(|r| r.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| Some((x.get(0)?.as_u64()?, x.get(1)?.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                let now = self.now();
                if let Some((t, other)) = &self.nodes[1 - n].pause {
                    let overlap = ranges
                        .iter()
                        .any(|(a, b)| other.iter().any(|(c, d)| a < d && c < b));
                    if overlap && now.saturating_sub(*t) < 2_000_000 {
                        self.stats.overlapping_cuts += 1;
                    }
                }
                self.nodes[n].pause = Some((now, ranges));
            }
            "pause-ended" if v.get("at_start").and_then(|x| x.as_bool()) == Some(true) => {
                // A start pause ended alone counts nothing (and must not fall
                // through to the link pause's arm below).
                let reconnected = v.get("reconnected").and_then(|x| x.as_bool()) == Some(true);
                if reconnected {
                    self.stats.start_pauses_reconnected += 1;
                }
            }
            "pause-ended" => {
                self.nodes[n].pause = None;
                if v.get("reconnected").and_then(|x| x.as_bool()) == Some(true) {
                    self.stats.pauses_reconnected += 1;
                    self.stats.writes_reissued +=
                        v.get("writes").and_then(|x| x.as_u64()).unwrap_or(0);
                }
            }
            "sync-decision" => {
                self.stats.decisions += 1;
                let d = s("decision");
                if !d.starts_with("SplitBrain") {
                    self.nodes[n].discarded = false;
                }
                if self.net.active_link(n).is_some() {
                    self.check_reference(n, &d, &v);
                }
                if d.starts_with("Source") {
                    self.model.data_wins(n);
                } else if d.starts_with("Target") {
                    self.model.synced_from_peer(n);
                }
                self.on_decision(n, &d, false);
            }
            "split-brain" => self.stats.split_brains += 1,
            "new-current-gi" if self.reference == Some(1 - n) => {
                self.clear_reference("the other node began a generation");
            }
            "split-brain-resolved" => {
                let d = s("decision");
                self.check_resolution(n, &v);
                self.nodes[n].discarded = false;
                if self.net.active_link(n).is_some() && self.nodes[n].decision_fresh {
                    let winner = if d.starts_with("Source") { n } else { 1 - n };
                    self.set_reference(winner, "split brain resolved");
                }
                if d.starts_with("Source") {
                    self.model.data_wins(n);
                } else if d.starts_with("Target") {
                    self.model.synced_from_peer(n);
                }
                self.on_decision(n, &d, true);
            }
            // The operator chose this node's data: the model follows now (its
            // writes wait for the superblock); good data is there once the
            // core answers the command, after that superblock is durable.
            "forced-up-to-date" => self.rebase(n, "primary --force"),
            "resync-finished" if v.get("gis").is_some() => self.good_data = true,
            "disk-failed" | "invalidated" => {
                self.good_data = false;
                if self.reference == Some(n) {
                    self.clear_reference(&event);
                }
                if event == "disk-failed" {
                    let now = self.now();
                    self.nodes[n].failed_since.get_or_insert(now);
                }
            }
            "no-good-data" if self.good_data && !self.any_consistent_disk() => self.violate(
                "good data lost",
                format!(
                    "{}'s handshake found no up-to-date disk on either node, though one was up to date and no disk failed or was invalidated since",
                    Sim::name(n)
                ),
            ),
            "role" if s("role") == "primary" && !self.replicating(n) => {
                self.model.data_wins(n);
            }
            "verify-started" if s("role") == "source" => {
                let from = v.get("from_bytes").and_then(|x| x.as_u64()).unwrap_or(0);
                self.nodes[n].verify_resumed = from > 0;
            }
            "verify-finished" if s("role") == "source" => {
                self.nodes[n].last_verify = v.get("differing_blocks").and_then(|x| x.as_u64());
            }
            _ => {}
        }
    }

    /// Whether a live node's disk is consistent now (up to date or outdated): a
    /// handshake that found no good data decided from a Hello that is out of
    /// date, and the node that changed reconnects.
    fn any_consistent_disk(&self) -> bool {
        (0..2).any(|n| {
            self.status(n).is_some_and(|s| {
                matches!(
                    s.disk,
                    crate::core::DiskState::UpToDate | crate::core::DiskState::Outdated
                )
            })
        })
    }

    /// The data of every block is now what node `source`'s disk holds.
    pub fn rebase(&mut self, source: usize, why: &str) {
        self.stats.rebases += 1;
        self.trace_line(Some(source), || {
            format!("model rebased on this disk ({why})")
        });
        let step = self.next_step();
        let queued: Vec<(u64, u64)> = self.nodes[source]
            .core
            .as_ref()
            .map(|c| c.queued_disk_ops().flat_map(SimDisk::op_values).collect())
            .unwrap_or_default();
        self.model
            .rebase(&self.nodes[source].disk, &queued, source, step);
    }
}
