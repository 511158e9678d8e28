//! The invariants, checked as the run goes:
//!
//! - replies follow the protocol: under C a write is acknowledged only after
//!   the peer's WriteAck, under B after its RecvAck, FUA always after WriteAck;
//!   a write is mirrored whenever the node replicates;
//! - a peer that acknowledges a write holds it (or something newer) on its disk;
//! - FUA writes, and writes acknowledged before a successful flush, are on the
//!   medium (surviving power loss) of the node, and of its peer if mirrored;
//! - on a connected pair a read returns what the model of acknowledged data
//!   allows (never data older than the last acknowledged write);
//! - data is never corrupted or misplaced;
//! - at every sync decision, each block whose contents differ between the two
//!   disks is set in one of the two bitmaps (including after crashes, since a
//!   restarted node starts from its persisted bitmap and activity log), and an
//!   "in sync" decision is only taken on identical disks;
//! - both sides take the mirrored decision;
//! - every request is answered within a bounded simulated time.
//!
//! The final checks (after faults stop) are in `run.rs`.

use super::cluster::Sim;
use super::data::{self, SECTOR};
use crate::core::Protocol;

fn bit(words: &[u64], block: u64) -> bool {
    words
        .get((block / 64) as usize)
        .is_some_and(|w| w >> (block % 64) & 1 == 1)
}

fn mirrored(d: &str) -> String {
    if let Some(rest) = d.strip_prefix("Source") {
        format!("Target{rest}")
    } else if let Some(rest) = d.strip_prefix("Target") {
        format!("Source{rest}")
    } else {
        d.to_string()
    }
}

impl Sim {
    /// Node `p` acknowledged write `id` (of its peer): its disk must hold it.
    pub fn check_peer_has_write(&mut self, p: usize, id: u32, piece: std::ops::Range<u64>) {
        let w = self.model.writes[id as usize].clone();
        if w.uncertain {
            return;
        }
        for s in piece {
            let v = self.nodes[p].disk.view(s);
            if v != w.value(id, s) && self.model.older_than(v, &w) {
                self.violate(
                    "ack without data",
                    format!(
                        "{} acknowledged write {id} but sector {s} holds {v:#x}, older than it",
                        Sim::name(p)
                    ),
                );
                return;
            }
        }
    }

    /// Write `id` must be on node `n`'s medium.
    pub fn check_durable(&mut self, n: usize, id: u32, why: &str) {
        let w = self.model.writes[id as usize].clone();
        if w.uncertain {
            return;
        }
        for s in w.applied() {
            let d = self.nodes[n].disk.durable[s as usize];
            if d != w.value(id, s) && self.model.older_than(d, &w) {
                self.violate(
                    "not durable",
                    format!(
                        "{why}: write {id} is not on {}'s medium (sector {s} holds {d:#x})",
                        Sim::name(n)
                    ),
                );
                return;
            }
        }
    }

    /// Node `n` replied to write `id`.
    pub fn check_write_reply(&mut self, n: usize, id: u32, ok: bool) {
        let w = &self.model.writes[id as usize];
        if !ok {
            return;
        }
        if let Some((link, _)) = w.mirror {
            if self.net.active_link(n) == Some(link) {
                let need_ack = self.sc.protocol == Protocol::C || w.fua;
                let need_recv = self.sc.protocol == Protocol::B;
                let missing = if need_ack {
                    w.peer_ack.is_none()
                } else {
                    need_recv && !w.recv_acked && w.peer_ack.is_none()
                };
                if missing {
                    let what = if need_ack { "WriteAck" } else { "RecvAck" };
                    self.violate(
                        "early ack",
                        format!("{} acknowledged write {id} (protocol {:?}, fua {}) before the peer's {what}", Sim::name(n), self.sc.protocol, w.fua),
                    );
                    return;
                }
            }
        }
        if w.fua {
            self.check_durable(n, id, "FUA");
            let w = &self.model.writes[id as usize];
            if let Some((link, _)) = w.mirror {
                let whole = w.fully_mirrored();
                if self.net.active_link(n) == Some(link) && w.peer_ack == Some(0) && whole {
                    self.check_durable(1 - n, id, "FUA on the peer");
                }
            }
        }
    }

    /// Node `n` answered a flush issued at step `issue` with success.
    pub fn check_flush(&mut self, n: usize, issue: u64, gen: Option<u64>, peer_errors: u64) {
        let mirrored =
            gen == Some(self.nodes[n].link_gen) && self.nodes[1 - n].disk.errors == peer_errors;
        for id in self.model.nondurable_before(n, issue) {
            self.check_durable(n, id, "flushed");
            let w = &self.model.writes[id as usize];
            if mirrored
                && w.peer_ack == Some(0)
                && w.fully_mirrored()
                && w.mirror
                    .is_some_and(|(l, _)| self.net.active_link(n) == Some(l))
            {
                self.check_durable(1 - n, id, "flushed on the peer");
            }
        }
        self.model.flushed(n, issue);
    }

    /// What a read of sectors `first..` returned.
    pub fn check_read(
        &mut self,
        n: usize,
        first: u64,
        count: u64,
        data: &[u8],
        linear: bool,
        issue: u64,
    ) {
        if data.len() as u64 != count * SECTOR {
            self.violate(
                "short read",
                format!(
                    "{} returned {} bytes for {} sectors",
                    Sim::name(n),
                    data.len(),
                    count
                ),
            );
            return;
        }
        let vals = match data::decode(data) {
            Ok(v) => v,
            Err(e) => {
                self.violate(
                    "corrupt read",
                    format!(
                        "{} returned bytes nobody wrote at sector {first}: {e}",
                        Sim::name(n)
                    ),
                );
                return;
            }
        };
        let step = self.step;
        for (i, v) in vals.into_iter().enumerate() {
            let s = first + i as u64;
            if v != 0 && data::sector_of(v) != s & 0xFFFF_FFFF {
                self.violate(
                    "misplaced data",
                    format!(
                        "{} returned at sector {s} the data of sector {}",
                        Sim::name(n),
                        data::sector_of(v)
                    ),
                );
                return;
            }
            if linear {
                let ok = self.model.acceptable(s, issue, step);
                if !ok.contains(&v) {
                    self.violate(
                        "stale read",
                        format!(
                            "{} read sector {s} = {v:#x} ({}); acceptable: {ok:#x?}",
                            Sim::name(n),
                            self.describe(v)
                        ),
                    );
                    return;
                }
            }
        }
        if linear {
            self.stats.reads_checked += 1;
        }
    }

    pub fn describe(&self, v: u64) -> String {
        match data::write_of(v) {
            Some(id) => match self.model.rec(id) {
                Some(w) => format!(
                    "write {id} by {} issued at step {} done {} ok {} durable {} uncertain {}",
                    Sim::name(w.node),
                    w.issue,
                    w.done,
                    w.ok,
                    w.durable,
                    w.uncertain
                ),
                None => format!("unknown write {id}"),
            },
            None if v == 0 => "zeros".into(),
            None => "garbage".into(),
        }
    }

    /// Node `n` decided how to sync (`d`, Debug of `gi::Decision`); `resolved`: by a split-brain policy.
    pub fn on_decision(&mut self, n: usize, d: &str, resolved: bool) {
        let Some(link) = self.net.active_link(n) else {
            return;
        };
        if !resolved {
            if d == "InSync" {
                self.check_coverage(n, link, true);
            } else if d.contains("full: false") {
                self.check_coverage(n, link, false);
            }
            if d.starts_with("SplitBrain") {
                return;
            }
        }
        let other = {
            let l = self.net.links.get_mut(&link).expect("active link");
            l.decided[n] = Some(d.to_string());
            l.decided[1 - n].clone()
        };
        if let Some(o) = other {
            // Only the direction must agree: `full` may differ, since a node does
            // not tell its peer that it needs a full sync (its bitmap is all set then).
            let direction = |x: &str| x.split(' ').next().unwrap_or("").to_string();
            if direction(&mirrored(&o)) != direction(d) {
                self.violate(
                    "asymmetric decision",
                    format!(
                        "{} decided {d}, {} decided {o}",
                        Sim::name(n),
                        Sim::name(1 - n)
                    ),
                );
                return;
            }
        }
        let source = if d.starts_with("Source") {
            n
        } else if d.starts_with("Target") {
            1 - n
        } else {
            return;
        };
        let target = 1 - source;
        let justified = resolved || self.nodes[target].invalidated;
        if justified && !self.net.links[&link].rebased {
            self.net.links.get_mut(&link).expect("active link").rebased = true;
            self.nodes[target].invalidated = false;
            let why = if resolved {
                "split brain resolved"
            } else {
                "invalidated"
            };
            self.rebase(source, why);
        }
    }

    /// Blocks that differ between the disks must be marked in a bitmap (or, for
    /// an in-sync decision, there must be none).
    fn check_coverage(&mut self, x: usize, link: u64, in_sync: bool) {
        let y = 1 - x;
        // Sectors a write may still be reaching (on a disk, or not yet submitted by a core).
        let mut busy = self.nodes[0].disk.sectors_in_flight();
        busy.extend(self.nodes[1].disk.sectors_in_flight());
        for n in 0..2 {
            for id in self.model.pending(n) {
                busy.extend(self.model.writes[*id as usize].sectors());
            }
        }
        // And writes on their way over this link (acknowledged already under protocol A).
        for w in self
            .model
            .writes
            .iter()
            .rev()
            .take_while(|w| w.mirror.is_none_or(|(l, _)| l >= link))
        {
            if w.mirror.is_some_and(|(l, _)| l == link) && w.peer_ack.is_none() {
                busy.extend(w.sectors());
            }
        }
        busy.sort_unstable();
        let sectors = self.model.sectors();
        let per_block = crate::core::bitmap::BLOCK / SECTOR;
        for s in 0..sectors {
            let (a, b) = (self.nodes[0].disk.view(s), self.nodes[1].disk.view(s));
            if a == b || busy.binary_search(&s).is_ok() {
                continue;
            }
            let block = s / per_block;
            // The peer's current bitmap too: it may have left the handshake and
            // written since it sent its bitmap (those bits come with the next one).
            let now_y = self.nodes[y]
                .core
                .as_ref()
                .is_some_and(|c| bit(c.bitmap_words(), block));
            let covered = bit(&self.nodes[x].bitmap_before, block)
                || bit(&self.net.links[&link].dirs[y].bitmap, block)
                || now_y;
            if in_sync || !covered {
                let detail = format!(
                    "block {block} (sector {s}) differs: {} has {a:#x} ({}), {} has {b:#x} ({}); bits: {} {}, {} {}",
                    Sim::name(0),
                    self.describe(a),
                    Sim::name(1),
                    self.describe(b),
                    Sim::name(x),
                    bit(&self.nodes[x].bitmap_before, block),
                    Sim::name(y),
                    bit(&self.net.links[&link].dirs[y].bitmap, block),
                );
                let kind = if in_sync {
                    "in-sync decision on differing disks"
                } else {
                    "bitmap misses a difference"
                };
                self.violate(kind, detail);
                return;
            }
        }
    }

    /// No request waits longer than the bound after the node read it.
    pub fn check_liveness(&mut self) {
        let now = self.now();
        let bound = self.reply_bound;
        for n in 0..2 {
            for (conn, c) in &self.nodes[n].clients {
                if let Some((cookie, r)) = c
                    .inflight
                    .iter()
                    .find(|(_, r)| now.saturating_sub(r.read_us) > bound)
                {
                    let detail = format!(
                        "{} has not answered request {conn}/{cookie} ({:?}) after {} ms",
                        Sim::name(n),
                        r.kind,
                        (now - r.read_us) / 1000
                    );
                    self.violate("no reply", detail);
                    return;
                }
            }
        }
    }
}
