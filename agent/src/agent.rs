//! The agent's run loop: identity (load or enroll), then heartbeats, the
//! desired-state watch, link probes and `/metrics`, until shutdown.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::{Config, EXIT_ENROLL};
use crate::control::ControlClient;
use crate::discover::{self, Capabilities};
use crate::identity::{self, Identity, IdentityError, NodeKey};
use crate::load::{CpuSampler, RateMeter, Smoothed, cpu_times};
use crate::metrics::{self, Metrics, ResultLabels};
use crate::probe::{self, PeerLink, ProbeEngine, wire};
use crate::scheduler::{
    self, DesiredState, EnrollRequest, Heartbeat, SchedulerClient, SchedulerError, Watch,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const REDISCOVER_EVERY: Duration = Duration::from_secs(60);
/// The least time from one heartbeat to the next one sent early because a
/// link went down or came back up (a flapping link must not turn into a
/// heartbeat storm).
const LINK_CHANGE_GAP: Duration = Duration::from_millis(100);

/// Why the agent stopped or could not start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("enrollment refused by the scheduler: {code}: {message}")]
    EnrollRefused { code: String, message: String },
    #[error("the scheduler refused this node's stored credential ({code}: {message}); the identity in {} is not valid there: remove it and enroll again with a new bootstrap token", path.display())]
    CredentialRefused {
        code: String,
        message: String,
        path: std::path::PathBuf,
    },
    #[error("the identity in {} was issued by {stored}, not by the configured scheduler {configured}; remove it to enroll with the new scheduler", path.display())]
    OtherScheduler {
        path: std::path::PathBuf,
        stored: String,
        configured: String,
    },
    #[error("cannot read the scheduler CA {}: {source}", path.display())]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("stopped before enrollment finished")]
    Stopped,
}

impl AgentError {
    /// Process exit status: [`EXIT_ENROLL`] when the node's credentials are
    /// the problem (no, bad, expired or reused token; refused or tampered
    /// identity), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Identity(_)
            | Self::EnrollRefused { .. }
            | Self::CredentialRefused { .. }
            | Self::OtherScheduler { .. } => EXIT_ENROLL,
            _ => 1,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// State the loops share.
#[derive(Debug)]
struct Shared {
    config: Config,
    identity: Identity,
    client: SchedulerClient,
    control: Option<ControlClient>,
    metrics: Metrics,
    probe: Arc<ProbeEngine>,
    /// The last desired state received from the scheduler.
    desired: Mutex<Option<DesiredState>>,
    /// Wakes the applier.
    apply_now: Notify,
    fatal: watch::Sender<Option<String>>,
    ready: Arc<Readiness>,
}

/// What `/readyz` on the metrics listener answers from: ready once the node
/// is enrolled and, when a control socket is configured, the dataplane
/// accepted the last desired state the agent tried to apply (at least
/// one); not ready after a fatal error.
#[derive(Debug, Default)]
pub struct Readiness {
    enrolled: AtomicBool,
    needs_dataplane: AtomicBool,
    applied: AtomicBool,
    failed: AtomicBool,
}

impl Readiness {
    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.enrolled.load(Ordering::Acquire)
            && !self.failed.load(Ordering::Acquire)
            && (!self.needs_dataplane.load(Ordering::Acquire)
                || self.applied.load(Ordering::Acquire))
    }
}

/// The metrics listener's routes: `/metrics`, and the probes `/livez`
/// (200 while the process serves) and `/readyz` (200 or 503, see
/// [`Readiness`]), status codes only.
fn metrics_app(registry: Arc<Registry>, ready: Arc<Readiness>) -> axum::Router {
    use axum::http::StatusCode;
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let reg = registry.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics::encode(&reg),
                    )
                }
            }),
        )
        .route("/livez", axum::routing::get(|| async { StatusCode::OK }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
}

/// A running agent.
#[derive(Debug)]
pub struct RunningAgent {
    pub node_id: String,
    /// Whether this start enrolled (false: the stored identity was reused).
    pub enrolled_now: bool,
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub probe_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    fatal: watch::Receiver<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Loads the identity or enrolls, binds, and starts every loop. `env_token`
/// is the value of `RIDGE_BOOTSTRAP_TOKEN`, if set.
pub async fn start(config: Config, env_token: Option<String>) -> Result<RunningAgent, AgentError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (registry, metrics) = metrics::registry();
    // Bind first, so that a port conflict does not use up a bootstrap token.
    let probe_socket =
        std::net::UdpSocket::bind(config.probe_listen).map_err(|source| AgentError::Bind {
            what: "the probe responder",
            addr: config.probe_listen,
            source,
        })?;
    let probe_addr = probe_socket
        .local_addr()
        .map_err(|source| AgentError::Bind {
            what: "the probe responder",
            addr: config.probe_listen,
            source,
        })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| AgentError::Bind {
                    what: "the metrics listener",
                    addr,
                    source,
                })?;
            Some(l)
        }
        None => None,
    };
    // Serve the metrics listener (and its probes) from now on, enrollment
    // included: /readyz says 503 until the node is enrolled.
    let registry = Arc::new(registry);
    let ready = Arc::new(Readiness::default());
    ready
        .needs_dataplane
        .store(config.control_socket.is_some(), Ordering::Release);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let metrics_addr = match metrics_listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| AgentError::Bind {
                what: "the metrics listener",
                addr: config.metrics_listen.unwrap_or(probe_addr),
                source,
            })?;
            let app = metrics_app(registry.clone(), ready.clone());
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                // Ends when `stop` turns true or is dropped (a failed start).
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|v| *v).await;
                    })
                    .await;
            }));
            addr
        }
        None => None,
    };
    let ca = std::fs::read(&config.scheduler_ca).map_err(|source| AgentError::Ca {
        path: config.scheduler_ca.clone(),
        source,
    })?;
    let client = SchedulerClient::new(&config.scheduler_url, &ca)?;

    let (identity, enrolled_now) = match identity::load(&config.state_dir)? {
        Some(id) => {
            if id.scheduler_url != config.scheduler_url {
                return Err(AgentError::OtherScheduler {
                    path: identity::identity_path(&config.state_dir),
                    stored: id.scheduler_url,
                    configured: config.scheduler_url.clone(),
                });
            }
            tracing::info!(node = %id.node_id, "reusing the stored identity");
            (id, false)
        }
        None => (enroll(&config, &client, &metrics, env_token).await?, true),
    };
    metrics.enrolled.set(1);
    ready.enrolled.store(true, Ordering::Release);

    let probe = ProbeEngine::from_socket(
        probe_socket,
        &identity.node_id,
        metrics.clone(),
        probe::loss_timeout(config.probe_interval),
        probe::down_after(config.probe_interval),
    )
    .map_err(|source| AgentError::Bind {
        what: "the probe responder",
        addr: probe_addr,
        source,
    })?;
    let (fatal_tx, fatal) = watch::channel(None);
    let shared = Arc::new(Shared {
        control: config.control_socket.as_deref().map(ControlClient::new),
        config,
        identity,
        client,
        metrics: metrics.clone(),
        probe: probe.clone(),
        desired: Mutex::new(None),
        apply_now: Notify::new(),
        fatal: fatal_tx,
        ready,
    });
    // The probe loops hold nothing in flight: they simply stop.
    for task in [
        Box::pin(probe.clone().run_receiver())
            as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        Box::pin(probe.clone().run_prober(shared.config.probe_interval)),
    ] {
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                _ = rx.wait_for(|v| *v) => {}
            }
        }));
    }
    tasks.push(tokio::spawn(heartbeat_loop(
        shared.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(watch_loop(shared.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(apply_loop(shared.clone(), stop_rx)));
    Ok(RunningAgent {
        node_id: shared.identity.node_id.clone(),
        enrolled_now,
        metrics,
        registry,
        probe_addr,
        metrics_addr,
        shared,
        stop,
        fatal,
        tasks,
    })
}

async fn enroll(
    config: &Config,
    client: &SchedulerClient,
    metrics: &Metrics,
    env_token: Option<String>,
) -> Result<Identity, AgentError> {
    let (token, source) = identity::find_token(
        config.token_file.as_deref(),
        env_token,
        &config.cmdline_path,
    )?;
    let key = NodeKey::generate()?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let req = EnrollRequest {
        bootstrap_token: token.0.clone(),
        public_key: scheduler::PublicKey {
            alg: "ed25519".into(),
            key: key.public_b64(),
        },
        proof: key.enroll_proof(&token.0),
        hostname,
        version: VERSION.into(),
    };
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let resp = loop {
        match client.enroll(&req).await {
            Ok(r) => break r,
            Err(SchedulerError::Refused { code, message }) => {
                metrics
                    .enrollments
                    .get_or_create(&ResultLabels { result: "refused" })
                    .inc();
                return Err(AgentError::EnrollRefused { code, message });
            }
            Err(e) => {
                metrics
                    .enrollments
                    .get_or_create(&ResultLabels { result: "failed" })
                    .inc();
                let d = backoff.next_random();
                tracing::warn!(error = %e, retry_in = ?d, "enrollment failed; retrying");
                tokio::time::sleep(d).await;
            }
        }
    };
    metrics
        .enrollments
        .get_or_create(&ResultLabels { result: "ok" })
        .inc();
    let id = Identity::new(
        &key,
        resp.node_id,
        resp.node_token,
        resp.node_token_expires_at,
        config.scheduler_url.clone(),
        resp.region,
        resp.labels,
        resp.heartbeat_interval_ms,
        resp.lease_misses,
        unix_now(),
    );
    let path = identity::store(&config.state_dir, &id)?;
    tracing::info!(node = %id.node_id, token_from = ?source, identity = %path.display(), "enrolled");
    Ok(id)
}

impl Shared {
    fn fail(&self, e: AgentError) {
        tracing::error!(error = %e, "fatal");
        self.ready.failed.store(true, Ordering::Release);
        let _ = self.fatal.send(Some(e.to_string()));
    }

    fn credential_refused(&self, code: String, message: String) -> AgentError {
        AgentError::CredentialRefused {
            code,
            message,
            path: identity::identity_path(&self.config.state_dir),
        }
    }

    /// Everything the agent measures: its mesh links and the probe-only
    /// peers the scheduler lists.
    fn links_from(&self, d: &DesiredState) -> Vec<PeerLink> {
        d.links
            .iter()
            .chain(&d.probes)
            .filter_map(|l| {
                let key = wire::parse_key(&l.key)?;
                let target = l
                    .address
                    .as_deref()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .and_then(|a| {
                        let port = a.port().checked_add(self.config.probe_port_offset)?;
                        Some(SocketAddr::new(a.ip(), port))
                    });
                Some(PeerLink {
                    peer: l.peer.clone(),
                    key,
                    target,
                })
            })
            .collect()
    }
}

/// Samples for load rates between heartbeats.
#[derive(Debug)]
struct LoadMeters {
    cpu: CpuSampler,
    /// The CPU figure reported: averaged, since routes are computed on it.
    cpu_avg: Smoothed,
    packets: RateMeter,
    bytes: RateMeter,
}

/// Time constant of the reported CPU load.
const CPU_SMOOTHING: Duration = Duration::from_secs(5);

impl Default for LoadMeters {
    fn default() -> Self {
        Self {
            cpu: CpuSampler::default(),
            cpu_avg: Smoothed::new(CPU_SMOOTHING),
            packets: RateMeter::default(),
            bytes: RateMeter::default(),
        }
    }
}

async fn heartbeat_loop(s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut interval = Duration::from_millis(s.identity.heartbeat_interval_ms.max(50));
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut meters = LoadMeters::default();
    let mut caps: Option<(Instant, Capabilities)> = None;
    loop {
        if caps
            .as_ref()
            .is_none_or(|(t, _)| t.elapsed() > REDISCOVER_EVERY)
            && let Ok(c) = tokio::task::spawn_blocking(discover::discover).await
        {
            caps = Some((Instant::now(), c));
        }
        let hb = build_heartbeat(&s, caps.as_ref().map(|(_, c)| c), &mut meters).await;
        let reported_dead: BTreeSet<&str> = hb
            .links
            .iter()
            .filter(|l| l.loss >= 1.0)
            .map(|l| l.peer.as_str())
            .collect();
        let sent = tokio::time::Instant::now();
        let (delay, early) = match s
            .client
            .heartbeat(&s.identity.node_id, &s.identity.node_token, &hb)
            .await
        {
            Ok(r) => {
                s.metrics.heartbeat("ok");
                backoff.reset();
                interval = Duration::from_millis(r.heartbeat_interval_ms.max(50));
                s.metrics.watch_version.set(r.desired_version as i64);
                (interval, true)
            }
            Err(SchedulerError::Refused { code, message }) => {
                s.metrics.heartbeat("failed");
                s.fail(s.credential_refused(code, message));
                return;
            }
            Err(e) => {
                s.metrics.heartbeat("failed");
                s.metrics.scheduler_error("heartbeat");
                // Retry sooner than the interval, never later: the lease.
                let d = backoff.next_random().min(interval);
                tracing::warn!(error = %e, retry_in = ?d, "heartbeat failed");
                (d, false)
            }
        };
        // The next heartbeat goes after `delay`, or as soon as a link went
        // down or came back up since this one (not while retrying failures),
        // so that routes leave a dead peer without waiting for its lease.
        let next = sent + delay;
        let mut at = next;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                () = s.probe.link_changed(), if early => {
                    let dead = s.probe.dead_links();
                    if dead.iter().map(String::as_str).eq(reported_dead.iter().copied()) {
                        // Already in the heartbeat just sent.
                        continue;
                    }
                    tracing::debug!(?dead, "link state changed: heartbeat now");
                    at = (sent + LINK_CHANGE_GAP).min(next);
                    s.metrics.heartbeats_early.inc();
                    break;
                }
                _ = stop.wait_for(|v| *v) => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
    }
}

async fn build_heartbeat(
    s: &Shared,
    caps: Option<&Capabilities>,
    meters: &mut LoadMeters,
) -> Heartbeat {
    let now = Instant::now();
    let status = match &s.control {
        Some(c) => match c.status().await {
            Ok(st) => Some(st),
            Err(e) => {
                s.metrics.control_error("status");
                tracing::debug!(error = %e, "dataplane status unavailable");
                None
            }
        },
        None => None,
    };
    // A restarted dataplane lost its desired state: apply it again.
    if let (Some(st), Some(held)) = (
        &status,
        s.desired.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
    ) && st.desired_version != Some(held.version)
    {
        s.apply_now.notify_one();
    }
    let cpu = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| cpu_times(&t))
        .and_then(|t| meters.cpu.update(t))
        .map_or(0.0, |c| meters.cpu_avg.update(now, c));
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| discover::meminfo(&t))
        .map_or(0.0, |m| m.used());
    let mut load = scheduler::Load {
        cpu,
        memory,
        ..Default::default()
    };
    let mut rooms = Vec::new();
    let media = s
        .config
        .media_address
        .map(|a| a.to_string())
        .or_else(|| status.as_ref().map(|st| st.media.clone()));
    if let Some(st) = &status {
        load.sessions = st.sessions;
        load.pps = meters
            .packets
            .update(now, st.packets_in + st.packets_out)
            .unwrap_or(0.0) as u64;
        load.bandwidth_bps = (meters
            .bytes
            .update(now, st.bytes_in + st.bytes_out)
            .unwrap_or(0.0)
            * 8.0) as u64;
        rooms = st
            .rooms
            .iter()
            .filter(|r| r.participants > 0)
            .map(|r| {
                // The dataplane counts participants and tracks per room;
                // a room with tracks has (at least) one local publisher.
                let publishers = u32::from(r.tracks > 0);
                scheduler::RoomReport {
                    room: r.room.clone(),
                    publishers,
                    subscribers: (r.participants as u32).saturating_sub(publishers),
                }
            })
            .collect();
    }
    let capabilities = caps
        .map(|c| scheduler::Capabilities {
            cores: c.cores,
            memory_bytes: c.memory_bytes,
            nics: c
                .nics
                .iter()
                .map(|n| scheduler::Nic {
                    name: n.name.clone(),
                    speed_mbps: n.speed_mbps,
                    mac: n.mac.clone(),
                    mtu: n.mtu,
                    addresses: n.addresses.clone(),
                })
                .collect(),
            xdp_mode: Some(c.xdp.mode().to_owned()),
            io_uring: c.io_uring,
            gpus: c
                .gpus
                .iter()
                .map(|g| scheduler::Gpu {
                    model: g.model.clone(),
                    nvenc: g.nvenc,
                    nvdec: g.nvdec,
                })
                .collect(),
            vaapi: c.vaapi,
            max_sessions: status.as_ref().map_or(0, |st| st.max_sessions),
        })
        .unwrap_or_default();
    let links = s
        .probe
        .measures()
        .into_iter()
        .map(|(peer, m)| scheduler::LinkReport {
            peer,
            rtt_ms: m.rtt_ms,
            loss: m.loss.clamp(0.0, 1.0),
            jitter_ms: m.jitter_ms,
        })
        .collect();
    Heartbeat {
        version: VERSION.into(),
        addresses: scheduler::Addresses {
            mesh: s
                .config
                .mesh_address
                .map(|a| a.to_string())
                .or_else(|| media.clone()),
            media,
            http: s.config.http_url.clone(),
        },
        capabilities,
        load,
        links,
        rooms,
    }
}

async fn watch_loop(s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Resume from what the dataplane holds, so a restarted agent does not
    // re-send a state the node already has.
    let mut since = match &s.control {
        Some(c) => match c.held().await {
            Ok(h) => h.map_or(0, |h| h.version),
            Err(e) => {
                s.metrics.control_error("get_desired");
                tracing::debug!(error = %e, "cannot read the dataplane's desired state");
                0
            }
        },
        None => 0,
    };
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        let poll = s.client.watch(
            &s.identity.node_id,
            &s.identity.node_token,
            since,
            s.config.watch_wait,
        );
        let r = tokio::select! {
            r = poll => r,
            _ = stop.wait_for(|v| *v) => return,
        };
        match r {
            Ok(Watch::Changed(d)) => {
                backoff.reset();
                since = d.version;
                s.metrics.watch_version.set(d.version as i64);
                s.probe.set_links(s.links_from(&d));
                tracing::info!(
                    version = d.version,
                    drain = d.drain,
                    links = d.links.len(),
                    routes = d.routes.len(),
                    "desired state received"
                );
                *s.desired.lock().unwrap_or_else(|e| e.into_inner()) = Some(*d);
                s.apply_now.notify_one();
            }
            Ok(Watch::Unchanged(_)) => backoff.reset(),
            Err(SchedulerError::Refused { code, message }) => {
                s.fail(s.credential_refused(code, message));
                return;
            }
            Err(e) => {
                s.metrics.scheduler_error("watch");
                let d = backoff.next_random();
                tracing::warn!(error = %e, retry_in = ?d, "desired-state watch failed");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.wait_for(|v| *v) => return,
                }
            }
        }
    }
}

async fn apply_loop(s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(control) = s.control.clone() else {
        return;
    };
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        tokio::select! {
            _ = s.apply_now.notified() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        loop {
            let Some(d) = s.desired.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                break;
            };
            match control.apply(&d).await {
                Ok(answer) => {
                    backoff.reset();
                    s.metrics.applied_version.set(d.version as i64);
                    s.ready.applied.store(true, Ordering::Release);
                    tracing::info!(version = d.version, not_applied = %answer["not_applied"], "desired state applied to the dataplane");
                    break;
                }
                Err(e) => {
                    s.metrics.control_error("put_desired");
                    s.ready.applied.store(false, Ordering::Release);
                    let delay = backoff.next_random();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot apply the desired state to the dataplane");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = s.apply_now.notified() => {}
                        _ = stop.wait_for(|v| *v) => return,
                    }
                }
            }
        }
    }
}

impl RunningAgent {
    /// Resolves with the message of a fatal error (e.g. the scheduler
    /// refused the credential); never resolves while all is well.
    pub async fn failed(&mut self) -> String {
        loop {
            if let Some(m) = self.fatal.borrow().clone() {
                return m;
            }
            if self.fatal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The probe engine (tests inspect it).
    pub fn probe(&self) -> &Arc<ProbeEngine> {
        &self.shared.probe
    }

    /// Stops every loop; waits up to `drain_timeout` for in-flight calls
    /// (an apply to the dataplane, the metrics server) to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + self.shared.config.drain_timeout;
        for mut t in self.tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}
