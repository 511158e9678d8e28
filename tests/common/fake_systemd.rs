//! Just enough of systemd's service manager for a loopback test of the fd store: a
//! `$NOTIFY_SOCKET` that records notifications and keeps descriptors sent with
//! `FDSTORE=1`/`FDNAME=` (dropping them at `FDSTOREREMOVE=1`), and a start that passes the
//! stored descriptors as `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID` from descriptor 3.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Store {
    fds: Vec<(String, OwnedFd)>,
    messages: Vec<String>,
}

pub struct FakeSystemd {
    pub socket: PathBuf,
    state: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeSystemd {
    pub fn new(dir: &Path) -> FakeSystemd {
        let socket = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&socket).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let state = Arc::new(Mutex::new(Store::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                if let Some((text, fds)) = receive(&sock) {
                    apply(&mut st.lock().expect("store"), text, fds);
                }
            }
        });
        FakeSystemd {
            socket,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The names in the store, in the order they were stored.
    pub fn stored(&self) -> Vec<String> {
        let st = self.state.lock().expect("store");
        st.fds.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Puts `fd` in the store under `name`, as a service's `FDSTORE=1` would.
    pub fn put(&self, name: &str, fd: OwnedFd) {
        apply(
            &mut self.state.lock().expect("store"),
            format!("FDSTORE=1\nFDNAME={name}"),
            vec![fd],
        );
    }

    /// What `systemctl stop` does once the service is down: closes everything stored. The
    /// service's last message (`last`) is waited for first (bounded): systemd reads its
    /// notifications before it sees the process exit.
    pub fn flush(&self, last: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.messages().iter().any(|m| m.contains(last)) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {last:?} from the service"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.state.lock().expect("store").fds.clear();
    }

    pub fn messages(&self) -> Vec<String> {
        self.state.lock().expect("store").messages.clone()
    }

    /// `program` run as systemd starts a service: the stored descriptors at 3, 4, .. with
    /// their names, and `$NOTIFY_SOCKET`. systemd keeps its own copies. The returned copies
    /// must live until the command is spawned.
    pub fn start_command(
        &self,
        program: &Path,
        args: &[&std::ffi::OsStr],
    ) -> (Command, Vec<OwnedFd>) {
        let st = self.state.lock().expect("store");
        let mut high: Vec<OwnedFd> = Vec::new();
        for (_, fd) in &st.fds {
            // SAFETY: plain syscall; the copy is close-on-exec, so only the dup2 below passes it.
            let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            assert!(d >= 0, "dup a stored descriptor");
            // SAFETY: a fresh descriptor we own.
            high.push(unsafe { OwnedFd::from_raw_fd(d) });
        }
        let names: Vec<&str> = st.fds.iter().map(|(n, _)| n.as_str()).collect();
        // LISTEN_PID must be the service's own pid: the shell's, which exec keeps.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .env("NOTIFY_SOCKET", &self.socket)
            .env("LISTEN_FDS", high.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        if high.is_empty() {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        }
        let child_fds: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only dup2, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, &fd) in child_fds.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        (cmd, high)
    }
}

fn apply(st: &mut Store, text: String, fds: Vec<OwnedFd>) {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_string))
    };
    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
    if text.lines().any(|l| l == "FDSTORE=1") {
        st.fds.retain(|(n, _)| *n != name);
        for fd in fds {
            st.fds.push((name.clone(), fd));
        }
    } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
        st.fds.retain(|(n, _)| *n != name);
    }
    st.messages.push(text);
}

/// One datagram and the descriptors it carries.
fn receive(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut control = vec![0u8; 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr pointing at buffers alive for the call; the control messages
    // are walked with the CMSG macros inside the length the kernel returned.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return None;
        }
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Some((
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
            fds,
        ))
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
