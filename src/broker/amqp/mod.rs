//! AMQP (RabbitMQ / Pulse) with lapin: one connection per process, one queue and one
//! consumer per exchange in use, one broker binding per distinct pattern.
//!
//! The parts, one file each:
//! - [`supervisor`] owns the connection: connects with capped, jittered exponential
//!   backoff, publishes the live connection (with a generation number) on a `watch`
//!   channel, and notices when it dies. lapin's own auto-recovery is not used (it does
//!   not recover channels, and its maintainer calls it young: lapin issues #312, #450):
//!   everything is rebuilt from the [`Topology`] instead;
//! - [`reconciler`]: one task per exchange in use makes the broker match
//!   [`Topology::wanted`] (queue, bindings, consumer), on channels of its own so that a
//!   refusal (404 closes the channel) fails only the subscriptions that asked for it;
//! - [`consumer`]: one task per queue hands each delivery to [`Topology::deliver`], acks in
//!   batches, and recognises redeliveries of messages clients already have;
//! - [`errors`]: which broker errors are final refusals and which are worth a retry.
//!
//! Invariants: broker objects grow with the exchanges and patterns in use, never with the
//! number of clients; a reconciler exits only after its queue is deleted, and only while
//! holding the actors lock with nothing wanted, so a new subscription either finds it alive
//! or starts a new one. The password is never logged: only host, port and vhost are.

mod consumer;
mod errors;
mod reconciler;
mod supervisor;

pub use supervisor::Health;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lapin::Connection;
use lapin::uri::AMQPUri;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Reconcile;
use crate::metrics::Metrics;
use crate::topology::Topology;
use reconciler::Reconciler;

/// Everything the AMQP side needs to know. `Debug` hides the password.
#[derive(Clone)]
pub struct AmqpSettings {
    pub uri: AMQPUri,
    /// Queues are named `<queue_prefix>/<instance>/<exchange>`.
    pub queue_prefix: String,
    pub prefetch: u16,
    pub queue_max_length: u32,
    /// x-max-length-bytes of each queue.
    pub queue_max_bytes: u64,
    pub queue_expires: Duration,
    /// How often a reconciler checks that its exchange still exists.
    pub exchange_check_interval: Duration,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("endpoint", &endpoint(&self.uri))
            .field("queue_prefix", &self.queue_prefix)
            .field("prefetch", &self.prefetch)
            .field("queue_max_length", &self.queue_max_length)
            .field("queue_max_bytes", &self.queue_max_bytes)
            .field("queue_expires", &self.queue_expires)
            .field("exchange_check_interval", &self.exchange_check_interval)
            .finish()
    }
}

/// `amqps://host:port/vhost` without credentials, for logs and health details.
pub fn endpoint(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        lapin::uri::AMQPScheme::AMQP => "amqp",
        lapin::uri::AMQPScheme::AMQPS => "amqps",
    };
    format!(
        "{scheme}://{}:{}/{}",
        uri.authority.host,
        uri.authority.port,
        percent_encoding::utf8_percent_encode(&uri.vhost, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// The connection in use, and which one it is (a new generation after every reconnect:
/// channels of an older generation are dead).
#[derive(Clone)]
struct Live {
    generation: u64,
    connection: Arc<Connection>,
    /// When it opened.
    opened: std::time::Instant,
    /// The connection before it held (or this is the first): healthy at once.
    trusted: bool,
}

/// The AMQP broker side. Create with [`AmqpBroker::start`].
pub struct AmqpBroker {
    settings: AmqpSettings,
    /// Distinguishes this process's queues from other replicas' (they must not share one:
    /// a shared queue would split the messages between replicas).
    instance: String,
    topology: Arc<Topology>,
    metrics: Metrics,
    live: watch::Sender<Option<Live>>,
    /// Why the last connection ended or attempt failed (for `/__heartbeat__`).
    failure: Mutex<Option<String>>,
    /// Reconciler of each exchange in use. A std `Mutex`: held only for map updates.
    actors: Mutex<HashMap<String, Arc<Notify>>>,
    shutdown: CancellationToken,
    /// The reconcilers: shutdown waits for them to delete their queues.
    tasks: TaskTracker,
    myself: Weak<AmqpBroker>,
}

impl AmqpBroker {
    /// Starts the connection supervisor; reconcilers start when bindings are wanted.
    /// `hostname` (the pod's, may be empty) goes into queue names so that an operator can
    /// tell whose they are.
    pub fn start(
        settings: AmqpSettings,
        hostname: &str,
        topology: Arc<Topology>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let rand = format!("{:08x}", fastrand::u32(..));
        let instance = if hostname.is_empty() {
            rand
        } else {
            format!("{}-{rand}", sanitize(hostname))
        };
        let broker = Arc::new_cyclic(|myself| Self {
            settings,
            instance,
            topology,
            metrics,
            live: watch::channel(None).0,
            failure: Mutex::new(None),
            actors: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            myself: myself.clone(),
        });
        tokio::spawn(broker.clone().supervise());
        broker
    }

    /// Whether the AMQP connection is up.
    pub fn is_connected(&self) -> bool {
        self.live.borrow().is_some()
    }

    /// Where we connect, without credentials.
    pub fn endpoint(&self) -> String {
        endpoint(&self.settings.uri)
    }

    /// Name of the queue this process uses for `exchange`: stable for the process's life,
    /// unless the broker cannot declare a queue under it (`renames` counts the new names
    /// taken since).
    pub fn queue_name(&self, exchange: &str, renames: u32) -> String {
        let head = match renames {
            0 => format!("{}/{}/", self.settings.queue_prefix, self.instance),
            n => format!("{}/{}.{n}/", self.settings.queue_prefix, self.instance),
        };
        let room = 255usize.saturating_sub(head.len());
        if exchange.len() <= room {
            return format!("{head}{exchange}");
        }
        // Too long for AMQP: keep the end of the name (the most specific part) and a hash.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        exchange.hash(&mut h);
        let tag = format!("{:016x}/", h.finish());
        let keep = room.saturating_sub(tag.len());
        let mut start = exchange.len() - keep;
        while !exchange.is_char_boundary(start) {
            start += 1;
        }
        format!("{head}{tag}{}", &exchange[start..])
    }

    /// Deletes this process's queues and closes the connection, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        self.shutdown.cancel();
        // Each reconciler deletes its queue, then ends.
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
        let live = self.live.borrow().clone();
        if let Some(live) = live {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                live.connection
                    .close(200, "events-gateway shutting down".into()),
            )
            .await;
        }
    }
}

impl Reconcile for AmqpBroker {
    fn exchange_changed(&self, exchange: &str) {
        let mut actors = self.actors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = actors.get(exchange) {
            notify.notify_one();
            return;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        let Some(me) = self.myself.upgrade() else {
            return;
        };
        let notify = Arc::new(Notify::new());
        actors.insert(exchange.to_owned(), notify.clone());
        let reconciler = Reconciler::new(me, exchange.to_owned(), notify);
        self.tasks.spawn(reconciler.run());
    }
}

/// A host name cut down to what a queue name may safely hold.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(63)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_has_no_credentials() {
        let uri: AMQPUri = "amqps://user:s3cret@pulse.example:5671/%2f"
            .parse()
            .expect("valid");
        let shown = endpoint(&uri);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.starts_with("amqps://pulse.example:5671/"));
    }
}
