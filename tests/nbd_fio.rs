//! fio's nbd engine (libnbd) with data verification: random writes of
//! fixed and mixed sizes at queue depth, then fio reads everything back and
//! checks the crc32c it stored in each block.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{require_tool, run, ClusterSpec, MIB};

const T: Duration = Duration::from_secs(240);

fn fio_verify(uri: &str, dir: &std::path::Path, name: &str, extra: &[&str]) {
    let json = dir.join(format!("{name}.json"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .args([
            "--ioengine=nbd",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={uri}"))
        .args(["--output-format=json", "--runtime=120"])
        .arg(format!("--output={}", json.display()))
        .args(extra);
    // fio may drop state files in its working directory: use the temp dir.
    cmd.current_dir(dir);
    let out = run(&mut cmd, T);
    out.assert_success();
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no fio output {}: {e}\n{}", json.display(), out.describe()));
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio output is not JSON: {e}\n{text}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error\n{text}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0, "fio wrote nothing\n{text}");
    assert_eq!(
        verified, written,
        "fio should read back (verify) everything it wrote\n{text}"
    );
}

#[test]
fn fio_randwrite_4k_qd32_verify_crc32c() {
    require_tool("fio");
    let c = ClusterSpec::new(1).size(64 * MIB).start();
    fio_verify(
        &c.nbd_uri(0),
        &c.dir,
        "rand4k",
        &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32m"],
    );
}

#[test]
fn fio_mixed_sizes_verify_crc32c() {
    require_tool("fio");
    let c = ClusterSpec::new(1).size(64 * MIB).start();
    fio_verify(
        &c.nbd_uri(0),
        &c.dir,
        "mixed",
        &[
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--bs_unaligned=1",
            "--iodepth=16",
            "--size=48m",
        ],
    );
}
