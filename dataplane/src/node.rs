//! Assembles a running node from a validated [`Config`]: binds the sockets,
//! starts the media thread, the room hub and the HTTP server, and runs the
//! bounded drain on shutdown. Used by `main` and by in-process tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum_server::Handle;
use ridge_sfu::SfuConfig;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::http::{AppState, router};
use crate::kernel::KernelPath;
use crate::media::{self, MediaHandle};
use crate::ws::{RoomHub, run_hub};

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
    Media(#[from] crate::media::MediaError),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    http_addr: SocketAddr,
    udp_addr: SocketAddr,
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
        let (registry, metrics) = crate::metrics::registry();
        let mut sfu = SfuConfig::new(config.udp);
        sfu.candidates = config
            .public_ip
            .iter()
            .map(|ip| SocketAddr::new(*ip, config.udp.port()))
            .collect();
        sfu.keyframe_request_interval = config.pli_interval;
        sfu.max_peers = config.max_sessions;
        sfu.seed = rand::random::<u64>() | 1;
        let shard_opts = media::ShardOptions {
            udp: config.udp,
            shards: config.shards,
            pin_cores: config.pin_cores,
            backend: config.io_backend.choice(),
        };
        let (media, media_threads) = media::spawn(&shard_opts, sfu, metrics.clone())?;
        let udp_addr = media.local_addr();
        metrics.set_shards(&media);
        // The kernel path needs the shards' ports; it never fails the start.
        let kernel = {
            let kc = config.kernel.clone();
            let m = media.clone();
            match tokio::task::spawn_blocking(move || KernelPath::start(&kc, &m)).await {
                Ok(k) => Arc::new(k),
                Err(_) => Arc::new(KernelPath::none()),
            }
        };
        metrics.set_kernel(kernel.clone());
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

        let hub = Arc::new(RoomHub::default());
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
        };
        let app = router(state).into_make_service();
        let handle: Handle<SocketAddr> = Handle::new();
        let server = {
            let handle = handle.clone();
            let is_tls = tls.is_some();
            tokio::spawn(async move {
                let r = match tls {
                    Some(tls) => {
                        axum_server::from_tcp_rustls(tcp, tls)
                            .map_err(NodeError::Http)?
                            .handle(handle)
                            .serve(app)
                            .await
                    }
                    None => {
                        axum_server::from_tcp(tcp)
                            .map_err(NodeError::Http)?
                            .handle(handle)
                            .serve(app)
                            .await
                    }
                };
                tracing::debug!(tls = is_tls, "HTTP server stopped");
                r.map_err(NodeError::Http)
            })
        };

        let (shutdown, mut shutdown_rx) = watch::channel(false);
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
            handle.graceful_shutdown(Some(Duration::from_secs(1)));
            hub_task.abort();
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
