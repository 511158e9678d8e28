//! The model of acknowledged data: for every sector, which values a read may
//! return, from the history of the writes the clients issued and the replies
//! they got.
//!
//! Time here is the simulator's step counter (every event has its own step, so
//! "before" is strict). A write W *supersedes* an earlier write V when W was
//! issued after V's reply. A read that starts at step `t` may return the value
//! of any write issued before the read ended that is not superseded by a write
//! acknowledged (successfully, and certainly still there) before `t`. Writes
//! that were concurrent therefore all stay acceptable, and a write whose reply
//! was an error may or may not have landed.
//!
//! A trim supersedes nothing: the node may answer a large one before it
//! discarded all of it (its time budget, core/split.rs), and an NBD TRIM is
//! advisory anyway. So after a trim a sector may read as zero or as any value
//! it could show before; the trim forgets no history either.
//!
//! Crashes: a write is *durable* once it was FUA, or a flush issued after its
//! reply succeeded on the node that acknowledged it. When that node loses
//! power, its acknowledged writes that were not durable become *uncertain*:
//! they may be gone, so they no longer supersede anything.
//!
//! Justified data loss (a split brain resolved by policy or by the operator,
//! `invalidate`, `primary --force`) *rebases* the model on the surviving
//! disk's contents.

use super::data::value_of;
use super::disk::SimDisk;

pub const NOT_DONE: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    Trim,
    Zeroes,
}

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub node: usize,
    pub first: u64,
    pub n: u64,
    pub kind: Kind,
    pub fua: bool,
    pub issue: u64,
    /// Step of the reply (or of the crash that ended it).
    pub done: u64,
    pub ok: bool,
    pub durable: bool,
    pub uncertain: bool,
    /// Link and seq it was mirrored with (of its first piece on that link, for
    /// a write the node carries out in pieces).
    pub mirror: Option<(u64, u64)>,
    /// Every piece mirrored so far was received (RecvAck) by the peer.
    pub recv_acked: bool,
    /// Every piece mirrored so far was acknowledged: the first error, or 0.
    pub peer_ack: Option<u32>,
    /// Pieces mirrored and not yet acknowledged (WriteAck) / received (RecvAck).
    pub unacked: u32,
    pub unreceived: u32,
    /// The first error a piece's WriteAck carried.
    pub piece_error: u32,
    /// Sectors mirrored on the link of `mirror`: fewer than `n` when the node
    /// split it and wrote some pieces while not replicating (those are in its
    /// bitmap, for the resync).
    pub mirrored: u64,
    /// The sectors of each piece mirrored on the link of `mirror`.
    pub pieces: Vec<std::ops::Range<u64>>,
    /// The issuing node's link generation if it replicated when the write was issued.
    pub replicating_at_issue: Option<u64>,
    /// The acknowledging node's own disk was not up to date: the peer held the only good copy.
    pub peer_only: bool,
    /// A trim whose node answered it with its time budget spent: the sector
    /// from which on it discarded nothing (core/split.rs).
    pub skipped_from: Option<u64>,
}

impl WriteRec {
    /// One of its pieces (the whole write, if not split) was mirrored.
    pub fn piece_sent(&mut self, link: u64, seq: u64, piece: std::ops::Range<u64>) {
        if self.mirror.is_none_or(|(l, _)| l != link) {
            // Pieces sent on an earlier link are gone with it (seed 559: one
            // was never acknowledged, and the count waited for it forever).
            self.mirror = Some((link, seq));
            self.mirrored = 0;
            self.pieces.clear();
            self.unacked = 0;
            self.unreceived = 0;
            self.piece_error = 0;
        }
        self.mirrored += piece.end - piece.start;
        self.pieces.push(piece);
        self.unacked += 1;
        self.unreceived += 1;
        self.peer_ack = None;
        self.recv_acked = false;
    }

    /// A piece of it starting at sector `first` went over `link` already.
    pub fn piece_sent_at(&self, link: u64, first: u64) -> bool {
        self.mirror.is_some_and(|(l, _)| l == link) && self.pieces.iter().any(|p| p.start == first)
    }

    /// A piece of it ending at sector `first` went over `link`: a piece
    /// starting there is its next one.
    pub fn piece_ends_at(&self, link: u64, first: u64) -> bool {
        self.mirror.is_some_and(|(l, _)| l == link) && self.pieces.iter().any(|p| p.end == first)
    }

    /// All of it went over one link (whole, or every piece).
    pub fn fully_mirrored(&self) -> bool {
        self.mirror.is_some() && self.mirrored == self.n
    }

    /// The peer acknowledged one of its pieces.
    pub fn piece_acked(&mut self, error: u32) {
        self.unacked = self.unacked.saturating_sub(1);
        if self.piece_error == 0 {
            self.piece_error = error;
        }
        if self.unacked == 0 {
            self.peer_ack = Some(self.piece_error);
        }
    }

    /// The peer received one of its pieces (protocol B): its RecvAck, or its
    /// WriteAck when no RecvAck came first (a peer whose disk failed answers
    /// a write with an error WriteAck alone).
    pub fn piece_received(&mut self) {
        self.unreceived = self.unreceived.saturating_sub(1);
        self.recv_acked = self.unreceived == 0;
    }

    pub fn value(&self, id: u32, s: u64) -> u64 {
        match self.kind {
            Kind::Write => value_of(id, s),
            Kind::Trim | Kind::Zeroes => 0,
        }
    }

    pub fn sectors(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.n
    }

    /// The sectors its node applied, if it succeeded: all but what a trim
    /// cut short by its time budget skipped.
    pub fn applied(&self) -> std::ops::Range<u64> {
        self.first..self.skipped_from.unwrap_or(self.first + self.n)
    }
}

#[derive(Debug)]
pub struct Model {
    /// Index = write id (0 unused).
    pub writes: Vec<WriteRec>,
    hist: Vec<Vec<u32>>,
    /// Per sector: values of the base (the last is what the base disk showed; the
    /// others are what it could fall back to on power loss), or None once superseded.
    base: Vec<Option<Vec<u64>>>,
    base_t: u64,
    /// Per sector: values of writes that were still queued on the base disk,
    /// or still waiting in its node's disk order, when the base was taken (a
    /// peer's write from before a split brain, say): they land after it.
    base_pending: Vec<Vec<u64>>,
    /// The node whose disk the base was taken from (None: the initial contents).
    base_node: Option<usize>,
    base_durable: bool,
    base_uncertain: bool,
    /// Acknowledged, not yet durable writes, per acknowledging node.
    nondurable: [Vec<u32>; 2],
    /// Writes not replied yet, per node.
    pending: [Vec<u32>; 2],
    /// The peer's acknowledged writes this node lost in a power cut (they
    /// were not durable yet): if this node's data later wins without a sync
    /// from the peer (promoted without it, or chosen as sync source), they are
    /// gone, as on DRBD without fencing. Cleared when it syncs as target.
    lost_on: [Vec<u32>; 2],
    /// Durable writes whose superseded history can be forgotten once no read
    /// that started before their reply is in flight.
    prunable: Vec<u32>,
    /// Per node: the first write id issued after it last synced from its peer.
    synced_mark: [u32; 2],
}

impl Model {
    pub fn new(initial: &[u64]) -> Model {
        Model {
            writes: vec![WriteRec {
                node: 0,
                first: 0,
                n: 0,
                kind: Kind::Write,
                fua: false,
                issue: 0,
                done: 0,
                ok: false,
                durable: true,
                uncertain: false,
                mirror: None,
                recv_acked: false,
                peer_ack: None,
                unacked: 0,
                unreceived: 0,
                piece_error: 0,
                mirrored: 0,
                pieces: Vec::new(),
                replicating_at_issue: None,
                peer_only: false,
                skipped_from: None,
            }],
            hist: vec![Vec::new(); initial.len()],
            base: initial.iter().map(|v| Some(vec![*v])).collect(),
            base_t: 0,
            base_pending: vec![Vec::new(); initial.len()],
            base_node: None,
            base_durable: true,
            base_uncertain: false,
            nondurable: [Vec::new(), Vec::new()],
            lost_on: [Vec::new(), Vec::new()],
            pending: [Vec::new(), Vec::new()],
            prunable: Vec::new(),
            synced_mark: [0, 0],
        }
    }

    pub fn rec(&self, id: u32) -> Option<&WriteRec> {
        if id == 0 {
            return None;
        }
        self.writes.get(id as usize)
    }

    pub fn issue(
        &mut self,
        node: usize,
        first: u64,
        n: u64,
        kind: Kind,
        fua: bool,
        step: u64,
    ) -> u32 {
        let id = self.writes.len() as u32;
        self.writes.push(WriteRec {
            node,
            first,
            n,
            kind,
            fua,
            issue: step,
            done: NOT_DONE,
            ok: false,
            durable: false,
            uncertain: false,
            mirror: None,
            recv_acked: false,
            peer_ack: None,
            unacked: 0,
            unreceived: 0,
            piece_error: 0,
            mirrored: 0,
            pieces: Vec::new(),
            replicating_at_issue: None,
            peer_only: false,
            skipped_from: None,
        });
        for s in first..first + n {
            self.hist[s as usize].push(id);
        }
        self.pending[node].push(id);
        id
    }

    /// The client got its reply.
    pub fn reply(&mut self, id: u32, ok: bool, step: u64) {
        let node = self.writes[id as usize].node;
        self.pending[node].retain(|w| *w != id);
        let w = &mut self.writes[id as usize];
        w.done = step;
        w.ok = ok;
        // A write a justified loss may have discarded promises nothing.
        if ok && !w.uncertain {
            if w.fua {
                self.make_durable(id);
            } else {
                self.nondurable[node].push(id);
            }
        }
    }

    /// Acknowledged, not yet durable writes of `node` replied before `step`.
    pub fn nondurable_before(&self, node: usize, step: u64) -> Vec<u32> {
        self.nondurable[node]
            .iter()
            .copied()
            .filter(|w| self.writes[*w as usize].done < step)
            .collect()
    }

    /// A flush issued at `issue` succeeded on `node`.
    pub fn flushed(&mut self, node: usize, issue: u64) {
        for id in self.nondurable_before(node, issue) {
            self.make_durable(id);
        }
        if self.base_node == Some(node) && self.base_t < issue {
            self.base_durable = true;
        }
    }

    fn make_durable(&mut self, id: u32) {
        let node = self.writes[id as usize].node;
        self.nondurable[node].retain(|w| *w != id);
        let w = &mut self.writes[id as usize];
        w.durable = true;
        // A trim forgets nothing: it supersedes nothing (module doc).
        if !w.uncertain && w.kind != Kind::Trim {
            self.prunable.push(id);
        }
    }

    /// Forgets history no read can return any more: what durable writes
    /// superseded, once every read in flight started after their reply.
    pub fn prune(&mut self, oldest_read_start: u64) {
        let ids = std::mem::take(&mut self.prunable);
        for id in ids {
            let w = &self.writes[id as usize];
            // An unconfirmed write may still become a justified loss: keep
            // what it superseded.
            if w.done >= oldest_read_start || w.uncertain || self.unconfirmed(id) {
                if !w.uncertain {
                    self.prunable.push(id);
                }
                continue;
            }
            let (issue, sectors) = (w.issue, w.sectors());
            for s in sectors {
                let writes = &self.writes;
                self.hist[s as usize].retain(|v| writes[*v as usize].done >= issue);
                if self.base_t < issue {
                    self.base[s as usize] = None;
                }
            }
        }
    }

    /// Node `node` crashed (or stopped) at `step`; with `lose_unflushed` the writes
    /// it acknowledged that were not durable may be gone.
    pub fn crash(&mut self, node: usize, step: u64, lose_unflushed: bool) {
        for id in std::mem::take(&mut self.pending[node]) {
            let w = &mut self.writes[id as usize];
            w.done = step;
            w.ok = false;
        }
        if lose_unflushed {
            for id in std::mem::take(&mut self.nondurable[node]) {
                self.writes[id as usize].uncertain = true;
            }
            // The other node's writes whose only good copy was here.
            let other = 1 - node;
            let (lost, kept): (Vec<u32>, Vec<u32>) = self.nondurable[other]
                .iter()
                .partition(|id| self.writes[**id as usize].peer_only);
            self.nondurable[other] = kept;
            for id in lost {
                self.writes[id as usize].uncertain = true;
            }
            // The other node's mirrored, not yet durable writes are gone here
            // too, and so are its writes still in flight: their mirror may have
            // reached this node's disk (cache) and been acknowledged by it.
            let mirrored = self.nondurable[other].clone();
            self.lost_on[node].extend(mirrored);
            let in_flight = self.pending[other].clone();
            self.lost_on[node].extend(in_flight);
            if self.base_node == Some(node) && !self.base_durable {
                self.base_uncertain = true;
            }
        }
    }

    /// Node `node`'s data wins without a sync from its peer: what it lost in a
    /// power cut is a justified loss now.
    pub fn data_wins(&mut self, node: usize) {
        for id in std::mem::take(&mut self.lost_on[node]) {
            self.writes[id as usize].uncertain = true;
        }
        // The peer's writes acknowledged before this node confirmed them
        // (protocol A: once sent) and never confirmed since: they may not be
        // here, as on DRBD, where a failover under protocol A loses them.
        for id in self.synced_mark[node] as usize..self.writes.len() {
            if self.unconfirmed(id as u32) && self.writes[id].node != node {
                self.writes[id].uncertain = true;
            }
        }
    }

    /// A write acknowledged to its client that the peer never confirmed
    /// receiving, issued after the peer last synced from its node.
    fn unconfirmed(&self, id: u32) -> bool {
        let w = &self.writes[id as usize];
        w.ok && w.done != NOT_DONE
            && !w.uncertain
            && w.mirror.is_some()
            && w.peer_ack.is_none()
            && !w.recv_acked
            && id >= self.synced_mark[1 - w.node]
    }

    /// Node `node` is being synced from its peer: nothing it lost stays lost.
    pub fn synced_from_peer(&mut self, node: usize) {
        self.lost_on[node].clear();
        self.synced_mark[node] = self.writes.len() as u32;
    }

    /// The values a read of sector `s` that ran from `start` to `end` may return.
    pub fn acceptable(&self, s: u64, start: u64, end: u64) -> Vec<u64> {
        let hist = &self.hist[s as usize];
        let mut sup = 0;
        for id in hist {
            let w = &self.writes[*id as usize];
            // A trim supersedes nothing (module doc).
            if w.ok && w.done < start && !w.uncertain && w.kind != Kind::Trim {
                sup = sup.max(w.issue);
            }
        }
        let mut out = Vec::new();
        if let Some(base) = &self.base[s as usize] {
            if sup <= self.base_t {
                if self.base_uncertain {
                    out.extend(base.iter().copied());
                } else if let Some(v) = base.last() {
                    out.push(*v);
                }
                out.extend(self.base_pending[s as usize].iter().copied());
            }
        }
        for id in hist {
            let w = &self.writes[*id as usize];
            if w.issue < end && w.done >= sup {
                out.push(w.value(*id, s));
            }
        }
        out
    }

    /// Whether a write older than W (replied before W was issued) is what `v` is.
    ///
    /// The other node's write that it acknowledged without its peer's answer
    /// (the link dropped while it was in flight) is not ordered before W: its
    /// mirror may still be in the pipe and land on W's node after W, as a
    /// concurrent write would (simulator finding, seed 79562: a dual primary
    /// applied such a write, received before the peer's goodbye, over a later
    /// local write).
    pub fn older_than(&self, v: u64, w: &WriteRec) -> bool {
        match super::data::write_of(v) {
            Some(id) => self.rec(id).is_some_and(|r| {
                let in_the_pipe =
                    r.node != w.node && r.mirror.is_some() && r.peer_ack.is_none() && !r.recv_acked;
                r.done < w.issue && !in_the_pipe
            }),
            None => v != 0,
        }
    }

    /// The data of every sector is now what `disk` (of `node`) holds: a justified
    /// loss of the other disk's data. Writes still in flight stay possible; the
    /// other node's become uncertain. `queued`: (sector, value) of writes the
    /// node's core decided but has not submitted to the disk yet.
    pub fn rebase(&mut self, disk: &SimDisk, queued: &[(u64, u64)], node: usize, step: u64) {
        // The discarded side's writes still in flight may or may not survive.
        for id in self.pending[1 - node].clone() {
            self.writes[id as usize].uncertain = true;
        }
        for s in 0..self.hist.len() as u64 {
            let mut vals = disk.possible_after_power_loss(s);
            vals.dedup();
            // The last one is what the disk shows now.
            let now = disk.view(s);
            vals.retain(|v| *v != now);
            vals.push(now);
            self.base[s as usize] = Some(vals);
            let writes = &self.writes;
            self.hist[s as usize].retain(|w| writes[*w as usize].done == NOT_DONE);
            self.base_pending[s as usize].clear();
        }
        // A peer's write received before the link broke can still be waiting in
        // the core's disk order (behind an overlapping write) when the split brain
        // is resolved, and land on this disk after (seed 25621), like one queued
        // on the disk itself: both are data this node had taken in.
        let queued = queued.iter().copied();
        for (s, v) in disk.pending_values().into_iter().chain(queued) {
            if let Some(p) = self.base_pending.get_mut(s as usize) {
                p.push(v);
            }
        }
        self.base_t = step;
        self.base_node = Some(node);
        self.base_durable = false;
        self.base_uncertain = false;
        self.nondurable = [Vec::new(), Vec::new()];
        self.prunable.clear();
    }

    pub fn sectors(&self) -> u64 {
        self.hist.len() as u64
    }

    pub fn pending(&self, node: usize) -> &[u32] {
        &self.pending[node]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superseding_concurrency_and_crash() {
        let mut m = Model::new(&[0; 4]);
        let a = m.issue(0, 1, 1, Kind::Write, false, 10);
        m.reply(a, true, 11);
        // Read after a's reply: only a.
        assert_eq!(m.acceptable(1, 12, 13), vec![value_of(a, 1)]);
        // A read that started before the reply may see the old zero.
        assert_eq!(m.acceptable(1, 10, 13), vec![0, value_of(a, 1)]);
        // Concurrent b and c: both stay acceptable.
        let b = m.issue(0, 1, 1, Kind::Write, false, 20);
        let c = m.issue(1, 1, 1, Kind::Write, false, 21);
        m.reply(b, true, 22);
        m.reply(c, true, 23);
        assert_eq!(
            m.acceptable(1, 30, 31),
            vec![value_of(b, 1), value_of(c, 1)]
        );
        // Power loss of node 0 before a flush: b is uncertain now, but c (node 1's,
        // issued after a's reply) still keeps a out.
        m.crash(0, 40, true);
        assert_eq!(
            m.acceptable(1, 41, 42),
            vec![value_of(b, 1), value_of(c, 1)]
        );
        // On a sector only node 0 wrote, the crash brings the old value back.
        let e = m.issue(0, 2, 1, Kind::Write, false, 43);
        m.reply(e, true, 44);
        m.crash(0, 45, true);
        assert_eq!(m.acceptable(2, 46, 47), vec![0, value_of(e, 2)]);
        // A durable write after everything wins for good.
        let d = m.issue(1, 1, 1, Kind::Zeroes, true, 50);
        m.reply(d, true, 51);
        // A read that started before d's reply may still see c.
        m.prune(45);
        assert!(m.acceptable(1, 45, 52).contains(&value_of(c, 1)));
        m.prune(u64::MAX);
        m.crash(1, 60, true);
        assert_eq!(m.acceptable(1, 61, 62), vec![0]);
        assert!(m.older_than(value_of(a, 1), &m.writes[d as usize].clone()));
    }

    #[test]
    fn a_trim_supersedes_nothing() {
        let mut m = Model::new(&[0; 2]);
        let a = m.issue(0, 0, 1, Kind::Write, true, 10);
        m.reply(a, true, 11);
        let t = m.issue(0, 0, 2, Kind::Trim, true, 20);
        m.reply(t, true, 21);
        m.prune(u64::MAX);
        // Cut short by its budget or not: the old value and zero both stay.
        assert_eq!(m.acceptable(0, 30, 31), vec![value_of(a, 0), 0]);
        // A write after it supersedes both.
        let b = m.issue(0, 0, 1, Kind::Write, true, 40);
        m.reply(b, true, 41);
        m.prune(u64::MAX);
        assert_eq!(m.acceptable(0, 50, 51), vec![value_of(b, 0)]);
    }
}
