//! Interoperability with libnbd's tools and bindings: nbdcopy, nbdinfo
//! (size, block sizes, LIST, --map after TRIM) and python3-libnbd (64
//! asynchronous commands in flight, multi-conn, WRITE_ZEROES).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{pattern, require_tool, run_client, run_ok, ClusterSpec, EXPORT, MIB};

const T: Duration = Duration::from_secs(180);

fn nbdinfo_json(args: &[&str], uri: &str) -> serde_json::Value {
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args).arg(uri), T);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo output is not JSON: {e}\n{}", out.describe()))
}

#[test]
fn nbdcopy_random_64mib_in_and_out() {
    require_tool("nbdcopy");
    let size = 64 * MIB;
    let c = ClusterSpec::new(1).size(size).start();
    let uri = c.nbd_uri(0);
    let src = c.dir.join("src.bin");
    let dst = c.dir.join("dst.bin");
    let data = pattern::bytes(64, size as usize);
    std::fs::write(&src, &data).expect("write source");

    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri), T);
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&dst), T);
    let back = std::fs::read(&dst).expect("read copy");
    pattern::assert_same(&back, &data, "nbdcopy round trip");

    // Once more with several connections and requests in flight.
    std::fs::remove_file(&dst).expect("remove copy");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&uri)
            .arg(&dst),
        T,
    );
    pattern::assert_same(
        &std::fs::read(&dst).expect("read copy"),
        &data,
        "nbdcopy with 4 connections",
    );
}

#[test]
fn nbdinfo_shows_name_size_and_block_sizes() {
    require_tool("nbdinfo");
    let size = 48 * MIB;
    let c = ClusterSpec::new(1).size(size).start();
    let v = nbdinfo_json(&[], &c.nbd_uri(0));
    let ex = &v["exports"][0];
    assert_eq!(ex["export-name"], EXPORT, "{v:#}");
    assert_eq!(
        ex["export-size"].as_u64(),
        c.expected_export_size(),
        "{v:#}"
    );
    assert_eq!(ex["is_read_only"], false, "{v:#}");
    for k in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(ex[k], true, "{k} should be true: {v:#}");
    }
    let min = ex["block_size_minimum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no minimum block size: {v:#}"));
    let pref = ex["block_size_preferred"]
        .as_u64()
        .unwrap_or_else(|| panic!("no preferred block size: {v:#}"));
    let max = ex["block_size_maximum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no maximum block size: {v:#}"));
    assert!(min.is_power_of_two() && min <= 65536, "minimum {min}");
    assert!(
        pref.is_power_of_two() && pref >= min.max(512),
        "preferred {pref}"
    );
    assert!(max >= MIB && max % min == 0, "maximum {max} (min {min})");
    assert_eq!(
        size % min,
        0,
        "export size should be a multiple of the minimum block size"
    );
}

#[test]
fn nbdinfo_list_names_the_export() {
    require_tool("nbdinfo");
    let c = ClusterSpec::new(1).size(8 * MIB).start();
    let v = nbdinfo_json(&["--list"], &c.nbd_uri(0));
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {v:#}"))
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, vec![EXPORT], "{v:#}");
}

/// Extents from `nbdinfo --map --json`: (offset, length, type bits).
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = nbdinfo_json(&["--map"], uri);
    v.as_array()
        .unwrap_or_else(|| panic!("--map output is not an array: {v:#}"))
        .iter()
        .map(|e| {
            let f = |k: &str| {
                e[k].as_u64()
                    .unwrap_or_else(|| panic!("extent without {k}: {e}"))
            };
            (f("offset"), f("length"), f("type"))
        })
        .collect()
}

/// True if every extent overlapping [off, off+len) has the HOLE bit (1).
fn all_hole(extents: &[(u64, u64, u64)], off: u64, len: u64) -> bool {
    let overlapping: Vec<_> = extents
        .iter()
        .filter(|(o, l, _)| *o < off + len && o + l > off)
        .collect();
    !overlapping.is_empty() && overlapping.iter().all(|(_, _, t)| t & 1 == 1)
}

fn all_data(extents: &[(u64, u64, u64)], off: u64, len: u64) -> bool {
    let overlapping: Vec<_> = extents
        .iter()
        .filter(|(o, l, _)| *o < off + len && o + l > off)
        .collect();
    !overlapping.is_empty() && overlapping.iter().all(|(_, _, t)| t & 1 == 0)
}

#[test]
fn block_status_shows_hole_after_trim() {
    require_tool("nbdinfo");
    let c = ClusterSpec::new(1).size(16 * MIB).start();
    let uri = c.nbd_uri(0);
    let (off, len) = (2 * MIB, MIB);
    run_client(
        "trim.py",
        &["fill", &uri, &MIB.to_string(), &(4 * MIB).to_string()],
        T,
    )
    .assert_success();
    let before = map(&uri);
    assert!(
        all_data(&before, off, len),
        "written range should be data before the trim: {before:?}"
    );
    run_client(
        "trim.py",
        &["trim", &uri, &off.to_string(), &len.to_string()],
        T,
    )
    .assert_success();
    let after = map(&uri);
    assert!(
        all_hole(&after, off, len),
        "trimmed range should be a hole: {after:?}"
    );
    assert!(
        all_data(&after, MIB, MIB),
        "data before the trimmed range should stay data: {after:?}"
    );
    assert!(
        all_data(&after, 3 * MIB, 2 * MIB),
        "data after the trimmed range should stay data: {after:?}"
    );
}

#[test]
fn python_64_async_commands_in_flight() {
    let c = ClusterSpec::new(1).size(64 * MIB).start();
    let out = run_client("aio_pattern.py", &[&c.nbd_uri(0), "11"], T);
    out.assert_success();
    assert!(out.stdout.contains("ok:"), "{}", out.describe());
}

#[test]
fn python_multi_conn_write_flush_read() {
    let c = ClusterSpec::new(1).size(32 * MIB).start();
    let out = run_client("multi_conn.py", &[&c.nbd_uri(0), "16"], T);
    out.assert_success();
    assert!(out.stdout.contains("ok:"), "{}", out.describe());
}

#[test]
fn python_write_zeroes() {
    let c = ClusterSpec::new(1).size(16 * MIB).start();
    let out = run_client("write_zeroes.py", &[&c.nbd_uri(0)], T);
    out.assert_success();
    assert!(out.stdout.contains("ok:"), "{}", out.describe());
}

#[test]
fn clients_work_over_tcp_too() {
    require_tool("nbdcopy");
    let size = 16 * MIB;
    let c = ClusterSpec::new(1).size(size).tcp().start();
    let uri = c.nbd_uri(0);
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let out = run_client("aio_pattern.py", &[&uri, "5"], T);
    out.assert_success();
    let src = c.dir.join("src.bin");
    let dst = c.dir.join("dst.bin");
    let data = pattern::bytes(8, size as usize);
    std::fs::write(&src, &data).expect("write source");
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri), T);
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&dst), T);
    pattern::assert_same(
        &std::fs::read(&dst).expect("read copy"),
        &data,
        "nbdcopy over TCP",
    );
}
