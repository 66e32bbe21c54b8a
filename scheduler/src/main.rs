//! `ridge-scheduler`: see `--help` and docs/scheduler-api.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ridge_scheduler::config::{self, EXIT_CONFIG, EnvSecrets, Overrides};
use tokio::signal::unix::{SignalKind, signal};

/// The Ridge mesh control plane: enrollment, node registry, dispatch, route
/// computation and desired state, over HTTPS.
///
/// Secrets come from the environment (RIDGE_ADMIN_TOKEN, RIDGE_DISPATCH_TOKEN)
/// or the config file, never from flags. On SIGTERM/SIGINT it drains (new
/// requests get 503, long polls return) for at most --drain-timeout.
/// Exit codes: 0 clean, 1 runtime failure, 64 invalid configuration.
#[derive(Debug, Parser)]
#[command(name = "ridge-scheduler", version)]
struct Cli {
    /// TOML config file (flags win over it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTPS listen address (default 127.0.0.1:8443; port 0 picks one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// PEM certificate chain.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// `sqlite:PATH` (default sqlite:ridge-scheduler.db) or `postgres://…`.
    #[arg(long)]
    database: Option<String>,
    /// Agent heartbeat interval (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Missed heartbeats before a node is down.
    #[arg(long)]
    lease_misses: Option<u32>,
    /// Most links on a route.
    #[arg(long)]
    max_hops: Option<usize>,
    /// Longest graceful drain on shutdown.
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// This replica's name (logs, /healthz, /v1/routes).
    #[arg(long)]
    replica_id: Option<String>,
    /// Longest TLS handshake after accept [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Option<Duration>,
    /// Longest wait for a request's headers, also for the next request on
    /// an HTTP/1.1 keep-alive connection [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Longest wait for a request's whole body [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    request_body_timeout: Option<Duration>,
    /// Close a connection with no request in flight after this [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most open connections [default: 16384, lowered to the descriptor
    /// limit less 64].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most open connections from one source address [default: 256].
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    /// Most concurrent desired-state long polls per node [default: 4].
    #[arg(long)]
    max_long_polls_per_node: Option<usize>,
    /// tracing filter (e.g. info, ridge_scheduler=debug).
    #[arg(long)]
    log: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[allow(
    clippy::print_stdout,
    reason = "the listening line is for supervisors and tests"
)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        database: cli.database,
        heartbeat_interval: cli.heartbeat_interval,
        lease_misses: cli.lease_misses,
        max_hops: cli.max_hops,
        drain_timeout: cli.drain_timeout,
        replica_id: cli.replica_id,
        log: cli.log,
        tls_handshake_timeout: cli.tls_handshake_timeout,
        header_read_timeout: cli.header_read_timeout,
        request_body_timeout: cli.request_body_timeout,
        idle_timeout: cli.idle_timeout,
        max_connections: cli.max_connections,
        max_connections_per_source: cli.max_connections_per_source,
        max_long_polls_per_node: cli.max_long_polls_per_node,
    };
    let config = match config::load(cli.config.as_deref(), &overrides, EnvSecrets::from_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ridge-scheduler: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if cli.check_config {
        println!(
            "configuration OK: listen {} database {}",
            config.listen,
            config.database_for_logs()
        );
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ridge-scheduler: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ridge-scheduler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(
    clippy::print_stdout,
    reason = "the listening line is for supervisors and tests"
)]
async fn run(config: config::Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = ridge_scheduler::server::start(config).await?;
    println!("ridge-scheduler listening on {}", running.addr);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = int.recv() => tracing::info!("SIGINT received; draining"),
    }
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
