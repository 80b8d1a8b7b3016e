//! HTTP routes (warp).
//!
//! | route | what | handler |
//! |---|---|---|
//! | `GET /api/events/v1/connect/`, `/events/v1/connect/` (final `/` optional) | the SSE stream | [`connect`] |
//! | `GET /` | the live page (edit bindings, connect, watch messages) | [`page`] |
//! | `GET /api/events/v1/ping` | `{"alive":true,"uptime":…}` | [`health`] |
//! | `GET /__lbheartbeat__` | 200 `{}` while the process serves | [`health`] |
//! | `GET /__heartbeat__` | 200 while the broker connection is up, 503 otherwise or when draining | [`health`] |
//! | `GET /__version__` | `{"version","commit","source","build"}` | [`health`] |
//! | `GET /metrics` | Prometheus text format | [`health`] |
//! | `POST /api/events/v1/publish` | embedded broker only: publish a message | [`publish`] |
//! | `GET /subscription/raw`, `/subscription/named` | Taskcluster's WebSocket protocol | [`crate::ws`] |
//! | `OPTIONS *` | CORS preflight | [`preflight`] |
//!
//! Every response carries the CORS and security headers Taskcluster's lib-api sends, first,
//! then its own ([`crate::wire::headers`], the one header builder, the connect route's
//! answers included); every rejection is mapped to a status in one place
//! ([`rejection_response`]).

mod connect;
mod health;
mod publish;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::broker::Broker;
use crate::metrics::Metrics;
use crate::registry::Registry;

pub use connect::CONNECT_PATHS;
pub use health::BUILD_ENV;
pub use publish::SameOriginOnly;

/// Every path the gateway answers (a connect path stands for its variants with a final
/// `/`); the manifest (`--print-manifest`) and the deployment check read it.
pub const ROUTES: &[&str] = &[
    "/api/events/v1/connect",
    "/events/v1/connect",
    "/",
    "/api/events/v1/ping",
    "/__lbheartbeat__",
    "/__heartbeat__",
    "/__version__",
    "/metrics",
    "/api/events/v1/publish",
    "/subscription/raw",
    "/subscription/named",
];

/// What the handlers share.
pub struct State {
    pub registry: Arc<Registry>,
    /// The connect route's answers.
    pub streams: Arc<crate::connect::Streams>,
    pub broker: Broker,
    pub metrics: Metrics,
    pub cors_origin: HeaderValue,
    pub started: Instant,
    /// Cancelled when the process starts draining.
    pub draining: tokio_util::sync::CancellationToken,
    /// The WebSocket endpoints' context.
    pub websocket: Arc<crate::ws::Context>,
}

/// A filter that answers one route.
trait Route: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {}
impl<F> Route for F where
    F: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static
{
}

/// All routes, with rejections mapped to statuses and the common headers added to every
/// response. Paths are matched before methods so that an unknown path is 404, not 405.
pub fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let cors = state.cors_origin.clone();
    connect::route(state.streams.clone())
        .or(crate::ws::route(state.websocket.clone()))
        .unify()
        .or(page())
        .unify()
        .or(health::ping(state.clone()))
        .unify()
        .or(health::lbheartbeat())
        .unify()
        .or(health::heartbeat(state.clone()))
        .unify()
        .or(health::version())
        .unify()
        .or(health::metrics(state.clone()))
        .unify()
        .or(publish::route(state))
        .unify()
        .or(preflight())
        .unify()
        .recover(rejection_response)
        .unify()
        .map(move |mut resp: Response| {
            let same_origin = resp.extensions().get::<SameOriginOnly>().is_some();
            let own = std::mem::take(resp.headers_mut());
            *resp.headers_mut() = crate::wire::headers(own, (!same_origin).then_some(&cors));
            resp
        })
}

/// Hands every request the shared state.
fn with_state(
    state: Arc<State>,
) -> impl Filter<Extract = (Arc<State>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// `GET /`: the live page, with its own content security policy.
fn page() -> impl Route {
    warp::path::end().and(warp::get()).map(|| {
        let mut resp = Response::new(crate::page::HTML.into());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(csp) = HeaderValue::from_str(&crate::page::CSP) {
            h.insert("content-security-policy", csp);
        }
        resp
    })
}

/// `OPTIONS *`: the CORS preflight (it allows no other origin for publish). Not
/// `warp::options()`: its method rejection would turn every unknown path into 405.
fn preflight() -> impl Route {
    warp::method()
        .and_then(|method: warp::http::Method| async move {
            if method == warp::http::Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::path::full())
        .map(|path: warp::path::FullPath| {
            let mut resp = Response::new(Default::default());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            if path.as_str().trim_end_matches('/') == publish::PATH {
                resp.extensions_mut().insert(SameOriginOnly);
            }
            resp
        })
}

/// The one place where a rejection becomes a status and a JSON body.
async fn rejection_response(rejection: Rejection) -> Result<Response, Infallible> {
    let (status, text) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "Not Found")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (StatusCode::LENGTH_REQUIRED, "Length Required")
    } else {
        (StatusCode::BAD_REQUEST, "Bad Request")
    };
    Ok(json(
        status,
        &serde_json::json!({"code": status.as_u16(), "message": text}),
    ))
}

/// A JSON response.
fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut resp = Response::new(value.to_string().into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}
