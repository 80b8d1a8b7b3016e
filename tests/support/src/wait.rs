//! Waiting on a condition with a deadline, never on the clock alone: every helper polls
//! every 20 ms and gives up at its deadline.

use std::future::Future;
use std::time::Duration;

/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it gives a value, and returns it; `None` after `within`.
pub async fn poll_until<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `check` holds within `within` (polled; the caller says what a miss means).
pub async fn reached(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    poll_until(within, || std::future::ready(check().then_some(())))
        .await
        .is_some()
}

/// Polls an async `check` until it holds, or panics after `within`.
pub async fn eventually_async<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let reached = poll_until(within, || {
        let check = check();
        async move { check.await.then_some(()) }
    })
    .await;
    assert!(reached.is_some(), "condition not reached within {within:?}");
}

/// Polls `check` until it holds, or panics after `within`.
pub async fn eventually(within: Duration, check: impl FnMut() -> bool) {
    assert!(
        reached(within, check).await,
        "condition not met within {within:?}"
    );
}
