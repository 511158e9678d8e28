//! Opening what a node runs on: its metadata and its disk, and the core's config.

use std::path::{Path, PathBuf};

use crate::config::{self, Settings};
use crate::core::{CoreConfig, MetaState, Protocol, SyncRate};
use crate::peer::Gis;
use crate::storage::engine::{Disk, DiskOptions, EngineKind};
use crate::storage::meta::{self, Loaded, MetaLocation, MetaStore, BITMAP_BITS_PER_PAGE};

pub fn meta_location(s: &Settings) -> MetaLocation {
    match &s.node().meta_disk {
        config::MetaDisk::Internal => MetaLocation::Internal(s.node().disk.clone()),
        config::MetaDisk::External(p) => MetaLocation::External(p.clone()),
    }
}

/// Everything `mirrord` opens before it serves.
pub struct Opened {
    pub store: MetaStore,
    pub loaded: Loaded,
    pub disk: Disk,
}

pub fn open(s: &Settings) -> Result<Opened, String> {
    let node = s.node();
    let device_size = meta::device_size(&node.disk).map_err(|e| e.to_string())?;
    let loc = meta_location(s);
    let (mut store, loaded) =
        MetaStore::open(&loc, device_size, &s.resource, &node.name).map_err(|e| e.to_string())?;
    if !loaded.damaged_bitmap_pages.is_empty() {
        // Loaded as all out of sync (the resync heals those blocks); written back now, so the
        // damage is repaired on disk and a later start does not see it again.
        let mut pages = Vec::new();
        for d in &loaded.damaged_bitmap_pages {
            tracing::warn!("{}; repairing the page", d.describe(loc.path()));
            pages.push(d.page);
        }
        store
            .write_bitmap_pages(&loaded.bitmap, &pages)
            .map_err(|e| format!("repairing damaged bitmap pages: {e}"))?;
    }
    let data_size = store.layout().data_size;
    let opts = DiskOptions {
        engine: match s.disk.engine {
            config::DiskEngine::Uring => EngineKind::Uring,
            config::DiskEngine::Threads => EngineKind::Threads,
        },
        direct_io: s.disk.direct_io,
    };
    let disk = Disk::open(&node.disk, Some(data_size), &opts).map_err(|e| e.to_string())?;
    Ok(Opened {
        store,
        loaded,
        disk,
    })
}

pub fn core_config(s: &Settings, data_size: u64, al_slots: u32, max_io: u32) -> CoreConfig {
    CoreConfig {
        resource: s.resource.clone(),
        node: s.node().name.clone(),
        peer: s.peer().map(|p| p.name.clone()),
        data_size,
        protocol: match s.protocol {
            config::Protocol::A => Protocol::A,
            config::Protocol::B => Protocol::B,
            config::Protocol::C => Protocol::C,
        },
        allow_two_primaries: s.allow_two_primaries,
        auto_promote: s.auto_promote,
        al_slots: al_slots.max(2) as usize,
        bitmap_bits_per_page: BITMAP_BITS_PER_PAGE,
        sync_rate: match s.sync.rate.per_sec() {
            Some(cap) => SyncRate::Fixed(cap),
            None => SyncRate::Adaptive {
                min_rate: s.sync.min_rate.per_sec(),
            },
        },
        sync_checksum: s.sync.checksum,
        split_brain: s.split_brain.clone(),
        fencing: s.fencing,
        ping_interval_ms: s.net.ping_interval_ms,
        connect_retry_ms: s.net.connect_retry_ms,
        reconnect_grace_ms: s.net.reconnect_grace_ms,
        ping_timeout_ms: s.net.ping_timeout_ms,
        timeout_ms: s.net.timeout_ms,
        ko_count: s.net.ko_count,
        max_io,
        trim_budget_ms: crate::core::TRIM_BUDGET_MS,
        max_piece_extents: crate::core::MAX_PIECE_EXTENTS,
    }
}

pub fn meta_state(l: &Loaded) -> MetaState {
    let g = l.superblock.gi;
    MetaState {
        gis: Gis {
            current: g.current,
            bitmap: g.bitmap,
            history: g.history,
        },
        flags: l.superblock.flags,
        resync_offset: l.superblock.resync_offset,
    }
}

/// `mirrorctl create-md`: fresh metadata. A resource with a single node has
/// nothing to sync with, so its disk starts up to date; with a peer it starts
/// inconsistent with every block out of sync.
pub fn create_md(s: &Settings, force: bool) -> Result<String, String> {
    let _locks = super::exclusive::lock_disks(s)?;
    let node = s.node();
    let device_size = meta::device_size(&node.disk).map_err(|e| e.to_string())?;
    let loc = meta_location(s);
    let loaded = MetaStore::create(&loc, device_size, &s.resource, &node.name, force)
        .map_err(|e| e.to_string())?;
    if s.peer().is_none() {
        let (mut store, loaded) = MetaStore::open(&loc, device_size, &s.resource, &node.name)
            .map_err(|e| e.to_string())?;
        let mut sb = loaded.superblock.clone();
        sb.flags = meta::flags::CONSISTENT | meta::flags::WAS_UP_TO_DATE;
        let clear = vec![0u64; loaded.bitmap.len()];
        let pages: Vec<usize> = (0..store.bitmap_page_count()).collect();
        store
            .write_bitmap_pages(&clear, &pages)
            .map_err(|e| e.to_string())?;
        store.write_superblock(&sb).map_err(|e| e.to_string())?;
    }
    Ok(format!(
        "created metadata for resource {} node {} on {} ({}; data area {} bytes{})",
        s.resource,
        node.name,
        loc.path().display(),
        if loc.is_internal() {
            "internal"
        } else {
            "external"
        },
        loaded.superblock.data_size,
        if s.peer().is_none() {
            ", standalone: up to date"
        } else {
            ", all blocks out of sync"
        }
    ))
}

/// `mirrorctl dump-md`; with `all_ranges` every out-of-sync range is listed.
pub fn dump_md(s: &Settings, all_ranges: bool) -> Result<serde_json::Value, String> {
    let node = s.node();
    let device_size = meta::device_size(&node.disk).map_err(|e| e.to_string())?;
    let (layout, loaded) =
        MetaStore::inspect(&meta_location(s), device_size).map_err(|e| e.to_string())?;
    let mut v = meta::dump_json(&loaded, &layout);
    if all_ranges {
        let ranges: Vec<serde_json::Value> = meta::out_of_sync_ranges(&loaded.bitmap, layout.bitmap_bits(), usize::MAX)
            .into_iter()
            .map(|(start, len)| serde_json::json!({ "offset": start * meta::BLOCK_SIZE, "length": len * meta::BLOCK_SIZE }))
            .collect();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "out_of_sync_ranges_all".into(),
                serde_json::Value::Array(ranges),
            );
        }
    }
    Ok(v)
}

/// The peer link's shared secret: the file's contents without trailing white space. Empty
/// only when the config opts out (`insecure-no-secret`; `config::parse` refuses a two-node
/// resource with neither); an empty or unreadable file is an error naming the config key.
pub fn secret(s: &Settings) -> Result<Vec<u8>, String> {
    let Some(p) = &s.shared_secret_file else {
        debug_assert!(s.insecure_no_secret || s.peer().is_none());
        return Ok(Vec::new());
    };
    let bad = |reason: String| {
        config::ConfigError {
            file: s.file.clone(),
            key: Some("resource.shared-secret-file".into()),
            reason,
        }
        .to_string()
    };
    let mut v = std::fs::read(p).map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?;
    while v.last().is_some_and(|c| c.is_ascii_whitespace()) {
        v.pop();
    }
    if v.is_empty() {
        return Err(bad(format!(
            "{} is empty: make a secret with `mirrorctl --config {} gen-secret` (after removing \
             the empty file) and copy it to the other node",
            p.display(),
            s.file.display()
        )));
    }
    Ok(v)
}

/// Checked before a two-node resource starts (and by `check-config`): its secret can be read
/// and is not empty, and the `[tls]` files, if any, load. A standalone resource has no peer
/// link, so nothing to check.
pub fn check_secret(s: &Settings) -> Result<(), String> {
    let Some(peer) = s.peer() else {
        return Ok(());
    };
    secret(s)?;
    match &s.tls {
        Some(t) => super::peer_tls::TlsContext::load(t, &peer.name)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", s.file.display())),
        None => Ok(()),
    }
}

/// `mirrorctl gen-secret`: writes 32 random bytes, hex-encoded, to a new file `path` with mode
/// 0600. Never overwrites: both nodes must hold the same secret.
pub fn gen_secret(path: &Path) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("cannot read random bytes from /dev/urandom: {e}"))?;
    let mut text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} exists; refusing to overwrite a shared secret (both nodes must hold the same \
                 one): remove it first to make a new one",
                path.display()
            ),
            _ => format!("cannot create {}: {e}", path.display()),
        })?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(format!(
        "wrote a new shared secret to {} (mode 0600); copy it to the same path on the other node",
        path.display()
    ))
}

pub fn run_dir(s: &Settings) -> PathBuf {
    s.run_dir.clone()
}
