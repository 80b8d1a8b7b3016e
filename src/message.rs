//! Pulse messages and the SSE frames that carry them.
//!
//! Every frame is encoded exactly once into a [`Bytes`] and then shared by all clients
//! (a reference-count bump each): there is no per-client JSON work on the delivery path.
//!
//! Frame layout, byte for byte as the original service wrote it:
//! `event: <kind>\ndata: <compact JSON on one line>\nid: -\n\n`.

use std::time::{Instant, SystemTime};

use bytes::Bytes;

/// A frame as a subscription's clients share it: the encoded bytes (never copied per
/// client), what kind of frame it is, and when the delivery reached the gateway (for the
/// fan-out latency histogram and the replay window's age).
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Bytes,
    pub received: Instant,
    pub kind: FrameKind,
    /// A message's `CC` entries as a JSON array (empty: none), for the WebSocket
    /// protocol's `message.cc`; the SSE frame carries only the `route.` ones.
    pub cc: Bytes,
}

/// What a frame does to a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A `message` event; it ends with `id: -`, which a resumable stream replaces with
    /// the frame's position.
    Message,
    /// An SSE comment (a notice): no id.
    Comment,
    /// Messages may have been missed (the broker queue was lost): the comment in the
    /// frame for the original protocol; a resumable stream writes a `gap` event
    /// (`{"reason":"broker"}`) with the frame's position instead.
    Missed,
    /// The last frame of the stream (an `error` that ends it).
    End,
    /// Not written: the gateway is draining, and each stream ends with a reconnect frame
    /// of its own (its retry delay is jittered per client). It comes through the log the
    /// stream already reads, so streaming costs no extra check.
    Drain,
}

impl Frame {
    /// A `message` frame.
    pub fn message(bytes: Bytes, received: Instant) -> Self {
        Self {
            bytes,
            received,
            kind: FrameKind::Message,
            cc: Bytes::new(),
        }
    }

    /// An SSE comment frame.
    pub fn comment(bytes: Bytes) -> Self {
        Self {
            bytes,
            received: Instant::now(),
            kind: FrameKind::Comment,
            cc: Bytes::new(),
        }
    }

    /// A "messages may have been missed" notice (see [`FrameKind::Missed`]).
    pub fn missed(comment: Bytes) -> Self {
        Self {
            bytes: comment,
            received: Instant::now(),
            kind: FrameKind::Missed,
            cc: Bytes::new(),
        }
    }

    /// A frame that ends every stream that reads it (an `error` event).
    pub fn end(bytes: Bytes) -> Self {
        Self {
            bytes,
            received: Instant::now(),
            kind: FrameKind::End,
            cc: Bytes::new(),
        }
    }

    /// The marker sent to every subscription when the gateway starts draining.
    pub fn drain() -> Self {
        Self {
            bytes: Bytes::new(),
            received: Instant::now(),
            kind: FrameKind::Drain,
            cc: Bytes::new(),
        }
    }

    /// The same frame with the message's `CC` entries (see [`Incoming::cc_json`]).
    pub fn with_cc(mut self, cc: Bytes) -> Self {
        self.cc = cc;
        self
    }

    /// The bytes the frame holds (its SSE bytes and its `CC` list): what a log counts.
    pub fn size(&self) -> usize {
        self.bytes.len() + self.cc.len()
    }

    /// Whether the stream ends with this frame.
    pub fn ends_stream(&self) -> bool {
        matches!(self.kind, FrameKind::End | FrameKind::Drain)
    }
}

/// The id line every frame of the original protocol ends with.
pub const NO_ID: &[u8] = b"id: -\n\n";

/// How many bytes of a frame come before its `id: -` line: a resumable stream writes
/// those, then an id line of its own ([`id_line`]).
pub fn before_id(frame: &[u8]) -> usize {
    debug_assert!(frame.ends_with(NO_ID), "a frame of the original protocol");
    frame.len().saturating_sub(NO_ID.len())
}

/// The id line that ends a frame of a resumable stream (and the frame itself).
pub fn id_line(id: &str) -> Bytes {
    Bytes::from(format!("id: {id}\n\n"))
}

/// `frame` with its `id: -` line replaced by `id_line`.
pub fn with_id(frame: &[u8], id_line: &[u8]) -> Bytes {
    let mut own = Vec::with_capacity(frame.len() + id_line.len());
    own.extend_from_slice(&frame[..before_id(frame)]);
    own.extend_from_slice(id_line);
    Bytes::from(own)
}

/// The `ready` frame (data `{}`), the same for everyone.
pub const READY: &[u8] = b"event: ready\ndata: {}\nid: -\n\n";

/// A message as received from the broker, borrowed from the delivery.
#[derive(Debug)]
pub struct Incoming<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub redelivered: bool,
    /// Entries of the AMQP `CC` header, in order (routing uses all of them).
    pub cc: Vec<&'a str>,
    pub body: &'a [u8],
}

/// Why a delivery cannot be forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MalformedBody {
    #[error("message body is not UTF-8")]
    NotUtf8,
    #[error("message body is not JSON: {0}")]
    NotJson(String),
}

/// Bytes a `message` frame adds to its payload, exchange, routing key and routes: the
/// fixed text (about 100 bytes) and room for a few escaped characters.
const FRAME_SLACK: usize = 160;

impl Incoming<'_> {
    /// Encodes the `message` frame. Keys come in the original's order: payload, exchange,
    /// routingKey, redelivered, routes. `routes` are the `CC` entries starting with
    /// `route.`, prefix removed.
    pub fn encode(&self) -> Result<Bytes, MalformedBody> {
        let payload = compact_json(self.body)?;
        // Sized for the whole frame, so that it is never reallocated: a frame lives in
        // the subscription's log (up to the replay window), and a doubled buffer would
        // hold twice its bytes there. The slack covers the fixed text and a few escapes.
        let routes: usize = self.routes().map(|route| route.len() + 3).sum();
        let estimate =
            payload.len() + self.exchange.len() + self.routing_key.len() + routes + FRAME_SLACK;
        let mut out = Vec::with_capacity(estimate);
        out.extend_from_slice(b"event: message\ndata: {\"payload\":");
        out.extend_from_slice(&payload);
        out.extend_from_slice(b",\"exchange\":");
        push_json_string(&mut out, self.exchange);
        out.extend_from_slice(b",\"routingKey\":");
        push_json_string(&mut out, self.routing_key);
        out.extend_from_slice(if self.redelivered {
            b",\"redelivered\":true,\"routes\":["
        } else {
            b",\"redelivered\":false,\"routes\":["
        });
        for (i, route) in self.routes().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_string(&mut out, route);
        }
        out.extend_from_slice(b"]}\nid: -\n\n");
        Ok(Bytes::from(out))
    }

    /// The `CC` entries as a JSON array, encoded once for every WebSocket client; empty
    /// (no allocation) when there are none.
    pub fn cc_json(&self) -> Bytes {
        if self.cc.is_empty() {
            return Bytes::new();
        }
        let mut out = Vec::with_capacity(self.cc.iter().map(|c| c.len() + 3).sum::<usize>() + 2);
        out.push(b'[');
        for (i, cc) in self.cc.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_string(&mut out, cc);
        }
        out.push(b']');
        Bytes::from(out)
    }

    /// The `CC` entries starting with `route.`, prefix removed.
    fn routes(&self) -> impl Iterator<Item = &str> {
        self.cc.iter().filter_map(|cc| cc.strip_prefix("route."))
    }
}

/// An `error` frame: the data is a JSON string.
pub fn error_frame(text: &str) -> Bytes {
    let mut out = Vec::with_capacity(text.len() + 32);
    out.extend_from_slice(b"event: error\ndata: ");
    push_json_string(&mut out, text);
    out.extend_from_slice(b"\nid: -\n\n");
    Bytes::from(out)
}

/// A `ping` frame: `{"time":"2026-11-27T11:15:23.085Z"}` (UTC, milliseconds, as
/// JavaScript's `Date.prototype.toJSON`).
pub fn ping_frame(now: SystemTime) -> Bytes {
    let time = humantime::format_rfc3339_millis(now);
    Bytes::from(format!(
        "event: ping\ndata: {{\"time\":\"{time}\"}}\nid: -\n\n"
    ))
}

/// An SSE comment (ignored by EventSource) telling a slow client what it lost.
pub fn lagged_comment(missed: u64) -> Bytes {
    Bytes::from(format!(
        ": {missed} messages were dropped because this client reads too slowly\n\n"
    ))
}

/// A resumable stream's `gap` event: messages may have been missed (`reason`: why its
/// position could not be resumed, or `slow` for a client that fell behind), with how many
/// when known; `id` is the position the stream goes on from.
pub fn gap_frame(reason: &str, missed: Option<u64>, id: &str) -> Bytes {
    let data = match missed {
        Some(n) => serde_json::json!({"reason": reason, "missed": n}),
        None => serde_json::json!({"reason": reason}),
    };
    Bytes::from(format!("event: gap\ndata: {data}\nid: {id}\n\n"))
}

/// The head of the `gap` event a resumable stream gets for a [`FrameKind::Missed`] frame;
/// its `id:` line (the frame's position) follows.
pub const BROKER_GAP: &[u8] = b"event: gap\ndata: {\"reason\":\"broker\"}\n";

/// The `ready` frame of a resumable stream: its `id` names the position it starts from.
pub fn ready_frame_at(id: &str) -> Bytes {
    Bytes::from(format!("event: ready\ndata: {{}}\nid: {id}\n\n"))
}

/// An SSE comment telling clients that messages may have been missed: the broker queue
/// that feeds their subscription was lost (deleted, or expired during an outage).
pub fn missed_comment(exchange: &str) -> Bytes {
    let exchange = exchange.replace(['\r', '\n'], " ");
    Bytes::from(format!(
        ": messages on {exchange} may have been missed: the broker queue was lost and re-created\n\n"
    ))
}

/// The `retry:` delay sent when the server ends a stream on purpose: 0.5–5 s, jittered so
/// that the clients of a draining replica do not all reconnect at the same instant.
pub fn reconnect_delay_ms() -> u64 {
    500 + fastrand::u64(..4500)
}

/// The last frame of a stream the server ends on purpose: a named `reconnect` event with
/// data `{}` (so that libraries that hand every frame with data to the program see a named
/// event, not an empty `message`, and libraries that drop frames without data still see
/// its id), an empty `id:` that resets the client's last event id (so it reconnects
/// without `Last-Event-Id`, which would get 204), and a `retry:` that spreads the
/// reconnections over time. An EventSource dispatches it only to `reconnect` listeners.
pub fn reconnect_frame(retry_ms: u64) -> Bytes {
    Bytes::from(format!(
        "event: reconnect\ndata: {{}}\nid:\nretry: {retry_ms}\n\n"
    ))
}

/// The frame that sends a client elsewhere during a drain: a jittered `retry`, and for the
/// original protocol an empty `id:`; a resumable stream keeps its id (the frame has no
/// `id` field), to resume with it.
pub fn drain_frame(resumable: bool) -> Bytes {
    let delay = reconnect_delay_ms();
    if resumable {
        Bytes::from(format!("event: reconnect\ndata: {{}}\nretry: {delay}\n\n"))
    } else {
        reconnect_frame(delay)
    }
}

/// Checks that `body` is UTF-8 JSON and returns it without insignificant whitespace, as
/// `JSON.stringify(JSON.parse(body))` would (keys keep their order, numbers and strings
/// their text). The output never contains a line break, so it fits on one `data:` line.
pub fn compact_json(body: &[u8]) -> Result<Vec<u8>, MalformedBody> {
    let text = std::str::from_utf8(body).map_err(|_| MalformedBody::NotUtf8)?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| MalformedBody::NotJson(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    Ok(out)
}

/// Appends `s` as a JSON string literal (non-ASCII stays raw UTF-8, as in JavaScript).
fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests;
