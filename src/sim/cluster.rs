//! The simulated cluster: two node cores (the production `core::Node`), their
//! disks and metadata stores, the network between them, the clients, and the
//! event loop that drives it all from one seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::data;
use super::disk::SimDisk;
use super::meta::{Durable, SimMeta};
use super::model::Model;
use super::net::Net;
use super::resend::{Group, WriteSpec};
use super::rng::Rng;
use super::scenario::{Scenario, Start, NAMES};
use super::world::World;
use crate::core::{md_flags, Action, AdminCmd, ConnId, Event, MetaState, Node, Role, Status};
use crate::peer::Gis;

/// How long a daemon's authentication of a new connection may take before it
/// gives up on it (the daemon's `AUTH_TIMEOUT`, src/daemon/peer_link.rs).
pub const AUTH_TIMEOUT_US: u64 = 10_000_000;
/// How often a metadata write fails (EIO, nothing of it lands).
pub const META_FAIL_CHANCE: f64 = 0.002;

/// Something that happens at a simulated time.
#[derive(Debug)]
pub enum Ev {
    Tick {
        node: usize,
        inc: u64,
    },
    DiskDone {
        node: usize,
        inc: u64,
        op: u64,
    },
    MetaDone {
        node: usize,
        inc: u64,
    },
    Deliver {
        link: u64,
        dir: usize,
    },
    /// Node `from`'s dial reaches the peer (or fails).
    Connect {
        from: usize,
        inc: u64,
    },
    /// Node `node`'s daemon finished authenticating `link`: its core is offered it.
    Offer {
        link: u64,
        node: usize,
        inc: u64,
    },
    /// The reader of `link` on node `node` ended after its core closed it.
    ConnDown {
        link: u64,
        node: usize,
        inc: u64,
    },
    Restart(usize),
    StopStep {
        node: usize,
        inc: u64,
    },
    Client {
        node: usize,
        inc: u64,
        conn: ConnId,
    },
    Admin {
        node: usize,
        cmd: AdminCmd,
    },
    /// The fence-peer handler `id` of `node` ends with `exit`.
    FenceDone {
        node: usize,
        inc: u64,
        id: u64,
        exit: Option<i32>,
    },
    /// The stalled NBD reader of client connection `conn` reads what waits in it.
    ConnRead {
        node: usize,
        inc: u64,
        conn: ConnId,
    },
    /// The client reconnects after node `node` restarted and sends its
    /// unanswered writes again (resend.rs).
    Resend {
        node: usize,
        inc: u64,
    },
    Workload,
    Fault,
    Operator,
}

#[derive(Debug, Clone)]
pub enum ReqKind {
    Read {
        first: u64,
        n: u64,
        linear: bool,
        gen: u64,
    },
    Write(u32),
    /// `gen`: the link generation if the flush was mirrored; `peer_errors`: the
    /// peer disk's failure count then.
    Flush {
        gen: Option<u64>,
        peer_errors: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Req {
    pub kind: ReqKind,
    pub issue: u64,
    pub issued_us: u64,
    /// When the node's reader read it (u64::MAX while it waits unread).
    pub read_us: u64,
    /// A write small enough to be sent again (resend.rs): what it writes.
    pub spec: Option<WriteSpec>,
    /// Its copies, once it was sent again (key of `Sim::groups`).
    pub group: Option<u64>,
}

/// A request the client sent that the node's NBD reader has not read yet (its
/// reader is stalled): it reaches the core when the reader reads it.
#[derive(Debug)]
pub struct Unread {
    pub cookie: u64,
    pub req: crate::core::IoRequest,
    pub step: u64,
}

#[derive(Debug, Default)]
pub struct Client {
    pub inflight: BTreeMap<u64, Req>,
    pub next_cookie: u64,
    pub close_at: u64,
    pub closing: bool,
    /// The client shut the connection down (a request timed out): replies on it
    /// are lost, and what the reader reads from now on is stale (resend.rs).
    pub shut: bool,
    /// The core was told ([`Event::ClientShut`]), before the first request
    /// read after the shutdown.
    pub told_shut: bool,
    /// Its reader is stalled: requests wait in `unread`, in order.
    pub stalled: bool,
    pub unread: VecDeque<Unread>,
    /// Cookies of copies read after the shutdown: the core must drop them.
    pub stale: BTreeSet<u64>,
}

/// A clean stop in progress (the daemon's SIGTERM path).
#[derive(Debug, Clone, Copy)]
pub struct Stopping {
    pub since: u64,
    pub shut_down: bool,
    /// The data flush before the shutdown metadata succeeded (the exit's final
    /// flush then does too; after a failed one it fails as well).
    pub flushed: bool,
    /// The core was idle but waited for the peer's answer to the stop's flush.
    pub waited_peer_flush: bool,
}

pub struct SimNode {
    pub core: Option<Node>,
    /// Incremented at every crash or stop: events of older incarnations are dropped.
    pub inc: u64,
    pub boot_us: u64,
    pub disk: SimDisk,
    pub meta: SimMeta,
    /// The link the core's peer session runs on, as last seen.
    pub session: Option<u64>,
    /// The ranges of the writes its current pause left unanswered, and when it began.
    pub pause: Option<(u64, Vec<(u64, u64)>)>,
    pub clients: BTreeMap<ConnId, Client>,
    pub stopping: Option<Stopping>,
    pub restart_at: Option<u64>,
    /// Changes whenever this node's core gains or loses the peer.
    pub link_gen: u64,
    /// The node's bitmap just before it read the peer's last handshake bitmap chunk.
    pub bitmap_before: Vec<u64>,
    /// The simulator asked this node to `connect --discard-my-data`, and no
    /// handshake of it has decided since.
    pub discarded: bool,
    /// Its last sync decision saw the peer's identifiers as they are now (not
    /// from a Hello the peer has outdated since): policy.rs.
    pub decision_fresh: bool,
    /// When this node's last sync decision was taken (simulated µs): a
    /// resync it starts at that instant was started by that decision, and
    /// stands for nothing if the decision was not fresh.
    pub decision_at: Option<u64>,
    pub failed_since: Option<u64>,
    /// Since when the node's writes are frozen by fencing.
    pub suspended_since: Option<u64>,
    pub last_verify: Option<u64>,
    /// The last verify this node started as source went on from where a lost
    /// link cut it (its count includes what it found before the cut).
    pub verify_resumed: bool,
    /// The operator invalidated this node's data; its next sync as target discards it.
    pub invalidated: bool,
    /// Writes the client had in flight when the node crashed: sent again after it
    /// restarts (resend.rs).
    pub orphans: Vec<WriteSpec>,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub time_us: u64,
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Faults,
    Calm,
    Settle,
    Final,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub events: u64,
    pub requests: u64,
    /// Writes the core admitted with `Event::StreamWrite` (the daemon's splice path).
    pub streamed: u64,
    /// Metadata writes failed (EIO), and clean stops whose data flush failed.
    pub meta_failures: u64,
    pub stop_flush_failures: u64,
    /// Clean stops that waited for the peer's answer to their flush (stop.rs).
    pub stop_peer_flush_waits: u64,
    /// Trims and write-zeroes sent with FUA.
    pub fua_trims: u64,
    /// Large trims the node answered early, their time budget spent
    /// (core/split.rs), and the bytes they skipped.
    pub trims_cut_short: u64,
    pub trim_bytes_skipped: u64,
    /// Ticks at which a sync source's adaptive pace held the resync below one
    /// request in flight (core/resync_rate.rs).
    pub held_resync_ticks: u64,
    pub replies: u64,
    pub reads_checked: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub links: u64,
    /// Sessions that started while another connection was in its Hello exchange.
    pub races: u64,
    /// Connection faults injected: extra dials, crossed dials, resets mid-handshake.
    pub extra_dials: u64,
    pub crossed_dials: u64,
    pub handshake_resets: u64,
    /// Link blips between two primaries: pauses started, ended by a reconnect,
    /// writes issued again, and cuts with overlapping writes in flight on both
    /// sides.
    pub pauses: u64,
    pub pauses_reconnected: u64,
    /// Start pauses (grace.rs): started, ended by a reconnect.
    pub start_pauses: u64,
    pub start_pauses_reconnected: u64,
    pub writes_reissued: u64,
    pub overlapping_cuts: u64,
    /// The kernel client's resends (resend.rs): request timeouts (a connection
    /// shut, its writes sent again on a new one), stalled readers, writes sent
    /// again after a crash, copies sent in all, copies sent while another copy of
    /// the same write was still in flight, copies read after their connection was
    /// shut (dropped by the core), and replies lost on shut connections.
    pub timeouts: u64,
    pub stalls: u64,
    pub crash_resends: u64,
    pub copies: u64,
    pub concurrent_copies: u64,
    pub stale_dropped: u64,
    pub replies_lost: u64,
    pub decisions: u64,
    pub split_brains: u64,
    pub rebases: u64,
    pub violations_checked: u64,
    /// Split brains resolved by policy whose winner was checked (policy.rs).
    pub resolutions_checked: u64,
}

pub struct Sim {
    pub seed: u64,
    pub sc: Scenario,
    pub world: World<Ev>,
    pub step: u64,
    pub nodes: [SimNode; 2],
    pub net: Net,
    pub model: Model,
    pub phase: Phase,
    pub violation: Option<Violation>,
    pub trace: bool,
    pub stats: Stats,
    /// How often a metadata write fails (0 unless `Options::meta_failures`).
    pub meta_fail_chance: f64,
    pub hash: u64,
    pub rng_net: Rng,
    pub rng_disk: Rng,
    pub rng_work: Rng,
    pub rng_fault: Rng,
    pub rng_core: Rng,
    pub next_conn: ConnId,
    pub next_admin: u64,
    /// Bound on a reply's delay, µs.
    pub reply_bound: u64,
    pub settle_started: u64,
    /// The operator saw the cluster settled (connected, in sync, idle).
    pub settled: bool,
    /// The node whose role the workload prefers for a new client.
    pub favourite: usize,
    /// Some node holds good data (up to date), and nothing that may take it
    /// away justifiably (a failed disk, `invalidate`) happened since: a
    /// handshake must not end with no good data on either side.
    pub good_data: bool,
    /// The node whose data the cluster chose last, while nothing since took
    /// its standing away (policy.rs).
    pub reference: Option<usize>,
    /// Admin ids of `primary --force` not answered yet: a forced promotion
    /// holds good data once the core says "primary" (after its superblock is
    /// durable), not at its "forced-up-to-date" event, which a process kill
    /// before that superblock undoes (seed 69431).
    /// Each entry: (admin id, node, the node's incarnation when asked); a
    /// process kill leaves the entry behind, for an incarnation now gone.
    pub forcing: Vec<(u64, usize, u64)>,
    /// The copies of writes sent more than once (resend.rs), by group id.
    pub groups: BTreeMap<u64, Group>,
    pub next_group: u64,
    /// The core is told when a client shut its connection down (the daemon's
    /// reader rule). Off only to show that the simulator catches its absence.
    pub shut_rule: bool,
}

fn words_for(data_size: u64) -> usize {
    data_size.div_ceil(4096).div_ceil(64) as usize
}

impl Sim {
    pub fn new(seed: u64, faults: crate::core::Faults, trace: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let mut sc = Scenario::draw(&mut rng, faults);
        let mut zeroing = Rng::new(seed ^ 0x5EED_1A26_E000_0018);
        sc.large_zeroing = zeroing.chance(0.3);
        // In some seeds a TRIM's time budget of a few ms (it runs out at the
        // next tick) and pieces of one extent, so that large trims are cut
        // short (core/split.rs). Drawn from its own stream, after the above.
        if zeroing.chance(0.3) {
            sc.trim_budget_ms = zeroing.below(10);
            sc.max_piece_extents = 1;
        }
        // Most seeds resync adaptively (core/resync_rate.rs), some of them
        // with a configured floor; the rest keep the fixed cap drawn above.
        // Drawn after the above from the same stream.
        // The fault test for resync bits cleared early keeps the fixed cap: its
        // window is the resync writes in flight, which the adaptive pace keeps
        // few while the application writes (seeds 1-2000: 18 caught with the
        // fixed cap, 7 adaptive, the first at seed 196 against 993).
        if zeroing.chance(0.8) {
            let floor = zeroing.chance(0.3).then(|| zeroing.range(1, 32) << 20);
            if !sc.faults.clear_resync_bit_early {
                sc.sync_rate = crate::core::SyncRate::Adaptive { min_rate: floor };
            }
        }
        // In half of the seeds the client times requests out and sends them again
        // (resend.rs); drawn from its own stream, after the above.
        let mut resends = Rng::new(seed ^ 0x5EED_0019_D0B1_E000);
        if resends.chance(0.5) {
            sc.resend_timeout_us = Some(resends.range(300_000, 4_000_000));
        }
        let sectors = sc.data_size / data::SECTOR;
        let words = words_for(sc.data_size);
        let in_sync = |gi: u64| Durable {
            meta: MetaState {
                gis: Gis {
                    current: gi,
                    bitmap: 0,
                    history: [0, 0],
                },
                flags: md_flags::CONSISTENT | md_flags::WAS_UP_TO_DATE,
                resync_offset: 0,
            },
            words: vec![0; words],
            active_extents: Vec::new(),
        };
        let fresh = |gi: u64| Durable {
            meta: MetaState {
                gis: Gis {
                    current: gi,
                    bitmap: 0,
                    history: [0, 0],
                },
                flags: md_flags::FULL_SYNC_NEEDED,
                resync_offset: 0,
            },
            words: vec![u64::MAX; words],
            active_extents: Vec::new(),
        };
        let garbage = |r: &mut Rng| {
            (0..sectors)
                .map(|s| data::garbage(r.next_u64(), s))
                .collect::<Vec<u64>>()
        };
        let common = rng.next_u64() & !1 | 2;
        let (m0, m1, d0, d1) = match sc.start {
            Start::InSync => (
                in_sync(common),
                in_sync(common),
                vec![0; sectors as usize],
                vec![0; sectors as usize],
            ),
            Start::SecondFresh => (
                in_sync(common),
                fresh(rng.next_u64() & !1 | 4),
                vec![0; sectors as usize],
                garbage(&mut rng),
            ),
            Start::BothFresh => {
                let g0 = garbage(&mut rng);
                let g1 = garbage(&mut rng);
                (fresh(common), fresh(rng.next_u64() & !1 | 8), g0, g1)
            }
        };
        let model = Model::new(&d0);
        let bpp = sc.bits_per_page;
        let mk = |m: Durable, d: Vec<u64>| SimNode {
            core: None,
            inc: 0,
            boot_us: 0,
            disk: SimDisk::new(d),
            meta: SimMeta::new(m, bpp),
            session: None,
            pause: None,
            clients: BTreeMap::new(),
            stopping: None,
            restart_at: None,
            link_gen: 0,
            bitmap_before: Vec::new(),
            discarded: false,
            decision_fresh: false,
            decision_at: None,
            failed_since: None,
            suspended_since: None,
            last_verify: None,
            verify_resumed: false,
            invalidated: false,
            orphans: Vec::new(),
        };
        let reply_bound = sc.reply_bound_us();
        let mut sim = Sim {
            seed,
            world: World::default(),
            step: 0,
            nodes: [mk(m0, d0), mk(m1, d1)],
            net: Net::default(),
            model,
            phase: Phase::Faults,
            violation: None,
            trace,
            stats: Stats::default(),
            meta_fail_chance: 0.0,
            hash: 0xCBF2_9CE4_8422_2325,
            rng_net: rng.fork(),
            rng_disk: rng.fork(),
            rng_work: rng.fork(),
            rng_fault: rng.fork(),
            rng_core: rng.fork(),
            next_conn: 1,
            next_admin: 1,
            reply_bound,
            settle_started: 0,
            settled: false,
            favourite: 0,
            good_data: sc.start != Start::BothFresh,
            reference: None,
            forcing: Vec::new(),
            groups: BTreeMap::new(),
            next_group: 1,
            shut_rule: std::env::var_os("MIRROR_SIM_NO_SHUT_RULE").is_none(),
            sc,
        };
        if trace {
            println!("seed {seed}: {:?}", sim.sc);
        }
        for n in 0..2 {
            sim.boot(n);
        }
        sim.world.after(100_000, Ev::Workload);
        sim.world.after(sim.sc.fault_gap_us, Ev::Fault);
        sim.world.after(500_000, Ev::Operator);
        if sim.sc.start == Start::BothFresh {
            // The operator picks the data to start from.
            sim.world.after(
                300_000,
                Ev::Admin {
                    node: 0,
                    cmd: AdminCmd::Primary { force: true },
                },
            );
            sim.world.after(
                400_000,
                Ev::Admin {
                    node: 0,
                    cmd: AdminCmd::Secondary,
                },
            );
        }
        sim
    }

    pub fn next_step(&mut self) -> u64 {
        self.step += 1;
        self.step
    }

    pub fn now(&self) -> u64 {
        self.world.now
    }

    pub fn name(n: usize) -> &'static str {
        NAMES[n]
    }

    pub fn trace_line(&self, node: Option<usize>, what: impl FnOnce() -> String) {
        if self.trace {
            let who = node.map(|n| NAMES[n]).unwrap_or("sim");
            println!(
                "{:>12.6} {:<6} {}",
                self.world.now as f64 / 1e6,
                who,
                what()
            );
        }
    }

    pub fn violate(&mut self, kind: &str, detail: String) {
        if self.violation.is_none() {
            self.trace_line(None, || format!("VIOLATION {kind}: {detail}"));
            self.violation = Some(Violation {
                time_us: self.world.now,
                kind: kind.to_string(),
                detail,
            });
        }
    }

    pub fn mix(&mut self, x: u64) {
        self.hash ^= x;
        self.hash = self.hash.wrapping_mul(0x0100_0000_01B3);
    }

    pub fn status(&self, n: usize) -> Option<Status> {
        self.nodes[n].core.as_ref().map(|c| c.status())
    }

    /// Whether node `n`'s core mirrors writes now.
    pub fn replicating(&self, n: usize) -> bool {
        self.status(n).and_then(|s| s.peer).is_some_and(|p| {
            p.connection == crate::core::ConnState::Connected
                && p.replication != crate::core::Replication::Off
        })
    }

    pub fn alive(&self, n: usize) -> bool {
        self.nodes[n].core.is_some()
    }

    /// Starts node `n`'s daemon from what its metadata store holds.
    pub fn boot(&mut self, n: usize) {
        let cfg = self.sc.core_config(n);
        let d = self.nodes[n].meta.durable.clone();
        let seed = self.rng_core.next_u64();
        let mut node = Node::new(cfg, d.meta.clone(), &d.words, &d.active_extents, seed);
        node.inject_faults(self.sc.faults);
        let now = self.world.now;
        let sn = &mut self.nodes[n];
        sn.core = Some(node);
        sn.inc += 1;
        sn.boot_us = now;
        sn.session = None;
        sn.stopping = None;
        sn.restart_at = None;
        sn.failed_since = None;
        sn.link_gen += 1;
        let inc = sn.inc;
        self.stats.restarts += 1;
        self.trace_line(Some(n), || {
            format!(
                "boot: meta {:?} gis {:x?} bitmap bits {} al {:?}",
                d.meta.flags,
                d.meta.gis,
                d.words.iter().map(|w| w.count_ones()).sum::<u32>(),
                d.active_extents
            )
        });
        self.world.after(100_000, Ev::Tick { node: n, inc });
        self.run_core(n, |_| ());
        if !self.nodes[n].orphans.is_empty() {
            let d = self.rng_work.range(1_000, 300_000);
            self.world.after(d, Ev::Resend { node: n, inc });
        }
    }

    /// Node `n` dies; `power`: its volatile caches are lost too.
    pub fn crash(&mut self, n: usize, power: bool) {
        if !self.alive(n) {
            return;
        }
        let step = self.next_step();
        self.trace_line(Some(n), || {
            format!(
                "CRASH ({})",
                if power {
                    "power loss"
                } else {
                    "process killed"
                }
            )
        });
        self.stats.crashes += 1;
        // Any crash of the node acknowledging a write may lose it unless flushed: a
        // killed primary's peer may take over without it (power loss or not).
        self.model.crash(n, step, true);
        self.keep_orphans(n);
        let sn = &mut self.nodes[n];
        sn.clients.clear();
        sn.core = None;
        sn.inc += 1;
        sn.link_gen += 1;
        sn.stopping = None;
        sn.session = None;
        if power {
            sn.disk.power_loss(&mut self.rng_disk);
            sn.meta.power_loss(&mut self.rng_disk);
        } else {
            sn.disk.process_crash();
            sn.meta.process_crash(&mut self.rng_disk);
        }
        // A killed process's kernel resets the connection; a dead machine is silent.
        self.net.crash(n, !power);
        self.wake_links();
    }

    /// Schedules deliveries every direction of every link may need.
    pub fn wake_links(&mut self) {
        let now = self.world.now;
        for id in self.net.ids() {
            for dir in 0..2 {
                if let Some(t) = self.net.wake(id, dir, now) {
                    self.world.at(t, Ev::Deliver { link: id, dir });
                }
            }
        }
    }

    /// Begins a clean stop (SIGTERM) of node `n`; it restarts `down_us` later.
    pub fn begin_stop(&mut self, n: usize) {
        if !self.alive(n) || self.nodes[n].stopping.is_some() {
            return;
        }
        self.trace_line(Some(n), || "clean stop begins".into());
        self.run_core(n, |c| c.handle(Event::StopBegin));
        let now = self.world.now;
        let sn = &mut self.nodes[n];
        sn.stopping = Some(Stopping {
            since: now,
            shut_down: false,
            flushed: false,
            waited_peer_flush: false,
        });
        for c in sn.clients.values_mut() {
            c.closing = true;
        }
        let inc = sn.inc;
        self.world.after(10_000, Ev::StopStep { node: n, inc });
    }

    pub fn stop_step(&mut self, n: usize) {
        let now = self.world.now;
        let Some(st) = self.nodes[n].stopping else {
            return;
        };
        let inc = self.nodes[n].inc;
        let sn = &self.nodes[n];
        if !st.shut_down {
            let core_idle = sn.core.as_ref().is_some_and(|c| c.is_idle());
            let ready = sn.core.as_ref().is_some_and(|c| c.stop_ready());
            let idle = core_idle && ready && sn.clients.values().all(|c| c.inflight.is_empty());
            if core_idle && !ready && !st.waited_peer_flush {
                self.stats.stop_peer_flush_waits += 1;
                if let Some(s) = self.nodes[n].stopping.as_mut() {
                    s.waited_peer_flush = true;
                }
            }
            if idle || now - st.since > 20_000_000 {
                // Clients go away with the daemon (no detach: the process exits).
                self.nodes[n].clients.clear();
                // The daemon flushes the data disk before the core persists
                // its shutdown metadata (an empty activity log). Now and then that
                // flush fails: the data stays in the cache (the exit's flush fails
                // too), and the core must keep its activity log.
                let flushed = !self.rng_disk.chance(0.1);
                if flushed {
                    self.nodes[n].disk.flush_all();
                } else {
                    self.stats.stop_flush_failures += 1;
                    self.trace_line(Some(n), || "the flush before shutdown fails".into());
                }
                self.run_core(n, |c| {
                    c.handle(Event::StopFinal {
                        data_flushed: flushed,
                    })
                });
                if let Some(s) = self.nodes[n].stopping.as_mut() {
                    s.shut_down = true;
                    s.flushed = flushed;
                    s.since = now;
                }
            }
            self.world.after(10_000, Ev::StopStep { node: n, inc });
            return;
        }
        let drained = sn.meta.is_idle() && sn.disk.is_idle();
        if !drained && now - st.since < 5_000_000 {
            self.world.after(10_000, Ev::StopStep { node: n, inc });
            return;
        }
        // Final flush, close the link, exit.
        let step = self.next_step();
        self.model.crash(n, step, false);
        let sn = &mut self.nodes[n];
        if st.flushed {
            sn.disk.flush_all();
        }
        sn.disk.process_crash();
        sn.meta.process_crash(&mut self.rng_disk);
        sn.core = None;
        sn.inc += 1;
        sn.link_gen += 1;
        sn.stopping = None;
        sn.session = None;
        for id in self.net.ids() {
            if !self.net.links[&id].closed[n] {
                self.net.close(id, n);
            }
        }
        self.wake_links();
        self.trace_line(Some(n), || "stopped cleanly".into());
        let down = self.rng_fault.range(50_000, 2_000_000);
        self.schedule_restart(n, down);
    }

    pub fn schedule_restart(&mut self, n: usize, after: u64) {
        if self.nodes[n].restart_at.is_none() {
            let t = self.world.now + after;
            self.nodes[n].restart_at = Some(t);
            self.world.at(t, Ev::Restart(n));
        }
    }

    /// Runs `f` on node `n`'s core and carries out what it asks.
    /// Feeds node `n` an event whose answer the caller waits for (as the daemon's
    /// `Shared::ask`): returns the answer action, dispatches the others. None: the
    /// node is down.
    pub fn ask(&mut self, n: usize, ev: Event) -> Option<Action> {
        let core = self.nodes[n].core.as_mut()?;
        core.handle(ev);
        let mut actions = core.take_actions();
        let at = actions
            .iter()
            .position(|a| matches!(a, Action::Attached { .. } | Action::StreamWrite { .. }));
        let answer = at.map(|i| actions.remove(i));
        assert!(
            answer.is_some(),
            "{} left a question unanswered",
            Sim::name(n)
        );
        self.dispatch(n, actions);
        self.track_session(n);
        answer
    }

    /// Client `conn` asks node `n` for the export: Some(Ok) if served.
    pub fn attach_client(&mut self, n: usize, conn: ConnId) -> Option<Result<(), String>> {
        match self.ask(n, Event::ClientAttach { conn })? {
            Action::Attached { conn: c, result } if c == conn => Some(result),
            other => panic!("ClientAttach {conn} answered with {other:?}"),
        }
    }

    pub fn run_core<R>(&mut self, n: usize, f: impl FnOnce(&mut Node) -> R) -> Option<R> {
        let core = self.nodes[n].core.as_mut()?;
        let r = f(core);
        let actions = core.take_actions();
        self.dispatch(n, actions);
        self.track_session(n);
        Some(r)
    }

    /// Keeps the links' `active` marks and the node's link generation in step
    /// with the link its core runs the peer session on; checks that the two
    /// cores never run their sessions on different links.
    fn track_session(&mut self, n: usize) {
        let now = self.nodes[n].core.as_ref().and_then(|c| c.session_link());
        if now == self.nodes[n].session {
            return;
        }
        self.nodes[n].session = now;
        self.nodes[n].link_gen += 1;
        for l in self.net.links.values_mut() {
            l.active[n] = Some(l.id) == now;
        }
        if let (Some(a), Some(b)) = (self.nodes[n].session, self.nodes[1 - n].session) {
            if a != b {
                self.violate(
                    "two sessions",
                    format!(
                        "{} runs its peer session on link {a}, {} on link {b}",
                        Sim::name(n),
                        Sim::name(1 - n)
                    ),
                );
            }
        }
    }

    pub fn admin(&mut self, n: usize, cmd: AdminCmd) {
        if !self.alive(n) || self.nodes[n].stopping.is_some() {
            return;
        }
        let id = self.next_admin;
        self.next_admin += 1;
        self.trace_line(Some(n), || format!("admin {id}: {cmd:?}"));
        if matches!(cmd, AdminCmd::Primary { force: true }) {
            self.forcing.push((id, n, self.nodes[n].inc));
        }
        self.run_core(n, |c| c.handle(Event::Admin { id, cmd }));
    }

    /// Node `n`, as it runs now, has a `primary --force` not answered yet.
    pub fn forcing_now(&self, n: usize) -> bool {
        let inc = self.nodes[n].inc;
        self.forcing.iter().any(|f| f.1 == n && f.2 == inc)
    }

    pub fn role(&self, n: usize) -> Option<Role> {
        self.nodes[n].core.as_ref().map(|c| c.role())
    }

    /// Handles one event; false when the queue is empty.
    pub fn step_once(&mut self) -> bool {
        let Some(ev) = self.world.pop() else {
            return false;
        };
        self.stats.events += 1;
        let now = self.world.now;
        super::run::note_time(now);
        self.mix(now);
        match ev {
            Ev::Tick { node, inc } => {
                if self.nodes[node].inc == inc && self.alive(node) {
                    let now_ms = (now - self.nodes[node].boot_us) / 1000;
                    let held = self.run_core(node, |c| {
                        c.handle(Event::Tick { now_ms });
                        c.status()
                            .resync
                            .and_then(|r| r.pace)
                            .and_then(|p| p.hold_bytes_per_sec)
                    });
                    self.stats.held_resync_ticks += u64::from(held.flatten().is_some());
                    self.world.after(100_000, Ev::Tick { node, inc });
                }
            }
            Ev::DiskDone { node, inc, op } => {
                self.mix(op);
                if self.nodes[node].inc == inc {
                    self.disk_done(node, op);
                }
            }
            Ev::MetaDone { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.meta_done(node);
                }
            }
            Ev::Deliver { link, dir } => {
                self.mix(link * 2 + dir as u64);
                self.deliver(link, dir);
            }
            Ev::Connect { from, inc } => {
                if self.nodes[from].inc == inc && self.alive(from) {
                    self.connect(from);
                }
            }
            Ev::Offer { link, node, inc } => {
                if self.nodes[node].inc == inc {
                    self.offer(link, node);
                } else {
                    self.stale_offer(link, node);
                }
            }
            Ev::ConnDown { link, node, inc } => {
                if self.nodes[node].inc == inc {
                    self.trace_line(Some(node), || format!("link {link}: reader ended"));
                    self.run_core(node, |c| {
                        c.handle(Event::ConnDown {
                            link,
                            reason: "closed by this node".into(),
                        })
                    });
                }
            }
            Ev::Restart(n) => {
                self.nodes[n].restart_at = None;
                if !self.alive(n) {
                    self.boot(n);
                }
            }
            Ev::StopStep { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.stop_step(node);
                }
            }
            Ev::Client { node, inc, conn } => {
                if self.nodes[node].inc == inc {
                    self.client_step(node, conn);
                }
            }
            Ev::Admin { node, cmd } => self.admin(node, cmd),
            Ev::FenceDone {
                node,
                inc,
                id,
                exit,
            } => {
                if self.nodes[node].inc == inc && self.alive(node) {
                    self.run_core(node, |c| c.handle(Event::FenceDone { id, exit }));
                }
            }
            Ev::ConnRead { node, inc, conn } => {
                if self.nodes[node].inc == inc {
                    self.conn_read(node, conn);
                }
            }
            Ev::Resend { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.resend_orphans(node);
                }
            }
            Ev::Workload => self.workload_tick(),
            Ev::Fault => self.fault_tick(),
            Ev::Operator => self.operator_tick(),
        }
        true
    }

    fn disk_done(&mut self, n: usize, op: u64) {
        let now = self.world.now;
        let Some(c) = self.nodes[n].disk.complete(op, now, &mut self.rng_disk) else {
            return;
        };
        if let Some(p) = c.problem {
            self.violate("bad disk op", format!("{} submitted {p}", NAMES[n]));
        }
        if c.result.is_err() {
            self.trace_line(Some(n), || format!("disk op {} failed (EIO)", c.core_id));
        }
        let (id, result) = (c.core_id, c.result);
        self.run_core(n, |core| core.handle(Event::DiskDone { id, result }));
    }

    fn meta_done(&mut self, n: usize) {
        // Now and then a metadata write fails (EIO) and nothing of it lands: the
        // node must fail safe (its disk fails, as DRBD detaches on a meta-data
        // I/O error).
        let ok = !self.rng_disk.chance(self.meta_fail_chance);
        let done = if ok {
            self.nodes[n].meta.complete_head()
        } else {
            self.nodes[n].meta.fail_head()
        };
        let Some((id, more)) = done else {
            return;
        };
        if !ok {
            self.stats.meta_failures += 1;
            self.trace_line(Some(n), || format!("metadata write {id} fails (EIO)"));
        }
        if more {
            let d = self.rng_disk.range(100, 3_000);
            let inc = self.nodes[n].inc;
            self.world.after(d, Ev::MetaDone { node: n, inc });
        }
        self.run_core(n, |core| core.handle(Event::MetaDone { id, ok }));
    }

    /// Node `from` dials: with the peer's daemon up and listening and the network
    /// passing, a link opens, and each side's daemon authenticates it after its own
    /// delay (so the two cores are offered it at different times, and both nodes'
    /// dials can cross).
    fn connect(&mut self, from: usize) {
        let to = 1 - from;
        let now = self.world.now;
        if !self.alive(to) || self.nodes[to].stopping.is_some() || self.net.partitioned(now) {
            self.trace_line(Some(from), || "dial fails".into());
            return;
        }
        self.net.collect();
        let id = self.net.open(from);
        self.stats.links += 1;
        self.trace_line(Some(from), || format!("link {id} connects"));
        self.schedule_offers(id);
    }

    /// Each side of a new link finishes its authentication after a delay of its
    /// own; now and then one side's never does (a half-open connection: that
    /// daemon gives up after its authentication timeout).
    pub fn schedule_offers(&mut self, link: u64) {
        for n in 0..2 {
            let inc = self.nodes[n].inc;
            if self.rng_net.chance(0.02) {
                self.trace_line(Some(n), || format!("link {link}: authentication stalls"));
                self.world.after(
                    AUTH_TIMEOUT_US,
                    Ev::Offer {
                        link,
                        node: n,
                        inc: u64::MAX,
                    },
                );
                continue;
            }
            let d = if self.rng_net.chance(0.1) {
                self.rng_net.range(5_000, 80_000)
            } else {
                self.rng_net.range(200, 3_000)
            };
            self.world.after(d, Ev::Offer { link, node: n, inc });
        }
    }

    /// Node `n`'s daemon authenticated `link` (or, with a stale `inc`, gave up on it).
    fn offer(&mut self, link: u64, n: usize) {
        let now = self.world.now;
        let Some(l) = self.net.links.get(&link) else {
            return;
        };
        if l.closed[n] || !self.alive(n) {
            return;
        }
        if self.net.partitioned(now) || self.nodes[n].stopping.is_some() {
            // Authentication cannot finish: the daemon drops the connection.
            self.trace_line(Some(n), || format!("link {link}: authentication fails"));
            self.net.close(link, n);
            self.wake_links();
            return;
        }
        let dialed = l.dialer == n;
        self.net.links.get_mut(&link).expect("link").offered[n] = true;
        self.trace_line(Some(n), || {
            format!("link {link}: offered (dialed {dialed})")
        });
        self.run_core(n, |c| c.handle(Event::ConnOffered { link, dialed }));
        self.wake_links();
    }

    /// A node that crashed or stopped while its end of `link` authenticated: the
    /// stale offer event closes that end (as the old process's exit did).
    pub fn stale_offer(&mut self, link: u64, n: usize) {
        if let Some(l) = self.net.links.get(&link) {
            if !l.closed[n] && !l.offered[n] {
                self.net.close(link, n);
                self.wake_links();
            }
        }
    }
}
