//! A deliberately minimal NBD client over raw sockets, written from the
//! protocol document (NetworkBlockDevice/nbd doc/proto.md), independent of
//! the crate's own codec, for sending well-formed and malformed messages.
//! Only simple replies (no structured replies are negotiated).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::config_toml::NbdAddr;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Every read on a raw connection gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// What `NBD_OPT_GO` told us.
#[derive(Debug, Clone, Default)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) if the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A simple reply header (the READ payload, if any, is read separately).
#[derive(Debug, Clone, Copy)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// How a connection ended when we waited for the server to close it.
#[derive(Debug)]
pub enum Ending {
    /// EOF or reset without the server sending anything more.
    Closed,
    /// The server sent these bytes and then closed.
    SentThenClosed(Vec<u8>),
    /// Still open (nothing or something received) when the bound passed.
    StillOpen(Vec<u8>),
}

pub struct RawConn {
    s: Stream,
}

impl RawConn {
    pub fn connect(addr: &NbdAddr) -> RawConn {
        let s = match addr {
            NbdAddr::Unix(p) => Stream::Unix(
                UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display())),
            ),
            NbdAddr::Tcp(a) => {
                let t = TcpStream::connect_timeout(a, IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect {a}: {e}"));
                t.set_nodelay(true).expect("TCP_NODELAY");
                Stream::Tcp(t)
            }
        };
        s.set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("set write timeout");
        RawConn { s }
    }

    /// A second handle on the same connection: one thread can read replies
    /// while another sends (socket options are shared).
    pub fn try_clone(&self) -> RawConn {
        let s = match &self.s {
            Stream::Unix(u) => Stream::Unix(u.try_clone().expect("clone the unix socket")),
            Stream::Tcp(t) => Stream::Tcp(t.try_clone().expect("clone the TCP socket")),
        };
        RawConn { s }
    }

    /// Read timeout for what follows (IO_TIMEOUT is the default).
    pub fn set_read_timeout(&mut self, d: Duration) {
        self.s.set_read_timeout(Some(d)).expect("set read timeout");
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Write timeout for what follows (IO_TIMEOUT is the default).
    pub fn set_write_timeout(&mut self, d: Duration) {
        self.s
            .set_write_timeout(Some(d))
            .expect("set write timeout");
    }

    /// One write of at most `bytes.len()` bytes: how many the socket took.
    pub fn send_some(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.s.write(bytes)
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// Waits until at most `left` bytes sent on this connection are still unread by the
    /// server (TCP: our send queue and its receive queue, from /proc/net/tcp; Unix: our
    /// send queue, SIOCOUTQ): the server's
    /// reader has taken the rest. Panics after `within`.
    pub fn wait_until_unread_at_most(&self, left: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let unread = match &self.s {
                Stream::Tcp(tcp) => {
                    let me = tcp.local_addr().expect("local address").port();
                    let server = tcp.peer_addr().expect("peer address").port();
                    tcp_queued(me, server, true) + tcp_queued(server, me, false)
                }
                // A Unix stream socket's send queue is what the peer has not read yet
                // (in bytes of buffer, a little above the data).
                Stream::Unix(u) => unix_outq(u),
            };
            if unread <= left {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server left {unread} bytes unread for {within:?} (waiting for {left})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn recv_u16(&mut self) -> io::Result<u16> {
        let b = self.recv_exact(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn recv_u32(&mut self) -> io::Result<u32> {
        let b = self.recv_exact(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn recv_u64(&mut self) -> io::Result<u64> {
        let b = self.recv_exact(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }

    /// Reads the server greeting; returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let m1 = self.recv_u64().expect("greeting: NBDMAGIC");
        let m2 = self.recv_u64().expect("greeting: IHAVEOPT");
        assert_eq!(m1, NBDMAGIC, "greeting magic");
        assert_eq!(m2, IHAVEOPT, "greeting: not newstyle");
        let flags = self.recv_u16().expect("greeting: handshake flags");
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server must offer fixed newstyle (flags {flags:#x})"
        );
        flags
    }

    /// Greeting plus our client flags (fixed newstyle, and no-zeroes if offered).
    pub fn start_options(&mut self) {
        let hflags = self.read_greeting();
        let mut c = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            c |= FLAG_C_NO_ZEROES;
        }
        self.send(&c.to_be_bytes()).expect("send client flags");
    }

    /// Option header with an arbitrary claimed length, then `data` (which
    /// may be shorter or longer than `claimed_len`).
    pub fn send_option_raw(
        &mut self,
        option: u32,
        claimed_len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&claimed_len.to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let len = u32::try_from(data.len()).expect("option data fits u32");
        self.send_option_raw(option, len, data)
            .expect("send option");
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let magic = self.recv_u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply magic {magic:#x}"),
            ));
        }
        let option = self.recv_u32()?;
        let reply_type = self.recv_u32()?;
        let len = self.recv_u32()?;
        assert!(len <= 1 << 20, "server option reply claims {len} bytes");
        let data = self.recv_exact(len as usize)?;
        Ok(OptReply {
            option,
            reply_type,
            data,
        })
    }

    /// Data of NBD_OPT_GO / NBD_OPT_INFO asking for NBD_INFO_BLOCK_SIZE.
    pub fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d
    }

    /// Sends GO (or INFO) for `name` and reads replies up to the final one.
    /// Ok(export) on NBD_REP_ACK, Err(final error reply) otherwise.
    pub fn go_or_info(&mut self, option: u32, name: &str) -> Result<Export, OptReply> {
        self.send_option(option, &Self::go_data(name));
        let mut ex = Export::default();
        let mut have_export = false;
        for _ in 0..64 {
            let r = self.read_option_reply().expect("read GO/INFO reply");
            assert_eq!(r.option, option, "reply echoes the option");
            match r.reply_type {
                REP_INFO => {
                    assert!(r.data.len() >= 2, "NBD_REP_INFO shorter than 2 bytes");
                    let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if kind == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&r.data[2..10]);
                        ex.size = u64::from_be_bytes(s);
                        ex.flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        have_export = true;
                    } else if kind == INFO_BLOCK_SIZE {
                        assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                        let g = |i: usize| {
                            u32::from_be_bytes([
                                r.data[i],
                                r.data[i + 1],
                                r.data[i + 2],
                                r.data[i + 3],
                            ])
                        };
                        ex.block_size = Some((g(2), g(6), g(10)));
                    }
                }
                REP_ACK => {
                    assert!(have_export, "NBD_REP_ACK without NBD_INFO_EXPORT");
                    return Ok(ex);
                }
                _ => return Err(r),
            }
        }
        panic!("more than 64 replies to one GO/INFO");
    }

    /// Full handshake into transmission for `name`; panics on refusal.
    pub fn handshake(addr: &NbdAddr, name: &str) -> (RawConn, Export) {
        let mut c = RawConn::connect(addr);
        c.start_options();
        match c.go_or_info(OPT_GO, name) {
            Ok(ex) => (c, ex),
            Err(r) => panic!(
                "GO {name} refused: type {:#x}, message {:?}",
                r.reply_type,
                String::from_utf8_lossy(&r.data)
            ),
        }
    }

    /// Sends one request header (+ `payload`, which the caller sizes).
    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.send(&request_bytes(flags, kind, cookie, offset, len, payload))
    }

    pub fn read_simple_reply(&mut self) -> io::Result<SimpleReply> {
        let magic = self.recv_u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply magic {magic:#x} (not a simple reply)"),
            ));
        }
        let error = self.recv_u32()?;
        let cookie = self.recv_u64()?;
        Ok(SimpleReply { error, cookie })
    }

    /// One request, one simple reply; for a successful READ also its payload.
    /// Returns (error, payload).
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        let cookie = 0x1000_0000_0000_0000 | offset.wrapping_add(u64::from(kind));
        self.send_request(flags, kind, cookie, offset, len, payload)
            .expect("send request");
        let r = self.read_simple_reply().unwrap_or_else(|e| {
            panic!("no reply to command {kind} flags {flags:#x} offset {offset} len {len}: {e}")
        });
        assert_eq!(r.cookie, cookie, "reply cookie must echo the request's");
        let data = if kind == CMD_READ && r.error == 0 {
            self.recv_exact(len as usize).expect("read payload")
        } else {
            Vec::new()
        };
        (r.error, data)
    }

    pub fn read_at(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (err, data) = self.request(0, CMD_READ, offset, len, &[]);
        assert_eq!(
            err, 0,
            "READ offset {offset} len {len} failed with error {err}"
        );
        data
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) {
        let len = u32::try_from(data.len()).expect("write fits u32");
        let (err, _) = self.request(0, CMD_WRITE, offset, len, data);
        assert_eq!(
            err, 0,
            "WRITE offset {offset} len {len} failed with error {err}"
        );
    }

    /// A WRITE with NBD_CMD_FLAG_FUA.
    pub fn write_fua_at(&mut self, offset: u64, data: &[u8]) {
        let len = u32::try_from(data.len()).expect("write fits u32");
        let (err, _) = self.request(1, CMD_WRITE, offset, len, data);
        assert_eq!(
            err, 0,
            "FUA WRITE offset {offset} len {len} failed with error {err}"
        );
    }

    pub fn flush(&mut self) {
        let (err, _) = self.request(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(err, 0, "FLUSH failed with error {err}");
    }

    /// Polite end of the transmission phase.
    pub fn disconnect(mut self) {
        let _ = self.send_request(0, CMD_DISC, 0, 0, 0, &[]);
    }

    /// Reads until EOF, an error, or `bound` passes, collecting what arrives.
    pub fn wait_for_close(&mut self, bound: Duration) -> Ending {
        let deadline = Instant::now() + bound;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let _ = self.s.set_read_timeout(Some(Duration::from_millis(200)));
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break, // reset counts as closed
            }
            if Instant::now() >= deadline {
                let _ = self.s.set_read_timeout(Some(IO_TIMEOUT));
                return Ending::StillOpen(got);
            }
        }
        let _ = self.s.set_read_timeout(Some(IO_TIMEOUT));
        if got.is_empty() {
            Ending::Closed
        } else {
            Ending::SentThenClosed(got)
        }
    }
}

/// One request header (+ `payload`, which the caller sizes) as bytes on the wire.
pub fn request_bytes(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + payload.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// The send (`tx`) or receive queue of the loopback TCP socket from port `local` to port
/// `remote`, as /proc/net/tcp and /proc/net/tcp6 show it (0 when there is no such socket).
fn tcp_queued(local: u16, remote: u16, tx: bool) -> u64 {
    let port =
        |field: &str| -> Option<u16> { u16::from_str_radix(field.rsplit(':').next()?, 16).ok() };
    let mut total = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 || port(f[1]) != Some(local) || port(f[2]) != Some(remote) {
                continue;
            }
            let (txq, rxq) = f[4]
                .split_once(':')
                .expect("tx_queue:rx_queue in /proc/net/tcp");
            let q = if tx { txq } else { rxq };
            total += u64::from_str_radix(q, 16).expect("hex queue length in /proc/net/tcp");
        }
    }
    total
}

/// Bytes sent on `u` that the peer has not read yet (SIOCOUTQ).
fn unix_outq(u: &UnixStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int through the pointer; `u` keeps the fd open.
    let rc = unsafe { libc::ioctl(u.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "SIOCOUTQ: {}", io::Error::last_os_error());
    u64::try_from(n).expect("a queue length is not negative")
}
