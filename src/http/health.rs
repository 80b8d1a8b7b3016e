//! Health, version and metrics routes: what load balancers, Kubernetes probes and
//! Prometheus ask.

use std::sync::Arc;

use warp::Filter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::{Route, State, json, with_state};
use crate::broker::Broker;

/// `GET /api/events/v1/ping`: `{"alive":true,"uptime":<seconds>}`.
pub(super) fn ping(state: Arc<State>) -> impl Route {
    warp::path!("api" / "events" / "v1" / "ping")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<State>| {
            let uptime = state.started.elapsed().as_secs_f64();
            json(
                StatusCode::OK,
                &serde_json::json!({"alive": true, "uptime": uptime}),
            )
        })
}

/// `GET /__lbheartbeat__`: 200 while the process serves.
pub(super) fn lbheartbeat() -> impl Route {
    warp::path!("__lbheartbeat__")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &serde_json::json!({})))
}

/// `GET /__heartbeat__`: 200 while a broker connection is up and holds (see the broker's
/// supervisor), the process is not draining and it has room for a stream (below
/// `MAX_CONNECTIONS`), 503 otherwise; the details in both cases (why the broker is not
/// healthy, without credentials). A full replica so leaves the load balancer's rotation,
/// and the affinity tier's ring, for new clients until a stream ends: a hot binding set
/// spills to the next replica instead of being refused.
pub(super) fn heartbeat(state: Arc<State>) -> impl Route {
    warp::path!("__heartbeat__")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<State>| {
            let health = state.broker.health();
            let embedded = matches!(state.broker, Broker::Memory(_));
            let draining = state.draining.is_cancelled();
            let full = state.streams.admission.full();
            let status = if health.healthy && !draining && !full {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                &serde_json::json!({
                    "broker": {
                        "connected": health.connected,
                        "healthy": health.healthy,
                        "reason": health.reason,
                        "endpoint": state.broker.describe(),
                        "embedded": embedded,
                    },
                    "draining": draining,
                    "full": full,
                    "connections": state.streams.admission.open(),
                    "subscriptions": state.registry.len(),
                }),
            )
        })
}

/// `GET /__version__`: what was built, from what.
pub(super) fn version() -> impl Route {
    warp::path!("__version__")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &version_info()))
}

/// `GET /metrics`: the Prometheus text exposition.
pub(super) fn metrics(state: Arc<State>) -> impl Route {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<State>| {
            let mut resp = Response::new(state.metrics.render().into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        })
}

/// Variables read at build time (by build.rs, or given as the container build's
/// arguments) and compiled into `/__version__`.
pub const BUILD_ENV: &[&str] = &[
    "EVENTS_GATEWAY_COMMIT",
    "EVENTS_GATEWAY_SOURCE",
    "EVENTS_GATEWAY_BUILD",
];

/// Build-time facts (filled by build.rs or the container build's arguments; the names
/// are [`BUILD_ENV`]).
fn version_info() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("EVENTS_GATEWAY_COMMIT").unwrap_or("unknown"),
        "source": option_env!("EVENTS_GATEWAY_SOURCE").unwrap_or("unknown"),
        "build": option_env!("EVENTS_GATEWAY_BUILD").unwrap_or("unknown"),
    })
}
