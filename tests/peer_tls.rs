//! TLS on the peer link (`[tls]`): a pair replicates over it; a peer whose certificate
//! comes from another CA is refused with a clear log line and no data moves; and a
//! payload written through NBD does not appear in the bytes on the link (while, without
//! TLS, the same capture shows it: the check can fail). Certificates are made here with
//! rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::link_proxy::LinkProxy;
use common::nbd_wire::RawConn;
use common::pair::{connected, wait_in_sync};
use common::{Cluster, ClusterSpec, EXPORT, MIB};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

const T: Duration = Duration::from_secs(60);

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A certificate for node `name` (its DNS name), written as `{tag}.crt` and `{tag}.key`.
    fn issue(&self, dir: &Path, name: &str, tag: &str) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("node params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("node key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("node certificate");
        let (c, k) = (
            dir.join(format!("{tag}.crt")),
            dir.join(format!("{tag}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write certificate");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn write(&self, dir: &Path, tag: &str) -> PathBuf {
        let p = dir.join(format!("{tag}.pem"));
        std::fs::write(&p, self.cert.pem()).expect("write CA");
        p
    }
}

/// Adds TLS to the cluster's config: `[tls] ca` from `ca`, and each node's own
/// certificate and key (`certs[i]`) in its `[[node]]`.
fn with_tls(c: &Cluster, ca: &Path, certs: [(PathBuf, PathBuf); 2]) {
    let mut text = std::fs::read_to_string(&c.config).expect("read the config");
    for (i, (cert, key)) in certs.iter().enumerate() {
        let line = format!("name = \"{}\"\n", c.node_name(i));
        assert!(text.contains(&line), "no {line:?} in the config");
        text = text.replace(
            &line,
            &format!(
                "{line}tls-cert = \"{}\"\ntls-key = \"{}\"\n",
                cert.display(),
                key.display()
            ),
        );
    }
    text.push_str(&format!("\n[tls]\nca = \"{}\"\n", ca.display()));
    std::fs::write(&c.config, text).expect("write the config");
}

/// Certificates for both nodes from one CA: (ca path, [alpha, beta]).
fn one_ca(c: &Cluster) -> (PathBuf, [(PathBuf, PathBuf); 2]) {
    let ca = Ca::new("nbd-mirror test CA");
    let certs = [0, 1].map(|i| ca.issue(&c.dir, c.node_name(i), c.node_name(i)));
    (ca.write(&c.dir, "ca"), certs)
}

fn payload() -> Vec<u8> {
    b"nbd-mirror TLS test payload: this text must never cross the link in clear. "
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect()
}

fn read_disk(c: &Cluster, i: usize) -> Vec<u8> {
    std::fs::read(c.disk_path(i)).expect("read a disk")
}

/// Promotes node 0, waits for the sync, writes [`payload`] at 4 MiB through NBD and
/// waits until both disks are up to date.
fn write_payload(c: &Cluster) {
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    wait_in_sync(c, "the initial sync");
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.write_at(4 * MIB, &payload());
    conn.flush();
    wait_in_sync(c, "after the write");
}

#[test]
fn a_pair_replicates_over_tls() {
    let mut c = ClusterSpec::new(2).size(16 * MIB).mirrord_only().build();
    let (ca, certs) = one_ca(&c);
    with_tls(&c, &ca, certs);
    c.start_all();
    c.wait_status(0, T, "connected over TLS", connected);
    write_payload(&c);
    for i in 0..2 {
        let log = c.log_text(i);
        assert!(log.contains("peer link: TLS on"), "node {i}:\n{log}");
        assert!(
            log.contains("authenticated (dialed, TLS)")
                || log.contains("authenticated (accepted, TLS)"),
            "node {i} has no TLS connection:\n{log}"
        );
    }
    c.stop(0);
    c.stop(1);
    let (a, b) = (read_disk(&c, 0), read_disk(&c, 1));
    assert!(a == b, "the disks differ after replicating over TLS");
    assert_eq!(&a[4 * MIB as usize..5 * MIB as usize], &payload()[..]);
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let mut c = ClusterSpec::new(2).size(16 * MIB).mirrord_only().build();
    let ca = Ca::new("nbd-mirror test CA");
    let rogue = Ca::new("another CA");
    let alpha = ca.issue(&c.dir, c.node_name(0), "alpha");
    let beta = rogue.issue(&c.dir, c.node_name(1), "beta-rogue");
    with_tls(&c, &ca.write(&c.dir, "ca"), [alpha, beta]);
    c.start_all();
    // alpha writes on its own; beta must get none of it.
    c.mirrorctl(0, &["primary", "--force"]).assert_success();
    let (mut conn, _) = RawConn::handshake(c.nbd_addr(0), EXPORT);
    conn.write_at(4 * MIB, &payload());
    conn.flush();
    let deadline = Instant::now() + T;
    let refused = |log: &str| log.contains("TLS handshake failed");
    while !(refused(&c.log_text(0)) && refused(&c.log_text(1))) {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\nalpha:\n{}\nbeta:\n{}",
            c.log_text(0),
            c.log_text(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Several attempts, each refused; never connected.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..2 {
        let v = c.status_json(i);
        assert_ne!(v["peer"]["connection"], "connected", "node {i}: {v:#}");
        assert!(
            !c.log_text(i).contains("authenticated ("),
            "node {i} authenticated a peer"
        );
    }
    let alpha_log = c.log_text(0);
    let line = alpha_log
        .lines()
        .find(|l| l.contains("TLS handshake failed"))
        .unwrap_or_default();
    eprintln!("alpha: {line}");
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "the refusal does not say why: {line}"
    );
    assert!(
        line.contains("[tls] ca"),
        "the refusal does not say what to check: {line}"
    );
    c.stop(0);
    c.stop(1);
    assert!(
        read_disk(&c, 1).iter().all(|&b| b == 0),
        "beta's disk was written by a refused peer"
    );
}

/// Runs a pair through a recording proxy, with or without TLS, writes the payload, and
/// returns whether the payload's text shows in the alpha -> beta bytes.
fn payload_seen_on_the_link(tls: bool) -> bool {
    let mut c = ClusterSpec::new(2)
        .size(16 * MIB)
        .mirrord_only()
        .table("[net]\ninsecure-allow-relay = true")
        .build();
    if tls {
        let (ca, certs) = one_ca(&c);
        with_tls(&c, &ca, certs);
    }
    let proxy = LinkProxy::start(c.nodes[1].cfg.peer_addr);
    c.start_via_proxy(&proxy);
    c.wait_status(0, T, "connected through the proxy", connected);
    write_payload(&c);
    let [to_beta, _] = proxy.recorded();
    let seen = proxy.seen();
    eprintln!(
        "TLS {tls}: {} bytes alpha -> beta, {} beta -> alpha",
        seen[0], seen[1]
    );
    assert!(
        seen[0] > 16 * MIB,
        "the sync and the write did not pass the proxy ({} bytes)",
        seen[0]
    );
    let needle = &payload()[..48];
    let found = to_beta.windows(needle.len()).any(|w| w == needle);
    c.stop(0);
    c.stop(1);
    let (a, b) = (read_disk(&c, 0), read_disk(&c, 1));
    assert!(a == b, "the disks differ (TLS {tls})");
    found
}

#[test]
fn with_tls_the_payload_does_not_appear_on_the_link() {
    assert!(
        !payload_seen_on_the_link(true),
        "the payload crossed the TLS link in clear"
    );
    // The same capture without TLS shows it: the check above can fail.
    assert!(
        payload_seen_on_the_link(false),
        "without TLS the capture should show the payload"
    );
}
