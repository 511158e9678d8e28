//! Generic netlink, sans-IO: the few message shapes the attach agent needs
//! (a request with attributes, the controller's family lookup, the kernel's
//! answers). Hand-written instead of a crate: four message layouts, all
//! fixed by the kernel's uapi headers (linux/netlink.h, linux/genetlink.h),
//! fully unit-tested here, and no dependency to audit or keep building on
//! the six engineers' shared build host. Host byte order, as netlink is.

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
pub const NLMSG_HDRLEN: usize = 16;
/// `struct genlmsghdr`: cmd u8, version u8, reserved u16.
pub const GENL_HDRLEN: usize = 4;
/// `struct nlattr`: len u16, type u16.
pub const NLA_HDRLEN: usize = 4;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// The generic netlink controller ("nlctrl").
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// Netlink pads every header and attribute to 4 bytes.
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one generic netlink request: `nlmsghdr`, `genlmsghdr`, then the
/// attributes appended with the `put_*` methods.
#[derive(Debug)]
pub struct MsgBuilder {
    buf: Vec<u8>,
    /// Start offsets of the nested attributes still open.
    open: Vec<usize>,
}

impl MsgBuilder {
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        debug_assert_eq!(buf.len(), NLMSG_HDRLEN + GENL_HDRLEN);
        Self {
            buf,
            open: Vec::new(),
        }
    }

    pub fn put_bytes(&mut self, attr: u16, data: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + data.len();
        assert!(
            len <= usize::from(u16::MAX),
            "netlink attribute {attr} too long"
        );
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&attr.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn put_u32(&mut self, attr: u16, v: u32) -> &mut Self {
        self.put_bytes(attr, &v.to_ne_bytes())
    }

    pub fn put_u64(&mut self, attr: u16, v: u64) -> &mut Self {
        self.put_bytes(attr, &v.to_ne_bytes())
    }

    /// A NUL-terminated string (`NLA_STRING`/`NLA_NUL_STRING`).
    pub fn put_str(&mut self, attr: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put_bytes(attr, &v)
    }

    /// Opens a nested attribute; close it with `end_nested`.
    pub fn begin_nested(&mut self, attr: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(attr | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nested(&mut self) -> &mut Self {
        let start = self.open.pop().expect("end_nested without begin_nested");
        let len = self.buf.len() - start;
        assert!(
            len <= usize::from(u16::MAX),
            "nested netlink attribute too long"
        );
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
        self
    }

    /// The finished message, its length set.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.open.is_empty(), "a nested attribute was left open");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        debug_assert_eq!(self.buf.len() % 4, 0);
        self.buf
    }
}

/// One attribute as read: its type (flags masked off) and payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The first `N` bytes of the payload, or an error naming the attribute.
    fn fixed<const N: usize>(&self, what: &str) -> Result<[u8; N], String> {
        self.data
            .get(..N)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "attribute {}: {} bytes, not a {what}",
                    self.kind,
                    self.data.len()
                )
            })
    }

    pub fn u32(&self) -> Result<u32, String> {
        self.fixed("u32").map(u32::from_ne_bytes)
    }

    pub fn u16(&self) -> Result<u16, String> {
        self.fixed("u16").map(u16::from_ne_bytes)
    }

    /// A string, up to its first NUL.
    pub fn str(&self) -> Result<&'a str, String> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.data.len());
        std::str::from_utf8(&self.data[..end])
            .map_err(|e| format!("attribute {}: not UTF-8: {e}", self.kind))
    }

    pub fn nested(&self) -> Result<Vec<Attr<'a>>, String> {
        parse_attrs(self.data)
    }
}

/// Splits an attribute area into its attributes.
pub fn parse_attrs(mut data: &[u8]) -> Result<Vec<Attr<'_>>, String> {
    let mut out = Vec::new();
    // Each attribute takes at least NLA_HDRLEN bytes, so this ends.
    while data.len() >= NLA_HDRLEN {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > data.len() {
            return Err(format!(
                "attribute {kind}: length {len} of {} bytes left",
                data.len()
            ));
        }
        out.push(Attr {
            kind,
            data: &data[NLA_HDRLEN..len],
        });
        data = &data[align4(len).min(data.len())..];
    }
    Ok(out)
}

/// One message of a netlink datagram, as far as the agent cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// `NLMSG_ERROR`: `errno` 0 is an acknowledgement; else a negative errno.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`.
    Done { seq: u32 },
    /// A generic netlink message of `family`: its command and attributes.
    Genl {
        family: u16,
        seq: u32,
        cmd: u8,
        attrs: Vec<Attr<'a>>,
    },
}

/// Splits one received datagram into its messages.
pub fn parse_datagram(mut data: &[u8]) -> Result<Vec<Msg<'_>>, String> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!(
                "netlink message of length {len} in {} bytes",
                data.len()
            ));
        }
        let body = &data[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                let b: [u8; 4] = body
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or("NLMSG_ERROR without its error code")?;
                Msg::Error {
                    seq,
                    errno: i32::from_ne_bytes(b),
                }
            }
            NLMSG_DONE => Msg::Done { seq },
            family => {
                if body.len() < GENL_HDRLEN {
                    return Err(format!("message of family {family} without a genl header"));
                }
                Msg::Genl {
                    family,
                    seq,
                    cmd: body[0],
                    attrs: parse_attrs(&body[GENL_HDRLEN..])?,
                }
            }
        });
        data = &data[align4(len).min(data.len())..];
    }
    Ok(out)
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family_request(seq: u32, name: &str) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    m.put_str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// What the controller says about a family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    /// (name, id) of each multicast group.
    pub groups: Vec<(String, u32)>,
}

impl Family {
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

/// Reads the family out of the controller's answer (its attributes).
pub fn parse_family(attrs: &[Attr<'_>]) -> Result<Family, String> {
    let id = attrs
        .iter()
        .find(|a| a.kind == CTRL_ATTR_FAMILY_ID)
        .ok_or("the controller's answer has no family id")?
        .u16()?;
    let mut groups = Vec::new();
    if let Some(list) = attrs.iter().find(|a| a.kind == CTRL_ATTR_MCAST_GROUPS) {
        for g in list.nested()? {
            let fields = g.nested()?;
            let name = fields.iter().find(|a| a.kind == CTRL_ATTR_MCAST_GRP_NAME);
            let gid = fields.iter().find(|a| a.kind == CTRL_ATTR_MCAST_GRP_ID);
            if let (Some(n), Some(i)) = (name, gid) {
                groups.push((n.str()?.to_string(), i.u32()?));
            }
        }
    }
    Ok(Family { id, groups })
}
