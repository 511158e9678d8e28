//! Running external commands with a time bound, and finding the tools the
//! tests drive (our own binaries, Debian's python3, qemu-io, fio, ...).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished (or timed-out and killed) command left behind.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    /// `None` when the command was killed because it ran past its bound.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// A multi-line description with the command, its status and output,
    /// used in every assertion message about a command.
    pub fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => format!("{s}"),
            None => "killed after its time bound".to_string(),
        };
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            status,
            tail(&self.stdout, 200),
            tail(&self.stderr, 200)
        )
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed\n{}", self.describe());
        self
    }
}

/// Last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion or until `timeout`, whichever comes first.
/// Output goes through anonymous files, so a chatty child cannot block on a
/// full pipe and no reader threads are needed.
pub fn run(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let line = cmdline(cmd);
    let mut out = tempfile::tempfile().expect("create temp file for stdout");
    let mut err = tempfile::tempfile().expect("create temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("dup stdout file")))
        .stderr(Stdio::from(err.try_clone().expect("dup stderr file")));
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            panic!("cannot start `{line}`: {e} (is the tool installed? run tools/install-deps.sh)")
        }
    };
    let status = wait_bounded(child, timeout);
    CmdOutput {
        cmdline: line,
        status,
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    }
}

/// Like [`run`], and panics with the full output unless the command exited 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let out = run(cmd, timeout);
    out.assert_success();
    out
}

/// Waits for `child` at most `timeout`; kills it (SIGKILL) after that and
/// returns `None`.
pub fn wait_bounded(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_all(f: &mut File) -> String {
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends `sig` to `pid`. Returns false if the process no longer exists.
pub fn signal(pid: u32, sig: i32) -> bool {
    let pid = i32::try_from(pid).expect("pid fits in i32");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The binary `name` of this crate: `$MIRRORD_BIN` / `$MIRRORCTL_BIN` when
/// set (to test a release or installed build), else the one cargo built for
/// this test run.
pub fn own_binary(name: &str) -> PathBuf {
    let (var, built) = match name {
        "mirrord" => ("MIRRORD_BIN", env!("CARGO_BIN_EXE_mirrord")),
        "mirrorctl" => ("MIRRORCTL_BIN", env!("CARGO_BIN_EXE_mirrorctl")),
        other => panic!("unknown binary {other}"),
    };
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(built),
    }
}

/// Debian's python3, which has python3-libnbd (the pyenv one on PATH does
/// not). `$NBD_TEST_PYTHON` overrides.
pub fn python3() -> PathBuf {
    match std::env::var_os("NBD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/usr/bin/python3"),
    }
}

/// The python client scripts in `tests/clients/`.
pub fn client_script(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clients")
        .join(name);
    assert!(p.is_file(), "missing client script {}", p.display());
    p
}

/// Panics with an install hint unless `tool` is on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` not found on PATH; run tools/install-deps.sh (or `make test`, which does)"
    );
}

/// The resident set of process `pid`, in bytes (0 if it cannot be read).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
