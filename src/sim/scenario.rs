//! The parameters of one simulated run, all drawn from its seed: the
//! resource's configuration, how the cluster starts, and how long faults last.

use super::rng::Rng;
use crate::config::{SbPolicy, SplitBrain};
use crate::core::{CoreConfig, Faults, Protocol, SyncRate};

pub const NAMES: [&str; 2] = ["alpha", "bravo"];
const MIB: u64 = 1 << 20;

/// How the two nodes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Both up to date with the same identifiers and identical (zero) disks.
    InSync,
    /// Both freshly created (`create-md`): inconsistent, garbage on disk; the
    /// operator forces one primary.
    BothFresh,
    /// The first node is up to date, the second freshly created.
    SecondFresh,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub protocol: Protocol,
    pub two_primaries: bool,
    pub auto_promote: bool,
    pub data_size: u64,
    pub bits_per_page: u64,
    pub al_slots: usize,
    /// A fixed cap as drawn here; most seeds make it adaptive (cluster.rs).
    pub sync_rate: SyncRate,
    pub sync_checksum: bool,
    pub split_brain: SplitBrain,
    /// `resource-only` fencing (the simulated fence-peer handler answers after
    /// a random delay with a random DRBD exit code), else dont-care.
    pub fencing: bool,
    /// The workload sends trims and write-zeroes wider than the activity log
    /// (split by the node). Drawn from the seed apart from every other draw,
    /// so that the seeds without them run exactly as before they existed.
    pub large_zeroing: bool,
    /// The core's TRIM time budget and piece size (core/split.rs): the
    /// daemon's defaults, or a budget of a few ms and pieces of one extent.
    pub trim_budget_ms: u64,
    pub max_piece_extents: u64,
    /// The kernel client's request timeout, µs, when this seed has its resends
    /// (resend.rs): timeouts, stalled readers, writes sent again after a crash.
    /// Drawn apart from every other draw, as `large_zeroing`.
    pub resend_timeout_us: Option<u64>,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub timeout_ms: u64,
    pub ko_count: u64,
    pub start: Start,
    /// Simulated µs of workload with faults, then of workload without.
    pub fault_us: u64,
    pub calm_us: u64,
    /// Mean µs between two faults.
    pub fault_gap_us: u64,
    pub connect_retry_us: u64,
    /// `[net] reconnect-grace` (0 in some scenarios: no pause).
    pub reconnect_grace_ms: u64,
    /// Requests in flight per client.
    pub queue_depth: usize,
    /// Mean µs between two requests of a client.
    pub request_gap_us: u64,
    pub faults: Faults,
}

fn policy(rng: &mut Rng, options: &[&str]) -> SbPolicy {
    match *rng.pick(options) {
        "disconnect" => SbPolicy::Disconnect,
        "discard-zero-changes" => SbPolicy::DiscardZeroChanges,
        "discard-least-changes" => SbPolicy::DiscardLeastChanges,
        "discard-younger-primary" => SbPolicy::DiscardYoungerPrimary,
        "discard-older-primary" => SbPolicy::DiscardOlderPrimary,
        "discard-node" => SbPolicy::DiscardNode(rng.pick(&NAMES).to_string()),
        "discard-secondary" => SbPolicy::DiscardSecondary,
        "consensus" => SbPolicy::Consensus,
        "call-pri-lost-after-sb" => SbPolicy::CallPriLostAfterSb,
        _ => SbPolicy::ViolentlyAs0p,
    }
}

impl Scenario {
    pub fn draw(rng: &mut Rng, faults: Faults) -> Scenario {
        let protocol = match rng.below(4) {
            0 => Protocol::A,
            1 => Protocol::B,
            _ => Protocol::C,
        };
        let two_primaries = protocol == Protocol::C && rng.chance(0.3);
        // A few 4 MiB activity-log extents, a tail that is not a whole extent.
        let data_size = rng.range(6, 14) * MIB + rng.below(16) * 4096;
        let start = match rng.below(10) {
            0 => Start::BothFresh,
            1 => Start::SecondFresh,
            _ => Start::InSync,
        };
        let split_brain = SplitBrain {
            after_sb_0pri: policy(
                rng,
                &[
                    "disconnect",
                    "discard-zero-changes",
                    "discard-least-changes",
                    "discard-younger-primary",
                    "discard-older-primary",
                    "discard-node",
                ],
            ),
            after_sb_1pri: policy(
                rng,
                &[
                    "disconnect",
                    "consensus",
                    "discard-secondary",
                    "call-pri-lost-after-sb",
                    "violently-as0p",
                ],
            ),
            after_sb_2pri: policy(
                rng,
                &["disconnect", "call-pri-lost-after-sb", "violently-as0p"],
            ),
        };
        let ping_interval_ms = rng.range(200, 1500);
        Scenario {
            protocol,
            two_primaries,
            auto_promote: rng.chance(0.8),
            data_size,
            bits_per_page: 64 * rng.range(2, 16),
            al_slots: rng.range(2, 4) as usize,
            sync_rate: SyncRate::Fixed(rng.range(4, 64) * MIB),
            sync_checksum: rng.chance(0.3),
            split_brain,
            ping_interval_ms,
            ping_timeout_ms: rng.range(100, 1000),
            timeout_ms: rng.range(300, 3000),
            ko_count: rng.range(2, 6),
            start,
            fault_us: rng.range(5, 25) * 1_000_000,
            calm_us: rng.range(1, 4) * 1_000_000,
            fault_gap_us: rng.range(200_000, 2_000_000),
            connect_retry_us: rng.range(50_000, 700_000),
            reconnect_grace_ms: if rng.chance(0.25) {
                0
            } else {
                rng.range(300, 4_000)
            },
            queue_depth: rng.range(1, 8) as usize,
            request_gap_us: rng.range(500, 20_000),
            faults,
            // Drawn last: earlier draws (and so older seeds' other choices) stay.
            fencing: rng.chance(0.3),
            large_zeroing: false,
            trim_budget_ms: crate::core::TRIM_BUDGET_MS,
            max_piece_extents: crate::core::MAX_PIECE_EXTENTS,
            resend_timeout_us: None,
        }
    }

    pub fn core_config(&self, node: usize) -> CoreConfig {
        CoreConfig {
            resource: "r0".into(),
            node: NAMES[node].into(),
            peer: Some(NAMES[1 - node].into()),
            data_size: self.data_size,
            protocol: self.protocol,
            allow_two_primaries: self.two_primaries,
            auto_promote: self.auto_promote,
            al_slots: self.al_slots,
            bitmap_bits_per_page: self.bits_per_page,
            sync_rate: self.sync_rate,
            sync_checksum: self.sync_checksum,
            split_brain: self.split_brain.clone(),
            fencing: if self.fencing {
                crate::config::Fencing::ResourceOnly
            } else {
                crate::config::Fencing::DontCare
            },
            ping_interval_ms: self.ping_interval_ms,
            connect_retry_ms: self.connect_retry_us / 1000,
            reconnect_grace_ms: self.reconnect_grace_ms,
            ping_timeout_ms: self.ping_timeout_ms,
            timeout_ms: self.timeout_ms,
            ko_count: self.ko_count,
            max_io: 32 << 20,
            trim_budget_ms: self.trim_budget_ms,
            max_piece_extents: self.max_piece_extents,
        }
    }

    /// Longest a request may wait for its reply (simulated µs).
    pub fn reply_bound_us(&self) -> u64 {
        let peer = self.timeout_ms * self.ko_count
            + self.ping_interval_ms
            + self.ping_timeout_ms
            + self.reconnect_grace_ms;
        (2 * peer + 10_000) * 1000
    }
}
