//! The deterministic simulator with no deliberate bug: a range of seeds must
//! pass every invariant, and a seed must replay exactly.

use nbd_mirror::sim::{run_seed, Options, Outcome};

/// Runs `seeds` on all cores; returns the outcomes in seed order.
fn run_all(seeds: std::ops::Range<u64>, opts: Options) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let out = std::sync::Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end {
                    break;
                }
                let o = run_seed(seed, opts);
                out.lock().unwrap_or_else(|p| p.into_inner()).push(o);
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
    v.sort_by_key(|o| o.seed);
    v
}

/// A quick sample in the debug build (the 1,000-seed run is `make sim`, in
/// release with debug assertions, which `make test` also runs).
#[test]
fn fifty_seeds_pass_without_faults() {
    let outcomes = run_all(1..51, Options::default());
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.violation
                .as_ref()
                .map(|v| format!("seed {}: {}: {}", o.seed, v.kind, v.detail))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The runs did real work: requests, checked reads, crashes, split brains.
    let reads: u64 = outcomes.iter().map(|o| o.stats.reads_checked).sum();
    let crashes: u64 = outcomes.iter().map(|o| o.stats.crashes).sum();
    let sbs: u64 = outcomes.iter().map(|o| o.stats.split_brains).sum();
    let streamed: u64 = outcomes.iter().map(|o| o.stats.streamed).sum();
    assert!(
        reads > 1000 && crashes > 20 && sbs > 10 && streamed > 100,
        "too little exercised: {reads} reads, {crashes} crashes, {sbs} split brains, \
         {streamed} streamed writes"
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 17, 92] {
        let a = run_seed(seed, Options::default());
        let b = run_seed(seed, Options::default());
        assert_eq!(
            (a.stats.events, a.digest),
            (b.stats.events, b.digest),
            "seed {seed} did not replay"
        );
        assert!(a.stats.events > 100);
    }
    assert_ne!(
        run_seed(1, Options::default()).digest,
        run_seed(2, Options::default()).digest
    );
}
