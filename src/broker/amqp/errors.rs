//! Broker errors, classified once: a refusal is final for the subscriptions that asked
//! (the exchange does not exist, access is refused), anything else (a lost connection, a
//! timeout) is worth a retry.

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

/// The broker's reply code, if the error is a protocol error (404, 403, …).
fn reply_code(err: &TimedError) -> Option<u16> {
    let TimedError::Broker(err) = err else {
        return None;
    };
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Whether the broker answered 404 NOT_FOUND (a missing exchange or queue).
pub(super) fn is_not_found(err: &TimedError) -> bool {
    reply_code(err) == Some(404)
}

/// A refusal that is final for the subscriptions involved (as opposed to a transient error).
pub(super) fn refusal(err: &TimedError, exchange: &str) -> Option<BindError> {
    match reply_code(err)? {
        404 => Some(BindError::NoSuchExchange(exchange.to_owned())),
        403 => Some(BindError::AccessRefused(exchange.to_owned())),
        _ => None,
    }
}
