//! The frames of Taskcluster's WebSocket events protocol: what a client may send, what
//! the gateway sends, and the close codes. Every frame is one JSON text message with a
//! `type`; texts the Taskcluster server sends are kept word for word.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::message::{self, Frame};

/// Close codes (4xxx are the protocol's own; the UI reconnects after any close it did
/// not ask for except 4401 and 4403).
pub mod close {
    /// A framing violation, or no `connection_init` in time.
    pub const PROTOCOL: u16 = 4400;
    /// The connection lived its lifetime; the client reconnects and subscribes again.
    pub const LIFETIME: u16 = 4408;
    /// The gateway is draining (RFC 6455 "service restart"): reconnect, to another replica.
    pub const RESTART: u16 = 1012;
    /// The client read too slowly and lost messages (RFC 6455 "try again later").
    pub const SLOW: u16 = 1013;
}

/// A frame that ends the connection with [`close::PROTOCOL`], and why.
#[derive(Debug, PartialEq, Eq)]
pub enum Fatal {
    MalformedJson,
    MissingType,
    NotInitFirst,
    NoInit,
}

impl Fatal {
    /// The close reason, Taskcluster's text.
    pub fn reason(&self) -> &'static str {
        match self {
            Fatal::MalformedJson => "Protocol error: malformed JSON",
            Fatal::MissingType => "Protocol error: missing frame type",
            Fatal::NotInitFirst => "Protocol error: first frame must be connection_init",
            Fatal::NoInit => "Protocol error: no connection_init frame received",
        }
    }
}

/// A client frame: its `type` and its fields.
pub struct Inbound {
    pub kind: String,
    pub fields: Map<String, Value>,
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<Inbound, Fatal> {
    let value: Value = serde_json::from_str(text).map_err(|_| Fatal::MalformedJson)?;
    let Value::Object(mut fields) = value else {
        return Err(Fatal::MissingType);
    };
    match fields.remove("type") {
        Some(Value::String(kind)) => Ok(Inbound { kind, fields }),
        _ => Err(Fatal::MissingType),
    }
}

/// The bindings of a raw subscribe frame, or the `ProtocolError` text.
pub fn raw_bindings(fields: &Map<String, Value>) -> Result<Vec<(&str, &str)>, String> {
    let bindings = match fields.get("bindings") {
        Some(Value::Array(b)) if !b.is_empty() => b,
        _ => return Err("subscribe requires a non-empty array of bindings".to_owned()),
    };
    if bindings.len() > super::named::MAX_PER_SUBSCRIBE {
        return Err(format!(
            "subscribe allows at most {} bindings",
            super::named::MAX_PER_SUBSCRIBE
        ));
    }
    bindings
        .iter()
        .map(|b| match (b.get("exchange"), b.get("pattern")) {
            (Some(Value::String(e)), Some(Value::String(p))) if b.is_object() => {
                Ok((e.as_str(), p.as_str()))
            }
            _ => Err("each binding requires an `exchange` and a `pattern` string".to_owned()),
        })
        .collect()
}

pub const CONNECTION_ACK: &str = r#"{"type":"connection_ack"}"#;

pub fn subscribe_ack(id: &str) -> String {
    serde_json::json!({"type": "subscribe_ack", "subscriptionId": id}).to_string()
}

/// An `error` frame; with the subscription it is about, if any.
pub fn error(code: &str, text: &str, subscription: Option<&str>) -> String {
    let mut frame = serde_json::json!({"type": "error", "code": code, "message": text});
    if let Some(id) = subscription {
        frame["subscriptionId"] = Value::from(id);
    }
    frame.to_string()
}

/// What comes before a message frame's JSON, and what follows it.
const MESSAGE_HEAD: &[u8] = b"event: message\ndata: ";
const ROUTES: &[u8] = b",\"routes\":[";

/// The `data` frame of a message for subscription `id`: the SSE frame's JSON (encoded
/// once for every client) with its `routes` replaced by the message's `cc`. Keys come in
/// Taskcluster's order: payload, exchange, routingKey, redelivered, cc. `None` if the
/// frame is not a message frame.
pub fn data(id: &str, frame: &Frame) -> Option<String> {
    let sse = &frame.bytes[..];
    let json = sse.get(MESSAGE_HEAD.len()..message::before_id(sse).checked_sub(1)?)?;
    // The last `,"routes":[` is the frame's own: a JSON string cannot hold an unescaped
    // quote, and the routes array holds only strings.
    let routes_at = json.windows(ROUTES.len()).rposition(|w| w == ROUTES)?;
    let cc: &[u8] = match frame.cc.is_empty() {
        true => b"[]",
        false => &frame.cc,
    };
    let head = br#"{"type":"data","subscriptionId":""#;
    let mut out = Vec::with_capacity(head.len() + id.len() + routes_at + cc.len() + 24);
    out.extend_from_slice(head);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(br#"","message":"#);
    out.extend_from_slice(&json[..routes_at]);
    out.extend_from_slice(b",\"cc\":");
    out.extend_from_slice(cc);
    out.extend_from_slice(b"}}");
    String::from_utf8(out).ok()
}

/// The text of an SSE `error` frame (its data is a JSON string).
pub fn error_text(frame: &Bytes) -> String {
    let text = std::str::from_utf8(frame).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("data: "))
        .and_then(|data| serde_json::from_str::<String>(data).ok())
        .unwrap_or_else(|| "The subscription ended".to_owned())
}

/// A subscription id: 22 characters of URL-safe base64 from 128 random bits, the first
/// one a letter (the shape of Taskcluster's slugids; clients treat it as opaque).
pub fn subscription_id() -> String {
    use base64::Engine;
    let mut bits = fastrand::u128(..).to_be_bytes();
    bits[0] &= 0x7f;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Incoming;

    #[test]
    fn a_data_frame_is_the_message_with_its_cc() {
        let msg = Incoming {
            exchange: "exchange/x",
            routing_key: "a.b",
            redelivered: false,
            cc: vec!["route.one", "other"],
            body: br#"{"routes":[1],"n":1}"#,
        };
        let frame = Frame::message(msg.encode().unwrap_or_default(), std::time::Instant::now())
            .with_cc(msg.cc_json());
        let text = data("ID", &frame).unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(
            value,
            serde_json::json!({"type": "data", "subscriptionId": "ID", "message": {
                "payload": {"routes": [1], "n": 1}, "exchange": "exchange/x",
                "routingKey": "a.b", "redelivered": false, "cc": ["route.one", "other"]}})
        );
        assert!(text.contains(r#""message":{"payload":"#), "{text}");
        let no_cc = Frame::message(frame.bytes.clone(), std::time::Instant::now());
        assert!(
            data("ID", &no_cc)
                .unwrap_or_default()
                .ends_with(r#","cc":[]}}"#)
        );
    }

    #[test]
    fn frames_without_a_type_or_json_are_fatal() {
        assert_eq!(parse("not json").err(), Some(Fatal::MalformedJson));
        for text in [r#""a string""#, r#"{"notype":1}"#, "null", r#"{"type":1}"#] {
            assert_eq!(parse(text).err(), Some(Fatal::MissingType), "{text}");
        }
        let ok = parse(r#"{"type":"subscribe","bindings":[]}"#).ok();
        assert_eq!(ok.map(|f| f.kind), Some("subscribe".to_owned()));
    }

    #[test]
    fn raw_bindings_are_checked_with_taskclusters_texts() {
        let fields = |v: Value| match v {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let many = vec![serde_json::json!({"exchange": "e", "pattern": "#"}); 101];
        let cases = [
            (
                serde_json::json!({}),
                "subscribe requires a non-empty array of bindings",
            ),
            (
                serde_json::json!({"bindings": []}),
                "subscribe requires a non-empty array of bindings",
            ),
            (
                serde_json::json!({"bindings": many}),
                "subscribe allows at most 100 bindings",
            ),
            (
                serde_json::json!({"bindings": [{"exchange": "e"}]}),
                "each binding requires an `exchange` and a `pattern` string",
            ),
            (
                serde_json::json!({"bindings": [["e", "#"]]}),
                "each binding requires an `exchange` and a `pattern` string",
            ),
        ];
        for (input, text) in cases {
            assert_eq!(
                raw_bindings(&fields(input.clone())),
                Err(text.to_owned()),
                "{input}"
            );
        }
        let ok =
            fields(serde_json::json!({"bindings": [{"exchange": "e", "pattern": "#", "x": 1}]}));
        assert_eq!(raw_bindings(&ok), Ok(vec![("e", "#")]));
    }

    #[test]
    fn subscription_ids_look_like_slugids() {
        let id = subscription_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(id.starts_with(|c: char| c.is_ascii_alphabetic()), "{id}");
        assert_ne!(id, subscription_id());
    }
}
