//! One daemon per disk: a second mirrord on the same config exits non-zero,
//! naming the first, and leaves its sockets alone; the first keeps serving.

mod common;

use std::process::Command;
use std::time::Duration;

use common::nbd_wire::RawConn;
use common::process::own_binary;
use common::{run, ClusterSpec, EXPORT, MIB};

#[test]
fn a_second_mirrord_on_the_same_config_exits_and_the_first_keeps_serving() {
    for nodes in [1, 2] {
        let mut c = ClusterSpec::new(nodes)
            .size(16 * MIB)
            .mirrord_only()
            .start();
        let addr = c.nbd_addr(0).clone();
        let pid = c.daemon(0).pid();
        if nodes == 2 {
            // A new pair is inconsistent on both nodes: make alpha's data win.
            c.mirrorctl(0, &["primary", "--force"]).assert_success();
        }
        let (mut conn, _) = RawConn::handshake(&addr, EXPORT);
        conn.write_at(4096, &[0xab; 4096]);

        let mut second = Command::new(own_binary("mirrord"));
        second
            .arg("--config")
            .arg(&c.config)
            .arg("--node")
            .arg(c.node_name(0));
        let out = run(&mut second, Duration::from_secs(30));
        assert!(!out.success(), "the second mirrord ran\n{}", out.describe());
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.contains(&format!("mirrord (PID {pid})"))
                && out.stderr.contains(&c.disk_path(0).display().to_string()),
            "the message should name the disk and the holder\n{}",
            out.describe()
        );
        // Nor may create-md write over the running daemon's metadata.
        let out = c.mirrorctl(0, &["create-md", "--force"]);
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(out.stderr.contains("in use by"), "{}", out.describe());

        // The first still serves: the open connection, a new one, the control socket.
        c.assert_running(0);
        assert_eq!(conn.read_at(4096, 4096), vec![0xab; 4096]);
        conn.disconnect();
        let (mut again, _) = RawConn::handshake(&addr, EXPORT);
        again.write_at(0, &[0xcd; 4096]);
        assert_eq!(again.read_at(0, 8192)[..4096], [0xcd; 4096]);
        again.disconnect();
        let st = c.status_json(0);
        assert_eq!(st["nbd_clients"], 0, "{st:#}");
        let status = c.stop(0).expect("stops within the bound");
        assert!(status.success(), "{status}\n{}", c.log_text(0));
    }
}
