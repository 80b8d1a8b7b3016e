//! Broker errors, classified once, by the operation that got them: a refusal is final for
//! the subscriptions that asked (the exchange does not exist, access is refused, the
//! broker does not accept a binding key); a queue the broker cannot declare under its
//! name gets a new name; anything else (a lost connection, a timeout) is worth a retry.

use std::time::Duration;

use crate::topology::BindError;

/// Broker operations (declare, bind, …) that take longer are treated as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// A broker operation that failed or took too long.
#[derive(Debug, thiserror::Error)]
pub(super) enum TimedError {
    #[error("{0}")]
    Broker(lapin::Error),
    #[error("broker operation timed out")]
    Timeout,
}

/// Bounds a broker operation in time so that a stalled connection cannot hang a reconciler.
pub(super) async fn timed<T>(op: impl Future<Output = lapin::Result<T>>) -> Result<T, TimedError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TimedError::Broker(e)),
        Err(_) => Err(TimedError::Timeout),
    }
}

/// Most characters of the broker's reply text shown to a client.
const MAX_REPLY_TEXT: usize = 200;

/// The broker's reply code and text, if the error is a protocol error (404, 403, …).
fn reply(err: &TimedError) -> Option<(u16, String)> {
    let TimedError::Broker(err) = err else {
        return None;
    };
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().as_str().to_owned()))
        }
        _ => None,
    }
}

fn reply_code(err: &TimedError) -> Option<u16> {
    reply(err).map(|(code, _)| code)
}

/// Whether the broker answered 404 NOT_FOUND (a missing exchange or queue).
pub(super) fn is_not_found(err: &TimedError) -> bool {
    reply_code(err) == Some(404)
}

/// A refusal of a passive `exchange.declare` that is final for the subscriptions on the
/// exchange (as opposed to a transient error).
pub(super) fn exchange_refusal(err: &TimedError, exchange: &str) -> Option<BindError> {
    match reply_code(err)? {
        404 => Some(BindError::NoSuchExchange(exchange.to_owned())),
        403 => Some(BindError::AccessRefused(exchange.to_owned())),
        _ => None,
    }
}

/// What a failed `queue.declare` means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DeclareFailure {
    /// Final for the subscriptions on the exchange (403: the user may not declare it).
    Refused(BindError),
    /// The broker cannot declare a queue of this name now: 404 (a durable queue whose
    /// node is down answers so) or 406 (a queue of this name exists with other
    /// arguments). A queue under a new name works.
    Rename(String),
    /// Worth a retry (a lost connection, a timeout, an internal error).
    Retry,
}

pub(super) fn declare_failure(err: &TimedError, exchange: &str) -> DeclareFailure {
    match reply(err) {
        Some((403, _)) => DeclareFailure::Refused(BindError::AccessRefused(exchange.to_owned())),
        Some((code @ (404 | 406), text)) => DeclareFailure::Rename(format!("{code} {text}")),
        _ => DeclareFailure::Retry,
    }
}

/// A refusal of a `queue.bind` that is final for the subscriptions that asked for this
/// binding: 404 (the exchange is gone), 403 (the user may not read from it), 406 (the
/// broker does not accept the binding key: RabbitMQ 4.3.5+ refuses more than two `#`).
pub(super) fn bind_refusal(err: &TimedError, exchange: &str, pattern: &str) -> Option<BindError> {
    match reply(err)? {
        (404, _) => Some(BindError::NoSuchExchange(exchange.to_owned())),
        (403, _) => Some(BindError::AccessRefused(exchange.to_owned())),
        (406, text) => Some(BindError::PatternRefused {
            exchange: exchange.to_owned(),
            pattern: pattern.to_owned(),
            reason: text.chars().take(MAX_REPLY_TEXT).collect(),
        }),
        _ => None,
    }
}
