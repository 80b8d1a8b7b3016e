//! Helpers shared by events-gateway's integration test binaries: start a real gateway on
//! port 0 against the real RabbitMQ, talk to it over HTTP, publish through the broker, and
//! count the broker's own objects.
//!
//! A crate of its own (a dev-dependency of the gateway) rather than a module included in
//! each binary: each binary uses the part it needs, and nothing needs `allow(dead_code)`.

use std::net::SocketAddr;
use std::time::Duration;

use events_gateway::{Config, Running};
use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod stream_rule;
pub use stream_rule::{Dechunk, StreamRule};

/// Where the tests find RabbitMQ (override with TEST_AMQP_URL; scripts/test.sh points it
/// at the RabbitMQ 4.3 of scripts/rabbitmq-4.3.sh for the second run).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's address (host and port of [`amqp_url`]), for proxies in front of it.
pub fn amqp_addr() -> std::net::SocketAddr {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("TEST_AMQP_URL is an AMQP URL");
    let host = match uri.authority.host.as_str() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("TEST_AMQP_URL names an IP address")
}

/// The broker's own CLI (override with TEST_RABBITMQCTL, e.g. scripts/rabbitmqctl-4.3).
pub fn rabbitmqctl_program() -> String {
    std::env::var("TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned())
}

/// How to start the broker the tests expect, for failure messages.
fn how_to_start() -> &'static str {
    if std::env::var_os("TEST_AMQP_URL").is_some() {
        "start the broker TEST_AMQP_URL names (for RabbitMQ 4.3: `scripts/rabbitmq-4.3.sh start`)"
    } else {
        "start one with `rabbitmq-server -detached && rabbitmqctl await_startup` (or set TEST_AMQP_URL)"
    }
}

/// A short random tag that keeps one test's broker objects apart from another's.
pub fn unique() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// A gateway running inside the test process.
pub struct TestGateway {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub queue_prefix: String,
}

impl TestGateway {
    /// Starts a gateway on 127.0.0.1:0 with test-friendly settings plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Self {
        let broker = Broker::connect().await;
        drop(broker);
        Self::start_unchecked(extra).await
    }

    /// Starts a gateway on the embedded broker (no RabbitMQ), demo traffic off unless
    /// `extra` turns it on.
    pub async fn start_embedded(extra: &[&str]) -> Self {
        let mut args = vec!["--amqp-url="];
        if !extra.iter().any(|a| a.starts_with("--demo=")) {
            args.push("--demo=false");
        }
        args.extend_from_slice(extra);
        Self::start_unchecked(&args).await
    }

    /// Publishes through the embedded broker's endpoint; returns the HTTP status and body.
    pub async fn publish(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .post(self.url("/api/events/v1/publish"))
            .json(body)
            .send()
            .await
            .expect("publish");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Publishes in-process on the embedded broker (no HTTP round trip, so that a test can
    /// keep an exact rate); returns how many subscriptions the message reached.
    pub fn publish_embedded(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &serde_json::Value,
    ) -> usize {
        let running = self.running.as_ref().expect("running");
        match running.broker() {
            events_gateway::Broker::Memory(broker) => {
                broker.publish(exchange, routing_key, &[], payload.to_string().as_bytes())
            }
            _ => panic!("publish_embedded needs the embedded broker"),
        }
    }

    /// Same, without first checking that RabbitMQ is up (for tests of broker outages).
    pub async fn start_unchecked(extra: &[&str]) -> Self {
        init_logs();
        let queue_prefix = format!("queue/guest/events-gateway-test-{}", unique());
        // Test defaults, each unless `extra` sets the same flag.
        let defaults = [
            "--listen-address=127.0.0.1".to_owned(),
            "--port=0".to_owned(),
            format!("--queue-prefix={queue_prefix}"),
            "--shutdown-grace=5s".to_owned(),
            format!("--amqp-url={}", amqp_url()),
            // Every test client comes from 127.0.0.1: the per-address limits are tested
            // on their own, from several loopback addresses.
            "--max-connections-per-address=100000".to_owned(),
            "--address-subscription-burst=100000".to_owned(),
            "--max-bindings-per-address=1000000".to_owned(),
            "--max-exchanges-per-address=100000".to_owned(),
            "--max-pending-per-address=100000".to_owned(),
        ];
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let mut args = vec!["events-gateway".to_owned()];
        args.extend(
            defaults
                .into_iter()
                .filter(|d| !extra.iter().any(|e| flag(e) == flag(d))),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = Config::parse_from(args).expect("test config is valid");
        let running = events_gateway::start(config).await.expect("gateway starts");
        let addr = running.local_addr();
        Self {
            running: Some(running),
            addr,
            http: reqwest::Client::new(),
            queue_prefix,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until the gateway's broker connection is up.
    pub async fn wait_connected(&self) {
        let running = self.running.as_ref().expect("running");
        eventually(Duration::from_secs(10), || running.broker().is_connected()).await;
    }

    /// Opens an SSE stream for `bindings` (a list of (exchange, pattern)).
    pub async fn connect(&self, bindings: &[(&str, &str)]) -> SseClient {
        self.connect_query(&bindings_query(bindings)).await
    }

    /// Opens an SSE stream with a raw query string (without `?`).
    pub async fn connect_query(&self, query: &str) -> SseClient {
        let url = self.url(&format!("/api/events/v1/connect/?{query}"));
        let resp = self.http.get(url).send().await.expect("connect");
        SseClient::from_response(resp)
    }

    /// Opens an SSE stream over a raw HTTP/1.0 socket and reads until `ready`.
    pub async fn raw_connect(&self, bindings: &[(&str, &str)]) -> RawClient {
        let query = bindings_query(bindings);
        let mut raw =
            RawClient::get(self.addr, &format!("/api/events/v1/connect/?{query}"), &[]).await;
        raw.read_until(b"event: ready\ndata: {}\nid: -\n\n", Duration::from_secs(5))
            .await;
        raw
    }

    /// The HTTP status of `GET path`.
    pub async fn status_of(&self, path: &str) -> u16 {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// The body of `GET path`.
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }

    /// The value of one metric series in /metrics (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.text("/metrics").await, series).unwrap_or(0.0)
    }

    /// Drains and stops the gateway.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// Tests are quiet unless TEST_LOG is set (to a tracing filter such as `debug`).
fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

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

/// A test's own AMQP connection: declares exchanges and publishes.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    /// Connects, or fails the test with how to start RabbitMQ.
    pub async fn connect() -> Self {
        let url = amqp_url();
        let connection = match tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(err)) => panic!(
                "RabbitMQ is not reachable at {} ({err}). These tests need a real broker: {}.",
                amqp_addr(),
                how_to_start()
            ),
            Err(_) => panic!(
                "RabbitMQ at {} did not answer within 10 s: {}.",
                amqp_addr(),
                how_to_start()
            ),
        };
        let channel = connection.create_channel().await.expect("channel");
        Self {
            connection,
            channel,
        }
    }

    /// Declares a topic exchange with a unique name `exchange/test/<tag>/<name>`.
    pub async fn exchange(&self, name: &str) -> String {
        self.declare_exchange(name, false).await
    }

    /// A topic exchange with a unique name; a durable one survives a broker restart.
    pub async fn declare_exchange(&self, name: &str, durable: bool) -> String {
        let exchange = format!("exchange/test/{}/{name}", unique());
        self.channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: false,
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        exchange
    }

    pub async fn delete_exchange(&self, exchange: &str) {
        let _ = self
            .channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }

    /// Publishes `body` with `routing_key` and a `CC` header (if not empty).
    pub async fn publish(&self, exchange: &str, routing_key: &str, cc: &[&str], body: &[u8]) {
        let props = cc_properties(cc);
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
    }

    /// Publishes `{"n": N}` for each N of `range`, in order, with routing key `k`: the
    /// numbered messages the tests count for loss, duplicates and order.
    pub async fn publish_numbered(&self, exchange: &str, range: std::ops::Range<u64>) {
        for n in range {
            self.publish(exchange, "k", &[], format!("{{\"n\":{n}}}").as_bytes())
                .await;
        }
    }
}

/// Message properties with a `CC` header (an array of strings), as Pulse publishers send.
pub fn cc_properties(cc: &[&str]) -> BasicProperties {
    if cc.is_empty() {
        return BasicProperties::default();
    }
    let list: Vec<AMQPValue> = cc
        .iter()
        .map(|c| AMQPValue::LongString((*c).into()))
        .collect();
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(list)));
    BasicProperties::default().with_headers(headers)
}

/// The broker's own view (rabbitmqctl), filtered to one queue-name prefix.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct BrokerObjects {
    pub queues: Vec<String>,
    /// (exchange, queue, routing key), default-exchange bindings excluded.
    pub bindings: Vec<(String, String, String)>,
    pub consumers: usize,
}

pub async fn broker_objects(queue_prefix: &str) -> BrokerObjects {
    let queues = rabbitmqctl_json(&["list_queues", "name", "consumers"]).await;
    let bindings = rabbitmqctl_json(&[
        "list_bindings",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .await;
    let mut out = BrokerObjects::default();
    for q in queues {
        let name = q["name"].as_str().unwrap_or_default();
        if name.starts_with(queue_prefix) {
            out.queues.push(name.to_owned());
            out.consumers += q["consumers"].as_u64().unwrap_or(0) as usize;
        }
    }
    for b in bindings {
        let source = b["source_name"].as_str().unwrap_or_default();
        let dest = b["destination_name"].as_str().unwrap_or_default();
        if !source.is_empty() && dest.starts_with(queue_prefix) {
            out.bindings.push((
                source.to_owned(),
                dest.to_owned(),
                b["routing_key"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out.queues.sort();
    out.bindings.sort();
    out
}

/// Runs rabbitmqctl with `--formatter json`; returns the rows it prints.
pub async fn rabbitmqctl_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = args.to_vec();
    all.extend(["-q", "--formatter", "json"]);
    serde_json::from_str(&rabbitmqctl_output(&all).await).expect("rabbitmqctl prints JSON")
}

/// Runs rabbitmqctl (it comes with rabbitmq-server), asserts success, returns stdout.
pub async fn rabbitmqctl_output(args: &[&str]) -> String {
    let out = tokio::process::Command::new(rabbitmqctl_program())
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs (it comes with rabbitmq-server; TEST_RABBITMQCTL overrides)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// Polls an async `check` until it holds, or panics after `within`.
pub async fn eventually_async<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds, or panics after `within`.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the broker until its objects under `prefix` satisfy `check`; returns them.
pub async fn broker_eventually(
    prefix: &str,
    within: Duration,
    check: impl Fn(&BrokerObjects) -> bool,
) -> BrokerObjects {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let objects = broker_objects(prefix).await;
        if check(&objects) {
            return objects;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "broker objects not as expected within {within:?}: {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Parses a `message` event's data.
pub fn message_json(data: &str) -> serde_json::Value {
    serde_json::from_str(data).expect("message data is JSON")
}

/// The real binary in a child process, so that its RSS, its log and its AMQP channels are
/// its own. Dropping it sends SIGTERM (it drains and deletes its queues), then kills it.
pub struct ChildGateway {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub queue_prefix: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildGateway {
    /// Starts `bin` (pass `env!("CARGO_BIN_EXE_events-gateway")`) on 127.0.0.1, port 0,
    /// against the test broker, logging at info, with `args` added (a flag given there
    /// replaces the default of the same name).
    pub async fn start(bin: &str, args: &[&str]) -> Self {
        Self::start_with(std::process::Command::new(bin), args).await
    }

    /// The same, with the process's open-file limit set to `open_files` (by util-linux's
    /// `prlimit`, which then runs the binary as the same process).
    pub async fn start_with_open_files(bin: &str, open_files: usize, args: &[&str]) -> Self {
        let mut command = std::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={open_files}:{open_files}"))
            .arg(bin);
        Self::start_with(command, args).await
    }

    async fn start_with(mut command: std::process::Command, args: &[&str]) -> Self {
        let queue_prefix = format!("queue/guest/events-gateway-test-{}", unique());
        let defaults = [
            "--listen-address=127.0.0.1".to_owned(),
            "--port=0".to_owned(),
            format!("--amqp-url={}", amqp_url()),
            format!("--queue-prefix={queue_prefix}"),
            "--log-level=events_gateway=info".to_owned(),
            "--shutdown-grace=5s".to_owned(),
        ];
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let mut all: Vec<String> = defaults
            .into_iter()
            .filter(|d| !args.iter().any(|a| flag(a) == flag(d)))
            .collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut child = command
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the gateway binary");
        // Its port comes from its "listening" log line; every line is kept (tests count
        // them), and the pipe is drained so that the child never blocks on it.
        let stdout = child.stdout.take().expect("piped stdout");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|word| word.strip_prefix("local_addr="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(addr);
                    }
                    log.lock().expect("log").push(line);
                }
            });
        }
        let logged = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .expect("join");
        let Ok(addr) = logged else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway binary did not log its address");
        };
        let gw = Self {
            child,
            addr,
            queue_prefix,
            log,
        };
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/__heartbeat__");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(resp) = http.get(&url).send().await
                && resp.status() == 200
            {
                return gw;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway binary did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The lines it has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// The value of one metric series (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let body = reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        metric_value(&body, series).unwrap_or(0.0)
    }

    /// AMQP channels the broker has open on this process's connections (rabbitmqctl),
    /// found through the local ports of its sockets to the broker.
    pub async fn amqp_channels(&self) -> usize {
        let ports = amqp_local_ports(self.child.id());
        let listing = rabbitmqctl_output(&["list_channels", "name", "-q"]).await;
        listing
            .lines()
            .filter_map(|l| l.trim().split_once(" -> "))
            .filter_map(|(from, _)| from.rsplit_once(':'))
            .filter(|(_, port)| port.parse().is_ok_and(|p: u16| ports.contains(&p)))
            .count()
    }

    /// Connects an SSE client from `source` (a loopback address) over HTTP/1.0.
    pub async fn raw_from(&self, source: std::net::IpAddr, bindings: &[(&str, &str)]) -> RawClient {
        let path = format!("/api/events/v1/connect/?{}", bindings_query(bindings));
        RawClient::get_from(source, self.addr, &path, &[]).await
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        // SIGTERM, so that it drains and deletes its queues; then make sure it is gone.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Local ports of the TCP sockets process `pid` holds to the broker's port (its AMQP
/// links).
fn amqp_local_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy();
                    l.strip_prefix("socket:[")
                        .and_then(|s| s.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let remote = fields.get(2)?;
            let inode = fields.get(9)?;
            let remote_port = u16::from_str_radix(remote.rsplit_once(':')?.1, 16).ok()?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (remote_port == amqp_addr().port() && inodes.iter().any(|i| i == inode))
                .then_some(local_port)
        })
        .collect()
}
