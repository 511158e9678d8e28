//! NBD requests by operation: how many were answered (ok or error), the bytes they
//! covered, and how long each took, from the moment it reached the node core (or, for
//! BLOCK_STATUS, the reader) to the moment its reply was handed to the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::{ConnId, IoRequest};
use crate::daemon::lock;

/// Most requests timed at once. The core answers every request it takes, and holds at most
/// about 65,536 plus one per connection (docs/ARCHITECTURE.md, "Limits"), so this is a
/// safety net: past it a request is still served, only not counted.
pub const MAX_TRACKED: usize = 1 << 17;

/// Latency buckets: 50 µs doubling up to about 6.5 s (18 buckets, then +Inf).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 18)
}

/// The NBD operations counted (NBD_CMD_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::BlockStatus,
    ];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }

    /// The operation of a request for the core, and the bytes it covers.
    pub fn of(req: &IoRequest) -> (Op, u64) {
        match req {
            IoRequest::Read { len, .. } => (Op::Read, u64::from(*len)),
            IoRequest::Write { data, .. } => (Op::Write, data.len() as u64),
            IoRequest::Flush => (Op::Flush, 0),
            IoRequest::Trim { len, .. } => (Op::Trim, u64::from(*len)),
            IoRequest::WriteZeroes { len, .. } => (Op::WriteZeroes, u64::from(*len)),
        }
    }
}

type Labels = [(&'static str, &'static str); 1];
type ResultLabels = [(&'static str, &'static str); 2];

/// One operation's series, shared with the families that encode them.
struct OpSeries {
    ok: Counter,
    error: Counter,
    bytes: Counter,
    duration: Histogram,
}

struct Started {
    op: Op,
    bytes: u64,
    at: Instant,
}

pub struct NbdRequests {
    ops: Vec<OpSeries>,
    in_flight: Gauge,
    /// Requests in the core, by (connection, the reader's number for the request).
    started: Mutex<HashMap<(ConnId, u64), Started>>,
    warned_full: AtomicBool,
}

impl NbdRequests {
    pub fn register(reg: &mut Registry) -> NbdRequests {
        let requests = Family::<ResultLabels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        let in_flight = Gauge::default();
        reg.register(
            "nbd_requests",
            "NBD requests answered, by operation and result (ok, or error: an NBD error reply)",
            requests.clone(),
        );
        reg.register(
            "nbd_request_bytes",
            "Bytes covered by the NBD requests answered (read and written, trimmed, zeroed, \
             asked about by block_status)",
            bytes.clone(),
        );
        reg.register(
            "nbd_request_duration_seconds",
            "Time from an NBD request reaching the node to its reply being queued for the client",
            duration.clone(),
        );
        reg.register(
            "nbd_requests_in_flight",
            "NBD requests the node is working on",
            in_flight.clone(),
        );
        let ops = Op::ALL
            .iter()
            .map(|op| OpSeries {
                ok: requests.get_or_create_owned(&[("op", op.name()), ("result", "ok")]),
                error: requests.get_or_create_owned(&[("op", op.name()), ("result", "error")]),
                bytes: bytes.get_or_create_owned(&[("op", op.name())]),
                duration: duration.get_or_create_owned(&[("op", op.name())]),
            })
            .collect();
        NbdRequests {
            ops,
            in_flight,
            started: Mutex::new(HashMap::new()),
            warned_full: AtomicBool::new(false),
        }
    }

    /// Request `cookie` of connection `conn` reached the core at `now`.
    pub fn started(&self, conn: ConnId, cookie: u64, op: Op, bytes: u64, now: Instant) {
        let mut started = lock(&self.started);
        if started.len() >= MAX_TRACKED {
            if !self.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "metrics: {MAX_TRACKED} NBD requests in flight; further ones are not counted"
                );
            }
            return;
        }
        if started
            .insert((conn, cookie), Started { op, bytes, at: now })
            .is_none()
        {
            self.in_flight.inc();
        }
    }

    /// Takes back a start whose request did not go the way it was counted.
    pub fn forget(&self, conn: ConnId, cookie: u64) {
        if lock(&self.started).remove(&(conn, cookie)).is_some() {
            self.in_flight.dec();
        }
    }

    /// The core answered request `cookie` of `conn` at `now` (`ok`: not an error reply).
    /// A request that was never counted as started is ignored.
    pub fn answered(&self, conn: ConnId, cookie: u64, ok: bool, now: Instant) {
        let Some(s) = lock(&self.started).remove(&(conn, cookie)) else {
            return;
        };
        self.in_flight.dec();
        self.record(s.op, s.bytes, ok, now.saturating_duration_since(s.at));
    }

    /// One answered request.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, took: Duration) {
        let s = &self.ops[op as usize];
        if ok { &s.ok } else { &s.error }.inc();
        s.bytes.inc_by(bytes);
        s.duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::prometheus_text::encode;

    fn text(reg: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, reg).expect("encode");
        s
    }

    #[test]
    fn counts_bytes_and_times_each_answered_request_by_op() {
        let mut reg = Registry::with_prefix("t");
        let m = NbdRequests::register(&mut reg);
        let t0 = Instant::now();
        m.started(1, 1, Op::Write, 4096, t0);
        m.started(1, 2, Op::Read, 512, t0);
        m.started(2, 1, Op::Write, 8192, t0);
        assert!(text(&reg).contains("t_nbd_requests_in_flight 3\n"));
        m.answered(1, 1, true, t0 + Duration::from_micros(70));
        m.answered(2, 1, false, t0 + Duration::from_millis(3));
        m.answered(1, 2, true, t0 + Duration::from_millis(1));
        // Unknown or repeated answers change nothing.
        m.answered(1, 1, true, t0);
        m.answered(9, 9, true, t0);
        let out = text(&reg);
        for line in [
            "t_nbd_requests_total{op=\"write\",result=\"ok\"} 1\n",
            "t_nbd_requests_total{op=\"write\",result=\"error\"} 1\n",
            "t_nbd_requests_total{op=\"read\",result=\"ok\"} 1\n",
            "t_nbd_requests_total{op=\"flush\",result=\"ok\"} 0\n",
            "t_nbd_request_bytes_total{op=\"write\"} 12288\n",
            "t_nbd_request_bytes_total{op=\"read\"} 512\n",
            "t_nbd_request_duration_seconds_count{op=\"write\"} 2\n",
            // 70 µs falls in the 100 µs bucket, 3 ms in none below 3.2 ms.
            "t_nbd_request_duration_seconds_bucket{op=\"write\",le=\"0.0001\"} 1\n",
            "t_nbd_request_duration_seconds_bucket{op=\"write\",le=\"0.0032\"} 2\n",
            "t_nbd_request_duration_seconds_bucket{op=\"write\",le=\"0.0016\"} 1\n",
            "t_nbd_requests_in_flight 0\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn forget_takes_a_start_back_and_the_table_is_bounded() {
        let mut reg = Registry::with_prefix("t");
        let m = NbdRequests::register(&mut reg);
        let t0 = Instant::now();
        m.started(1, 1, Op::Write, 1, t0);
        m.forget(1, 1);
        m.answered(1, 1, true, t0);
        assert!(text(&reg).contains("t_nbd_requests_total{op=\"write\",result=\"ok\"} 0\n"));
        for i in 0..MAX_TRACKED as u64 + 10 {
            m.started(7, i, Op::Flush, 0, t0);
        }
        assert_eq!(lock(&m.started).len(), MAX_TRACKED);
        assert_eq!(m.in_flight.get(), MAX_TRACKED as i64);
    }

    #[test]
    fn ops_and_bytes_of_core_requests() {
        let w = IoRequest::Write {
            offset: 0,
            data: bytes::Bytes::from(vec![0u8; 300]),
            fua: false,
        };
        assert_eq!(Op::of(&w), (Op::Write, 300));
        assert_eq!(Op::of(&IoRequest::Flush), (Op::Flush, 0));
        let z = IoRequest::WriteZeroes {
            offset: 0,
            len: 9,
            may_trim: true,
            fua: true,
        };
        assert_eq!(Op::of(&z), (Op::WriteZeroes, 9));
    }
}
