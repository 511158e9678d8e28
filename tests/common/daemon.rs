//! One running server process (mirrord, or qemu-nbd as a reference) with its
//! stderr in a log file; stopped on drop (SIGTERM, then SIGKILL after a bound).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::config_toml::NbdAddr;
use super::process::{cmdline, signal, tail};

/// How long a server may take to accept NBD connections after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Daemon {
    pub label: String,
    pub cmdline: String,
    pub log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `cmd` with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(label: &str, mut cmd: Command, log: PathBuf) -> Daemon {
        let line = cmdline(&cmd);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        let _ = writeln!(f, "==== test harness: starting {line}");
        let f2: File = f.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        Daemon {
            label: label.to_string(),
            cmdline: line,
            log,
            child,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.exit = Some(s);
                false
            }
            Ok(None) => true,
            Err(e) => panic!("try_wait on {}: {e}", self.label),
        }
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let _ = self.is_running();
        self.exit
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Polls until `addr` accepts a connection; panics with the log if the
    /// process exits first or the bound passes.
    pub fn wait_ready(&mut self, addr: &NbdAddr) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let probe = Some(Duration::from_secs(2));
            let ok = match addr {
                NbdAddr::Unix(p) => UnixStream::connect(p)
                    .map(|s| {
                        let _ = s.set_read_timeout(probe);
                        let _ = s.set_write_timeout(probe);
                        polite_probe(s)
                    })
                    .is_ok(),
                NbdAddr::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_millis(500))
                    .map(|s| {
                        let _ = s.set_read_timeout(probe);
                        let _ = s.set_write_timeout(probe);
                        polite_probe(s)
                    })
                    .is_ok(),
            };
            if ok {
                return;
            }
            if !self.is_running() {
                panic!(
                    "{} exited ({:?}) before accepting NBD connections on {}\ncommand: {}\n--- log ---\n{}",
                    self.label,
                    self.exit,
                    addr.listen_value(),
                    self.cmdline,
                    tail(&self.log_text(), 100)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not accept NBD connections on {} within {:?}\n--- log ---\n{}",
                    self.label,
                    addr.listen_value(),
                    READY_TIMEOUT,
                    tail(&self.log_text(), 100)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit. Returns the
    /// exit status, or `None` if it had to be killed with SIGKILL.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if !self.is_running() {
            return self.exit;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return self.exit;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// SIGKILL (a crash, as far as the daemon is concerned).
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let status = self.child.wait().expect("wait after SIGKILL");
            self.exit = Some(status);
        }
    }
}

/// After a successful connect: read the greeting and end the session with
/// NBD_OPT_ABORT, so the probe does not show up as a client error in the
/// server's log. Best effort; the connect alone means ready.
fn polite_probe(mut s: impl Read + Write) {
    let mut greeting = [0u8; 18];
    if s.read_exact(&mut greeting).is_err() {
        return;
    }
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&1u32.to_be_bytes()); // NBD_FLAG_C_FIXED_NEWSTYLE
    m.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes()); // IHAVEOPT
    m.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    m.extend_from_slice(&0u32.to_be_bytes());
    if s.write_all(&m).is_ok() {
        let mut reply = [0u8; 20];
        let _ = s.read_exact(&mut reply);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.terminate(STOP_TIMEOUT).is_none() && self.exit.is_some() {
            eprintln!(
                "{} had to be killed with SIGKILL after SIGTERM + {:?}",
                self.label, STOP_TIMEOUT
            );
        }
    }
}
