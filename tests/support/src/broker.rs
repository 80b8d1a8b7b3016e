//! The broker the tests run against: where it is (TEST_AMQP_URL), a test's own AMQP
//! connection (which deletes the exchanges it declared when it is dropped, even when the
//! test panics), the broker's own view through its CLI (TEST_RABBITMQCTL), and names that
//! keep one test's objects apart from another's.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Where the tests find RabbitMQ (override with TEST_AMQP_URL; scripts/test.sh points it
/// at the RabbitMQ 4.3 and 4.0 of scripts/rabbitmq-debian.sh for the later runs).
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
        "start the broker TEST_AMQP_URL names (for RabbitMQ 4.3 or 4.0: `scripts/rabbitmq-4.3.sh start` or `scripts/rabbitmq-4.0.sh start`)"
    } else {
        "start one with `rabbitmq-server -detached && rabbitmqctl await_startup` (or set TEST_AMQP_URL)"
    }
}

/// A short random tag that keeps one test's broker objects apart from another's.
pub fn unique() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// A test's own AMQP connection: declares exchanges and publishes. The exchanges it
/// declared are deleted when it is dropped, whether the test passed or panicked.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    declared: std::sync::Mutex<Vec<String>>,
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
            declared: std::sync::Mutex::new(Vec::new()),
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
        self.declared_names().push(exchange.clone());
        exchange
    }

    /// A topic exchange with exactly this name (deleted with the others when dropped), for
    /// names the gateway resolves itself (Taskcluster's named events).
    pub async fn declare_exact(&self, exchange: &str) {
        self.channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        self.declared_names().push(exchange.to_owned());
    }

    fn declared_names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.declared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes `exchange` now (a test of what a deleted exchange does).
    pub async fn delete_exchange(&self, exchange: &str) {
        self.declared_names().retain(|e| e != exchange);
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

impl Drop for Broker {
    /// Deletes the exchanges this connection declared, on a connection of its own in a
    /// thread of its own: a drop cannot wait in the test's runtime, and must also work
    /// when the test is unwinding from a panic.
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.declared_names());
        if names.is_empty() {
            return;
        }
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let url = amqp_url();
                let connect = Connection::connect(&url, ConnectionProperties::default());
                let Ok(Ok(connection)) =
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    for name in names {
                        let delete = channel.exchange_delete(
                            name.as_str().into(),
                            ExchangeDeleteOptions::default(),
                        );
                        let _ = tokio::time::timeout(Duration::from_secs(5), delete).await;
                    }
                }
                let _ = connection.close(200, "test done".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}
