//! Reads the configuration, starts logging and runs the gateway until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use events_gateway::Config;

#[tokio::main]
async fn main() {
    // Return freed memory to the OS in the background (after ~10 s of disuse), so RSS
    // falls again when thousands of clients leave.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let config = match Config::parse_with_env(std::env::args_os(), |k| std::env::var(k).ok()) {
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
    if config.print_manifest {
        use std::io::Write;
        let manifest = events_gateway::manifest(&config);
        // A closed pipe (`| head`) is not worth a panic.
        let _ = writeln!(std::io::stdout(), "{manifest:#}");
        return;
    }
    events_gateway::init_logging(&config.log_level, config.log_json, &config.hostname);
    if let Err(err) = events_gateway::run(config, shutdown_signal()).await {
        tracing::error!("{err:#}");
        std::process::exit(1);
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
