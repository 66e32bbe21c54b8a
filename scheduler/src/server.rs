//! Runs the scheduler: binds HTTPS, runs the background tick, drains on
//! shutdown with a time bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::service::Scheduler;
use crate::store::LeaderLock;

mod conn;

/// The least time from the start of one tick to an early one (see
/// [`Scheduler::tick_requested`]): a storm of link changes costs at most 20
/// ticks a second.
const EARLY_TICK_GAP: Duration = Duration::from_millis(50);

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("TLS certificate or key: {0}")]
    Tls(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(String),
}

/// A running scheduler.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub scheduler: Arc<Scheduler>,
    stop_accept: watch::Sender<bool>,
    stop_tick: watch::Sender<bool>,
    server: JoinHandle<()>,
    ticker: JoinHandle<LeaderLock>,
}

/// Opens storage, binds, starts serving and ticking.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tls = RustlsConfig::from_pem_file(&config.tls_cert, &config.tls_key)
        .await
        .map_err(StartError::Tls)?
        .get_inner();
    let (registry, metrics) = crate::metrics::registry();
    let sched = Scheduler::open(config, metrics).await?;
    let listener = bind_listener(sched.config.listen).map_err(|source| StartError::Bind {
        addr: sched.config.listen,
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Serve(e.to_string()))?;
    let app = crate::http::router(sched.clone(), Arc::new(registry));
    let nofile = crate::config::nofile_limit();
    let limits = &sched.config.limits;
    let max_connections = limits.max_connections(nofile);
    if let (Some(n), Some(_)) = (nofile, limits.max_connections)
        && max_connections + crate::config::FD_RESERVE > n
    {
        tracing::warn!(
            max_connections,
            descriptor_limit = n,
            "max_connections does not leave {} descriptors free under the descriptor limit \
             (RLIMIT_NOFILE): accept may fail with EMFILE; raise the limit (e.g. LimitNOFILE=) \
             or lower max_connections",
            crate::config::FD_RESERVE
        );
    }
    let (stop_accept, stop_rx) = watch::channel(false);
    let server = {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| StartError::Serve(e.to_string()))?;
        let conns = conn::Serve::new(
            sched.clone(),
            app,
            tokio_rustls::TlsAcceptor::from(tls),
            max_connections,
        );
        tokio::spawn(conns.run(listener, stop_rx))
    };
    let (stop_tick, mut stop_rx) = watch::channel(false);
    let ticker = {
        let sched = sched.clone();
        tokio::spawn(async move {
            let mut lock = LeaderLock::default();
            let mut interval = tokio::time::interval(sched.config.tick());
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = tokio::time::Instant::now();
            loop {
                let early = tokio::select! {
                    _ = interval.tick() => false,
                    () = sched.tick_requested() => true,
                    _ = stop_rx.changed() => break,
                };
                if early {
                    tokio::select! {
                        () = tokio::time::sleep_until(last + EARLY_TICK_GAP) => {}
                        _ = stop_rx.changed() => break,
                    }
                    // The next regular tick is a full period after this one.
                    interval.reset();
                    sched.metrics.early_ticks.inc();
                }
                last = tokio::time::Instant::now();
                if let Err(e) = sched.tick(&mut lock).await {
                    sched.metrics.tick_errors.inc();
                    tracing::warn!(error = %e, "scheduling tick failed");
                }
            }
            lock
        })
    };
    tracing::info!(
        %addr,
        storage = sched.store.kind(),
        database = %sched.config.database_for_logs(),
        replica = %sched.config.replica_id,
        "ridge-scheduler serving"
    );
    Ok(Running {
        addr,
        scheduler: sched,
        stop_accept,
        stop_tick,
        server,
        ticker,
    })
}

impl Running {
    /// Drains: new requests get 503, long polls return, in-flight requests
    /// get up to `drain_timeout`; then flushes heartbeats and releases the
    /// leader lock.
    pub async fn shutdown(self) -> Result<(), StartError> {
        let timeout = self.scheduler.config.drain_timeout;
        self.scheduler.begin_shutdown();
        let _ = self.stop_accept.send(true);
        let served = tokio::time::timeout(timeout + Duration::from_secs(1), self.server).await;
        let _ = self.stop_tick.send(true);
        let mut lock = self.ticker.await.unwrap_or_default();
        self.scheduler.close(&mut lock).await;
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StartError::Serve(e.to_string())),
            Err(_) => {
                tracing::warn!("drain timed out");
                Ok(())
            }
        }
    }
}

/// Connections the kernel may queue before `accept`: thousands of agents
/// reconnect at once after a restart or a network blip, and std's default
/// backlog (128) makes the overflow wait out SYN retransmits (1 s, 3 s, 7 s).
/// The kernel caps it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

/// A non-blocking listener on `addr` with [`ACCEPT_BACKLOG`].
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(ACCEPT_BACKLOG)?.into_std()?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
