//! Writes the TOML config for a test cluster (one resource, 1 or 2 nodes on
//! loopback, each with its own run-dir and NBD listen address).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// Where a node serves NBD.
#[derive(Debug, Clone)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl NbdAddr {
    /// The config's `listen` / `nbd-listen` value.
    pub fn listen_value(&self) -> String {
        match self {
            NbdAddr::Unix(p) => format!("unix:{}", p.display()),
            NbdAddr::Tcp(a) => a.to_string(),
        }
    }

    /// libnbd / qemu URI for `export`.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            NbdAddr::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }
}

/// Per-node facts the config needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub peer_addr: SocketAddr,
    pub disk: PathBuf,
    /// `None` means `meta-disk = "internal"`.
    pub meta: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub nbd: NbdAddr,
}

/// Whole-file settings.
#[derive(Debug, Clone)]
pub struct ResourceConfig {
    pub name: String,
    pub protocol: char,
    pub secret_file: PathBuf,
    /// Extra `key = value` lines for `[resource]`.
    pub resource_lines: Vec<String>,
    /// Extra tables appended verbatim (e.g. "[sync]\nrate = \"10MiB\"").
    pub extra_tables: Vec<String>,
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn quote(p: &Path) -> String {
    toml_string(&p.display().to_string())
}

/// A TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn render(res: &ResourceConfig, nodes: &[NodeConfig]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# written by tests/common (nbd-mirror integration tests)"
    );
    let _ = writeln!(t, "[resource]");
    let _ = writeln!(t, "name = {}", toml_string(&res.name));
    let _ = writeln!(t, "protocol = \"{}\"", res.protocol);
    let _ = writeln!(t, "shared-secret-file = {}", quote(&res.secret_file));
    for line in &res.resource_lines {
        let _ = writeln!(t, "{line}");
    }
    for table in &res.extra_tables {
        let _ = writeln!(t, "\n{table}");
    }
    for n in nodes {
        let _ = writeln!(t, "\n[[node]]");
        let _ = writeln!(t, "name = {}", toml_string(&n.name));
        let _ = writeln!(t, "address = \"{}\"", n.peer_addr);
        let _ = writeln!(t, "disk = {}", quote(&n.disk));
        match &n.meta {
            Some(p) => {
                let _ = writeln!(t, "meta-disk = {}", quote(p));
            }
            None => {
                let _ = writeln!(t, "meta-disk = \"internal\"");
            }
        }
        let _ = writeln!(t, "run-dir = {}", quote(&n.run_dir));
        let _ = writeln!(t, "nbd-listen = {}", toml_string(&n.nbd.listen_value()));
    }
    t
}
