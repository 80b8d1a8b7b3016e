//! Configuration from the environment and command-line flags (flags win), parsed and
//! validated once at start. Names follow Taskcluster's where they exist (`PORT`,
//! `PULSE_USERNAME`, …).
//!
//! The AMQP password only ever lives inside [`lapin::uri::AMQPUri`] and is never printed:
//! `Config`'s `Debug` shows the endpoint without credentials, and every error names the
//! setting that is wrong without echoing its value.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::admission::{AdmissionLimits, ForwardedHeader};
use crate::binding::Limits;
use crate::broker::{AmqpSettings, BrokerSettings, Demo};
use crate::registry::Caps;
use crate::subscription::{LogLimits, StreamSettings};

mod args;
mod checks;

pub use args::Args;

/// The one environment variable the process reads besides its settings: the pod's name
/// (Kubernetes sets it), which goes into queue names and log lines. Read through the same
/// lookup as the settings, never from the process environment directly.
pub const HOSTNAME_ENV: &str = "HOSTNAME";

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub broker: BrokerSettings,
    pub admission: AdmissionLimits,
    pub caps: Caps,
    pub header_read_timeout: Duration,
    /// Limits before admission (see `server::gate`).
    pub pending: PendingLimits,
    pub limits: Limits,
    /// How streams are written (ping, ready timeout, coalescing, stall timeout, buffers).
    pub stream: StreamSettings,
    pub tcp_keepalive: Duration,
    pub cors_origin: String,
    /// The WebSocket endpoints' timers.
    pub ws: crate::ws::Settings,
    /// `WS_ALLOWED_ORIGINS`.
    pub ws_allowed_origins: String,
    pub shutdown_grace: Duration,
    pub log_level: String,
    pub log_json: bool,
    /// The host (pod) name, `HOSTNAME`; empty if unset.
    pub hostname: String,
    /// `--print-manifest`: print the manifest instead of serving.
    pub print_manifest: bool,
    /// `--address-file`: where to write the address once listening.
    pub address_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("broker", &self.broker)
            .field("admission", &self.admission)
            .field("caps", &self.caps)
            .field("limits", &self.limits)
            .field("stream", &self.stream)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("cors_origin", &self.cors_origin)
            .field("ws", &self.ws)
            .field("ws_allowed_origins", &self.ws_allowed_origins)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Limits on connections before admission (MAX_PENDING_CONNECTIONS,
/// MAX_PENDING_PER_ADDRESS, FD_RESERVE).
#[derive(Clone, Copy, Debug)]
pub struct PendingLimits {
    pub max: usize,
    pub per_address: usize,
    pub fd_reserve: usize,
}

/// A setting that cannot be used. The text names the setting, never its secret value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("AMQP_URL is not a valid amqp:// or amqps:// URL")]
    BadAmqpUrl,
    #[error("PULSE_USERNAME and PULSE_PASSWORD are required with PULSE_HOSTNAME")]
    PulseCredentials,
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("QUEUE_PREFIX is too long ({0} bytes; at most 150)")]
    QueuePrefix(usize),
    #[error("DEMO_RATE must be between 0.01 and 10000 messages per second")]
    DemoRate,
    #[error("{0} must be at most {1}")]
    TooLong(&'static str, &'static str),
    #[error(
        "no broker is configured (AMQP_URL or PULSE_HOSTNAME) and LISTEN_ADDRESS is not a loopback address: this would serve demo data, with an unauthenticated publish endpoint, beyond this machine. Configure a broker, or set EMBEDDED_BROKER=true to run the embedded broker on purpose"
    )]
    EmbeddedBeyondLoopback,
    #[error("TRUSTED_PROXIES: {0:?} is not an address or a network such as 10.0.0.0/8")]
    BadNetwork(String),
    #[error("FORWARDED_HEADER: {0:?} is neither x-forwarded-for nor forwarded")]
    ForwardedHeader(String),
}

impl Config {
    /// Parses command-line arguments (the first is the program name) only, ignoring the
    /// process environment: what tests use.
    pub fn parse_from<I, T>(args: I) -> Result<Self, anyhow::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::parse_with_env(args, |_| None)
    }

    /// Parses command-line arguments and environment variables looked up with `env`
    /// (flags win). The process environment is never read here: `main` passes
    /// `std::env::var`, tests pass a map.
    pub fn parse_with_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, anyhow::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let command = Args::command().mut_args(|arg| {
            let Some(name) = arg.get_env().and_then(|n| n.to_str()).map(str::to_owned) else {
                return arg;
            };
            // clap would read the process environment itself: take the variable out, and
            // keep its name in --help.
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let arg = arg.env(None).help(format!("{help} [env: {name}]"));
            match env(&name).filter(|v| !v.is_empty()) {
                // A value from the environment becomes the default, hidden from --help
                // (it may be a password).
                Some(v) => arg.default_value(v).hide_default_value(true),
                None => arg,
            }
        });
        let matches = command.try_get_matches_from(args)?;
        let args = Args::from_arg_matches(&matches)?;
        let hostname = env(HOSTNAME_ENV).unwrap_or_default();
        Ok(Self::from_args(args, hostname)?)
    }

    /// Validates parsed arguments.
    pub fn from_args(args: Args, hostname: String) -> Result<Self, ConfigError> {
        let broker = broker_settings(&args)?;
        checks::check_not_zero(&args)?;
        checks::check_bounded(&args)?;
        let listen = listen_address(&args, &broker)?;
        let list = |text: &str| -> Vec<String> {
            text.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let trusted_proxies = list(&args.trusted_proxies)
            .iter()
            .map(|p| parse_network(p))
            .collect::<Result<_, _>>()?;
        let forwarded_header = match args.forwarded_header.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => ForwardedHeader::XForwardedFor,
            "forwarded" => ForwardedHeader::Forwarded,
            _ => return Err(ConfigError::ForwardedHeader(args.forwarded_header.clone())),
        };
        Ok(Self {
            listen: SocketAddr::new(listen, args.port),
            broker,
            admission: AdmissionLimits {
                max_connections: args.max_connections,
                per_address: args.max_connections_per_address,
                subscription_rate: args.address_subscription_rate,
                subscription_burst: f64::from(args.address_subscription_burst),
                bindings_per_address: args.max_bindings_per_address,
                exchanges_per_address: args.max_exchanges_per_address,
                trusted_proxies,
                forwarded_header,
            },
            caps: Caps {
                max_subscriptions: args.max_subscriptions,
                max_bindings: args.max_broker_bindings,
                max_exchanges: args.max_exchanges,
                max_lingering: args.max_lingering_subscriptions,
            },
            header_read_timeout: args.header_read_timeout,
            pending: PendingLimits {
                max: args.max_pending_connections,
                per_address: args.max_pending_per_address,
                fd_reserve: args.fd_reserve,
            },
            limits: Limits {
                max_bindings: args.max_bindings,
                allowed_exchange_prefixes: list(&args.allowed_exchange_prefixes),
                max_pattern_words: args.max_pattern_words,
                max_pattern_hashes: args.max_pattern_wildcards,
            },
            stream: StreamSettings {
                ping_interval: args.ping_interval,
                ready_timeout: args.ready_timeout,
                write_coalesce: args.write_coalesce,
                stall_timeout: args.stall_timeout,
                log: LogLimits {
                    max_frames: args.subscription_buffer,
                    max_bytes: args.subscription_buffer_bytes,
                    max_age: args.replay_window,
                },
                resume_grace: args.resume_grace,
                shard_clients: crate::subscription::SHARD_CLIENTS,
                replay_memory: args.replay_memory,
            },
            tcp_keepalive: args.tcp_keepalive,
            cors_origin: args.cors_origin,
            ws: crate::ws::Settings {
                ping_interval: args.ws_ping_interval,
                init_timeout: args.ws_init_timeout,
                lifetime: args.ws_lifetime,
            },
            ws_allowed_origins: args.ws_allowed_origins,
            shutdown_grace: args.shutdown_grace,
            log_level: args.log_level,
            log_json: args.log_format == "json",
            hostname,
            print_manifest: args.print_manifest,
            address_file: args.address_file,
        })
    }
}

/// The broker to use: AMQP (with its queue settings) or the embedded one (with the demo).
fn broker_settings(args: &Args) -> Result<BrokerSettings, ConfigError> {
    let Some(uri) = broker_uri(args)? else {
        if !(0.01..=10_000.0).contains(&args.demo_rate) {
            return Err(ConfigError::DemoRate);
        }
        return Ok(BrokerSettings::Embedded(Demo {
            enabled: args.demo,
            rate: args.demo_rate,
        }));
    };
    let user = if uri.authority.userinfo.username.is_empty() {
        "guest".to_owned()
    } else {
        uri.authority.userinfo.username.clone()
    };
    let queue_prefix = args
        .queue_prefix
        .clone()
        .unwrap_or_else(|| format!("queue/{user}/events-gateway"));
    if queue_prefix.len() > 150 {
        return Err(ConfigError::QueuePrefix(queue_prefix.len()));
    }
    Ok(BrokerSettings::Amqp(Box::new(AmqpSettings {
        uri,
        queue_prefix,
        prefetch: args.prefetch,
        queue_max_length: args.queue_max_length,
        queue_max_bytes: args.queue_max_bytes as u64,
        queue_expires: args.queue_expires,
        exchange_check_interval: args.exchange_check_interval,
    })))
}

/// The address to listen on. The embedded broker (its publish endpoint has no
/// authentication, and its data is a demo) listens on loopback unless told otherwise,
/// and only with EMBEDDED_BROKER=true beyond it.
fn listen_address(args: &Args, broker: &BrokerSettings) -> Result<IpAddr, ConfigError> {
    let embedded = matches!(broker, BrokerSettings::Embedded(_));
    match args.listen_address {
        None if embedded => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        None => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Some(addr) if embedded && !addr.is_loopback() && !args.embedded_broker => {
            Err(ConfigError::EmbeddedBeyondLoopback)
        }
        Some(addr) => Ok(addr),
    }
}

/// An address (`10.1.2.3`) or a network (`10.0.0.0/8`).
fn parse_network(text: &str) -> Result<ipnet::IpNet, ConfigError> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| ConfigError::BadNetwork(text.to_owned()))
}

/// `AMQP_URL` if given; else the PULSE_* set if `PULSE_HOSTNAME` is given; else none (the
/// embedded broker).
fn broker_uri(args: &Args) -> Result<Option<AMQPUri>, ConfigError> {
    if let Some(url) = args.amqp_url.as_deref().filter(|u| !u.is_empty()) {
        return url.parse().map(Some).map_err(|_| ConfigError::BadAmqpUrl);
    }
    let Some(host) = args.pulse_hostname.as_deref().filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let (Some(user), Some(password)) = (&args.pulse_username, &args.pulse_password) else {
        return Err(ConfigError::PulseCredentials);
    };
    let (scheme, port) = if args.pulse_amqps {
        (AMQPScheme::AMQPS, 5671)
    } else {
        (AMQPScheme::AMQP, 5672)
    };
    let mut uri = AMQPUri {
        scheme,
        vhost: args.pulse_vhost.clone(),
        ..Default::default()
    };
    uri.authority.host = host.to_owned();
    uri.authority.port = port;
    uri.authority.userinfo.username = user.clone();
    uri.authority.userinfo.password = password.clone();
    Ok(Some(uri))
}

#[cfg(test)]
mod tests;
