//! The edges of the HTTP(S) listener that axum-server and hyper do not
//! cover themselves: an accept loop that survives running out of
//! descriptors (logs once a second, counts, backs off, keeps serving what
//! it has), caps on concurrent connections per source address and in
//! total (refused connections are closed at once and counted), and an idle
//! timeout on every connection's I/O (WebSocket sockets included).
//!
//! What the libraries do: hyper's `header_read_timeout` (which also bounds
//! the wait for the next request on a kept-alive connection), axum-server's
//! TLS handshake timeout, tower-http's request-body timeout; [`configure`]
//! sets the hyper side.

use std::collections::HashMap;
use std::future::{Future, Ready};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum_server::accept::Accept;
use futures_util::future::Either;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::HttpLimits;
use crate::metrics::{KindLabels, LimitLabels, Metrics};

/// Backoff of the accept loop after a failed accept: doubled per failure.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per kind of trouble in this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Sets hyper's timeouts on the server's connection builder.
pub fn configure(builder: &mut Builder<TokioExecutor>, limits: &HttpLimits) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.header_timeout);
}

/// Logs at most once per [`LOG_EVERY`], saying how many were held back.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Mutex<Option<(Instant, u64)>>,
}

impl RateLimitedLog {
    /// `Some(suppressed)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *last {
            Some((at, held)) if at.elapsed() < LOG_EVERY => {
                *held += 1;
                None
            }
            slot => {
                let held = slot.map_or(0, |(_, h)| h);
                *slot = Some((Instant::now(), 0));
                Some(held)
            }
        }
    }
}

/// The listener's address type: a socket address, accepted by
/// [`GuardedListener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAddr(pub SocketAddr);

impl axum_server::Address for NodeAddr {
    type Stream = TcpStream;
    type Listener = GuardedListener;
}

/// A TCP listener whose accept never fails: a failed accept is counted,
/// logged (rate-limited) and retried after a growing backoff.
#[derive(Debug)]
pub struct GuardedListener {
    inner: TcpListener,
    metrics: Metrics,
    log: RateLimitedLog,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, metrics: Metrics) -> Self {
        Self {
            inner,
            metrics,
            log: RateLimitedLog::default(),
        }
    }
}

fn accept_error_kind(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(n) if n == nix::errno::Errno::EMFILE as i32 => "emfile",
        Some(n) if n == nix::errno::Errno::ENFILE as i32 => "enfile",
        Some(n)
            if n == nix::errno::Errno::ENOBUFS as i32 || n == nix::errno::Errno::ENOMEM as i32 =>
        {
            "nomem"
        }
        _ => "other",
    }
}

impl axum_server::AddrListener<TcpStream, NodeAddr> for GuardedListener {
    async fn bind_to(addr: NodeAddr) -> io::Result<Self> {
        Err(io::Error::other(format!(
            "GuardedListener wraps a bound listener; {} was not bound",
            addr.0
        )))
    }

    async fn accept_stream(&self) -> io::Result<(TcpStream, NodeAddr)> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return Ok((stream, NodeAddr(addr))),
                Err(e) => {
                    let kind = accept_error_kind(&e);
                    self.metrics
                        .http_accept_errors
                        .get_or_create(&KindLabels { kind })
                        .inc();
                    if let Some(held) = self.log.allow() {
                        if matches!(kind, "emfile" | "enfile") {
                            tracing::warn!(
                                error = %e,
                                kind,
                                held_back = held,
                                "HTTP accept: out of file descriptors; backing off and \
                                 serving the open connections (raise LimitNOFILE / ulimit -n, \
                                 or lower http_max_connections)"
                            );
                        } else {
                            tracing::warn!(error = %e, kind, held_back = held, "HTTP accept failed; backing off");
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn get_local_addr(&self) -> io::Result<NodeAddr> {
        self.inner.local_addr().map(NodeAddr)
    }
}

/// Open connections, in total and per source address. Entries exist only
/// for addresses with an open connection: the table is bounded by the
/// total cap.
#[derive(Debug)]
struct ConnTable {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: Metrics,
    log: RateLimitedLog,
}

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut open = self.lock();
        let limit = if open.0 >= self.max_total {
            Some("total")
        } else if open.1.get(&ip).copied().unwrap_or(0) >= self.max_per_source {
            Some("per_source")
        } else {
            None
        };
        if let Some(limit) = limit {
            drop(open);
            self.metrics
                .http_connections_refused
                .get_or_create(&LimitLabels { limit })
                .inc();
            if let Some(held) = self.log.allow() {
                tracing::warn!(
                    source = %ip,
                    limit,
                    held_back = held,
                    max_connections = self.max_total,
                    max_connections_per_source = self.max_per_source,
                    "HTTP connection limit reached; closing the new connection"
                );
            }
            return Err(limit);
        }
        open.0 += 1;
        *open.1.entry(ip).or_insert(0) += 1;
        self.metrics.http_connections.inc();
        Ok(Slot {
            table: self.clone(),
            ip,
        })
    }
}

/// One connection's place in the table, given back on drop.
#[derive(Debug)]
struct Slot {
    table: Arc<ConnTable>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
        self.table.metrics.http_connections.dec();
    }
}

/// Admits connections under the caps and wraps them in [`GuardedStream`],
/// then hands them to `inner` (the TLS acceptor, or none).
#[derive(Debug, Clone)]
pub struct GuardAcceptor<A> {
    inner: A,
    table: Arc<ConnTable>,
    idle: Duration,
    first_byte: Duration,
}

impl<A> GuardAcceptor<A> {
    pub fn new(inner: A, limits: &HttpLimits, metrics: Metrics) -> Self {
        Self {
            inner,
            table: Arc::new(ConnTable {
                max_total: limits.max_connections,
                max_per_source: limits.max_connections_per_source,
                open: Mutex::new((0, HashMap::new())),
                metrics,
                log: RateLimitedLog::default(),
            }),
            idle: limits.idle_timeout,
            first_byte: limits.header_timeout,
        }
    }
}

type Refused<T> = Ready<io::Result<T>>;

impl<A, S> Accept<TcpStream, S> for GuardAcceptor<A>
where
    A: Accept<GuardedStream, S>,
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future = Either<Refused<(A::Stream, A::Service)>, A::Future>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let ip = match stream.peer_addr() {
            Ok(a) => a.ip(),
            Err(e) => return Either::Left(std::future::ready(Err(e))),
        };
        match self.table.admit(ip) {
            // Dropping the stream closes it at once.
            Err(limit) => Either::Left(std::future::ready(Err(io::Error::other(format!(
                "connection limit ({limit})"
            ))))),
            Ok(slot) => Either::Right(self.inner.accept(
                GuardedStream {
                    inner: stream,
                    _slot: slot,
                    idle: self.idle,
                    first_byte: Some(self.first_byte),
                    last: Instant::now(),
                    timer: Box::pin(tokio::time::sleep(self.first_byte.min(self.idle))),
                    timeouts: self.table.metrics.clone(),
                },
                service,
            )),
        }
    }
}

/// A connection that holds its place in the caps and fails its I/O once
/// no byte was read or written for the idle timeout.
#[derive(Debug)]
pub struct GuardedStream {
    inner: TcpStream,
    _slot: Slot,
    idle: Duration,
    /// Until the first byte arrives the window is the header timeout:
    /// hyper reads the protocol preface before its own header timer runs.
    first_byte: Option<Duration>,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    timeouts: Metrics,
}

impl GuardedStream {
    /// Called when the inner I/O is pending: `Ready(err)` once the
    /// connection has been idle for too long, else arms the timer for the
    /// end of the idle window (reset lazily, not on every byte).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (window, kind) = match self.first_byte {
                Some(w) => (w.min(self.idle), "first_byte"),
                None => (self.idle, "idle"),
            };
            let deadline = self.last + window;
            if Instant::now() >= deadline {
                self.timeouts
                    .http_timeouts
                    .get_or_create(&KindLabels { kind })
                    .inc();
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle past its timeout",
                ));
            }
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                    self.first_byte = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_expired(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_rate_limited_and_counts_what_it_held_back() {
        let log = RateLimitedLog::default();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        *log.last.lock().unwrap() = Some((Instant::now() - LOG_EVERY, 2));
        assert_eq!(log.allow(), Some(2));
    }

    #[test]
    fn accept_errors_are_classified() {
        let e = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        assert_eq!(accept_error_kind(&e), "emfile");
        let e = io::Error::from_raw_os_error(nix::errno::Errno::ENFILE as i32);
        assert_eq!(accept_error_kind(&e), "enfile");
        assert_eq!(accept_error_kind(&io::Error::other("x")), "other");
    }
}
