//! The resource by name, as drbdadm finds its resources: `mirrord r0` and
//! `mirrorctl status r0` read `$MIRROR_CONF_DIR/r0.toml` (default
//! /etc/nbd-mirror); `--config FILE` still works. The harness writes its
//! config as `r0.toml` in a temp dir, which stands in for /etc/nbd-mirror.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;
use common::process::own_binary;
use common::{run, ClusterSpec, CmdOutput};

const T: Duration = Duration::from_secs(30);

/// `mirrorctl ARGS...` with MIRROR_CONF_DIR=`dir` and MIRROR_NODE=`node`, no --config.
fn mirrorctl_in(dir: &Path, node: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(own_binary("mirrorctl"));
    cmd.env("MIRROR_CONF_DIR", dir)
        .env("MIRROR_NODE", node)
        .args(args);
    run(&mut cmd, T)
}

fn json(out: &CmdOutput) -> serde_json::Value {
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON: {e}\n{}", out.describe()))
}

#[test]
fn mirrord_and_mirrorctl_find_the_resource_by_name() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    let mut cmd = Command::new(own_binary("mirrord"));
    cmd.arg("r0")
        .env("MIRROR_CONF_DIR", &c.dir)
        .env("MIRROR_NODE", "alpha")
        .env("RUST_LOG", "info");
    let mut d = Daemon::spawn("mirrord r0", cmd, c.dir.join("alpha-by-name.log"));
    d.wait_ready(c.nbd_addr(0));

    let st = json(&mirrorctl_in(&c.dir, "alpha", &["status", "r0", "--json"]));
    assert_eq!(st["resource"], "r0");
    assert_eq!(st["node"], "alpha");
    // --config and the name together agree; --config alone as before.
    let both = [
        "--config",
        c.config.to_str().expect("utf-8 path"),
        "status",
        "--json",
    ];
    let st = json(&mirrorctl_in(&c.dir, "alpha", &both));
    assert_eq!(st["node"], "alpha");

    let cfg = json(&mirrorctl_in(&c.dir, "alpha", &["check-config", "r0"]));
    assert_eq!(cfg["file"], c.config.to_str().expect("utf-8 path"));
    // gen-secret by name resolves the config's shared-secret-file, which the harness wrote.
    let out = mirrorctl_in(&c.dir, "alpha", &["gen-secret", "r0"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("refusing to overwrite"),
        "{}",
        out.describe()
    );
    // beta runs nowhere: its control socket, from the same file, is not there.
    let out = mirrorctl_in(&c.dir, "beta", &["status", "r0"]);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    let out = mirrorctl_in(&c.dir, "alpha", &["disconnect", "r0"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let st = json(&mirrorctl_in(&c.dir, "alpha", &["status", "r0", "--json"]));
    assert_eq!(st["peer"]["connection"], "standalone", "{st}");

    assert!(
        d.terminate(T).is_some_and(|s| s.success()),
        "mirrord r0 exit"
    );
}

#[test]
fn a_missing_or_unnamed_resource_is_a_usage_error() {
    let c = ClusterSpec::new(1).mirrord_only().build();
    let out = mirrorctl_in(&c.dir, "alpha", &["status", "r9"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let want = c.dir.join("r9.toml").display().to_string();
    assert!(out.stderr.contains(&want), "{}", out.describe());
    assert!(out.stderr.contains("MIRROR_CONF_DIR"), "{}", out.describe());

    let out = mirrorctl_in(&c.dir, "alpha", &["status"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("found there: r0"), "{}", out.describe());

    let out = mirrorctl_in(&c.dir, "alpha", &["status", "../r0"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("not a resource name"),
        "{}",
        out.describe()
    );

    let mut cmd = Command::new(own_binary("mirrord"));
    cmd.arg("r9")
        .env("MIRROR_CONF_DIR", &c.dir)
        .env("MIRROR_NODE", "alpha");
    let out = run(&mut cmd, T);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains(&want), "{}", out.describe());

    // A file named for r1 that holds r0 is not r1's.
    std::fs::copy(&c.config, c.dir.join("r1.toml")).expect("copy config");
    let out = mirrorctl_in(&c.dir, "alpha", &["check-config", "r1"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("resource.name"), "{}", out.describe());
}
