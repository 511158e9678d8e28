use std::path::Path;

use super::*;
use crate::config::parse;

const BASE: &str = r#"
[resource]
name = "r0"
shared-secret-file = "/etc/nbd-mirror/r0.secret"

[sync]
rate = "250MiB"

[net]
ping-timeout = "1s"

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "/tmp/a.img"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "/tmp/b.img"
"#;

fn settings(text: &str) -> Settings {
    parse(Path::new("/etc/nbd-mirror/r0.toml"), text, Some("alpha")).expect("valid config")
}

fn plan_for(edit: impl Fn(&str) -> String) -> Plan {
    let old = settings(BASE);
    let text = edit(BASE);
    assert_ne!(text, BASE, "the edit changed nothing");
    plan(&old, &settings(&text))
}

fn keys(c: &[Change]) -> Vec<&str> {
    c.iter().map(|c| c.key.as_str()).collect()
}

#[test]
fn the_same_file_changes_nothing() {
    let s = settings(BASE);
    assert!(plan(&s, &s).is_empty());
    assert_eq!(apply(&s, &s), s);
}

#[test]
fn timeouts_rate_policies_and_handlers_are_live() {
    let p = plan_for(|t| {
        t.replace("rate = \"250MiB\"", "rate = \"10MiB\"\nchecksum = false")
            .replace("ping-timeout = \"1s\"", "ping-timeout = \"3s\"\nko-count = 3\ntimeout = \"2s\"\nping-interval = \"5s\"\nconnect-retry = \"2s\"\nreconnect-grace = \"0s\"")
            .replace(
                "[[node]]\nname = \"alpha\"",
                "[split-brain]\nafter-sb-0pri = \"discard-zero-changes\"\nafter-sb-1pri = \"discard-secondary\"\nafter-sb-2pri = \"violently-as0p\"\n\n[handlers]\nsplit-brain = \"/bin/true\"\n\n[[node]]\nname = \"alpha\"",
            )
    });
    assert!(p.restart.is_empty(), "{:?}", p.restart);
    assert_eq!(
        keys(&p.live),
        [
            "sync.rate",
            "sync.checksum",
            "split-brain.after-sb-0pri",
            "split-brain.after-sb-1pri",
            "split-brain.after-sb-2pri",
            "handlers.split-brain",
            "net.ping-interval",
            "net.ping-timeout",
            "net.timeout",
            "net.ko-count",
            "net.connect-retry",
            "net.reconnect-grace",
        ]
    );
    let rate = &p.live[0];
    assert_eq!(
        (rate.old.as_str(), rate.new.as_str()),
        ("262144000", "10485760")
    );
    let old = settings(BASE);
    let applied = apply(&old, &settings(&BASE.replace("250MiB", "10MiB")));
    assert_eq!(applied.sync.rate, crate::config::Rate::PerSec(10 << 20));
    assert_eq!(applied.nodes, old.nodes);
}

#[test]
fn disks_addresses_names_and_the_rest_need_a_restart() {
    for (from, to, key) in [
        (
            "disk = \"/tmp/a.img\"",
            "disk = \"/tmp/c.img\"",
            "node[0].disk",
        ),
        (
            "address = \"127.0.0.1:7790\"",
            "address = \"127.0.0.1:7791\"",
            "node[1].address",
        ),
        ("name = \"beta\"", "name = \"gamma\"", "node[1].name"),
        ("name = \"r0\"", "name = \"r1\"", "resource.name"),
        (
            "disk = \"/tmp/b.img\"",
            "disk = \"/tmp/b.img\"\nmeta-disk = \"/tmp/b.md\"",
            "node[1].meta-disk",
        ),
        (
            "[sync]",
            "[disk]\ndirect-io = true\n\n[sync]",
            "disk.direct-io",
        ),
        (
            "[sync]",
            "[nbd]\nlisten = \"127.0.0.1:10809\"\n\n[sync]",
            "nbd listen (this node)",
        ),
        (
            "name = \"r0\"",
            "name = \"r0\"\nprotocol = \"A\"",
            "resource.protocol",
        ),
    ] {
        let p = plan_for(|t| t.replacen(from, to, 1));
        // A new resource name also moves the default NBD socket: both are named.
        assert_eq!(keys(&p.restart)[0], key, "{from} -> {to}: {:?}", p.restart);
        assert!(p.live.is_empty(), "{from} -> {to}: {:?}", p.live);
    }
    // A live change next to a refused one: the plan holds both; the caller applies neither.
    let p = plan_for(|t| {
        t.replace("250MiB", "1MiB")
            .replace("/tmp/a.img", "/tmp/z.img")
    });
    assert_eq!(keys(&p.live), ["sync.rate"]);
    assert_eq!(keys(&p.restart), ["node[0].disk"]);
}

#[test]
fn a_size_change_of_the_node_set_needs_a_restart() {
    let one = "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\ndisk = \"/tmp/a.img\"\n";
    let p = plan(&settings(BASE), &settings(one));
    assert!(p.restart.iter().any(|c| c.key == "node (count)"), "{p:?}");
}

#[test]
fn the_metrics_address_is_live() {
    let with = |t: &str| {
        t.replace(
            "[[node]]\nname = \"alpha\"",
            "[metrics]\nlisten = \"127.0.0.1:9942\"\n\n[[node]]\nname = \"alpha\"",
        )
    };
    // Turned on, moved, turned off: live each time, and applied.
    for (from, to) in [
        (BASE.to_string(), with(BASE)),
        (with(BASE), with(BASE).replace(":9942", ":9943")),
        (with(BASE), BASE.to_string()),
    ] {
        let (old, new) = (settings(&from), settings(&to));
        let p = plan(&old, &new);
        assert!(p.restart.is_empty(), "{:?}", p.restart);
        assert_eq!(keys(&p.live), ["metrics.listen"]);
        let applied = apply(&old, &new);
        assert_eq!(applied.metrics_listen, new.metrics_listen);
        assert_eq!(
            applied,
            Settings {
                file: old.file.clone(),
                ..new
            }
        );
    }
    // A node's own override: the effective address and the node's key both change.
    let per_node = BASE.replace(
        "disk = \"/tmp/a.img\"",
        "disk = \"/tmp/a.img\"\nmetrics-listen = \"127.0.0.1:9950\"",
    );
    let p = plan(&settings(BASE), &settings(&per_node));
    assert!(p.restart.is_empty(), "{:?}", p.restart);
    assert_eq!(keys(&p.live), ["metrics.listen", "node[0].metrics-listen"]);
    assert_eq!(
        apply(&settings(BASE), &settings(&per_node)).metrics_listen,
        Some("127.0.0.1:9950".parse().expect("address"))
    );
    // The other node's override does not move this node's endpoint, but is taken.
    let other = BASE.replace(
        "disk = \"/tmp/b.img\"",
        "disk = \"/tmp/b.img\"\nmetrics-listen = \"127.0.0.1:9951\"",
    );
    let p = plan(&settings(BASE), &settings(&other));
    assert!(p.restart.is_empty(), "{:?}", p.restart);
    assert_eq!(keys(&p.live), ["node[1].metrics-listen"]);
    assert_eq!(
        apply(&settings(BASE), &settings(&other)).metrics_listen,
        None
    );
}
