//! Prometheus metrics, all named `events_gateway_*` and registered at start so every
//! series exists before the first client arrives. Labels take a small fixed set of
//! values only: nothing per client, per pattern or per exchange.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

mod labels;

pub use labels::{
    BROKER_FAILURE_STAGES, DROP_REASONS, HTTP_ERRORS, LIMITS, OUTCOMES, REFUSAL_REASONS,
    RESUME_OUTCOMES, WS_ENDS, WS_HANDSHAKES,
};

/// Every metric the gateway exports. Cheap to clone (one `Arc`): every client stream
/// holds one.
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;
    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

/// The metrics themselves (see [`Metrics`]).
pub struct MetricsInner {
    registry: Registry,
    pub connections_open: IntGauge,
    pub connections_pending: IntGauge,
    pub connections_total: IntCounterVec,
    pub subscriptions: IntGauge,
    pub subscriptions_lingering: IntGauge,
    pub replay_bytes: IntGauge,
    pub replay_limit: IntGauge,
    pub streams_blocked: IntGauge,
    pub exchanges: IntGauge,
    pub refused: IntCounterVec,
    pub resumes: IntCounterVec,
    pub limit: IntGaugeVec,
    pub broker_connected: IntGauge,
    pub broker_reconnects: IntCounter,
    pub broker_connect_failures: IntCounterVec,
    pub broker_backoff: Gauge,
    pub broker_queues: IntGauge,
    pub broker_bindings: IntGauge,
    pub messages_received: IntCounter,
    pub messages_delivered: IntCounter,
    pub messages_dropped: IntCounterVec,
    pub uptime_start: Gauge,
    pub connections_limit: IntGauge,
    pub http_errors: IntCounterVec,
    pub time_to_ready: Histogram,
    pub fanout_latency: Histogram,
    pub websocket_handshakes: IntCounterVec,
    pub websocket_closes: IntCounterVec,
    pub websocket_subscriptions: IntGauge,
    pub websocket_messages: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = MetricsInner {
            connections_open: registered(
                &registry,
                IntGauge::new(
                "events_gateway_connections_open",
                "Client connections currently open: SSE streams and WebSocket connections",
            ),
            ),
            connections_pending: registered(
                &registry,
                IntGauge::new(
                "events_gateway_connections_pending",
                "Connections not admitted yet: their request head is read or answered, or they are kept alive between requests (at most MAX_PENDING_CONNECTIONS)",
            ),
            ),
            connections_total: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_connections_total",
                    "SSE connect requests by how they ended up: ready, bad_input, broker_error, timeout, no_content (Last-Event-Id), over_limit (MAX_CONNECTIONS), draining (sent away with a reconnect frame during shutdown), client_gone (left before ready or error), over_address_limit (MAX_CONNECTIONS_PER_ADDRESS), refused (a new subscription over a rate or a cap; see events_gateway_refused_total)",
                ),
                &["outcome"],
            ),
            ),
            exchanges: registered(
                &registry,
                IntGauge::new(
                "events_gateway_exchanges",
                "Exchanges in use by some subscription (each one broker queue and two AMQP channels)",
            ),
            ),
            refused: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_refused_total",
                    "Clients refused by a limit, by reason: address_connections (MAX_CONNECTIONS_PER_ADDRESS, 503), address_rate (ADDRESS_SUBSCRIPTION_RATE), address_bindings (MAX_BINDINGS_PER_ADDRESS), address_exchanges (MAX_EXCHANGES_PER_ADDRESS), subscriptions (MAX_SUBSCRIPTIONS), bindings (MAX_BROKER_BINDINGS), exchanges (MAX_EXCHANGES), pattern (MAX_PATTERN_WORDS or MAX_PATTERN_WILDCARDS), pending_per_address (MAX_PENDING_PER_ADDRESS), pending_connections (MAX_PENDING_CONNECTIONS), no_descriptors (the open-file limit, FD_RESERVE included, is reached); the address_connections and the last three get no event (a 503, or a closed connection), the others an error event",
                ),
                &["reason"],
            ),
            ),
            resumes: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_resumes_total",
                    "Resumable clients that came back with their last event id, by outcome: replayed (every frame since was written), or the reason of their gap event: invalid-id, other-epoch (a restart or another replica), other-subscription, expired (older than the replay window)",
                ),
                &["outcome"],
            ),
            ),
            limit: registered(
                &registry,
                IntGaugeVec::new(
                Opts::new(
                    "events_gateway_limit",
                    "Configured limits, to compare with their gauges: connections_per_address, subscriptions (events_gateway_subscriptions), broker_bindings (events_gateway_broker_bindings), exchanges (events_gateway_exchanges), lingering_subscriptions (events_gateway_subscriptions_lingering), pending_connections (events_gateway_connections_pending), sockets (the open-file limit less FD_RESERVE; events_gateway_connections_open plus pending)",
                ),
                &["kind"],
            ),
            ),
            streams_blocked: registered(
                &registry,
                IntGauge::new(
                "events_gateway_streams_blocked",
                "Streams whose socket did not take all of their last write (the client reads slowly or not at all); each keeps at most one write's worth and its place in the log",
            ),
            ),
            subscriptions: registered(
                &registry,
                IntGauge::new(
                "events_gateway_subscriptions",
                "Distinct binding sets currently subscribed (each one shared log of frames)",
            ),
            ),
            replay_bytes: registered(
                &registry,
                IntGauge::new(
                "events_gateway_replay_bytes",
                "Bytes of frames in the logs of resumable subscriptions (their replay windows, and what their clients have still to write); the oldest replay frames go beyond REPLAY_MEMORY",
            ),
            ),
            replay_limit: registered(
                &registry,
                IntGauge::new(
                "events_gateway_replay_limit_bytes",
                "Configured REPLAY_MEMORY",
            ),
            ),
            subscriptions_lingering: registered(
                &registry,
                IntGauge::new(
                "events_gateway_subscriptions_lingering",
                "Resumable subscriptions with no client, kept for RESUME_GRACE for a reconnect (included in events_gateway_subscriptions; at most MAX_LINGERING_SUBSCRIPTIONS)",
            ),
            ),
            broker_connected: registered(
                &registry,
                IntGauge::new(
                "events_gateway_broker_connected",
                "1 while the AMQP connection is up, 0 otherwise",
            ),
            ),
            broker_reconnects: registered(
                &registry,
                IntCounter::new(
                "events_gateway_broker_reconnects_total",
                "AMQP connections established after the first one",
            ),
            ),
            broker_connect_failures: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_broker_connect_failures_total",
                    "AMQP connections that failed, by stage: connect (an attempt failed or timed out), early_loss (a connection lost within 30 s of opening: the backoff keeps growing)",
                ),
                &["stage"],
            ),
            ),
            broker_backoff: registered(
                &registry,
                Gauge::new(
                "events_gateway_broker_backoff_seconds",
                "The wait before the next AMQP connection attempt (0 while connected)",
            ),
            ),
            broker_queues: registered(
                &registry,
                IntGauge::new(
                "events_gateway_broker_queues",
                "Broker queues currently declared by this process (one per exchange in use)",
            ),
            ),
            broker_bindings: registered(
                &registry,
                IntGauge::new(
                "events_gateway_broker_bindings",
                "Broker bindings currently in place (one per distinct exchange and pattern)",
            ),
            ),
            messages_received: registered(
                &registry,
                IntCounter::new(
                "events_gateway_messages_received_total",
                "Messages received from the broker",
            ),
            ),
            messages_delivered: registered(
                &registry,
                IntCounter::new(
                "events_gateway_messages_delivered_total",
                "Message frames handed to client streams (one per message per client)",
            ),
            ),
            messages_dropped: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_messages_dropped_total",
                    "Messages not delivered, by reason: slow_client (per client), malformed (body not UTF-8 JSON), unroutable (no client pattern matched), duplicate (a redelivery after a lost connection that clients already had)",
                ),
                &["reason"],
            ),
            ),
            uptime_start: registered(
                &registry,
                Gauge::new(
                "events_gateway_start_time_seconds",
                "Start time of the process since the Unix epoch",
            ),
            ),
            connections_limit: registered(
                &registry,
                IntGauge::new(
                "events_gateway_connections_limit",
                "Configured MAX_CONNECTIONS: SSE connections this process accepts",
            ),
            ),
            http_errors: registered(
                &registry,
                IntCounterVec::new(
                Opts::new(
                    "events_gateway_http_connection_errors_total",
                    "HTTP connections that ended with an error, by kind: header_timeout (request head not sent within HEADER_READ_TIMEOUT), head_too_large (over 64 KiB, answered 431), bad_request (unparsable), client_closed (the client went away, e.g. an SSE client leaving), stalled (a stream whose socket took no byte for STALL_TIMEOUT), unexpected_data (a stream's client sent more than 4 KiB), accept_failed (accept() failed, usually out of descriptors: the loop backs off), other",
                ),
                &["kind"],
            ),
            ),
            time_to_ready: registered(
                &registry,
                Histogram::with_opts(
                HistogramOpts::new(
                    "events_gateway_time_to_ready_seconds",
                    "From a valid connect request to its ready event",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0,
                ]),
            ),
            ),
            fanout_latency: registered(
                &registry,
                Histogram::with_opts(
                HistogramOpts::new(
                    "events_gateway_fanout_latency_seconds",
                    "From a broker delivery reaching the gateway to its frame being handed to a client's connection (one observation per client)",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02,
                    0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 1.0,
                ]),
            ),
            ),
            websocket_handshakes: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "events_gateway_websocket_handshakes_total",
                        "WebSocket handshakes (/subscription/raw, /subscription/named) by outcome: upgraded, origin (403: not in WS_ALLOWED_ORIGINS), draining (503), over_limit (503: MAX_CONNECTIONS), over_address_limit (503: MAX_CONNECTIONS_PER_ADDRESS)",
                    ),
                    &["outcome"],
                ),
            ),
            websocket_closes: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "events_gateway_websocket_closes_total",
                        "WebSocket connections ended, by the close code the gateway sent (4400 protocol error, 4408 lifetime, 1012 draining, 1013 too slow) or why it sent none (client_closed, client_gone, missed_pong, stalled)",
                    ),
                    &["end"],
                ),
            ),
            websocket_subscriptions: registered(
                &registry,
                IntGauge::new(
                    "events_gateway_websocket_subscriptions",
                    "Subscriptions held by WebSocket connections (each a client of a shared subscription, like an SSE stream)",
                ),
            ),
            websocket_messages: registered(
                &registry,
                IntCounter::new(
                    "events_gateway_websocket_messages_delivered_total",
                    "Message frames written to WebSocket connections (also counted in events_gateway_messages_delivered_total)",
                ),
            ),
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        for outcome in OUTCOMES {
            m.connections_total.with_label_values(&[*outcome]);
        }
        for kind in HTTP_ERRORS {
            m.http_errors.with_label_values(&[*kind]);
        }
        for reason in DROP_REASONS {
            m.messages_dropped.with_label_values(&[*reason]);
        }
        for reason in REFUSAL_REASONS {
            m.refused.with_label_values(&[*reason]);
        }
        for outcome in RESUME_OUTCOMES {
            m.resumes.with_label_values(&[*outcome]);
        }
        for kind in LIMITS {
            m.limit.with_label_values(&[*kind]);
        }
        for outcome in WS_HANDSHAKES {
            m.websocket_handshakes.with_label_values(&[*outcome]);
        }
        for end in WS_ENDS {
            m.websocket_closes.with_label_values(&[*end]);
        }
        for stage in BROKER_FAILURE_STAGES {
            m.broker_connect_failures.with_label_values(&[*stage]);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        m.uptime_start.set(now.as_secs_f64());
        Self(std::sync::Arc::new(m))
    }

    /// Every registered metric family, as gathered for an exposition.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which we never build.
        let _ = TextEncoder::new().encode(&self.families(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Registers `metric` in `registry` as it is made: every metric is named once (and listed
/// once, in [`MetricsInner`]).
fn registered<T>(registry: &Registry, metric: prometheus::Result<T>) -> T
where
    T: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
