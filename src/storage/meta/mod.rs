//! On-disk metadata of one node's disk (DRBD-style): superblock with the
//! generation identifiers, the out-of-sync bitmap and the activity log.
//!
//! Every metadata block is 4 KiB and carries a magic number and a crc32 over
//! the whole block, so torn or misdirected writes are detected on load.
//!
//! The pure codecs (`superblock`, `bitmap_pages`, `activity_log`) turn bytes
//! into structs and back without I/O; `store` does the synchronous file I/O
//! (pread/pwrite + fdatasync) and is meant to be called from a blocking thread.
//!
//! # Layout
//!
//! Internal metadata (`meta-disk = "internal"`) sits at the end of the disk
//! (the device size rounded down to 4 KiB), so its position follows from the
//! device size alone:
//!
//! ```text
//! [ data (data_size) | bitmap pages | activity-log ring (16) | superblock slot 0 | slot 1 ]
//!                                                             ^ end - 8 KiB        ^ end - 4 KiB
//! ```
//!
//! The bitmap area is sized for the whole device (a slight over-allocation),
//! which keeps the layout a function of the device size.
//!
//! External metadata uses a separate file, superblock first:
//!
//! ```text
//! [ superblock slot 0 | slot 1 | activity-log ring (16) | bitmap pages ]
//! ```
//!
//! and the whole device is data. The byte formats of each block are
//! documented in the module that encodes it. All integers are little-endian.

mod activity_log;
mod bitmap_pages;
mod block;
mod dump;
mod error;
mod layout;
mod random;
mod store;
mod superblock;

#[cfg(test)]
mod store_tests;

pub use activity_log::{
    decode_al_transaction, encode_al_transaction, newest_transaction, AlTransaction,
    AL_RING_BLOCKS, DEFAULT_AL_SLOTS, MAX_AL_SLOTS,
};
pub use bitmap_pages::{
    bitmap_page_of_block, decode_bitmap_page, encode_bitmap_page, BITMAP_BITS_PER_PAGE,
    BITMAP_WORDS_PER_PAGE,
};
pub use dump::{dump_json, out_of_sync_ranges};
pub use error::{DecodeError, MetaError};
pub use layout::{Layout, MetaLocation};
pub use random::{new_device_uuid, new_generation_id};
pub use store::{device_size, BitmapDamage, Loaded, MetaStore};
pub use superblock::{
    decode_superblock, encode_superblock, flag_names, flags, GenerationIds, Superblock,
    SuperblockRecord, FORMAT_VERSION, MAX_NAME_LEN,
};

/// Size of every metadata block and the granularity of the out-of-sync bitmap.
pub const BLOCK_SIZE: u64 = 4096;

/// Size of one activity-log extent (the unit of "hot" areas).
pub const AL_EXTENT_SIZE: u64 = 4 << 20;

/// Bitmap blocks per activity-log extent.
pub const BLOCKS_PER_AL_EXTENT: u64 = AL_EXTENT_SIZE / BLOCK_SIZE;
