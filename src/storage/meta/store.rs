//! Synchronous file I/O for the metadata: pread/pwrite + fdatasync.
//! Call it from a blocking thread; every `write_*` is durable on return.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::activity_log::{self, ring_slot, DEFAULT_AL_SLOTS};
use super::bitmap_pages::{self, page_bits, page_words, BITMAP_BITS_PER_PAGE};
use super::block::BLOCK;
use super::superblock::{self, flags, GenerationIds, Superblock, SuperblockRecord};
use super::{random, DecodeError, Layout, MetaError, MetaLocation, BLOCK_SIZE};

/// Most blocks moved by one pread/pwrite (1 MiB).
const MAX_IO_BLOCKS: usize = 256;

/// Everything the metadata holds, as loaded or freshly created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub superblock: Superblock,
    /// `layout.bitmap_words()` words; bit i = data block i out of sync.
    pub bitmap: Vec<u64>,
    /// Active extents of the newest valid activity-log transaction.
    pub active_extents: Vec<u32>,
    /// Bitmap pages that failed to decode; their blocks are loaded as out of sync.
    pub damaged_bitmap_pages: Vec<BitmapDamage>,
}

/// A bitmap page that failed to decode at load. Its blocks were loaded as out of sync, the
/// safe reading (they are resynced); writing the page again repairs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDamage {
    pub page: usize,
    /// Byte offset of the page in the metadata.
    pub offset: u64,
    pub error: DecodeError,
    /// The data blocks the page covers: first block, count.
    pub blocks: (u64, u64),
}

impl BitmapDamage {
    /// What is wrong, where, and what was done about it.
    pub fn describe(&self, path: &Path) -> String {
        let corrupt = MetaError::BitmapPageCorrupt {
            path: path.to_path_buf(),
            page: self.page,
            offset: self.offset,
            error: self.error.clone(),
        };
        let (first, count) = self.blocks;
        format!(
            "{corrupt}; its {count} blocks ({} bytes at data offset {}) are marked out of sync",
            count * BLOCK_SIZE,
            first * BLOCK_SIZE
        )
    }
}

/// Owns the open metadata file and the write positions of the rings.
#[derive(Debug)]
pub struct MetaStore {
    file: File,
    layout: Layout,
    /// The identity and sizes fixed at create time; `write_superblock` may not change them.
    fixed: Superblock,
    /// Seq of the newest superblock on disk, and its slot (the next write goes to the other).
    sb_seq: u64,
    sb_slot: usize,
    /// Seq of the newest activity-log transaction on disk.
    al_seq: u64,
}

/// Size of a block device or regular file, in bytes.
pub fn device_size(path: &Path) -> Result<u64, MetaError> {
    let file = File::open(path).map_err(|e| MetaError::io(path, "opening to read its size", e))?;
    file_len(&file, path)
}

fn file_len(file: &File, path: &Path) -> Result<u64, MetaError> {
    // SEEK_END works for block devices, where metadata().len() is 0.
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| MetaError::io(path, "reading the size", e))
}

fn read_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, MetaError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| MetaError::io(path, format!("reading {what} at offset {offset}"), e))?;
    Ok(buf)
}

fn write_at(
    file: &File,
    path: &Path,
    offset: u64,
    data: &[u8],
    what: &str,
) -> Result<(), MetaError> {
    debug_assert_eq!(data.len() % BLOCK, 0);
    file.write_all_at(data, offset)
        .map_err(|e| MetaError::io(path, format!("writing {what} at offset {offset}"), e))
}

fn sync(file: &File, path: &Path, what: &str) -> Result<(), MetaError> {
    file.sync_data()
        .map_err(|e| MetaError::io(path, format!("flushing {what} (fdatasync)"), e))
}

/// Makes a newly created file's directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), MetaError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| MetaError::io(parent, "syncing the directory of the new metadata file", e))
}

fn invalid(e: DecodeError) -> MetaError {
    MetaError::InvalidArgument(e.to_string())
}

/// Opens the metadata file read-write (or read-only), creating an external one if asked.
fn open_file(loc: &MetaLocation, write: bool, create: bool) -> Result<File, MetaError> {
    let path = loc.path();
    let mut opts = OpenOptions::new();
    opts.read(true).write(write);
    if create && !loc.is_internal() {
        opts.create(true).mode(0o600);
    }
    opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !create {
            MetaError::NotFound {
                path: path.to_path_buf(),
                internal: loc.is_internal(),
            }
        } else {
            MetaError::io(path, "opening the metadata", e)
        }
    })
}

fn too_small(layout: &Layout, size: u64) -> MetaError {
    let what = if layout.location.is_internal() {
        "disk"
    } else {
        "metadata file"
    };
    MetaError::TooSmall {
        path: layout.location.path().to_path_buf(),
        what,
        size,
        needed: layout.meta_end(),
    }
}

/// Reads both superblock slots and picks the newest valid one (and its slot).
fn load_superblock(file: &File, layout: &Layout) -> Result<(SuperblockRecord, usize), MetaError> {
    let path = layout.location.path();
    let mut decoded = Vec::with_capacity(2);
    for (slot, &offset) in layout.superblock_offsets.iter().enumerate() {
        let buf = read_at(
            file,
            path,
            offset,
            BLOCK,
            &format!("superblock slot {slot}"),
        )?;
        decoded.push(superblock::decode_superblock(&buf));
    }
    // A checksummed block of another version may be the newest: never fall back past it.
    for r in &decoded {
        if let Err(DecodeError::Version { found, supported }) = r {
            return Err(MetaError::Version {
                path: path.to_path_buf(),
                found: *found,
                supported: *supported,
            });
        }
    }
    let best = decoded
        .iter()
        .enumerate()
        .filter_map(|(slot, r)| r.as_ref().ok().map(|rec| (rec, slot)))
        .max_by_key(|(rec, _)| rec.seq);
    if let Some((rec, slot)) = best {
        return Ok((rec.clone(), slot));
    }
    let errors: Vec<DecodeError> = decoded.into_iter().filter_map(Result::err).collect();
    if errors.iter().all(|e| *e == DecodeError::BadMagic) {
        return Err(MetaError::NotFound {
            path: path.to_path_buf(),
            internal: layout.location.is_internal(),
        });
    }
    let errors: [DecodeError; 2] = errors
        .try_into()
        .map_err(|_| MetaError::InvalidArgument("expected two superblock decode errors".into()))?;
    Err(MetaError::SuperblockCorrupt {
        path: path.to_path_buf(),
        offsets: layout.superblock_offsets,
        errors,
    })
}

/// Checks the superblock against the expected identity and the computed layout.
fn check_superblock(
    rec: &SuperblockRecord,
    layout: &Layout,
    identity: Option<(&str, &str)>,
) -> Result<(), MetaError> {
    let path = layout.location.path().to_path_buf();
    let sb = &rec.sb;
    if let Some((resource, node)) = identity {
        if sb.resource != resource || sb.node != node {
            return Err(MetaError::IdentityMismatch {
                path,
                found_resource: sb.resource.clone(),
                found_node: sb.node.clone(),
                expected_resource: resource.to_string(),
                expected_node: node.to_string(),
            });
        }
    }
    if sb.data_size != layout.data_size {
        return Err(MetaError::SizeMismatch {
            path,
            device_size: layout.device_size,
            data_size: layout.data_size,
            meta_data_size: sb.data_size,
        });
    }
    if rec.al_blocks != layout.al_blocks {
        return Err(MetaError::LayoutMismatch {
            path,
            field: "activity-log ring blocks",
            found: rec.al_blocks.into(),
            expected: layout.al_blocks.into(),
        });
    }
    if rec.bitmap_pages as usize != layout.bitmap_pages {
        return Err(MetaError::LayoutMismatch {
            path,
            field: "bitmap pages",
            found: rec.bitmap_pages.into(),
            expected: layout.bitmap_pages as u64,
        });
    }
    Ok(())
}

/// Checks an extent list against the slot count and the data size.
fn check_extents(extents: &[u32], al_slots: u32, layout: &Layout) -> Result<(), String> {
    if extents.len() > al_slots as usize {
        return Err(format!(
            "{} active extents, but only {al_slots} slots",
            extents.len()
        ));
    }
    let count = layout.al_extent_count();
    match extents.iter().find(|&&e| u64::from(e) >= count) {
        Some(e) => Err(format!(
            "extent {e} is past the end of the data ({count} extents)"
        )),
        None => Ok(()),
    }
}

/// Reads the ring and returns the newest valid transaction.
fn load_activity_log(
    file: &File,
    layout: &Layout,
    sb: &Superblock,
) -> Result<activity_log::AlTransaction, MetaError> {
    let path = layout.location.path();
    let ring = read_at(
        file,
        path,
        layout.al_offset,
        layout.al_blocks as usize * BLOCK,
        "the activity log",
    )?;
    let (best, failures) =
        activity_log::newest_transaction(ring.chunks_exact(BLOCK), sb.device_uuid);
    let Some(tx) = best else {
        let detail = failures
            .iter()
            .map(|(i, e)| {
                format!(
                    "block {i} at offset {}: {e}",
                    layout.al_block_offset(*i as u32)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(MetaError::ActivityLogCorrupt {
            path: path.to_path_buf(),
            detail: format!("no valid transaction ({detail})"),
        });
    };
    check_extents(&tx.extents, sb.al_slots, layout).map_err(|msg| {
        MetaError::ActivityLogCorrupt {
            path: path.to_path_buf(),
            detail: format!("transaction {}: {msg}", tx.seq),
        }
    })?;
    Ok(tx)
}

/// The bitmap, with the pages that failed to decode loaded as all out of sync.
fn load_bitmap(
    file: &File,
    layout: &Layout,
    device_uuid: u64,
) -> Result<(Vec<u64>, Vec<BitmapDamage>), MetaError> {
    let path = layout.location.path();
    let bits = layout.bitmap_bits();
    let mut bitmap = vec![0u64; layout.bitmap_words()];
    let mut damaged = Vec::new();
    let mut first = 0;
    while first < layout.bitmap_pages {
        let count = (layout.bitmap_pages - first).min(MAX_IO_BLOCKS);
        let offset = layout.bitmap_page_offset(first);
        let buf = read_at(file, path, offset, count * BLOCK, "bitmap pages")?;
        for (i, block) in buf.chunks_exact(BLOCK).enumerate() {
            let page = first + i;
            let words = page_words(page, bits);
            let in_page = page_bits(page, bits);
            let decoded = bitmap_pages::decode_bitmap_page(
                block,
                page as u32,
                device_uuid,
                in_page,
                &mut bitmap[words.clone()],
            );
            if let Err(error) = decoded {
                let ones = &mut bitmap[words];
                ones.fill(u64::MAX);
                if let Some(last) = ones.last_mut().filter(|_| in_page % 64 != 0) {
                    *last = (1u64 << (in_page % 64)) - 1;
                }
                damaged.push(BitmapDamage {
                    page,
                    offset: layout.bitmap_page_offset(page),
                    error,
                    blocks: (page as u64 * BITMAP_BITS_PER_PAGE, in_page),
                });
            }
        }
        first += count;
    }
    debug_assert!(damaged.iter().all(|d| d.blocks.0 + d.blocks.1 <= bits));
    Ok((bitmap, damaged))
}

/// Encodes `page` of `bitmap`, clearing bits past the end of the data.
fn encode_page(
    layout: &Layout,
    device_uuid: u64,
    bitmap: &[u64],
    page: usize,
) -> Result<Vec<u8>, MetaError> {
    let bits = layout.bitmap_bits();
    let mut words = bitmap[page_words(page, bits)].to_vec();
    let tail = page_bits(page, bits) % 64;
    if let Some(last) = words.last_mut() {
        if tail != 0 {
            *last &= (1u64 << tail) - 1;
        }
    }
    bitmap_pages::encode_bitmap_page(device_uuid, page as u32, &words).map_err(invalid)
}

/// Writes the given bitmap pages, coalescing consecutive ones; does not sync.
fn write_pages(
    file: &File,
    layout: &Layout,
    device_uuid: u64,
    bitmap: &[u64],
    pages: &[usize],
) -> Result<(), MetaError> {
    if bitmap.len() != layout.bitmap_words() {
        return Err(MetaError::InvalidArgument(format!(
            "bitmap has {} words, the data area needs {}",
            bitmap.len(),
            layout.bitmap_words()
        )));
    }
    if let Some(p) = pages.iter().find(|&&p| p >= layout.bitmap_pages) {
        return Err(MetaError::InvalidArgument(format!(
            "bitmap page {p} does not exist (there are {})",
            layout.bitmap_pages
        )));
    }
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let path = layout.location.path();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut buf = encode_page(layout, device_uuid, bitmap, start)?;
        i += 1;
        while i < sorted.len()
            && sorted[i] == sorted[i - 1] + 1
            && buf.len() < MAX_IO_BLOCKS * BLOCK
        {
            buf.extend_from_slice(&encode_page(layout, device_uuid, bitmap, sorted[i])?);
            i += 1;
        }
        write_at(
            file,
            path,
            layout.bitmap_page_offset(start),
            &buf,
            "bitmap pages",
        )?;
    }
    Ok(())
}

impl MetaStore {
    /// `create-md`: writes a fresh superblock (new random current generation id,
    /// flags = FULL_SYNC_NEEDED, i.e. not consistent), every bitmap bit set and an
    /// empty activity log. Refuses with `MetaError::Exists` if a checksummed
    /// superblock is present, unless `force`. An external metadata file is created
    /// (mode 0600) or extended as needed.
    ///
    /// Write order: old superblocks zeroed, then the ring and bitmap, then the two
    /// superblock slots, each step synced; a crash midway leaves no valid metadata.
    pub fn create(
        loc: &MetaLocation,
        device_size: u64,
        resource: &str,
        node: &str,
        force: bool,
    ) -> Result<Loaded, MetaError> {
        let layout = Layout::compute(device_size, loc)?;
        let path = loc.path();
        let sb = Superblock {
            resource: resource.to_string(),
            node: node.to_string(),
            device_uuid: random::new_device_uuid()?,
            data_size: layout.data_size,
            gi: GenerationIds {
                current: random::new_generation_id()?,
                bitmap: 0,
                history: [0, 0],
            },
            flags: flags::FULL_SYNC_NEEDED,
            resync_offset: 0,
            al_slots: DEFAULT_AL_SLOTS,
        };
        superblock::validate(&sb).map_err(invalid)?;

        let existed = path.exists();
        let file = open_file(loc, true, true)?;
        if !existed {
            sync_parent_dir(path)?;
        }
        let mut len = file_len(&file, path)?;
        if len >= layout.superblock_offsets[1] + BLOCK_SIZE && !force {
            for (slot, &offset) in layout.superblock_offsets.iter().enumerate() {
                let buf = read_at(
                    &file,
                    path,
                    offset,
                    BLOCK,
                    &format!("superblock slot {slot}"),
                )?;
                if superblock::looks_valid(&buf) {
                    let (resource, node) = match superblock::decode_superblock(&buf) {
                        Ok(rec) => (rec.sb.resource, rec.sb.node),
                        Err(e) => ("?".into(), format!("? ({e})")),
                    };
                    return Err(MetaError::Exists {
                        path: path.to_path_buf(),
                        resource,
                        node,
                    });
                }
            }
        }
        if len < layout.meta_end()
            && !loc.is_internal()
            && file.metadata().is_ok_and(|m| m.is_file())
        {
            file.set_len(layout.meta_end())
                .map_err(|e| MetaError::io(path, "extending the metadata file", e))?;
            len = layout.meta_end();
        }
        if len < layout.meta_end() {
            return Err(too_small(&layout, len));
        }

        let zero = vec![0u8; BLOCK];
        for &offset in &layout.superblock_offsets {
            write_at(&file, path, offset, &zero, "superblock (invalidating)")?;
        }
        sync(&file, path, "superblock invalidation")?;

        let mut ring =
            activity_log::encode_al_transaction(sb.device_uuid, 1, &[]).map_err(invalid)?;
        ring.resize(layout.al_blocks as usize * BLOCK, 0);
        write_at(&file, path, layout.al_offset, &ring, "the activity log")?;
        let bitmap = full_bitmap(&layout);
        let all: Vec<usize> = (0..layout.bitmap_pages).collect();
        write_pages(&file, &layout, sb.device_uuid, &bitmap, &all)?;
        sync(&file, path, "activity log and bitmap")?;

        for (slot, &offset) in layout.superblock_offsets.iter().enumerate() {
            let rec = SuperblockRecord {
                sb: sb.clone(),
                seq: slot as u64 + 1,
                al_blocks: layout.al_blocks,
                bitmap_pages: layout.bitmap_pages as u32,
            };
            let buf = superblock::encode_superblock(&rec).map_err(invalid)?;
            write_at(
                &file,
                path,
                offset,
                &buf,
                &format!("superblock slot {slot}"),
            )?;
        }
        sync(&file, path, "superblock")?;
        Ok(Loaded {
            superblock: sb,
            bitmap,
            active_extents: Vec::new(),
            damaged_bitmap_pages: Vec::new(),
        })
    }

    /// Opens and validates the metadata of `resource`/`node` (read-write).
    pub fn open(
        loc: &MetaLocation,
        device_size: u64,
        resource: &str,
        node: &str,
    ) -> Result<(MetaStore, Loaded), MetaError> {
        let layout = Layout::compute(device_size, loc)?;
        let file = open_file(loc, true, false)?;
        Self::load(file, layout, Some((resource, node)))
    }

    /// Reads the metadata read-only without an identity check (for `dump-md`).
    pub fn inspect(loc: &MetaLocation, device_size: u64) -> Result<(Layout, Loaded), MetaError> {
        let layout = Layout::compute(device_size, loc)?;
        let file = open_file(loc, false, false)?;
        let (store, loaded) = Self::load(file, layout, None)?;
        Ok((store.layout, loaded))
    }

    fn load(
        file: File,
        layout: Layout,
        identity: Option<(&str, &str)>,
    ) -> Result<(MetaStore, Loaded), MetaError> {
        let path = layout.location.path();
        let len = file_len(&file, path)?;
        if len < layout.superblock_offsets[1] + BLOCK_SIZE {
            if len == 0 && !layout.location.is_internal() {
                return Err(MetaError::NotFound {
                    path: path.to_path_buf(),
                    internal: false,
                });
            }
            return Err(too_small(&layout, len));
        }
        let (rec, sb_slot) = load_superblock(&file, &layout)?;
        check_superblock(&rec, &layout, identity)?;
        if len < layout.meta_end() {
            return Err(too_small(&layout, len));
        }
        let tx = load_activity_log(&file, &layout, &rec.sb)?;
        let (bitmap, damaged_bitmap_pages) = load_bitmap(&file, &layout, rec.sb.device_uuid)?;
        let loaded = Loaded {
            superblock: rec.sb.clone(),
            bitmap,
            active_extents: tx.extents,
            damaged_bitmap_pages,
        };
        let store = MetaStore {
            file,
            layout,
            fixed: rec.sb,
            sb_seq: rec.seq,
            sb_slot,
            al_seq: tx.seq,
        };
        Ok((store, loaded))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Seq of the newest superblock on disk.
    pub fn superblock_seq(&self) -> u64 {
        self.sb_seq
    }

    /// Seq of the newest activity-log transaction on disk.
    pub fn activity_log_seq(&self) -> u64 {
        self.al_seq
    }

    /// Writes `sb` to the older slot with the next seq, then fdatasync.
    /// Identity, device uuid, data size and slot count cannot change.
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<(), MetaError> {
        let fixed = &self.fixed;
        let changed = [
            ("resource", sb.resource != fixed.resource),
            ("node", sb.node != fixed.node),
            ("device uuid", sb.device_uuid != fixed.device_uuid),
            ("data size", sb.data_size != fixed.data_size),
            ("activity-log slots", sb.al_slots != fixed.al_slots),
        ];
        if let Some((field, _)) = changed.iter().find(|(_, c)| *c) {
            return Err(MetaError::InvalidArgument(format!(
                "the superblock's {field} cannot change"
            )));
        }
        let seq = self.sb_seq + 1;
        let slot = 1 - self.sb_slot;
        let rec = SuperblockRecord {
            sb: sb.clone(),
            seq,
            al_blocks: self.layout.al_blocks,
            bitmap_pages: self.layout.bitmap_pages as u32,
        };
        let buf = superblock::encode_superblock(&rec).map_err(invalid)?;
        let path = self.layout.location.path();
        write_at(
            &self.file,
            path,
            self.layout.superblock_offsets[slot],
            &buf,
            &format!("superblock slot {slot}"),
        )?;
        sync(&self.file, path, "superblock")?;
        // Only now is the new slot the newest; a failed write is retried into the same slot.
        self.sb_seq = seq;
        self.sb_slot = slot;
        Ok(())
    }

    /// Appends a transaction holding the complete active set, then fdatasync.
    pub fn write_activity_log(&mut self, extents: &[u32]) -> Result<(), MetaError> {
        check_extents(extents, self.fixed.al_slots, &self.layout)
            .map_err(MetaError::InvalidArgument)?;
        let seq = self.al_seq + 1;
        let buf = activity_log::encode_al_transaction(self.fixed.device_uuid, seq, extents)
            .map_err(invalid)?;
        let offset = self.layout.al_block_offset(ring_slot(seq));
        let path = self.layout.location.path();
        write_at(&self.file, path, offset, &buf, "activity-log transaction")?;
        sync(&self.file, path, "activity log")?;
        self.al_seq = seq;
        Ok(())
    }

    /// Writes the listed pages of `bitmap` (`layout().bitmap_words()` words), then fdatasync.
    pub fn write_bitmap_pages(&mut self, bitmap: &[u64], pages: &[usize]) -> Result<(), MetaError> {
        write_pages(
            &self.file,
            &self.layout,
            self.fixed.device_uuid,
            bitmap,
            pages,
        )?;
        if !pages.is_empty() {
            sync(&self.file, self.layout.location.path(), "bitmap")?;
        }
        Ok(())
    }

    /// The bitmap page holding data block `block`.
    pub fn bitmap_page_of_block(block: u64) -> usize {
        bitmap_pages::bitmap_page_of_block(block)
    }

    pub fn bitmap_page_count(&self) -> usize {
        self.layout.bitmap_pages
    }
}

/// A bitmap with every data block out of sync.
fn full_bitmap(layout: &Layout) -> Vec<u64> {
    let bits = layout.bitmap_bits();
    let mut bitmap = vec![u64::MAX; layout.bitmap_words()];
    if bits % 64 != 0 {
        if let Some(last) = bitmap.last_mut() {
            *last = (1u64 << (bits % 64)) - 1;
        }
    }
    bitmap
}
