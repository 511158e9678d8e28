//! mirrorctl: the operator's CLI for nbd-mirror.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nbd_mirror::attach;
use nbd_mirror::cli::mirrorctl::{Args, Cmd};
use nbd_mirror::config::{self, Settings};
use nbd_mirror::ctl::{CtlRequest, CtlResponse};
use nbd_mirror::daemon::setup;
use serde_json::Value;

enum Fail {
    Op(String),
    Config(String),
    Unreachable(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Op(m)) => {
            eprintln!("mirrorctl: {m}");
            ExitCode::from(1)
        }
        Err(Fail::Config(m)) => {
            eprintln!("mirrorctl: {m}");
            ExitCode::from(2)
        }
        Err(Fail::Unreachable(m)) => {
            eprintln!("mirrorctl: {m}");
            ExitCode::from(3)
        }
    }
}

fn run(args: Args) -> Result<(), Fail> {
    // gen-secret PATH with --config, or gen-secret RESOURCE PATH: the config is not read.
    if let Cmd::GenSecret { resource, path } = &args.cmd {
        let explicit = match (resource, path) {
            (_, Some(p)) => Some(p.clone()),
            (Some(p), None) if args.cfg.config.is_some() => Some(PathBuf::from(p)),
            _ => None,
        };
        if let Some(p) = explicit {
            println!("{}", setup::gen_secret(&p).map_err(Fail::Op)?);
            return Ok(());
        }
    }
    let s = config::lookup::load_for(
        args.cfg.config.as_deref(),
        args.cmd.resource(),
        args.cfg.node.as_deref(),
    )
    .map_err(|e| Fail::Config(e.to_string()))?;
    match args.cmd {
        Cmd::GenSecret { .. } => {
            let p = s.shared_secret_file.as_ref().ok_or_else(|| {
                Fail::Config(format!(
                    "config {}: key `resource.shared-secret-file`: not set; set it, or give \
                     gen-secret a path",
                    s.file.display()
                ))
            })?;
            println!("{}", setup::gen_secret(p).map_err(Fail::Op)?);
            Ok(())
        }
        Cmd::CheckConfig { .. } => {
            setup::check_secret(&s).map_err(Fail::Config)?;
            let v = serde_json::to_value(&s).map_err(|e| Fail::Op(e.to_string()))?;
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.insert("node".into(), Value::String(s.node().name.clone()));
                o.insert(
                    "control_socket".into(),
                    Value::String(s.control_socket().display().to_string()),
                );
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        Cmd::CreateMd { force, .. } => {
            let msg = setup::create_md(&s, force).map_err(Fail::Op)?;
            println!("{msg}");
            Ok(())
        }
        Cmd::DumpMd { all_ranges, .. } => {
            let v = setup::dump_md(&s, all_ranges).map_err(Fail::Op)?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        Cmd::Status { json, .. } => {
            let st = status(&s)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            } else {
                print!("{}", status_table(&st));
            }
            Ok(())
        }
        Cmd::Events { .. } => {
            let mut r = connect(&s, &CtlRequest::Events)?;
            let mut line = String::new();
            let out = std::io::stdout();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => {
                        return Err(Fail::Unreachable(
                            "the daemon closed the event stream".into(),
                        ))
                    }
                    Ok(_) => {
                        let mut o = out.lock();
                        let _ = o.write_all(line.as_bytes());
                        let _ = o.flush();
                    }
                    Err(e) => return Err(Fail::Unreachable(format!("reading events: {e}"))),
                }
            }
        }
        Cmd::Primary { force, .. } => simple(&s, CtlRequest::Primary { force }),
        Cmd::Secondary { .. } => simple(&s, CtlRequest::Secondary),
        Cmd::Connect {
            discard_my_data, ..
        } => simple(&s, CtlRequest::Connect { discard_my_data }),
        Cmd::Disconnect { .. } => simple(&s, CtlRequest::Disconnect),
        Cmd::Invalidate { .. } => simple(&s, CtlRequest::Invalidate),
        Cmd::Adjust { dry_run, .. } => simple(&s, CtlRequest::Adjust { dry_run }),
        Cmd::ResumeIo { .. } => simple(&s, CtlRequest::ResumeIo),
        Cmd::Restart { exe, timeout, .. } => restart(&s, exe, Duration::from_secs(timeout)),
        Cmd::Attach {
            device,
            connections,
            timeout,
            dead_conn_timeout,
            block_size,
            start_timeout,
            ..
        } => {
            if !(1..=attach::run::MAX_CONNECTIONS).contains(&connections) || timeout == 0 {
                return Err(Fail::Config(format!(
                    "--connections must be 1..={} and --timeout above 0",
                    attach::run::MAX_CONNECTIONS
                )));
            }
            let o = attach::run::AttachOptions {
                index: attach::run::device_index(&device).map_err(Fail::Config)?,
                connections,
                timeout_secs: timeout,
                dead_conn_timeout_secs: dead_conn_timeout,
                block_size,
                start_timeout: Duration::from_secs(start_timeout),
            };
            match attach::run::run(&s, &o).map_err(Fail::Op)? {
                0 => Ok(()),
                _ => Err(Fail::Op(format!("{} detached", device.display()))),
            }
        }
        Cmd::Resync {
            full,
            checksum,
            wait,
            ..
        } => {
            simple(&s, CtlRequest::Resync { full, checksum })?;
            if wait {
                wait_progress(&s, false)?;
            }
            Ok(())
        }
        Cmd::Verify { wait, .. } => {
            simple(&s, CtlRequest::Verify)?;
            if wait {
                wait_progress(&s, true)?;
            }
            Ok(())
        }
        Cmd::WaitSync { timeout, .. } => {
            let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout));
            loop {
                let st = status(&s)?;
                if in_sync(&st) {
                    println!("{} is connected and up to date on both nodes", s.resource);
                    return Ok(());
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Fail::Op(format!(
                        "timed out after {timeout}s: {}",
                        one_line(&st)
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// `mirrorctl restart`: the old process answers, then keeps the connection open until it
/// executes the new image (close-on-exec closes it); the first status answered after that
/// comes from the new process (the control listener is inherited, so a connection made in
/// between waits in its backlog).
fn restart(s: &Settings, exe: Option<PathBuf>, timeout: Duration) -> Result<(), Fail> {
    let deadline = Instant::now() + timeout;
    let exe = exe
        .map(|p| std::path::absolute(&p).map_err(|e| Fail::Op(format!("{}: {e}", p.display()))))
        .transpose()?;
    let mut r = connect(s, &CtlRequest::Restart { exe })?;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| Fail::Unreachable(format!("reading the answer: {e}")))?;
    let resp: CtlResponse = serde_json::from_str(&line)
        .map_err(|e| Fail::Op(format!("bad answer from the daemon: {e} ({line:?})")))?;
    let msg = resp.message.unwrap_or_default();
    if !resp.ok {
        return Err(Fail::Op(msg));
    }
    println!("{msg}");
    let _ = r.get_ref().set_read_timeout(Some(timeout));
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut r, &mut rest);
    loop {
        match status(s) {
            Ok(st) => {
                println!(
                    "restarted: {} NBD client(s) attached, {}",
                    st["nbd_clients"],
                    one_line(&st)
                );
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                let (Fail::Op(e) | Fail::Config(e) | Fail::Unreachable(e)) = e;
                return Err(Fail::Op(format!(
                    "the new mirrord did not answer within {}s: {e}",
                    timeout.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn in_sync(st: &Value) -> bool {
    let disk_ok = st["disk"] == "up-to-date";
    match st.get("peer") {
        Some(p) if !p.is_null() => {
            disk_ok
                && p["connection"] == "connected"
                && p["replication"] == "established"
                && p["disk"] == "up-to-date"
        }
        _ => disk_ok,
    }
}

fn one_line(st: &Value) -> String {
    format!(
        "role {} disk {} peer {} {} {} out-of-sync {} bytes",
        st["role"].as_str().unwrap_or("?"),
        st["disk"].as_str().unwrap_or("?"),
        st["peer"]["connection"].as_str().unwrap_or("-"),
        st["peer"]["replication"].as_str().unwrap_or("-"),
        st["peer"]["disk"].as_str().unwrap_or("-"),
        st["out_of_sync_bytes"]
    )
}

fn connect(s: &Settings, req: &CtlRequest) -> Result<BufReader<UnixStream>, Fail> {
    let path = s.control_socket();
    let mut sock = UnixStream::connect(&path).map_err(|e| {
        Fail::Unreachable(format!(
            "cannot reach mirrord for {} at {}: {e}",
            s.resource,
            path.display()
        ))
    })?;
    let mut line = serde_json::to_string(req).map_err(|e| Fail::Op(e.to_string()))?;
    line.push('\n');
    sock.write_all(line.as_bytes())
        .map_err(|e| Fail::Unreachable(format!("writing to {}: {e}", path.display())))?;
    Ok(BufReader::new(sock))
}

fn request(s: &Settings, req: &CtlRequest) -> Result<CtlResponse, Fail> {
    let mut r = connect(s, req)?;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| Fail::Unreachable(format!("reading the answer: {e}")))?;
    if line.is_empty() {
        return Err(Fail::Unreachable(
            "the daemon closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&line).map_err(|e| Fail::Op(format!("bad answer from the daemon: {e}")))
}

fn simple(s: &Settings, req: CtlRequest) -> Result<(), Fail> {
    let r = request(s, &req)?;
    let msg = r.message.unwrap_or_default();
    if r.ok {
        if !msg.is_empty() {
            println!("{msg}");
        }
        Ok(())
    } else {
        Err(Fail::Op(msg))
    }
}

fn status(s: &Settings) -> Result<Value, Fail> {
    let r = request(s, &CtlRequest::Status)?;
    match (r.ok, r.status) {
        (true, Some(v)) => Ok(v),
        _ => Err(Fail::Op(r.message.unwrap_or_else(|| "no status".into()))),
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn status_table(st: &Value) -> String {
    let mut out = String::new();
    let g = |v: &Value| v.as_str().unwrap_or("-").to_string();
    out.push_str(&format!(
        "{} role:{} node:{}\n",
        g(&st["resource"]),
        g(&st["role"]),
        g(&st["node"])
    ));
    out.push_str(&format!(
        "  disk:{} size:{} out-of-sync:{} nbd-clients:{}{}\n",
        g(&st["disk"]),
        human(st["size_bytes"].as_u64().unwrap_or(0)),
        human(st["out_of_sync_bytes"].as_u64().unwrap_or(0)),
        st["nbd_clients"],
        if st["split_brain"] == true {
            " split-brain:yes"
        } else {
            ""
        }
    ));
    if let Some(p) = st.get("peer").filter(|p| !p.is_null()) {
        out.push_str(&format!(
            "  {} connection:{}\n",
            g(&p["name"]),
            g(&p["connection"])
        ));
        out.push_str(&format!(
            "    replication:{} peer-role:{} peer-disk:{}\n",
            g(&p["replication"]),
            g(&p["role"]),
            g(&p["disk"])
        ));
    }
    if let Some(r) = st.get("resync").filter(|r| !r.is_null()) {
        let done = r["done_bytes"].as_u64().unwrap_or(0);
        let total = r["total_bytes"].as_u64().unwrap_or(0).max(1);
        out.push_str(&format!(
            "    {}: {:.1}% ({} of {}) rate:{}/s eta:{}s{}\n",
            if r["verify"] == true {
                "verify"
            } else {
                "resync"
            },
            done as f64 * 100.0 / total as f64,
            human(done),
            human(total),
            human(r["rate_bytes_per_sec"].as_u64().unwrap_or(0)),
            r["eta_seconds"],
            if r["verify"] == true {
                format!(" differing-blocks:{}", r["differing_blocks"])
            } else {
                String::new()
            }
        ));
    }
    out
}

/// Shows resync/verify progress until it ends.
fn wait_progress(s: &Settings, verify: bool) -> Result<(), Fail> {
    // A bar on a terminal (indicatif), plain progress lines otherwise.
    let bar = std::io::stdout().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#>-"),
        );
        b.set_prefix(if verify { "verify" } else { "resync" });
        b
    });
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let st = status(s)?;
        let r = &st["resync"];
        if r.is_null() {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if st["peer"]["connection"] != "connected" {
                return Err(Fail::Op(format!(
                    "the peer link went down: {}",
                    one_line(&st)
                )));
            }
            if verify {
                println!(
                    "verify finished: {} differing blocks; out-of-sync now {}",
                    st["sync"]["last_verify_differing_blocks"],
                    human(st["out_of_sync_bytes"].as_u64().unwrap_or(0))
                );
            } else {
                println!("resync finished: {}", one_line(&st));
            }
            return Ok(());
        }
        let done = r["done_bytes"].as_u64().unwrap_or(0);
        let total = r["total_bytes"].as_u64().unwrap_or(0).max(1);
        let rate = human(r["rate_bytes_per_sec"].as_u64().unwrap_or(0));
        let eta = r["eta_seconds"].as_u64().unwrap_or(0);
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done.min(total));
            b.set_message(format!("{rate}/s eta {eta}s"));
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            let pct = done as f64 * 100.0 / total as f64;
            println!("progress {pct:.1}% done {done} of {total} bytes, {rate}/s, eta {eta}s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
