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
//!   Below one request: a **rate hold**. One tick after the window reached
//!   one request with applications still writing (and the resync above its
//!   floor), the resync is held to a token budget of a quarter of its
//!   reference rate (its idle rate, or, for one that started under application
//!   writes, the rate it moved at one request in flight), at least the floor
//!   and at least [`MIN_PACED_RATE`]. On loopback one request in flight still moved
//!   400-850 MiB/s and took up to half of the application's IOPS
//!   (docs/BENCH.md, resync pace). The hold ends at the first tick with no
//!   application I/O, or when the resync moves less than half the held rate
//!   (the hold is not what holds it back: then the floor rule widens the
//!   window again).
//!
//!   Not steered by the application's latency: the core's clock moves on
//!   ticks only, and a latency estimated from it (Little's law: writes in the
//!   core / writes answered per second) did not rise when a resync took the
//!   application from 3443 to 1192 IOPS (2 CPUs, loopback): the requests waited
//!   for CPU before they reached the core (tools/bench/resync_bench.sh).
//! - **Fixed** (`rate = "100MiB"`): a token budget refilled each tick, at most
//!   200 ms of burst, a quarter of the cap (at least 4 MiB/s) while application
//!   requests wait; the window stays at [`MAX_WINDOW`].
//!
//! Both budgets (the fixed cap's and the adaptive hold's) keep at most 200 ms
//! of their rate, or one run of blocks (1 MiB) if that is more.

/// Resync requests in flight at most (of up to 1 MiB each): the bound of the
/// window in both modes (docs/ARCHITECTURE.md, limits).
pub(super) const MAX_WINDOW: usize = 16;
/// The adaptive window while applications write, before the floor rate
/// raises it: one request.
pub(super) const MIN_WINDOW: usize = 1;
/// The default floor rate is the idle rate divided by this (12.5%).
const IDLE_FLOOR_DIVISOR: u64 = 8;
/// The lowest rate a budget paces a resync to (bytes/s): the fixed mode's
/// back-off while application requests wait, and the adaptive hold.
const MIN_PACED_RATE: u64 = 4 << 20;
/// While applications write, a paced resync keeps this fraction (25%): of the
/// fixed cap, or of the adaptive hold's reference rate.
const BACKOFF_DIVISOR: u64 = 4;
/// A budget keeps at most this share of a second of its rate (200 ms)...
const BURST_DIVISOR: u64 = 5;
/// ...or one resync request (a run of blocks, 1 MiB), if that is more, so a
/// whole request can start.
const RUN_BYTES: u64 = super::resync::RUN_BLOCKS * super::bitmap::BLOCK;

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
    /// Adaptive mode: the rate (bytes/s) the resync is held to below one
    /// request in flight while applications write; None: not held.
    hold: Option<u64>,
    /// Fixed mode, or adaptive while held: bytes the resync may still start.
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
            hold: None,
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
        self.hold = None;
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
    /// and, in fixed mode or while held, the budget is not spent.
    pub fn may_start(&self, mode: SyncRate, inflight: usize) -> bool {
        self.check();
        inflight < self.window && (!self.budgeted(mode) || self.budget > 0)
    }

    /// A request of `bytes` started.
    pub fn started(&mut self, mode: SyncRate, bytes: u64) {
        assert!(bytes > 0, "a resync request moves something");
        assert!(
            bytes <= RUN_BYTES,
            "a resync request moves one run of blocks at most"
        );
        if self.budgeted(mode) {
            // At most one run below zero: a request starts only with budget left.
            self.budget -= bytes as i64;
            assert!(self.budget > -(RUN_BYTES as i64));
        }
    }

    /// Starts are paced by the budget: fixed mode, or adaptive while held.
    fn budgeted(&self, mode: SyncRate) -> bool {
        match mode {
            SyncRate::Fixed(_) => true,
            SyncRate::Adaptive { .. } => self.hold.is_some(),
        }
    }

    /// Adaptive: the rate the resync is held to now, if held.
    pub fn hold_rate(&self) -> Option<u64> {
        self.check();
        self.hold
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
        if let (SyncRate::Fixed(_), Some(_)) = (mode, self.hold) {
            // `mirrorctl adjust` switched to a fixed cap while held.
            self.hold = None;
        }
        let done = s.done_bytes.saturating_sub(self.last_done_bytes);
        self.last_done_bytes = s.done_bytes;
        self.rate = smooth(Some(self.rate), done * 1000 / dt);
        let app_active = answered > 0 || s.app_inflight > 0;
        match mode {
            SyncRate::Fixed(rate) => self.fixed_tick(rate, dt, s.app_inflight > 0),
            SyncRate::Adaptive { .. } => {
                self.adaptive_tick(mode, app_active, done * 1000 / dt);
                self.hold_refill(dt);
            }
        }
        self.check();
    }

    fn fixed_tick(&mut self, rate: u64, dt: u64, app_waiting: bool) {
        assert!(rate > 0, "a fixed resync rate is positive");
        self.window = MAX_WINDOW;
        let effective = if app_waiting || self.app_busy {
            (rate / BACKOFF_DIVISOR).max(MIN_PACED_RATE).min(rate)
        } else {
            rate
        };
        self.app_busy = app_waiting;
        self.refill(effective, dt);
    }

    /// Adds `dt` ms of `rate` to the budget, keeping at most 200 ms of it (or
    /// one run of blocks, if more).
    fn refill(&mut self, rate: u64, dt: u64) {
        let cap = (rate / BURST_DIVISOR).max(RUN_BYTES) as i64;
        let add = rate.saturating_mul(dt) / 1000;
        self.budget = self
            .budget
            .saturating_add(add.min(cap as u64) as i64)
            .min(cap);
        assert!(
            self.budget <= cap,
            "a budget keeps 200 ms of its rate at most"
        );
    }

    /// Adaptive: refills the hold's budget, or forgets it when not held.
    fn hold_refill(&mut self, dt: u64) {
        match self.hold {
            Some(h) => {
                assert!(h >= MIN_PACED_RATE, "the hold is at least MIN_PACED_RATE");
                assert_eq!(
                    self.window, MIN_WINDOW,
                    "held only at one request in flight"
                );
                self.refill(h, dt);
            }
            None => self.budget = 0,
        }
    }

    fn adaptive_tick(&mut self, mode: SyncRate, app_active: bool, sample: u64) {
        if !app_active {
            if self.window == MAX_WINDOW {
                self.idle_rate = Some(smooth(self.idle_rate, sample));
            }
            self.hold = None;
            self.window = (self.window * 2).min(MAX_WINDOW);
            return;
        }
        if let Some(h) = self.hold {
            assert_eq!(
                self.window, MIN_WINDOW,
                "held only at one request in flight"
            );
            if self.rate < h / 2 {
                // The hold is not what holds the resync back: release it, and
                // the floor rule widens the window from the next tick on.
                self.hold = None;
            }
            return;
        }
        let below_floor = self.floor_rate(mode).is_some_and(|f| self.rate < f);
        if below_floor {
            self.window = (self.window + 1).min(MAX_WINDOW);
        } else if self.window == MIN_WINDOW {
            let reference = self.idle_rate.unwrap_or(self.rate);
            let floor = self.floor_rate(mode).unwrap_or(0);
            let hold = (reference / BACKOFF_DIVISOR).max(floor).max(MIN_PACED_RATE);
            self.hold = Some(hold);
            self.budget = 0;
        } else {
            self.window = (self.window / 2).max(MIN_WINDOW);
        }
        assert!((MIN_WINDOW..=MAX_WINDOW).contains(&self.window));
        assert!(self.hold.is_none() || self.window == MIN_WINDOW);
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
        assert!(
            self.hold.is_none() || self.window == MIN_WINDOW,
            "the resync is held only at one request in flight"
        );
        assert!(
            self.hold.is_none_or(|h| h >= MIN_PACED_RATE),
            "a hold is at least MIN_PACED_RATE"
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
    fn one_tick_at_one_request_with_application_writes_holds_the_resync_to_a_quarter() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 20, 800 * MIB, 0, 0);
        let idle = d.c.idle_rate.expect("learned");
        // Four ticks halve the window to one request; nothing is held yet.
        d.ticks(AUTO, 4, 800 * MIB, 16, 100);
        assert_eq!(d.c.window(), MIN_WINDOW);
        assert_eq!(d.c.hold_rate(), None);
        assert!(d.c.may_start(AUTO, 0));
        // The next one holds it to a quarter of its idle rate, with one tick's budget.
        d.ticks(AUTO, 1, 800 * MIB, 16, 100);
        assert_eq!(d.c.hold_rate(), Some(idle / 4));
        assert_eq!(d.c.budget, (idle / 4 / 10) as i64);
        assert_eq!(d.c.window(), MIN_WINDOW);
        // Requests start while the budget lasts, one in flight at a time.
        let mut started = 0;
        while d.c.may_start(AUTO, 0) {
            assert!(!d.c.may_start(AUTO, 1), "still one request in flight");
            d.c.started(AUTO, MIB);
            started += 1;
            assert!(started <= 100, "the budget ends the loop");
        }
        assert_eq!(started as u64, (idle / 4 / 10).div_ceil(MIB));
        // While the resync moves what it is held to, the hold stays, and its
        // budget never keeps more than 200 ms of the held rate.
        d.ticks(AUTO, 10, idle / 4, 16, 100);
        assert_eq!(d.c.hold_rate(), Some(idle / 4));
        d.ticks(AUTO, 10, idle / 4, 1, 0);
        assert!(d.c.budget <= (idle / 4 / 5) as i64, "{}", d.c.budget);
        assert_eq!(d.c.hold_rate(), Some(idle / 4));
        // The first tick with no application I/O releases it.
        d.ticks(AUTO, 1, idle / 4, 0, 0);
        assert_eq!(d.c.hold_rate(), None);
        assert_eq!(d.c.window(), 2);
        assert!(d.c.may_start(AUTO, 1), "no budget paces an unheld resync");
    }

    #[test]
    fn a_resync_started_under_application_writes_is_held_to_a_quarter_of_its_one_request_rate() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 4, 600 * MIB, 16, 100);
        assert_eq!(d.c.window(), MIN_WINDOW);
        d.ticks(AUTO, 20, 600 * MIB, 16, 100);
        let hold = d.c.hold_rate().expect("held");
        // Its reference is the smoothed rate when it reached one request (it
        // counts from zero at the start).
        assert!(hold > 100 * MIB && hold <= 150 * MIB, "{hold}");
        assert_eq!(d.c.idle_rate, None);
    }

    #[test]
    fn a_hold_that_is_not_what_slows_the_resync_is_released_and_the_floor_widens_the_window() {
        let mut d = Drive::new();
        d.c.begin(AUTO);
        d.ticks(AUTO, 20, 800 * MIB, 0, 0);
        d.ticks(AUTO, 5, 800 * MIB, 16, 100);
        let hold = d.c.hold_rate().expect("held");
        assert_eq!(hold, d.c.idle_rate.expect("learned") / 4);
        // The disks slow down: 20 MiB/s, under half the hold and the floor.
        d.ticks(AUTO, 12, 20 * MIB, 16, 100);
        assert_eq!(d.c.hold_rate(), None);
        d.ticks(AUTO, 4, 20 * MIB, 16, 100);
        assert!(d.c.window() >= MIN_WINDOW + 3, "{}", d.c.window());
        assert_eq!(d.c.hold_rate(), None, "not held above one request");
    }

    #[test]
    fn a_configured_floor_above_a_quarter_is_the_hold_and_a_small_one_is_raised_to_min_hold() {
        let high = SyncRate::Adaptive {
            min_rate: Some(300 * MIB),
        };
        let mut d = Drive::new();
        d.c.begin(high);
        d.ticks(high, 20, 800 * MIB, 0, 0);
        d.ticks(high, 5, 800 * MIB, 16, 100);
        assert_eq!(d.c.hold_rate(), Some(300 * MIB));
        // A resync whose own rate is tiny is still held to MIN_PACED_RATE at least.
        let tiny = SyncRate::Adaptive {
            min_rate: Some(MIB),
        };
        d.c.begin(tiny);
        d.done = 0; // the new resync counts its done bytes from zero
        d.ticks(tiny, 20, 8 * MIB, 0, 0);
        d.ticks(tiny, 5, 8 * MIB, 16, 100);
        assert_eq!(d.c.hold_rate(), Some(MIN_PACED_RATE));
        // Switching to a fixed cap (mirrorctl adjust) ends the hold.
        let fixed = SyncRate::Fixed(100 * MIB);
        d.ticks(fixed, 1, 8 * MIB, 16, 100);
        assert_eq!(d.c.hold_rate(), None);
        assert_eq!(d.c.window(), MAX_WINDOW);
    }

    #[test]
    fn the_fixed_mode_spends_a_budget_and_backs_off_for_applications() {
        let fixed = SyncRate::Fixed(100 * MIB);
        let mut d = Drive::new();
        d.c.begin(fixed);
        assert_eq!(d.c.budget, (10 * MIB) as i64);
        for _ in 0..10 {
            d.c.started(fixed, MIB);
        }
        assert!(!d.c.may_start(fixed, 0), "the budget is spent");
        d.ticks(fixed, 1, 100 * MIB, 0, 0);
        assert_eq!(d.c.budget, (10 * MIB) as i64);
        d.ticks(fixed, 10, 100 * MIB, 0, 0);
        assert_eq!(d.c.budget, (20 * MIB) as i64, "200 ms of burst at most");
        assert_eq!(d.c.window(), MAX_WINDOW);
        for _ in 0..20 {
            d.c.started(fixed, MIB);
        }
        d.ticks(fixed, 1, 100 * MIB, 3, 0);
        // A quarter of the cap while application requests wait.
        assert_eq!(d.c.budget, (25 * MIB / 10) as i64);
    }
}
