//! The attach agent's decisions, sans-IO: when to make fresh connections
//! and hand them to the kernel (`NBD_CMD_RECONFIGURE`), when to give up.
//! Time comes in events (milliseconds on a monotonic clock); the edge
//! (`run.rs`) carries the actions out and reports back.
//!
//! The kernel's rules it follows (drivers/block/nbd.c, 6.1):
//! - a socket is marked dead when its receive fails (mirrord gone) or a
//!   request on it times out; each death sends one `NBD_CMD_LINK_DEAD`
//!   naming only the device;
//! - RECONFIGURE fills only slots already marked dead, in order, and
//!   ignores surplus sockets.
//!
//! So every LINK_DEAD for our device (or a lost multicast) starts a
//! "round": a fresh socket for every slot, then RECONFIGURE. A death seen
//! after a round started gets a round of its own, so no dead slot is left
//! unfilled; a round with surplus sockets costs only handshakes.

use std::fmt;

/// Delays, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Wait after the first LINK_DEAD before a round, so that the deaths
    /// of one event (all sockets close at a crash) are filled by one round.
    pub settle_ms: u64,
    /// First retry delay after a failed round (mirrord not back yet); it
    /// doubles up to `retry_max_ms`.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// The kernel's dead-connection timeout: past it, requests fail until a
    /// round succeeds; the agent says so once.
    pub dead_conn_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            settle_ms: 100,
            retry_min_ms: 100,
            retry_max_ms: 2_000,
            dead_conn_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The multicast said a socket of device `index` died.
    LinkDead {
        now: u64,
        index: u32,
    },
    /// The multicast socket overflowed (ENOBUFS): a LINK_DEAD may be lost.
    Missed {
        now: u64,
    },
    /// The round asked for is done: the kernel took the sockets.
    RoundDone {
        now: u64,
    },
    /// The round failed (no mirrord yet, handshake refused, netlink error).
    RoundFailed {
        now: u64,
        why: String,
    },
    /// The device is no longer configured (someone disconnected it).
    DeviceGone,
    /// SIGTERM / SIGINT.
    Stop,
    Tick {
        now: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Connect and hand shake a fresh socket for every slot, RECONFIGURE,
    /// report `RoundDone` or `RoundFailed`.
    Round,
    /// `NBD_CMD_DISCONNECT`, then exit.
    Disconnect,
    /// End the agent with this status.
    Exit {
        code: u8,
        why: String,
    },
    Log(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Attached,
    Reconnecting {
        since: u64,
        next_try: u64,
        failures: u32,
        warned_dead: bool,
    },
    /// A round was asked for and not yet reported.
    InRound {
        since: u64,
        failures: u32,
        warned_dead: bool,
        /// A LINK_DEAD arrived after the round began.
        again: bool,
    },
    Ended,
}

/// The state of one attached device.
#[derive(Debug)]
pub struct Agent {
    index: u32,
    timing: Timing,
    phase: Phase,
    rounds: u64,
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nbd{} {:?}", self.index, self.phase)
    }
}

impl Agent {
    /// After a successful CONNECT (or adopting a device already ours).
    pub fn attached(index: u32, timing: Timing) -> Self {
        assert!(timing.retry_min_ms > 0 && timing.retry_min_ms <= timing.retry_max_ms);
        Self {
            index,
            timing,
            phase: Phase::Attached,
            rounds: 0,
        }
    }

    pub fn is_attached(&self) -> bool {
        self.phase == Phase::Attached
    }

    pub fn ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Rounds that succeeded so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        assert!(!self.ended(), "event {ev:?} after the agent ended");
        let mut out = Vec::new();
        match ev {
            Event::LinkDead { index, .. } if index != self.index => {}
            Event::LinkDead { now, .. } | Event::Missed { now } => self.on_dead(now),
            Event::Tick { now } => self.on_tick(now, &mut out),
            Event::RoundDone { now } => self.on_round_done(now, &mut out),
            Event::RoundFailed { now, why } => self.on_round_failed(now, why, &mut out),
            Event::DeviceGone => {
                self.phase = Phase::Ended;
                out.push(Action::Exit {
                    code: 1,
                    why: format!("nbd{} was disconnected by someone else", self.index),
                });
            }
            Event::Stop => {
                self.phase = Phase::Ended;
                out.push(Action::Disconnect);
                out.push(Action::Exit {
                    code: 0,
                    why: format!("stopped: nbd{} disconnected", self.index),
                });
            }
        }
        debug_assert!(
            !matches!(self.phase, Phase::Reconnecting { since, next_try, .. } if next_try < since)
        );
        out
    }

    fn on_dead(&mut self, now: u64) {
        match &mut self.phase {
            Phase::Attached => {
                self.phase = Phase::Reconnecting {
                    since: now,
                    next_try: now + self.timing.settle_ms,
                    failures: 0,
                    warned_dead: false,
                }
            }
            Phase::InRound { again, .. } => *again = true,
            // Already waiting for a round: it will send a socket for every slot.
            Phase::Reconnecting { .. } | Phase::Ended => {}
        }
    }

    fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        let dead_ms = self.timing.dead_conn_ms;
        match &mut self.phase {
            Phase::Reconnecting {
                since,
                next_try,
                failures,
                warned_dead,
            } => {
                if !*warned_dead && now.saturating_sub(*since) >= dead_ms {
                    *warned_dead = true;
                    out.push(Action::Log(format!(
                        "nbd{}: no live connection for {} s (dead-conn-timeout): the kernel now \
                         fails requests until mirrord is back",
                        self.index,
                        dead_ms / 1000
                    )));
                }
                if now >= *next_try {
                    self.phase = Phase::InRound {
                        since: *since,
                        failures: *failures,
                        warned_dead: *warned_dead,
                        again: false,
                    };
                    out.push(Action::Round);
                }
            }
            Phase::Attached | Phase::InRound { .. } | Phase::Ended => {}
        }
    }

    fn on_round_done(&mut self, now: u64, out: &mut Vec<Action>) {
        let Phase::InRound { since, again, .. } = self.phase else {
            panic!("RoundDone without a round: {self}");
        };
        self.rounds += 1;
        out.push(Action::Log(format!(
            "nbd{}: reconfigured with fresh connections {} ms after the first dead link",
            self.index,
            now.saturating_sub(since)
        )));
        self.phase = if again {
            // A death reported during the round: its slot may still be empty.
            Phase::Reconnecting {
                since: now,
                next_try: now + self.timing.settle_ms,
                failures: 0,
                warned_dead: false,
            }
        } else {
            Phase::Attached
        };
    }

    fn on_round_failed(&mut self, now: u64, why: String, out: &mut Vec<Action>) {
        let Phase::InRound {
            since,
            failures,
            warned_dead,
            ..
        } = self.phase
        else {
            panic!("RoundFailed without a round: {self}");
        };
        let failures = failures.saturating_add(1);
        let delay = self
            .timing
            .retry_min_ms
            .saturating_mul(1u64 << (failures - 1).min(16))
            .min(self.timing.retry_max_ms);
        // The first failure and then one in ten: mirrord may take seconds to come back.
        if failures == 1 || failures % 10 == 0 {
            out.push(Action::Log(format!(
                "nbd{}: reconnect attempt {failures} failed ({why}); retrying every {} ms at most",
                self.index, self.timing.retry_max_ms
            )));
        }
        self.phase = Phase::Reconnecting {
            since,
            next_try: now + delay,
            failures,
            warned_dead,
        };
    }
}
