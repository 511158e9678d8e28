//! Malformed and hostile NBD input over raw sockets. Each test checks the
//! answer the NBD protocol document requires (or the choices it allows),
//! then that the daemon still runs and a fresh client reads the data
//! written before the bad input.

mod common;

use std::time::Duration;

use common::nbd_wire::*;
use common::{pattern, Cluster, ClusterSpec, NbdAddr, ServerKind, EXPORT, MIB};

const SIZE: u64 = 128 * MIB;
const SEED_LEN: u32 = MIB as u32;
const CLOSE_BOUND: Duration = Duration::from_secs(5);

struct Fixture {
    c: Cluster,
    seed: Vec<u8>,
}

impl Fixture {
    /// A 128 MiB export whose first MiB holds known data (flushed).
    fn new() -> Fixture {
        let c = ClusterSpec::new(1).size(SIZE).start();
        let seed = pattern::bytes(1, SEED_LEN as usize);
        let (mut conn, ex) = RawConn::handshake(c.nbd_addr(0), EXPORT);
        if let Some(size) = c.expected_export_size() {
            assert_eq!(ex.size, size, "export size");
        }
        conn.write_at(0, &seed);
        conn.flush();
        conn.disconnect();
        Fixture { c, seed }
    }

    fn addr(&self) -> NbdAddr {
        self.c.nbd_addr(0).clone()
    }

    /// Fresh connection in transmission phase.
    fn open(&self) -> (RawConn, Export) {
        RawConn::handshake(self.c.nbd_addr(0), EXPORT)
    }

    /// The daemon runs and a fresh client reads the seeded data.
    fn assert_healthy(&mut self) {
        self.c.assert_running(0);
        let (mut conn, _) = self.open();
        let got = conn.read_at(0, SEED_LEN);
        pattern::assert_same(&got, &self.seed, "data written before the bad input");
        conn.disconnect();
        self.c.assert_running(0);
    }
}

fn assert_closed(conn: &mut RawConn, what: &str) {
    match conn.wait_for_close(CLOSE_BOUND) {
        Ending::Closed => {}
        other => panic!(
            "{what}: server should close the connection without sending anything, got {other:?}"
        ),
    }
}

fn assert_reply(r: &OptReply, option: u32, reply_type: u32, what: &str) {
    assert_eq!(r.option, option, "{what}: reply must echo the option");
    assert_eq!(
        r.reply_type,
        reply_type,
        "{what}: reply type {:#x}, want {reply_type:#x} (message {:?})",
        r.reply_type,
        String::from_utf8_lossy(&r.data)
    );
}

/// GO on a connection that already exchanged options; then one READ.
fn go_and_read(conn: &mut RawConn, seed: &[u8]) {
    let ex = conn
        .go_or_info(OPT_GO, EXPORT)
        .unwrap_or_else(|r| panic!("GO after earlier options refused: {r:?}"));
    assert!(ex.size > 0);
    let got = conn.read_at(0, 4096);
    pattern::assert_same(&got, &seed[..4096], "read after option errors");
}

#[test]
fn garbage_instead_of_client_flags_is_dropped() {
    let mut f = Fixture::new();
    let addr = f.addr();

    // Connect and vanish, twice: before and after the greeting.
    drop(RawConn::connect(&addr));
    let mut c = RawConn::connect(&addr);
    c.read_greeting();
    drop(c);

    // An HTTP request where the client flags belong.
    let mut c = RawConn::connect(&addr);
    c.read_greeting();
    let _ = c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_closed(&mut c, "HTTP garbage as client flags");

    // Client flags with an unknown bit: the server MUST drop the connection.
    let mut c = RawConn::connect(&addr);
    c.read_greeting();
    c.send(&(FLAG_C_FIXED_NEWSTYLE | 0x100).to_be_bytes())
        .expect("send flags");
    assert_closed(&mut c, "unknown client flag");

    f.assert_healthy();
}

#[test]
fn garbage_instead_of_option_magic_is_dropped() {
    let mut f = Fixture::new();
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    let _ = c.send(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0]);
    match c.wait_for_close(CLOSE_BOUND) {
        Ending::StillOpen(got) => panic!(
            "bad option magic: connection still open after {CLOSE_BOUND:?} (received {got:02x?})"
        ),
        Ending::Closed | Ending::SentThenClosed(_) => {}
    }
    f.assert_healthy();
}

#[test]
fn truncated_option_then_close() {
    let mut f = Fixture::new();
    // Header claims 100 bytes; 10 arrive; the client goes away.
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send_option_raw(OPT_GO, 100, &[0u8; 10]).expect("send");
    c.shutdown_write();
    assert_closed(&mut c, "truncated option then EOF");
    // Half an option header, then close.
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send(&IHAVEOPT.to_be_bytes()[..5]).expect("send");
    drop(c);
    f.assert_healthy();
}

#[test]
fn inconsistent_option_data_is_invalid_and_session_goes_on() {
    let mut f = Fixture::new();
    let mut c = RawConn::connect(&f.addr());
    c.start_options();

    // GO whose name length runs past the option data.
    let mut d = Vec::new();
    d.extend_from_slice(&100u32.to_be_bytes());
    d.extend_from_slice(b"r0");
    c.send_option(OPT_GO, &d);
    let r = c
        .read_option_reply()
        .expect("reply to GO with bad name length");
    assert_reply(
        &r,
        OPT_GO,
        REP_ERR_INVALID,
        "GO with name length past the data",
    );

    // INFO whose count of information requests does not match the data.
    let mut d = Vec::new();
    d.extend_from_slice(&2u32.to_be_bytes());
    d.extend_from_slice(b"r0");
    d.extend_from_slice(&5u16.to_be_bytes()); // claims 5 requests, sends 1
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    c.send_option(OPT_INFO, &d);
    let r = c
        .read_option_reply()
        .expect("reply to INFO with bad request count");
    assert_reply(
        &r,
        OPT_INFO,
        REP_ERR_INVALID,
        "INFO with a wrong request count",
    );

    // LIST must not carry data.
    c.send_option(OPT_LIST, b"junk");
    let r = c.read_option_reply().expect("reply to LIST with data");
    assert_reply(&r, OPT_LIST, REP_ERR_INVALID, "LIST with data");

    go_and_read(&mut c, &f.seed);
    c.disconnect();
    f.assert_healthy();
}

fn vm_peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmPeak:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn option_with_huge_length_does_not_allocate() {
    let mut f = Fixture::new();
    let pid = f.c.daemon(0).pid();
    let before = vm_peak_kib(pid).expect("VmPeak of the server");

    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send_option_raw(OPT_GO, 0xffff_fff0, &RawConn::go_data(EXPORT))
        .expect("send header");
    match c.wait_for_close(CLOSE_BOUND) {
        Ending::Closed => {}
        Ending::SentThenClosed(got) | Ending::StillOpen(got) if !got.is_empty() => {
            assert!(got.len() >= 20, "partial option reply {got:02x?}");
            let reply_type = u32::from_be_bytes([got[12], got[13], got[14], got[15]]);
            assert_eq!(&got[..8], &OPT_REPLY_MAGIC.to_be_bytes(), "option reply magic");
            assert_eq!(reply_type, REP_ERR_TOO_BIG, "want NBD_REP_ERR_TOO_BIG (or a clean close), got {reply_type:#x}");
        }
        other => panic!("option claiming 4 GiB: neither NBD_REP_ERR_TOO_BIG nor a close within {CLOSE_BOUND:?}: {other:?}"),
    }
    drop(c);

    let after = vm_peak_kib(pid).expect("VmPeak of the server");
    assert!(
        after < before + 2 * 1024 * 1024,
        "server's peak virtual memory grew from {before} KiB to {after} KiB after a 4 GiB option claim"
    );
    f.assert_healthy();
}

#[test]
fn unknown_option_is_unsupported_and_session_goes_on() {
    let mut f = Fixture::new();
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send_option(0x7777_0001, b"whatever");
    let r = c.read_option_reply().expect("reply to unknown option");
    assert_reply(&r, 0x7777_0001, REP_ERR_UNSUP, "unknown option");
    c.send_option(0x0000_00ff, &[]);
    let r = c.read_option_reply().expect("reply to unknown option");
    assert_reply(
        &r,
        0x0000_00ff,
        REP_ERR_UNSUP,
        "unknown option without data",
    );
    go_and_read(&mut c, &f.seed);
    c.disconnect();

    // ABORT gets an ACK.
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send_option(OPT_ABORT, &[]);
    let r = c.read_option_reply().expect("reply to ABORT");
    assert_reply(&r, OPT_ABORT, REP_ACK, "ABORT");
    drop(c);
    f.assert_healthy();
}

#[test]
fn unknown_export_is_refused() {
    let mut f = Fixture::new();
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    for opt in [OPT_INFO, OPT_GO] {
        match c.go_or_info(opt, "no-such-export") {
            Ok(ex) => panic!("option {opt} accepted an unknown export: {ex:?}"),
            Err(r) => assert_reply(&r, opt, REP_ERR_UNKNOWN, "unknown export"),
        }
    }
    go_and_read(&mut c, &f.seed);
    c.disconnect();

    // EXPORT_NAME cannot return an error: the server must close.
    let mut c = RawConn::connect(&f.addr());
    c.start_options();
    c.send_option(OPT_EXPORT_NAME, b"no-such-export");
    assert_closed(&mut c, "EXPORT_NAME of an unknown export");
    f.assert_healthy();
}

#[test]
fn requests_past_the_end() {
    let mut f = Fixture::new();
    let (mut c, ex) = f.open();
    let size = ex.size;
    let last = pattern::bytes(9, 512);
    c.write_at(size - 512, &last);

    let (e, _) = c.request(0, CMD_READ, size - 512, 1024, &[]);
    assert_eq!(e, EINVAL, "READ across the end");
    let (e, _) = c.request(0, CMD_READ, size, 512, &[]);
    assert_eq!(e, EINVAL, "READ at the end");
    let (e, _) = c.request(0, CMD_READ, u64::MAX - 511, 1024, &[]);
    assert_eq!(e, EINVAL, "READ whose offset+length wraps around");
    // The spec says ENOSPC for writes past the end; qemu-nbd (a reference the
    // harness can run instead) answers EINVAL, which we let pass for it only.
    let write_errors: &[u32] = match f.c.spec.server {
        ServerKind::Mirrord => &[ENOSPC],
        ServerKind::QemuNbd | ServerKind::Nbdkit => &[ENOSPC, EINVAL],
    };
    let (e, _) = c.request(0, CMD_WRITE, size - 512, 1024, &pattern::bytes(10, 1024));
    assert!(
        write_errors.contains(&e),
        "WRITE across the end: error {e}, want {write_errors:?}"
    );
    let (e, _) = c.request(0, CMD_WRITE, size + 4096, 512, &pattern::bytes(11, 512));
    assert!(
        write_errors.contains(&e),
        "WRITE beyond the end: error {e}, want {write_errors:?}"
    );
    if ex.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
        let (e, _) = c.request(0, CMD_WRITE_ZEROES, size - 512, 1024, &[]);
        assert!(
            write_errors.contains(&e),
            "WRITE_ZEROES across the end: error {e}, want {write_errors:?}"
        );
    }
    if ex.flags & TFLAG_SEND_TRIM != 0 {
        let (e, _) = c.request(0, CMD_TRIM, size - 512, 1024, &[]);
        assert_eq!(e, EINVAL, "TRIM across the end");
    }
    // The failed requests changed nothing and the session goes on.
    pattern::assert_same(
        &c.read_at(size - 512, 512),
        &last,
        "last sector after failed requests",
    );
    pattern::assert_same(
        &c.read_at(0, 4096),
        &f.seed[..4096],
        "start after failed requests",
    );
    c.disconnect();
    f.assert_healthy();
}

#[test]
fn zero_length_requests_do_not_disconnect() {
    let mut f = Fixture::new();
    let (mut c, ex) = f.open();
    let mut kinds = vec![(CMD_READ, "READ"), (CMD_WRITE, "WRITE")];
    if ex.flags & TFLAG_SEND_TRIM != 0 {
        kinds.push((CMD_TRIM, "TRIM"));
    }
    if ex.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
        kinds.push((CMD_WRITE_ZEROES, "WRITE_ZEROES"));
    }
    for (kind, name) in kinds {
        for off in [0, 4096, ex.size] {
            // Any error value is allowed; the reply must come and the session go on.
            let _ = c.request(0, kind, off, 0, &[]);
            pattern::assert_same(
                &c.read_at(0, 4096),
                &f.seed[..4096],
                &format!("read after zero-length {name} at {off}"),
            );
        }
    }
    c.disconnect();
    f.assert_healthy();
}

#[test]
fn over_maximum_length_is_refused() {
    let mut f = Fixture::new();
    let (mut c, ex) = f.open();
    let (min, max) = match ex.block_size {
        Some((min, _, max)) => (min.max(1), max),
        None => panic!(
            "server did not answer NBD_INFO_BLOCK_SIZE; it must advertise block size constraints"
        ),
    };
    assert!(
        u64::from(max) < ex.size,
        "test needs an export larger than the maximum block size {max}"
    );
    let len = max + min;
    assert!(
        u64::from(len) > 32 * MIB,
        "maximum block size {max} is below 32 MiB; this test wants a length above it"
    );

    let (e, data) = c.request(0, CMD_READ, 0, len, &[]);
    assert!(
        e == EINVAL || e == EOVERFLOW,
        "READ of {len} bytes (max {max}): error {e}, want EINVAL or EOVERFLOW"
    );
    assert!(data.is_empty());
    pattern::assert_same(
        &c.read_at(0, 4096),
        &f.seed[..4096],
        "read after refused over-long READ",
    );

    // An over-long WRITE: the server may read and discard the payload and
    // answer with an error, or (above 32 MiB) hang up. It must not write it.
    let payload = pattern::bytes(12, len as usize);
    let cookie = 77;
    let sent = c.send_request(0, CMD_WRITE, cookie, 0, len, &payload);
    match (sent, c.read_simple_reply()) {
        (Ok(()), Ok(r)) => {
            assert_eq!(r.cookie, cookie);
            assert!(
                r.error == EINVAL || r.error == EOVERFLOW,
                "over-long WRITE: error {}, want EINVAL or EOVERFLOW",
                r.error
            );
            pattern::assert_same(
                &c.read_at(0, 4096),
                &f.seed[..4096],
                "session after refused over-long WRITE",
            );
            c.disconnect();
        }
        (_, Err(e)) => {
            // Hung up; make sure it is a close and not a stall.
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "over-long WRITE: no reply and no close within the bound: {e}"
            );
        }
        (Err(_), Ok(r)) => {
            // Answered without taking the payload, then hung up: allowed.
            assert!(
                r.error == EINVAL || r.error == EOVERFLOW,
                "over-long WRITE: error {}, want EINVAL or EOVERFLOW",
                r.error
            );
        }
    }
    f.assert_healthy();
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let mut f = Fixture::new();
    let (mut c, _ex) = f.open();

    for kind in [0x00ff_u16, 0x7fff, 9] {
        let (e, _) = c.request(0, kind, 0, 0, &[]);
        assert_eq!(e, EINVAL, "unknown command {kind}");
    }
    // BLOCK_STATUS without a negotiated meta context.
    let (e, _) = c.request(0, 7, 0, 4096, &[]);
    assert_eq!(e, EINVAL, "BLOCK_STATUS without SET_META_CONTEXT");

    let (e, _) = c.request(0x8000, CMD_READ, 0, 4096, &[]);
    assert_eq!(e, EINVAL, "READ with an unknown flag");
    let (e, _) = c.request(CMD_FLAG_NO_HOLE, CMD_READ, 0, 4096, &[]);
    assert_eq!(
        e, EINVAL,
        "READ with NO_HOLE (a flag for WRITE_ZEROES only)"
    );
    let (e, _) = c.request(0x4000, CMD_FLUSH, 0, 0, &[]);
    assert_eq!(e, EINVAL, "FLUSH with an unknown flag");
    // WRITE with an unknown flag: payload consumed, nothing written.
    let (e, _) = c.request(0x8000, CMD_WRITE, 0, 4096, &pattern::bytes(13, 4096));
    assert_eq!(e, EINVAL, "WRITE with an unknown flag");

    pattern::assert_same(
        &c.read_at(0, SEED_LEN),
        &f.seed,
        "data after refused commands",
    );
    c.disconnect();
    f.assert_healthy();
}

#[test]
fn client_vanishing_mid_request() {
    let mut f = Fixture::new();
    let region = 4 * MIB;
    let old = pattern::bytes(20, MIB as usize);
    let new = pattern::bytes(21, MIB as usize);
    {
        let (mut c, _) = f.open();
        c.write_at(region, &old);
        c.flush();
        c.disconnect();
    }

    // Half a WRITE payload, then gone.
    let (mut c, _) = f.open();
    c.send_request(
        0,
        CMD_WRITE,
        5,
        region,
        MIB as u32,
        &new[..(MIB as usize) / 2],
    )
    .expect("send half a write");
    drop(c);

    // A batch of READs whose replies nobody reads.
    let (mut c, _) = f.open();
    for i in 0..16u64 {
        c.send_request(0, CMD_READ, 100 + i, i * MIB, MIB as u32, &[])
            .expect("send read");
    }
    drop(c);

    // Half a request header.
    let (mut c, _) = f.open();
    c.send(&REQUEST_MAGIC.to_be_bytes()).expect("send");
    drop(c);

    std::thread::sleep(Duration::from_millis(300));
    f.assert_healthy();
    // The half-sent write is unacknowledged: each sector is old or new, never anything else.
    let (mut c, _) = f.open();
    let got = c.read_at(region, MIB as u32);
    for s in 0..(MIB as usize / 512) {
        let r = s * 512..(s + 1) * 512;
        assert!(
            got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()],
            "sector {s} of the half-written region holds neither old nor new data"
        );
    }
    c.disconnect();
}
