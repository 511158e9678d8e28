//! Errors of the metadata codecs (`DecodeError`) and of the store (`MetaError`).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why one metadata block could not be decoded. Pure: carries no path or offset;
/// the store wraps it in a `MetaError` that says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer is not one 4 KiB block.
    Length { len: usize },
    /// The block does not start with the expected magic number (never written, or not ours).
    BadMagic,
    /// The crc32 stored in the block does not match its contents (torn or corrupted write).
    Checksum { stored: u32, computed: u32 },
    /// A format version this build does not understand.
    Version { found: u32, supported: u32 },
    /// The block belongs to another `create-md` (different device uuid).
    ForeignDevice { found: u64, expected: u64 },
    /// A bitmap page carries another page's index (misdirected write).
    WrongPage { found: u32, expected: u32 },
    /// A field holds an impossible value although the checksum matched.
    Field { field: &'static str, detail: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Length { len } => write!(f, "block is {len} bytes, expected 4096"),
            DecodeError::BadMagic => write!(f, "bad magic (no metadata block here)"),
            DecodeError::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            DecodeError::Version { found, supported } => write!(
                f,
                "format version {found} is not supported (this build reads version {supported})"
            ),
            DecodeError::ForeignDevice { found, expected } => write!(
                f,
                "block belongs to device uuid {found:016X}, expected {expected:016X}"
            ),
            DecodeError::WrongPage { found, expected } => {
                write!(
                    f,
                    "block holds bitmap page {found}, expected page {expected}"
                )
            }
            DecodeError::Field { field, detail } => write!(f, "invalid {field}: {detail}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Everything that can go wrong reading or writing metadata, with the place.
#[derive(Debug)]
pub enum MetaError {
    /// A read, write, open or sync failed.
    Io {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    /// Neither superblock slot has the magic number.
    NotFound { path: PathBuf, internal: bool },
    /// `create` found valid metadata and `force` was not given.
    Exists {
        path: PathBuf,
        resource: String,
        node: String,
    },
    /// No superblock slot is valid, and at least one looks like ours.
    SuperblockCorrupt {
        path: PathBuf,
        offsets: [u64; 2],
        errors: [DecodeError; 2],
    },
    /// The newest checksummed superblock has a format version this build cannot read.
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The metadata belongs to another resource or node.
    IdentityMismatch {
        path: PathBuf,
        found_resource: String,
        found_node: String,
        expected_resource: String,
        expected_node: String,
    },
    /// The device size does not give the data size recorded in the metadata.
    SizeMismatch {
        path: PathBuf,
        device_size: u64,
        data_size: u64,
        meta_data_size: u64,
    },
    /// The superblock's recorded layout differs from the one computed from the device size.
    LayoutMismatch {
        path: PathBuf,
        field: &'static str,
        found: u64,
        expected: u64,
    },
    /// The device (or external metadata file) is too small.
    TooSmall {
        path: PathBuf,
        what: &'static str,
        size: u64,
        needed: u64,
    },
    /// A bitmap page failed to decode.
    BitmapPageCorrupt {
        path: PathBuf,
        page: usize,
        offset: u64,
        error: DecodeError,
    },
    /// No activity-log transaction is valid, or the newest one holds impossible values.
    ActivityLogCorrupt { path: PathBuf, detail: String },
    /// The caller passed something the format cannot hold.
    InvalidArgument(String),
}

impl MetaError {
    pub(crate) fn io(path: &std::path::Path, what: impl Into<String>, source: io::Error) -> Self {
        MetaError::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }
}

/// "1 GiB", "1.5 MiB" or "12345 bytes": exact enough for error messages.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            if bytes % unit == 0 {
                return format!("{} {name}", bytes / unit);
            }
            return format!("{:.2} {name} ({bytes} bytes)", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} bytes")
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::Io { path, what, source } => {
                write!(f, "{what} on {}: {source}", path.display())
            }
            MetaError::NotFound { path, internal } => {
                write!(
                    f,
                    "no nbd-mirror metadata on {} (run `mirrorctl create-md`)",
                    path.display()
                )?;
                if *internal {
                    write!(
                        f,
                        "; internal metadata sits at the end of the disk, so a resized disk \
                         no longer shows it"
                    )?;
                }
                Ok(())
            }
            MetaError::Exists { path, resource, node } => write!(
                f,
                "{} already holds nbd-mirror metadata (resource {resource} node {node}); \
                 use --force to overwrite it",
                path.display()
            ),
            MetaError::SuperblockCorrupt { path, offsets, errors } => {
                let both_crc = errors.iter().all(|e| matches!(e, DecodeError::Checksum { .. }));
                if both_crc {
                    write!(
                        f,
                        "superblock checksum mismatch in both slots on {} (offsets {} and {})",
                        path.display(),
                        offsets[0],
                        offsets[1]
                    )
                } else {
                    write!(
                        f,
                        "no valid superblock on {}: slot 0 at offset {}: {}; slot 1 at offset {}: {}",
                        path.display(),
                        offsets[0],
                        errors[0],
                        offsets[1],
                        errors[1]
                    )
                }
            }
            MetaError::Version { path, found, supported } => write!(
                f,
                "metadata on {} has format version {found}; this build reads version {supported}",
                path.display()
            ),
            MetaError::IdentityMismatch {
                path,
                found_resource,
                found_node,
                expected_resource,
                expected_node,
            } => write!(
                f,
                "metadata on {} belongs to resource {found_resource} node {found_node}, \
                 not {expected_resource} {expected_node}",
                path.display()
            ),
            MetaError::SizeMismatch { path, device_size, data_size, meta_data_size } => write!(
                f,
                "device is {} (data area {}) but metadata on {} says {}",
                human_size(*device_size),
                human_size(*data_size),
                path.display(),
                human_size(*meta_data_size)
            ),
            MetaError::LayoutMismatch { path, field, found, expected } => write!(
                f,
                "metadata layout on {} does not match the device: {field} is {found}, expected {expected}",
                path.display()
            ),
            MetaError::TooSmall { path, what, size, needed } => write!(
                f,
                "{what} {} is {} but needs at least {}",
                path.display(),
                human_size(*size),
                human_size(*needed)
            ),
            MetaError::BitmapPageCorrupt { path, page, offset, error } => write!(
                f,
                "bitmap page {page} at offset {offset} on {} is corrupt: {error}",
                path.display()
            ),
            MetaError::ActivityLogCorrupt { path, detail } => {
                write!(f, "activity log on {} is corrupt: {detail}", path.display())
            }
            MetaError::InvalidArgument(msg) => write!(f, "invalid metadata argument: {msg}"),
        }
    }
}

impl std::error::Error for MetaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MetaError::Io { source, .. } => Some(source),
            MetaError::BitmapPageCorrupt { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(2 << 30), "2 GiB");
        assert_eq!(human_size(100), "100 bytes");
        assert_eq!(human_size(1536), "1.50 KiB (1536 bytes)");
    }

    #[test]
    fn messages_name_the_problem() {
        let e = MetaError::SizeMismatch {
            path: "/dev/x".into(),
            device_size: 1 << 30,
            data_size: 1 << 30,
            meta_data_size: 2 << 30,
        };
        assert_eq!(
            e.to_string(),
            "device is 1 GiB (data area 1 GiB) but metadata on /dev/x says 2 GiB"
        );
        let e = MetaError::IdentityMismatch {
            path: "/dev/x".into(),
            found_resource: "r1".into(),
            found_node: "beta".into(),
            expected_resource: "r0".into(),
            expected_node: "alpha".into(),
        };
        assert_eq!(
            e.to_string(),
            "metadata on /dev/x belongs to resource r1 node beta, not r0 alpha"
        );
        let e = MetaError::NotFound {
            path: "/dev/x".into(),
            internal: false,
        };
        assert_eq!(
            e.to_string(),
            "no nbd-mirror metadata on /dev/x (run `mirrorctl create-md`)"
        );
    }
}
