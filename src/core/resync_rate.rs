//! How fast the sync source moves a resync or verify (sans-IO).
//!
//! Two modes, chosen by `[sync] rate`:
//!
//! - **Adaptive** (the default, `rate = "auto"`): no rate, a window of resync
//!   requests in flight steered once per tick. With no application write in
//!   flight or answered since the last tick the window doubles up to
//!   [`MAX_WINDOW`]: the resync fills what the link and the disks allow. While
//!   applications write it halves down to [`MIN_WINDOW`], except while the
//!   resync moves less than its floor rate (`[sync] min-rate`, or by default an
//!   eighth of the rate this resync reached with no application I/O; one that
//!   starts under application writes has none): then it grows by one. That is
//!   the rule of DRBD's c-min-rate (resync yields to application I/O while it
//!   runs above c-min-rate); DRBD's c-plan-ahead / c-fill-target controller,
//!   which steers the data in flight toward a fill target, is not copied: here
//!   the idle resync simply fills the window.
//!
//!   Not steered by the application's latency: the core's clock moves on
//!   ticks only, and a latency estimated from it (Little's law: writes in the
//!   core / writes answered per second) did not rise when a resync took the
//!   application from 3443 to 1192 IOPS (2 CPUs, loopback): the requests waited
//!   for CPU before they reached the core (tools/bench/resync_bench.sh).
//! - **Fixed** (`rate = "100MiB"`): a token budget refilled each tick, at most
//!   200 ms of burst, a quarter of the cap (at least 4 MiB/s) while application
//!   requests wait; the window stays at [`MAX_WINDOW`].

/// Resync requests in flight at most (of up to 1 MiB each): the bound of the
/// window in both modes (docs/ARCHITECTURE.md, limits).
pub(super) const MAX_WINDOW: usize = 16;
/// The adaptive window while applications write, before the floor rate
/// raises it: one request.
pub(super) const MIN_WINDOW: usize = 1;
/// The default floor rate is the idle rate divided by this (12.5%).
const IDLE_FLOOR_DIVISOR: u64 = 8;
/// The fixed mode's back-off floor while application requests wait.
const FIXED_BACKOFF_MIN: u64 = 4 << 20;

/// What the resync's pace is set by: from `[sync] rate` and `[sync] min-rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRate {
    /// Yields to application writes; the resync keeps at least
    /// `min_rate` bytes/s (None: an eighth of its measured idle rate).
    Adaptive { min_rate: Option<u64> },
    /// A cap in bytes per second.
    Fixed(u64),
}

impl SyncRate {
    pub fn name(&self) -> &'static str {
        match self {
            SyncRate::Adaptive { .. } => "adaptive",
            SyncRate::Fixed(_) => "fixed",
        }
    }
}

/// What the node saw during the tick that just ended.
#[derive(Debug, Clone, Copy)]
pub(super) struct TickSample {
    pub now_ms: u64,
    /// Application writes and flushes in flight or held now.
    pub app_inflight: u64,
    /// A resync or verify runs (this node is its source).
    pub resync_running: bool,
    /// Blocks the running resync has done so far (it counts from zero).
    pub done_bytes: u64,
}

/// The controller's state; lives as long as the node (each resync starts it
/// afresh with [`ResyncRate::begin`]).
#[derive(Debug)]
pub(super) struct ResyncRate {
    last_tick_ms: u64,
    /// Application writes answered since the last tick.
    app_answered: u64,
    /// The running resync's done bytes at the last tick.
    last_done_bytes: u64,
    /// Resync rate (bytes/s), smoothed, and its smoothed value with no
    /// application I/O at the full window (this resync's only).
    rate: u64,
    idle_rate: Option<u64>,
    window: usize,
    /// Fixed mode: bytes the resync may still start.
    budget: i64,
    /// Fixed mode: application requests waited at the last tick.
    app_busy: bool,
}

/// Exponential smoothing with weight 1/4 for the new sample.
fn smooth(old: Option<u64>, sample: u64) -> u64 {
    match old {
        None => sample,
        Some(o) => (o.saturating_mul(3) / 4).saturating_add(sample / 4),
    }
}

impl ResyncRate {
    pub fn new(now_ms: u64) -> ResyncRate {
        ResyncRate {
            last_tick_ms: now_ms,
            app_answered: 0,
            last_done_bytes: 0,
            rate: 0,
            idle_rate: None,
            window: MAX_WINDOW,
            budget: 0,
            app_busy: false,
        }
    }

    /// A resync or verify starts (or goes round again): it counts its done
    /// bytes from zero, starts at the full window, and in fixed mode with a
    /// tenth of a second's budget. Its idle rate is its own: a checksum resync
    /// of equal disks progresses at many times the rate of a full one, a
    /// scattered incremental one at a fraction (bench finding: the floor
    /// taken from a checksum resync's idle rate was the whole link, and the
    /// next full resync never yielded to the application).
    pub fn begin(&mut self, mode: SyncRate) {
        self.last_done_bytes = 0;
        self.rate = 0;
        self.idle_rate = None;
        self.window = MAX_WINDOW;
        self.budget = match mode {
            SyncRate::Fixed(rate) => (rate / 10) as i64,
            SyncRate::Adaptive { .. } => 0,
        };
        self.app_busy = false;
        self.check();
    }

    /// An application write or flush was answered.
    pub fn app_answered(&mut self) {
        self.app_answered = self.app_answered.saturating_add(1);
    }

    /// Resync requests that may be in flight now.
    pub fn window(&self) -> usize {
        self.check();
        self.window
    }

    /// Another request may start: the window has room (`inflight` below it)
    /// and, in fixed mode, the budget is not spent.
    pub fn may_start(&self, mode: SyncRate, inflight: usize) -> bool {
        self.check();
        inflight < self.window
            && match mode {
                SyncRate::Fixed(_) => self.budget > 0,
                SyncRate::Adaptive { .. } => true,
            }
    }

    /// A request of `bytes` started.
    pub fn started(&mut self, mode: SyncRate, bytes: u64) {
        assert!(bytes > 0, "a resync request moves something");
        if let SyncRate::Fixed(_) = mode {
            self.budget -= bytes as i64;
        }
    }

    /// The floor rate while applications write (adaptive mode), if known.
    pub fn floor_rate(&self, mode: SyncRate) -> Option<u64> {
        match mode {
            SyncRate::Adaptive { min_rate: Some(m) } => Some(m),
            SyncRate::Adaptive { min_rate: None } => self.idle_rate.map(|r| r / IDLE_FLOOR_DIVISOR),
            SyncRate::Fixed(_) => None,
        }
    }

    /// Once per tick: learn from what happened since the last one and set the
    /// window (and the fixed mode's budget) for the next.
    pub fn tick(&mut self, mode: SyncRate, s: TickSample) {
        self.check();
        let dt = s.now_ms.saturating_sub(self.last_tick_ms);
        if dt == 0 {
            return; // two ticks at one instant (tests): nothing to learn
        }
        self.last_tick_ms = s.now_ms;
        let answered = std::mem::take(&mut self.app_answered);
        if !s.resync_running {
            self.check();
            return;
        }
        let done = s.done_bytes.saturating_sub(self.last_done_bytes);
        self.last_done_bytes = s.done_bytes;
        self.rate = smooth(Some(self.rate), done * 1000 / dt);
        let app_active = answered > 0 || s.app_inflight > 0;
        match mode {
            SyncRate::Fixed(rate) => self.fixed_tick(rate, dt, s.app_inflight > 0),
            SyncRate::Adaptive { .. } => self.adaptive_tick(mode, app_active, done * 1000 / dt),
        }
        self.check();
    }

    fn fixed_tick(&mut self, rate: u64, dt: u64, app_waiting: bool) {
        assert!(rate > 0, "a fixed resync rate is positive");
        self.window = MAX_WINDOW;
        let effective = if app_waiting || self.app_busy {
            (rate / 4).max(FIXED_BACKOFF_MIN).min(rate)
        } else {
            rate
        };
        self.app_busy = app_waiting;
        let cap = (effective / 5) as i64; // at most 200 ms of burst
        let run = 1 << 20; // so that one whole request can start
        self.budget = (self.budget + (effective * dt / 1000) as i64).min(cap.max(run));
        assert!(self.budget <= cap.max(run));
    }

    fn adaptive_tick(&mut self, mode: SyncRate, app_active: bool, sample: u64) {
        if !app_active {
            if self.window == MAX_WINDOW {
                self.idle_rate = Some(smooth(self.idle_rate, sample));
            }
            self.window = (self.window * 2).min(MAX_WINDOW);
            return;
        }
        let below_floor = self.floor_rate(mode).is_some_and(|f| self.rate < f);
        self.window = if below_floor {
            (self.window + 1).min(MAX_WINDOW)
        } else {
            (self.window / 2).max(MIN_WINDOW)
        };
        assert!((MIN_WINDOW..=MAX_WINDOW).contains(&self.window));
    }

    fn check(&self) {
        assert!(
            (MIN_WINDOW..=MAX_WINDOW).contains(&self.window),
            "the resync window {} is inside its bounds",
            self.window
        );
        assert!(
            self.budget <= i64::MAX / 2,
            "the fixed-mode budget is bounded"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const AUTO: SyncRate = SyncRate::Adaptive { min_rate: None };

    /// Ticks of 100 ms: `rate` bytes/s done, `inflight` application writes in
    /// flight and `answered` answered per tick.
    struct Drive {
        c: ResyncRate,
        now: u64,
        done: u64,
    }

    impl Drive {
        fn new() -> Drive {
            Drive {
                c: ResyncRate::new(0),
                now: 0,
                done: 0,
            }
        }
        fn ticks(&mut self, mode: SyncRate, n: u32, rate: u64, inflight: u64, answered: u64) {
            for _ in 0..n {
                self.now += 100;
                self.done += rate / 10;
                for _ in 0..answered {
                    self.c.app_answered();
                }
                self.c.tick(
                    mode,
                    TickSample {
                        now_ms: self.now,
                        app_inflight: inflight,
                        resync_running: rate > 0,
                        done_bytes: self.done,
                    },
                );
            }
        }
    }

    #[test]
    fn an_idle_resync_keeps_the_full_window_and_learns_its_rate() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 20, 800 * MIB, 0, 0);
        assert_eq!(d.c.window(), MAX_WINDOW);
        let idle = d.c.idle_rate.expect("learned with no application I/O");
        assert!(idle > 700 * MIB && idle <= 800 * MIB, "{idle}");
        assert_eq!(d.c.floor_rate(AUTO), Some(idle / 8));
        assert!(d.c.may_start(AUTO, MAX_WINDOW - 1));
        assert!(!d.c.may_start(AUTO, MAX_WINDOW));
        // The next resync learns its own.
        d.c.begin(AUTO);
        assert_eq!(d.c.floor_rate(AUTO), None);
    }

    #[test]
    fn application_writes_shrink_the_window_and_idle_grows_it_back() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 10, 800 * MIB, 0, 0);
        assert_eq!(d.c.window(), MAX_WINDOW);
        // Writes in flight, or answered with none left in flight at the tick.
        d.ticks(AUTO, 2, 800 * MIB, 16, 800);
        d.ticks(AUTO, 2, 800 * MIB, 0, 5);
        assert_eq!(d.c.window(), MIN_WINDOW);
        // With no application I/O the window doubles back to the full one.
        d.ticks(AUTO, 5, 800 * MIB, 0, 0);
        assert_eq!(d.c.window(), MAX_WINDOW);
    }

    #[test]
    fn below_the_floor_rate_the_window_grows_despite_application_writes() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 20, 800 * MIB, 0, 0);
        d.ticks(AUTO, 5, 800 * MIB, 16, 100);
        assert_eq!(d.c.window(), MIN_WINDOW);
        // The resync drops to 50 MiB/s, under an eighth of 800: it widens.
        d.ticks(AUTO, 20, 50 * MIB, 16, 100);
        assert!(d.c.window() > MIN_WINDOW + 4, "{}", d.c.window());
        // A configured floor under the rate: the application wins again.
        let low = SyncRate::Adaptive {
            min_rate: Some(10 * MIB),
        };
        d.ticks(low, 6, 50 * MIB, 16, 100);
        assert_eq!(d.c.window(), MIN_WINDOW);
    }

    #[test]
    fn a_resync_started_under_application_writes_has_no_default_floor() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 5, 800 * MIB, 1, 10);
        assert_eq!(d.c.window(), MIN_WINDOW);
        assert_eq!(d.c.floor_rate(AUTO), None);
        assert!(d.c.may_start(AUTO, 0) && !d.c.may_start(AUTO, 1));
    }

    #[test]
    fn the_fixed_mode_spends_a_budget_and_backs_off_for_applications() {
        let fixed = SyncRate::Fixed(100 * MIB);
        let mut d = Drive::new();
        d.c.begin(fixed);
        assert_eq!(d.c.budget, (10 * MIB) as i64);
        d.c.started(fixed, 10 * MIB);
        assert!(!d.c.may_start(fixed, 0), "the budget is spent");
        d.ticks(fixed, 1, 100 * MIB, 0, 0);
        assert_eq!(d.c.budget, (10 * MIB) as i64);
        d.ticks(fixed, 10, 100 * MIB, 0, 0);
        assert_eq!(d.c.budget, (20 * MIB) as i64, "200 ms of burst at most");
        assert_eq!(d.c.window(), MAX_WINDOW);
        d.c.started(fixed, 20 * MIB);
        d.ticks(fixed, 1, 100 * MIB, 3, 0);
        // A quarter of the cap while application requests wait.
        assert_eq!(d.c.budget, (25 * MIB / 10) as i64);
    }
}
