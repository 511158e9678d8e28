//! Micro-benchmark of the disk engine alone (no NBD, no network): how many operations per
//! second each backend completes, driven the way the daemon drives it (completions go through
//! a channel to another thread, which submits the next operation).
//!
//! Usage: cargo run --release --example engine_bench -- [--seconds N] [--size-mib M]
//!        [--path FILE] [--direct] [--engine uring|threads] [--only TEST-NAME-PART]
//!
//! Runs, for each engine: 4 KiB random write QD32, 4 KiB random read QD32, 4 KiB write QD1
//! (latency), 1 MiB sequential write and read QD8. The file is filled first so reads hit data.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbd_mirror::storage::engine::{Disk, DiskOp, DiskOptions, EngineKind};

struct Args {
    seconds: f64,
    size: u64,
    path: Option<PathBuf>,
    direct: bool,
    engines: Vec<EngineKind>,
    /// Run only the tests whose name contains this.
    only: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 3.0,
        size: 1 << 30,
        path: None,
        direct: false,
        engines: vec![EngineKind::Uring, EngineKind::Threads],
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--size-mib" => {
                let mib: u64 = value("--size-mib")?
                    .parse()
                    .map_err(|e| format!("--size-mib: {e}"))?;
                args.size = mib << 20;
            }
            "--path" => args.path = Some(PathBuf::from(value("--path")?)),
            "--direct" => args.direct = true,
            "--engine" => args.engines = vec![value("--engine")?.parse()?],
            "--only" => args.only = Some(value("--only")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(0.1..=600.0).contains(&args.seconds) {
        return Err("--seconds must be within 0.1..600".into());
    }
    Ok(args)
}

/// xorshift64: deterministic, allocation-free offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

struct Outcome {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    mean_latency: Duration,
    /// CPU time (user + system, all threads of this process) per operation.
    cpu_per_op: Duration,
}

/// CPU time used by this process so far (all threads, including io_uring workers).
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Keeps `depth` operations in flight for `seconds` (or until `max_ops` were submitted), then
/// drains.
fn drive(
    disk: &Disk,
    pattern: Pattern,
    block: u32,
    depth: usize,
    seconds: f64,
    max_ops: u64,
) -> Outcome {
    let (tx, rx) = mpsc::channel::<(Instant, bool)>();
    let blocks = disk.size() / u64::from(block);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut seq = 0u64;
    let payload = Bytes::from(vec![0xA5u8; block as usize]);
    let mut next_op = || {
        let index = match pattern {
            Pattern::RandWrite | Pattern::RandRead => rng.next() % blocks,
            Pattern::SeqWrite | Pattern::SeqRead => {
                seq += 1;
                (seq - 1) % blocks
            }
        };
        let offset = index * u64::from(block);
        match pattern {
            Pattern::RandWrite | Pattern::SeqWrite => DiskOp::Write {
                offset,
                data: payload.clone(),
                fua: false,
            },
            Pattern::RandRead | Pattern::SeqRead => DiskOp::Read { offset, len: block },
        }
    };
    let submit = |op: DiskOp| {
        let tx = tx.clone();
        let started = Instant::now();
        disk.submit(
            op,
            Box::new(move |r| {
                let _ = tx.send((started, r.is_ok()));
            }),
        );
    };
    let cpu_start = cpu_time();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let depth = depth.min(usize::try_from(max_ops).unwrap_or(usize::MAX));
    for _ in 0..depth {
        submit(next_op());
    }
    let mut submitted = depth as u64;
    let mut in_flight = depth;
    let mut ops = 0u64;
    let mut latency = Duration::ZERO;
    while in_flight > 0 {
        let Ok((started, ok)) = rx.recv_timeout(Duration::from_secs(30)) else {
            eprintln!("an operation took over 30 s; giving up");
            std::process::exit(1);
        };
        if !ok {
            eprintln!("an operation failed");
            std::process::exit(1);
        }
        latency += started.elapsed();
        ops += 1;
        in_flight -= 1;
        if submitted < max_ops && Instant::now() < deadline {
            submit(next_op());
            submitted += 1;
            in_flight += 1;
        }
    }
    Outcome {
        ops,
        bytes: ops * u64::from(block),
        elapsed: start.elapsed(),
        mean_latency: latency / u32::try_from(ops.max(1)).unwrap_or(u32::MAX),
        cpu_per_op: (cpu_time() - cpu_start) / u32::try_from(ops.max(1)).unwrap_or(u32::MAX),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("engine_bench: {e}");
            std::process::exit(2);
        }
    };
    let tmp;
    let path = match &args.path {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::NamedTempFile::new().expect("create a temporary file");
            tmp.path().to_owned()
        }
    };
    if Disk::device_size(&path).unwrap_or(0) < args.size {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open the bench file");
        file.set_len(args.size).expect("size the bench file");
    }
    println!(
        "file {} size {} MiB direct_io={} seconds/test={}",
        path.display(),
        args.size >> 20,
        args.direct,
        args.seconds
    );
    let mut filled = false;
    for engine in &args.engines {
        let opts = DiskOptions {
            engine: *engine,
            direct_io: args.direct,
        };
        let disk = match Disk::open(&path, Some(args.size), &opts) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("engine_bench: {e}");
                std::process::exit(1);
            }
        };
        if !filled {
            // Fill once so reads hit allocated data rather than holes.
            let chunks = disk.size() >> 20;
            let started = Instant::now();
            drive(&disk, Pattern::SeqWrite, 1 << 20, 8, 600.0, chunks);
            println!(
                "filled {} MiB in {:.1} s",
                disk.size() >> 20,
                started.elapsed().as_secs_f64()
            );
            filled = true;
        }
        println!("engine {} (running: {})", engine, disk.engine());
        let tests: [(&str, Pattern, u32, usize); 5] = [
            ("4k randwrite QD32", Pattern::RandWrite, 4096, 32),
            ("4k randread  QD32", Pattern::RandRead, 4096, 32),
            ("4k write     QD1 ", Pattern::RandWrite, 4096, 1),
            ("1M seqwrite  QD8 ", Pattern::SeqWrite, 1 << 20, 8),
            ("1M seqread   QD8 ", Pattern::SeqRead, 1 << 20, 8),
        ];
        for (name, pattern, block, depth) in tests {
            if args
                .only
                .as_ref()
                .is_some_and(|only| !name.contains(only.as_str()))
            {
                continue;
            }
            let out = drive(&disk, pattern, block, depth, args.seconds, u64::MAX);
            let secs = out.elapsed.as_secs_f64();
            println!(
                "  {name}: {:>9.0} IOPS {:>8.1} MiB/s  mean latency {:>7.1} us  cpu/op {:>6.1} us",
                out.ops as f64 / secs,
                out.bytes as f64 / secs / f64::from(1 << 20),
                out.mean_latency.as_secs_f64() * 1e6,
                out.cpu_per_op.as_secs_f64() * 1e6
            );
        }
        disk.shutdown();
    }
}
