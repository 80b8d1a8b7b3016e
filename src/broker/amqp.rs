//! AMQP (RabbitMQ / Pulse) with lapin: one connection per process, one queue and one
//! consumer per exchange in use, one broker binding per distinct pattern.
//!
//! Shape:
//! - a **supervisor** task owns the connection: it connects with capped, jittered
//!   exponential backoff, publishes the live connection (with a generation number) on a
//!   `watch` channel, and notices when it dies. lapin's own auto-recovery is not used
//!   (see DEPENDENCIES.md): we rebuild everything from the [`Topology`] instead;
//! - one **reconciler** task per exchange in use makes the broker match
//!   [`Topology::wanted`]: declares the queue (client-named, non-exclusive, `x-expires`,
//!   `x-max-length`), binds and unbinds patterns, and deletes the queue when nothing is
//!   wanted any more. Each reconciler uses channels of its own, so a missing exchange
//!   (404 closes the channel) fails only the subscriptions that asked for it. After a
//!   lost connection it re-declares the same queue and re-binds every wanted pattern.
//!   Every `exchange_check_interval` it checks that its exchange still exists, since the
//!   broker deletes an exchange's bindings without telling its consumers;
//! - one **consumer** task per queue hands each delivery to [`Topology::deliver`] and acks
//!   in batches (`multiple`), at most `prefetch` messages in flight.
//!
//! Invariants: broker objects grow with the exchanges and patterns in use, never with the
//! number of clients; a reconciler exits only after its queue is deleted, and only while
//! holding the actors lock with nothing wanted, so a new subscription either finds it alive
//! or starts a new one. The password is never logged: only host, port and vhost are.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt, future::join_all};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, Event, ExchangeKind};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::Reconcile;
use crate::message::Incoming;
use crate::metrics::Metrics;
use crate::topology::{BindError, BindState, Topology};

/// Deliveries acknowledged at once (with `multiple`) when more are waiting.
const ACK_BATCH: u64 = 64;
/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between connection attempts: doubles from the first to the cap, ±50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A reconciler whose broker operation failed for a transient reason retries after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Broker operations (declare, bind, …) that take longer are treated as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything the AMQP side needs to know. `Debug` hides the password.
#[derive(Clone)]
pub struct AmqpSettings {
    pub uri: AMQPUri,
    /// Queues are named `<queue_prefix>/<instance>/<exchange>`.
    pub queue_prefix: String,
    pub prefetch: u16,
    pub queue_max_length: u32,
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

#[derive(Clone)]
struct Live {
    generation: u64,
    connection: Arc<Connection>,
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
    /// Reconciler of each exchange in use. A std `Mutex`: held only for map updates.
    actors: Mutex<HashMap<String, Arc<Notify>>>,
    shutdown: CancellationToken,
    myself: Weak<AmqpBroker>,
}

impl AmqpBroker {
    /// Starts the connection supervisor; reconcilers start when bindings are wanted.
    pub fn start(settings: AmqpSettings, topology: Arc<Topology>, metrics: Metrics) -> Arc<Self> {
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let rand = format!("{:08x}", fastrand::u32(..));
        let instance = if host.is_empty() {
            rand
        } else {
            format!("{}-{rand}", sanitize(&host))
        };
        let broker = Arc::new_cyclic(|myself| Self {
            settings,
            instance,
            topology,
            metrics,
            live: watch::channel(None).0,
            actors: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
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

    /// Name of the queue this process uses for `exchange` (stable for the process's life).
    pub fn queue_name(&self, exchange: &str) -> String {
        let head = format!("{}/{}/", self.settings.queue_prefix, self.instance);
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
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let idle = self.actors.lock().map(|a| a.is_empty()).unwrap_or(true);
            if idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    async fn supervise(self: Arc<Self>) {
        let mut generation = 0u64;
        let mut attempt = 0u32;
        let endpoint = self.endpoint();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let mut uri = self.settings.uri.clone();
            uri.query.heartbeat.get_or_insert(10);
            let props = ConnectionProperties::default()
                .with_connection_name(format!("events-gateway {}", self.instance).into());
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await {
                Ok(Ok(connection)) => {
                    attempt = 0;
                    generation += 1;
                    if generation > 1 {
                        self.metrics.broker_reconnects.inc();
                    }
                    tracing::info!(%endpoint, generation, "broker connected");
                    let mut events = connection.events_listener();
                    let connection = Arc::new(connection);
                    self.live.send_replace(Some(Live {
                        generation,
                        connection: connection.clone(),
                    }));
                    self.metrics.broker_connected.set(1);
                    let mut check = tokio::time::interval(Duration::from_secs(1));
                    let reason = loop {
                        tokio::select! {
                            event = events.next() => match event {
                                // Channel errors (a missing exchange) are reported here too;
                                // only a dead connection ends this loop.
                                Some(Event::Error(err)) if !connection.status().connected() => {
                                    break err.to_string()
                                }
                                Some(_) => {}
                                None => break "connection dropped".to_owned(),
                            },
                            _ = check.tick() => {
                                if !connection.status().connected() {
                                    break "connection closed".to_owned();
                                }
                            }
                            () = self.shutdown.cancelled() => return,
                        }
                    };
                    self.live.send_replace(None);
                    self.metrics.broker_connected.set(0);
                    tracing::warn!(%endpoint, %reason, "broker connection lost; reconnecting");
                }
                Ok(Err(err)) => {
                    tracing::warn!(%endpoint, error = %err, attempt, "cannot connect to the broker");
                }
                Err(_) => {
                    tracing::warn!(%endpoint, attempt, "timed out connecting to the broker");
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return,
            }
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
        tokio::spawn(reconciler.run());
    }
}

/// Capped exponential backoff with ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    base.mul_f64(0.5 + fastrand::f64())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(63)
        .collect()
}

/// Keeps one exchange's queue, bindings and consumer equal to what the topology wants.
///
/// It keeps two views of the broker: what it confirmed on the current connection
/// (`declared`, `bound`) and what may still exist from an earlier one (`queue_may_exist`,
/// `stale`): a queue outlives a lost connection (it is not exclusive), and so do its
/// bindings, so patterns released during an outage are unbound after recovery.
struct Reconciler {
    broker: Arc<AmqpBroker>,
    exchange: String,
    queue: String,
    notify: Arc<Notify>,
    /// Connection generation our channels belong to (0: none).
    generation: u64,
    ops: Option<Channel>,
    consumer: Option<(Channel, tokio::task::JoinHandle<()>)>,
    /// Shared with the consumer task: set when its stream ends (channel or connection
    /// lost, queue deleted by someone else), and its most recent deliveries.
    consumer_end: ConsumerEnd,
    /// Queue declared (and consumed) on the current connection.
    declared: bool,
    /// The queue may exist on the broker (declared on this or an earlier connection).
    queue_may_exist: bool,
    /// Patterns bound on the current connection.
    bound: HashSet<String>,
    /// Patterns bound on an earlier connection that may still be on the queue.
    stale: HashSet<String>,
    /// What this reconciler last added to the queue and binding gauges.
    reported: (i64, i64),
}

/// Outcome of one reconciliation pass.
enum Step {
    Done,
    /// Transient failure (connection, timeout): retry later.
    Retry(String),
}

impl Reconciler {
    fn new(broker: Arc<AmqpBroker>, exchange: String, notify: Arc<Notify>) -> Self {
        let queue = broker.queue_name(&exchange);
        let recent = Recent::new((usize::from(broker.settings.prefetch) + ACK_BATCH as usize) * 2);
        Self {
            broker,
            exchange,
            queue,
            generation: 0,
            ops: None,
            consumer: None,
            consumer_end: ConsumerEnd {
                lost: Arc::new(AtomicBool::new(false)),
                recent: Arc::new(Mutex::new(recent)),
                notify: notify.clone(),
            },
            notify,
            declared: false,
            queue_may_exist: false,
            bound: HashSet::new(),
            stale: HashSet::new(),
            reported: (0, 0),
        }
    }

    async fn run(mut self) {
        let mut live_rx = self.broker.live.subscribe();
        let mut check_due = false;
        loop {
            let live = live_rx.borrow_and_update().clone();
            if self.broker.shutdown.is_cancelled() {
                if let Some(live) = &live {
                    self.delete_queue(live).await;
                }
                self.report();
                self.leave(true);
                return;
            }
            let retry = match &live {
                Some(live) => match self
                    .check_then_reconcile(std::mem::take(&mut check_due), live)
                    .await
                {
                    Step::Done => false,
                    Step::Retry(reason) => {
                        tracing::warn!(exchange = %self.exchange, %reason, "broker operation failed; will retry");
                        self.forget_connection();
                        true
                    }
                },
                None => {
                    self.forget_connection();
                    false
                }
            };
            self.report();
            if !self.queue_may_exist && self.leave(false) {
                return;
            }
            let wait_retry = async {
                if retry {
                    tokio::time::sleep(RETRY_AFTER).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            // Only a queue that is declared and consumed has an exchange worth checking.
            let check_after =
                (self.declared && !retry).then_some(self.broker.settings.exchange_check_interval);
            let wait_check = async {
                match check_after {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = self.notify.notified() => {}
                changed = live_rx.changed() => {
                    if changed.is_err() { return; }
                }
                () = wait_retry => {}
                () = wait_check => check_due = true,
                () = self.broker.shutdown.cancelled() => {}
            }
        }
    }

    /// Removes this reconciler from the broker's map if nothing is wanted (or `force`).
    /// Returns whether it did (the task must then end).
    fn leave(&self, force: bool) -> bool {
        let mut actors = self.broker.actors.lock().unwrap_or_else(|e| e.into_inner());
        if force || self.broker.topology.wanted(&self.exchange).is_empty() {
            actors.remove(&self.exchange);
            return true;
        }
        false
    }

    /// Brings the queue and binding gauges up to date with this reconciler's state.
    fn report(&mut self) {
        let now = (
            i64::from(self.queue_may_exist),
            self.bound.union(&self.stale).count() as i64,
        );
        let metrics = &self.broker.metrics;
        metrics.broker_queues.add(now.0 - self.reported.0);
        metrics.broker_bindings.add(now.1 - self.reported.1);
        self.reported = now;
    }

    /// After a lost connection or a failed operation nothing is assumed confirmed: the
    /// queue is declared again (same name) and every wanted pattern bound again; what was
    /// bound before is remembered as possibly still there.
    fn forget_connection(&mut self) {
        if let Some((_, task)) = self.consumer.take() {
            task.abort();
        }
        self.ops = None;
        self.declared = false;
        self.stale.extend(self.bound.drain());
        self.generation = 0;
        self.broker
            .topology
            .set_all(&self.exchange, BindState::Pending);
    }

    async fn reconcile(&mut self, live: &Live) -> Step {
        if self.generation != live.generation
            || self.consumer_end.lost.swap(false, Ordering::AcqRel)
        {
            if self.generation != 0 {
                self.forget_connection();
            }
            self.generation = live.generation;
        }
        let wanted: HashSet<String> = self
            .broker
            .topology
            .wanted(&self.exchange)
            .into_iter()
            .collect();
        if wanted.is_empty() {
            if self.queue_may_exist && !self.delete_queue(live).await {
                return Step::Retry("could not delete the queue".into());
            }
            return Step::Done;
        }
        let ops = match self.ops_channel(live).await {
            Ok(ops) => ops,
            Err(step) => return step,
        };
        if !self.declared {
            match self.declare(&ops, live).await {
                Ok(true) => {}
                Ok(false) => return Step::Done,
                Err(step) => return step,
            }
        }
        // A binding released and asked for again while we were busy is a new entry in the
        // topology, still Pending, though it never left the broker: confirm it.
        for pattern in wanted.intersection(&self.bound) {
            self.broker
                .topology
                .confirm_if_pending(&self.exchange, pattern);
        }
        let to_bind: Vec<String> = wanted.difference(&self.bound).cloned().collect();
        let binds = to_bind.iter().map(|pattern| {
            timed(ops.queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                pattern.as_str().into(),
                Default::default(),
                FieldTable::default(),
            ))
        });
        let results = join_all(binds).await;
        let mut retry = None;
        // The broker closes the channel on a refusal, and lapin fails every reply pending
        // on it with the same error: only the first refusal of a batch is known to be
        // about its own pattern; the others are retried on a new channel.
        let mut refused_one = false;
        for (pattern, result) in to_bind.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    self.stale.remove(&pattern);
                    self.broker
                        .topology
                        .set_state(&self.exchange, &pattern, BindState::Bound);
                    self.bound.insert(pattern);
                }
                Err(err) => match refusal(&err, &self.exchange).filter(|_| !refused_one) {
                    Some(refused) => {
                        refused_one = true;
                        self.ops = None;
                        self.broker.topology.set_state(
                            &self.exchange,
                            &pattern,
                            BindState::Failed(refused),
                        );
                    }
                    None => retry = Some(err.to_string()),
                },
            }
        }
        let to_unbind: Vec<String> = self
            .bound
            .union(&self.stale)
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        if !to_unbind.is_empty() {
            let ops = match self.ops_channel(live).await {
                Ok(ops) => ops,
                Err(step) => return step,
            };
            let unbinds = to_unbind.iter().map(|pattern| {
                timed(ops.queue_unbind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    pattern.as_str().into(),
                    FieldTable::default(),
                ))
            });
            for (pattern, result) in to_unbind.iter().zip(join_all(unbinds).await) {
                match result {
                    Ok(()) => {
                        self.bound.remove(pattern);
                        self.stale.remove(pattern);
                    }
                    Err(err) => retry = Some(err.to_string()),
                }
            }
        }
        match retry {
            Some(reason) => Step::Retry(reason),
            None => Step::Done,
        }
    }

    async fn ops_channel(&mut self, live: &Live) -> Result<Channel, Step> {
        if let Some(ops) = &self.ops
            && ops.status().connected()
        {
            return Ok(ops.clone());
        }
        let ops = timed(live.connection.create_channel())
            .await
            .map_err(|e| Step::Retry(e.to_string()))?;
        self.ops = Some(ops.clone());
        Ok(ops)
    }

    /// Checks the exchange exists, declares the queue and starts consuming. `Ok(false)`:
    /// the broker refused (the subscriptions were told); nothing was left on the broker.
    async fn declare(&mut self, ops: &Channel, live: &Live) -> Result<bool, Step> {
        if let Err(err) = exchange_exists(ops, &self.exchange).await {
            return self.refused(err);
        }
        let ops = if self.queue_may_exist {
            self.check_queue_survived(ops, live).await?
        } else {
            ops.clone()
        };
        let settings = &self.broker.settings;
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(
                settings
                    .queue_expires
                    .as_millis()
                    .clamp(1, u32::MAX as u128) as u32,
            ),
        );
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(settings.queue_max_length),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        let options = QueueDeclareOptions {
            durable: false,
            exclusive: false,
            auto_delete: false,
            ..Default::default()
        };
        if let Err(err) = timed(ops.queue_declare(self.queue.as_str().into(), options, args)).await
        {
            return self.refused(err);
        }
        self.declared = true;
        self.queue_may_exist = true;
        self.start_consumer(live).await.map_err(Step::Retry)?;
        Ok(true)
    }

    async fn check_then_reconcile(&mut self, check_due: bool, live: &Live) -> Step {
        match self.check_exchange(check_due, live).await {
            Step::Done => self.reconcile(live).await,
            retry => retry,
        }
    }

    /// The broker sends no notice when an exchange is deleted: its bindings vanish and the
    /// queue simply gets nothing more. So, when `due`, the exchange of a declared queue is
    /// checked (a passive declare); if it is gone, the streams bound on it end with an
    /// error, as when a client asks for a missing exchange.
    async fn check_exchange(&mut self, due: bool, live: &Live) -> Step {
        if !due || !self.declared || self.generation != live.generation {
            return Step::Done;
        }
        let ops = match self.ops_channel(live).await {
            Ok(ops) => ops,
            Err(step) => return step,
        };
        let Err(err) = exchange_exists(&ops, &self.exchange).await else {
            return Step::Done;
        };
        if is_not_found(&err) {
            tracing::warn!(exchange = %self.exchange, "exchange no longer exists; ending the streams bound on it");
            // Its bindings went with it.
            self.bound.clear();
        }
        match self.refused(err) {
            Ok(_) => Step::Done,
            Err(step) => step,
        }
    }

    /// Before declaring again a queue we had: did it survive (outage shorter than
    /// `x-expires`, nobody deleted it)? If not, its messages since are lost: the
    /// subscriptions on this exchange are told, and nothing of the old queue is assumed.
    /// Returns the channel to go on with (a failed passive declare closes the channel).
    async fn check_queue_survived(&mut self, ops: &Channel, live: &Live) -> Result<Channel, Step> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let probe =
            timed(ops.queue_declare(self.queue.as_str().into(), passive, FieldTable::default()))
                .await;
        match probe {
            Ok(_) => Ok(ops.clone()),
            Err(err) if is_not_found(&err) => {
                tracing::warn!(queue = %self.queue, exchange = %self.exchange, "broker queue was lost; re-creating it, messages published meanwhile are missed");
                self.queue_may_exist = false;
                self.bound.clear();
                self.stale.clear();
                self.consumer_end.recent().clear();
                self.broker.topology.notice(
                    &self.exchange,
                    crate::message::missed_comment(&self.exchange),
                );
                self.ops = None;
                self.ops_channel(live).await
            }
            Err(err) => Err(Step::Retry(err.to_string())),
        }
    }

    /// A failed declare: final refusals fail every binding of the exchange (`Ok(false)`),
    /// anything else is retried.
    fn refused(&mut self, err: TimedError) -> Result<bool, Step> {
        match refusal(&err, &self.exchange) {
            Some(refused) => {
                self.ops = None;
                tracing::info!(exchange = %self.exchange, error = %refused, "bindings refused");
                // Clients still waiting learn it from their `ready` watch; clients already
                // streaming (the exchange vanished during an outage) get the error too.
                self.broker
                    .topology
                    .fail_streams(&self.exchange, &refused.to_string());
                self.broker
                    .topology
                    .set_all(&self.exchange, BindState::Failed(refused));
                Ok(false)
            }
            None => Err(Step::Retry(err.to_string())),
        }
    }

    async fn start_consumer(&mut self, live: &Live) -> Result<(), String> {
        let channel = timed(live.connection.create_channel())
            .await
            .map_err(|e| e.to_string())?;
        timed(channel.basic_qos(self.broker.settings.prefetch, BasicQosOptions::default()))
            .await
            .map_err(|e| e.to_string())?;
        let consumer = timed(channel.basic_consume(
            self.queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await
        .map_err(|e| e.to_string())?;
        self.consumer_end.lost.store(false, Ordering::Release);
        let task = tokio::spawn(consume(
            self.broker.topology.clone(),
            self.exchange.clone(),
            channel.clone(),
            consumer,
            self.consumer_end.clone(),
        ));
        self.consumer = Some((channel, task));
        Ok(())
    }

    /// Stops consuming and deletes the queue (its bindings go with it). If that fails the
    /// queue still disappears by itself once unused for `x-expires`; what was bound is
    /// then only possibly there. Returns whether the queue is gone.
    async fn delete_queue(&mut self, live: &Live) -> bool {
        if let Some((channel, task)) = self.consumer.take() {
            task.abort();
            let _ = timed(channel.close(200, "no longer needed".into())).await;
        }
        self.declared = false;
        let Ok(ops) = self.ops_channel(live).await else {
            self.stale.extend(self.bound.drain());
            return false;
        };
        let deleted =
            timed(ops.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()))
                .await;
        match deleted {
            Ok(_) => {
                self.queue_may_exist = false;
                self.bound.clear();
                self.stale.clear();
                true
            }
            Err(err) => {
                tracing::debug!(queue = %self.queue, error = %err, "could not delete queue");
                self.ops = None;
                self.stale.extend(self.bound.drain());
                false
            }
        }
    }
}

/// A passive declare: fails (and closes the channel) if the exchange does not exist.
async fn exchange_exists(ops: &Channel, exchange: &str) -> Result<(), TimedError> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    timed(ops.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        passive,
        FieldTable::default(),
    ))
    .await
}

/// Bounds a broker operation in time so that a stalled connection cannot hang a reconciler.
async fn timed<T>(op: impl Future<Output = lapin::Result<T>>) -> Result<T, TimedError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TimedError::Broker(e)),
        Err(_) => Err(TimedError::Timeout),
    }
}

#[derive(Debug, thiserror::Error)]
enum TimedError {
    #[error("{0}")]
    Broker(lapin::Error),
    #[error("broker operation timed out")]
    Timeout,
}

fn is_not_found(err: &TimedError) -> bool {
    matches!(err, TimedError::Broker(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404))
}

/// A refusal that is final for the subscriptions involved (as opposed to a transient error).
fn refusal(err: &TimedError, exchange: &str) -> Option<BindError> {
    let TimedError::Broker(err) = err else {
        return None;
    };
    let lapin::ErrorKind::ProtocolError(amqp) = err.kind() else {
        return None;
    };
    match amqp.get_id() {
        404 => Some(BindError::NoSuchExchange(exchange.to_owned())),
        403 => Some(BindError::AccessRefused(exchange.to_owned())),
        _ => None,
    }
}

/// Hands each delivery to the topology and acknowledges in batches.
///
/// A cut connection makes the broker redeliver (flag `redelivered`) every delivery whose
/// acknowledgement it had not processed, including ones already handed to clients and
/// acknowledged on our side while the acknowledgement was still on the wire. So the hashes
/// of the most recent deliveries (at least `prefetch` of them: the broker holds no more
/// unacknowledged ones) are kept, carried over to the next consumer of the queue, and a
/// redelivery that matches one is skipped: clients get each message once across a cut.
/// (A publisher that sends the very same routing key and body twice, and whose second copy
/// is redelivered after a cut, would lose that copy; Pulse messages carry unique ids.)
async fn consume(
    topology: Arc<Topology>,
    exchange: String,
    channel: Channel,
    mut consumer: Consumer,
    ended: ConsumerEnd,
) {
    let mut unacked = 0u64;
    let mut next = None;
    loop {
        let item = match next.take() {
            Some(item) => item,
            None => consumer.next().await,
        };
        let Some(Ok(delivery)) = item else {
            break;
        };
        let hash = delivery_hash(delivery.routing_key.as_str(), &delivery.data);
        if delivery.redelivered && ended.recent().take(hash) {
            topology.count_duplicate();
        } else {
            let incoming = Incoming {
                exchange: delivery.exchange.as_str(),
                routing_key: delivery.routing_key.as_str(),
                redelivered: delivery.redelivered,
                cc: cc_header(&delivery.properties),
                body: &delivery.data,
            };
            topology.deliver(&exchange, &incoming);
        }
        ended.recent().push(hash);
        unacked += 1;
        if unacked < ACK_BATCH
            && let Some(item) = consumer.next().now_or_never()
        {
            next = Some(item);
            continue;
        }
        let multiple = BasicAckOptions { multiple: true };
        if channel
            .basic_ack(delivery.delivery_tag, multiple)
            .await
            .is_err()
        {
            break;
        }
        unacked = 0;
    }
    tracing::debug!(%exchange, "consumer ended");
    ended.lost.store(true, Ordering::Release);
    ended.notify.notify_one();
}

/// What a consumer shares with its reconciler, and leaves to the next consumer.
#[derive(Clone)]
struct ConsumerEnd {
    /// Set when the consumer's stream ended.
    lost: Arc<AtomicBool>,
    /// Hashes of the most recent deliveries (see [`consume`]). A std `Mutex`: one consumer
    /// at a time uses it, for a few nanoseconds per delivery.
    recent: Arc<Mutex<Recent>>,
    notify: Arc<Notify>,
}

impl ConsumerEnd {
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded ring of delivery hashes.
struct Recent {
    hashes: std::collections::VecDeque<u64>,
    capacity: usize,
}

impl Recent {
    fn new(capacity: usize) -> Self {
        Self {
            hashes: std::collections::VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn push(&mut self, hash: u64) {
        if self.hashes.len() == self.capacity {
            self.hashes.pop_front();
        }
        self.hashes.push_back(hash);
    }

    /// Whether `hash` was delivered recently; forgets it if so.
    fn take(&mut self, hash: u64) -> bool {
        match self.hashes.iter().rposition(|h| *h == hash) {
            Some(i) => {
                self.hashes.remove(i);
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.hashes.clear();
    }
}

/// Identifies a delivery well enough to recognise its redelivery.
fn delivery_hash(routing_key: &str, body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    routing_key.hash(&mut h);
    body.hash(&mut h);
    h.finish()
}

/// The entries of the `CC` header (an array of strings), in order.
fn cc_header(properties: &lapin::BasicProperties) -> Vec<&str> {
    let Some(headers) = properties.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(entries)) = headers.inner().get("CC") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|v| match v {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP.mul_f64(1.5));
            assert!(d >= BACKOFF_FIRST.mul_f64(0.5));
        }
    }

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
