//! A damaged bitmap page does not stop a node: it starts, marks the page's
//! whole range out of sync and says so; `dump-md` shows the damage; the
//! resync heals the range.

mod common;

use std::os::unix::fs::FileExt;

use common::pair::*;
use common::{ClusterSpec, MIB};

/// Blocks per bitmap page (storage::meta::BITMAP_BITS_PER_PAGE).
const PAGE_BLOCKS: u64 = 32512;

fn dump_md(c: &common::Cluster, i: usize) -> serde_json::Value {
    let out = c.mirrorctl(i, &["dump-md"]);
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("dump-md is not JSON: {e}\n{}", out.describe()))
}

#[test]
fn a_corrupt_bitmap_page_is_marked_out_of_sync_and_resynced() {
    // Two bitmap pages; page 1 covers blocks 32512.. (127 MiB ..).
    let size = 160 * MIB;
    let mut c = synced_pair(
        ClusterSpec::new(2)
            .size(size)
            .table("[sync]\nrate = \"1GiB\"\nchecksum = false"),
    );
    assert!(c.stop(1).is_some(), "beta needed SIGKILL to stop");
    // Written while beta is down: alpha's bitmap has these.
    let page1_start = PAGE_BLOCKS * BLOCK;
    let written = write_blocks(&c, 0, &[PAGE_BLOCKS + 3, 5], 21);
    // Damage of beta's own making that only its bitmap knew of: a block in page 1's range
    // that differs from alpha's, and the bitmap page that recorded it broken.
    let stray = page1_start + 200 * BLOCK;
    let beta_disk = std::fs::OpenOptions::new()
        .write(true)
        .open(c.disk_path(1))
        .expect("open beta's disk");
    beta_disk
        .write_all_at(&[0x5a; BLOCK as usize], stray)
        .expect("write stray block");
    let md = dump_md(&c, 1);
    let page_offset = md["layout"]["bitmap_offset"]
        .as_u64()
        .expect("bitmap_offset")
        + 4096;
    let md_path = c.dir.join("beta.md");
    let md_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&md_path)
        .expect("open beta's metadata");
    md_file
        .write_all_at(&[0xff, 0x00, 0xff], page_offset + 1000)
        .expect("corrupt bitmap page 1");
    drop(md_file);

    // dump-md shows the damage (it used to refuse to read the metadata).
    let md = dump_md(&c, 1);
    let damaged = &md["bitmap"]["damaged_pages"];
    assert_eq!(damaged[0]["page"], 1, "{md:#}");
    assert_eq!(damaged[0]["offset"], page_offset, "{md:#}");
    let page1_len = (size / BLOCK - PAGE_BLOCKS) * BLOCK;
    assert_eq!(
        damaged[0]["out_of_sync"],
        serde_json::json!({"offset": page1_start, "length": page1_len}),
        "{md:#}"
    );

    // Beta starts (alpha holds the link down meanwhile) with page 1's range marked.
    c.mirrorctl(0, &["disconnect"]).assert_success();
    c.start(1);
    let st = c.status_json(1);
    assert_eq!(st["out_of_sync_bytes"], page1_len, "{st:#}");
    let log = c.log_text(1);
    assert!(
        log.contains("bitmap page 1 at offset")
            && log.contains(&format!("{page1_len} bytes at data offset {page1_start}")),
        "the log should say which range was marked:\n{log}"
    );
    assert!(
        dump_md(&c, 1)["bitmap"]["damaged_pages"] == serde_json::json!([]),
        "the page is repaired on disk at start"
    );

    // The resync heals it: alpha's writes and beta's stray block both become alpha's data.
    c.mirrorctl(0, &["connect"]).assert_success();
    wait_in_sync(&c, "in sync after the resync of the damaged range");
    assert_disks_identical(&c, "after the resync");
    assert_blocks(&read_disk(&c, 1), &written, "beta's disk");
    let st = c.status_json(1);
    assert_eq!(st["out_of_sync_bytes"], 0, "{st:#}");
    let (_, received) = moved(&st);
    assert!(
        received >= page1_len,
        "beta received {received} bytes: {st:#}"
    );
}
