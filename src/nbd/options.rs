//! Parsing of option payloads sent during the handshake. Pure functions:
//! each takes the option data (already bounded in length by the handshake)
//! and returns the parsed request, or the reason it is malformed (sent to
//! the client as the message of an `NBD_REP_ERR_INVALID` reply).

use super::consts::*;

/// The reason an option payload was rejected; sent to the client as text.
pub(crate) type Invalid = &'static str;

/// Checks the spec's rules for strings ("Conventions"): UTF-8, "MUST NOT
/// contain NUL characters", "MUST be no longer than 4096 bytes".
pub(crate) fn parse_string(bytes: &[u8]) -> Result<String, Invalid> {
    if bytes.len() > NBD_MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err("string is not UTF-8"),
    }
}

/// A big-endian reader over a byte slice that never reads past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub name: String,
    pub want_name: bool,
    pub want_description: bool,
    pub want_block_size: bool,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: "32 bits, length of name
/// (unsigned); MUST be no larger than the option data length - 6", the
/// name, "16 bits, number of information requests", "16 bits x n". The
/// length must match exactly. Unknown info types are ignored ("The server
/// MUST ignore any information requests it does not understand").
pub(crate) fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Invalid> {
    let mut r = Reader::new(data);
    let name_len = r.u32().ok_or("option data shorter than 6 bytes")?;
    let name_len = usize::try_from(name_len).map_err(|_| "export name length too large")?;
    let name_bytes = r
        .take(name_len)
        .ok_or("export name length exceeds option data")?;
    let count = r
        .u16()
        .ok_or("export name length exceeds option data - 6")?;
    let mut req = InfoRequest {
        name: String::new(),
        want_name: false,
        want_description: false,
        want_block_size: false,
    };
    for _ in 0..count {
        match r.u16().ok_or("fewer information requests than announced")? {
            NBD_INFO_NAME => req.want_name = true,
            NBD_INFO_DESCRIPTION => req.want_description = true,
            NBD_INFO_BLOCK_SIZE => req.want_block_size = true,
            _ => {}
        }
    }
    if !r.is_empty() {
        return Err("more information requests than announced");
    }
    req.name = parse_string(name_bytes)?;
    Ok(req)
}

/// A parsed `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`
/// payload. The number of queries is bounded by the option length (each
/// takes at least 4 bytes), never by the count the client claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parses meta context option data: "32 bits, length of export name",
/// the name, "32 bits, number of queries", then each query as "32 bits,
/// length of query" and the string. "If the option request is
/// syntactically invalid (such as a query length that would require
/// reading beyond the original length given in the option header), the
/// server MUST fail the request with NBD_REP_ERR_INVALID." Each query
/// "MUST start with a namespace and a colon"; we reject one that does not
/// (semantically invalid: "the server MAY fail the request").
pub(crate) fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Invalid> {
    let mut r = Reader::new(data);
    let name_len = r
        .u32()
        .ok_or("option data too short for export name length")?;
    let name_len = usize::try_from(name_len).map_err(|_| "export name length too large")?;
    let name_bytes = r
        .take(name_len)
        .ok_or("export name length exceeds option data")?;
    let export = parse_string(name_bytes)?;
    let count = r
        .u32()
        .ok_or("option data too short for number of queries")?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32().ok_or("fewer queries than announced")?;
        let len = usize::try_from(len).map_err(|_| "query length too large")?;
        let bytes = r.take(len).ok_or("query length exceeds option data")?;
        let query = parse_string(bytes)?;
        match query.split_once(':') {
            Some((ns, _)) if !ns.is_empty() => queries.push(query),
            _ => return Err("query does not start with a namespace and a colon"),
        }
    }
    if !r.is_empty() {
        return Err("trailing data after the last query");
    }
    Ok(MetaRequest { export, queries })
}

/// Whether `query` selects `base:allocation`. For SET, only the exact name
/// selects it ("`base:` - the server MUST ignore this form during
/// NBD_OPT_SET_META_CONTEXT"); for LIST, `base:` is a wildcard that
/// matches it. Unknown leaf names and namespaces match nothing ("MUST
/// ignore").
pub(crate) fn query_selects_base_allocation(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q);
        }
        v
    }

    #[test]
    fn strings() {
        assert_eq!(parse_string(b"disk0").as_deref(), Ok("disk0"));
        assert_eq!(parse_string(b"").as_deref(), Ok(""));
        assert!(parse_string(b"a\0b").is_err());
        assert!(parse_string(&[0xff, 0xfe]).is_err());
        assert!(parse_string(&[b'a'; 4096]).is_ok());
        assert!(parse_string(&[b'a'; 4097]).is_err());
    }

    #[test]
    fn info_request_ok() {
        let d = info_data(b"disk", &[NBD_INFO_NAME, 77, NBD_INFO_BLOCK_SIZE]);
        let r = parse_info_request(&d).expect("valid");
        assert_eq!(r.name, "disk");
        assert!(r.want_name && r.want_block_size && !r.want_description);
        let r = parse_info_request(&info_data(b"", &[])).expect("valid");
        assert_eq!(r.name, "");
        assert!(!r.want_name && !r.want_block_size && !r.want_description);
    }

    #[test]
    fn info_request_malformed() {
        let good = info_data(b"disk", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION]);
        // Every truncation fails; so does one extra byte.
        for cut in 0..good.len() {
            assert!(parse_info_request(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        // Name length larger than the data.
        let mut d = good.clone();
        d[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&d).is_err());
        // Bad names.
        assert!(parse_info_request(&info_data(b"a\0", &[])).is_err());
        assert!(parse_info_request(&info_data(&[0xc3], &[])).is_err());
    }

    #[test]
    fn meta_request_ok() {
        let d = meta_data(b"disk", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let r = parse_meta_request(&d).expect("valid");
        assert_eq!(r.export, "disk");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        let r = parse_meta_request(&meta_data(b"", &[])).expect("valid");
        assert!(r.queries.is_empty());
    }

    #[test]
    fn meta_request_malformed() {
        let good = meta_data(b"disk", &[b"base:allocation", b"base:"]);
        for cut in 0..good.len() {
            assert!(parse_meta_request(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(parse_meta_request(&long).is_err());
        // A huge claimed query count with no queries behind it.
        let mut d = meta_data(b"disk", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&d).is_err());
        assert!(parse_meta_request(&meta_data(b"d", &[b"nocolon"])).is_err());
        assert!(parse_meta_request(&meta_data(b"d", &[b":leaf"])).is_err());
        assert!(parse_meta_request(&meta_data(b"d", &[b"base:\0"])).is_err());
    }

    #[test]
    fn base_allocation_matching() {
        assert!(query_selects_base_allocation("base:allocation", false));
        assert!(query_selects_base_allocation("base:allocation", true));
        assert!(!query_selects_base_allocation("base:", false));
        assert!(query_selects_base_allocation("base:", true));
        assert!(!query_selects_base_allocation("base:other", true));
        assert!(!query_selects_base_allocation("x-foo:allocation", true));
    }
}
