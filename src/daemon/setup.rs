//! Opening what a node runs on: its metadata and its disk, and the core's config.

use std::path::PathBuf;

use crate::config::{self, Settings};
use crate::core::{CoreConfig, MetaState, Protocol};
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
    let (store, loaded) =
        MetaStore::open(&loc, device_size, &s.resource, &node.name).map_err(|e| e.to_string())?;
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
        sync_rate: s.sync.rate,
        sync_checksum: s.sync.checksum,
        split_brain: s.split_brain.clone(),
        fencing: s.fencing,
        ping_interval_ms: s.net.ping_interval_ms,
        connect_retry_ms: s.net.connect_retry_ms,
        ping_timeout_ms: s.net.ping_timeout_ms,
        timeout_ms: s.net.timeout_ms,
        ko_count: s.net.ko_count,
        max_io,
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

pub fn secret(s: &Settings) -> Result<Vec<u8>, String> {
    match &s.shared_secret_file {
        None => Ok(Vec::new()),
        Some(p) => std::fs::read(p)
            .map(|mut v| {
                while v.last().is_some_and(|c| c.is_ascii_whitespace()) {
                    v.pop();
                }
                v
            })
            .map_err(|e| format!("cannot read shared-secret-file {}: {e}", p.display())),
    }
}

pub fn run_dir(s: &Settings) -> PathBuf {
    s.run_dir.clone()
}
