//! The complete answers a connect request can get instead of (or at the end of) a stream:
//! 204, 503, and one-frame streams; the writes and headers they share.
//!
//! Invariant: no write here waits longer than the stall timeout on a client that does
//! not read; an answer keeps the connection for another request only when its framing
//! allows (an HTTP/1.0 stream is delimited by the connection's close).

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};

use super::{After, Request, Streams};
use crate::admission::{Full, OverShare};
use crate::registry::Refusal;
use crate::wire::{self, LAST_CHUNK};

/// A complete answer, and whether the connection may carry another request after it.
pub(super) struct Answer {
    bytes: Vec<u8>,
    keep: bool,
}

impl Streams {
    /// `204 No Content`: the client must not come back.
    pub(super) fn no_content(&self, req: &Request) -> Answer {
        let mut headers = self.headers();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store no-cache must-revalidate"),
        );
        Answer {
            bytes: wire::response(
                req.version,
                StatusCode::NO_CONTENT,
                &headers,
                b"",
                req.reusable,
            ),
            keep: req.reusable,
        }
    }

    /// The 503 a client gets when a connection limit is reached (before any stream).
    pub(super) fn full(&self, req: &Request, full: Full) -> Answer {
        let message = match full {
            Full::Process => {
                self.metrics.connection("over_limit");
                "This server has reached its connection limit; try again later."
            }
            Full::Address => {
                self.metrics.connection("over_address_limit");
                self.metrics.refused("address_connections");
                "Too many connections from your address; close some, or try again later."
            }
        };
        let body =
            serde_json::json!({"code": "TooManyConnections", "message": message}).to_string();
        let mut headers = self.headers();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        Answer {
            bytes: wire::response(
                req.version,
                StatusCode::SERVICE_UNAVAILABLE,
                &headers,
                body.as_bytes(),
                req.reusable,
            ),
            keep: req.reusable,
        }
    }

    /// A stream that is one frame long: the head, `frame`, the end.
    pub(super) fn short_stream(&self, req: &Request, frame: &[u8]) -> Answer {
        let mut bytes = wire::stream_head(req.version, &self.stream_headers());
        bytes.extend_from_slice(&self.end_stream(req, frame).bytes);
        Answer {
            bytes,
            keep: req.reusable && req.version.chunked(),
        }
    }

    /// The end of a stream whose head was written: `frame`, then the end of the body.
    pub(super) fn end_stream(&self, req: &Request, frame: &[u8]) -> Answer {
        let mut bytes = Vec::new();
        wire::push_chunk(&mut bytes, req.version, frame);
        if req.version.chunked() {
            bytes.extend_from_slice(LAST_CHUNK);
        }
        Answer {
            bytes,
            keep: req.reusable && req.version.chunked(),
        }
    }

    /// Writes a complete answer; the connection stays for another request if it may.
    pub(super) async fn answer(&self, mut socket: TcpStream, answer: Answer) -> After {
        if !self.write(&mut socket, &answer.bytes).await {
            return After::Done;
        }
        if answer.keep {
            After::KeepAlive(socket)
        } else {
            let _ = socket.shutdown().await;
            After::Done
        }
    }

    /// Writes `bytes`, within the stall timeout. Returns whether it did.
    pub(super) async fn write(&self, socket: &mut TcpStream, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(self.settings.stall_timeout, socket.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Every response's headers (CORS and security, as Taskcluster's lib-api).
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        wire::add_common_headers(&mut headers, &self.cors_origin);
        headers
    }

    /// A stream's headers.
    pub(super) fn stream_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        wire::add_common_headers(&mut headers, &self.cors_origin);
        headers
    }
}

/// A refusal by a limit: its text for the client and its metric label.
pub(super) trait Refused: std::fmt::Display {
    fn reason(&self) -> &'static str;
}

impl Refused for Refusal {
    fn reason(&self) -> &'static str {
        Refusal::reason(self)
    }
}

impl Refused for OverShare {
    fn reason(&self) -> &'static str {
        OverShare::reason(self)
    }
}

/// Logs a refusal, at most once a second (with how many were not logged): a client that
/// is refused in a loop must not flood the logs.
pub(super) fn log_refusal(refusal: &dyn Refused, client: std::net::IpAddr) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::info!(%client, reason = refusal.reason(), suppressed, "subscription refused: {refusal}");
    }
}

/// Completes when the client closes its side (or sends something it should not: a stream
/// request has nothing more to say, and its bytes are read and dropped).
pub(super) async fn client_gone(socket: &TcpStream) {
    let mut buf = [0u8; 256];
    let mut junk = 0usize;
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                junk += n;
                if junk > 4096 {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
