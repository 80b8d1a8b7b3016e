//! Reads the configuration, starts logging and runs the gateway until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use events_gateway::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let config = match Config::parse_from(std::env::args_os()) {
        Ok(config) => config,
        Err(err) => {
            // clap errors (and --help / --version) print themselves with their own status.
            if let Some(clap_err) = err.downcast_ref::<clap::Error>() {
                clap_err.exit();
            }
            eprintln!("events-gateway: invalid configuration: {err}");
            std::process::exit(2);
        }
    };
    init_tracing(&config);
    if let Err(err) = events_gateway::run(config, shutdown_signal()).await {
        tracing::error!("{err:#}");
        std::process::exit(1);
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
