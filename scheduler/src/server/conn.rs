//! The connection layer under the HTTPS API: the accept loop, the caps on
//! open connections (in total and per source address), the TLS handshake
//! timeout, HTTP/1.1 and HTTP/2 serving (hyper) with header-read and idle
//! timeouts, and the drain on shutdown.
//!
//! Every limit is in [`crate::config::Limits`]; docs/operations.md ("Limits
//! and abuse") lists them with their metrics.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::metrics::{KindLabels, Metrics, PhaseLabels, ReasonLabels};
use crate::service::Scheduler;

/// First pause after an accept failure for lack of descriptors or memory.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one accept-failure log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// After an idle or header timeout, how long a connection gets to close
/// cleanly before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Largest HTTP/1.1 read buffer (request line and headers must fit).
const MAX_H1_BUF: usize = 64 * 1024;
/// Largest HTTP/2 header list.
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;
/// Concurrent HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 64;

/// Open connections, in total and by source address. Entries are removed
/// when their count drops to 0, so the map holds at most `max_total` keys.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Total,
    PerSource,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerSource => "per_source",
        }
    }
}

#[derive(Debug)]
struct Table {
    max_total: usize,
    max_per_source: usize,
    counts: watch::Sender<Counts>,
    metrics: Metrics,
}

/// One admitted connection; gives its place back on drop.
#[derive(Debug)]
struct Slot {
    table: Arc<Table>,
    source: IpAddr,
}

impl Table {
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refusal> {
        let source = source.to_canonical();
        let mut refused = None;
        self.counts.send_if_modified(|c| {
            if c.total >= self.max_total {
                refused = Some(Refusal::Total);
                return false;
            }
            let n = c.by_source.entry(source).or_insert(0);
            if *n >= self.max_per_source {
                refused = Some(Refusal::PerSource);
                return false;
            }
            *n += 1;
            c.total += 1;
            true
        });
        if let Some(r) = refused {
            return Err(r);
        }
        self.metrics.connections.inc();
        Ok(Slot {
            table: self.clone(),
            source,
        })
    }

    /// Resolves once no connection is open.
    async fn drained(&self) {
        let mut rx = self.counts.subscribe();
        let _ = rx.wait_for(|c| c.total == 0).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.counts.send_modify(|c| {
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_source.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_source.remove(&self.source);
                }
            }
        });
        self.table.metrics.connections.dec();
    }
}

/// What a connection is doing, for the idle timeout: requests in flight,
/// and when the last one ended (milliseconds since `born`).
#[derive(Debug)]
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    started: AtomicUsize,
    idle_since_ms: AtomicU64,
}

/// A request in flight; ends it on drop (also when hyper drops the
/// request's future because the peer went away).
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long no request has been in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accept failure log line per [`LOG_EVERY`], with the count of the
/// ones it stood for.
#[derive(Debug, Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// `Some(suppressed since the last line)` when a line may be written.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `(metric label, back off?)` for an accept error. Running out of
/// descriptors or kernel memory calls for a pause (the pending connection
/// stays in the backlog and the next accept would fail at once); the rest
/// concern one connection that is already gone.
fn classify(e: &std::io::Error) -> (&'static str, bool) {
    match e.raw_os_error() {
        Some(libc::EMFILE) => ("emfile", true),
        Some(libc::ENFILE) => ("enfile", true),
        Some(libc::ENOBUFS | libc::ENOMEM) => ("nomem", true),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO) => ("aborted", false),
        _ => ("other", true),
    }
}

/// Everything a connection task needs.
pub(super) struct Serve {
    sched: Arc<Scheduler>,
    app: Router,
    tls: tokio_rustls::TlsAcceptor,
    table: Arc<Table>,
    http: auto::Builder<TokioExecutor>,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Serve {
    pub(super) fn new(
        sched: Arc<Scheduler>,
        app: Router,
        tls: tokio_rustls::TlsAcceptor,
        max_connections: usize,
    ) -> Arc<Self> {
        let limits = &sched.config.limits;
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_H1_BUF);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(MAX_H2_HEADER_LIST);
        let table = Arc::new(Table {
            max_total: max_connections,
            max_per_source: limits.max_connections_per_source,
            counts: watch::Sender::new(Counts::default()),
            metrics: sched.metrics.clone(),
        });
        tracing::debug!(
            max_connections,
            max_connections_per_source = limits.max_connections_per_source,
            "connection limits"
        );
        Arc::new(Self {
            sched,
            app,
            tls,
            table,
            http,
        })
    }

    /// Accepts until `stop` turns true, then lets the open connections
    /// finish (each closes gracefully, dropped after the drain timeout).
    pub(super) async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
    ) {
        let m = &self.sched.metrics;
        let mut backoff = MIN_BACKOFF;
        let mut log = LogLimit::default();
        let mut refused_log = LogLimit::default();
        let (conn_stop, conn_stop_rx) = watch::channel(false);
        loop {
            let accepted = tokio::select! {
                r = stop.wait_for(|s| *s) => { let _ = r; break; }
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = MIN_BACKOFF;
                    match self.table.admit(peer.ip()) {
                        Ok(slot) => {
                            let this = self.clone();
                            let stop = conn_stop_rx.clone();
                            tokio::spawn(
                                async move { this.serve_one(tcp, peer, slot, stop).await },
                            );
                        }
                        Err(r) => {
                            m.connections_refused
                                .get_or_create(&ReasonLabels { reason: r.reason() })
                                .inc();
                            if let Some(suppressed) = refused_log.ready() {
                                tracing::warn!(
                                    source = %peer.ip(),
                                    reason = r.reason(),
                                    suppressed,
                                    "connection refused: connection cap reached"
                                );
                            }
                            drop(tcp);
                        }
                    }
                }
                Err(e) => {
                    let (kind, pause) = classify(&e);
                    m.accept_errors.get_or_create(&KindLabels { kind }).inc();
                    if let Some(suppressed) = log.ready() {
                        tracing::warn!(
                            error = %e,
                            kind,
                            suppressed,
                            open = self.table.counts.borrow().total,
                            backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                            "accept failed; backing off and serving the open connections"
                        );
                    }
                    if pause {
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            r = stop.wait_for(|s| *s) => { let _ = r; break; }
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        drop(listener);
        let _ = conn_stop.send(true);
        self.table.drained().await;
    }

    async fn serve_one(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        mut stop: watch::Receiver<bool>,
    ) {
        let _slot = slot;
        let limits = &self.sched.config.limits;
        let m = &self.sched.metrics;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::select! {
            r = tokio::time::timeout(limits.tls_handshake_timeout, self.tls.accept(tcp)) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    m.tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    m.connection_timeouts.get_or_create(&PhaseLabels { phase: "tls_handshake" }).inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let activity = Arc::new(Activity::new());
        let svc = {
            let app = self.app.clone();
            let activity = activity.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let busy = activity.begin();
                req.extensions_mut().insert(ConnectInfo(peer));
                let fut = app.clone().oneshot(req.map(Body::new));
                async move {
                    let r = fut.await;
                    drop(busy);
                    r
                }
            })
        };
        let conn = self.http.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let check = (limits.idle_timeout.min(limits.header_read_timeout) / 4)
            .clamp(Duration::from_millis(25), Duration::from_secs(1));
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut close_by: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r
                        && e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
                    {
                        m.connection_timeouts.get_or_create(&PhaseLabels { phase: "header" }).inc();
                        tracing::debug!(%peer, "request headers timed out");
                    }
                    break;
                }
                r = stop.wait_for(|s| *s), if close_by.is_none() => {
                    let _ = r;
                    conn.as_mut().graceful_shutdown();
                    close_by = Some(tokio::time::Instant::now() + self.sched.config.drain_timeout);
                }
                _ = tick.tick() => {
                    if let Some(t) = close_by {
                        if tokio::time::Instant::now() >= t {
                            break;
                        }
                        continue;
                    }
                    // Before its first request a connection has the header
                    // timeout (hyper only starts its own once it knows the
                    // protocol); afterwards, the idle timeout.
                    let (limit, phase) = if activity.started.load(Ordering::Relaxed) == 0 {
                        (limits.header_read_timeout, "header")
                    } else {
                        (limits.idle_timeout, "idle")
                    };
                    if activity.idle_for() >= limit {
                        m.connection_timeouts.get_or_create(&PhaseLabels { phase }).inc();
                        tracing::debug!(%peer, phase, "closing a connection with no request in flight");
                        conn.as_mut().graceful_shutdown();
                        close_by = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}
