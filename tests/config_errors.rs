//! Config validation through the binaries: a bad config makes `mirrorctl
//! check-config` and `mirrord` exit 2 with a message that names the file,
//! the key and the problem; a good one passes; `status` without a daemon
//! exits 3.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::own_binary;
use common::{run, ClusterSpec, CmdOutput};

const T: Duration = Duration::from_secs(30);

fn mirrorctl(config: &Path, node: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(own_binary("mirrorctl"));
    cmd.arg("--config")
        .arg(config)
        .arg("--node")
        .arg(node)
        .args(args);
    run(&mut cmd, T)
}

fn mirrord(config: &Path, node: &str) -> CmdOutput {
    let mut cmd = Command::new(own_binary("mirrord"));
    cmd.arg("--config").arg(config).arg("--node").arg(node);
    run(&mut cmd, T)
}

/// Both binaries must refuse `config` with exit 2 and a message holding
/// the file name and every one of `needles` (case-insensitive).
fn assert_refused(config: &Path, node: &str, needles: &[&str]) {
    let file = config.display().to_string();
    for out in [
        mirrorctl(config, node, &["check-config"]),
        mirrord(config, node),
    ] {
        assert_eq!(
            out.code(),
            Some(2),
            "want exit 2 for a bad config\n{}",
            out.describe()
        );
        let msg = format!("{}{}", out.stderr, out.stdout);
        assert!(
            msg.contains(&file),
            "message should name the file {file}\n{}",
            out.describe()
        );
        let lower = msg.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "message should mention `{n}`\n{}",
                out.describe()
            );
        }
    }
}

/// The harness's valid config, edited by `edit`, written next to it.
fn variant(c: &common::Cluster, name: &str, edit: impl Fn(&str) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&c.config).expect("read config");
    let new = edit(&text);
    assert_ne!(new, text, "the edit for {name} changed nothing");
    let p = c.dir.join(name);
    std::fs::write(&p, new).expect("write config variant");
    p
}

#[test]
fn valid_config_passes_check_config() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    for node in ["alpha", "beta"] {
        let out = mirrorctl(&c.config, node, &["check-config"]);
        assert_eq!(
            out.code(),
            Some(0),
            "valid config refused\n{}",
            out.describe()
        );
        assert!(
            out.stdout.contains(node),
            "resolved settings should name the node {node}\n{}",
            out.describe()
        );
    }
}

#[test]
fn unknown_key_is_refused() {
    let c = ClusterSpec::new(1).mirrord_only().build();
    let p = variant(&c, "unknown-key.toml", |t| {
        t.replacen("[resource]\n", "[resource]\nbogus-key = 1\n", 1)
    });
    assert_refused(&p, "alpha", &["bogus-key", "unknown"]);
    let p = variant(&c, "unknown-node-key.toml", |t| {
        t.replacen("[[node]]\n", "[[node]]\ndiks = \"/dev/null\"\n", 1)
    });
    assert_refused(&p, "alpha", &["diks", "unknown"]);
}

#[test]
fn fencing_needs_a_known_policy_and_a_handler() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    let p = variant(&c, "fencing-no-handler.toml", |t| {
        t.replacen(
            "[resource]\n",
            "[resource]\nfencing = \"resource-only\"\n",
            1,
        )
    });
    assert_refused(&p, "alpha", &["fencing", "fence-peer"]);
    let p = variant(&c, "fencing-bad.toml", |t| {
        t.replacen("[resource]\n", "[resource]\nfencing = \"sometimes\"\n", 1)
    });
    assert_refused(&p, "alpha", &["fencing", "sometimes"]);
}

#[test]
fn missing_required_key_is_refused() {
    let c = ClusterSpec::new(1).mirrord_only().build();
    let p = variant(&c, "missing-disk.toml", |t| {
        t.lines()
            .filter(|l| !l.starts_with("disk ="))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    });
    assert_refused(&p, "alpha", &["disk", "missing"]);
    let p = variant(&c, "missing-name.toml", |t| {
        t.replacen("name = \"r0\"\n", "", 1)
    });
    assert_refused(&p, "alpha", &["name", "missing"]);
}

#[test]
fn bad_size_is_refused() {
    let c = ClusterSpec::new(1).mirrord_only().build();
    let p = variant(&c, "bad-size.toml", |t| {
        t.replacen("\n[[node]]", "\n[sync]\nrate = \"250XiB\"\n\n[[node]]", 1)
    });
    assert_refused(&p, "alpha", &["rate", "250XiB"]);
}

#[test]
fn node_matching_no_node_is_refused() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    assert_refused(&c.config, "gamma", &["gamma"]);
}

#[test]
fn status_without_daemon_exits_3() {
    let c = ClusterSpec::new(1).mirrord_only().build();
    let out = c.mirrorctl(0, &["status"]);
    assert_eq!(
        out.code(),
        Some(3),
        "status with no daemon running\n{}",
        out.describe()
    );
    let out = c.mirrorctl(0, &["status", "--json"]);
    assert_eq!(
        out.code(),
        Some(3),
        "status --json with no daemon running\n{}",
        out.describe()
    );
}

/// The `shared-secret-file` line of the harness's config, without its value.
const SECRET_KEY: &str = "shared-secret-file = ";

fn without_secret(t: &str) -> String {
    t.lines()
        .filter(|l| !l.starts_with(SECRET_KEY))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn two_nodes_without_a_secret_are_refused_with_a_way_to_make_one() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    let p = variant(&c, "no-secret.toml", without_secret);
    assert_refused(
        &p,
        "alpha",
        &["shared-secret-file", "gen-secret", "insecure-no-secret"],
    );
    // An empty secret file is no secret either.
    let empty = c.dir.join("empty.secret");
    std::fs::write(&empty, "\n").expect("write empty secret");
    let p = variant(&c, "empty-secret.toml", |t| {
        without_secret(t).replacen(
            "[resource]\n",
            &format!("[resource]\n{SECRET_KEY}\"{}\"\n", empty.display()),
            1,
        )
    });
    assert_refused(&p, "alpha", &["shared-secret-file", "empty", "gen-secret"]);
    // A single node has no peer link and needs none.
    let c1 = ClusterSpec::new(1).mirrord_only().build();
    let p = variant(&c1, "solo-no-secret.toml", without_secret);
    let out = mirrorctl(&p, "alpha", &["check-config"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}

#[test]
fn the_explicit_opt_out_is_accepted_and_cannot_be_combined_with_a_secret() {
    let c = ClusterSpec::new(2).mirrord_only().build();
    let p = variant(&c, "opt-out.toml", |t| {
        without_secret(t).replacen("[resource]\n", "[resource]\ninsecure-no-secret = true\n", 1)
    });
    let out = mirrorctl(&p, "alpha", &["check-config"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("\"insecure_no_secret\": true"),
        "{}",
        out.describe()
    );
    let p = variant(&c, "both.toml", |t| {
        t.replacen("[resource]\n", "[resource]\ninsecure-no-secret = true\n", 1)
    });
    assert_refused(&p, "alpha", &["insecure-no-secret", "shared-secret-file"]);
    // mirrord runs with it, and says what it gives up.
    let mut c = c;
    std::fs::copy(c.dir.join("opt-out.toml"), &c.config).expect("install the opt-out config");
    c.start(0);
    let log = c.log_text(0);
    assert!(
        log.contains("WARN") && log.contains("insecure-no-secret = true"),
        "{log}"
    );
    assert!(c.stop(0).is_some_and(|s| s.success()));
}

#[test]
fn gen_secret_writes_a_private_file_once() {
    use std::os::unix::fs::PermissionsExt;
    let c = ClusterSpec::new(2).mirrord_only().build();
    let secret = c.dir.join("new.secret");
    let p = variant(&c, "new-secret.toml", |t| {
        without_secret(t).replacen(
            "[resource]\n",
            &format!("[resource]\n{SECRET_KEY}\"{}\"\n", secret.display()),
            1,
        )
    });
    let out = mirrorctl(&p, "alpha", &["check-config"]);
    assert_eq!(
        out.code(),
        Some(2),
        "the file does not exist yet\n{}",
        out.describe()
    );
    let out = mirrorctl(&p, "alpha", &["gen-secret"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let meta = std::fs::metadata(&secret).expect("the secret file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read_to_string(&secret).expect("read secret");
    assert_eq!(first.trim().len(), 64, "32 random bytes in hex: {first:?}");
    let out = mirrorctl(&p, "alpha", &["check-config"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    // Never overwritten, by the config's path or an explicit one.
    for args in [
        vec!["gen-secret"],
        vec!["gen-secret", secret.to_str().expect("utf-8 path")],
    ] {
        let out = mirrorctl(&p, "alpha", &args);
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.contains("refusing to overwrite"),
            "{}",
            out.describe()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&secret).expect("read secret"),
        first
    );
    // An explicit path works without a valid config.
    let other = c.dir.join("other.secret");
    let out = mirrorctl(
        &c.dir.join("no-such.toml"),
        "alpha",
        &["gen-secret", other.to_str().expect("utf-8 path")],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_ne!(std::fs::read_to_string(&other).expect("read"), first);
}
