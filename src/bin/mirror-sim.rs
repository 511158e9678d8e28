//! `mirror-sim`: runs the deterministic simulator over many seeds.
//!
//!   mirror-sim --seeds 1000 [--first 1] [--threads 2] [--fault NAME]... [--no-meta-failures]
//!   mirror-sim --seed 42 --trace
//!
//! Prints one line per failing seed with the command that replays it, then
//! `N passed, M failed`. Exit status 1 if any seed failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use nbd_mirror::core::Faults;
use nbd_mirror::sim::{self, Options, Outcome};

#[derive(Parser, Debug)]
#[command(
    name = "mirror-sim",
    about = "Deterministic simulation of two nbd-mirror node cores under faults"
)]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the range.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run exactly this seed (replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every event of the run (with --seed).
    #[arg(long)]
    trace: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Turn on a deliberate core bug: ack-before-peer, clear-resync-bit-early, wrong-sync-direction, hello-keeps-old-session, meta-failure-discards-data.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Never fail a metadata write. By default one in 500 fails (EIO, nothing
    /// of the write lands) until the faults stop.
    #[arg(long)]
    no_meta_failures: bool,
    /// Run every seed twice and fail it if the two runs differ.
    #[arg(long)]
    twice: bool,
}

fn main() {
    let args = Args::parse();
    let mut faults = Faults::default();
    for f in &args.faults {
        if !sim::set_fault(&mut faults, f) {
            eprintln!(
                "mirror-sim: unknown fault `{f}` (known: {})",
                sim::FAULT_NAMES.join(", ")
            );
            std::process::exit(2);
        }
    }
    let me = std::env::args()
        .next()
        .unwrap_or_else(|| "mirror-sim".into());
    let fault_args: String = args
        .faults
        .iter()
        .map(|f| format!(" --fault {f}"))
        .chain(
            args.no_meta_failures
                .then(|| " --no-meta-failures".to_string()),
        )
        .collect();
    let (first, count) = match args.seed {
        Some(s) => (s, 1),
        None => (args.first, args.seeds),
    };
    let trace = args.trace && args.seed.is_some();
    let meta_failures = !args.no_meta_failures;
    if !trace {
        sim::quiet_panics();
    }
    let threads = args
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let end = first.saturating_add(count);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(count.max(1) as usize) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let opts = Options {
                    faults,
                    trace,
                    meta_failures,
                };
                let mut o = sim::run_seed(seed, opts);
                if args.twice && o.violation.is_none() {
                    let again = sim::run_seed(seed, opts);
                    if again.digest != o.digest || again.stats.events != o.stats.events {
                        o.violation = Some(sim::Violation {
                            time_us: 0,
                            kind: "nondeterminism".into(),
                            detail: format!(
                                "two runs differ: {} events digest {:x} vs {} events digest {:x}",
                                o.stats.events, o.digest, again.stats.events, again.digest
                            ),
                        });
                    }
                }
                results.lock().unwrap_or_else(|p| p.into_inner()).push(o);
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|o| o.seed);
    let mut failed = 0;
    let (mut events, mut sim_us, mut reads, mut crashes, mut sbs) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut streamed = 0u64;
    let (mut meta_failures, mut stop_flush_failures, mut fua_trims) = (0u64, 0u64, 0u64);
    let mut stop_peer_flush_waits = 0u64;
    let (mut trims_cut, mut trim_skipped, mut budget_seeds) = (0u64, 0u64, 0u64);
    let (mut held_ticks, mut held_seeds) = (0u64, 0u64);
    let mut meta_seeds = 0u64;
    let mut resolutions = 0u64;
    let (mut links, mut races, mut extra, mut crossed, mut resets) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut pauses, mut pauses_back, mut reissued, mut overlapping) = (0u64, 0u64, 0u64, 0u64);
    let (mut start_pauses, mut start_pauses_back) = (0u64, 0u64);
    let mut resends = sim::Stats::default();
    for o in &results {
        resends.timeouts += o.stats.timeouts;
        resends.stalls += o.stats.stalls;
        resends.crash_resends += o.stats.crash_resends;
        resends.copies += o.stats.copies;
        resends.concurrent_copies += o.stats.concurrent_copies;
        resends.stale_dropped += o.stats.stale_dropped;
        resends.replies_lost += o.stats.replies_lost;
        pauses += o.stats.pauses;
        pauses_back += o.stats.pauses_reconnected;
        start_pauses += o.stats.start_pauses;
        start_pauses_back += o.stats.start_pauses_reconnected;
        reissued += o.stats.writes_reissued;
        overlapping += o.stats.overlapping_cuts;
        links += o.stats.links;
        races += o.stats.races;
        extra += o.stats.extra_dials;
        crossed += o.stats.crossed_dials;
        resets += o.stats.handshake_resets;
        events += o.stats.events;
        sim_us += o.sim_us;
        reads += o.stats.reads_checked;
        crashes += o.stats.crashes;
        sbs += o.stats.split_brains;
        resolutions += o.stats.resolutions_checked;
        streamed += o.stats.streamed;
        meta_failures += o.stats.meta_failures;
        meta_seeds += u64::from(o.stats.meta_failures > 0);
        stop_flush_failures += o.stats.stop_flush_failures;
        stop_peer_flush_waits += o.stats.stop_peer_flush_waits;
        fua_trims += o.stats.fua_trims;
        trims_cut += o.stats.trims_cut_short;
        trim_skipped += o.stats.trim_bytes_skipped;
        budget_seeds += u64::from(o.stats.trims_cut_short > 0);
        held_ticks += o.stats.held_resync_ticks;
        held_seeds += u64::from(o.stats.held_resync_ticks > 0);
        if let Some(v) = &o.violation {
            failed += 1;
            println!(
                "seed {} FAILED at {:.6} s: {}: {}",
                o.seed,
                v.time_us as f64 / 1e6,
                v.kind,
                v.detail
            );
            println!("  replay: {me} --seed {}{fault_args} --trace", o.seed);
        }
    }
    eprintln!(
        "mirror-sim: {} seeds in {:.1} s ({} threads): {:.0} simulated s, {} events, {} reads checked, {} crashes, {} split brains, {} streamed writes",
        results.len(),
        started.elapsed().as_secs_f64(),
        threads,
        sim_us as f64 / 1e6,
        events,
        reads,
        crashes,
        sbs,
        streamed
    );
    eprintln!("mirror-sim: {resolutions} split brains resolved by policy, each winner checked against the policy");
    eprintln!(
        "mirror-sim: {links} connections, {races} sessions won a race against another connection; connection faults: {extra} extra dials, {crossed} crossed dials, {resets} resets mid-handshake"
    );
    eprintln!(
        "mirror-sim: {pauses} link pauses between two primaries, {pauses_back} ended by a reconnect, {reissued} writes issued again, {overlapping} cuts with overlapping writes in flight on both sides"
    );
    eprintln!(
        "mirror-sim: {start_pauses} start pauses of a dual-primary node (writes held until the peer), {start_pauses_back} ended by the link"
    );
    eprintln!(
        "mirror-sim: client resends: {} request timeouts, {} stalled readers, {} writes sent again after a crash; {} duplicated requests (copies sent), {} of them while another copy was in flight; {} copies read after their connection was shut (dropped), {} replies lost on shut connections",
        resends.timeouts,
        resends.stalls,
        resends.crash_resends,
        resends.copies,
        resends.concurrent_copies,
        resends.stale_dropped,
        resends.replies_lost
    );
    eprintln!(
        "mirror-sim: {meta_failures} metadata writes failed (in {meta_seeds} seeds{}), {stop_flush_failures} clean stops whose data flush failed, {stop_peer_flush_waits} clean stops that waited for the peer's flush, {fua_trims} trims and write-zeroes with FUA",
        if args.no_meta_failures {
            ", --no-meta-failures"
        } else {
            ""
        }
    );
    eprintln!(
        "mirror-sim: {trims_cut} large trims cut short by their time budget (in {budget_seeds} seeds), {trim_skipped} bytes skipped"
    );
    eprintln!(
        "mirror-sim: {held_ticks} ticks with a resync held below one request in flight (in {held_seeds} seeds)"
    );
    println!("{} passed, {} failed", results.len() - failed, failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
