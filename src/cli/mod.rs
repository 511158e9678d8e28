//! The command lines of `mirrord` and `mirrorctl` (clap definitions only), in
//! the library so that the man pages and shell completions are generated
//! from the same definitions the binaries parse (tests/cli_docs.rs).

pub mod mirrorctl;
pub mod mirrord;

use clap::ValueHint;
use std::path::PathBuf;

/// How a command names its resource: `RESOURCE` (read from
/// `$MIRROR_CONF_DIR`, default /etc/nbd-mirror, `RESOURCE.toml`) or `--config FILE`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Resource {
    /// The resource: its config is /etc/nbd-mirror/RESOURCE.toml ($MIRROR_CONF_DIR
    /// overrides the directory). Not needed with --config.
    #[arg(value_name = "RESOURCE", value_hint = ValueHint::Other)]
    pub resource: Option<String>,
}

/// `--config` and `--node`, shared by both programs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// The resource's config file (TOML), instead of a RESOURCE name.
    #[arg(long, short = 'c', global = true, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub config: Option<PathBuf>,
    /// This node's name (default: $MIRROR_NODE, else the host name).
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
}
