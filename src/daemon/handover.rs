//! A planned restart that keeps the NBD clients: the state one mirrord hands the next.
//!
//! The old process stops its NBD readers at a request boundary, answers everything it read,
//! persists its metadata (the clean stop path), then re-executes itself (or a new binary)
//! with these descriptors inherited: the NBD and control listeners, every open NBD client
//! connection, and the locked disk (and external metadata) files. What each connection
//! negotiated travels in a small JSON document ([`State`]) in an inherited memfd, named by
//! the environment variable [`ENV_FD`]. The new process validates it ([`State::validate`]);
//! a bad state is refused with a clear error, every inherited descriptor is closed (the
//! kernel's NBD client then sees a dead link rather than a hung one), and it starts fresh.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nbd::{ExportInfo, Negotiated};

/// Names the inherited memfd holding the [`State`] (a decimal descriptor number).
pub const ENV_FD: &str = "MIRRORD_HANDOVER_FD";
/// The format of [`State`]; a new process refuses any other.
pub const VERSION: u32 = 1;
/// Largest state document read (a few hundred bytes per connection).
const MAX_STATE: u64 = 1 << 20;

/// Everything the new process needs to go on where the old one stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    pub resource: String,
    pub node: String,
    /// The old process was primary (re-promoted before the clients are attached).
    pub primary: bool,
    /// The listening NBD socket.
    pub nbd_listener: RawFd,
    /// The listening control socket.
    pub ctl_listener: RawFd,
    /// Locked (flock) disk and external metadata files, in `exclusive::lock_disks` order.
    pub locks: Vec<RawFd>,
    pub clients: Vec<Client>,
}

/// One open NBD connection, at a request boundary, every request it sent answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub fd: RawFd,
    /// The connection's id in the old process (kept, so logs follow one connection).
    pub conn: u64,
    pub unix: bool,
    /// Who it is, for logs ("unix socket" or the TCP peer address).
    pub peer: String,
    pub export: String,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub structured_replies: bool,
    pub base_allocation_context: Option<u32>,
}

impl Client {
    pub fn new(fd: RawFd, conn: u64, unix: bool, peer: String, neg: &Negotiated) -> Client {
        let e = &neg.export;
        Client {
            fd,
            conn,
            unix,
            peer,
            export: e.name.clone(),
            size: e.size,
            flags: e.flags,
            min_block: e.min_block,
            preferred_block: e.preferred_block,
            max_block: e.max_block,
            structured_replies: neg.structured_replies,
            base_allocation_context: neg.base_allocation_context,
        }
    }

    /// What the connection negotiated, as the request loop uses it.
    pub fn negotiated(&self, description: String) -> Negotiated {
        Negotiated {
            export: ExportInfo {
                name: self.export.clone(),
                description,
                size: self.size,
                flags: self.flags,
                min_block: self.min_block,
                preferred_block: self.preferred_block,
                max_block: self.max_block,
            },
            structured_replies: self.structured_replies,
            base_allocation_context: self.base_allocation_context,
        }
    }
}

impl State {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("the hand-over state always serializes")
    }

    /// Parses and checks a state document against this process's resource and node.
    /// Descriptors are checked to be distinct and of the right kind (`fd_kind`).
    pub fn decode(text: &str, resource: &str, node: &str) -> Result<State, String> {
        let st: State = serde_json::from_str(text).map_err(|e| {
            format!("the hand-over state is not valid JSON of version {VERSION}: {e}")
        })?;
        st.validate(resource, node, fd_kind)?;
        Ok(st)
    }

    /// `kind(fd)`: what the descriptor is (a socket or a file), or why it cannot be used.
    pub fn validate(
        &self,
        resource: &str,
        node: &str,
        kind: impl Fn(RawFd) -> Result<FdKind, String>,
    ) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "hand-over state version {} (this mirrord reads version {VERSION})",
                self.version
            ));
        }
        if self.resource != resource || self.node != node {
            return Err(format!(
                "hand-over state is for resource {} node {}, this is resource {resource} node {node}",
                self.resource, self.node
            ));
        }
        if self.locks.is_empty() {
            return Err("hand-over state carries no disk lock".into());
        }
        let mut seen = HashSet::new();
        let mut check = |fd: RawFd, want: FdKind, what: &str| -> Result<(), String> {
            if fd < 3 || !seen.insert(fd) {
                return Err(format!(
                    "hand-over state: {what} has a bad or repeated descriptor {fd}"
                ));
            }
            match kind(fd) {
                Ok(k) if k == want => Ok(()),
                Ok(k) => Err(format!(
                    "hand-over state: {what} (descriptor {fd}) is a {k:?}, not a {want:?}"
                )),
                Err(e) => Err(format!("hand-over state: {what} (descriptor {fd}): {e}")),
            }
        };
        check(self.nbd_listener, FdKind::Socket, "the NBD listener")?;
        check(self.ctl_listener, FdKind::Socket, "the control listener")?;
        for &fd in &self.locks {
            check(fd, FdKind::File, "a disk lock")?;
        }
        let mut conns = HashSet::new();
        for c in &self.clients {
            let what = format!("NBD connection {}", c.conn);
            check(c.fd, FdKind::Socket, &what)?;
            if !conns.insert(c.conn) {
                return Err(format!("hand-over state: {what} appears twice"));
            }
            if c.export != resource {
                return Err(format!(
                    "hand-over state: {what} uses export {:?}",
                    c.export
                ));
            }
            let e = c.negotiated(String::new()).export;
            if !e.block_sizes_valid() || c.flags & crate::nbd::consts::NBD_FLAG_HAS_FLAGS == 0 {
                return Err(format!(
                    "hand-over state: {what} has bad block sizes or flags ({}/{}/{}, {:#x})",
                    c.min_block, c.preferred_block, c.max_block, c.flags
                ));
            }
        }
        Ok(())
    }

    /// Every descriptor the state names.
    pub fn fds(&self) -> Vec<RawFd> {
        self.named_fds().into_iter().map(|(_, fd)| fd).collect()
    }

    /// Every descriptor with its name in systemd's fd store (`FDNAME=`).
    pub fn named_fds(&self) -> Vec<(String, RawFd)> {
        let mut v = vec![
            ("nbd-listen".to_string(), self.nbd_listener),
            ("ctl-listen".to_string(), self.ctl_listener),
        ];
        v.extend(
            self.locks
                .iter()
                .enumerate()
                .map(|(i, &fd)| (format!("lock-{i}"), fd)),
        );
        v.extend(
            self.clients
                .iter()
                .map(|c| (format!("client-{}", c.conn), c.fd)),
        );
        v
    }

    /// The descriptor numbers systemd gave each name at this start (`LISTEN_FDNAMES`). A
    /// client connection systemd no longer holds (it drops one that hangs up while stored)
    /// is left out; a missing listener or lock refuses the state.
    pub fn renumber(&mut self, got: &[(String, RawFd)]) -> Result<(), String> {
        let find = |name: &str| {
            got.iter()
                .find(|(n, _)| n == name)
                .map(|&(_, fd)| fd)
                .ok_or_else(|| format!("the fd store has no {name} for the hand-over state"))
        };
        self.nbd_listener = find("nbd-listen")?;
        self.ctl_listener = find("ctl-listen")?;
        for i in 0..self.locks.len() {
            self.locks[i] = find(&format!("lock-{i}"))?;
        }
        self.clients
            .retain_mut(|c| match find(&format!("client-{}", c.conn)) {
                Ok(fd) => {
                    c.fd = fd;
                    true
                }
                Err(e) => {
                    tracing::warn!("{e}: NBD connection {} ({}) is gone", c.conn, c.peer);
                    false
                }
            });
        Ok(())
    }
}

/// The name of the state document in systemd's fd store.
pub const STATE_NAME: &str = "handover-state";

/// What systemd passed from the fd store at this start (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, descriptors from 3), taking those variables out of the environment.
/// None: nothing was passed.
pub fn take_listen_fds() -> Option<Vec<(String, RawFd)>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let n = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if pid?.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let n: RawFd = n?.parse().ok()?;
    let names: Vec<&str> = names.split(':').collect();
    Some(
        (0..n.max(0))
            .map(|i| {
                let name = names.get(i as usize).copied().unwrap_or("unknown");
                (name.to_string(), 3 + i)
            })
            .collect(),
    )
}

/// The hand-over state from systemd's fd store, its descriptors renumbered and checked.
pub fn from_fd_store(got: &[(String, RawFd)], resource: &str, node: &str) -> Result<State, String> {
    let Some(&(_, fd)) = got.iter().find(|(n, _)| n == STATE_NAME) else {
        return Err(format!(
            "systemd passed {} descriptor(s) from the fd store but no hand-over state (a crash \
             during a hand-over?)",
            got.len()
        ));
    };
    let text = read_fd(fd)?;
    let mut st: State = serde_json::from_str(&text)
        .map_err(|e| format!("the hand-over state is not valid JSON of version {VERSION}: {e}"))?;
    st.renumber(got)?;
    st.validate(resource, node, fd_kind)?;
    Ok(st)
}

/// Inherited descriptors are closed at the next exec unless handed on again (a copy that
/// leaked into the next process would keep a client's connection open after it closes).
pub fn set_cloexec(st: &State) {
    for fd in st.fds() {
        // SAFETY: sets a flag on a descriptor the validated state names as ours.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    Socket,
    File,
}

/// What an open descriptor is: a socket, or a regular file or block device.
pub fn fd_kind(fd: RawFd) -> Result<FdKind, String> {
    // SAFETY: fstat writes into a zeroed struct we own; a bad fd is an error, not UB.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("not open: {}", std::io::Error::last_os_error()));
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => Ok(FdKind::Socket),
        libc::S_IFREG | libc::S_IFBLK => Ok(FdKind::File),
        m => Err(format!("unexpected file type {m:#o}")),
    }
}

/// A copy of `fd` that survives the original being closed, close-on-exec until
/// [`exec`] clears the flag (so nothing else started meanwhile inherits it).
pub fn dup(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: plain syscall; the result is a new descriptor we then own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(format!(
            "cannot duplicate descriptor {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `n` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// The state in a memfd, at offset 0, inherited across exec.
pub fn to_memfd(st: &State) -> Result<File, String> {
    // SAFETY: a NUL-terminated name; flags 0: not close-on-exec, so the new image gets it.
    let fd = unsafe { libc::memfd_create(c"mirrord-handover".as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(st.encode().as_bytes())
        .and_then(|()| f.rewind())
        .map_err(|e| format!("writing the hand-over state: {e}"))?;
    Ok(f)
}

/// Reads the state document from the inherited descriptor `fd` (and closes it).
pub fn read_fd(fd: RawFd) -> Result<String, String> {
    if fd < 3 || fd_kind(fd) != Ok(FdKind::File) {
        return Err(format!("{ENV_FD}={fd} names no inherited state file"));
    }
    // SAFETY: the environment says the descriptor is ours, and it is an open regular file.
    let f = unsafe { File::from_raw_fd(fd) };
    let mut text = String::new();
    f.take(MAX_STATE)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the hand-over state from descriptor {fd}: {e}"))?;
    Ok(text)
}

/// What a starting mirrord inherited: None on an ordinary start. Takes [`ENV_FD`] out of
/// the environment so nothing the daemon starts (handlers) sees it.
pub fn take_inherited(resource: &str, node: &str) -> Option<Result<State, String>> {
    let v = std::env::var_os(ENV_FD)?;
    std::env::remove_var(ENV_FD);
    let fd = match v.to_str().and_then(|s| s.parse::<RawFd>().ok()) {
        Some(fd) => fd,
        None => return Some(Err(format!("{ENV_FD}={v:?} is not a descriptor number"))),
    };
    Some(read_fd(fd).and_then(|text| State::decode(&text, resource, node)))
}

/// Sends the state and its descriptors to systemd's fd store (the state last: a store
/// without it is an interrupted hand-over, refused at the next start).
pub fn store(st: &State) -> Result<(), String> {
    for (name, fd) in st.named_fds() {
        super::notify::store_fd(&name, fd)?;
    }
    let memfd = to_memfd(st)?;
    super::notify::store_fd(STATE_NAME, memfd.as_raw_fd())
}

/// A refused hand-over: closes every descriptor the old process may have passed (all but
/// stdin, stdout and stderr; nothing else is open this early), so the NBD clients see their
/// connections close instead of hanging on sockets nobody reads.
pub fn close_inherited() {
    // SAFETY: called before the daemon opens anything; closes only inherited descriptors.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        for fd in 3..1024 {
            // SAFETY: as above; EBADF for descriptors that are not open is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// A refused hand-over from systemd's fd store: closes every descriptor it passed except
/// the two listeners, returned (close-on-exec) for the fresh start to listen on. The state's
/// own descriptor is not touched (reading it already closed it).
pub fn close_all_but_listeners(got: &[(String, RawFd)]) -> Option<(OwnedFd, OwnedFd)> {
    let mut nbd = None;
    let mut ctl = None;
    for (name, fd) in got {
        // SAFETY (all three): systemd passed `fd` to us, and nothing else took it: the state
        // was refused before any descriptor it names was used.
        match name.as_str() {
            STATE_NAME => {}
            "nbd-listen" if fd_kind(*fd) == Ok(FdKind::Socket) => {
                nbd = Some(unsafe { OwnedFd::from_raw_fd(*fd) })
            }
            "ctl-listen" if fd_kind(*fd) == Ok(FdKind::Socket) => {
                ctl = Some(unsafe { OwnedFd::from_raw_fd(*fd) })
            }
            _ => unsafe {
                libc::close(*fd);
            },
        }
    }
    let (nbd, ctl) = (nbd?, ctl?);
    for fd in [&nbd, &ctl] {
        // SAFETY: sets a flag on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Some((nbd, ctl))
}

/// The binary this process runs, as installed when it started (an upgrade that replaced the
/// file is picked up by a restart through this path).
pub fn own_exe() -> Option<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    let s = p.into_os_string().into_vec();
    let s = s
        .strip_suffix(b" (deleted)")
        .map(<[u8]>::to_vec)
        .unwrap_or(s);
    Some(PathBuf::from(OsString::from_vec(s)))
}

/// Checks that `exe` can be executed, before anything is stopped for it.
pub fn check_exe(exe: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(exe)
        .map_err(|e| format!("cannot restart into {}: {e}", exe.display()))?;
    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "cannot restart into {}: not an executable file",
            exe.display()
        ));
    }
    Ok(())
}

/// Replaces this process with `exe`, same arguments, the state's descriptors inherited.
/// Returns only on failure.
pub fn exec(exe: &Path, st: &State, keep: &[OwnedFd]) -> String {
    use std::os::unix::process::CommandExt;
    for fd in keep {
        debug_assert!(
            st.fds().contains(&fd.as_raw_fd()),
            "every kept descriptor is in the state"
        );
        // SAFETY: clears close-on-exec on a descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
            return format!(
                "cannot keep descriptor {} open across exec: {}",
                fd.as_raw_fd(),
                std::io::Error::last_os_error()
            );
        }
    }
    let memfd = match to_memfd(st) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.as_os_str().to_owned());
    let err = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(ENV_FD, memfd.as_raw_fd().to_string())
        .exec();
    format!("cannot execute {}: {err}", exe.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: VERSION,
            resource: "r0".into(),
            node: "alpha".into(),
            primary: true,
            nbd_listener: 10,
            ctl_listener: 11,
            locks: vec![12],
            clients: vec![Client {
                fd: 13,
                conn: 7,
                unix: true,
                peer: "unix socket".into(),
                export: "r0".into(),
                size: 64 << 20,
                flags: crate::nbd::transmission_flags(false),
                min_block: 1,
                preferred_block: 4096,
                max_block: 32 << 20,
                structured_replies: false,
                base_allocation_context: Some(1),
            }],
        }
    }

    fn kinds(fd: RawFd) -> Result<FdKind, String> {
        match fd {
            12 => Ok(FdKind::File),
            10..=20 => Ok(FdKind::Socket),
            _ => Err("not open".into()),
        }
    }

    #[test]
    fn the_state_round_trips() {
        let st = sample();
        let back: State = serde_json::from_str(&st.encode()).expect("parses");
        assert_eq!(back, st);
        back.validate("r0", "alpha", kinds).expect("valid");
        let neg = back.clients[0].negotiated("d".into());
        assert_eq!(neg.export.size, 64 << 20);
        assert_eq!(neg.base_allocation_context, Some(1));
        assert_eq!(back.fds(), vec![10, 11, 12, 13]);
    }

    #[test]
    fn the_state_round_trips_through_a_memfd() {
        let st = sample();
        let f = to_memfd(&st).expect("memfd");
        let fd = f.as_raw_fd();
        std::mem::forget(f); // read_fd takes ownership
        let text = read_fd(fd).expect("read back");
        assert_eq!(serde_json::from_str::<State>(&text).expect("parses"), st);
    }

    #[test]
    fn a_corrupt_state_is_refused() {
        let text = sample().encode();
        let e = State::decode(&text[..text.len() / 2], "r0", "alpha").expect_err("cut short");
        assert!(e.contains("not valid JSON"), "{e}");
        let e =
            State::decode(&text.replace("\"fd\"", "\"fdx\""), "r0", "alpha").expect_err("renamed");
        assert!(e.contains("not valid JSON"), "{e}");

        type Change = fn(&mut State);
        let cases: [(&str, Change, &str); 8] = [
            ("version", |st| st.version = 2, "version 2"),
            ("resource", |st| st.resource = "r1".into(), "resource r1"),
            ("repeated fd", |st| st.clients[0].fd = 11, "repeated"),
            ("closed fd", |st| st.clients[0].fd = 99, "not open"),
            ("kind", |st| st.locks = vec![14], "not a File"),
            ("sizes", |st| st.clients[0].min_block = 3, "block sizes"),
            (
                "twice",
                |st| {
                    st.clients.push(st.clients[0].clone());
                    st.clients[1].fd = 14;
                },
                "twice",
            ),
            ("no lock", |st| st.locks.clear(), "no disk lock"),
        ];
        for (what, change, needle) in cases {
            let mut st = sample();
            change(&mut st);
            let e = st.validate("r0", "alpha", kinds).expect_err(what);
            assert!(e.contains(needle), "{what}: {e}");
        }
    }

    #[test]
    fn fd_store_names_map_back_to_the_state() {
        let st = sample();
        let names = st.named_fds();
        assert_eq!(
            names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["nbd-listen", "ctl-listen", "lock-0", "client-7"]
        );
        // systemd passes them from 3, in its own order.
        let got: Vec<(String, RawFd)> = names
            .iter()
            .rev()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), 3 + i as RawFd))
            .collect();
        let mut back = st.clone();
        back.renumber(&got).expect("all there");
        assert_eq!((back.nbd_listener, back.ctl_listener), (6, 5));
        assert_eq!((back.locks[0], back.clients[0].fd), (4, 3));
        // A client gone from the store is left out; a listener gone refuses the state.
        let mut back = st.clone();
        back.renumber(&got[1..]).expect("client left out");
        assert!(back.clients.is_empty());
        let mut back = st;
        let e = back.renumber(&got[..3]).expect_err("no listener");
        assert!(e.contains("nbd-listen"), "{e}");
    }

    #[test]
    fn a_bad_descriptor_variable_is_refused() {
        assert!(read_fd(1).is_err());
        assert!(read_fd(9999).is_err());
    }
}
