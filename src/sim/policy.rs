//! Two invariants about whose data a split brain or a sync decision keeps:
//!
//! - **The policy's winner is the sync source.** When a node resolves a split
//!   brain by policy, the simulator reads the configured after-sb policy itself
//!   (DRBD's documented meaning, written here without the core's code) from the
//!   inputs the node reports with its `split-brain-resolved` event, and the
//!   node must have picked that winner. The inputs are checked too: the changes
//!   it counts for its peer are the bits its peer sent on this link, and both
//!   sides of a link must report mirrored roles and generations. With the
//!   direction check of `on_decision`, exactly the winner is the source.
//! - **The reference stays up to date.** The node whose data the cluster last
//!   chose (a sync source, the source of a resync once its target started it,
//!   an operator's resync included but not one a `primary --force` started
//!   before it was answered, a policy's winner, a node whose `primary --force`
//!   was answered) is not
//!   made a sync target by a comparison of different generations, nor left with
//!   no good data on either side, unless something since says otherwise: the
//!   other node started a generation of its own (it wrote alone), or the
//!   reference's disk failed, was invalidated, or the operator discarded it.

use super::cluster::Sim;
use super::scenario::NAMES;
use crate::config::SbPolicy;

/// What a node reported with `split-brain-resolved`.
struct Inputs {
    primary: bool,
    peer_primary: bool,
    changes: u64,
    peer_changes: u64,
    older_primary: bool,
    peer_older_primary: bool,
}

impl Inputs {
    fn read(v: &serde_json::Value) -> Option<Inputs> {
        let b = |k: &str| v.get(k).and_then(|x| x.as_bool());
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64());
        Some(Inputs {
            primary: b("primary")?,
            peer_primary: b("peer_primary")?,
            changes: u("changes")?,
            peer_changes: u("peer_changes")?,
            older_primary: b("older_primary")?,
            peer_older_primary: b("peer_older_primary")?,
        })
    }
}

/// Who loses under `policy`, seen from node `n`: Some(true) if `n` is
/// discarded (becomes the sync target), Some(false) if its peer is, None if the
/// policy leaves the split brain to the operator (disconnect).
fn loser_is_me(
    policy: &SbPolicy,
    n: usize,
    i: &Inputs,
    all: &crate::config::SplitBrain,
) -> Option<bool> {
    // Ties go against the node whose name sorts last.
    let tie = NAMES[n] > NAMES[1 - n];
    match policy {
        SbPolicy::Disconnect => None,
        SbPolicy::DiscardZeroChanges => {
            if i.changes == 0 && i.peer_changes == 0 {
                Some(tie)
            } else if i.changes == 0 || i.peer_changes == 0 {
                Some(i.changes == 0)
            } else {
                None
            }
        }
        SbPolicy::DiscardLeastChanges => {
            if i.changes == i.peer_changes {
                Some(tie)
            } else {
                Some(i.changes < i.peer_changes)
            }
        }
        SbPolicy::DiscardYoungerPrimary | SbPolicy::DiscardOlderPrimary => {
            if i.older_primary == i.peer_older_primary {
                return loser_is_me(&SbPolicy::DiscardLeastChanges, n, i, all);
            }
            let i_am_younger = !i.older_primary;
            Some(match policy {
                SbPolicy::DiscardYoungerPrimary => i_am_younger,
                _ => !i_am_younger,
            })
        }
        SbPolicy::DiscardNode(name) => Some(name == NAMES[n]),
        SbPolicy::DiscardSecondary => {
            if i.primary == i.peer_primary {
                None
            } else {
                Some(!i.primary)
            }
        }
        SbPolicy::Consensus => {
            let zero = loser_is_me(&all.after_sb_0pri, n, i, all);
            let secondary = loser_is_me(&SbPolicy::DiscardSecondary, n, i, all);
            if zero.is_some() && zero == secondary {
                zero
            } else {
                None
            }
        }
        SbPolicy::CallPriLostAfterSb | SbPolicy::ViolentlyAs0p => {
            loser_is_me(&all.after_sb_0pri, n, i, all)
        }
    }
}

impl Sim {
    /// Node `n` resolved a split brain (`split-brain-resolved`, event `v`) on its
    /// active link. Checks the winner against the policy.
    pub fn check_resolution(&mut self, n: usize, v: &serde_json::Value) {
        let d = v.get("decision").and_then(|x| x.as_str()).unwrap_or("");
        let target = d.starts_with("Target");
        assert!(target || d.starts_with("Source"), "resolution {d}");
        let Some(link) = self.net.active_link(n) else {
            return;
        };
        let discard = v.get("discard_my_data").and_then(|x| x.as_bool());
        if let Some(mine) = discard {
            // The operator's choice: only the victim the simulator named loses.
            if mine != self.nodes[n].discarded || target != mine {
                self.violate(
                    "wrong split-brain winner",
                    format!(
                        "{} resolved {d} by discard-my-data (its own: {mine}; the simulator asked it: {})",
                        Sim::name(n),
                        self.nodes[n].discarded
                    ),
                );
            }
            return;
        }
        let Some(i) = Inputs::read(v) else {
            self.violate(
                "wrong split-brain winner",
                format!(
                    "{}'s split-brain-resolved lacks the policy's inputs: {v}",
                    Sim::name(n)
                ),
            );
            return;
        };
        self.stats.resolutions_checked += 1;
        let sent = &self.net.links[&link].dirs[1 - n];
        let sent_bits: u64 = sent.bitmap.iter().map(|w| w.count_ones() as u64).sum();
        if sent.bitmap_done && sent_bits != i.peer_changes {
            self.violate(
                "wrong split-brain winner",
                format!(
                    "{} counted {} changes for its peer, which sent {sent_bits} bits on link {link}",
                    Sim::name(n),
                    i.peer_changes
                ),
            );
            return;
        }
        let mirror = (
            i.peer_primary,
            i.primary,
            i.peer_older_primary,
            i.older_primary,
        );
        let seen = (
            i.primary,
            i.peer_primary,
            i.older_primary,
            i.peer_older_primary,
        );
        let other = self.net.links[&link].resolved[1 - n];
        if other.is_some_and(|o| o != mirror) {
            self.violate(
                "wrong split-brain winner",
                format!(
                    "{} and its peer read the split brain differently on link {link}: {seen:?} against {other:?} (primary, peer primary, older, peer older)",
                    Sim::name(n)
                ),
            );
            return;
        }
        self.net.links.get_mut(&link).expect("active link").resolved[n] = Some(seen);
        let sb = &self.sc.split_brain;
        let policy = match i.primary as u8 + i.peer_primary as u8 {
            0 => &sb.after_sb_0pri,
            1 => &sb.after_sb_1pri,
            _ => &sb.after_sb_2pri,
        };
        let want = loser_is_me(policy, n, &i, sb);
        if want != Some(target) {
            self.violate(
                "wrong split-brain winner",
                format!(
                    "{} resolved {d} under {policy:?}, which discards {}",
                    Sim::name(n),
                    match want {
                        Some(true) => Sim::name(n),
                        Some(false) => Sim::name(1 - n),
                        None => "neither (the operator decides)",
                    }
                ),
            );
        }
    }

    /// The cluster chose node `n`'s data (`why`).
    pub fn set_reference(&mut self, n: usize, why: &str) {
        self.trace_line(Some(n), || format!("reference data ({why})"));
        self.reference = Some(n);
    }

    /// Something took away the reference's standing, or made it ambiguous.
    pub fn clear_reference(&mut self, why: &str) {
        if self.reference.take().is_some() {
            self.trace_line(None, || format!("no reference data ({why})"));
        }
    }

    /// Node `n` decided `d` from generations (event `v`): the reference must
    /// not be made a target by different generations, nor be lost. A source
    /// becomes the reference.
    pub fn check_reference(&mut self, n: usize, d: &str, v: &serde_json::Value) {
        let current = |k: &str| {
            v.get(k)
                .and_then(|g| g.get("current"))
                .and_then(|c| c.as_str())
        };
        // The peer's identifiers and disk state as its Hello gave them: if the
        // peer has moved on since it sent them (a new generation, forced up to
        // date, invalidated, while the Hello was on the way), its own core
        // refuses this handshake and connects again; the decision stands for
        // nothing (seeds 12949 and 2727 set the reference from such decisions).
        let peer_now = self.nodes[1 - n].core.as_ref().map(|c| {
            (
                format!("{:016X}", c.meta().gis.current),
                format!("{:?}", c.disk_state()),
            )
        });
        let peer_then = v.get("peer_disk").and_then(|x| x.as_str());
        let fresh = peer_now.as_ref().is_some_and(|(gis, disk)| {
            Some(gis.as_str()) == current("peer_gis") && Some(disk.as_str()) == peer_then
        });
        self.nodes[n].decision_fresh = fresh;
        self.nodes[n].decision_at = Some(self.now());
        if !fresh {
            return;
        }
        let source = if d.starts_with("Source") {
            Some(n)
        } else if d.starts_with("Target") {
            Some(1 - n)
        } else {
            None
        };
        let Some(r) = self.reference else {
            if let Some(s) = source {
                self.set_reference(s, "sync source");
            }
            return;
        };
        let differ = current("gis") != current("peer_gis");
        let r_target = (n == r && d.starts_with("Target")) || (n != r && d.starts_with("Source"));
        if r_target && differ {
            self.violate(
                "reference lost",
                format!(
                    "{} decided {d}: {}, whose data the cluster chose last, becomes the sync target of an older generation ({v})",
                    Sim::name(n),
                    Sim::name(r)
                ),
            );
            return;
        }
        if d == "NoGoodData" {
            self.violate(
                "reference lost",
                format!(
                    "{} found no good data, though {} held the data the cluster chose last",
                    Sim::name(n),
                    Sim::name(r)
                ),
            );
            return;
        }
        if let Some(s) = source {
            self.set_reference(s, "sync source");
        }
    }
}
