//! Taskcluster's WebSocket events protocol (`/subscription/raw`, `/subscription/named`),
//! the one its UI uses since 2026, served from the same registry, subscriptions, broker
//! bindings and limits as the SSE endpoint.
//!
//! A handshake is answered by a route in warp's route table on the hyper path of the
//! server loop, with our own upgrade (`upgrade`, for its small buffers): an `Origin`
//! outside `WS_ALLOWED_ORIGINS` gets 403, a draining or full gateway 503 (the UI retries
//! with its backoff), otherwise the connection takes an admission slot like an SSE stream
//! and becomes a [`session`], its subscriptions read through `feed`. See `protocol` for
//! the frames and `named` for event names.

mod feed;
mod named;
#[cfg(test)]
mod properties;
mod protocol;
mod session;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use warp::Filter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};

use crate::admission::Full;
use crate::connect::Streams;
use crate::metrics::Metrics;
use crate::wire::{Peer, Upgrade};

/// Settings of the WebSocket endpoints.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// A ping every this often; a client that answered nothing since the last one is cut.
    pub ping_interval: Duration,
    /// `connection_init` must come within this.
    pub init_timeout: Duration,
    /// A connection is closed with 4408 after this (the UI reconnects).
    pub lifetime: Duration,
}

/// Which endpoint a connection came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Named,
}

/// Origins a browser may open a connection from.
#[derive(Clone, Debug)]
pub enum Origins {
    Any,
    Only(Vec<String>),
}

impl Origins {
    /// `*` (any), or a comma-separated list of origins (`https://host[:port]`).
    pub fn parse(text: &str) -> Self {
        let list: Vec<String> = text
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        match list.iter().any(|o| o == "*") {
            true => Origins::Any,
            false => Origins::Only(list),
        }
    }

    /// A request without `Origin` is not a browser's, and is allowed.
    fn allow(&self, origin: Option<&str>) -> bool {
        match (self, origin) {
            (Origins::Any, _) | (_, None) => true,
            (Origins::Only(list), Some(origin)) => list.iter().any(|o| o == origin),
        }
    }
}

/// What the endpoints share.
pub struct Context {
    pub streams: Arc<Streams>,
    pub settings: Settings,
    pub origins: Origins,
    /// The writers' tracker: a drain waits for the sessions as for the SSE writers.
    pub tasks: tokio_util::task::TaskTracker,
    /// Cancelled when the drain stops waiting: a session still writing is cut.
    pub closing: tokio_util::sync::CancellationToken,
}

impl Context {
    fn metrics(&self) -> &Metrics {
        &self.streams.metrics
    }
}

/// The two endpoints.
pub fn route(
    ctx: Arc<Context>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let raw = warp::path!("subscription" / "raw").map(|| Kind::Raw);
    let named = warp::path!("subscription" / "named").map(|| Kind::Named);
    raw.or(named)
        .unify()
        .and(warp::get())
        .and(warp::header::optional::<String>("origin"))
        .and(warp::ext::optional::<Peer>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<Upgrade>())
        .map(
            move |kind, origin: Option<String>, peer: Option<Peer>, headers, upgrade| {
                handshake(
                    ctx.clone(),
                    kind,
                    origin.as_deref(),
                    peer,
                    &headers,
                    upgrade,
                )
            },
        )
}

/// The answer to a handshake: 101 and a session, or a refusal.
fn handshake(
    ctx: Arc<Context>,
    kind: Kind,
    origin: Option<&str>,
    peer: Option<Peer>,
    headers: &HeaderMap,
    upgrade: Option<Upgrade>,
) -> Response {
    let metrics = ctx.metrics();
    let (Some(key), Some(upgrade)) = (upgrade::client_key(headers), upgrade) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "Expected a WebSocket handshake (Upgrade: websocket, Sec-WebSocket-Version: 13).",
        );
    };
    if !ctx.origins.allow(origin) {
        metrics.websocket_handshake("origin");
        return refusal(
            StatusCode::FORBIDDEN,
            "This origin may not open a connection.",
        );
    }
    if ctx.streams.draining.is_cancelled() {
        metrics.websocket_handshake("draining");
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "This server is restarting; try again.",
        );
    }
    let peer = peer.unwrap_or(Peer {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        in_reserve: false,
    });
    if peer.in_reserve {
        metrics.websocket_handshake("over_limit");
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "This server has reached its connection limit; try again later.",
        );
    }
    let peer = peer.addr;
    let client = ctx.streams.admission.client_address(peer.ip(), headers);
    let slot = match ctx.streams.admission.try_take(client) {
        Ok(slot) => slot,
        Err(full) => {
            let text = match full {
                Full::Process => {
                    metrics.websocket_handshake("over_limit");
                    "This server has reached its connection limit; try again later."
                }
                Full::Address => {
                    metrics.websocket_handshake("over_address_limit");
                    metrics.refused("address_connections");
                    "Too many connections from your address; close some, or try again later."
                }
            };
            return refusal(StatusCode::SERVICE_UNAVAILABLE, text);
        }
    };
    metrics.websocket_handshake("upgraded");
    tracing::debug!(%peer, ?kind, "websocket connected");
    let Some(pending) = upgrade.take() else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "The connection was upgraded already.",
        );
    };
    // Tracked with the writers: a drain waits for the sessions to end.
    let tasks = ctx.tasks.clone();
    tokio::spawn(tasks.track_future(async move {
        // The upgrade completes once hyper has written the 101; it fails if the client
        // left before (the slot goes with it).
        if let Ok(upgraded) = pending.await {
            let socket = upgrade::socket(upgraded).await;
            session::Session::new(ctx, kind, slot, client, socket)
                .run()
                .await;
        }
    }));
    upgrade::accept(key)
}

fn refusal(status: StatusCode, text: &str) -> Response {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"code": status.as_u16(), "message": text})),
        status,
    )
    .into_response()
}
