//! The WebSocket handshake (RFC 6455, section 4.2) and the socket it leaves.
//!
//! Our own rather than warp's `ws()` filter: warp's socket takes tungstenite's default
//! buffers, and its read buffer (128 KiB) is filled with zeros on the first read, so every
//! idle connection held about 138 KiB (measured: `scripts/bench-websocket.sh`, 5,000 idle
//! connections). Here the read buffer starts at 2 KiB and grows only for a frame that
//! needs it, and frames are written out once 8 KiB are buffered.
//!
//! hyper hands a connection's upgrade out once; the server loop takes it from a request
//! that asks for one and passes it to the route in the request's extensions
//! ([`crate::wire::Upgrade`]). The answer is built by the route and written by hyper.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;

/// A WebSocket connection, server side.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Most bytes of one client message or frame (a subscribe frame of 100 long bindings fits).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// The read buffer a connection starts with (grown for a longer frame).
const READ_BUFFER: usize = 2 * 1024;
/// Frames are buffered up to this many bytes before they are written (a flush writes
/// what is buffered).
const WRITE_BUFFER: usize = 8 * 1024;

/// The client's key if `headers` are a WebSocket handshake's: `Upgrade: websocket`,
/// `Connection: upgrade` (among other tokens), version 13 and a key.
pub fn client_key(headers: &HeaderMap) -> Option<&HeaderValue> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    let ok = has_token(header::UPGRADE, "websocket")
        && has_token(header::CONNECTION, "upgrade")
        && version.is_some_and(|v| v.as_bytes() == b"13");
    ok.then(|| headers.get(header::SEC_WEBSOCKET_KEY)).flatten()
}

/// The `101` that completes the handshake for `key`.
pub fn accept(key: &HeaderValue) -> Response {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    resp
}

/// The WebSocket on an upgraded connection, with the buffers above.
pub async fn socket(upgraded: Upgraded) -> Socket {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_handshake_needs_upgrade_connection_version_and_key() {
        let good = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(client_key(&headers(&good)).is_some());
        for missing in 0..good.len() {
            let mut some = good.to_vec();
            some.remove(missing);
            assert!(
                client_key(&headers(&some)).is_none(),
                "without {}",
                good[missing].0
            );
        }
        let mut old = good.to_vec();
        old[2] = ("sec-websocket-version", "8");
        assert!(client_key(&headers(&old)).is_none());
        // RFC 6455's example.
        let resp = accept(&HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            resp.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
