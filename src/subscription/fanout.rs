//! What every subscription's writers share: how streams are written (the settings), the
//! metrics, the stop signal, the process's epoch and the global replay budget.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{LogLimits, ReplayBudget};
use crate::metrics::Metrics;

/// Most clients one writer task serves. A pass over a shard writes to each of its clients
/// in turn on one core; more shards let the runtime's workers share a wide fan-out, and
/// bound how long the last client of a shard waits for a frame.
pub const SHARD_CLIENTS: usize = 256;

/// How streams are written.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub ping_interval: Duration,
    pub ready_timeout: Duration,
    /// After a write, how long further frames may wait to be written together (0: never).
    pub write_coalesce: Duration,
    /// A stream whose socket takes no byte for this long while it has bytes to write is
    /// ended (STALL_TIMEOUT).
    pub stall_timeout: Duration,
    pub log: LogLimits,
    /// How long a resumable subscription (and its broker bindings) outlives its last
    /// client, for a reconnect to resume (RESUME_GRACE).
    pub resume_grace: Duration,
    /// Most clients one writer task serves ([`SHARD_CLIENTS`]; smaller in model tests).
    pub shard_clients: usize,
    /// Bytes the logs of resumable subscriptions may hold together (REPLAY_MEMORY).
    pub replay_memory: usize,
}

impl Default for StreamSettings {
    /// The defaults of the configuration.
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            ready_timeout: Duration::from_secs(30),
            write_coalesce: Duration::from_millis(10),
            stall_timeout: Duration::from_secs(40),
            log: LogLimits::default(),
            resume_grace: Duration::from_secs(30),
            shard_clients: SHARD_CLIENTS,
            replay_memory: 256 * 1024 * 1024,
        }
    }
}

/// What every subscription's writers share.
pub struct Fanout {
    pub settings: StreamSettings,
    pub metrics: Metrics,
    /// Cancelled when the server stops: writers close every socket they still hold.
    pub closing: CancellationToken,
    /// This process's epoch (random at start): resumable ids from another process (a
    /// restart, another replica) name another epoch and cannot be resumed here.
    pub epoch: u64,
    /// Replay memory over every resumable subscription (REPLAY_MEMORY).
    pub replay: Arc<ReplayBudget>,
    /// The writer tasks: a drain waits for them to end (each ends with its last stream).
    pub tasks: TaskTracker,
}

impl Fanout {
    pub fn new(settings: StreamSettings, metrics: Metrics) -> Arc<Self> {
        let replay = ReplayBudget::new(settings.replay_memory, metrics.replay_bytes.clone());
        metrics.replay_limit.set(settings.replay_memory as i64);
        Arc::new(Self {
            settings,
            metrics,
            closing: CancellationToken::new(),
            epoch: fastrand::u64(..),
            replay,
            tasks: TaskTracker::new(),
        })
    }
}
