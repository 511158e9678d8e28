use super::*;

const TWO: &str = r#"
[resource]
name = "r0"
shared-secret-file = "/etc/nbd-mirror/r0.secret"

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "/tmp/a.img"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "/tmp/b.img"
meta-disk = "/tmp/b.md"
run-dir = "/tmp/rb"
nbd-listen = "127.0.0.1:10809"
"#;

fn p(text: &str, node: &str) -> Result<Settings, ConfigError> {
    parse(Path::new("/etc/x.toml"), text, Some(node))
}

#[test]
fn defaults_and_resolution() {
    let s = p(TWO, "alpha").unwrap();
    assert_eq!(s.resource, "r0");
    assert_eq!(s.protocol, Protocol::C);
    assert!(!s.allow_two_primaries);
    assert!(s.auto_promote);
    assert_eq!(s.run_dir, PathBuf::from("/run/nbd-mirror"));
    assert_eq!(s.nbd_listen, Listen::Unix("/run/nbd-mirror/r0.nbd".into()));
    assert_eq!(s.nbd_busy_poll_us, DEFAULT_BUSY_POLL_US);
    assert_eq!(s.control_socket(), PathBuf::from("/run/nbd-mirror/r0.ctl"));
    assert_eq!(s.sync.rate, Rate::Auto);
    assert_eq!(s.sync.min_rate, Rate::Auto);
    assert_eq!(s.node().meta_disk, MetaDisk::Internal);
    assert_eq!(s.peer().unwrap().name, "beta");
    assert_eq!(s.split_brain.after_sb_0pri, SbPolicy::Disconnect);

    let b = p(TWO, "beta").unwrap();
    assert_eq!(b.run_dir, PathBuf::from("/tmp/rb"));
    assert_eq!(
        b.nbd_listen,
        Listen::Tcp("127.0.0.1:10809".parse().unwrap())
    );
    assert_eq!(b.node().meta_disk, MetaDisk::External("/tmp/b.md".into()));
    assert_eq!(b.peer().unwrap().name, "alpha");
}

fn expect_err(text: &str, node: &str, key: Option<&str>, reason_part: &str) {
    let e = p(text, node).unwrap_err();
    assert_eq!(e.key.as_deref(), key, "{e}");
    assert!(e.reason.contains(reason_part), "{e}");
    assert!(e.to_string().contains("/etc/x.toml"), "{e}");
}

#[test]
fn errors_name_file_key_and_reason() {
    expect_err(
        &TWO.replace("name = \"r0\"", "name = \"r0\"\nbogus = 1"),
        "alpha",
        Some("resource.bogus"),
        "unknown key",
    );
    expect_err(
        &TWO.replace("name = \"r0\"\n", ""),
        "alpha",
        Some("resource.name"),
        "missing required",
    );
    expect_err(
        &format!("{TWO}\n[sync]\nrate = \"250XiB\"\n"),
        "alpha",
        Some("sync.rate"),
        "unknown unit",
    );
    expect_err(TWO, "gamma", Some("node.name"), "matches no [[node]]");
    expect_err(
        &TWO.replace("disk = \"/tmp/a.img\"", ""),
        "alpha",
        Some("node[0].disk"),
        "missing required",
    );
    expect_err(
        &format!("{TWO}\n[sync]\nrate = true\n"),
        "alpha",
        Some("sync.rate"),
        "expected a string",
    );
    expect_err(
        &TWO.replace("name = \"r0\"", "name = \"r0\"\nprotocol = \"D\""),
        "alpha",
        Some("resource.protocol"),
        "not one of",
    );
    expect_err(
        &TWO.replace(
            "name = \"r0\"",
            "name = \"r0\"\nprotocol = \"A\"\nallow-two-primaries = true",
        ),
        "alpha",
        Some("resource.allow-two-primaries"),
        "protocol C",
    );
    expect_err(
        &format!("{TWO}\n[split-brain]\nafter-sb-0pri = \"consensus\"\n"),
        "alpha",
        Some("split-brain.after-sb-0pri"),
        "not one of",
    );
    expect_err(
        &format!("{TWO}\n[split-brain]\nafter-sb-0pri = \"discard-node-zeta\"\n"),
        "alpha",
        Some("split-brain.after-sb-0pri"),
        "zeta",
    );
    expect_err(
        &TWO.replace("127.0.0.1:7790", "127.0.0.1:7789"),
        "alpha",
        Some("node[1].address"),
        "same address",
    );
    expect_err(
        &TWO.replace("address = \"127.0.0.1:7790\"", ""),
        "alpha",
        Some("node[1].address"),
        "missing",
    );
    expect_err(
        &TWO.replace(
            "nbd-listen = \"127.0.0.1:10809\"",
            "nbd-listen = \"unix:relative\"",
        ),
        "beta",
        Some("node[1].nbd-listen"),
        "absolute",
    );
    expect_err(
        &format!("{TWO}\n[net]\nko-count = -1\n"),
        "alpha",
        Some("net.ko-count"),
        "negative",
    );
    expect_err(
        &format!("{TWO}\n[nbd]\nbusy-poll-us = 5000\n"),
        "alpha",
        Some("nbd.busy-poll-us"),
        "more than 1000",
    );
    expect_err(
        &format!("{TWO}\n[net]\ntimeout = \"0s\"\n"),
        "alpha",
        Some("net.timeout"),
        "greater than zero",
    );
    expect_err("[resource\nname=1", "alpha", None, "not valid TOML");
    expect_err(
        "[[node]]\nname=\"a\"\ndisk=\"/x\"\n",
        "a",
        Some("resource"),
        "missing required table",
    );
    expect_err(
        "[resource]\nname=\"r0\"\n",
        "a",
        Some("node"),
        "at least one",
    );
    expect_err(
        &format!("{TWO}\n[extra]\n"),
        "alpha",
        Some("extra"),
        "unknown key",
    );
}

#[test]
fn single_node_needs_no_address() {
    let s = p(
        "[resource]\nname = \"r0\"\n[[node]]\nname = \"solo\"\ndisk = \"/tmp/x\"\n",
        "solo",
    )
    .unwrap();
    assert!(s.peer().is_none());
    assert_eq!(s.node().address, None);
}

#[test]
fn policies_parse() {
    let text = format!("{TWO}\n[split-brain]\nafter-sb-0pri = \"discard-node-beta\"\nafter-sb-1pri = \"discard-secondary\"\nafter-sb-2pri = \"call-pri-lost-after-sb\"\n");
    let s = p(&text, "alpha").unwrap();
    assert_eq!(
        s.split_brain.after_sb_0pri,
        SbPolicy::DiscardNode("beta".into())
    );
    assert_eq!(s.split_brain.after_sb_1pri, SbPolicy::DiscardSecondary);
    assert_eq!(s.split_brain.after_sb_2pri, SbPolicy::CallPriLostAfterSb);
}

#[test]
fn busy_poll_is_configurable() {
    let s = p(&format!("{TWO}\n[nbd]\nbusy-poll-us = 0\n"), "alpha").unwrap();
    assert_eq!(s.nbd_busy_poll_us, 0);
    let s = p(&format!("{TWO}\n[nbd]\nbusy-poll-us = 200\n"), "alpha").unwrap();
    assert_eq!(s.nbd_busy_poll_us, 200);
}

#[test]
fn two_nodes_need_a_secret_or_the_explicit_opt_out() {
    let no_secret = TWO.replace("shared-secret-file = \"/etc/nbd-mirror/r0.secret\"\n", "");
    expect_err(
        &no_secret,
        "alpha",
        Some("resource.shared-secret-file"),
        "gen-secret",
    );
    let opted_out = no_secret.replace(
        "name = \"r0\"\n",
        "name = \"r0\"\ninsecure-no-secret = true\n",
    );
    let s = p(&opted_out, "alpha").unwrap();
    assert!(s.insecure_no_secret && s.shared_secret_file.is_none());
    expect_err(
        &TWO.replace(
            "name = \"r0\"\n",
            "name = \"r0\"\ninsecure-no-secret = true\n",
        ),
        "alpha",
        Some("resource.insecure-no-secret"),
        "shared-secret-file",
    );
    assert!(!p(TWO, "alpha").unwrap().insecure_no_secret);
}

#[test]
fn metrics_are_off_by_default_and_listen_where_configured() {
    assert_eq!(p(TWO, "alpha").unwrap().metrics_listen, None);
    let with = format!("{TWO}\n[metrics]\nlisten = \"127.0.0.1:9942\"\n");
    let a = p(&with, "alpha").unwrap();
    assert_eq!(a.metrics_listen, Some("127.0.0.1:9942".parse().unwrap()));
    // The per-node key wins over the table (two nodes on one machine).
    let per_node = with.replace(
        "name = \"beta\"\n",
        "name = \"beta\"\nmetrics-listen = \"127.0.0.1:9943\"\n",
    );
    let b = p(&per_node, "beta").unwrap();
    assert_eq!(b.metrics_listen, Some("127.0.0.1:9943".parse().unwrap()));
    assert_eq!(
        p(&per_node, "alpha").unwrap().metrics_listen,
        Some("127.0.0.1:9942".parse().unwrap())
    );
}

#[test]
fn tls_is_off_unless_its_table_is_there_and_node_keys_override_it() {
    assert_eq!(p(TWO, "alpha").unwrap().tls, None);
    let tls = format!(
        "{TWO}\n[tls]\nca = \"/etc/ca.pem\"\ncert = \"/etc/node.crt\"\nkey = \"/etc/node.key\"\n"
    );
    let a = p(&tls, "alpha").unwrap().tls.unwrap();
    assert_eq!(
        (a.ca, a.cert, a.key),
        (
            "/etc/ca.pem".into(),
            "/etc/node.crt".into(),
            "/etc/node.key".into()
        )
    );
    let per_node = tls.replace(
        "name = \"beta\"\n",
        "name = \"beta\"\ntls-cert = \"/etc/beta.crt\"\n",
    );
    let b = p(&per_node, "beta").unwrap().tls.unwrap();
    assert_eq!(b.cert, PathBuf::from("/etc/beta.crt"));
    assert_eq!(
        b.key,
        PathBuf::from("/etc/node.key"),
        "[tls] key still applies"
    );
    assert_eq!(
        p(&per_node, "alpha").unwrap().tls.unwrap().cert,
        PathBuf::from("/etc/node.crt")
    );
}

#[test]
fn metrics_listen_errors_name_the_key() {
    expect_err(
        &format!("{TWO}\n[metrics]\nlisten = \"unix:/run/m.sock\"\n"),
        "alpha",
        Some("metrics.listen"),
        "HTTP over TCP",
    );
    expect_err(
        &format!("{TWO}\n[metrics]\nlisten = \"no-port\"\n"),
        "alpha",
        Some("metrics.listen"),
        "host:port",
    );
    expect_err(
        &format!("{TWO}\n[metrics]\nport = 9942\n"),
        "alpha",
        Some("metrics.port"),
        "",
    );
    expect_err(
        &TWO.replace(
            "name = \"beta\"\n",
            "name = \"beta\"\nmetrics-listen = \"unix:/x\"\n",
        ),
        "beta",
        Some("node[1].metrics-listen"),
        "HTTP over TCP",
    );
}

#[test]
fn tls_errors_name_the_key() {
    expect_err(
        &format!("{TWO}\n[tls]\ncert = \"/c\"\nkey = \"/k\"\n"),
        "alpha",
        Some("tls.ca"),
        "missing",
    );
    expect_err(
        &format!("{TWO}\n[tls]\nca = \"/ca\"\nkey = \"/k\"\n"),
        "alpha",
        Some("tls.cert"),
        "tls-cert in its [[node]]",
    );
    expect_err(
        &TWO.replace("name = \"beta\"\n", "name = \"beta\"\ntls-key = \"/k\"\n"),
        "beta",
        Some("node[1].tls-key"),
        "without a [tls] table",
    );
}
