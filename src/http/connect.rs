//! The connect paths as far as hyper sees them. A `GET` on a connect path is read and
//! served by the server loop and `crate::connect`, before hyper ever sees the connection;
//! what reaches hyper here is another method (405), or a `GET` that arrived on a
//! connection hyper was already serving, which cannot be streamed from there (421: the
//! client may retry on a new connection, as RFC 9110 allows).

use warp::Filter;
use warp::http::StatusCode;

use super::{Route, json};

/// Paths that serve the SSE stream (each also with a final `/`).
pub const CONNECT_PATHS: &[&str] = &["/api/events/v1/connect", "/events/v1/connect"];

/// The route: the path first (so that another method gets 405, not 404), then GET.
pub(super) fn route() -> impl Route {
    warp::path::full()
        .and_then(|path: warp::path::FullPath| async move {
            let p = path.as_str();
            let p = p.strip_suffix('/').unwrap_or(p);
            if CONNECT_PATHS.contains(&p) {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::get())
        .map(|| {
            json(
                StatusCode::MISDIRECTED_REQUEST,
                &serde_json::json!({"code": 421, "message": "Open the stream on a new connection."}),
            )
        })
}
