//! Reading a request head off a new connection to decide who serves it: a connect
//! request (`GET` on a connect path) is served by the gateway's own stream path, anything
//! else by hyper. The head is parsed with httparse, hyper's own parser.
//!
//! Invariants:
//! - the decision is made as soon as the request line is in: a request for another route
//!   is handed to hyper at once, with the bytes read so far, so hyper applies its own
//!   limits (431, 400, its header timeout) to it;
//! - a connect request's head must arrive whole within the header read timeout and
//!   [`MAX_HEAD_BYTES`]; a larger one goes to hyper too, which answers 431.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use warp::http::{HeaderMap, HeaderName, HeaderValue};

use crate::http::CONNECT_PATHS;
use crate::wire::{RequestHead, Version};

/// Largest request head (request line with the query string, and headers) accepted.
/// hyper answers 431 to larger heads, whether they arrive in one read or in pieces.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers a connect request may carry (more: hyper decides).
const MAX_HEADERS: usize = 64;

/// What the start of a connection is.
pub enum Head {
    /// A connect request, whole; the bytes after its head stay in the buffer.
    Connect(RequestHead),
    /// A connect request whose framing is ambiguous (several `Content-Length`, or one
    /// with `Transfer-Encoding`): its body could be taken for the next request. Answered
    /// 400 and closed, as hyper answers such a request on any other route.
    Ambiguous,
    /// Anything else (or something to refuse): hyper takes the connection with the bytes
    /// read so far.
    Other,
    /// The head did not arrive in time.
    TimedOut,
    /// The client closed the connection before sending a request.
    Closed,
}

/// Reads the next request head from `socket` into `buf` (which may already hold bytes),
/// by `deadline`.
pub async fn read(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Head {
    loop {
        match parse(buf) {
            Parsed::Connect(head, len) => {
                let _ = buf.split_to(len);
                return Head::Connect(head);
            }
            Parsed::Ambiguous => return Head::Ambiguous,
            Parsed::Other => return Head::Other,
            Parsed::Partial if buf.len() >= MAX_HEAD_BYTES => return Head::Other,
            Parsed::Partial => {}
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, socket.read_buf(buf)).await {
            Err(_) => return Head::TimedOut,
            Ok(Ok(0)) if buf.is_empty() => return Head::Closed,
            // A head cut short: hyper has the error answer for it.
            Ok(Ok(0)) => return Head::Other,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Head::Closed,
        }
    }
}

enum Parsed {
    Connect(RequestHead, usize),
    Ambiguous,
    Other,
    Partial,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(status) => status,
        Err(_) => return Parsed::Other,
    };
    // The request line is enough to decide.
    if let (Some(method), Some(target)) = (req.method, req.path)
        && (method != "GET" || !is_connect_path(target))
    {
        return Parsed::Other;
    }
    let httparse::Status::Complete(len) = status else {
        return Parsed::Partial;
    };
    let (Some(target), Some(version)) = (req.path, req.version) else {
        return Parsed::Other;
    };
    let version = if version == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        map.append(name, value);
    }
    let lengths = map
        .get_all(warp::http::header::CONTENT_LENGTH)
        .iter()
        .count();
    if lengths > 1 || (lengths == 1 && map.contains_key(warp::http::header::TRANSFER_ENCODING)) {
        return Parsed::Ambiguous;
    }
    let query = target.split_once('?').map(|(_, query)| query.to_owned());
    Parsed::Connect(
        RequestHead {
            version,
            query,
            headers: map,
        },
        len,
    )
}

/// Whether a request target (origin form, query included) names a connect path.
fn is_connect_path(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or_default();
    let path = path.strip_suffix('/').unwrap_or(path);
    CONNECT_PATHS.contains(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_are_told_apart_from_the_rest() {
        let input =
            b"GET /api/events/v1/connect/?bindings=x HTTP/1.1\r\nHost: a\r\nLast-Event-Id: 5\r\n\r\nrest";
        let Parsed::Connect(head, len) = parse(input) else {
            panic!("a connect request");
        };
        assert_eq!(len, input.len() - "rest".len());
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.query.as_deref(), Some("bindings=x"));
        assert!(head.headers.contains_key("last-event-id"));
        assert!(matches!(
            parse(b"GET /events/v1/connect HTTP/1.0\r\n\r\n"),
            Parsed::Connect(..)
        ));
        // Decided on the request line alone.
        assert!(matches!(
            parse(b"GET /metrics HTTP/1.1\r\nHost"),
            Parsed::Other
        ));
        assert!(matches!(
            parse(b"POST /api/events/v1/connect HTTP/1.1\r\n"),
            Parsed::Other
        ));
        assert!(matches!(
            parse(b"GET /api/events/v1/connectx HTTP/1.1\r\n"),
            Parsed::Other
        ));
        assert!(matches!(
            parse(b"GET /api/events/v1/connect/?b"),
            Parsed::Partial
        ));
        assert!(matches!(
            parse(b"GET /api/events/v1/connect HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Other));
        assert!(matches!(
            parse(b"GET /events/v1/connect HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 60\r\n\r\n"),
            Parsed::Ambiguous
        ));
        assert!(matches!(
            parse(b"GET /events/v1/connect HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parsed::Ambiguous
        ));
    }
}
