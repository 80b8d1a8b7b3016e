//! Configuration from the environment and command-line flags (flags win), parsed and
//! validated once at start. Names follow Taskcluster's where they exist (`PORT`,
//! `PULSE_USERNAME`, …).
//!
//! The AMQP password only ever lives inside [`lapin::uri::AMQPUri`] and is never printed:
//! `Config`'s `Debug` shows the endpoint without credentials, and every error names the
//! setting that is wrong without echoing its value.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::binding::Limits;
use crate::broker::AmqpSettings;

/// The one environment variable the process reads besides its settings: the pod's name
/// (Kubernetes sets it), which goes into queue names and log lines.
pub const HOSTNAME_ENV: &str = "HOSTNAME";

/// Server-Sent Events gateway for RabbitMQ / Mozilla Pulse (Taskcluster events protocol).
#[derive(Parser, Clone)]
#[command(name = "events-gateway", version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,

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

    /// A client must send its request head within this time (slow-header protection).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Embedded broker only: publish demo Taskcluster task events.
    #[arg(long, env = "DEMO", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo: bool,

    /// Embedded broker only: demo messages per second.
    #[arg(long, env = "DEMO_RATE", default_value_t = 5.0)]
    pub demo_rate: f64,

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

    /// Most messages a broker queue holds while the gateway cannot keep up (oldest dropped).
    #[arg(long, env = "QUEUE_MAX_LENGTH", default_value_t = 10_000)]
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
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub broker: BrokerSettings,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub limits: Limits,
    pub ping_interval: Duration,
    pub ready_timeout: Duration,
    pub write_coalesce: Duration,
    pub subscription_buffer: usize,
    pub cors_origin: String,
    pub shutdown_grace: Duration,
    pub log_level: String,
    pub log_json: bool,
    /// `--print-manifest`: print [`crate::manifest`] instead of serving.
    pub print_manifest: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("broker", &self.broker)
            .field("max_connections", &self.max_connections)
            .field("limits", &self.limits)
            .field("ping_interval", &self.ping_interval)
            .field("ready_timeout", &self.ready_timeout)
            .field("write_coalesce", &self.write_coalesce)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("cors_origin", &self.cors_origin)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Which broker to use.
#[derive(Clone, Debug)]
pub enum BrokerSettings {
    /// RabbitMQ or Pulse.
    Amqp(AmqpSettings),
    /// The in-process broker, optionally with the demo generator.
    Embedded(Demo),
}

/// The demo generator of the embedded broker.
#[derive(Clone, Debug)]
pub struct Demo {
    pub enabled: bool,
    /// Messages per second.
    pub rate: f64,
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
        Ok(Self::from_args(args)?)
    }

    /// Validates parsed arguments.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let broker = match broker_uri(&args)? {
            Some(uri) => {
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
                BrokerSettings::Amqp(AmqpSettings {
                    uri,
                    queue_prefix,
                    prefetch: args.prefetch,
                    queue_max_length: args.queue_max_length,
                    queue_expires: args.queue_expires,
                    exchange_check_interval: args.exchange_check_interval,
                })
            }
            None => {
                if !(0.01..=10_000.0).contains(&args.demo_rate) {
                    return Err(ConfigError::DemoRate);
                }
                BrokerSettings::Embedded(Demo {
                    enabled: args.demo,
                    rate: args.demo_rate,
                })
            }
        };
        for (name, value) in [
            ("MAX_BINDINGS", args.max_bindings),
            ("MAX_CONNECTIONS", args.max_connections),
            ("SUBSCRIPTION_BUFFER", args.subscription_buffer),
            ("QUEUE_MAX_LENGTH", args.queue_max_length as usize),
            ("PREFETCH", args.prefetch as usize),
            ("PING_INTERVAL", args.ping_interval.as_millis() as usize),
            ("READY_TIMEOUT", args.ready_timeout.as_millis() as usize),
            (
                "HEADER_READ_TIMEOUT",
                args.header_read_timeout.as_millis() as usize,
            ),
            ("QUEUE_EXPIRES", args.queue_expires.as_millis() as usize),
            (
                "EXCHANGE_CHECK_INTERVAL",
                args.exchange_check_interval.as_millis() as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (name, value, max, max_text) in [
            ("PING_INTERVAL", args.ping_interval, DAY, "24h"),
            ("READY_TIMEOUT", args.ready_timeout, DAY, "24h"),
            ("HEADER_READ_TIMEOUT", args.header_read_timeout, DAY, "24h"),
            ("SHUTDOWN_GRACE", args.shutdown_grace, DAY, "24h"),
            (
                "EXCHANGE_CHECK_INTERVAL",
                args.exchange_check_interval,
                DAY,
                "24h",
            ),
            (
                "WRITE_COALESCE",
                args.write_coalesce,
                Duration::from_secs(10),
                "10s",
            ),
            // x-expires is a 32-bit count of milliseconds.
            (
                "QUEUE_EXPIRES",
                args.queue_expires,
                Duration::from_secs(30 * 24 * 3600),
                "30 days",
            ),
        ] {
            if value > max {
                return Err(ConfigError::TooLong(name, max_text));
            }
        }
        let allowed_exchange_prefixes = args
            .allowed_exchange_prefixes
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            listen: SocketAddr::new(args.listen_address, args.port),
            broker,
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout,
            limits: Limits {
                max_bindings: args.max_bindings,
                allowed_exchange_prefixes,
            },
            ping_interval: args.ping_interval,
            ready_timeout: args.ready_timeout,
            write_coalesce: args.write_coalesce,
            subscription_buffer: args.subscription_buffer,
            cors_origin: args.cors_origin,
            shutdown_grace: args.shutdown_grace,
            log_level: args.log_level,
            log_json: args.log_format == "json",
            print_manifest: args.print_manifest,
        })
    }
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
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, anyhow::Error> {
        Config::parse_from(std::iter::once("events-gateway").chain(args.iter().copied()))
    }

    fn amqp(c: &Config) -> &AmqpSettings {
        match &c.broker {
            BrokerSettings::Amqp(a) => a,
            BrokerSettings::Embedded(_) => panic!("expected AMQP settings"),
        }
    }

    #[test]
    fn defaults_run_the_embedded_broker_with_the_demo() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.listen.port(), 12345);
        assert!(matches!(
            c.broker,
            BrokerSettings::Embedded(Demo { enabled: true, .. })
        ));
        assert_eq!(c.limits.max_bindings, 100);
        assert_eq!(c.max_connections, 15_000);
        assert_eq!(c.ping_interval, Duration::from_secs(20));
    }

    #[test]
    fn amqp_url_selects_rabbitmq() {
        let c = parse(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"]).expect("valid");
        assert_eq!(amqp(&c).uri.authority.host, "127.0.0.1");
        assert_eq!(amqp(&c).queue_prefix, "queue/guest/events-gateway");
    }

    #[test]
    fn pulse_settings_build_a_tls_url_and_hide_the_password() {
        let c = parse(&[
            "--pulse-hostname",
            "pulse.example",
            "--pulse-username",
            "me",
            "--pulse-password",
            "s3cret",
        ])
        .expect("valid");
        assert_eq!(amqp(&c).uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(amqp(&c).uri.authority.port, 5671);
        assert_eq!(amqp(&c).queue_prefix, "queue/me/events-gateway");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn environment_comes_from_the_lookup_and_flags_win() {
        let env: std::collections::HashMap<&str, &str> = [
            ("PORT", "8080"),
            ("PULSE_HOSTNAME", "pulse.example"),
            ("PULSE_USERNAME", "me"),
            ("PULSE_PASSWORD", "s3cret"),
            ("PULSE_AMQPS", "false"),
            ("PING_INTERVAL", "5s"),
        ]
        .into_iter()
        .collect();
        let lookup = |k: &str| env.get(k).map(|v| (*v).to_owned());
        let c =
            Config::parse_with_env(["events-gateway", "--port", "9090"], lookup).expect("valid");
        assert_eq!(c.listen.port(), 9090, "the flag wins");
        assert_eq!(c.ping_interval, Duration::from_secs(5));
        assert_eq!(amqp(&c).uri.scheme, AMQPScheme::AMQP);
        assert_eq!(amqp(&c).uri.authority.port, 5672);
        let err = Config::parse_with_env(["events-gateway", "--help"], lookup)
            .expect_err("help is an early exit");
        assert!(
            !err.to_string().contains("s3cret"),
            "help never shows the password"
        );
        // With no lookup, nothing comes from the process environment.
        let c = Config::parse_from(["events-gateway"]).expect("valid");
        assert_eq!(c.listen.port(), 12345);
    }

    #[test]
    fn bad_settings_are_named_without_their_value() {
        let err = parse(&["--amqp-url", "http://u:s3cret@[bad"]).expect_err("invalid");
        assert_eq!(err.to_string(), ConfigError::BadAmqpUrl.to_string());
        let err = parse(&["--pulse-hostname", "h"]).expect_err("no credentials");
        assert_eq!(err.to_string(), ConfigError::PulseCredentials.to_string());
        let err = parse(&["--max-bindings", "0"]).expect_err("zero");
        assert_eq!(err.to_string(), "MAX_BINDINGS must be greater than zero");
        let err = parse(&["--ping-interval", "1000years"]).expect_err("too long");
        assert_eq!(err.to_string(), "PING_INTERVAL must be at most 24h");
    }
}
