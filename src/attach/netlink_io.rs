//! The netlink sockets of the attach agent: a request socket (ask, wait
//! for the acknowledgement) and an event socket subscribed to the NBD
//! multicast group. Bytes are built and read by `genl.rs`/`nbd_genl.rs`;
//! this file only moves them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::genl::{self, Attr, Family, Msg};
use super::nbd_genl;

/// Receive buffer for one datagram; the kernel's answers here are small.
const RECV_BUF: usize = 64 * 1024;

/// The attributes of one answer, owned: (type, payload) pairs.
pub type OwnedAttrs = Vec<(u16, Vec<u8>)>;

pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn errno(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

impl NlSocket {
    pub fn open(recv_timeout: Duration) -> Result<Self, String> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(errno("netlink socket"));
        }
        // SAFETY: raw is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zero means "kernel picks the port".
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr outlives the call and its size is passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(errno("netlink bind"));
        }
        let tv = libc::timeval {
            tv_sec: recv_timeout.as_secs() as libc::time_t,
            tv_usec: recv_timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv outlives the call and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r < 0 {
            return Err(errno("netlink SO_RCVTIMEO"));
        }
        Ok(Self {
            fd,
            seq: 1,
            buf: vec![0; RECV_BUF],
        })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> Result<(), String> {
        // SAFETY: sockaddr_nl zeroed addresses the kernel (port 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and to outlive the call; lengths are passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &to as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 || n as usize != msg.len() {
            return Err(errno("netlink send"));
        }
        Ok(())
    }

    /// One datagram; `Ok(None)` on timeout.
    pub fn recv(&mut self) -> Result<Option<&[u8]>, io::Error> {
        // SAFETY: buf is ours and its length is passed.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(&self.buf[..n as usize]))
    }

    /// Sends `msg` (built with sequence `seq` and NLM_F_ACK), waits for the
    /// acknowledgement; returns the attributes of the answers before it.
    pub fn request(&mut self, seq: u32, msg: &[u8], what: &str) -> Result<Vec<OwnedAttrs>, String> {
        self.send(msg).map_err(|e| format!("{what}: {e}"))?;
        let mut answers = Vec::new();
        // Bounded: each datagram is one recv with the socket's timeout.
        for _ in 0..64 {
            let data = match self.recv() {
                Ok(Some(d)) => d,
                Ok(None) => return Err(format!("{what}: no answer from the kernel")),
                Err(e) => return Err(format!("{what}: netlink receive: {e}")),
            };
            for m in genl::parse_datagram(data).map_err(|e| format!("{what}: {e}"))? {
                match m {
                    Msg::Error { seq: s, errno } if s == seq => {
                        return if errno == 0 {
                            Ok(answers)
                        } else {
                            Err(format!("{what}: {}", io::Error::from_raw_os_error(-errno)))
                        };
                    }
                    Msg::Genl { seq: s, attrs, .. } if s == seq => {
                        answers.push(attrs.iter().map(|a| (a.kind, a.data.to_vec())).collect());
                    }
                    _ => {}
                }
            }
        }
        Err(format!("{what}: no acknowledgement in 64 datagrams"))
    }

    /// The NBD family and its multicast group.
    pub fn nbd_family(&mut self) -> Result<(Family, u32), String> {
        let seq = self.next_seq();
        let msg = genl::get_family_request(seq, nbd_genl::FAMILY_NAME);
        let answers = self
            .request(seq, &msg, "looking up the nbd netlink family")
            .map_err(|e| format!("{e} (is the nbd module loaded? `modprobe nbd`)"))?;
        let raw = answers.first().ok_or("the controller sent no family")?;
        let attrs: Vec<Attr<'_>> = raw
            .iter()
            .map(|(k, d)| Attr { kind: *k, data: d })
            .collect();
        let fam = genl::parse_family(&attrs)?;
        let group = fam
            .group(nbd_genl::MCAST_GROUP)
            .ok_or_else(|| format!("the nbd family has no {} group", nbd_genl::MCAST_GROUP))?;
        Ok((fam, group))
    }

    /// Subscribes to a multicast group and makes receives non-blocking.
    pub fn join(&self, group: u32) -> Result<(), String> {
        // SAFETY: group outlives the call; its size is passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                &group as *const u32 as *const libc::c_void,
                4,
            )
        };
        if r < 0 {
            return Err(errno("joining the nbd multicast group"));
        }
        // SAFETY: fcntl on our own descriptor.
        let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if r < 0 {
            return Err(errno("netlink O_NONBLOCK"));
        }
        Ok(())
    }
}

/// Waits up to `timeout` for `fd` to be readable; false on timeout or a signal.
pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(60_000) as i32) };
    n > 0
}
