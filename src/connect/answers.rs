//! The answers a connect request can get, as warp responses: 204, 503, and streams (a
//! stream's head with its first frames, or a stream that is one frame long). The route
//! table adds the headers every response carries (CORS and security, as Taskcluster's
//! lib-api); the server loop writes them with the framing of the client's HTTP version.

use bytes::Bytes;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::admission::OverShare;
use crate::registry::Refusal;

/// `204 No Content`: the client must not come back.
pub(super) fn no_content() -> Response {
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store no-cache must-revalidate"),
    );
    resp
}

/// The 503 a client gets when a connection limit is reached (before any stream).
pub(super) fn full(message: &str) -> Response {
    let body = serde_json::json!({"code": "TooManyConnections", "message": message}).to_string();
    let mut resp = Response::new(body.into());
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A stream's head and its first `frames`: the whole of a stream that is one frame long
/// (an `error`, a reconnect frame), or the start of one that goes on (see `Opening`).
pub(super) fn stream(frames: Bytes) -> Response {
    let mut resp = Response::new(frames.into());
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// A refusal by a limit: its text for the client and its metric label.
pub(crate) trait Refused: std::fmt::Display {
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
pub(crate) fn log_refusal(refusal: &dyn Refused, client: std::net::IpAddr) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::info!(%client, reason = refusal.reason(), suppressed, "subscription refused: {refusal}");
    }
}
