//! `mirrorctl attach`: the thin edge around `agent.rs`. Makes the NBD
//! connections (handshake in `handshake.rs`), talks netlink
//! (`netlink_io.rs`), reads the clock and signals, and does what the agent
//! decides. Blocking and single-threaded: nothing here is on a data path.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::agent::{Action, Agent, Event, Timing};
use super::genl::{self, Msg};
use super::handshake::{block_size_for, check_same_export, ClientHandshake, ExportSeen};
use super::nbd_genl::{self, DeviceParams, Geometry};
use super::netlink_io::{wait_readable, NlSocket};
use crate::config::{Listen, Settings};

/// What `mirrorctl attach` was asked for.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// N of /dev/nbdN.
    pub index: u32,
    /// Sockets (the kernel's slots): mirrord is multi-connection safe.
    pub connections: usize,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub block_size: u32,
    /// How long the first attach waits for mirrord to accept.
    pub start_timeout: Duration,
}

/// Upper bound on `--connections` (the kernel allows more; a daemon of one
/// resource gains nothing past a few).
pub const MAX_CONNECTIONS: usize = 16;
/// Per-socket limit for connect + handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the event loop: the agent's tick.
const TICK: Duration = Duration::from_millis(100);
/// How often the loop checks that the device is still configured.
const DEVICE_CHECK: Duration = Duration::from_secs(1);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `/dev/nbd3` -> 3.
pub fn device_index(dev: &Path) -> Result<u32, String> {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: not an NBD device (/dev/nbdN)", dev.display()))
}

/// The backend identifier the kernel stores with the device (sysfs
/// `backend`); a reconfigure must give the same.
pub fn backend_id(s: &Settings) -> String {
    format!("nbd-mirror:{}:{}", s.resource, s.nbd_listen)
}

fn sysfs(index: u32, file: &str) -> std::path::PathBuf {
    Path::new("/sys/block")
        .join(format!("nbd{index}"))
        .join(file)
}

/// The device has a configuration (its receive task's pid file exists).
fn configured(index: u32) -> bool {
    sysfs(index, "pid").exists()
}

fn log(msg: &str) {
    eprintln!("mirrorctl attach: {msg}");
}

/// A blocking stream the handshake can time out on.
trait TimedStream: Read + Write + Into<OwnedFd> {
    fn timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl TimedStream for UnixStream {
    fn timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl TimedStream for TcpStream {
    fn timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Handshake on `st` with a time limit, which is lifted before the kernel
/// gets the socket (its own request timeout applies then).
fn hand_shake<S: TimedStream>(mut st: S, export: &str) -> Result<(OwnedFd, ExportSeen), String> {
    st.timeouts(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let seen = drive(&mut ClientHandshake::new(export), &mut st)?;
    st.timeouts(None)
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok((st.into(), seen))
}

/// One connection to mirrord's export, handshake done, ready for the kernel.
fn open_one(s: &Settings) -> Result<(OwnedFd, ExportSeen), String> {
    match &s.nbd_listen {
        Listen::Unix(p) => {
            let st = UnixStream::connect(p).map_err(|e| format!("connect {}: {e}", p.display()))?;
            hand_shake(st, &s.resource)
        }
        Listen::Tcp(a) => {
            let st = TcpStream::connect_timeout(a, HANDSHAKE_TIMEOUT)
                .map_err(|e| format!("connect {a}: {e}"))?;
            st.set_nodelay(true)
                .map_err(|e| format!("TCP_NODELAY: {e}"))?;
            hand_shake(st, &s.resource)
        }
    }
}

/// Runs the handshake over a blocking stream.
fn drive<S: Read + Write>(hs: &mut ClientHandshake, st: &mut S) -> Result<ExportSeen, String> {
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut chunk = [0u8; 4096];
    // Bounded by the reply sizes: a handshake is a few hundred bytes.
    for _ in 0..256 {
        let n = st
            .read(&mut chunk)
            .map_err(|e| format!("handshake read: {e}"))?;
        if n == 0 {
            return Err("mirrord closed the connection during the handshake".into());
        }
        input.extend_from_slice(&chunk[..n]);
        let done = hs.feed(&mut input)?;
        hs.take_output(&mut out);
        if !out.is_empty() {
            st.write_all(&out)
                .map_err(|e| format!("handshake write: {e}"))?;
            out.clear();
        }
        if let Some(seen) = done {
            if !input.is_empty() {
                return Err("mirrord sent bytes after the handshake".into());
            }
            return Ok(seen);
        }
    }
    Err("handshake did not end in 256 reads".into())
}

/// `n` fresh connections, all presenting `expect` (if given) and each other's export.
fn open_all(
    s: &Settings,
    n: usize,
    expect: Option<&ExportSeen>,
) -> Result<(Vec<OwnedFd>, ExportSeen), String> {
    let mut fds = Vec::with_capacity(n);
    let mut first: Option<ExportSeen> = expect.copied();
    for i in 0..n {
        let (fd, seen) = open_one(s).map_err(|e| format!("connection {}: {e}", i + 1))?;
        if let Some(f) = &first {
            check_same_export(f, &seen)?;
        }
        first.get_or_insert(seen);
        fds.push(fd);
    }
    let seen = first.ok_or("no connection asked for")?;
    Ok((fds, seen))
}

struct Ctx {
    req: NlSocket,
    family: u16,
    params: DeviceParams,
}

impl Ctx {
    fn connect(&mut self, g: &Geometry, fds: &[OwnedFd]) -> Result<(), String> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let seq = self.req.next_seq();
        let msg = nbd_genl::connect_request(self.family, seq, &self.params, g, &raw);
        let answers = self.req.request(seq, &msg, "NBD_CMD_CONNECT")?;
        let index = answers
            .iter()
            .flat_map(|a| a.iter())
            .find(|(k, _)| *k == nbd_genl::ATTR_INDEX)
            .and_then(|(_, d)| {
                d.get(..4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            });
        if let Some(i) = index {
            if i != self.params.index {
                return Err(format!(
                    "the kernel connected nbd{i}, not nbd{}",
                    self.params.index
                ));
            }
        }
        Ok(())
    }

    fn reconfigure(&mut self, fds: &[OwnedFd]) -> Result<(), String> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let seq = self.req.next_seq();
        let msg = nbd_genl::reconfigure_request(self.family, seq, &self.params, &raw);
        self.req
            .request(seq, &msg, "NBD_CMD_RECONFIGURE")
            .map(|_| ())
    }

    fn disconnect(&mut self) -> Result<(), String> {
        let seq = self.req.next_seq();
        let msg = nbd_genl::disconnect_request(self.family, seq, self.params.index);
        self.req
            .request(seq, &msg, "NBD_CMD_DISCONNECT")
            .map(|_| ())
    }
}

/// Runs the agent until stopped; returns the exit status.
pub fn run(s: &Settings, o: &AttachOptions) -> Result<u8, String> {
    assert!(o.connections >= 1 && o.connections <= MAX_CONNECTIONS);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut req = NlSocket::open(Duration::from_secs(10))?;
    let (family, group) = req.nbd_family()?;
    // Subscribed before CONNECT, so no death after it goes unseen.
    let mut events = NlSocket::open(Duration::from_secs(1))?;
    events.join(group)?;
    let params = DeviceParams {
        index: o.index,
        timeout_secs: o.timeout_secs,
        dead_conn_timeout_secs: o.dead_conn_timeout_secs,
        backend: backend_id(s),
    };
    let mut ctx = Ctx {
        req,
        family: family.id,
        params,
    };
    let timing = Timing {
        dead_conn_ms: o.dead_conn_timeout_secs * 1000,
        ..Timing::default()
    };
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;

    // Adopting a device an earlier agent attached needs one connection (its
    // export, for later checks); a fresh attach needs all of them.
    let adopt = configured(o.index);
    if adopt {
        let have = std::fs::read_to_string(sysfs(o.index, "backend")).unwrap_or_default();
        if have.trim() != ctx.params.backend {
            return Err(format!(
                "nbd{} is already in use (backend {:?}, ours {:?})",
                o.index,
                have.trim(),
                ctx.params.backend
            ));
        }
    }
    let want = if adopt { 1 } else { o.connections };
    let deadline = Instant::now() + o.start_timeout;
    // Bounded by the deadline (and a signal); each pass waits 250 ms.
    let (fds, seen) = loop {
        match open_all(s, want, None) {
            Ok(x) => break x,
            Err(e) if Instant::now() >= deadline || STOP.load(Ordering::SeqCst) => {
                return Err(format!("cannot reach mirrord's export: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    let mut agent = Agent::attached(o.index, timing);
    if adopt {
        drop(fds);
        log(&format!(
            "nbd{}: already attached to {}, adopting it",
            o.index, ctx.params.backend
        ));
        // Fill any slot that died while no agent watched.
        agent.handle(Event::Missed { now: now_ms() });
    } else {
        let g = Geometry {
            size_bytes: seen.size,
            block_size: block_size_for(&seen, o.block_size)?,
            server_flags: seen.flags,
        };
        ctx.connect(&g, &fds)?;
        drop(fds);
        log(&format!(
            "nbd{} attached: {} bytes, flags {:#x}, {} connections, timeout {} s, dead-conn-timeout {} s, backend {}",
            o.index, seen.size, seen.flags, o.connections, o.timeout_secs, o.dead_conn_timeout_secs, ctx.params.backend
        ));
    }
    let first_seen = seen;
    crate::daemon::notify::notify("READY=1");

    let mut last_check = Instant::now();
    // Runs until a signal or the device goes away; every pass waits at most one tick.
    loop {
        let mut evs = Vec::new();
        if STOP.load(Ordering::SeqCst) {
            evs.push(Event::Stop);
        }
        if wait_readable(events.raw(), TICK) {
            read_events(&mut events, now_ms(), &mut evs);
        }
        if last_check.elapsed() >= DEVICE_CHECK {
            last_check = Instant::now();
            if !configured(o.index) {
                evs.push(Event::DeviceGone);
            }
        }
        evs.push(Event::Tick { now: now_ms() });
        for ev in evs {
            if agent.ended() {
                break;
            }
            let mut todo = agent.handle(ev);
            // Actions may produce events (a round's result); bounded: a round yields one.
            for _ in 0..4 {
                let mut next = Vec::new();
                for act in todo.drain(..) {
                    match act {
                        Action::Round => {
                            let res = open_all(s, o.connections, Some(&first_seen))
                                .and_then(|(fds, _)| ctx.reconfigure(&fds));
                            let ev = match res {
                                Ok(()) => Event::RoundDone { now: now_ms() },
                                Err(why) => Event::RoundFailed { now: now_ms(), why },
                            };
                            next.extend(agent.handle(ev));
                        }
                        Action::Disconnect => match ctx.disconnect() {
                            Ok(()) => log(&format!("nbd{}: disconnected", o.index)),
                            Err(e) => log(&format!("nbd{}: {e}", o.index)),
                        },
                        Action::Exit { code, why } => {
                            log(&why);
                            return Ok(code);
                        }
                        Action::Log(m) => log(&m),
                    }
                }
                if next.is_empty() {
                    break;
                }
                todo = next;
            }
        }
    }
}

/// Drains the event socket into agent events.
fn read_events(sock: &mut NlSocket, now: u64, out: &mut Vec<Event>) {
    // Non-blocking: ends when the socket is empty; bounded in count too.
    for _ in 0..256 {
        match sock.recv() {
            Ok(Some(data)) => match genl::parse_datagram(data) {
                Ok(msgs) => {
                    for m in msgs {
                        if let Msg::Genl {
                            cmd: nbd_genl::CMD_LINK_DEAD,
                            attrs,
                            ..
                        } = m
                        {
                            if let Some(index) = nbd_genl::index_of(&attrs) {
                                out.push(Event::LinkDead { now, index });
                            }
                        }
                    }
                }
                Err(e) => log(&format!("ignoring a bad netlink event: {e}")),
            },
            Ok(None) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => out.push(Event::Missed { now }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                log(&format!("netlink event socket: {e}"));
                return;
            }
        }
    }
}
