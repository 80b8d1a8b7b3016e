//! `GET /api/events/v1/connect/?bindings=…`: the SSE stream, with the original's answers
//! to a reconnecting client (204), a draining server (a reconnect frame), a full server
//! (503) and bad input (an `error` event).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

use super::{PeerAddr, Route, State, json, with_state};
use crate::binding;
use crate::message;
use crate::sse::{self, ClientStream};

/// Paths that serve the SSE stream (each also with a final `/`).
pub const CONNECT_PATHS: &[&str] = &["/api/events/v1/connect", "/events/v1/connect"];

/// The route: the path first (so that another method gets 405, not 404), then GET.
pub(super) fn route(state: Arc<State>) -> impl Route {
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
        .and(warp::header::headers_cloned())
        .and(
            warp::query::raw()
                .map(Some)
                .or(warp::any().map(|| None))
                .unify(),
        )
        .and(warp::ext::optional::<PeerAddr>())
        .and(with_state(state))
        .map(connect)
}

fn connect(
    headers: HeaderMap,
    query: Option<String>,
    peer: Option<PeerAddr>,
    state: Arc<State>,
) -> Response {
    // The original gives up reconnecting clients this way: every event has `id: -`, so an
    // EventSource that lost its stream comes back with `Last-Event-Id` and gets 204, after
    // which it stops for good.
    if headers.contains_key("last-event-id") {
        state.metrics.connection("no_content");
        let mut resp = Response::new(Default::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store no-cache must-revalidate"),
        );
        return resp;
    }
    if state.draining.is_cancelled() {
        // Not a 503: EventSource gives up for good on any non-200 answer. The reconnect
        // frame sends the browser elsewhere (another replica) after a jittered delay.
        state.metrics.connection("draining");
        let frame = message::reconnect_frame(sse::reconnect_delay_ms());
        return event_stream(stream::once(async move { Ok::<_, Infallible>(frame) }));
    }
    let Some(slot) = state.slots.try_take() else {
        state.metrics.connection("over_limit");
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"code": "TooManyConnections", "message": "This server has reached its connection limit; try again later."}),
        );
    };
    let peer = peer.map(|p| p.0.to_string()).unwrap_or_default();
    let set = match binding::parse_query(query.as_deref(), &state.limits) {
        Ok(set) => set,
        Err(err) => {
            state.metrics.connection("bad_input");
            tracing::debug!(%peer, error = %err, "refused bindings");
            let frame = message::error_frame(&err.to_string());
            return event_stream(stream::once(async move { Ok::<_, Infallible>(frame) }));
        }
    };
    let span = tracing::info_span!("connection", %peer, bindings = set.len());
    tracing::debug!(parent: &span, "client connected");
    let client = state.registry.subscribe(set);
    let body = ClientStream::new(
        client,
        slot,
        span,
        &state.stream,
        // A child token: each stream polls its own, not one lock shared by every client.
        state.draining.child_token(),
        state.metrics.clone(),
    );
    event_stream(body)
}

/// A `text/event-stream` response over a stream of already-encoded frames.
fn event_stream<S>(frames: S) -> Response
where
    S: futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let body = sync_wrapper::SyncStream::new(frames);
    let mut resp = warp::reply::stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
