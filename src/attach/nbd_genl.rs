//! The kernel NBD driver's generic netlink family, sans-IO
//! (include/uapi/linux/nbd-netlink.h; the driver's side is
//! drivers/block/nbd.c, `nbd_genl_connect`, `nbd_genl_reconfigure`,
//! `nbd_genl_disconnect`, `nbd_dead_link_work`). Timeouts are in seconds.

use super::genl::{Attr, MsgBuilder, NLM_F_ACK, NLM_F_REQUEST};

pub const FAMILY_NAME: &str = "nbd";
pub const MCAST_GROUP: &str = "nbd_mc_group";
pub const VERSION: u8 = 1;

pub const CMD_CONNECT: u8 = 1;
pub const CMD_DISCONNECT: u8 = 2;
pub const CMD_RECONFIGURE: u8 = 3;
pub const CMD_LINK_DEAD: u8 = 4;

pub const ATTR_INDEX: u16 = 1;
pub const ATTR_SIZE_BYTES: u16 = 2;
pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const ATTR_TIMEOUT: u16 = 4;
pub const ATTR_SERVER_FLAGS: u16 = 5;
pub const ATTR_CLIENT_FLAGS: u16 = 6;
pub const ATTR_SOCKETS: u16 = 7;
pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub const SOCK_ITEM: u16 = 1;
pub const SOCK_FD: u16 = 1;

/// What every CONNECT and RECONFIGURE of one device carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceParams {
    /// N of /dev/nbdN.
    pub index: u32,
    /// Per-request timeout (`NBD_ATTR_TIMEOUT`): a request without a reply
    /// by then costs its socket and is sent again on another.
    pub timeout_secs: u64,
    /// How long new requests wait while no socket is live
    /// (`NBD_ATTR_DEAD_CONN_TIMEOUT`); after it they fail.
    pub dead_conn_timeout_secs: u64,
    /// Stored by CONNECT (sysfs `backend`), checked by RECONFIGURE.
    pub backend: String,
}

/// What the export looks like; a reconnect must present the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    pub block_size: u64,
    /// The export's transmission flags, as the handshake gave them.
    pub server_flags: u16,
}

fn put_common(m: &mut MsgBuilder, p: &DeviceParams, fds: &[i32]) {
    m.put_u32(ATTR_INDEX, p.index)
        .put_u64(ATTR_TIMEOUT, p.timeout_secs)
        .put_u64(ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout_secs)
        .put_str(ATTR_BACKEND_IDENTIFIER, &p.backend);
    m.begin_nested(ATTR_SOCKETS);
    for &fd in fds {
        assert!(fd >= 0, "a negative fd for the kernel");
        m.begin_nested(SOCK_ITEM)
            .put_u32(SOCK_FD, fd as u32)
            .end_nested();
    }
    m.end_nested();
}

/// `NBD_CMD_CONNECT`: configures the device with these sockets.
pub fn connect_request(
    family: u16,
    seq: u32,
    p: &DeviceParams,
    g: &Geometry,
    fds: &[i32],
) -> Vec<u8> {
    assert!(!fds.is_empty(), "CONNECT needs at least one socket");
    let mut m = MsgBuilder::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, CMD_CONNECT, VERSION);
    m.put_u64(ATTR_SIZE_BYTES, g.size_bytes)
        .put_u64(ATTR_BLOCK_SIZE_BYTES, g.block_size)
        .put_u64(ATTR_SERVER_FLAGS, u64::from(g.server_flags))
        .put_u64(ATTR_CLIENT_FLAGS, 0);
    put_common(&mut m, p, fds);
    m.finish()
}

/// `NBD_CMD_RECONFIGURE`: fills the slots the kernel marked dead with these
/// sockets, in order; sockets beyond the dead slots are ignored.
pub fn reconfigure_request(family: u16, seq: u32, p: &DeviceParams, fds: &[i32]) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CMD_RECONFIGURE,
        VERSION,
    );
    put_common(&mut m, p, fds);
    m.finish()
}

/// `NBD_CMD_DISCONNECT`.
pub fn disconnect_request(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CMD_DISCONNECT,
        VERSION,
    );
    m.put_u32(ATTR_INDEX, index);
    m.finish()
}

/// The device index in a message's attributes (CONNECT's answer, LINK_DEAD).
pub fn index_of(attrs: &[Attr<'_>]) -> Option<u32> {
    attrs
        .iter()
        .find(|a| a.kind == ATTR_INDEX)
        .and_then(|a| a.u32().ok())
}
