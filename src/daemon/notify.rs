//! sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;

pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let result = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify {state:?} to {path} failed: {e}");
    }
}

/// Whether SIGTERM hands the NBD connections to systemd's file descriptor store (the unit
/// sets `MIRRORD_FDSTORE=1` with `FileDescriptorStoreMax=`; systemd 254 and later also say
/// so with `$FDSTORE`). Only under systemd (`$NOTIFY_SOCKET`).
pub fn fd_store_enabled() -> bool {
    let on = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
    std::env::var_os("NOTIFY_SOCKET").is_some() && (on("MIRRORD_FDSTORE") || on("FDSTORE"))
}

/// `FDSTORE=1` with `FDNAME=name`: systemd keeps a copy of `fd` for the next start of the
/// service (sd_pid_notify_with_fds(3)).
pub fn store_fd(name: &str, fd: std::os::fd::RawFd) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = std::env::var("NOTIFY_SOCKET").map_err(|_| "no $NOTIFY_SOCKET".to_string())?;
    let sock = UnixDatagram::unbound().map_err(|e| format!("notify socket: {e}"))?;
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    }
    .map_err(|e| format!("$NOTIFY_SOCKET {path}: {e}"))?;
    sock.connect_addr(&addr)
        .map_err(|e| format!("connecting to $NOTIFY_SOCKET {path}: {e}"))?;
    let text = format!("FDSTORE=1\nFDNAME={name}");
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; it points at one iovec and a control buffer sized by
    // CMSG_SPACE for one descriptor, both alive for the call.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(format!(
            "FDSTORE of {name} to {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `FDSTOREREMOVE=1` for `name`: systemd closes its copy.
pub fn remove_stored(name: &str) {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
}
