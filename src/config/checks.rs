//! The configuration's bounds: settings that must not be zero, and durations that must
//! stay within reason; each failure names its setting.

use std::time::Duration;

use super::ConfigError;
use super::args::Args;

/// Settings that make no sense at zero.
pub(super) fn check_not_zero(args: &Args) -> Result<(), ConfigError> {
    for (name, value) in [
        ("MAX_BINDINGS", args.max_bindings),
        ("MAX_CONNECTIONS", args.max_connections),
        (
            "MAX_CONNECTIONS_PER_ADDRESS",
            args.max_connections_per_address,
        ),
        (
            "ADDRESS_SUBSCRIPTION_BURST",
            args.address_subscription_burst as usize,
        ),
        ("MAX_SUBSCRIPTIONS", args.max_subscriptions),
        ("MAX_BINDINGS_PER_ADDRESS", args.max_bindings_per_address),
        ("MAX_EXCHANGES_PER_ADDRESS", args.max_exchanges_per_address),
        ("MAX_BROKER_BINDINGS", args.max_broker_bindings),
        ("MAX_EXCHANGES", args.max_exchanges),
        ("MAX_PENDING_CONNECTIONS", args.max_pending_connections),
        ("MAX_PENDING_PER_ADDRESS", args.max_pending_per_address),
        (
            "MAX_LINGERING_SUBSCRIPTIONS",
            args.max_lingering_subscriptions,
        ),
        ("MAX_PATTERN_WORDS", args.max_pattern_words),
        ("SUBSCRIPTION_BUFFER", args.subscription_buffer),
        ("SUBSCRIPTION_BUFFER_BYTES", args.subscription_buffer_bytes),
        ("STALL_TIMEOUT", args.stall_timeout.as_millis() as usize),
        ("TCP_KEEPALIVE", args.tcp_keepalive.as_secs() as usize),
        ("REPLAY_WINDOW", args.replay_window.as_millis() as usize),
        ("REPLAY_MEMORY", args.replay_memory),
        ("QUEUE_MAX_LENGTH", args.queue_max_length as usize),
        ("QUEUE_MAX_BYTES", args.queue_max_bytes),
        ("PREFETCH", args.prefetch as usize),
        ("PING_INTERVAL", args.ping_interval.as_millis() as usize),
        (
            "WS_PING_INTERVAL",
            args.ws_ping_interval.as_millis() as usize,
        ),
        ("WS_INIT_TIMEOUT", args.ws_init_timeout.as_millis() as usize),
        ("WS_LIFETIME", args.ws_lifetime.as_millis() as usize),
        ("READY_TIMEOUT", args.ready_timeout.as_millis() as usize),
        (
            "HEADER_READ_TIMEOUT",
            args.header_read_timeout.as_millis() as usize,
        ),
        ("QUEUE_EXPIRES", args.queue_expires.as_millis() as usize),
        (
            "EXCHANGE_CHECK_INTERVAL",
            args.exchange_check_interval.as_millis() as usize,
        ),
    ] {
        if value == 0 {
            return Err(ConfigError::Zero(name));
        }
    }
    if !(args.address_subscription_rate > 0.0 && args.address_subscription_rate.is_finite()) {
        return Err(ConfigError::Zero("ADDRESS_SUBSCRIPTION_RATE"));
    }
    Ok(())
}

/// Durations with an upper bound (beyond it, a typo rather than a choice).
pub(super) fn check_bounded(args: &Args) -> Result<(), ConfigError> {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    for (name, value, max, max_text) in [
        ("PING_INTERVAL", args.ping_interval, DAY, "24h"),
        ("WS_PING_INTERVAL", args.ws_ping_interval, DAY, "24h"),
        ("WS_INIT_TIMEOUT", args.ws_init_timeout, DAY, "24h"),
        (
            "WS_LIFETIME",
            args.ws_lifetime,
            Duration::from_secs(30 * 24 * 3600),
            "30 days",
        ),
        ("READY_TIMEOUT", args.ready_timeout, DAY, "24h"),
        ("HEADER_READ_TIMEOUT", args.header_read_timeout, DAY, "24h"),
        ("SHUTDOWN_GRACE", args.shutdown_grace, DAY, "24h"),
        ("STALL_TIMEOUT", args.stall_timeout, DAY, "24h"),
        ("REPLAY_WINDOW", args.replay_window, DAY, "24h"),
        ("RESUME_GRACE", args.resume_grace, DAY, "24h"),
        ("TCP_KEEPALIVE", args.tcp_keepalive, DAY, "24h"),
        (
            "EXCHANGE_CHECK_INTERVAL",
            args.exchange_check_interval,
            DAY,
            "24h",
        ),
        (
            "WRITE_COALESCE",
            args.write_coalesce,
            Duration::from_secs(10),
            "10s",
        ),
        // x-expires is a 32-bit count of milliseconds.
        (
            "QUEUE_EXPIRES",
            args.queue_expires,
            Duration::from_secs(30 * 24 * 3600),
            "30 days",
        ),
    ] {
        if value > max {
            return Err(ConfigError::TooLong(name, max_text));
        }
    }
    Ok(())
}
