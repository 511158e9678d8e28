//! A test cluster: a temp dir with a config for 1 or 2 nodes, backing files,
//! metadata, and one server process per node.
//!
//! ```ignore
//! let mut c = ClusterSpec::new(1).size(64 << 20).start();
//! let uri = c.nbd_uri(0);
//! ```
//!
//! `NBD_TEST_SERVER=qemu-nbd` (or `nbdkit`) runs single-node clusters with
//! that server in place of mirrord, to check the client-side tests against a
//! reference server. `KEEP_TEST_DIR=1` keeps the temp dir of every test.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::config_toml::{free_port, render, NbdAddr, NodeConfig, ResourceConfig};
use super::daemon::{Daemon, STOP_TIMEOUT};
use super::process::{own_binary, run, tail, CmdOutput};

pub const EXPORT: &str = "r0";
pub const NODE_NAMES: [&str; 2] = ["alpha", "beta"];
pub const MIB: u64 = 1 << 20;

/// Which server the harness starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Mirrord,
    QemuNbd,
    Nbdkit,
}

impl ServerKind {
    pub fn from_env() -> ServerKind {
        match std::env::var("NBD_TEST_SERVER").as_deref() {
            Ok("qemu-nbd") => ServerKind::QemuNbd,
            Ok("nbdkit") => ServerKind::Nbdkit,
            Ok("") | Ok("mirrord") | Err(_) => ServerKind::Mirrord,
            Ok(other) => panic!("NBD_TEST_SERVER={other}: expected mirrord, qemu-nbd or nbdkit"),
        }
    }
}

/// What to build; `start()` or `build()` makes the [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub size: u64,
    /// External metadata files, so the export is exactly `size` bytes.
    pub external_md: bool,
    pub tcp: bool,
    pub protocol: char,
    pub resource_lines: Vec<String>,
    pub extra_tables: Vec<String>,
    pub server: ServerKind,
    /// Each node in its own network namespace, joined by a veth pair.
    pub netns: bool,
}

impl ClusterSpec {
    /// Defaults: 64 MiB disks, external metadata, NBD on unix sockets,
    /// protocol C, server from `$NBD_TEST_SERVER` (mirrord by default).
    pub fn new(nodes: usize) -> ClusterSpec {
        assert!(nodes == 1 || nodes == 2, "the harness builds 1 or 2 nodes");
        ClusterSpec {
            nodes,
            size: 64 * MIB,
            external_md: true,
            tcp: false,
            protocol: 'C',
            resource_lines: Vec::new(),
            extra_tables: Vec::new(),
            server: ServerKind::from_env(),
            netns: false,
        }
    }
    /// Each mirrord in its own network namespace, the peer link over a veth
    /// pair the test can cut (`Cluster::net`).
    pub fn netns(mut self) -> Self {
        self.netns = true;
        self.server = ServerKind::Mirrord;
        self
    }
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = bytes;
        self
    }
    pub fn internal_md(mut self) -> Self {
        self.external_md = false;
        self
    }
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    pub fn protocol(mut self, p: char) -> Self {
        self.protocol = p;
        self
    }
    /// An extra `key = value` line in `[resource]`.
    pub fn resource_line(mut self, line: &str) -> Self {
        self.resource_lines.push(line.to_string());
        self
    }
    /// An extra table, e.g. `"[sync]\nrate = \"10MiB\""`.
    pub fn table(mut self, toml: &str) -> Self {
        self.extra_tables.push(toml.to_string());
        self
    }
    /// Forces mirrord (for tests of mirrord-only behaviour).
    pub fn mirrord_only(mut self) -> Self {
        self.server = ServerKind::Mirrord;
        self
    }

    /// Writes files and config and runs `create-md`; starts nothing.
    pub fn build(self) -> Cluster {
        Cluster::create(self)
    }

    /// `build()` then start every node and wait until each accepts NBD.
    pub fn start(self) -> Cluster {
        let mut c = self.build();
        c.start_all();
        c
    }
}

pub struct Node {
    pub cfg: NodeConfig,
    pub daemon: Option<Daemon>,
    pub log: PathBuf,
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub nodes: Vec<Node>,
    /// The namespaces and their link, with `ClusterSpec::netns`.
    pub net: Option<super::netns::NetPair>,
    tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    fn create(spec: ClusterSpec) -> Cluster {
        if spec.server == ServerKind::QemuNbd {
            assert_eq!(
                spec.nodes, 1,
                "qemu-nbd stands in for a single standalone node only"
            );
        }
        let tmp = tempfile::Builder::new()
            .prefix("nbdm-")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        let dir = tmp.path().to_path_buf();
        let secret = dir.join("r0.secret");
        std::fs::write(&secret, "test-secret-0123456789abcdef\n").expect("write secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod secret");

        let net = spec.netns.then(super::netns::NetPair::create);
        let mut cfgs = Vec::new();
        for (i, name) in NODE_NAMES.iter().take(spec.nodes).enumerate() {
            let run_dir = dir.join(format!("{name}-run"));
            std::fs::create_dir_all(&run_dir).expect("create run dir");
            let nbd = if spec.tcp {
                NbdAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
            } else {
                NbdAddr::Unix(run_dir.join(format!("{EXPORT}.nbd")))
            };
            let disk = dir.join(format!("{name}.img"));
            let f = File::create(&disk).expect("create disk file");
            f.set_len(spec.size).expect("size disk file");
            cfgs.push(NodeConfig {
                name: name.to_string(),
                peer_addr: match &net {
                    Some(n) => SocketAddr::new(n.addr[i], 7789),
                    None => SocketAddr::from(([127, 0, 0, 1], free_port())),
                },
                disk,
                meta: spec.external_md.then(|| dir.join(format!("{name}.md"))),
                run_dir,
                nbd,
            });
        }
        let res = ResourceConfig {
            name: EXPORT.to_string(),
            protocol: spec.protocol,
            secret_file: secret,
            resource_lines: spec.resource_lines.clone(),
            extra_tables: spec.extra_tables.clone(),
        };
        let config = dir.join("r0.toml");
        std::fs::write(&config, render(&res, &cfgs)).expect("write config");

        let nodes = cfgs
            .into_iter()
            .map(|cfg| {
                let log = dir.join(format!("{}.log", cfg.name));
                Node {
                    cfg,
                    daemon: None,
                    log,
                }
            })
            .collect();
        let c = Cluster {
            spec,
            dir,
            config,
            nodes,
            net,
            tmp: Some(tmp),
        };
        if c.spec.server == ServerKind::Mirrord {
            for i in 0..c.nodes.len() {
                c.mirrorctl(i, &["create-md"]).assert_success();
            }
        }
        c
    }

    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].cfg.name
    }

    pub fn nbd_addr(&self, i: usize) -> &NbdAddr {
        &self.nodes[i].cfg.nbd
    }

    /// `nbd+unix:///r0?socket=...` or `nbd://127.0.0.1:PORT/r0`.
    pub fn nbd_uri(&self, i: usize) -> String {
        self.nodes[i].cfg.nbd.uri(EXPORT)
    }

    pub fn disk_path(&self, i: usize) -> &Path {
        &self.nodes[i].cfg.disk
    }

    /// The control socket `{run-dir}/{name}.ctl`.
    pub fn ctl_socket(&self, i: usize) -> PathBuf {
        self.nodes[i].cfg.run_dir.join(format!("{EXPORT}.ctl"))
    }

    /// Starts node `i` and waits until its NBD socket accepts connections.
    pub fn start(&mut self, i: usize) {
        self.start_with_env(i, &[]);
    }

    /// [`Cluster::start`] with extra environment variables for the server.
    pub fn start_with_env(&mut self, i: usize, env: &[(&str, &str)]) {
        let config = self.config.clone();
        self.start_node(i, &config, env);
    }

    /// [`Cluster::start`] with another config file (mirrord only).
    pub fn start_with_config(&mut self, i: usize, config: &Path) {
        assert_eq!(self.spec.server, ServerKind::Mirrord);
        self.start_node(i, config, &[]);
    }

    fn start_node(&mut self, i: usize, config: &Path, env: &[(&str, &str)]) {
        assert!(self.nodes[i].daemon.is_none(), "node {i} already started");
        let node = &self.nodes[i];
        let cmd = match self.spec.server {
            ServerKind::Mirrord => {
                let mut cmd = Command::new(own_binary("mirrord"));
                cmd.arg("--config")
                    .arg(config)
                    .arg("--node")
                    .arg(&node.cfg.name);
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "info");
                }
                cmd
            }
            ServerKind::QemuNbd => {
                let mut cmd = Command::new("qemu-nbd");
                cmd.args([
                    "-f",
                    "raw",
                    "-x",
                    EXPORT,
                    "--shared=16",
                    "--persistent",
                    "--discard=unmap",
                ]);
                match &node.cfg.nbd {
                    NbdAddr::Unix(p) => {
                        cmd.arg("-k").arg(p);
                    }
                    NbdAddr::Tcp(a) => {
                        cmd.args(["-b", &a.ip().to_string(), "-p", &a.port().to_string()]);
                    }
                }
                cmd.arg(&node.cfg.disk);
                cmd
            }
            ServerKind::Nbdkit => {
                let mut cmd = Command::new("nbdkit");
                cmd.args(["-f", "--exit-with-parent", "--filter=exportname"]);
                match &node.cfg.nbd {
                    NbdAddr::Unix(p) => {
                        cmd.arg("-U").arg(p);
                    }
                    NbdAddr::Tcp(a) => {
                        cmd.args(["-i", &a.ip().to_string(), "-p", &a.port().to_string()]);
                    }
                }
                cmd.arg("file").arg(&node.cfg.disk);
                cmd.args([&format!("exportname={EXPORT}"), "exportname-strict=true"]);
                cmd
            }
        };
        let mut cmd = cmd;
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(net) = &self.net {
            cmd = net.wrap(i, &cmd);
        }
        let label = format!("{:?} node {}", self.spec.server, node.cfg.name);
        let mut d = Daemon::spawn(&label, cmd, node.log.clone());
        d.wait_ready(&node.cfg.nbd);
        self.nodes[i].daemon = Some(d);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    pub fn daemon(&mut self, i: usize) -> &mut Daemon {
        self.nodes[i]
            .daemon
            .as_mut()
            .unwrap_or_else(|| panic!("node {i} is not started"))
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .daemon
            .as_mut()
            .map(|d| d.is_running())
            .unwrap_or(false)
    }

    /// Panics with the log unless node `i` is still running.
    pub fn assert_running(&mut self, i: usize) {
        if !self.is_running(i) {
            let status = self.nodes[i].daemon.as_mut().and_then(|d| d.exit_status());
            panic!(
                "node {i} is not running (exit {:?})\n--- log ---\n{}",
                status,
                tail(&self.log_text(i), 100)
            );
        }
    }

    /// SIGTERM node `i`, wait for its exit; `None` if it needed SIGKILL.
    pub fn stop(&mut self, i: usize) -> Option<ExitStatus> {
        let mut d = self.nodes[i]
            .daemon
            .take()
            .unwrap_or_else(|| panic!("node {i} is not started"));
        d.terminate(STOP_TIMEOUT)
    }

    /// SIGKILL node `i` (a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.nodes[i].daemon.take() {
            d.kill();
        }
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// `mirrorctl --config CFG --node NAME ARGS...` with a 60 s bound.
    pub fn mirrorctl(&self, i: usize, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(own_binary("mirrorctl"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&self.nodes[i].cfg.name)
            .args(args);
        run(&mut cmd, Duration::from_secs(60))
    }

    /// `mirrorctl status --json`, parsed.
    pub fn status_json(&self, i: usize) -> serde_json::Value {
        let out = self.mirrorctl(i, &["status", "--json"]);
        out.assert_success();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{}", out.describe()))
    }

    /// Polls `status --json` of node `i` (every 100 ms, at most `bound`)
    /// until `pred` holds; returns that status, or panics with the last
    /// status and the node logs.
    pub fn wait_status(
        &self,
        i: usize,
        bound: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + bound;
        let mut last = serde_json::Value::Null;
        loop {
            let out = self.mirrorctl(i, &["status", "--json"]);
            if out.success() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
                    if pred(&v) {
                        return v;
                    }
                    last = v;
                }
            }
            if std::time::Instant::now() >= deadline {
                // The logs follow from the cluster's drop.
                panic!("node {i}: not {what} within {bound:?}; last status: {last:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The export size clients should see, when the harness knows it
    /// (external metadata or qemu-nbd: exactly the file size).
    pub fn expected_export_size(&self) -> Option<u64> {
        (self.spec.external_md || self.spec.server != ServerKind::Mirrord).then_some(self.spec.size)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for n in &mut self.nodes {
            if let Some(mut d) = n.daemon.take() {
                if d.terminate(STOP_TIMEOUT).is_none() {
                    eprintln!(
                        "{}: needed SIGKILL after SIGTERM + {:?}",
                        d.label, STOP_TIMEOUT
                    );
                }
            }
        }
        if panicking {
            for n in &self.nodes {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                eprintln!(
                    "---- log of node {} ({}) ----\n{}",
                    n.cfg.name,
                    n.log.display(),
                    tail(&text, 150)
                );
            }
        }
        if panicking || std::env::var_os("KEEP_TEST_DIR").is_some() {
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!("test dir kept: {}", kept.display());
            }
        }
    }
}
