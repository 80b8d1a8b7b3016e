//! The connect route: every answer to a connect request comes from here, through the route
//! table (so one header builder serves it as every other route). A `GET` the server loop
//! read itself (marked [`FromLoop`]) gets the gateway's answer ([`Streams::answer`]: 204,
//! 503, an `error`, a reconnect frame, or a stream's head). A `GET` that arrived on a
//! connection hyper was already serving cannot be streamed from there: 421, and the client
//! may retry on a new connection (RFC 9110). Another method: 405.

use std::sync::Arc;

use warp::Filter;
use warp::http::{HeaderMap, StatusCode};

use super::{Route, json};
use crate::connect::{FromLoop, Streams};

/// Paths that serve the SSE stream (each also with a final `/`).
pub const CONNECT_PATHS: &[&str] = &["/api/events/v1/connect", "/events/v1/connect"];

/// The route: the path first (so that another method gets 405, not 404), then GET.
pub(super) fn route(streams: Arc<Streams>) -> impl Route {
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
        .and(warp::ext::optional::<FromLoop>())
        .and(warp::header::headers_cloned())
        .and(
            warp::query::raw()
                .map(Some)
                .or(warp::any().map(|| None))
                .unify(),
        )
        .map(
            move |from: Option<FromLoop>, headers: HeaderMap, query: Option<String>| match from {
                Some(from) => streams.answer(from, query.as_deref(), &headers),
                None => json(
                    StatusCode::MISDIRECTED_REQUEST,
                    &serde_json::json!({"code": 421, "message": "Open the stream on a new connection."}),
                ),
            },
        )
}
