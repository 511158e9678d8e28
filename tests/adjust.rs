//! `mirrorctl adjust`: a changed config file applied to running daemons
//! without a restart. The live class (sync rate and checksum, net timeouts,
//! split-brain policies, handlers) is applied and shown as an `adjusted`
//! event; the sync rate is checked by its effect on a running resync. A
//! change of the restart class (node address, disk, node name, resource
//! name) is refused with the key named, and changes nothing, not even the
//! live keys edited with it. (config/adjust/tests.rs classifies every key.)

mod common;

use std::time::{Duration, Instant};

use common::pair::{rewrite_sync_rate, synced_pair, wait_in_sync, Events, T};
use common::{Cluster, ClusterSpec, CmdOutput, MIB};

fn edit_config(c: &Cluster, edit: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(&c.config).expect("read config");
    let new = edit(&text);
    assert_ne!(new, text, "the edit changed nothing");
    std::fs::write(&c.config, new).expect("write config");
}

/// Replaces the first line starting with `prefix` after skipping `skip` of them.
fn replace_line(text: &str, prefix: &str, skip: usize, with: &str) -> String {
    let mut seen = 0;
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        if l.starts_with(prefix) {
            seen += 1;
            if seen == skip + 1 {
                out.push(with.to_string());
                continue;
            }
        }
        out.push(l.to_string());
    }
    assert!(
        seen > skip,
        "no line {skip} starting with `{prefix}`:\n{text}"
    );
    out.join("\n") + "\n"
}

fn refused(out: &CmdOutput, key: &str) {
    assert_eq!(out.code(), Some(1), "want a refusal\n{}", out.describe());
    assert!(
        out.stderr.contains(key) && out.stderr.contains("nothing changed"),
        "the refusal should name `{key}`\n{}",
        out.describe()
    );
}

fn nothing_to_adjust(c: &Cluster) {
    let out = c.mirrorctl(0, &["adjust"]);
    out.assert_success();
    assert!(
        out.stdout.contains("nothing to adjust"),
        "{}",
        out.describe()
    );
}

fn resync_done(v: &serde_json::Value) -> u64 {
    v["resync"]["done_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn the_sync_rate_changes_a_running_resync() {
    let size = 48 * MIB;
    let c = synced_pair(
        ClusterSpec::new(2)
            .size(size)
            .table("[sync]\nrate = \"1GiB\"\nchecksum = false"),
    );
    let ev = Events::start(&c, 0, "adjust");
    rewrite_sync_rate(&c, "1MiB");
    let out = c.mirrorctl(0, &["adjust"]);
    out.assert_success();
    assert!(out.stdout.contains("sync.rate"), "{}", out.describe());
    let e = ev.wait_for(Duration::from_secs(20), "adjusted", |v| {
        v["event"] == "adjusted"
    });
    assert!(
        e["changes"][0]
            .as_str()
            .is_some_and(|s| s.starts_with("sync.rate")),
        "{e}"
    );

    // At 1 MiB/s the full resync of 48 MiB is far from done after 3 s (at the old
    // 1 GiB/s it would be over).
    c.mirrorctl(0, &["resync", "--full"]).assert_success();
    std::thread::sleep(Duration::from_secs(3));
    let st = c.status_json(0);
    let done = resync_done(&st);
    assert!(
        !st["resync"].is_null() && done < size / 4,
        "1 MiB/s for 3 s, yet {done} of {size} bytes done: {st:#}"
    );
    assert_eq!(st["resync"]["pace"]["mode"], "fixed", "{st:#}");

    // Back to the adaptive default live, with no application I/O: the rest
    // (over 36 MiB, 36 s at the slow rate) ends in 20 s.
    rewrite_sync_rate(&c, "auto");
    c.mirrorctl(0, &["adjust"]).assert_success();
    let t0 = Instant::now();
    c.wait_status(
        0,
        Duration::from_secs(20),
        "in sync after speeding up",
        |v| v["resync"].is_null() && v["out_of_sync_bytes"] == 0,
    );
    eprintln!(
        "the rest of the resync took {:?} after the adjust",
        t0.elapsed()
    );
    wait_in_sync(&c, "in sync");
}

#[test]
fn restart_class_changes_are_refused_and_change_nothing() {
    let c = ClusterSpec::new(2)
        .table("[sync]\nrate = \"250MiB\"")
        .mirrord_only()
        .start();
    nothing_to_adjust(&c);

    let original = std::fs::read_to_string(&c.config).expect("read config");
    // A live key edited together with one that needs a restart: neither is applied.
    let with_rate = |t: &str| replace_line(t, "rate = ", 0, "rate = \"7MiB\"");
    for (prefix, skip, line, key) in [
        (
            "address = ",
            1,
            "address = \"127.0.0.1:9\"",
            "node[1].address",
        ),
        (
            "disk = ",
            0,
            "disk = \"/tmp/elsewhere.img\"",
            "node[0].disk",
        ),
        ("name = \"beta\"", 0, "name = \"gamma\"", "node[1].name"),
        ("protocol = ", 0, "protocol = \"A\"", "resource.protocol"),
    ] {
        std::fs::write(&c.config, &original).expect("restore config");
        edit_config(&c, |t| replace_line(&with_rate(t), prefix, skip, line));
        refused(&c.mirrorctl(0, &["adjust"]), key);
    }

    // The rate was never applied: it is still pending.
    std::fs::write(&c.config, with_rate(&original)).expect("write config");
    let out = c.mirrorctl(0, &["adjust", "--dry-run"]);
    out.assert_success();
    assert!(
        out.stdout.contains("would adjust") && out.stdout.contains("sync.rate"),
        "{}",
        out.describe()
    );
    // Every live class at once: net timeouts, split-brain policy, handler, rate.
    edit_config(&c, |t| {
        t.replacen(
            "\n[[node]]",
            "\n[net]\nping-timeout = \"3s\"\nko-count = 4\n\n[split-brain]\n\
             after-sb-0pri = \"discard-zero-changes\"\n\n[handlers]\n\
             split-brain = \"/bin/true\"\n\n[[node]]",
            1,
        )
    });
    let out = c.mirrorctl(0, &["adjust"]);
    out.assert_success();
    for key in [
        "sync.rate",
        "net.ping-timeout",
        "net.ko-count",
        "split-brain.after-sb-0pri",
        "handlers.split-brain",
    ] {
        assert!(
            out.stdout.contains(key),
            "{key} not adjusted\n{}",
            out.describe()
        );
    }
    nothing_to_adjust(&c);
    // Both nodes still run and the link is up.
    c.wait_status(0, T, "connected after the adjusts", |v| {
        v["peer"]["connection"] == "connected"
    });

    // A file that does not parse: a bad config (exit 2), nothing sent.
    edit_config(&c, |t| t.replacen("[sync]", "[sync]\nrate = \"fast\"", 1));
    let out = c.mirrorctl(0, &["adjust"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
}
