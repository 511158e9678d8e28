//! Interoperability with QEMU's NBD client: qemu-io pattern writes and
//! verifies, qemu-img convert into the export and qemu-img compare.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{pattern, require_tool, run, run_ok, ClusterSpec, MIB};

const T: Duration = Duration::from_secs(120);
const VERIFY_FAILED: &str = "Pattern verification failed";

fn qemu_io(uri: &str, cmds: &[String]) -> common::CmdOutput {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run(&mut cmd, T)
}

/// Asserts qemu-io succeeded and verified everything it read. Some qemu-io
/// versions exit 0 after a failed verify, so the output is checked too.
fn assert_qemu_io_clean(out: &common::CmdOutput) {
    out.assert_success();
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !all.contains(VERIFY_FAILED),
        "qemu-io reported a verify failure\n{}",
        out.describe()
    );
    assert!(
        !all.to_lowercase().contains("error"),
        "qemu-io printed an error\n{}",
        out.describe()
    );
}

#[test]
fn qemu_io_patterns_aligned_unaligned_and_last_sector() {
    require_tool("qemu-io");
    let size = 64 * MIB;
    let c = ClusterSpec::new(1).size(size).start();
    let uri = c.nbd_uri(0);

    // (offset, length, pattern byte); ranges do not overlap.
    let cases: Vec<(u64, u64, u8)> = vec![
        (0, 4096, 0xab),
        (3 * 4096, 65536, 0x11),
        (512 * 301, 512, 0x22),
        (MIB + 7, 3001, 0x33),
        (2 * MIB + 1, 1, 0x34),
        (5 * MIB - 100, 200, 0x35), // crosses a 4 KiB and a MiB boundary
        (8 * MIB, 4 * MIB, 0x36),   // one large write
        (size - 8192 + 3, 4000, 0x55), // unaligned, near the end
        (size - 512, 511, 0x44),    // last sector but its last byte
        (size - 1, 1, 0x66),        // the very last byte
    ];
    let writes: Vec<String> = cases
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&uri, &writes);
    assert_qemu_io_clean(&out);
    assert_eq!(
        out.stdout.matches("wrote ").count(),
        cases.len(),
        "every write reported\n{}",
        out.describe()
    );

    // Verify on a new connection.
    let reads: Vec<String> = cases
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&uri, &reads);
    assert_qemu_io_clean(&out);
    assert_eq!(
        out.stdout.matches("read ").count(),
        cases.len(),
        "every read reported\n{}",
        out.describe()
    );

    // Untouched neighbours read as zero.
    let zeros = vec![
        "read -P 0 4096 8192".to_string(),
        format!("read -P 0 {} {}", MIB, 7),
        format!("read -P 0 {} {}", size - 4096, 4096 - 512),
    ];
    assert_qemu_io_clean(&qemu_io(&uri, &zeros));

    // The check itself can fail: a wrong pattern must be reported.
    let out = qemu_io(&uri, &["read -P 0x99 0 4096".to_string()]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains(VERIFY_FAILED),
        "a wrong pattern was not detected\n{}",
        out.describe()
    );
}

#[test]
fn qemu_img_convert_and_compare() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let size = 16 * MIB;
    let c = ClusterSpec::new(1).size(size).start();
    let uri = c.nbd_uri(0);
    let src = c.dir.join("src.bin");
    std::fs::write(&src, pattern::bytes(42, size as usize)).expect("write source image");

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    assert_eq!(
        out.code(),
        Some(0),
        "images should be identical\n{}",
        out.describe()
    );

    // Change one byte through NBD: compare must now see a difference.
    let off = 9 * MIB + 12345;
    let out = qemu_io(&uri, &[format!("write -P 0x5a {off} 1")]);
    assert_qemu_io_clean(&out);
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    assert_eq!(
        out.code(),
        Some(1),
        "images should differ after a write\n{}",
        out.describe()
    );
    let sector = off / 512 * 512;
    assert!(
        out.stdout.contains(&format!("offset {sector}"))
            || out.stdout.contains(&format!("offset {off}")),
        "compare should name the changed offset (~{off})\n{}",
        out.describe()
    );
}
