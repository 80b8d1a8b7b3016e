//! The HTTP/1 bytes of a stream the gateway writes itself, once the request head is read:
//! the response head, the chunked framing of every write, and the few complete answers a
//! connect request can get instead of a stream (204, 503).
//!
//! Every other route is served by hyper (see `server`); this is the part of HTTP/1 a
//! stream that only writes needs, and no more. Invariants:
//! - an HTTP/1.1 stream is chunked, and every write is exactly one chunk, so that a write
//!   that stops half-way can be finished later without re-framing;
//! - an HTTP/1.0 stream is delimited by the connection's close, as HTTP/1.0 requires;
//! - header names are written lowercase, as hyper writes them.

use std::time::SystemTime;

/// A request's upgrade, which hyper hands out once: the server loop takes it from a
/// request that asks for one, for the route that completes a WebSocket handshake.
#[derive(Clone)]
pub struct Upgrade(std::sync::Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>>);

impl Upgrade {
    pub fn new(upgrade: hyper::upgrade::OnUpgrade) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Some(upgrade))))
    }

    /// The upgrade, to the first who asks.
    pub fn take(&self) -> Option<hyper::upgrade::OnUpgrade> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The peer of a request served by hyper: the server loop puts it in the request's
/// extensions, for the routes that count clients by address.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    /// The connection came within the descriptor reserve: it may be answered, not kept
    /// (a WebSocket handshake gets 503).
    pub in_reserve: bool,
}

use warp::http::{HeaderMap, HeaderValue, StatusCode};

/// The HTTP version a client spoke: the answer uses the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn status_line(self, status: StatusCode) -> String {
        let version = match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        format!(
            "{version} {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
    }

    /// Whether the stream's writes are chunks (HTTP/1.1) or raw (HTTP/1.0).
    pub fn chunked(self) -> bool {
        self == Version::Http11
    }
}

/// A request head, as the server loop read it.
#[derive(Debug)]
pub struct RequestHead {
    pub version: Version,
    /// The raw query string (without `?`), if any.
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl RequestHead {
    /// Whether the client wants the connection kept for another request (HTTP/1.1 unless
    /// it says `close`; HTTP/1.0 only if it says `keep-alive`).
    pub fn keep_alive(&self) -> bool {
        let says = |word: &str| {
            self.headers
                .get_all("connection")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(word))
        };
        match self.version {
            Version::Http11 => !says("close"),
            Version::Http10 => says("keep-alive"),
        }
    }

    /// Whether a body follows the head (a GET should have none; if it does, the
    /// connection is not reused, since the body would be taken for the next request).
    pub fn has_body(&self) -> bool {
        self.headers.contains_key("transfer-encoding")
            || self
                .headers
                .get("content-length")
                .is_some_and(|v| v.as_bytes() != b"0")
    }
}

/// The end of an HTTP/1.1 chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// What follows each chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// The head of a chunk of `len` bytes (`len` in hex, then CRLF), in a small array.
pub fn chunk_head(len: usize) -> ([u8; 20], usize) {
    let mut out = [0u8; 20];
    let text = format!("{len:x}\r\n");
    let n = text.len().min(out.len());
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    (out, n)
}

/// Appends `data` to `out` as one chunk (HTTP/1.1) or as it is (HTTP/1.0).
pub fn push_chunk(out: &mut Vec<u8>, version: Version, data: &[u8]) {
    if version.chunked() && !data.is_empty() {
        let (head, n) = chunk_head(data.len());
        out.extend_from_slice(&head[..n]);
        out.extend_from_slice(data);
        out.extend_from_slice(CHUNK_END);
    } else {
        out.extend_from_slice(data);
    }
}

/// The head of a `text/event-stream` response with `headers`, a `date`, and the framing
/// of `version` (chunked on HTTP/1.1; on HTTP/1.0 the body ends with the connection).
pub fn stream_head(version: Version, status: StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(640);
    out.extend_from_slice(version.status_line(status).as_bytes());
    push_headers(&mut out, headers);
    if version.chunked() {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete response with a body (possibly empty). `keep_alive`: the connection stays
/// open for the next request; otherwise the answer says it closes.
pub fn response(
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(version.status_line(status).as_bytes());
    push_headers(&mut out, headers);
    if status != StatusCode::NO_CONTENT {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    match (version, keep_alive) {
        (Version::Http11, false) => out.extend_from_slice(b"connection: close\r\n"),
        (Version::Http10, true) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn push_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Every response's headers, in the order Taskcluster's lib-api writes them (see the
/// transcripts): the security headers, the CORS ones (unless `cors_origin` is `None`: a
/// same-origin-only route), then the response's `own` (its own content security policy,
/// if it has one, replaces the one that allows nothing).
pub fn headers(own: HeaderMap, cors_origin: Option<&HeaderValue>) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(own.len() + 8);
    add_security_headers(&mut h);
    if let Some(cors_origin) = cors_origin {
        add_cors_headers(&mut h, cors_origin);
    }
    let mut last = None;
    for (name, value) in own {
        // Names come once each; a name with several values comes with `None` after it.
        let name = name.or_else(|| last.clone());
        if let Some(name) = name {
            if h.contains_key(&name) && last.as_ref() != Some(&name) {
                h.insert(name.clone(), value);
            } else {
                h.append(name.clone(), value);
            }
            last = Some(name);
        }
    }
    h
}

/// The security headers of every response, CORS aside: a content security policy that
/// allows nothing (unless the response has its own), and no MIME sniffing.
fn add_security_headers(h: &mut HeaderMap) {
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "report-uri /__cspreport__;default-src 'none';frame-ancestors 'none';",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

/// The CORS headers Taskcluster's lib-api puts on every response.
fn add_cors_headers(h: &mut HeaderMap, cors_origin: &HeaderValue) {
    h.insert("access-control-allow-origin", cors_origin.clone());
    h.insert("access-control-max-age", HeaderValue::from_static("900"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("OPTIONS,GET,HEAD,POST,PUT,DELETE,TRACE,CONNECT"),
    );
    h.insert(
        "access-control-request-method",
        HeaderValue::from_static("*"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static(
            "X-Requested-With,Content-Type,Authorization,Accept,Origin,Cache-Control",
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    #[test]
    fn chunks_and_heads() {
        let (head, n) = chunk_head(300);
        assert_eq!(&head[..n], b"12c\r\n");
        let mut out = Vec::new();
        push_chunk(&mut out, Version::Http11, b"abc");
        assert_eq!(out, b"3\r\nabc\r\n");
        let mut out = Vec::new();
        push_chunk(&mut out, Version::Http10, b"abc");
        assert_eq!(out, b"abc");

        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let head = String::from_utf8(stream_head(Version::Http11, StatusCode::OK, &headers))
            .expect("ASCII");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "));
        assert!(
            head.ends_with("GMT\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{head}"
        );
        let head = String::from_utf8(stream_head(Version::Http10, StatusCode::OK, &headers))
            .expect("ASCII");
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n") && head.ends_with("GMT\r\n\r\n"));

        let answer = response(Version::Http11, StatusCode::NO_CONTENT, &headers, b"", true);
        let answer = String::from_utf8(answer).expect("ASCII");
        assert!(answer.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!answer.contains("content-length"));
        let answer = response(
            Version::Http11,
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            b"{}",
            false,
        );
        let answer = String::from_utf8(answer).expect("ASCII");
        assert!(answer.contains("content-length: 2\r\nconnection: close\r\n\r\n{}"));
    }
}
