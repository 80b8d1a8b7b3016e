//! Unit tests of `config`.

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
    assert_eq!(c.admission.max_connections, 15_000);
    assert_eq!(c.stream.ping_interval, Duration::from_secs(20));
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
    let c = Config::parse_with_env(["events-gateway", "--port", "9090"], lookup).expect("valid");
    assert_eq!(c.listen.port(), 9090, "the flag wins");
    assert_eq!(c.stream.ping_interval, Duration::from_secs(5));
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

#[test]
fn the_embedded_broker_stays_on_loopback_unless_meant() {
    let c = parse(&[]).expect("defaults are valid");
    assert!(
        c.listen.ip().is_loopback(),
        "embedded: 127.0.0.1 by default"
    );
    let c = parse(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"]).expect("valid");
    assert!(c.listen.ip().is_unspecified(), "with a broker: 0.0.0.0");
    let err = parse(&["--listen-address", "0.0.0.0"]).expect_err("demo data beyond loopback");
    assert_eq!(
        err.to_string(),
        ConfigError::EmbeddedBeyondLoopback.to_string()
    );
    let c =
        parse(&["--listen-address", "0.0.0.0", "--embedded-broker=true"]).expect("meant: allowed");
    assert!(c.listen.ip().is_unspecified());
    assert!(parse(&["--listen-address", "::1"]).is_ok(), "IPv6 loopback");
}

#[test]
fn abuse_limits_are_parsed_and_checked() {
    let c = parse(&[
        "--trusted-proxies",
        "10.0.0.0/8, 192.0.2.7",
        "--max-connections-per-address=7",
        "--max-exchanges=9",
    ])
    .expect("valid");
    assert_eq!(c.admission.trusted_proxies.len(), 2);
    assert_eq!(c.admission.per_address, 7);
    assert_eq!(c.caps.max_exchanges, 9);
    assert_eq!(
        c.limits.max_pattern_hashes, 2,
        "what RabbitMQ 4.3.5+ accepts"
    );
    let err = parse(&["--trusted-proxies", "10.0.0.0/99"]).expect_err("not a network");
    assert!(err.to_string().starts_with("TRUSTED_PROXIES"), "{err}");
    assert_eq!(
        c.admission.forwarded_header,
        ForwardedHeader::XForwardedFor,
        "the default"
    );
    let c = parse(&["--forwarded-header", "Forwarded"]).expect("valid");
    assert_eq!(c.admission.forwarded_header, ForwardedHeader::Forwarded);
    let err = parse(&["--forwarded-header", "x-real-ip"]).expect_err("not one of the two");
    assert_eq!(
        err.to_string(),
        "FORWARDED_HEADER: \"x-real-ip\" is neither x-forwarded-for nor forwarded"
    );
    let err = parse(&["--address-subscription-rate=0"]).expect_err("zero");
    assert_eq!(
        err.to_string(),
        "ADDRESS_SUBSCRIPTION_RATE must be greater than zero"
    );
    let c = parse(&["--queue-max-bytes=1MiB", "--amqp-url=amqp://h/%2f"]).expect("valid");
    match c.broker {
        BrokerSettings::Amqp(a) => assert_eq!(a.queue_max_bytes, 1024 * 1024),
        BrokerSettings::Embedded(_) => panic!("AMQP"),
    }
}
