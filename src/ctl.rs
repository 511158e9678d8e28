//! The control-socket protocol between `mirrorctl` and `mirrord`: one JSON
//! request line, then JSON response lines (one, or a stream for `events`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum CtlRequest {
    Status,
    Events,
    Primary {
        force: bool,
    },
    Secondary,
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    Resync {
        full: bool,
        checksum: bool,
    },
    Verify,
    Invalidate,
    ResumeIo,
    /// Reread the config file and apply what a running daemon can take (daemon/adjust.rs).
    Adjust {
        #[serde(default)]
        dry_run: bool,
    },
    /// A planned restart that keeps the NBD clients (daemon/handover.rs).
    Restart {
        #[serde(default)]
        exe: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}
