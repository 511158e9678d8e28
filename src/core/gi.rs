//! Generation identifiers and the sync decision on connect (docs/SYNC-DECISION.md).

use crate::peer::Gis;

/// What one side brings to the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub gis: Gis,
    /// The disk holds a whole, consistent image (up-to-date or outdated).
    pub consistent: bool,
    /// It was up to date when last known (not outdated).
    pub up_to_date: bool,
    pub crashed_primary: bool,
    /// It holds writes its peer acknowledged but had not flushed when the link
    /// was lost (marked in its bitmap): if the peer lost power since, they are
    /// gone there, and this node may have made them durable (flushes answered
    /// alone). Persisted as `md_flags::PEER_MAY_LACK`, told in the Hello.
    pub peer_may_lack: bool,
    /// The disk was never synced since create-md.
    pub full_sync_needed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Same data; nothing to move.
    InSync,
    /// This node sends; `full` = every block, else the merged bitmap.
    Source {
        full: bool,
    },
    Target {
        full: bool,
    },
    /// Both changed independently since they last agreed.
    SplitBrain {
        full: bool,
    },
    /// Neither disk is consistent: wait for `primary --force` on one.
    NoGoodData,
    /// The identifiers share no history: refuse.
    Unrelated,
}

impl Decision {
    /// The same decision seen from the peer.
    pub fn mirrored(self) -> Decision {
        match self {
            Decision::Source { full } => Decision::Target { full },
            Decision::Target { full } => Decision::Source { full },
            other => other,
        }
    }
}

/// Decides from both sides' identifiers. `me_first` breaks ties deterministically
/// (true on the node whose name sorts first); `decide(a, b, t) == decide(b, a, !t).mirrored()`.
pub fn decide(me: &Side, peer: &Side, me_first: bool) -> Decision {
    match (me.consistent, peer.consistent) {
        (false, false) => return Decision::NoGoodData,
        (true, false) => {
            return Decision::Source {
                full: peer.full_sync_needed || !related(me, peer),
            }
        }
        (false, true) => {
            return Decision::Target {
                full: me.full_sync_needed || !related(me, peer),
            }
        }
        (true, true) => {}
    }
    let (mc, pc) = (me.gis.current, peer.gis.current);
    if mc == pc {
        // A side holding writes its peer may have lost is the source: the peer
        // acknowledged them but never flushed them, so a peer that lost power
        // since lacks them, while this side may have promised them durable
        // (sim-long seed 10316: a crashed primary as the source copied its old
        // blocks over them). It never lost them itself (it did not crash: a
        // crashed side with the mark is handled below), and a peer that kept
        // its cache holds the same data there, so nothing is lost either way.
        match (me.peer_may_lack, peer.peer_may_lack) {
            (true, false) => return Decision::Source { full: false },
            (false, true) => return Decision::Target { full: false },
            // Both hold some (a network cut while both wrote): the one that did
            // not crash kept its cache, so it holds the other's too.
            (true, true) if me.crashed_primary != peer.crashed_primary => {
                return if peer.crashed_primary {
                    Decision::Source { full: false }
                } else {
                    Decision::Target { full: false }
                };
            }
            _ => {}
        }
        return match (me.crashed_primary, peer.crashed_primary) {
            (false, false) => Decision::InSync,
            (true, false) => Decision::Source { full: false },
            (false, true) => Decision::Target { full: false },
            (true, true) => {
                if me_first {
                    Decision::Source { full: false }
                } else {
                    Decision::Target { full: false }
                }
            }
        };
    }
    let mb = me.gis.bitmap;
    let pb = peer.gis.bitmap;
    // Each rule is asked of both sides at once, so that the peer, deciding with
    // the roles swapped, reaches the mirror image: if both sides claim to have
    // gone on from the other's data (the identifiers contradict each other),
    // neither is the source. Asked one side first, each node found itself
    // ahead and the two disagreed on the direction (simulator seed 5828: each
    // history held the other's current).
    //
    // One side went on alone (a newer generation), but the other holds writes
    // it may have lost (acknowledged, never flushed there, then perhaps made
    // durable here alone): each has data the other lacks, a split brain (sim-long
    // seed 71609: a secondary lost power, came back, was promoted and wrote, and
    // the one-way resync copied over the old primary's durable writes).
    let me_went_on = mb != 0 && mb == pc;
    let peer_went_on = pb != 0 && pb == mc;
    match (me_went_on, peer_went_on) {
        (true, false) if peer.peer_may_lack => return Decision::SplitBrain { full: false },
        (true, false) => return Decision::Source { full: false },
        (false, true) if me.peer_may_lack => return Decision::SplitBrain { full: false },
        (false, true) => return Decision::Target { full: false },
        (true, true) => return Decision::SplitBrain { full: true },
        (false, false) => {}
    }
    if mb != 0 && mb == pb {
        return Decision::SplitBrain { full: false };
    }
    let me_newer = pc != 0 && me.gis.history.contains(&pc);
    let peer_newer = mc != 0 && peer.gis.history.contains(&mc);
    match (me_newer, peer_newer) {
        (true, false) if peer.peer_may_lack => return Decision::SplitBrain { full: true },
        (true, false) => return Decision::Source { full: true },
        (false, true) if me.peer_may_lack => return Decision::SplitBrain { full: true },
        (false, true) => return Decision::Target { full: true },
        (true, true) => return Decision::SplitBrain { full: true },
        (false, false) => {}
    }
    if related(me, peer) {
        return Decision::SplitBrain { full: true };
    }
    Decision::Unrelated
}

/// With a failed disk on one side (or both), whether the failed side is behind
/// or equal, so the link may come up without a resync and the other disk serves.
/// The generations are compared as if both disks were whole: a failed disk
/// cannot be resynced now, and deciding as if it were merely inconsistent
/// silently discarded a diverged side's data (simulator finding). Both nodes
/// compute it with the roles swapped and reach the same answer:
/// `failed_side_behind(a, b, fa, fb, t) == failed_side_behind(b, a, fb, fa, !t)`.
pub fn failed_side_behind(
    me: &Side,
    peer: &Side,
    me_failed: bool,
    peer_failed: bool,
    me_first: bool,
) -> bool {
    debug_assert!(me_failed || peer_failed, "no failed disk");
    let whole = |s: &Side| Side {
        consistent: true,
        up_to_date: true,
        ..*s
    };
    match decide(&whole(me), &whole(peer), me_first) {
        Decision::InSync => true,
        Decision::Target { .. } => me_failed && !peer_failed,
        Decision::Source { .. } => peer_failed && !me_failed,
        _ => false,
    }
}

fn related(a: &Side, b: &Side) -> bool {
    let ids = |s: &Side| {
        [
            s.gis.current,
            s.gis.bitmap,
            s.gis.history[0],
            s.gis.history[1],
        ]
    };
    let bs = ids(b);
    ids(a).iter().any(|x| *x != 0 && bs.contains(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(current: u64, bitmap: u64, history: [u64; 2]) -> Side {
        Side {
            gis: Gis {
                current,
                bitmap,
                history,
            },
            consistent: true,
            up_to_date: true,
            crashed_primary: false,
            peer_may_lack: false,
            full_sync_needed: false,
        }
    }

    fn both(a: &Side, b: &Side) -> Decision {
        let d = decide(a, b, true);
        assert_eq!(
            decide(b, a, false),
            d.mirrored(),
            "asymmetric for {a:?} {b:?}"
        );
        d
    }

    /// A small generator for the property tests (no dependency needed).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// An identifier from a pool of four (and 0, "none"), so that the
        /// two sides share identifiers in every position and combination.
        fn id(&mut self) -> u64 {
            self.next() % 5
        }

        fn flag(&mut self) -> bool {
            self.next() & 1 == 1
        }

        fn side(&mut self) -> Side {
            Side {
                gis: Gis {
                    current: self.id(),
                    bitmap: self.id(),
                    history: [self.id(), self.id()],
                },
                consistent: self.flag(),
                up_to_date: self.flag(),
                crashed_primary: self.flag(),
                peer_may_lack: self.flag(),
                full_sync_needed: self.flag(),
            }
        }
    }

    /// Whatever the two sides' metadata, even contradictory identifiers that no
    /// correct rotation produces (each history holding the other's current:
    /// simulator seed 5828), both nodes reach mirror-image decisions: never
    /// both source, never both target.
    #[test]
    fn the_decision_is_symmetric_for_any_metadata() {
        let mut rng = Rng(0x5828_0000_0000_0001);
        for _ in 0..200_000 {
            let (a, b) = (rng.side(), rng.side());
            let t = rng.flag();
            assert_eq!(
                decide(&a, &b, t),
                decide(&b, &a, !t).mirrored(),
                "asymmetric for {a:?} {b:?} (first: {t})"
            );
            let (fa, fb) = match rng.next() % 3 {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            assert_eq!(
                failed_side_behind(&a, &b, fa, fb, t),
                failed_side_behind(&b, &a, fb, fa, !t),
                "failed-disk decision asymmetric for {a:?} (failed: {fa}) {b:?} (failed: {fb}) (first: {t})"
            );
        }
    }

    /// Each history holding the other's current: neither is newer.
    #[test]
    fn a_cycle_in_the_histories_is_no_direction() {
        let a = side(0x20, 0, [0x10, 0x5]);
        let b = side(0x10, 0, [0x20, 0x5]);
        assert_eq!(both(&a, &b), Decision::SplitBrain { full: true });
        // Each bitmap naming the other's current: likewise.
        let a = side(0x20, 0x10, [0, 0]);
        let b = side(0x10, 0x20, [0, 0]);
        assert_eq!(both(&a, &b), Decision::SplitBrain { full: true });
    }

    #[test]
    fn table() {
        // Same data.
        assert_eq!(
            both(&side(10, 0, [0, 0]), &side(10, 0, [0, 0])),
            Decision::InSync
        );
        // A went on alone (bitmap = old current).
        assert_eq!(
            both(&side(20, 10, [0, 0]), &side(10, 0, [0, 0])),
            Decision::Source { full: false }
        );
        assert_eq!(
            both(&side(10, 0, [0, 0]), &side(20, 10, [0, 0])),
            Decision::Target { full: false }
        );
        // Both went on alone from 10.
        assert_eq!(
            both(&side(20, 10, [0, 0]), &side(30, 10, [0, 0])),
            Decision::SplitBrain { full: false }
        );
        // A's bitmap no longer reaches back to B: full sync.
        assert_eq!(
            both(&side(40, 30, [10, 0]), &side(10, 0, [0, 0])),
            Decision::Source { full: true }
        );
        // Unrelated.
        assert_eq!(
            both(&side(1, 0, [0, 0]), &side(2, 0, [0, 0])),
            Decision::Unrelated
        );
        // Crashed primary is the source.
        let mut c = side(10, 0, [0, 0]);
        c.crashed_primary = true;
        assert_eq!(
            both(&c, &side(10, 0, [0, 0])),
            Decision::Source { full: false }
        );
        // A side holding writes its peer may have lost is the source, over a
        // crashed primary too (sim-long seed 10316).
        let mut m = side(10, 0, [0, 0]);
        m.peer_may_lack = true;
        assert_eq!(both(&m, &c), Decision::Source { full: false });
        assert_eq!(
            both(&m, &side(10, 0, [0, 0])),
            Decision::Source { full: false }
        );
        // Both hold some: the one that did not crash.
        let mut mc = m;
        mc.crashed_primary = true;
        assert_eq!(both(&m, &mc), Decision::Source { full: false });
        // The peer went on alone, but this side holds writes it may lack: a
        // split brain, not a one-way resync (sim-long seed 71609).
        assert_eq!(
            both(&m, &side(20, 10, [0, 0])),
            Decision::SplitBrain { full: false }
        );
        assert_eq!(
            both(&m, &side(40, 30, [10, 0])),
            Decision::SplitBrain { full: true }
        );
        // Inconsistent side is the target.
        let mut i = side(10, 0, [0, 0]);
        i.consistent = false;
        assert_eq!(
            both(&side(12, 10, [0, 0]), &i),
            Decision::Source { full: false }
        );
        i.full_sync_needed = true;
        assert_eq!(
            both(&side(12, 10, [0, 0]), &i),
            Decision::Source { full: true }
        );
        let mut j = i;
        j.gis.current = 99;
        assert_eq!(both(&i, &j), Decision::NoGoodData);
    }
}
