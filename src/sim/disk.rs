//! A simulated data disk: one value per 512-byte sector (see `data.rs`), a
//! volatile write cache, and operations that complete after a random delay, in
//! any order.
//!
//! Durability model: a completed write sits in the cache until a flush that was
//! submitted after it completes, or it was FUA. On power loss each cached write
//! of each sector survives or not at random (later ones over earlier ones), and
//! writes still in flight land sector by sector at random. A process crash loses
//! nothing that reached the kernel: in-flight writes land, the cache stays.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::data::{self, SECTOR};
use super::rng::Rng;
use crate::core::{errno, DiskOp};

#[derive(Debug)]
struct Pending {
    core_id: u64,
    op: DiskOp,
    /// For a flush: how many cached writes each sector had at submission.
    marks: Option<BTreeMap<u64, usize>>,
}

/// What a completed operation did.
pub struct Completion {
    pub core_id: u64,
    pub result: Result<Option<Bytes>, u32>,
    /// The core handed the disk something the simulator cannot account for.
    pub problem: Option<String>,
}

#[derive(Debug)]
pub struct SimDisk {
    pub durable: Vec<u64>,
    cache: BTreeMap<u64, Vec<u64>>,
    pending: BTreeMap<u64, Pending>,
    next_op: u64,
    /// Probability that an operation fails with EIO while `err_until` is ahead.
    pub err_prob: f64,
    pub err_until: u64,
    /// Completions take up to this much longer while `slow_until` is ahead.
    pub slow_us: u64,
    pub slow_until: u64,
    /// Failures injected so far.
    pub errors: u64,
}

impl SimDisk {
    pub fn new(contents: Vec<u64>) -> SimDisk {
        SimDisk {
            durable: contents,
            cache: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_op: 1,
            err_prob: 0.0,
            err_until: 0,
            slow_us: 0,
            slow_until: 0,
            errors: 0,
        }
    }

    pub fn sectors(&self) -> u64 {
        self.durable.len() as u64
    }

    /// Sector range of a byte range, or why the disk cannot take it.
    fn span(&self, offset: u64, len: u64) -> Result<(u64, u64), String> {
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(format!("unaligned disk op at {offset}+{len}"));
        }
        if (offset + len) / SECTOR > self.sectors() {
            return Err(format!("disk op at {offset}+{len} past the end"));
        }
        Ok((offset / SECTOR, len / SECTOR))
    }

    /// What a read of sector `s` sees now.
    pub fn view(&self, s: u64) -> u64 {
        match self.cache.get(&s).and_then(|c| c.last()) {
            Some(v) => *v,
            None => self.durable[s as usize],
        }
    }

    /// Every value sector `s` could hold after a power loss now.
    pub fn possible_after_power_loss(&self, s: u64) -> Vec<u64> {
        let mut v = vec![self.durable[s as usize]];
        if let Some(c) = self.cache.get(&s) {
            v.extend(c.iter().copied());
        }
        v
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn cache_is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// (sector, value) of every write still in flight: each may land later.
    pub fn pending_values(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for p in self.pending.values() {
            if let Some((first, vals)) = written_values(&p.op) {
                for (i, v) in vals.into_iter().enumerate() {
                    out.push((first + i as u64, v));
                }
            }
        }
        out
    }

    /// (sector, value) that a write operation not yet submitted would leave.
    pub fn op_values(op: &DiskOp) -> Vec<(u64, u64)> {
        match written_values(op) {
            Some((first, vals)) => vals
                .into_iter()
                .enumerate()
                .map(|(i, v)| (first + i as u64, v))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Sectors with a write in flight (sorted, deduplicated).
    pub fn sectors_in_flight(&self) -> Vec<u64> {
        let mut v: Vec<u64> = Vec::new();
        for p in self.pending.values() {
            if let Some((first, n)) = write_range(&p.op) {
                v.extend(first..first + n);
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Accepts an operation; returns the simulator's id and its delay in µs.
    pub fn submit(&mut self, core_id: u64, op: DiskOp, now: u64, rng: &mut Rng) -> (u64, u64) {
        let marks = matches!(op, DiskOp::Flush)
            .then(|| self.cache.iter().map(|(s, c)| (*s, c.len())).collect());
        let id = self.next_op;
        self.next_op += 1;
        let mut delay = if rng.chance(0.05) {
            rng.range(2_000, 20_000)
        } else {
            rng.range(20, 1_500)
        };
        if matches!(op, DiskOp::Flush) {
            delay += rng.range(100, 3_000);
        }
        if now < self.slow_until && self.slow_us > 0 {
            delay += rng.below(self.slow_us);
        }
        self.pending.insert(id, Pending { core_id, op, marks });
        (id, delay)
    }

    /// Completes operation `id` (None if a crash made it vanish).
    pub fn complete(&mut self, id: u64, now: u64, rng: &mut Rng) -> Option<Completion> {
        let p = self.pending.remove(&id)?;
        let fail = now < self.err_until && rng.chance(self.err_prob);
        if fail {
            self.errors += 1;
        }
        let mut problem = None;
        let result = match p.op {
            DiskOp::Read { offset, len } => match self.span(offset, len as u64) {
                Err(e) => {
                    problem = Some(e);
                    Err(errno::EIO)
                }
                Ok(_) if fail => Err(errno::EIO),
                Ok((first, n)) => {
                    let vals: Vec<u64> = (first..first + n).map(|s| self.view(s)).collect();
                    Ok(Some(data::encode(&vals)))
                }
            },
            DiskOp::Write { offset, data, fua } => {
                match (self.span(offset, data.len() as u64), data::decode(&data)) {
                    (Err(e), _) | (_, Err(e)) => {
                        problem = Some(format!("write at {offset}: {e}"));
                        Err(errno::EIO)
                    }
                    (Ok((first, _)), Ok(vals)) => {
                        self.apply(first, &vals, fua, fail, rng);
                        if fail {
                            Err(errno::EIO)
                        } else {
                            Ok(None)
                        }
                    }
                }
            }
            DiskOp::Trim { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                match self.span(offset, len) {
                    Err(e) => {
                        problem = Some(e);
                        Err(errno::EIO)
                    }
                    Ok((first, n)) => {
                        self.apply(first, &vec![0; n as usize], false, fail, rng);
                        if fail {
                            Err(errno::EIO)
                        } else {
                            Ok(None)
                        }
                    }
                }
            }
            DiskOp::Flush => {
                if fail {
                    Err(errno::EIO)
                } else {
                    for (s, n) in p.marks.unwrap_or_default() {
                        self.make_durable(s, n);
                    }
                    Ok(None)
                }
            }
        };
        Some(Completion {
            core_id: p.core_id,
            result,
            problem,
        })
    }

    /// Writes values at `first`; a failing write lands on a random subset of its sectors.
    fn apply(&mut self, first: u64, vals: &[u64], fua: bool, fail: bool, rng: &mut Rng) {
        for (i, v) in vals.iter().enumerate() {
            let s = first + i as u64;
            if s >= self.sectors() || (fail && rng.chance(0.5)) {
                continue;
            }
            if fua {
                self.durable[s as usize] = *v;
                self.cache.remove(&s);
            } else {
                self.cache.entry(s).or_default().push(*v);
            }
        }
    }

    /// The first `n` cached writes of sector `s` reach the medium.
    fn make_durable(&mut self, s: u64, n: usize) {
        let Some(c) = self.cache.get_mut(&s) else {
            return;
        };
        // A FUA write may have replaced the cached ones meanwhile.
        let n = n.min(c.len());
        if n == 0 {
            return;
        }
        self.durable[s as usize] = c[n - 1];
        c.drain(..n);
        if c.is_empty() {
            self.cache.remove(&s);
        }
    }

    /// Power loss: in-flight writes land sector by sector at random, each cached
    /// write survives at random. Everything in flight is forgotten.
    pub fn power_loss(&mut self, rng: &mut Rng) {
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Some((first, vals)) = written_values(&p.op) {
                for (i, v) in vals.into_iter().enumerate() {
                    let s = first + i as u64;
                    if s < self.sectors() && rng.chance(0.5) {
                        self.cache.entry(s).or_default().push(v);
                    }
                }
            }
        }
        for (s, c) in std::mem::take(&mut self.cache) {
            for v in c {
                if rng.chance(0.5) {
                    self.durable[s as usize] = v;
                }
            }
        }
    }

    /// The process died: what it submitted still completes, the cache stays.
    pub fn process_crash(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Some((first, vals)) = written_values(&p.op) {
                let fua = matches!(p.op, DiskOp::Write { fua: true, .. });
                for (i, v) in vals.into_iter().enumerate() {
                    let s = first + i as u64;
                    if s >= self.sectors() {
                        continue;
                    }
                    if fua {
                        self.durable[s as usize] = v;
                        self.cache.remove(&s);
                    } else {
                        self.cache.entry(s).or_default().push(v);
                    }
                }
            }
        }
    }

    /// Everything cached reaches the medium (a clean shutdown's final flush).
    pub fn flush_all(&mut self) {
        for (s, c) in std::mem::take(&mut self.cache) {
            if let Some(v) = c.last() {
                self.durable[s as usize] = *v;
            }
        }
    }
}

/// Sector range a write-like op touches.
fn write_range(op: &DiskOp) -> Option<(u64, u64)> {
    match op {
        DiskOp::Write { offset, data, .. } => Some((offset / SECTOR, data.len() as u64 / SECTOR)),
        DiskOp::Trim { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
            Some((offset / SECTOR, len / SECTOR))
        }
        _ => None,
    }
}

fn written_values(op: &DiskOp) -> Option<(u64, Vec<u64>)> {
    match op {
        DiskOp::Write { offset, data, .. } => data::decode(data).ok().map(|v| (offset / SECTOR, v)),
        DiskOp::Trim { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
            Some((offset / SECTOR, vec![0; (len / SECTOR) as usize]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::data::value_of;

    fn write(s: u64, v: u64, fua: bool) -> DiskOp {
        DiskOp::Write {
            offset: s * SECTOR,
            data: data::encode(&[v]),
            fua,
        }
    }

    #[test]
    fn flush_covers_only_writes_completed_before_it_was_submitted() {
        let mut rng = Rng::new(1);
        let mut d = SimDisk::new(vec![0; 8]);
        let (w1, _) = d.submit(1, write(2, value_of(1, 2), false), 0, &mut rng);
        d.complete(w1, 0, &mut rng).unwrap();
        let (f, _) = d.submit(2, DiskOp::Flush, 0, &mut rng);
        let (w2, _) = d.submit(3, write(3, value_of(2, 3), false), 0, &mut rng);
        d.complete(w2, 0, &mut rng).unwrap();
        d.complete(f, 0, &mut rng).unwrap();
        assert_eq!(d.durable[2], value_of(1, 2));
        assert_eq!(d.durable[3], 0);
        assert_eq!(d.view(3), value_of(2, 3));
        let (w3, _) = d.submit(4, write(4, value_of(3, 4), true), 0, &mut rng);
        d.complete(w3, 0, &mut rng).unwrap();
        assert_eq!(d.durable[4], value_of(3, 4));
        // Power loss keeps durable data whatever the dice say.
        for seed in 0..20 {
            let mut c = SimDisk::new(d.durable.clone());
            c.cache = d.cache.clone();
            c.power_loss(&mut Rng::new(seed));
            assert_eq!(c.durable[2], value_of(1, 2));
            assert_eq!(c.durable[4], value_of(3, 4));
            assert!(c.durable[3] == 0 || c.durable[3] == value_of(2, 3));
        }
    }
}
