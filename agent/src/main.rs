//! `ridge-agent`: see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ridge_agent::config::{self, ENV_TOKEN, EXIT_CONFIG, Overrides};
use tokio::signal::unix::{SignalKind, signal};

const LONG_ABOUT: &str = "\
Ridge node agent. On first start it enrolls the node with the scheduler using \
a bootstrap token (from --token-file, the RIDGE_BOOTSTRAP_TOKEN environment \
variable, or `ridge.token=` on the kernel command line, in that order), keeps \
the node's key pair and credential in <state-dir>/identity.json (mode 0600) \
and reuses them on every later start. It then heartbeats (capabilities, load, \
link measurements), probes links to peer agents over UDP, watches the \
node's desired state and applies it to the local ridge-dataplane through its \
control socket. Exit status: 0 after SIGTERM/SIGINT, 64 invalid \
configuration, 77 enrollment or credential refused, 1 other failures.";

#[derive(Debug, Parser)]
#[command(name = "ridge-agent", version, about = "Ridge node agent: enrollment, heartbeats, link probes, desired state", long_about = LONG_ABOUT)]
struct Cli {
    /// TOML config file (flags override it)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Scheduler base URL, https://host:port
    #[arg(long = "scheduler", value_name = "URL")]
    scheduler_url: Option<String>,
    /// PEM file with the CA certificate(s) to trust for the scheduler [default: /etc/ssl/certs/ca-certificates.crt]
    #[arg(long, value_name = "FILE")]
    scheduler_ca: Option<PathBuf>,
    /// Directory for identity.json [default: /var/lib/ridge-agent as root, else ~/.local/state/ridge-agent]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// File holding the bootstrap token (first start only)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Kernel command line to search for ridge.token= [default: /proc/cmdline]
    #[arg(long, value_name = "FILE")]
    cmdline_path: Option<PathBuf>,
    /// The dataplane's control socket; "" applies nothing locally [default: /run/ridge/dataplane.sock as root, else $XDG_RUNTIME_DIR/ridge/dataplane.sock]
    #[arg(long, value_name = "PATH", value_parser = parse_path)]
    control_socket: Option<PathBuf>,
    /// Media address to report [default: the dataplane's]
    #[arg(long, value_name = "ADDR")]
    media_address: Option<SocketAddr>,
    /// Mesh address to report [default: the media address]
    #[arg(long, value_name = "ADDR")]
    mesh_address: Option<SocketAddr>,
    /// Base URL of the node's HTTP API to report
    #[arg(long, value_name = "URL")]
    http_url: Option<String>,
    /// UDP address of the probe responder [default: 0.0.0.0:(mesh port + probe offset)]
    #[arg(long, value_name = "ADDR")]
    probe_listen: Option<SocketAddr>,
    /// Peers' probe responders listen on their mesh port + this [default: 1000]
    #[arg(long, value_name = "N")]
    probe_port_offset: Option<u16>,
    /// Interval between probes to each peer [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    probe_interval: Option<Duration>,
    /// Long-poll time of the desired-state watch, at most 60s [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    watch_wait: Option<Duration>,
    /// Address of the /metrics listener; "" disables it [default: 127.0.0.1:9107]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Longest wait for in-flight work on SIGTERM [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Log filter, e.g. "info" or "ridge_agent=debug" [default: info]
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            scheduler_url: self.scheduler_url.clone(),
            scheduler_ca: self.scheduler_ca.clone(),
            state_dir: self.state_dir.clone(),
            token_file: self.token_file.clone(),
            cmdline_path: self.cmdline_path.clone(),
            control_socket: self.control_socket.clone(),
            media_address: self.media_address,
            mesh_address: self.mesh_address,
            http_url: self.http_url.clone(),
            probe_listen: self.probe_listen,
            probe_port_offset: self.probe_port_offset,
            probe_interval: self.probe_interval,
            watch_wait: self.watch_wait,
            metrics_listen: self.metrics_listen.clone(),
            drain_timeout: self.drain_timeout,
            log: self.log.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ridge-agent: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ridge-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env_token = std::env::var(ENV_TOKEN).ok().filter(|t| !t.is_empty());
    match rt.block_on(run(config, env_token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => ExitCode::from(code as u8),
    }
}

async fn run(config: config::Config, env_token: Option<String>) -> Result<(), i32> {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("ridge-agent: cannot install signal handlers");
            return Err(1);
        }
    };
    let start = ridge_agent::start(config, env_token);
    let mut agent = tokio::select! {
        r = start => match r {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ridge-agent: {e}");
                return Err(e.exit_code());
            }
        },
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    // Tests and operators wait for this line.
    eprintln!(
        "ridge-agent running: node {} (enrolled {}), probes on {}, metrics on {}",
        agent.node_id,
        if agent.enrolled_now { "now" } else { "earlier" },
        agent.probe_addr,
        agent.metrics_addr.map_or("-".to_owned(), |a| a.to_string())
    );
    let result = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
        m = agent.failed() => {
            eprintln!("ridge-agent: {m}");
            Err(config::EXIT_ENROLL)
        }
    };
    agent.shutdown().await;
    result
}

/// Like clap's path parser, but an empty value is allowed ("" disables).
fn parse_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}
