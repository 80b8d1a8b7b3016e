//! `POST /api/events/v1/publish`: the embedded broker's way in (404 in AMQP mode).
//!
//! It has no authentication (the embedded broker is for trying the gateway out), so it
//! is kept from other origins: it takes only `Content-Type: application/json` (a web page
//! elsewhere can only post that after a CORS preflight) and neither its answers nor the
//! preflight for its path allow another origin ([`SameOriginOnly`]). A cross-site form
//! post therefore gets 415, and a cross-site script is stopped by its browser.
//!
//! Against DNS rebinding (a page on `attacker.example`, which then resolves to
//! 127.0.0.1, is same-origin with the gateway as far as the browser knows): `Host` must
//! name the gateway by address or as `localhost`, never by another name, and an `Origin`,
//! when sent, must be the gateway's own (the same host and port as `Host`); otherwise 403.

use std::sync::Arc;

use bytes::Bytes;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{Route, State, json, with_state};
use crate::binding::MAX_NAME_BYTES;
use crate::broker::Broker;

/// Largest body the route accepts.
const MAX_PUBLISH_BYTES: u64 = 1024 * 1024;
/// Most `cc` entries in one message (each is matched against every pattern).
pub const MAX_CC: usize = 64;

/// The path of the route.
pub(super) const PATH: &str = "/api/events/v1/publish";

/// Marks a response (in its extensions) that must not carry CORS headers.
#[derive(Clone, Copy, Debug)]
pub struct SameOriginOnly;

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

/// The route; it exists only on the embedded broker.
pub(super) fn route(state: Arc<State>) -> impl Route {
    warp::path!("api" / "events" / "v1" / "publish")
        .and(warp::post())
        .and(with_state(state))
        .and_then(|state: Arc<State>| async move {
            match &state.broker {
                Broker::Memory(_) => Ok(state),
                Broker::Amqp(_) => Err(warp::reject::not_found()),
            }
        })
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::content_length_limit(MAX_PUBLISH_BYTES))
        .and(warp::body::bytes())
        .map(
            |state: Arc<State>,
             host: Option<String>,
             origin: Option<String>,
             content_type: Option<String>,
             body: Bytes| {
                let mut resp = match same_origin(host.as_deref(), origin.as_deref()) {
                    Ok(()) => publish(state, content_type.as_deref(), body),
                    Err(message) => json(
                        StatusCode::FORBIDDEN,
                        &serde_json::json!({"code": "Forbidden", "message": message}),
                    ),
                };
                resp.extensions_mut().insert(SameOriginOnly);
                resp
            },
        )
}

/// Whether a request comes to the gateway by its own name and from its own pages (see
/// the module doc).
fn same_origin(host: Option<&str>, origin: Option<&str>) -> Result<(), &'static str> {
    let host = host.ok_or("publish needs a Host header")?;
    let name = match host.rsplit_once(':') {
        // `[::1]:12345`, `127.0.0.1:12345`, `localhost:12345` (not an IPv6 address's colons).
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let local_name =
        name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost");
    if !local_name && name.parse::<std::net::IpAddr>().is_err() {
        return Err(
            "publish answers only requests that name the gateway by its address or as localhost",
        );
    }
    match origin {
        None => Ok(()),
        Some(origin) => {
            let authority = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            match authority {
                Some(authority) if authority.eq_ignore_ascii_case(host) => Ok(()),
                _ => Err("publish answers only the gateway's own pages"),
            }
        }
    }
}

/// Routes one message to the subscriptions it matches, like a topic exchange. Answers
/// how many it reached.
fn publish(state: Arc<State>, content_type: Option<&str>, body: Bytes) -> Response {
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
    let is_json = content_type
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &serde_json::json!({"code": "UnsupportedMediaType", "message": "publish takes Content-Type: application/json"}),
        );
    }
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
    if msg.cc.len() > MAX_CC {
        return bad(format!("at most {MAX_CC} cc entries"));
    }
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

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn only_the_gateways_own_names_and_pages_may_publish() {
        for host in [
            "localhost:12345",
            "127.0.0.1:8080",
            "[::1]:12345",
            "10.1.2.3",
            "app.localhost",
        ] {
            assert_eq!(same_origin(Some(host), None), Ok(()), "{host}");
        }
        assert!(
            same_origin(Some("attacker.example:12345"), None).is_err(),
            "DNS rebinding"
        );
        assert!(same_origin(None, None).is_err());
        let host = Some("localhost:12345");
        assert_eq!(same_origin(host, Some("http://localhost:12345")), Ok(()));
        assert!(same_origin(host, Some("http://attacker.example")).is_err());
        assert!(same_origin(host, Some("http://localhost:9999")).is_err());
        assert!(same_origin(host, Some("null")).is_err());
    }
}
