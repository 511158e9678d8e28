//! Config: one TOML file per resource (INTERFACE.md) turned into typed, validated
//! settings for one node. Every error names the file, the key and the reason.

pub mod adjust;
pub mod lookup;
mod table;
pub mod units;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Serialize;
use table::{KeyError, Section};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    A,
    B,
    C,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetaDisk {
    Internal,
    External(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskEngine {
    Uring,
    Threads,
}

/// What a primary does when it loses its peer (DRBD's `fencing` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    /// Keep writing; the peer may be promoted elsewhere and diverge.
    DontCare,
    /// Freeze writes, call the fence-peer handler to outdate the peer, resume
    /// per its exit code.
    ResourceOnly,
    /// As resource-only; the handler is expected to power the peer off (exit 7).
    ResourceAndStonith,
}

/// The after-sb-* policies, named as in DRBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SbPolicy {
    Disconnect,
    DiscardZeroChanges,
    DiscardLeastChanges,
    DiscardYoungerPrimary,
    DiscardOlderPrimary,
    DiscardNode(String),
    DiscardSecondary,
    Consensus,
    CallPriLostAfterSb,
    ViolentlyAs0p,
}

impl SbPolicy {
    fn parse(text: &str) -> Option<SbPolicy> {
        Some(match text {
            "disconnect" => SbPolicy::Disconnect,
            "discard-zero-changes" => SbPolicy::DiscardZeroChanges,
            "discard-least-changes" => SbPolicy::DiscardLeastChanges,
            "discard-younger-primary" => SbPolicy::DiscardYoungerPrimary,
            "discard-older-primary" => SbPolicy::DiscardOlderPrimary,
            "discard-secondary" => SbPolicy::DiscardSecondary,
            "consensus" => SbPolicy::Consensus,
            "call-pri-lost-after-sb" => SbPolicy::CallPriLostAfterSb,
            "violently-as0p" => SbPolicy::ViolentlyAs0p,
            other => SbPolicy::DiscardNode(other.strip_prefix("discard-node-")?.to_string()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitBrain {
    pub after_sb_0pri: SbPolicy,
    pub after_sb_1pri: SbPolicy,
    pub after_sb_2pri: SbPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskSettings {
    pub engine: DiskEngine,
    pub direct_io: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncSettings {
    /// The resync's pace: `auto` (adaptive, the default) or a fixed cap.
    pub rate: Rate,
    /// The floor an adaptive resync keeps while applications write: `auto`
    /// (an eighth of its idle rate) or bytes per second.
    pub min_rate: Rate,
    pub checksum: bool,
}

/// A rate key: `"auto"` or bytes per second. Shown (adjust, debug) as `auto`
/// or the number.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Auto,
    PerSec(u64),
}

impl Rate {
    pub fn per_sec(self) -> Option<u64> {
        match self {
            Rate::Auto => None,
            Rate::PerSec(n) => Some(n),
        }
    }

    /// Parses `auto` or a size (`250MiB`, per second).
    fn parse(text: &str) -> Result<Rate, String> {
        if text.trim() == "auto" {
            return Ok(Rate::Auto);
        }
        units::parse_size(text).map(Rate::PerSec)
    }
}

impl From<u64> for Rate {
    fn from(n: u64) -> Rate {
        Rate::PerSec(n)
    }
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Auto => f.write_str("auto"),
            Rate::PerSec(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rate::Auto => s.serialize_str("auto"),
            Rate::PerSec(n) => s.serialize_u64(*n),
        }
    }
}

/// Peer-link timing, DRBD's net options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetSettings {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// A peer request (write, ack) outstanding this long counts one strike.
    pub timeout_ms: u64,
    /// Strikes before the peer is declared dead and disconnected.
    pub ko_count: u64,
    pub connect_retry_ms: u64,
    /// With allow-two-primaries: how long a broken link is a pause before the
    /// nodes go on alone (0: never a pause).
    pub reconnect_grace_ms: u64,
    /// `insecure-allow-relay = true`: peer authentication does not bind the
    /// connection's endpoints, so NAT or a proxy between the nodes works, and so
    /// does a relay by anyone who can reach both peer ports. Both nodes must agree.
    pub insecure_allow_relay: bool,
    /// `data-integrity = true`: the CRC of every peer frame this node sends covers the data
    /// of writes and read replies too, not only the header and fixed fields (DRBD's
    /// data-integrity-alg; off by default, as there: TCP checksums every segment).
    pub data_integrity: bool,
}

/// `[tls]`: TLS on the peer link, mutual. Present: both nodes must have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsSettings {
    /// `ca`: PEM certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM): `[[node]] tls-cert`, else `[tls] cert`.
    pub cert: PathBuf,
    /// This node's private key (PEM): `[[node]] tls-key`, else `[tls] key`.
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Handlers {
    pub fence_peer: Option<PathBuf>,
    pub split_brain: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub name: String,
    /// Peer-link address (listen and connect). Required when there are two nodes.
    pub address: Option<SocketAddr>,
    pub disk: PathBuf,
    pub meta_disk: MetaDisk,
    pub run_dir: Option<PathBuf>,
    pub nbd_listen: Option<Listen>,
    /// Per-node override of `[metrics] listen` (two nodes on one machine).
    pub metrics_listen: Option<SocketAddr>,
}

/// Everything one node needs, resolved and validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub file: PathBuf,
    pub resource: String,
    pub protocol: Protocol,
    pub allow_two_primaries: bool,
    pub auto_promote: bool,
    pub shared_secret_file: Option<PathBuf>,
    /// `insecure-no-secret = true`: two nodes run without a shared secret (anyone who can
    /// reach the peer port can join the replication); a warning is logged at start.
    pub insecure_no_secret: bool,
    /// Run directory of this node (per-node override applied).
    pub run_dir: PathBuf,
    /// NBD listen address of this node (per-node override applied).
    pub nbd_listen: Listen,
    /// `[nbd] busy-poll-us`: how long an idle connection's reader spins for the client's next
    /// request after a small one before it sleeps (0 = never, and no spin for the rest of a
    /// large payload either).
    pub nbd_busy_poll_us: u64,
    /// `[metrics] listen` (per-node override applied): where the Prometheus endpoint
    /// listens; None (the default) serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    pub disk: DiskSettings,
    pub sync: SyncSettings,
    pub split_brain: SplitBrain,
    pub handlers: Handlers,
    pub fencing: Fencing,
    pub net: NetSettings,
    /// TLS on the peer link (`[tls]`), resolved for this node.
    pub tls: Option<TlsSettings>,
    pub nodes: Vec<NodeConfig>,
    /// Index of this node in `nodes`.
    pub this: usize,
}

impl Settings {
    pub fn node(&self) -> &NodeConfig {
        &self.nodes[self.this]
    }

    pub fn peer(&self) -> Option<&NodeConfig> {
        self.nodes
            .iter()
            .enumerate()
            .find(|(i, _)| *i != self.this)
            .map(|(_, n)| n)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join(format!("{}.ctl", self.resource))
    }
}

/// A config problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(
                f,
                "config {}: key `{}`: {}",
                self.file.display(),
                k,
                self.reason
            ),
            None => write!(f, "config {}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The node name to use: `--node`, else `MIRROR_NODE`, else the host name.
pub fn choose_node_name(cli: Option<&str>) -> Option<String> {
    if let Some(n) = cli.filter(|n| !n.is_empty()) {
        return Some(n.to_string());
    }
    if let Ok(n) = std::env::var("MIRROR_NODE") {
        if !n.is_empty() {
            return Some(n);
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// A resource name: 1 to 63 letters, digits, '-', '_' or '.', not `.` or `..` (it names
/// files: `{run-dir}/{name}.ctl`, `/etc/nbd-mirror/{name}.toml`).
pub fn valid_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Reads and validates `file` for the node chosen by [`choose_node_name`].
pub fn load(file: &Path, node_cli: Option<&str>) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        key: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(file, &text, node_cli)
}

/// Parses config text (the file name is only used in messages).
pub fn parse(file: &Path, text: &str, node_cli: Option<&str>) -> Result<Settings, ConfigError> {
    let err = |e: KeyError| ConfigError {
        file: file.to_path_buf(),
        key: Some(e.key),
        reason: e.reason,
    };
    let root: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
        file: file.to_path_buf(),
        key: None,
        reason: format!("not valid TOML: {}", e.to_string().trim()),
    })?;
    let mut top = Section::new("", &root);
    let empty = toml::Table::new();

    let res_table = top.table("resource").map_err(err)?.ok_or_else(|| {
        err(KeyError {
            key: "resource".into(),
            reason: "missing required table [resource]".into(),
        })
    })?;
    let mut res = Section::new("resource", res_table);
    let resource = res.req_str("name").map_err(err)?;
    if !valid_resource_name(&resource) {
        return Err(err(
            res.error("name", "use at most 63 letters, digits, '-', '_' or '.'")
        ));
    }
    let protocol = match res
        .choice_or("protocol", "C", &["A", "B", "C"])
        .map_err(err)?
        .as_str()
    {
        "A" => Protocol::A,
        "B" => Protocol::B,
        _ => Protocol::C,
    };
    let allow_two_primaries = res.bool_or("allow-two-primaries", false).map_err(err)?;
    if allow_two_primaries && protocol != Protocol::C {
        return Err(err(res.error(
            "allow-two-primaries",
            "two primaries need protocol C (both disks written before any ack)",
        )));
    }
    let auto_promote = res.bool_or("auto-promote", true).map_err(err)?;
    // Checked against [handlers] below; the default depends on fence-peer.
    let fencing_text = res.opt_str("fencing").map_err(err)?;
    let fencing_error = |reason: String| {
        err(KeyError {
            key: "resource.fencing".into(),
            reason,
        })
    };
    let shared_secret_file = res
        .opt_str("shared-secret-file")
        .map_err(err)?
        .map(PathBuf::from);
    let insecure_no_secret = res.bool_or("insecure-no-secret", false).map_err(err)?;
    if insecure_no_secret && shared_secret_file.is_some() {
        return Err(err(res.error(
            "insecure-no-secret",
            "is set together with shared-secret-file: keep one (the secret, preferably)",
        )));
    }
    let default_run_dir = PathBuf::from(res.str_or("run-dir", "/run/nbd-mirror").map_err(err)?);
    res.finish().map_err(err)?;

    let mut nbd = Section::new("nbd", top.table("nbd").map_err(err)?.unwrap_or(&empty));
    let listen_text = nbd.opt_str("listen").map_err(err)?;
    let default_listen = match &listen_text {
        Some(t) => Some(parse_listen(t).map_err(|r| err(nbd.error("listen", r)))?),
        None => None,
    };
    let nbd_busy_poll_us = nbd
        .u64_or("busy-poll-us", DEFAULT_BUSY_POLL_US)
        .map_err(err)?;
    if nbd_busy_poll_us > MAX_BUSY_POLL_US {
        return Err(err(nbd.error(
            "busy-poll-us",
            format!("{nbd_busy_poll_us} is more than {MAX_BUSY_POLL_US} (microseconds)"),
        )));
    }
    nbd.finish().map_err(err)?;

    let mut dk = Section::new("disk", top.table("disk").map_err(err)?.unwrap_or(&empty));
    let disk = DiskSettings {
        engine: match dk
            .choice_or("engine", "uring", &["uring", "threads"])
            .map_err(err)?
            .as_str()
        {
            "threads" => DiskEngine::Threads,
            _ => DiskEngine::Uring,
        },
        direct_io: dk.bool_or("direct-io", false).map_err(err)?,
    };
    dk.finish().map_err(err)?;

    let mut sy = Section::new("sync", top.table("sync").map_err(err)?.unwrap_or(&empty));
    let sync = SyncSettings {
        rate: sy.parsed_or("rate", Rate::Auto, Rate::parse).map_err(err)?,
        min_rate: sy
            .parsed_or("min-rate", Rate::Auto, Rate::parse)
            .map_err(err)?,
        checksum: sy.bool_or("checksum", true).map_err(err)?,
    };
    for (key, rate) in [("sync.rate", sync.rate), ("sync.min-rate", sync.min_rate)] {
        if rate.per_sec().is_some_and(|n| n < 4096) {
            return Err(err(KeyError {
                key: key.into(),
                reason: "must be `auto` or at least 4KiB per second".into(),
            }));
        }
    }
    sy.finish().map_err(err)?;

    let mut sb = Section::new(
        "split-brain",
        top.table("split-brain").map_err(err)?.unwrap_or(&empty),
    );
    let mut policy =
        |key: &'static str, default: &str, allowed: &[&str]| -> Result<SbPolicy, ConfigError> {
            let v = sb.str_or(key, default).map_err(err)?;
            let ok = allowed.contains(&v.as_str())
                || (allowed.contains(&"discard-node-NAME") && v.starts_with("discard-node-"));
            match SbPolicy::parse(&v) {
                Some(p) if ok => Ok(p),
                _ => Err(err(sb.error(
                    key,
                    format!("`{v}` is not one of: {}", allowed.join(", ")),
                ))),
            }
        };
    let after_sb_0pri = policy(
        "after-sb-0pri",
        "disconnect",
        &[
            "disconnect",
            "discard-zero-changes",
            "discard-least-changes",
            "discard-younger-primary",
            "discard-older-primary",
            "discard-node-NAME",
        ],
    )?;
    let after_sb_1pri = policy(
        "after-sb-1pri",
        "disconnect",
        &[
            "disconnect",
            "consensus",
            "discard-secondary",
            "call-pri-lost-after-sb",
            "violently-as0p",
        ],
    )?;
    let after_sb_2pri = policy(
        "after-sb-2pri",
        "disconnect",
        &["disconnect", "call-pri-lost-after-sb", "violently-as0p"],
    )?;
    sb.finish().map_err(err)?;
    let split_brain = SplitBrain {
        after_sb_0pri,
        after_sb_1pri,
        after_sb_2pri,
    };

    let mut hd = Section::new(
        "handlers",
        top.table("handlers").map_err(err)?.unwrap_or(&empty),
    );
    let handlers = Handlers {
        fence_peer: hd.opt_str("fence-peer").map_err(err)?.map(PathBuf::from),
        split_brain: hd.opt_str("split-brain").map_err(err)?.map(PathBuf::from),
    };
    hd.finish().map_err(err)?;
    let fencing = match fencing_text.as_deref() {
        // A configured fence-peer handler is meant to be called.
        None if handlers.fence_peer.is_some() => Fencing::ResourceOnly,
        None | Some("dont-care") => Fencing::DontCare,
        Some("resource-only") => Fencing::ResourceOnly,
        Some("resource-and-stonith") => Fencing::ResourceAndStonith,
        Some(v) => {
            return Err(fencing_error(format!(
                "`{v}` is not one of: dont-care, resource-only, resource-and-stonith"
            )))
        }
    };
    if fencing != Fencing::DontCare && handlers.fence_peer.is_none() {
        return Err(fencing_error(
            "fencing needs a fence-peer handler: set [handlers] fence-peer".into(),
        ));
    }

    let mut nt = Section::new("net", top.table("net").map_err(err)?.unwrap_or(&empty));
    let net = NetSettings {
        ping_interval_ms: nt
            .parsed_or("ping-interval", 2_000, units::parse_duration_ms)
            .map_err(err)?,
        ping_timeout_ms: nt
            .parsed_or("ping-timeout", 1_000, units::parse_duration_ms)
            .map_err(err)?,
        timeout_ms: nt
            .parsed_or("timeout", 6_000, units::parse_duration_ms)
            .map_err(err)?,
        ko_count: nt.u64_or("ko-count", 7).map_err(err)?,
        connect_retry_ms: nt
            .parsed_or("connect-retry", 1_000, units::parse_duration_ms)
            .map_err(err)?,
        reconnect_grace_ms: nt
            .parsed_or("reconnect-grace", 8_000, units::parse_duration_ms)
            .map_err(err)?,
        insecure_allow_relay: nt.bool_or("insecure-allow-relay", false).map_err(err)?,
        data_integrity: nt.bool_or("data-integrity", false).map_err(err)?,
    };
    for (key, v) in [
        ("ping-interval", net.ping_interval_ms),
        ("ping-timeout", net.ping_timeout_ms),
        ("timeout", net.timeout_ms),
        ("connect-retry", net.connect_retry_ms),
    ] {
        if v == 0 {
            return Err(err(KeyError {
                key: format!("net.{key}"),
                reason: "must be greater than zero".into(),
            }));
        }
    }
    nt.finish().map_err(err)?;

    let mut mt = Section::new(
        "metrics",
        top.table("metrics").map_err(err)?.unwrap_or(&empty),
    );
    let default_metrics = match mt.opt_str("listen").map_err(err)? {
        Some(t) => Some(parse_metrics_listen(&t).map_err(|r| err(mt.error("listen", r)))?),
        None => None,
    };
    mt.finish().map_err(err)?;
    let tls_table = match top.table("tls").map_err(err)? {
        Some(t) => {
            let mut ts = Section::new("tls", t);
            let ca = PathBuf::from(ts.req_str("ca").map_err(err)?);
            let cert = ts.opt_str("cert").map_err(err)?.map(PathBuf::from);
            let key = ts.opt_str("key").map_err(err)?.map(PathBuf::from);
            ts.finish().map_err(err)?;
            Some((ca, cert, key))
        }
        None => None,
    };
    let mut node_tls = Vec::new();

    let node_tables = top.table_array("node").map_err(err)?;
    top.finish().map_err(err)?;
    if node_tables.is_empty() {
        return Err(err(KeyError {
            key: "node".into(),
            reason: "at least one [[node]] is required".into(),
        }));
    }
    if node_tables.len() > 2 {
        return Err(err(KeyError {
            key: "node".into(),
            reason: format!(
                "{} [[node]] entries; at most two are supported",
                node_tables.len()
            ),
        }));
    }
    let mut nodes = Vec::new();
    for (i, t) in node_tables.iter().enumerate() {
        let mut ns = Section::new(format!("node[{i}]"), t);
        let name = ns.req_str("name").map_err(err)?;
        let address = match ns.opt_str("address").map_err(err)? {
            Some(a) => Some(resolve(&a).map_err(|r| err(ns.error("address", r)))?),
            None if node_tables.len() > 1 => {
                return Err(err(ns.error(
                    "address",
                    "missing required key (two nodes need peer-link addresses)",
                )))
            }
            None => None,
        };
        let disk = PathBuf::from(ns.req_str("disk").map_err(err)?);
        let meta_disk = match ns.str_or("meta-disk", "internal").map_err(err)?.as_str() {
            "internal" => MetaDisk::Internal,
            "" => return Err(err(ns.error("meta-disk", "must be \"internal\" or a path"))),
            p => MetaDisk::External(PathBuf::from(p)),
        };
        let run_dir = ns.opt_str("run-dir").map_err(err)?.map(PathBuf::from);
        let nbd_listen = match ns.opt_str("nbd-listen").map_err(err)? {
            Some(t) => Some(parse_listen(&t).map_err(|r| err(ns.error("nbd-listen", r)))?),
            None => None,
        };
        let metrics_listen = match ns.opt_str("metrics-listen").map_err(err)? {
            Some(t) => {
                Some(parse_metrics_listen(&t).map_err(|r| err(ns.error("metrics-listen", r)))?)
            }
            None => None,
        };
        let tls_cert = ns.opt_str("tls-cert").map_err(err)?.map(PathBuf::from);
        let tls_key = ns.opt_str("tls-key").map_err(err)?.map(PathBuf::from);
        if tls_table.is_none() && (tls_cert.is_some() || tls_key.is_some()) {
            return Err(err(ns.error(
                if tls_cert.is_some() {
                    "tls-cert"
                } else {
                    "tls-key"
                },
                "is set without a [tls] table (TLS needs at least [tls] ca)",
            )));
        }
        node_tls.push((tls_cert, tls_key));
        ns.finish().map_err(err)?;
        if nodes.iter().any(|n: &NodeConfig| n.name == name) {
            return Err(err(KeyError {
                key: format!("node[{i}].name"),
                reason: format!("node name `{name}` appears twice"),
            }));
        }
        nodes.push(NodeConfig {
            name,
            address,
            disk,
            meta_disk,
            run_dir,
            nbd_listen,
            metrics_listen,
        });
    }
    if nodes.len() == 2 && shared_secret_file.is_none() && !insecure_no_secret {
        return Err(err(KeyError {
            key: "resource.shared-secret-file".into(),
            reason: format!(
                "missing: a two-node resource needs a shared secret, so that only its peer can \
                 connect. Set shared-secret-file = \"/etc/nbd-mirror/{resource}.secret\" in \
                 [resource], run `mirrorctl --config {} gen-secret` and copy the file to the \
                 other node; or set insecure-no-secret = true to run without one",
                file.display()
            ),
        }));
    }
    if nodes.len() == 2 && nodes[0].address == nodes[1].address {
        return Err(err(KeyError {
            key: "node[1].address".into(),
            reason: "both nodes have the same address".into(),
        }));
    }

    let Some(chosen) = choose_node_name(node_cli) else {
        return Err(ConfigError {
            file: file.to_path_buf(),
            key: None,
            reason: "no node name: pass --node, set MIRROR_NODE, or set the host name".into(),
        });
    };
    let this = nodes
        .iter()
        .position(|n| n.name == chosen)
        .or_else(|| {
            let short = chosen.split('.').next().unwrap_or(&chosen);
            nodes.iter().position(|n| n.name == short)
        })
        .ok_or_else(|| ConfigError {
            file: file.to_path_buf(),
            key: Some("node.name".into()),
            reason: format!(
                "this node is `{chosen}`, which matches no [[node]] (have: {})",
                nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    if let SbPolicy::DiscardNode(victim) = &split_brain.after_sb_0pri {
        if !nodes.iter().any(|n| &n.name == victim) {
            return Err(err(KeyError {
                key: "split-brain.after-sb-0pri".into(),
                reason: format!("discard-node-{victim}: no [[node]] is named `{victim}`"),
            }));
        }
    }

    let tls = match tls_table {
        Some((ca, cert, key)) => {
            let (node_cert, node_key) = node_tls.swap_remove(this);
            let missing = |what: &str| {
                err(KeyError {
                    key: format!("tls.{what}"),
                    reason: format!(
                        "missing: node `{}` needs its TLS {what}: set tls-{what} in its [[node]] \
                         or {what} in [tls]",
                        nodes[this].name
                    ),
                })
            };
            Some(TlsSettings {
                ca,
                cert: node_cert.or(cert).ok_or_else(|| missing("cert"))?,
                key: node_key.or(key).ok_or_else(|| missing("key"))?,
            })
        }
        None => None,
    };

    let run_dir = nodes[this].run_dir.clone().unwrap_or(default_run_dir);
    let nbd_listen = nodes[this]
        .nbd_listen
        .clone()
        .or(default_listen)
        .unwrap_or_else(|| Listen::Unix(run_dir.join(format!("{resource}.nbd"))));
    let metrics_listen = nodes[this].metrics_listen.or(default_metrics);

    Ok(Settings {
        file: file.to_path_buf(),
        resource,
        protocol,
        allow_two_primaries,
        auto_promote,
        shared_secret_file,
        insecure_no_secret,
        run_dir,
        nbd_listen,
        nbd_busy_poll_us,
        metrics_listen,
        disk,
        sync,
        split_brain,
        handlers,
        fencing,
        net,
        tls,
        nodes,
        this,
    })
}

/// `[nbd] busy-poll-us` default: long enough to cover a client's turnaround after a reply on
/// this kind of VM (docs/BENCH.md), short enough to cost little CPU when no request follows.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;
/// Above this a spin costs more than the sleep and wake-up it saves.
pub const MAX_BUSY_POLL_US: u64 = 1000;

/// `unix:/path` or `host:port`.
pub fn parse_listen(text: &str) -> Result<Listen, String> {
    if let Some(p) = text.strip_prefix("unix:") {
        if p.is_empty() || !p.starts_with('/') {
            return Err(format!("`{text}`: a unix socket needs an absolute path"));
        }
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    resolve(text).map(Listen::Tcp)
}

/// `host:port` of the Prometheus endpoint (HTTP over TCP only: Prometheus scrapes no unix
/// sockets).
pub fn parse_metrics_listen(text: &str) -> Result<SocketAddr, String> {
    if text.starts_with("unix:") {
        return Err(format!(
            "`{text}`: the metrics endpoint is HTTP over TCP; use host:port, e.g. \"127.0.0.1:9942\""
        ));
    }
    resolve(text)
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!("`{text}`: expected host:port or unix:/path"));
    }
    text.to_socket_addrs()
        .map_err(|e| format!("`{text}`: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("`{text}`: resolves to no address"))
}

#[cfg(test)]
mod tests;
