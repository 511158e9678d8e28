//! Faults and the operator. While faults are on, every so often one of: a
//! silent partition, a connection reset, a corrupted frame, a node crash (power
//! loss or killed process) with a restart later, a clean restart, a window of
//! disk errors or slow disk I/O, or an operator command (disconnect and
//! reconnect, resync, verify, invalidate). The operator also repairs what an
//! operator would: a failed disk gets its node restarted.

use super::cluster::{Ev, Phase, Sim};
use crate::core::{AdminCmd, DiskState, Role};

impl Sim {
    pub fn fault_tick(&mut self) {
        if self.phase != Phase::Faults {
            return;
        }
        let now = self.now();
        let n = self.rng_fault.below(2) as usize;
        if self.rng_fault.chance(0.3) {
            self.connection_fault(n);
        }
        let roll = self.rng_fault.below(100);
        match roll {
            0..=14 => {
                let d = self.rng_fault.range(50_000, 4_000_000);
                self.net.partition_until = self.net.partition_until.max(now + d);
                self.trace_line(None, || format!("FAULT partition for {} ms", d / 1000));
            }
            15..=22 => {
                self.trace_line(None, || "FAULT connection reset".into());
                for id in self.net.ids() {
                    self.net.reset(id);
                }
                self.wake_links();
            }
            23..=30 => {
                self.trace_line(None, || {
                    format!("FAULT corrupt the next frame from {}", Sim::name(n))
                });
                self.net.corrupt_next[n] = true;
            }
            31..=44 => {
                if self.alive(n) {
                    let power = self.rng_fault.chance(0.6);
                    let down = self.rng_fault.range(100_000, 6_000_000);
                    self.crash(n, power);
                    self.schedule_restart(n, down);
                }
            }
            45..=50 => {
                self.trace_line(Some(n), || "FAULT clean restart".into());
                self.begin_stop(n);
            }
            51..=60 => {
                let p = self.rng_fault.range(1, 30) as f64 / 100.0;
                let d = self.rng_fault.range(50_000, 1_500_000);
                self.trace_line(Some(n), || {
                    format!("FAULT disk errors p={p} for {} ms", d / 1000)
                });
                let disk = &mut self.nodes[n].disk;
                disk.err_prob = p;
                disk.err_until = now + d;
            }
            61..=68 => {
                let slow = self.rng_fault.range(10_000, 200_000);
                let d = self.rng_fault.range(200_000, 3_000_000);
                self.trace_line(Some(n), || {
                    format!("FAULT slow disk (+{} ms) for {} ms", slow / 1000, d / 1000)
                });
                let disk = &mut self.nodes[n].disk;
                disk.slow_us = slow;
                disk.slow_until = now + d;
            }
            69..=75 => {
                let back = self.rng_fault.range(100_000, 3_000_000);
                self.admin(n, AdminCmd::Disconnect);
                self.world.after(
                    back,
                    Ev::Admin {
                        node: n,
                        cmd: AdminCmd::Connect {
                            discard_my_data: false,
                        },
                    },
                );
            }
            76..=81 => {
                let (full, checksum) = (self.rng_fault.chance(0.3), self.rng_fault.chance(0.5));
                self.admin(n, AdminCmd::Resync { full, checksum });
            }
            82..=87 => self.admin(n, AdminCmd::Verify),
            88..=90 => {
                let idle =
                    self.nodes[n].clients.is_empty() && self.role(n) == Some(Role::Secondary);
                if idle && self.alive(1 - n) {
                    self.admin(n, AdminCmd::Invalidate);
                    if self.nodes[n]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.disk_state() == DiskState::Inconsistent)
                    {
                        self.nodes[n].invalidated = true;
                    }
                }
            }
            _ => {
                // Move the clients: close every session, prefer the other node.
                self.favourite = 1 - self.favourite;
                for sn in self.nodes.iter_mut() {
                    for c in sn.clients.values_mut() {
                        c.close_at = now;
                    }
                }
            }
        }
        let gap = self.sc.fault_gap_us;
        let next = self.rng_fault.range(gap / 4, gap * 2);
        self.world.after(next, Ev::Fault);
    }

    /// The ways connections meet in the daemon: a stray extra dial (as a retry
    /// that crosses a link coming up, also while a resync, verify or split-brain
    /// resolution runs), both nodes dialing at the same moment, and a connection
    /// reset in the middle of its Hello exchange or handshake.
    fn connection_fault(&mut self, n: usize) {
        match self.rng_fault.below(3) {
            0 => {
                self.trace_line(Some(n), || "FAULT an extra dial".into());
                self.stats.extra_dials += 1;
                let inc = self.nodes[n].inc;
                self.world.after(0, Ev::Connect { from: n, inc });
            }
            1 => {
                self.trace_line(None, || "FAULT both nodes dial at once".into());
                self.stats.crossed_dials += 1;
                for m in 0..2 {
                    let inc = self.nodes[m].inc;
                    let d = self.rng_fault.range(0, 500);
                    self.world.after(d, Ev::Connect { from: m, inc });
                }
            }
            _ => {
                // A connection that is not yet both sides' session.
                let young: Vec<u64> = self
                    .net
                    .links
                    .values()
                    .filter(|l| !(l.active[0] && l.active[1]) || self.in_handshake())
                    .map(|l| l.id)
                    .collect();
                if let Some(id) = young.first() {
                    self.trace_line(None, || format!("FAULT link {id} reset mid-handshake"));
                    self.stats.handshake_resets += 1;
                    self.net.reset(*id);
                    self.wake_links();
                }
            }
        }
    }

    /// Whether a node's session is still in its handshake (before the sync decision).
    fn in_handshake(&self) -> bool {
        (0..2).any(|n| {
            self.nodes[n]
                .core
                .as_ref()
                .is_some_and(|c| c.session_link().is_some() && c.in_handshake())
        })
    }

    pub fn operator_tick(&mut self) {
        self.check_liveness();
        let oldest_read = self
            .nodes
            .iter()
            .flat_map(|n| n.clients.values())
            .flat_map(|c| c.inflight.values())
            .filter(|r| matches!(r.kind, super::cluster::ReqKind::Read { .. }))
            .map(|r| r.issue)
            .min()
            .unwrap_or(u64::MAX);
        self.model.prune(oldest_read);
        let now = self.now();
        for n in 0..2 {
            if let Some(since) = self.nodes[n].failed_since {
                let failed = self.nodes[n]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.disk_state() == DiskState::Failed);
                if !failed {
                    self.nodes[n].failed_since = None;
                } else if now - since > 1_000_000 {
                    self.trace_line(Some(n), || {
                        "operator restarts the node with the failed disk".into()
                    });
                    self.begin_stop(n);
                }
            }
            // Writes frozen by fencing that the handler did not lift (it failed,
            // or could not reach the peer): the operator runs resume-io.
            let suspended = self.status(n).is_some_and(|s| s.suspended);
            match (suspended, self.nodes[n].suspended_since) {
                (false, _) => self.nodes[n].suspended_since = None,
                (true, None) => self.nodes[n].suspended_since = Some(now),
                (true, Some(since)) if now - since > 3_000_000 => {
                    self.trace_line(Some(n), || "operator runs resume-io".into());
                    self.nodes[n].suspended_since = None;
                    self.admin(n, AdminCmd::ResumeIo);
                }
                (true, Some(_)) => {}
            }
            if !self.alive(n) && self.nodes[n].restart_at.is_none() {
                self.schedule_restart(n, 100_000);
            }
        }
        if self.phase == Phase::Settle {
            self.settle_tick();
        }
        self.world.after(250_000, Ev::Operator);
    }
}
