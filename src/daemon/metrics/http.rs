//! The HTTP of the metrics endpoint, without I/O: parse a request head (httparse, the
//! parser hyper uses) and build the whole response. One request per connection
//! (`Connection: close`): GET or HEAD of `/metrics`; `/` says where the metrics are.

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers a request may carry (Prometheus sends about six).
const MAX_HEADERS: usize = 32;

/// What a complete request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
}

/// Parses what has arrived so far: `Ok(None)` while the head is incomplete, `Err` with the
/// response to send when it can never be served (malformed, or over the limits).
pub fn parse(buf: &[u8]) -> Result<Option<Request>, Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Ok(Some(Request {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
        })),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(error(
            431,
            "Request Header Fields Too Large",
            &format!("request head over {MAX_HEAD} bytes"),
        )),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(error(
            431,
            "Request Header Fields Too Large",
            &format!("more than {MAX_HEADERS} headers"),
        )),
        Err(e) => Err(error(400, "Bad Request", &format!("{e}"))),
    }
}

/// The response to `req`; `body` renders the metrics (only called for `/metrics`).
pub fn respond(req: &Request, body: impl FnOnce() -> Result<String, String>) -> Vec<u8> {
    let head_only = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return build(
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                "Allow: GET, HEAD\r\n",
                b"only GET and HEAD\n",
                false,
            );
        }
    };
    let path = req.path.split('?').next().unwrap_or_default();
    let (status, ctype, text) = match path {
        "/metrics" => match body() {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(e) => return error(500, "Internal Server Error", &e),
        },
        "/" => (
            "200 OK",
            "text/plain; charset=utf-8",
            "nbd-mirror: metrics at /metrics\n".to_string(),
        ),
        _ => return error(404, "Not Found", "metrics are at /metrics"),
    };
    build(status, ctype, "", text.as_bytes(), head_only)
}

/// A plain-text error response.
pub fn error(code: u16, reason: &str, message: &str) -> Vec<u8> {
    build(
        &format!("{code} {reason}"),
        "text/plain; charset=utf-8",
        "",
        format!("{message}\n").as_bytes(),
        false,
    )
}

/// `extra`: more header lines, each ending in CRLF.
fn build(status: &str, ctype: &str, extra: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &[u8]) -> String {
        String::from_utf8_lossy(r).into_owned()
    }

    #[test]
    fn waits_for_a_whole_head_then_serves_metrics() {
        let full = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n";
        assert_eq!(parse(&full[..20]), Ok(None));
        let req = parse(full).expect("valid").expect("complete");
        assert_eq!(req.path, "/metrics");
        let r = text(&respond(&req, || Ok("a_metric 1\n".into())));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(r.contains("Content-Length: 11\r\n"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\na_metric 1\n"), "{r}");
    }

    #[test]
    fn head_has_no_body_and_a_query_string_is_ignored() {
        let req = Request {
            method: "HEAD".into(),
            path: "/metrics?x=1".into(),
        };
        let r = text(&respond(&req, || Ok("a_metric 1\n".into())));
        assert!(r.contains("Content-Length: 11\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
    }

    #[test]
    fn other_paths_methods_and_failures() {
        let get = |p: &str| Request {
            method: "GET".into(),
            path: p.into(),
        };
        let never = || -> Result<String, String> { panic!("rendered for a path without metrics") };
        assert!(text(&respond(&get("/other"), never)).starts_with("HTTP/1.1 404 "));
        assert!(text(&respond(&get("/"), never)).contains("/metrics"));
        let post = Request {
            method: "POST".into(),
            path: "/metrics".into(),
        };
        let r = text(&respond(&post, never));
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nonly GET and HEAD\n"), "{r}");
        let r = text(&respond(&get("/metrics"), || Err("core gone".into())));
        assert!(
            r.starts_with("HTTP/1.1 500 ") && r.ends_with("core gone\n"),
            "{r}"
        );
    }

    #[test]
    fn bad_and_oversized_heads_are_refused() {
        let r = text(&parse(b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n").unwrap_err());
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        let r = text(&parse(&big).unwrap_err());
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let r = text(&parse(&many).unwrap_err());
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }
}
