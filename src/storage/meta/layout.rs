//! Where each metadata block lives, computed from the device size alone.

use std::path::{Path, PathBuf};

use super::activity_log::AL_RING_BLOCKS;
use super::bitmap_pages::BITMAP_BITS_PER_PAGE;
use super::{MetaError, AL_EXTENT_SIZE, BLOCK_SIZE};

/// Where the metadata lives (the config's `meta-disk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the data disk itself (the path is the disk).
    Internal(PathBuf),
    /// In a separate file or block device (the path is the metadata file).
    External(PathBuf),
}

impl MetaLocation {
    /// The file that holds the metadata blocks.
    pub fn path(&self) -> &Path {
        match self {
            MetaLocation::Internal(p) | MetaLocation::External(p) => p,
        }
    }

    pub fn is_internal(&self) -> bool {
        matches!(self, MetaLocation::Internal(_))
    }
}

/// Offsets (in bytes, within the metadata file) of every metadata block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub location: MetaLocation,
    /// The device size this layout was computed from.
    pub device_size: u64,
    /// Usable data bytes at the start of the data device (multiple of 4096).
    pub data_size: u64,
    /// The whole metadata area within the metadata file.
    pub meta_offset: u64,
    pub meta_size: u64,
    /// The two superblock slots.
    pub superblock_offsets: [u64; 2],
    /// The activity-log ring: `al_blocks` consecutive blocks.
    pub al_offset: u64,
    pub al_blocks: u32,
    /// The bitmap pages in use: `bitmap_pages` consecutive blocks.
    pub bitmap_offset: u64,
    pub bitmap_pages: usize,
}

fn pages_for_bits(bits: u64) -> u64 {
    bits.div_ceil(BITMAP_BITS_PER_PAGE).max(1)
}

impl Layout {
    /// The layout for a data device of `device_size` bytes.
    ///
    /// Internal: metadata at the end of the device (size rounded down to 4 KiB),
    /// superblock slots in its last 8 KiB, then the activity-log ring and the
    /// bitmap before them; the data area is everything in front.
    /// External: superblock slots, ring and bitmap from offset 0 of the metadata
    /// file; the whole device (rounded down to 4 KiB) is data.
    pub fn compute(device_size: u64, loc: &MetaLocation) -> Result<Layout, MetaError> {
        let aligned = device_size / BLOCK_SIZE * BLOCK_SIZE;
        let fixed_blocks = 2 + u64::from(AL_RING_BLOCKS);
        let layout = match loc {
            MetaLocation::Internal(path) => {
                // Sized for the whole device so that the layout depends on it alone.
                let alloc_pages = pages_for_bits(aligned / BLOCK_SIZE);
                let meta_size = (alloc_pages + fixed_blocks) * BLOCK_SIZE;
                let needed = meta_size + BLOCK_SIZE;
                if aligned < needed {
                    return Err(MetaError::TooSmall {
                        path: path.clone(),
                        what: "disk (with internal metadata)",
                        size: device_size,
                        needed,
                    });
                }
                let data_size = aligned - meta_size;
                let meta_offset = data_size;
                let bitmap_pages = pages_for_bits(data_size / BLOCK_SIZE);
                debug_assert!(bitmap_pages <= alloc_pages);
                Layout {
                    location: loc.clone(),
                    device_size,
                    data_size,
                    meta_offset,
                    meta_size,
                    superblock_offsets: [aligned - 2 * BLOCK_SIZE, aligned - BLOCK_SIZE],
                    al_offset: meta_offset + alloc_pages * BLOCK_SIZE,
                    al_blocks: AL_RING_BLOCKS,
                    bitmap_offset: meta_offset,
                    bitmap_pages: bitmap_pages as usize,
                }
            }
            MetaLocation::External(path) => {
                if aligned < BLOCK_SIZE {
                    return Err(MetaError::TooSmall {
                        path: path.clone(),
                        what: "data disk",
                        size: device_size,
                        needed: BLOCK_SIZE,
                    });
                }
                let bitmap_pages = pages_for_bits(aligned / BLOCK_SIZE);
                Layout {
                    location: loc.clone(),
                    device_size,
                    data_size: aligned,
                    meta_offset: 0,
                    meta_size: (bitmap_pages + fixed_blocks) * BLOCK_SIZE,
                    superblock_offsets: [0, BLOCK_SIZE],
                    al_offset: 2 * BLOCK_SIZE,
                    al_blocks: AL_RING_BLOCKS,
                    bitmap_offset: fixed_blocks * BLOCK_SIZE,
                    bitmap_pages: bitmap_pages as usize,
                }
            }
        };
        layout.debug_check();
        Ok(layout)
    }

    fn debug_check(&self) {
        debug_assert_eq!(self.data_size % BLOCK_SIZE, 0);
        debug_assert!(self.data_size >= BLOCK_SIZE);
        let end = self.meta_offset + self.meta_size;
        let bitmap_end = self.bitmap_offset + self.bitmap_pages as u64 * BLOCK_SIZE;
        let al_end = self.al_offset + u64::from(self.al_blocks) * BLOCK_SIZE;
        debug_assert!(bitmap_end <= end && al_end <= end);
        debug_assert!(self
            .superblock_offsets
            .iter()
            .all(|&o| o + BLOCK_SIZE <= end));
        if self.location.is_internal() {
            debug_assert!(end <= self.device_size);
            debug_assert_eq!(self.meta_offset, self.data_size);
            debug_assert!(bitmap_end <= self.al_offset && al_end <= self.superblock_offsets[0]);
        } else {
            debug_assert!(al_end <= self.bitmap_offset);
        }
        debug_assert!(self.bitmap_bits() <= self.bitmap_pages as u64 * super::BITMAP_BITS_PER_PAGE);
    }

    /// Number of bitmap bits: one per 4 KiB block of the data area.
    pub fn bitmap_bits(&self) -> u64 {
        self.data_size / BLOCK_SIZE
    }

    /// Length of the in-memory bitmap in u64 words.
    pub fn bitmap_words(&self) -> usize {
        self.bitmap_bits().div_ceil(64) as usize
    }

    /// Number of 4 MiB activity-log extents covering the data area (the last may be partial).
    pub fn al_extent_count(&self) -> u64 {
        self.data_size.div_ceil(AL_EXTENT_SIZE)
    }

    /// End of the metadata area in the metadata file; the file must be at least this long.
    pub fn meta_end(&self) -> u64 {
        self.meta_offset + self.meta_size
    }

    /// Byte offset of bitmap page `page`.
    pub fn bitmap_page_offset(&self, page: usize) -> u64 {
        debug_assert!(page < self.bitmap_pages);
        self.bitmap_offset + page as u64 * BLOCK_SIZE
    }

    /// Byte offset of activity-log ring block `slot`.
    pub fn al_block_offset(&self, slot: u32) -> u64 {
        debug_assert!(slot < self.al_blocks);
        self.al_offset + u64::from(slot) * BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal() -> MetaLocation {
        MetaLocation::Internal("/dev/x".into())
    }
    fn external() -> MetaLocation {
        MetaLocation::External("/var/lib/x.md".into())
    }

    #[test]
    fn internal_ten_gib() {
        let size = 10u64 << 30;
        let l = Layout::compute(size, &internal()).expect("layout");
        let bits_all = size / BLOCK_SIZE;
        let pages = bits_all.div_ceil(BITMAP_BITS_PER_PAGE);
        assert_eq!(l.meta_size, (pages + 18) * BLOCK_SIZE);
        assert_eq!(l.data_size, size - l.meta_size);
        assert_eq!(l.superblock_offsets, [size - 8192, size - 4096]);
        assert_eq!(l.al_offset, size - 8192 - 16 * 4096);
        assert_eq!(l.bitmap_offset, l.data_size);
        assert_eq!(l.meta_end(), size);
        assert!(l.bitmap_pages as u64 * BITMAP_BITS_PER_PAGE >= l.bitmap_bits());
    }

    #[test]
    fn internal_unaligned_size_rounds_down() {
        let size = (1u64 << 30) + 1234;
        let l = Layout::compute(size, &internal()).expect("layout");
        assert_eq!(l.meta_end(), 1 << 30);
        assert_eq!(l.data_size % BLOCK_SIZE, 0);
        assert_eq!(l.superblock_offsets[1], (1 << 30) - 4096);
    }

    #[test]
    fn external_uses_whole_device() {
        let size = (3u64 << 30) + 100;
        let l = Layout::compute(size, &external()).expect("layout");
        assert_eq!(l.data_size, 3 << 30);
        assert_eq!(l.superblock_offsets, [0, 4096]);
        assert_eq!(l.al_offset, 8192);
        assert_eq!(l.bitmap_offset, 18 * 4096);
        assert_eq!(
            l.bitmap_pages as u64,
            (3u64 << 30 >> 12).div_ceil(BITMAP_BITS_PER_PAGE)
        );
        assert_eq!(l.meta_end(), l.bitmap_offset + l.bitmap_pages as u64 * 4096);
    }

    #[test]
    fn tiny_devices() {
        // Internal minimum: 1 bitmap page + 16 AL + 2 superblocks + 1 data block.
        let min = 20 * BLOCK_SIZE;
        let l = Layout::compute(min, &internal()).expect("minimum fits");
        assert_eq!(l.data_size, BLOCK_SIZE);
        assert_eq!(l.bitmap_bits(), 1);
        assert_eq!(l.bitmap_words(), 1);
        assert_eq!(l.al_extent_count(), 1);
        for size in [0, 1, 4095, 4096, min - 1, 19 * BLOCK_SIZE] {
            let err = Layout::compute(size, &internal()).expect_err("too small");
            assert!(
                matches!(err, MetaError::TooSmall { needed, .. } if needed == min),
                "{err}"
            );
            assert!(err.to_string().contains("needs at least 80 KiB"), "{err}");
        }
        for size in [0, 1, 4095] {
            let err = Layout::compute(size, &external()).expect_err("too small");
            assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
        }
        let l = Layout::compute(4096, &external()).expect("one block");
        assert_eq!(l.data_size, 4096);
        assert_eq!(l.bitmap_pages, 1);
    }

    #[test]
    fn many_sizes_are_consistent() {
        let sizes = [
            20 * BLOCK_SIZE,
            1 << 20,
            (1 << 20) + 4096 * 3 + 17,
            BITMAP_BITS_PER_PAGE * BLOCK_SIZE,
            BITMAP_BITS_PER_PAGE * BLOCK_SIZE + 19 * BLOCK_SIZE,
            BITMAP_BITS_PER_PAGE * BLOCK_SIZE * 2 + 5 * BLOCK_SIZE,
            1 << 30,
            1 << 40,
            (1 << 44) + 12345,
        ];
        for size in sizes {
            for loc in [internal(), external()] {
                let l = Layout::compute(size, &loc).expect("layout");
                l.debug_check();
                assert!(l.data_size <= size);
                assert_eq!(
                    l.bitmap_pages as u64,
                    l.bitmap_bits().div_ceil(BITMAP_BITS_PER_PAGE).max(1),
                    "size {size}"
                );
                // Deterministic: the same device size gives the same layout.
                assert_eq!(Layout::compute(size, &loc).expect("layout"), l);
            }
        }
    }
}
