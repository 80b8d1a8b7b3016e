//! What the binary reads and serves, said by the binary itself (`--print-manifest`):
//! its settings (environment names, flags, defaults, choices), the other environment it
//! reads, its routes, and its metrics with their label values. deploy/check.py compares
//! the Kubernetes manifests, the dashboard and the alert rules against this, instead of
//! reading the Rust source.

use clap::CommandFactory;
use serde_json::{Value, json};

use crate::broker::BrokerSettings;
use crate::config::{Args, Config, HOSTNAME_ENV};
use crate::metrics::{
    DROP_REASONS, HTTP_ERRORS, LIMITS, Metrics, OUTCOMES, REFUSAL_REASONS, RESUME_OUTCOMES,
    WS_ENDS, WS_HANDSHAKES,
};

/// The manifest as JSON, with `config` (the configuration the binary was given, already
/// validated) in the values it parsed to.
pub fn manifest(config: &Config) -> Value {
    json!({
        "config": {
            "port": config.listen.port(),
            "shutdown_grace_seconds": config.shutdown_grace.as_secs_f64(),
            "broker": match config.broker {
                BrokerSettings::Amqp(_) => "amqp",
                BrokerSettings::Embedded(_) => "embedded",
            },
        },
        "binary": env!("CARGO_PKG_NAME"),
        "version": env!("CARGO_PKG_VERSION"),
        "settings": settings(),
        "other_env": [HOSTNAME_ENV],
        "build_env": crate::http::BUILD_ENV,
        "routes": routes(),
        "metrics": metrics(),
        "drain_linger_seconds": crate::DRAIN_LINGER.as_secs_f64(),
    })
}

/// Every setting: its environment variable, flag, default and allowed values.
fn settings() -> Vec<Value> {
    Args::command()
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let choices: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            Some(json!({
                "env": env,
                "flag": arg.get_long().map(|l| format!("--{l}")),
                "default": defaults.first(),
                "choices": (!choices.is_empty()).then_some(choices),
                "secret": arg.is_hide_env_values_set(),
            }))
        })
        .collect()
}

/// Every path the gateway answers; a connect path also with its final `/`.
fn routes() -> Vec<String> {
    let mut routes: Vec<String> = crate::http::ROUTES
        .iter()
        .map(|r| (*r).to_owned())
        .collect();
    routes.extend(crate::http::CONNECT_PATHS.iter().map(|p| format!("{p}/")));
    routes
}

/// Every metric family the gateway registers (`process_*` included), with its type, and
/// the values each label can take.
fn metrics() -> Value {
    let families: Vec<Value> = Metrics::new()
        .families()
        .iter()
        .map(|f| json!({"name": f.name(), "type": format!("{:?}", f.get_field_type())}))
        .collect();
    json!({
        "families": families,
        "labels": {
            "outcome": ([OUTCOMES, RESUME_OUTCOMES, WS_HANDSHAKES].concat()),
            "end": WS_ENDS,
            "kind": ([HTTP_ERRORS, LIMITS].concat()),
            "reason": ([DROP_REASONS, REFUSAL_REASONS].concat()),
        },
    })
}
