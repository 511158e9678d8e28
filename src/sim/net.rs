//! The simulated peer network: TCP-like links between the two nodes.
//!
//! A link carries messages in order in each direction and never duplicates,
//! reorders or silently drops one while it stands: like TCP, it either delivers
//! everything in order (possibly late, e.g. across a partition that heals) or
//! breaks, and what was in flight on a broken link is lost. A partition stops
//! delivery without telling anyone (the cores notice through their ping
//! timeouts); a reset tells both ends at once. A corrupted frame is given to the
//! real codec (`peer::encode` / `peer::Decoder`) with a flipped bit; the
//! receiver's CRC check must refuse it, and the link then drops.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::rng::Rng;
use crate::peer::Message;

#[derive(Debug)]
pub struct Frame {
    pub ready: u64,
    pub msg: Message,
    pub corrupt: bool,
}

/// One direction of a link; `dirs[i]` carries what node `i` sends.
#[derive(Debug, Default)]
pub struct Dir {
    queue: VecDeque<Frame>,
    scheduled: bool,
    /// The sender closed its end: after the queue, the receiver reads end of stream.
    eof: bool,
    eof_delivered: bool,
    /// The receiver stopped reading: nothing more is delivered.
    dead: bool,
    last_ready: u64,
    /// The bitmap the sender sent right after its Hello (coverage check).
    pub bitmap: Vec<u64>,
    pub bitmap_done: bool,
    /// seq -> simulator write id and the sectors of the piece sent (the whole
    /// write unless the node split it), for application writes the sender mirrored.
    pub writes: BTreeMap<u64, (u32, std::ops::Range<u64>)>,
    /// Seqs of `writes` the receiver answered (RecvAck, or WriteAck first).
    pub received: BTreeSet<u64>,
}

#[derive(Debug, Default)]
pub struct Link {
    pub id: u64,
    /// The node that dialed it.
    pub dialer: usize,
    pub dirs: [Dir; 2],
    /// The node's core runs its peer session on this link.
    pub active: [bool; 2],
    /// The node's core was offered this link (ConnOffered) and has not had its
    /// ConnDown yet. Nothing is delivered to a node before its offer.
    pub offered: [bool; 2],
    /// The node's end is closed (it reads nothing more from this link).
    pub closed: [bool; 2],
    /// Each side's sync decision on this link.
    pub decided: [Option<String>; 2],
    /// Each side's reading of a split brain it resolved by policy on this link
    /// (its role, its peer's, whether each was the older primary): policy.rs.
    pub resolved: [Option<(bool, bool, bool, bool)>; 2],
    /// The model was rebased for a justified loss decided on this link.
    pub rebased: bool,
}

/// What the next delivery on a direction is.
pub enum Step {
    Msg(Message, bool),
    Eof,
    Nothing,
}

#[derive(Debug, Default)]
pub struct Net {
    pub links: BTreeMap<u64, Link>,
    next_id: u64,
    /// No delivery, no new link, until then.
    pub partition_until: u64,
    /// Corrupt the next frame node `i` sends.
    pub corrupt_next: [bool; 2],
    pub frames: u64,
    pub corrupted: u64,
}

impl Net {
    /// The link on which node `n`'s core is connected, if any.
    pub fn active_link(&self, n: usize) -> Option<u64> {
        self.links.values().find(|l| l.active[n]).map(|l| l.id)
    }

    pub fn partitioned(&self, now: u64) -> bool {
        now < self.partition_until
    }

    /// A new link dialed by node `dialer`; each side is offered it once its
    /// authentication is done.
    pub fn open(&mut self, dialer: usize) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.links.insert(
            id,
            Link {
                id,
                dialer,
                ..Default::default()
            },
        );
        id
    }

    /// A delivery to a node not offered the link yet waits (the bytes sit in its
    /// socket buffer until its reader starts); the offer wakes the link again.
    pub fn unschedule(&mut self, link: u64, dir: usize) {
        if let Some(l) = self.links.get_mut(&link) {
            l.dirs[dir].scheduled = false;
        }
    }

    /// Queues `msg` from node `from`; returns when to schedule a delivery, if one is needed.
    pub fn push(
        &mut self,
        link: u64,
        from: usize,
        msg: Message,
        now: u64,
        rng: &mut Rng,
    ) -> Option<u64> {
        let corrupt = std::mem::take(&mut self.corrupt_next[from]);
        let l = self.links.get_mut(&link)?;
        if l.closed[from] {
            return None;
        }
        let lat = if rng.chance(0.01) {
            rng.range(5_000, 30_000)
        } else {
            rng.range(50, 1_000)
        };
        let d = &mut l.dirs[from];
        let ready = d.last_ready.max(now + lat);
        d.last_ready = ready;
        d.queue.push_back(Frame {
            ready,
            msg,
            corrupt,
        });
        self.frames += 1;
        self.wake(link, from, now)
    }

    /// If direction `dir` of `link` has something to deliver and no delivery is
    /// scheduled, marks one scheduled and returns its time.
    pub fn wake(&mut self, link: u64, dir: usize, now: u64) -> Option<u64> {
        let part = self.partition_until;
        let l = self.links.get_mut(&link)?;
        let d = &mut l.dirs[dir];
        if d.scheduled || d.dead {
            return None;
        }
        let t = match d.queue.front() {
            Some(f) => f.ready,
            None if d.eof && !d.eof_delivered => now,
            None => return None,
        };
        d.scheduled = true;
        Some(t.max(now).max(part))
    }

    /// Takes the next delivery on a direction, if it is due and the network lets it through.
    pub fn pop(&mut self, link: u64, dir: usize, now: u64) -> Step {
        let partitioned = self.partitioned(now);
        let Some(l) = self.links.get_mut(&link) else {
            return Step::Nothing;
        };
        let d = &mut l.dirs[dir];
        d.scheduled = false;
        if d.dead || partitioned {
            return Step::Nothing;
        }
        match d.queue.front() {
            Some(f) if f.ready <= now => {
                let f = d.queue.pop_front().expect("front exists");
                Step::Msg(f.msg, f.corrupt)
            }
            Some(_) => Step::Nothing,
            None if d.eof && !d.eof_delivered => {
                d.eof_delivered = true;
                Step::Eof
            }
            None => Step::Nothing,
        }
    }

    /// Node `n` closes its end (its core dropped the link, or its reader failed):
    /// what it queued still goes out, then end of stream; it reads nothing more.
    pub fn close(&mut self, link: u64, n: usize) {
        if let Some(l) = self.links.get_mut(&link) {
            l.closed[n] = true;
            l.offered[n] = false;
            l.active[n] = false;
            l.dirs[n].eof = true;
            l.dirs[1 - n].dead = true;
            l.dirs[1 - n].queue.clear();
        }
    }

    /// Node `n` crashed: everything it had queued is lost; with `reset` its kernel
    /// (or the restarted one) resets the connection, else the peer hears nothing.
    pub fn crash(&mut self, n: usize, reset: bool) {
        for l in self.links.values_mut() {
            if l.closed[n] {
                continue;
            }
            l.closed[n] = true;
            l.active[n] = false;
            l.offered[n] = false;
            l.dirs[n].queue.clear();
            l.dirs[n].eof = reset;
            l.dirs[1 - n].dead = true;
            l.dirs[1 - n].queue.clear();
        }
    }

    /// A connection reset: what was in flight is lost, both ends read end of stream.
    pub fn reset(&mut self, link: u64) {
        if let Some(l) = self.links.get_mut(&link) {
            for d in l.dirs.iter_mut() {
                d.queue.clear();
                d.eof = true;
            }
        }
    }

    /// Forgets links nobody holds any more.
    pub fn collect(&mut self) {
        self.links
            .retain(|_, l| !(l.closed[0] && l.closed[1]) || l.dirs.iter().any(|d| d.scheduled));
    }

    pub fn ids(&self) -> Vec<u64> {
        self.links.keys().copied().collect()
    }
}
