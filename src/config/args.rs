//! Every setting as a command-line flag with its environment variable, default and help
//! text (clap). What the values mean together, and which are refused, is `Config`'s job.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;

/// Server-Sent Events gateway for RabbitMQ / Mozilla Pulse (Taskcluster events protocol).
#[derive(Parser, Clone)]
#[command(name = "events-gateway", version, about)]
pub struct Args {
    /// Address to listen on. Default: 0.0.0.0 with a broker configured; 127.0.0.1 on the
    /// embedded broker, whose publish endpoint has no authentication (to serve the demo
    /// beyond this machine on purpose: --listen-address 0.0.0.0 --embedded-broker).
    #[arg(long, env = "LISTEN_ADDRESS")]
    pub listen_address: Option<IpAddr>,

    /// Run on the embedded broker even when listening beyond loopback. Without a broker
    /// configured, a gateway told to listen on another address refuses to start (it
    /// would serve demo data, and anyone could publish), unless this says it is meant.
    #[arg(long, env = "EMBEDDED_BROKER", default_value_t = false, action = clap::ArgAction::Set)]
    pub embedded_broker: bool,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 12345)]
    pub port: u16,

    /// Broker URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f. Overrides the PULSE_* set.
    /// Without it and without PULSE_HOSTNAME the gateway runs on its embedded broker.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// Pulse user name (also names the queues: queue/<user>/…).
    #[arg(long, env = "PULSE_USERNAME")]
    pub pulse_username: Option<String>,

    /// Pulse password.
    #[arg(long, env = "PULSE_PASSWORD", hide_env_values = true)]
    pub pulse_password: Option<String>,

    /// Pulse host name; setting it selects the PULSE_* set.
    #[arg(long, env = "PULSE_HOSTNAME")]
    pub pulse_hostname: Option<String>,

    /// Pulse virtual host.
    #[arg(long, env = "PULSE_VHOST", default_value = "/")]
    pub pulse_vhost: String,

    /// Use TLS (amqps, port 5671) for Pulse.
    #[arg(long, env = "PULSE_AMQPS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pulse_amqps: bool,

    /// Queue name prefix; default queue/<user>/events-gateway (Pulse requires queue/<user>/).
    #[arg(long, env = "QUEUE_PREFIX")]
    pub queue_prefix: Option<String>,

    /// Most SSE connections this process serves at once (keep it below the process's
    /// open-file limit); more get 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 15_000)]
    pub max_connections: usize,

    /// A client must send its request head within this time (slow-header protection);
    /// one deadline per connection, which requests kept alive on it share.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Most connections not admitted yet (reading or answering a request head, or kept
    /// alive between requests); more are closed as soon as they are accepted.
    #[arg(long, env = "MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    pub max_pending_connections: usize,

    /// ... from one client address (trusted proxies: only the global cap).
    #[arg(long, env = "MAX_PENDING_PER_ADDRESS", default_value_t = 64)]
    pub max_pending_per_address: usize,

    /// File descriptors kept below the open-file limit for health checks and refusals;
    /// MAX_CONNECTIONS is lowered to fit under the limit less this.
    #[arg(long, env = "FD_RESERVE", default_value_t = 64)]
    pub fd_reserve: usize,

    /// Embedded broker only: publish demo Taskcluster task events.
    #[arg(long, env = "DEMO", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo: bool,

    /// Embedded broker only: demo messages per second.
    #[arg(long, env = "DEMO_RATE", default_value_t = 5.0)]
    pub demo_rate: f64,

    /// Most SSE connections from one client address (an IPv6 client by its /64); more
    /// get 503. Behind a proxy, see TRUSTED_PROXIES.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1000)]
    pub max_connections_per_address: usize,

    /// New subscriptions (binding sets nobody uses yet) one client address may create
    /// per second, on average; more get an `error` event.
    #[arg(long, env = "ADDRESS_SUBSCRIPTION_RATE", default_value_t = 5.0)]
    pub address_subscription_rate: f64,

    /// New subscriptions one client address may create at once after a quiet spell.
    #[arg(long, env = "ADDRESS_SUBSCRIPTION_BURST", default_value_t = 50)]
    pub address_subscription_burst: u32,

    /// Bindings the connections of one client address may hold together (each counted
    /// per connection); more get an `error` event. One address cannot then use up
    /// MAX_BROKER_BINDINGS.
    #[arg(long, env = "MAX_BINDINGS_PER_ADDRESS", default_value_t = 5_000)]
    pub max_bindings_per_address: usize,

    /// Distinct exchanges the connections of one client address may use together; more
    /// get an `error` event. One address cannot then use up MAX_EXCHANGES.
    #[arg(long, env = "MAX_EXCHANGES_PER_ADDRESS", default_value_t = 50)]
    pub max_exchanges_per_address: usize,

    /// Comma-separated addresses or networks (CIDR) of proxies whose X-Forwarded-For (or
    /// Forwarded, see FORWARDED_HEADER) is believed, e.g. 10.0.0.0/8 for an ingress in the
    /// cluster. Empty: the TCP peer is the
    /// client (behind an ingress every client would then share its address).
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,

    /// The header the trusted proxies append the client's address to: x-forwarded-for, or
    /// forwarded (RFC 7239, `for=`). Only that one is read: a client can write the other.
    #[arg(long, env = "FORWARDED_HEADER", default_value = "x-forwarded-for")]
    pub forwarded_header: String,

    /// Most distinct subscriptions (binding sets) at once; more get an `error` event.
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = 20_000)]
    pub max_subscriptions: usize,

    /// Most distinct (exchange, pattern) bindings at once, each one broker binding.
    #[arg(long, env = "MAX_BROKER_BINDINGS", default_value_t = 20_000)]
    pub max_broker_bindings: usize,

    /// Most exchanges in use at once, each one queue and two AMQP channels.
    #[arg(long, env = "MAX_EXCHANGES", default_value_t = 200)]
    pub max_exchanges: usize,

    /// Most resumable subscriptions lingering with no client (RESUME_GRACE) at once; the
    /// oldest goes first, and any goes when a live client needs its room.
    #[arg(long, env = "MAX_LINGERING_SUBSCRIPTIONS", default_value_t = 2_000)]
    pub max_lingering_subscriptions: usize,

    /// Most words (`.`-separated) in a routing-key pattern.
    #[arg(long, env = "MAX_PATTERN_WORDS", default_value_t = 32)]
    pub max_pattern_words: usize,

    /// Most `#` wildcards in a routing-key pattern (each makes matching backtrack).
    /// Two by default: RabbitMQ 4.3.5 and later refuse a binding key with more.
    #[arg(long, env = "MAX_PATTERN_WILDCARDS", default_value_t = 2)]
    pub max_pattern_wildcards: usize,

    /// Most bindings one connection may ask for.
    #[arg(long, env = "MAX_BINDINGS", default_value_t = 100)]
    pub max_bindings: usize,

    /// Comma-separated prefixes an exchange name must start with (empty: any).
    #[arg(long, env = "ALLOWED_EXCHANGE_PREFIXES", default_value = "exchange/")]
    pub allowed_exchange_prefixes: String,

    /// Time between `ping` events, e.g. 20s.
    #[arg(long, env = "PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// After a write to a client, how long further frames may wait to go out together in
    /// one write (0: write each at once). Trades up to this much latency for less CPU.
    #[arg(long, env = "WRITE_COALESCE", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub write_coalesce: Duration,

    /// How long a client waits for the broker to confirm its bindings before an `error`.
    #[arg(long, env = "READY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,

    /// Frames a client may fall behind before it loses the oldest (per subscription).
    #[arg(long, env = "SUBSCRIPTION_BUFFER", default_value_t = 1024)]
    pub subscription_buffer: usize,

    /// Bytes of frames a subscription keeps for clients that fall behind, e.g. 8MiB; the
    /// oldest go first beyond it.
    #[arg(long, env = "SUBSCRIPTION_BUFFER_BYTES", default_value = "8MiB", value_parser = parse_bytes)]
    pub subscription_buffer_bytes: usize,

    /// Resumable streams (`resume=1`): the oldest frame a subscription keeps for a client
    /// that reconnects (its count and bytes are bounded by SUBSCRIPTION_BUFFER and
    /// SUBSCRIPTION_BUFFER_BYTES).
    #[arg(long, env = "REPLAY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub replay_window: Duration,

    /// Bytes the logs of all resumable subscriptions may hold together; beyond it the
    /// oldest replay frames go first (a client resuming from before them gets `gap`
    /// `expired`). The default fits the manifests' 1 GiB memory limit.
    #[arg(long, env = "REPLAY_MEMORY", default_value = "256MiB", value_parser = parse_bytes)]
    pub replay_memory: usize,

    /// Resumable streams: how long a subscription, its history and its broker bindings
    /// outlive its last client, so that a client that reconnects can resume.
    #[arg(long, env = "RESUME_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resume_grace: Duration,

    /// A stream whose socket takes no byte for this long while it has bytes to write is
    /// ended (a client that stopped reading holds no connection slot forever).
    #[arg(long, env = "STALL_TIMEOUT", default_value = "40s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// Idle time before TCP keepalive probes on client connections (a peer that vanished
    /// without closing is noticed by the kernel).
    #[arg(long, env = "TCP_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,

    /// Most bytes of messages a broker queue holds while the gateway cannot keep up
    /// (x-max-length-bytes; oldest dropped).
    #[arg(long, env = "QUEUE_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub queue_max_bytes: usize,

    /// Most messages a broker queue holds while the gateway cannot keep up (oldest dropped).
    /// 1,500 by default: below Pulse's guardian, which warns a queue's owner at 2,000 ready
    /// messages and deletes the queue at 8,000, so the gateway drops its oldest messages
    /// itself (and its clients are told) instead of losing the whole queue.
    #[arg(long, env = "QUEUE_MAX_LENGTH", default_value_t = 1_500)]
    pub queue_max_length: u32,

    /// A queue without consumer is deleted by the broker after this long (x-expires).
    #[arg(long, env = "QUEUE_EXPIRES", default_value = "5m", value_parser = humantime::parse_duration)]
    pub queue_expires: Duration,

    /// How often each exchange in use is checked to still exist. The broker sends no
    /// notice when an exchange is deleted: its bindings vanish silently, so its clients
    /// would wait forever; a check that finds it gone ends their streams with an error.
    #[arg(long, env = "EXCHANGE_CHECK_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub exchange_check_interval: Duration,

    /// Unacknowledged deliveries per queue.
    #[arg(long, env = "PREFETCH", default_value_t = 1000)]
    pub prefetch: u16,

    /// Origins a browser may open a WebSocket connection (`/subscription/raw`, `/named`)
    /// from: `*`, or a comma-separated list such as `https://tc.example.com`; others get
    /// 403. A client that sends no Origin (not a browser) is always allowed.
    #[arg(long, env = "WS_ALLOWED_ORIGINS", default_value = "*")]
    pub ws_allowed_origins: String,

    /// Time between WebSocket pings; a connection that answered nothing since the last
    /// one is cut.
    #[arg(long, env = "WS_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ws_ping_interval: Duration,

    /// A WebSocket client must send `connection_init` within this, or is closed with 4400.
    #[arg(long, env = "WS_INIT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub ws_init_timeout: Duration,

    /// A WebSocket connection is closed with 4408 after this (the UI reconnects).
    #[arg(long, env = "WS_LIFETIME", default_value = "6h", value_parser = humantime::parse_duration)]
    pub ws_lifetime: Duration,

    /// Value of Access-Control-Allow-Origin.
    #[arg(long, env = "CORS_ORIGIN", default_value = "*")]
    pub cors_origin: String,

    /// On SIGTERM, time allowed to end streams, delete queues and exit.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log filter (tracing EnvFilter syntax), e.g. info or events_gateway=debug.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Check the configuration, print what the binary reads and serves (settings, routes,
    /// metrics) as JSON, and exit: what deploy/check.py compares the manifests against.
    #[arg(long, hide = true)]
    pub print_manifest: bool,

    /// Once listening, write the address the gateway listens on (`ip:port`) to this file:
    /// for a supervisor or a test that starts it on port 0.
    #[arg(long, env = "ADDRESS_FILE")]
    pub address_file: Option<std::path::PathBuf>,
}

/// A size such as `8MiB`, `512KiB`, `64kB` or `1048576` (bytes).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 8MiB"))?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (B, KiB, MiB, GiB, kB, MB, GB)"
            ));
        }
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}
