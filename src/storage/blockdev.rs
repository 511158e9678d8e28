//! Thin wrappers over the Linux calls that describe a backing file or block device:
//! fstat, block-device ioctls, sysfs queue limits, statfs and statx.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// ioctl request numbers from <linux/fs.h> (x86_64/aarch64 encoding).
const BLKSSZGET: libc::c_ulong = 0x1268; // _IO(0x12, 104): logical block size (int)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t): size in bytes
const BLKDISCARD: libc::c_ulong = 0x1277; // _IO(0x12, 119): discard [start, len]

// statfs f_type values of file systems known to implement FALLOC_FL_ZERO_RANGE as a cheap
// metadata operation.
const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683E;

/// What kind of object the path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    BlockDevice,
    Other,
}

/// The kind of the open file, and the (major, minor) device number of a block device.
pub(crate) fn kind(file: &File) -> io::Result<(Kind, u64)> {
    let meta = file.metadata()?;
    let mode = std::os::unix::fs::MetadataExt::mode(&meta) & libc::S_IFMT;
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let kind = if mode == libc::S_IFREG {
        Kind::Regular
    } else if mode == libc::S_IFBLK {
        Kind::BlockDevice
    } else {
        Kind::Other
    };
    Ok((kind, rdev))
}

/// Size in bytes: the file length, or BLKGETSIZE64 for a block device.
pub(crate) fn size(file: &File, kind: Kind) -> io::Result<u64> {
    match kind {
        Kind::BlockDevice => {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(bytes)
        }
        _ => Ok(file.metadata()?.len()),
    }
}

/// Logical block size of a block device (BLKSSZGET).
pub(crate) fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut bytes) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(bytes)
        .ok()
        .filter(|b| b.is_power_of_two())
        .ok_or_else(|| io::Error::other(format!("odd logical block size {bytes}")))
}

/// Discards `[offset, offset + len)` of a block device (BLKDISCARD). Both must be multiples of
/// the logical block size.
pub(crate) fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the block device with this device number offloads write-zeroes to the hardware
/// (sysfs `queue/write_zeroes_max_bytes` > 0), making zeroing a cheap operation.
pub(crate) fn has_write_zeroes(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let path = format!("/sys/dev/block/{major}:{minor}/queue/write_zeroes_max_bytes");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// The statfs magic number of the file system holding `file`.
fn fs_magic(file: &File) -> Option<i64> {
    // SAFETY: statfs is plain data; fstatfs fills it in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut buf) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    (rc == 0).then_some(buf.f_type as i64)
}

/// Whether the file system holding `file` zeroes ranges cheaply with fallocate.
pub(crate) fn fs_has_cheap_zero_range(file: &File) -> bool {
    matches!(fs_magic(file), Some(EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC))
}

/// Whether the file system holding `file` does buffered writes without blocking under
/// io_uring (XFS since Linux 6.0, btrfs since 6.1); others (ext4) punt them to io-wq.
pub(crate) fn fs_has_async_buffered_writes(file: &File) -> bool {
    matches!(fs_magic(file), Some(XFS_MAGIC | BTRFS_MAGIC))
}

/// The offset/length alignment O_DIRECT needs on this regular file (statx STATX_DIOALIGN,
/// Linux 6.1+), or None when the kernel or file system does not say.
pub(crate) fn dio_offset_align(file: &File) -> Option<u32> {
    // SAFETY: statx is plain data; the kernel fills it in.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out-pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

/// fallocate(2) with EINTR retried.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| einval())?;
    let len = i64::try_from(len).map_err(|_| einval())?;
    for _ in 0..1000 {
        // SAFETY: plain syscall on a valid fd.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINTR))
}

pub(crate) fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}
