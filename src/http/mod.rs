//! HTTP routes (warp).
//!
//! | route | what |
//! |---|---|
//! | `GET /api/events/v1/connect/`, `/events/v1/connect/` (final `/` optional) | the SSE stream |
//! | `GET /` | the live page (edit bindings, connect, watch messages) |
//! | `GET /api/events/v1/ping` | `{"alive":true,"uptime":…}` |
//! | `GET /__lbheartbeat__` | 200 `{}` while the process serves |
//! | `GET /__heartbeat__` | 200 while the broker connection is up, 503 otherwise or when draining |
//! | `GET /__version__` | `{"version","commit","source","build"}` |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /api/events/v1/publish` | embedded broker only: publish a message |
//! | `OPTIONS *` | CORS preflight |
//!
//! Every response carries the CORS and security headers Taskcluster's lib-api sends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::binding::MAX_NAME_BYTES;
use crate::binding::{self, Limits};
use crate::broker::Broker;
use crate::message;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::sse::{self, ClientStream, Slots, StreamSettings};

/// Paths that serve the SSE stream (each also with a final `/`).
const CONNECT_PATHS: &[&str] = &["/api/events/v1/connect", "/events/v1/connect"];

/// The peer address of a connection, set by the server loop.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// What the handlers share.
pub struct State {
    pub registry: Arc<Registry>,
    pub broker: Broker,
    /// Admission of SSE connections (MAX_CONNECTIONS).
    pub slots: Arc<Slots>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub stream: StreamSettings,
    pub cors_origin: HeaderValue,
    pub started: Instant,
    /// Cancelled when the process starts draining.
    pub draining: tokio_util::sync::CancellationToken,
}

/// All routes, with the common headers added to every response.
pub fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    // Paths are matched before methods so that an unknown path is 404, not 405.
    let connect = warp::path::full()
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
        .and(with_state.clone())
        .map(connect);
    let ping = warp::path!("api" / "events" / "v1" / "ping")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<State>| {
            let uptime = state.started.elapsed().as_secs_f64();
            json(
                StatusCode::OK,
                &serde_json::json!({"alive": true, "uptime": uptime}),
            )
        });
    let page = warp::path::end().and(warp::get()).map(|| {
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
    });
    let lbheartbeat = warp::path!("__lbheartbeat__")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &serde_json::json!({})));
    let heartbeat = warp::path!("__heartbeat__")
        .and(warp::get())
        .and(with_state.clone())
        .map(heartbeat);
    let version = warp::path!("__version__")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &version_info()));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<State>| {
            let mut resp = Response::new(state.metrics.render().into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        });
    let publish = warp::path!("api" / "events" / "v1" / "publish")
        .and(warp::post())
        .and(with_state.clone())
        .and_then(|state: Arc<State>| async move {
            match &state.broker {
                Broker::Memory(_) => Ok(state),
                Broker::Amqp(_) => Err(warp::reject::not_found()),
            }
        })
        .and(warp::body::content_length_limit(MAX_PUBLISH_BYTES))
        .and(warp::body::bytes())
        .map(publish);
    // Not `warp::options()`: its method rejection would turn every unknown path into 405.
    let preflight = warp::method()
        .and_then(|method: warp::http::Method| async move {
            if method == warp::http::Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .map(|| {
            let mut resp = Response::new(Default::default());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        });
    let cors = state.cors_origin.clone();
    connect
        .or(page)
        .unify()
        .or(ping)
        .unify()
        .or(lbheartbeat)
        .unify()
        .or(heartbeat)
        .unify()
        .or(version)
        .unify()
        .or(metrics)
        .unify()
        .or(publish)
        .unify()
        .or(preflight)
        .unify()
        .recover(|rejection: warp::Rejection| async move {
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
            Ok::<_, Infallible>(json(
                status,
                &serde_json::json!({"code": status.as_u16(), "message": text}),
            ))
        })
        .unify()
        .map(move |mut resp: Response| {
            add_common_headers(resp.headers_mut(), &cors);
            resp
        })
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

fn heartbeat(state: Arc<State>) -> Response {
    let connected = state.broker.is_connected();
    let embedded = matches!(state.broker, Broker::Memory(_));
    let draining = state.draining.is_cancelled();
    let status = if connected && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({
            "broker": {
                "connected": connected,
                "endpoint": state.broker.describe(),
                "embedded": embedded,
            },
            "draining": draining,
            "subscriptions": state.registry.len(),
        }),
    )
}

/// Largest body `POST /api/events/v1/publish` accepts.
const MAX_PUBLISH_BYTES: u64 = 1024 * 1024;

/// A message for the embedded broker.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Publish {
    exchange: String,
    routing_key: String,
    #[serde(default)]
    cc: Vec<String>,
    payload: Box<serde_json::value::RawValue>,
}

/// `POST /api/events/v1/publish` (embedded broker only): routes one message to the
/// subscriptions it matches, like a topic exchange. Answers how many it reached.
fn publish(state: Arc<State>, body: Bytes) -> Response {
    let Broker::Memory(broker) = &state.broker else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"code": 404, "message": "Not Found"}),
        );
    };
    let bad = |message: String| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"code": "InvalidRequest", "message": message}),
        )
    };
    let msg: Publish = match serde_json::from_slice(&body) {
        Ok(msg) => msg,
        Err(err) => {
            return bad(format!(
                "expected {{\"exchange\", \"routingKey\", \"cc\": [...], \"payload\": <JSON>}}: {err}"
            ));
        }
    };
    let too_long = std::iter::once(&msg.exchange)
        .chain(std::iter::once(&msg.routing_key))
        .chain(msg.cc.iter())
        .any(|s| s.len() > MAX_NAME_BYTES);
    if too_long || msg.exchange.is_empty() {
        return bad(format!(
            "exchange must be non-empty; exchange, routingKey and cc entries at most {MAX_NAME_BYTES} bytes"
        ));
    }
    let cc: Vec<&str> = msg.cc.iter().map(String::as_str).collect();
    let routed = broker.publish(
        &msg.exchange,
        &msg.routing_key,
        &cc,
        msg.payload.get().as_bytes(),
    );
    json(StatusCode::OK, &serde_json::json!({ "routed": routed }))
}

fn version_info() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("EVENTS_GATEWAY_COMMIT").unwrap_or("unknown"),
        "source": option_env!("EVENTS_GATEWAY_SOURCE").unwrap_or("unknown"),
        "build": option_env!("EVENTS_GATEWAY_BUILD").unwrap_or("unknown"),
    })
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut resp = Response::new(value.to_string().into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// The headers Taskcluster's lib-api puts on every response (see the transcripts).
fn add_common_headers(h: &mut HeaderMap, cors_origin: &HeaderValue) {
    // The page sets its own policy (see `page`); everything else allows nothing.
    if !h.contains_key("content-security-policy") {
        h.insert(
            "content-security-policy",
            HeaderValue::from_static(
                "report-uri /__cspreport__;default-src 'none';frame-ancestors 'none';",
            ),
        );
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("access-control-allow-origin", cors_origin.clone());
    h.insert("access-control-max-age", HeaderValue::from_static("900"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("OPTIONS,GET,HEAD,POST,PUT,DELETE,TRACE,CONNECT"),
    );
    h.insert(
        "access-control-request-method",
        HeaderValue::from_static("*"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static(
            "X-Requested-With,Content-Type,Authorization,Accept,Origin,Cache-Control",
        ),
    );
}
