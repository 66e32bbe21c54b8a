//! Assembles a running node from a validated [`Config`]: binds the sockets,
//! starts the media thread, the room hub and the HTTP server, and runs the
//! bounded drain on shutdown. Used by `main` and by in-process tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum_server::Handle;
use axum_server::accept::DefaultAcceptor;
use axum_server::tls_rustls::RustlsAcceptor;
use ridge_sfu::SfuConfig;
use tokio::sync::watch;

use crate::api::auth::Authenticator;
use crate::api::limits::WsLimits;
use crate::api::listener::{GuardAcceptor, GuardedListener, NodeAddr, configure};
use crate::api::{AppState, RoomHub, router, run_hub};
use crate::config::{Config, ShardPorts};
use crate::control::{ControlError, ControlMetrics, ControlSocket, ControlState};
use crate::offload::KernelPath;
use crate::shard::steering::{SharedPort, SteerCollector};
use crate::shard::{self, MediaError, MediaHandle};

/// Errors starting or running a node.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot bind the HTTP listener {addr}: {source}")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load the TLS certificate/key: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    http_addr: SocketAddr,
    udp_addr: SocketAddr,
    control_socket: Option<PathBuf>,
    tls: bool,
    media: MediaHandle,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl Node {
    /// Binds everything and starts serving. The config has been validated.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        // Media first: its sockets are what a second node on this host
        // would collide on, and the error should name them.
        let (mut registry, metrics) = crate::metrics::registry();
        let control_metrics = ControlMetrics::register(&mut registry);
        let mut sfu = SfuConfig::new(config.udp);
        sfu.mesh_recovery = config.mesh_recovery.core();
        sfu.candidates = config
            .public_ip
            .iter()
            .map(|ip| SocketAddr::new(*ip, config.udp.port()))
            .collect();
        sfu.keyframe_request_interval = config.pli_interval;
        sfu.codecs = config.codecs.clone();
        sfu.max_peers = config.max_sessions;
        // Quotas count node-wide: every shard's core clones this config,
        // and with it one ledger.
        sfu.quotas = ridge_sfu::QuotaConfig {
            node_sessions: config.max_sessions,
            per_identity: config.limits.per_identity,
            per_token: config.limits.per_token,
        };
        sfu.handshake_timeout = config.limits.handshake_timeout;
        sfu.ice_consent_timeout = config.limits.ice_consent_timeout;
        sfu.rtp_consent_timeout = config.limits.rtp_consent_timeout;
        sfu.rtp_allow_networks = config.limits.rtp_allow_networks.clone();
        sfu.rtp_trusted_networks = config.limits.rtp_trusted_networks.clone();
        sfu.seed = rand::random::<[u8; 32]>();
        let shard_opts = shard::ShardOptions {
            udp: config.udp,
            shards: config.shards,
            pin_cores: config.pin_cores,
            backend: config.io_backend.choice(),
            gso: config.udp_gso,
            shared_port: config.shard_ports == ShardPorts::Shared,
        };
        let (media, media_threads) = shard::spawn(&shard_opts, sfu, metrics.shard_counters())?;
        if let Some(shared) = media.shared_port() {
            registry.register_collector(Box::new(SteerCollector(shared.clone())));
        }
        // Holds a media handle: aborted with the other tasks at shutdown so
        // the shards can stop.
        let sweep_task = media
            .shared_port()
            .map(|shared| tokio::spawn(sweep_steering(media.clone(), shared.clone())));
        let udp_addr = media.local_addr();
        crate::metrics::register_shards(&mut registry, &media);
        // The kernel path needs the shards' ports; it never fails the start.
        let kernel = {
            let kc = config.kernel.clone();
            let m = media.clone();
            match tokio::task::spawn_blocking(move || KernelPath::start(&kc, &m)).await {
                Ok(k) => Arc::new(k),
                Err(_) => Arc::new(KernelPath::none()),
            }
        };
        crate::metrics::register_kernel(&mut registry, kernel.clone());
        let kernel_task = tokio::spawn(kernel.clone().run(media.clone()));

        let tcp =
            std::net::TcpListener::bind(config.http).map_err(|source| NodeError::BindHttp {
                addr: config.http,
                source,
            })?;
        tcp.set_nonblocking(true)
            .map_err(|source| NodeError::BindHttp {
                addr: config.http,
                source,
            })?;
        let http_addr = tcp.local_addr().map_err(|source| NodeError::BindHttp {
            addr: config.http,
            source,
        })?;
        let tls = match &config.tls {
            Some(t) => Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&t.cert, &t.key)
                    .await
                    .map_err(NodeError::Tls)?,
            ),
            None => None,
        };

        // The control socket binds with the other listeners, before anything
        // serves, so that a second node on the same path fails here.
        let control = match &config.control_socket {
            Some(path) => match ControlSocket::bind(path) {
                Ok(c) => Some(c),
                Err(ControlError::InUse { .. }) if config.control_socket_is_default => {
                    tracing::warn!(
                        path = %path.display(),
                        "the default control socket is held by another running node; \
                         this node runs without a control API (set control_socket)"
                    );
                    None
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let control_socket = control.as_ref().map(|c| c.path().to_owned());

        let hub = Arc::new(RoomHub::new(metrics.ws_resume_evicted.clone()));
        let hub_task = tokio::spawn(run_hub(hub.clone(), media.clone()));
        let draining = Arc::new(AtomicBool::new(false));
        let state = AppState {
            media: media.clone(),
            auth: Authenticator::from_config(&config),
            metrics: metrics.clone(),
            registry: Arc::new(registry),
            draining: draining.clone(),
            hub: hub.clone(),
            kernel: kernel.clone(),
            ready: Arc::default(),
            ws: Arc::new(WsLimits::new(config.ws.clone(), metrics.clone())),
        };
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let control_task = control.map(|control| {
            let state = ControlState {
                media: media.clone(),
                auth: state.auth.clone(),
                metrics: metrics.clone(),
                control_metrics,
                draining: draining.clone(),
                hub: hub.clone(),
                desired: Arc::new(Mutex::new(None)),
                max_sessions: config.max_sessions,
            };
            let mut stop = shutdown.subscribe();
            tokio::spawn(control.serve(state, async move {
                let _ = stop.wait_for(|v| *v).await;
            }))
        });
        let limits = config.http_limits.clone();
        if let Some(nofile) = crate::config::descriptor_limit()
            && limits.max_connections as u64 + 64 > nofile
        {
            tracing::warn!(
                max_connections = limits.max_connections,
                nofile,
                "http_max_connections is close to or above the descriptor limit \
                 (RLIMIT_NOFILE): accepts will fail with EMFILE before the cap refuses"
            );
        }
        let app = router(state)
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                limits.body_timeout,
            ))
            .into_make_service();
        let handle: Handle<NodeAddr> = Handle::new();
        let listener =
            tokio::net::TcpListener::from_std(tcp).map_err(|source| NodeError::BindHttp {
                addr: config.http,
                source,
            })?;
        let mut http_server = axum_server::Server::<NodeAddr>::from_listener(GuardedListener::new(
            listener,
            metrics.clone(),
        ));
        configure(http_server.http_builder(), &limits);
        let guard = GuardAcceptor::new(DefaultAcceptor, &limits, metrics.clone());
        let server = {
            let handle = handle.clone();
            let is_tls = tls.is_some();
            tokio::spawn(async move {
                let r = match tls {
                    Some(tls) => {
                        let acceptor = RustlsAcceptor::new(tls)
                            .handshake_timeout(limits.tls_handshake_timeout)
                            .acceptor(guard);
                        http_server
                            .acceptor(acceptor)
                            .handle(handle)
                            .serve(app)
                            .await
                    }
                    None => http_server.acceptor(guard).handle(handle).serve(app).await,
                };
                tracing::debug!(tls = is_tls, "HTTP server stopped");
                r.map_err(NodeError::Http)
            })
        };

        let drain_timeout = config.drain_timeout;
        let media2 = media.clone();
        let done = tokio::spawn(async move {
            let _ = shutdown_rx.wait_for(|v| *v).await;
            let started = Instant::now();
            tracing::info!(timeout = ?drain_timeout, "draining: refusing new sessions");
            draining.store(true, Ordering::Relaxed);
            metrics.draining.set(1);
            media2.drain().await;
            hub.shutdown_notice();
            loop {
                let sessions = media2.stats().await.map_or(0, |(_, n)| n);
                if sessions == 0 && hub.session_count() == 0 {
                    break;
                }
                if started.elapsed() >= drain_timeout {
                    tracing::warn!(
                        sessions,
                        "drain timeout reached; closing remaining sessions"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Back to userspace before the sessions close, so no packet is
            // forwarded for a session that is gone.
            kernel_task.abort();
            kernel.close();
            media2.close_all().await;
            if let Some(t) = control_task {
                // It stopped accepting when the drain began; let it finish.
                let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
            }
            handle.graceful_shutdown(Some(Duration::from_secs(1)));
            hub_task.abort();
            if let Some(t) = &sweep_task {
                t.abort();
            }
            let r = match server.await {
                Ok(r) => r,
                Err(_) => Ok(()),
            };
            // The media thread ends once every handle is gone: the router's
            // went with the server, the hub's with its task, `Node::wait`
            // drops its own before waiting here.
            drop(media2);
            let joined = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || {
                    media_threads.into_iter().all(|t| t.join().is_ok())
                }),
            )
            .await;
            if !matches!(joined, Ok(Ok(true))) {
                tracing::warn!("the media shards did not stop cleanly within 2 s");
            }
            tracing::info!(elapsed = ?started.elapsed(), "drained");
            r
        });

        Ok(Node {
            http_addr,
            udp_addr,
            control_socket,
            tls: config.tls.is_some(),
            media,
            shutdown,
            done,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The control API's socket, when this node serves one.
    pub fn control_socket(&self) -> Option<&std::path::Path> {
        self.control_socket.as_deref()
    }

    /// The base URL of the HTTP API, e.g. `http://127.0.0.1:8080`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    pub fn media(&self) -> &MediaHandle {
        &self.media
    }

    /// Starts the drain (as SIGTERM does).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the node has drained and stopped.
    pub async fn wait(self) -> Result<(), NodeError> {
        let Node { done, media, .. } = self;
        drop(media);
        match done.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

/// How often shared-port steering entries of gone sessions are looked for.
const STEERING_SWEEP: Duration = Duration::from_secs(5);

/// Expires steering entries whose session is gone (see
/// [`SharedPort::sweep`]); ends when the shards stop.
async fn sweep_steering(media: MediaHandle, shared: Arc<SharedPort>) {
    loop {
        tokio::time::sleep(STEERING_SWEEP).await;
        let Some(live) = media.remote_addrs().await else {
            return;
        };
        let live: std::collections::HashSet<SocketAddr> = live.into_iter().collect();
        let shared = shared.clone();
        let removed = tokio::task::spawn_blocking(move || shared.sweep(&live))
            .await
            .unwrap_or(0);
        if removed > 0 {
            tracing::debug!(removed, "expired steering entries of gone sessions");
        }
    }
}
