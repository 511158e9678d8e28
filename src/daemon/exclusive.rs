//! One daemon per disk: an exclusive `flock` on the backing disk and on the
//! external metadata file, taken before anything is written and held until
//! the process exits; and sockets are unlinked only when nobody serves them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::{MetaDisk, Settings};

/// The locks of a running daemon (or of `create-md`); dropping it releases them.
pub struct DiskLocks {
    _files: Vec<File>,
}

/// Locks this node's disk and external metadata file (non-blocking). Held by another process:
/// an error naming that process. A metadata file that does not exist yet (before `create-md`)
/// is not locked; the disk is.
pub fn lock_disks(s: &Settings) -> Result<DiskLocks, String> {
    let node = s.node();
    let mut paths = vec![("disk", node.disk.as_path())];
    if let MetaDisk::External(p) = &node.meta_disk {
        paths.push(("meta-disk", p.as_path()));
    }
    let mut files: Vec<File> = Vec::new();
    for (key, path) in paths {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if key == "meta-disk" && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(format!(
                    "cannot open {key} {} to lock it: {e}",
                    path.display()
                ))
            }
        };
        let id = file_id(&f).map_err(|e| format!("cannot stat {key} {}: {e}", path.display()))?;
        if files.iter().any(|g| file_id(g).ok() == Some(id)) {
            continue; // the same file twice: locked once
        }
        // SAFETY: plain syscall on a descriptor `f` owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(format!(
                    "{key} {} is in use by {}: only one mirrord (or create-md) may use a disk \
                     at a time",
                    path.display(),
                    holder(id)
                ));
            }
            return Err(format!("cannot lock {key} {}: {e}", path.display()));
        }
        files.push(f);
    }
    debug_assert!(!files.is_empty(), "the disk itself is always locked");
    Ok(DiskLocks { _files: files })
}

impl DiskLocks {
    /// The locked files' descriptors (handed to the next process at a restart).
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self._files.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Takes over the locks a previous mirrord handed over (`handover.rs`): each inherited
/// descriptor must be the file `lock_disks` would lock, in the same order, and already hold
/// its lock (the lock belongs to the open file, so it was never released).
pub fn adopt_locks(s: &Settings, fds: &[std::os::fd::RawFd]) -> Result<DiskLocks, String> {
    use std::os::fd::FromRawFd;
    let node = s.node();
    let mut want = vec![("disk", node.disk.as_path())];
    if let MetaDisk::External(p) = &node.meta_disk {
        want.push(("meta-disk", p.as_path()));
    }
    let mut files = Vec::new();
    for &fd in fds {
        // SAFETY: the hand-over state names `fd` as ours and it was checked to be an open file.
        files.push(unsafe { File::from_raw_fd(fd) });
    }
    let mut ids = Vec::new();
    for (key, path) in want {
        match std::fs::metadata(path) {
            Ok(m) if !ids.contains(&(m.dev(), m.ino())) => ids.push((m.dev(), m.ino())),
            Ok(_) => {}
            Err(e) if key == "meta-disk" && e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot stat {key} {}: {e}", path.display())),
        }
    }
    let have: Vec<(u64, u64)> = files.iter().filter_map(|f| file_id(f).ok()).collect();
    if have != ids {
        return Err(format!(
            "the inherited disk locks are not on this node's disk and metadata files \
             ({have:?}, configured {ids:?})"
        ));
    }
    for f in &files {
        // SAFETY: plain syscall on a descriptor we own. Re-locking a lock this open file
        // holds succeeds; failing means the lock was lost.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!(
                "an inherited disk lock is not held: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(DiskLocks { _files: files })
}

/// (device, inode) of an open file.
fn file_id(f: &File) -> io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Who holds the flock on the file `id`, from /proc/locks: "mirrord (PID 123)".
fn holder((dev, ino): (u64, u64)) -> String {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    // e.g. "1: FLOCK  ADVISORY  WRITE 16619 fe:00:10010844 0 EOF"
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let pid = text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4).and_then(|p| p.parse::<u32>().ok()))
            .flatten()
    });
    match pid {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            format!(
                "{} (PID {pid})",
                if comm.is_empty() { "a process" } else { comm }
            )
        }
        None => "another process".into(),
    }
}

/// Before binding a unix socket: removes `path` if it is a stale socket (nobody accepts on it),
/// and refuses if a process serves it (another daemon's socket is never taken over).
pub fn remove_stale_socket(path: &Path) -> Result<(), String> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "{} is served by another process (another mirrord for this resource?); not taking \
             it over",
            path.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            )),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, b"x").expect("disk");
        let text = format!(
            "[resource]\nname = \"r0\"\n[[node]]\nname = \"solo\"\ndisk = \"{}\"\n\
             meta-disk = \"{}\"\n",
            disk.display(),
            dir.path().join("none.md").display()
        );
        let s = crate::config::parse(Path::new("t.toml"), &text, Some("solo")).expect("config");
        let held = lock_disks(&s).expect("first lock");
        // flock locks conflict between open files, even in one process.
        let e = lock_disks(&s).err().expect("second lock refused");
        let me = std::process::id();
        assert!(e.contains(&format!("(PID {me})")), "{e}");
        assert!(e.contains(&disk.display().to_string()), "{e}");
        drop(held);
        lock_disks(&s).expect("free again");
    }

    #[test]
    fn a_live_socket_is_kept_and_a_stale_one_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.sock");
        remove_stale_socket(&path).expect("nothing there");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let e = remove_stale_socket(&path).expect_err("served");
        assert!(e.contains("another process"), "{e}");
        assert!(path.exists());
        drop(l);
        remove_stale_socket(&path).expect("stale");
        assert!(!path.exists());
    }
}
