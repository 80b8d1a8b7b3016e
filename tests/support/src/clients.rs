//! The clients tests talk to a gateway with: an SSE client (reqwest + eventsource-stream)
//! and a raw HTTP/1.0 one that sees every byte; the connect query; what the tests look
//! for in what they read.

use std::net::SocketAddr;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `bindings=<urlencoded JSON>` for a list of (exchange, pattern).
/// The value of one series (name with labels, as printed) in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

pub fn bindings_query(bindings: &[(&str, &str)]) -> String {
    let list: Vec<_> = bindings
        .iter()
        .map(|(e, p)| serde_json::json!({"exchange": e, "routingKeyPattern": p}))
        .collect();
    let json = serde_json::json!({ "bindings": list }).to_string();
    format!("bindings={}", urlencode(&json))
}

pub fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An SSE client (reqwest + eventsource-stream).
pub struct SseClient {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>,
}

impl SseClient {
    pub fn from_response(resp: reqwest::Response) -> Self {
        let status = resp.status();
        let headers = resp.headers().clone();
        let events = resp
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        Self {
            status,
            headers,
            events: Box::pin(events),
        }
    }

    /// The next event, or `None` if the stream ended; panics after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        match tokio::time::timeout(within, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            Ok(Some(Err(err))) => panic!("stream error: {err}"),
            Ok(None) => None,
            Err(_) => panic!("no event within {within:?}"),
        }
    }

    /// The next event (5 s at most).
    pub async fn next(&mut self) -> Option<Event> {
        self.next_within(Duration::from_secs(5)).await
    }

    /// The next event (within 5 s), which must be of `kind`; returns its data.
    pub async fn expect(&mut self, kind: &str) -> String {
        self.expect_within(kind, Duration::from_secs(5)).await
    }

    /// The next event, which must be of `kind` and come within `within`; returns its data.
    pub async fn expect_within(&mut self, kind: &str, within: Duration) -> String {
        let event = self
            .next_within(within)
            .await
            .unwrap_or_else(|| panic!("stream ended, expected {kind}"));
        assert_eq!(event.event, kind, "unexpected event: {event:?}");
        assert_eq!(event.id, "-", "every event carries id: -");
        event.data
    }

    /// The next event that is not a `ping` (within 5 s).
    pub async fn next_skipping_pings(&mut self) -> Option<Event> {
        self.next_skipping_pings_within(Duration::from_secs(5))
            .await
    }

    /// The next event that is not a `ping`, or `None` if the stream ended; panics after
    /// `within`.
    pub async fn next_skipping_pings_within(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next_within(left).await?;
            if event.event != "ping" {
                return Some(event);
            }
        }
    }

    /// Reads `message` events (skipping others) until `count` have arrived within
    /// `within`; returns how many times each payload `n` was seen.
    pub async fn collect_numbered(
        &mut self,
        count: usize,
        within: Duration,
    ) -> std::collections::BTreeMap<u64, usize> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = std::collections::BTreeMap::new();
        let mut total = 0;
        while total < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next_within(left).await.expect("stream stays open");
            if event.event == "message" {
                let n = message_json(&event.data)["payload"]["n"]
                    .as_u64()
                    .expect("n");
                *seen.entry(n).or_insert(0) += 1;
                total += 1;
            }
        }
        seen
    }

    /// Asserts that the next event other than a `ping` is the `message` whose payload is
    /// `marker`: nothing unwanted arrived before it. The marker must be published after
    /// whatever must never arrive, on a route the client receives, so that it can only
    /// come after it (one queue per exchange keeps the order).
    pub async fn expect_marker(&mut self, marker: &serde_json::Value) {
        let event = self
            .next_skipping_pings()
            .await
            .unwrap_or_else(|| panic!("stream ended before the marker {marker}"));
        assert_eq!(event.event, "message", "expected the marker, got {event:?}");
        assert_eq!(
            &message_json(&event.data)["payload"],
            marker,
            "expected the marker, got another message first: {event:?}"
        );
    }

    /// Asserts the stream ends (after at most 5 s).
    pub async fn expect_end(&mut self) {
        let item = self.next().await;
        assert!(item.is_none(), "expected the stream to end, got {item:?}");
    }
}

/// A raw HTTP/1.0 client: the response body is not chunk-encoded, so the SSE bytes can be
/// compared exactly, and the test controls when (and whether) it reads.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl RawClient {
    pub async fn get(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::send(stream, addr, path_and_query, headers).await
    }

    /// The same, from source address `source` (any 127.x.y.z: loopback has them all).
    pub async fn get_from(
        source: std::net::IpAddr,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = socket.connect(addr).await.expect("tcp connect");
        Self::send(stream, addr, path_and_query, headers).await
    }

    async fn send(
        mut stream: TcpStream,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Self {
        let mut req = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send request");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads until `buf` contains `needle` (or panics after `within`).
    pub async fn read_until(&mut self, needle: &[u8], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !contains(&self.buf, needle) {
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "did not see {:?} within {within:?}; got {:?}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&self.buf)
                    )
                })
                .expect("read");
            if n == 0 {
                panic!(
                    "connection closed before {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The answer's status and its first event (`ready`, `error` with its data), read
    /// within `within`; `None` for the event if the answer has none (a 503).
    pub async fn first_event(&mut self, within: Duration) -> (u16, Option<(String, String)>) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = String::from_utf8_lossy(&self.buf[at + 4..]).into_owned();
                if status != 200 {
                    return (status, None);
                }
                if let Some(end) = body.find("\n\n") {
                    let frame = &body[..end];
                    let field = |name: &str| {
                        frame
                            .lines()
                            .find_map(|l| l.strip_prefix(name))
                            .unwrap_or_default()
                            .to_owned()
                    };
                    return (status, Some((field("event: "), field("data: "))));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let head = String::from_utf8_lossy(&self.buf).into_owned();
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return (status, None);
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!(
                    "no first event within {within:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    /// Reads everything until the server closes the connection.
    pub async fn read_to_end(&mut self, within: Duration) {
        tokio::time::timeout(within, self.stream.read_to_end(&mut self.buf))
            .await
            .expect("server closes the connection in time")
            .expect("read");
    }

    /// The response head and body, split at the blank line.
    pub fn head_and_body(&self) -> (String, &[u8]) {
        let at = find(&self.buf, b"\r\n\r\n").expect("complete response head");
        (
            String::from_utf8_lossy(&self.buf[..at]).into_owned(),
            &self.buf[at + 4..],
        )
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `frame` (one SSE frame, without its final blank line) is the reconnect frame
/// of a draining gateway for the original protocol: a named `reconnect` event, an empty
/// `id:` (the client's last event id reset) and a `retry:` of 500–5000 ms.
pub fn is_reconnect_frame(frame: &str) -> bool {
    frame
        .strip_prefix("event: reconnect\ndata: {}\nid:\nretry: ")
        .and_then(|ms| ms.trim_end().parse::<u64>().ok())
        .is_some_and(|ms| (500..=5000).contains(&ms))
}

/// The same for a resumable stream: no `id` field (the client keeps its last id).
pub fn is_resumable_reconnect_frame(frame: &str) -> bool {
    frame
        .strip_prefix("event: reconnect\ndata: {}\nretry: ")
        .and_then(|ms| ms.trim_end().parse::<u64>().ok())
        .is_some_and(|ms| (500..=5000).contains(&ms))
}

/// Parses a `message` event's data.
pub fn message_json(data: &str) -> serde_json::Value {
    serde_json::from_str(data).expect("message data is JSON")
}

/// One SSE frame: event, data, id (`None` when the frame has no `id:` line).
#[derive(Debug, Clone)]
pub struct Frame {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// The complete frames in a raw client's body so far.
pub fn frames(raw: &RawClient) -> Vec<Frame> {
    let Some(at) = find(&raw.buf, b"\r\n\r\n") else {
        return Vec::new();
    };
    let body = String::from_utf8_lossy(&raw.buf[at + 4..]).into_owned();
    let mut out = Vec::new();
    let mut rest = body.as_str();
    while let Some(end) = rest.find("\n\n") {
        let text = &rest[..end];
        rest = &rest[end + 2..];
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::to_owned)
        };
        out.push(Frame {
            event: field("event: ").unwrap_or_default(),
            data: field("data: ").unwrap_or_default(),
            id: field("id: ").or_else(|| text.lines().any(|l| l == "id:").then(String::new)),
        });
    }
    out
}

/// The `n` of every message frame, in order.
pub fn numbers(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f.event == "message")
        .filter_map(|f| message_json(&f.data)["payload"]["n"].as_u64())
        .collect()
}

/// The last id a browser would remember (the last frame with a non-empty id).
pub fn last_id(frames: &[Frame]) -> String {
    frames
        .iter()
        .rev()
        .find_map(|f| f.id.clone().filter(|id| !id.is_empty()))
        .expect("an id")
}
