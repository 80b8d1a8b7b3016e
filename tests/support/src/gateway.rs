//! A gateway for a test: in the test process (`TestGateway`, on port 0, against the test
//! broker or the embedded one), or the real binary in a child process (`ChildGateway`, for
//! its RSS, its log and its descriptors).

use std::net::SocketAddr;
use std::time::Duration;

use events_gateway::{Config, Running};

use crate::{
    Broker, RawClient, SseClient, amqp_addr, amqp_url, bindings_query, eventually, metric_value,
    poll_until, rabbitmqctl_output, unique,
};

/// A gateway running inside the test process.
pub struct TestGateway {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub queue_prefix: String,
}

impl TestGateway {
    /// Starts a gateway on 127.0.0.1:0 with test-friendly settings plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Self {
        let broker = Broker::connect().await;
        drop(broker);
        Self::start_unchecked(extra).await
    }

    /// Starts a gateway on the embedded broker (no RabbitMQ), demo traffic off unless
    /// `extra` turns it on.
    pub async fn start_embedded(extra: &[&str]) -> Self {
        let mut args = vec!["--amqp-url="];
        if !extra.iter().any(|a| a.starts_with("--demo=")) {
            args.push("--demo=false");
        }
        args.extend_from_slice(extra);
        Self::start_unchecked(&args).await
    }

    /// Publishes through the embedded broker's endpoint; returns the HTTP status and body.
    pub async fn publish(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .post(self.url("/api/events/v1/publish"))
            .json(body)
            .send()
            .await
            .expect("publish");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Publishes in-process on the embedded broker (no HTTP round trip, so that a test can
    /// keep an exact rate); returns how many subscriptions the message reached.
    pub fn publish_embedded(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &serde_json::Value,
    ) -> usize {
        let running = self.running.as_ref().expect("running");
        match running.broker() {
            events_gateway::Broker::Memory(broker) => {
                broker.publish(exchange, routing_key, &[], payload.to_string().as_bytes())
            }
            _ => panic!("publish_embedded needs the embedded broker"),
        }
    }

    /// Same, without first checking that RabbitMQ is up (for tests of broker outages).
    pub async fn start_unchecked(extra: &[&str]) -> Self {
        init_logs();
        let queue_prefix = format!("queue/guest/events-gateway-test-{}", unique());
        // Test defaults, each unless `extra` sets the same flag.
        let defaults = [
            "--listen-address=127.0.0.1".to_owned(),
            "--port=0".to_owned(),
            format!("--queue-prefix={queue_prefix}"),
            "--shutdown-grace=5s".to_owned(),
            format!("--amqp-url={}", amqp_url()),
            // Every test client comes from 127.0.0.1: the per-address limits are tested
            // on their own, from several loopback addresses.
            "--max-connections-per-address=100000".to_owned(),
            "--address-subscription-burst=100000".to_owned(),
            "--max-bindings-per-address=1000000".to_owned(),
            "--max-exchanges-per-address=100000".to_owned(),
            "--max-pending-per-address=100000".to_owned(),
        ];
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let mut args = vec!["events-gateway".to_owned()];
        args.extend(
            defaults
                .into_iter()
                .filter(|d| !extra.iter().any(|e| flag(e) == flag(d))),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = Config::parse_from(args).expect("test config is valid");
        let running = events_gateway::start(config).await.expect("gateway starts");
        let addr = running.local_addr();
        Self {
            running: Some(running),
            addr,
            http: reqwest::Client::new(),
            queue_prefix,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until the gateway's broker connection is up.
    pub async fn wait_connected(&self) {
        let running = self.running.as_ref().expect("running");
        eventually(Duration::from_secs(10), || running.broker().is_connected()).await;
    }

    /// Opens an SSE stream for `bindings` (a list of (exchange, pattern)).
    pub async fn connect(&self, bindings: &[(&str, &str)]) -> SseClient {
        self.connect_query(&bindings_query(bindings)).await
    }

    /// Opens an SSE stream with a raw query string (without `?`).
    pub async fn connect_query(&self, query: &str) -> SseClient {
        let url = self.url(&format!("/api/events/v1/connect/?{query}"));
        let resp = self.http.get(url).send().await.expect("connect");
        SseClient::from_response(resp)
    }

    /// Opens an SSE stream over a raw HTTP/1.0 socket and reads until `ready`.
    pub async fn raw_connect(&self, bindings: &[(&str, &str)]) -> RawClient {
        let query = bindings_query(bindings);
        let mut raw =
            RawClient::get(self.addr, &format!("/api/events/v1/connect/?{query}"), &[]).await;
        raw.read_until(b"event: ready\ndata: {}\nid: -\n\n", Duration::from_secs(5))
            .await;
        raw
    }

    /// The HTTP status of `GET path`.
    pub async fn status_of(&self, path: &str) -> u16 {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// The body of `GET path`.
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }

    /// The value of one metric series in /metrics (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.text("/metrics").await, series).unwrap_or(0.0)
    }

    /// Drains and stops the gateway.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// Tests are quiet unless TEST_LOG is set (to a tracing filter such as `debug`).
fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The real binary in a child process, so that its RSS, its log and its AMQP channels are
/// its own. Dropping it sends SIGTERM (it drains and deletes its queues), then kills it.
pub struct ChildGateway {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub queue_prefix: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildGateway {
    /// Starts `bin` (pass `env!("CARGO_BIN_EXE_events-gateway")`) on 127.0.0.1, port 0,
    /// against the test broker, logging at info, with `args` added (a flag given there
    /// replaces the default of the same name).
    pub async fn start(bin: &str, args: &[&str]) -> Self {
        Self::start_with(std::process::Command::new(bin), args).await
    }

    /// The same, with the process's open-file limit set to `open_files` (by util-linux's
    /// `prlimit`, which then runs the binary as the same process).
    pub async fn start_with_open_files(bin: &str, open_files: usize, args: &[&str]) -> Self {
        let mut command = std::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={open_files}:{open_files}"))
            .arg(bin);
        Self::start_with(command, args).await
    }

    async fn start_with(mut command: std::process::Command, args: &[&str]) -> Self {
        let queue_prefix = format!("queue/guest/events-gateway-test-{}", unique());
        let defaults = [
            "--listen-address=127.0.0.1".to_owned(),
            "--port=0".to_owned(),
            format!("--amqp-url={}", amqp_url()),
            format!("--queue-prefix={queue_prefix}"),
            "--log-level=events_gateway=info".to_owned(),
            "--shutdown-grace=5s".to_owned(),
        ];
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let mut all: Vec<String> = defaults
            .into_iter()
            .filter(|d| !args.iter().any(|a| flag(a) == flag(d)))
            .collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        // It writes the address it listens on to a file of ours (port 0: a free one).
        let address_file =
            std::env::temp_dir().join(format!("events-gateway-test-{}.addr", unique()));
        all.push(format!("--address-file={}", address_file.display()));
        let mut child = command
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the gateway binary");
        // Every log line is kept (tests count them), and the pipe is drained so that the
        // child never blocks on it.
        let stdout = child.stdout.take().expect("piped stdout");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    log.lock().expect("log").push(line);
                }
            });
        }
        let written = poll_until(Duration::from_secs(20), || {
            let addr = std::fs::read_to_string(&address_file)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok());
            std::future::ready(addr)
        })
        .await;
        let _ = std::fs::remove_file(&address_file);
        let Some(addr) = written else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway binary did not write its address to ADDRESS_FILE");
        };
        let gw = Self {
            child,
            addr,
            queue_prefix,
            log,
        };
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/__heartbeat__");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(resp) = http.get(&url).send().await
                && resp.status() == 200
            {
                return gw;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway binary did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The lines it has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// The value of one metric series (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let body = reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        metric_value(&body, series).unwrap_or(0.0)
    }

    /// AMQP channels the broker has open on this process's connections (rabbitmqctl),
    /// found through the local ports of its sockets to the broker.
    pub async fn amqp_channels(&self) -> usize {
        let ports = amqp_local_ports(self.child.id());
        let listing = rabbitmqctl_output(&["list_channels", "name", "-q"]).await;
        listing
            .lines()
            .filter_map(|l| l.trim().split_once(" -> "))
            .filter_map(|(from, _)| from.rsplit_once(':'))
            .filter(|(_, port)| port.parse().is_ok_and(|p: u16| ports.contains(&p)))
            .count()
    }

    /// Connects an SSE client from `source` (a loopback address) over HTTP/1.0.
    pub async fn raw_from(&self, source: std::net::IpAddr, bindings: &[(&str, &str)]) -> RawClient {
        let path = format!("/api/events/v1/connect/?{}", bindings_query(bindings));
        RawClient::get_from(source, self.addr, &path, &[]).await
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        // SIGTERM, so that it drains and deletes its queues; then make sure it is gone.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Local ports of the TCP sockets process `pid` holds to the broker's port (its AMQP
/// links).
fn amqp_local_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy();
                    l.strip_prefix("socket:[")
                        .and_then(|s| s.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let remote = fields.get(2)?;
            let inode = fields.get(9)?;
            let remote_port = u16::from_str_radix(remote.rsplit_once(':')?.1, 16).ok()?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (remote_port == amqp_addr().port() && inodes.iter().any(|i| i == inode))
                .then_some(local_port)
        })
        .collect()
}

/// What most tests arrange: a broker connection, one exchange of their own on it, and a
/// gateway. The exchange goes when `broker` is dropped (see [`Broker`]): a test that does
/// not use it binds it to a named `_broker`, never `_`, which would drop it at once.
pub struct Scenario {
    pub broker: Broker,
    pub exchange: String,
    pub gw: TestGateway,
}

impl Scenario {
    /// Declares the exchange `name` (made unique) and starts a gateway with `extra` flags.
    pub async fn start(name: &str, extra: &[&str]) -> Self {
        let broker = Broker::connect().await;
        let exchange = broker.exchange(name).await;
        let gw = TestGateway::start(extra).await;
        Self {
            broker,
            exchange,
            gw,
        }
    }
}
