//! `ridge-dataplane`: see `--help`.

/// Counts heap allocations per thread, so `/metrics` can show that the
/// media shards allocate nothing per packet (`ridge_shard_allocations`).
#[global_allocator]
static ALLOC: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use ridge_dataplane::cli::{self, Cli, Command};
use ridge_dataplane::config::EXIT_CONFIG;
use ridge_dataplane::node::Node;
use tokio::signal::unix::{SignalKind, signal};

fn env_secret() -> Option<String> {
    std::env::var("RIDGE_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
}

#[allow(clippy::print_stdout, reason = "the CLI's output is its product")]
fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Token(args)) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            return match cli::run_token(args, env_secret(), now) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ridge-dataplane token: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            };
        }
        Some(Command::CheckConfig(args)) => {
            return match cli::run_check_config(args, env_secret()) {
                Ok(c) => {
                    println!(
                        "configuration OK: http {} udp {} public {:?}",
                        c.http, c.udp, c.public_ip
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ridge-dataplane: invalid configuration: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            };
        }
        None => {}
    }
    // Validate everything before any socket is bound.
    let config = match cli.run.load(env_secret()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ridge-dataplane: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ridge-dataplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ridge-dataplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ridge_dataplane::config::Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let node = Node::start(config).await?;
    tracing::info!(
        http = %node.base_url(),
        media = %node.udp_addr(),
        "ridge-dataplane ready; demo page at {}/?token=<token from `ridge-dataplane token`>",
        node.base_url()
    );
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    node.shutdown();
    let wait = node.wait();
    tokio::pin!(wait);
    tokio::select! {
        r = &mut wait => r?,
        _ = term.recv() => tracing::warn!("second signal: exiting without finishing the drain"),
        _ = int.recv() => tracing::warn!("second signal: exiting without finishing the drain"),
    }
    Ok(())
}
