//! The values each labelled metric may take: a small fixed set (nothing per client, per
//! pattern or per exchange), every one registered at start so that its series exists
//! before the first client arrives; and the methods that count by them.

/// Outcomes counted in `events_gateway_connections_total`.
pub const OUTCOMES: &[&str] = &[
    "ready",
    "bad_input",
    "broker_error",
    "timeout",
    "no_content",
    "over_limit",
    "draining",
    "client_gone",
    "over_address_limit",
    "refused",
];

/// Reasons counted in `events_gateway_refused_total`: which limit refused a client.
pub const REFUSAL_REASONS: &[&str] = &[
    "address_connections",
    "address_rate",
    "address_bindings",
    "address_exchanges",
    "subscriptions",
    "bindings",
    "exchanges",
    "pattern",
    "pending_per_address",
    "pending_connections",
    "no_descriptors",
];

/// Outcomes counted in `events_gateway_resumes_total`: a resumable client that came back
/// with its last id was replayed, or started live after a `gap` for one of these reasons.
pub const RESUME_OUTCOMES: &[&str] = &[
    "replayed",
    "invalid-id",
    "other-epoch",
    "other-subscription",
    "expired",
];

/// Limits shown by `events_gateway_limit`.
pub const LIMITS: &[&str] = &[
    "connections_per_address",
    "subscriptions",
    "broker_bindings",
    "exchanges",
    "lingering_subscriptions",
    "pending_connections",
    "sockets",
];

/// Kinds counted in `events_gateway_http_connection_errors_total`.
pub const HTTP_ERRORS: &[&str] = &[
    "header_timeout",
    "head_too_large",
    "bad_request",
    "client_closed",
    "stalled",
    "unexpected_data",
    "accept_failed",
    "other",
];

/// Outcomes counted in `events_gateway_websocket_handshakes_total`.
pub const WS_HANDSHAKES: &[&str] = &[
    "upgraded",
    "origin",
    "draining",
    "over_limit",
    "over_address_limit",
];

/// How WebSocket connections ended, counted in `events_gateway_websocket_closes_total`:
/// the close code the gateway sent, or why it sent none.
pub const WS_ENDS: &[&str] = &[
    "4400",
    "4408",
    "1012",
    "1013",
    "other",
    "client_closed",
    "client_gone",
    "missed_pong",
    "stalled",
];

/// Reasons counted in `events_gateway_messages_dropped_total`.
pub const DROP_REASONS: &[&str] = &["slow_client", "malformed", "unroutable", "duplicate"];

/// Stages counted in `events_gateway_broker_connect_failures_total`.
pub const BROKER_FAILURE_STAGES: &[&str] = &["connect", "early_loss"];

impl super::Metrics {
    /// Counts a connection outcome (one of [`OUTCOMES`]).
    pub fn connection(&self, outcome: &str) {
        self.connections_total.with_label_values(&[outcome]).inc();
    }

    /// Counts an HTTP connection that ended with an error (kind one of [`HTTP_ERRORS`]).
    pub fn http_error(&self, kind: &str) {
        self.http_errors.with_label_values(&[kind]).inc();
    }

    /// Counts a client refused by a limit (reason one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Counts a resumable client's return (outcome one of [`RESUME_OUTCOMES`]).
    pub fn resume(&self, outcome: &str) {
        self.resumes.with_label_values(&[outcome]).inc();
    }

    /// Shows a configured limit (kind one of [`LIMITS`]).
    pub fn set_limit(&self, kind: &str, value: usize) {
        self.limit
            .with_label_values(&[kind])
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    /// Counts a WebSocket handshake (outcome one of [`WS_HANDSHAKES`]).
    pub fn websocket_handshake(&self, outcome: &str) {
        self.websocket_handshakes
            .with_label_values(&[outcome])
            .inc();
    }

    /// Counts a WebSocket connection's end (one of [`WS_ENDS`]).
    pub fn websocket_closed(&self, end: &str) {
        self.websocket_closes.with_label_values(&[end]).inc();
    }

    /// Counts dropped messages (reason one of [`DROP_REASONS`]).
    pub fn dropped(&self, reason: &str, n: u64) {
        self.messages_dropped.with_label_values(&[reason]).inc_by(n);
    }
}
