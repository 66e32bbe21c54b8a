//! The WebSocket room API's bounds: the admission of sessions (per identity
//! and in total), each socket's send queue bounded in bytes, and the
//! per-participant token bucket for chat and data.
//!
//! Session counting lives here alone ([`WsQuota`]), so that it can be
//! swapped for the core's session quotas without touching the socket code:
//! a session holds a [`WsPermit`] for as long as it exists (attached or
//! waiting for a resume) and gives its place back when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, mpsc};

use crate::config::WsConfig;
use crate::metrics::{KindLabels, LimitLabels, Metrics};

/// Bytes charged per queued message on top of its text: the queue entry
/// and the allocation's header.
const ENTRY_OVERHEAD: usize = 64;

/// The WebSocket limits of the node and the live session count.
#[derive(Debug)]
pub struct WsLimits {
    pub config: WsConfig,
    quota: Arc<WsQuota>,
    metrics: Metrics,
}

impl WsLimits {
    pub fn new(config: WsConfig, metrics: Metrics) -> Self {
        let quota = Arc::new(WsQuota {
            max_total: config.max_sessions,
            max_per_identity: config.max_sessions_per_identity,
            refused: metrics.ws_sessions_refused.clone(),
            inner: Mutex::new(QuotaInner::default()),
        });
        Self {
            config,
            quota,
            metrics,
        }
    }

    /// Takes a place for a new session of `identity`, or says which limit
    /// refuses it (and counts the refusal).
    pub fn admit(&self, identity: &str) -> Result<WsPermit, WsRefusal> {
        self.quota.admit(identity)
    }

    /// A fresh chat/data token bucket, full.
    pub fn bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket::new(self.config.message_rate, self.config.message_burst, now)
    }

    /// A send queue bounded by `ws_send_queue_bytes`, and its receiver.
    pub fn queue(&self) -> (SocketTx, SocketRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(QueueShared {
            queued: AtomicUsize::new(0),
            kicked: Notify::new(),
        });
        (
            SocketTx {
                tx,
                shared: shared.clone(),
                limit: self.config.send_queue_bytes,
                slow: self.metrics.ws_slow_consumers.clone(),
            },
            SocketRx { rx, shared },
        )
    }

    /// Counts a chat or data message refused by the token bucket.
    pub fn rate_limited(&self, kind: &'static str) {
        self.metrics
            .ws_rate_limited
            .get_or_create(&KindLabels { kind })
            .inc();
    }
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsRefusal {
    /// `ws_max_sessions`.
    Total(usize),
    /// `ws_max_sessions_per_identity`.
    PerIdentity(usize),
}

impl WsRefusal {
    pub fn label(self) -> &'static str {
        match self {
            WsRefusal::Total(_) => "total",
            WsRefusal::PerIdentity(_) => "per_identity",
        }
    }
}

impl std::fmt::Display for WsRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsRefusal::Total(n) => write!(
                f,
                "the node holds its limit of {n} WebSocket room sessions \
                 (ws_max_sessions); try again later or connect to another node"
            ),
            WsRefusal::PerIdentity(n) => write!(
                f,
                "this identity holds its limit of {n} WebSocket room sessions \
                 (ws_max_sessions_per_identity); leave one, or resume it instead \
                 of opening a new one"
            ),
        }
    }
}

/// Counts sessions per identity and in total. Entries exist only for
/// identities that hold a session, so the table is bounded by
/// `ws_max_sessions`.
#[derive(Debug)]
struct WsQuota {
    max_total: usize,
    max_per_identity: usize,
    refused: Family<LimitLabels, Counter>,
    inner: Mutex<QuotaInner>,
}

#[derive(Debug, Default)]
struct QuotaInner {
    total: usize,
    per_identity: HashMap<String, usize>,
}

impl WsQuota {
    fn lock(&self) -> std::sync::MutexGuard<'_, QuotaInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(self: &Arc<Self>, identity: &str) -> Result<WsPermit, WsRefusal> {
        let mut q = self.lock();
        let refusal = if q.total >= self.max_total {
            Some(WsRefusal::Total(self.max_total))
        } else if q.per_identity.get(identity).copied().unwrap_or(0) >= self.max_per_identity {
            Some(WsRefusal::PerIdentity(self.max_per_identity))
        } else {
            None
        };
        if let Some(r) = refusal {
            drop(q);
            self.refused
                .get_or_create(&LimitLabels { limit: r.label() })
                .inc();
            return Err(r);
        }
        q.total += 1;
        *q.per_identity.entry(identity.to_owned()).or_insert(0) += 1;
        Ok(WsPermit {
            quota: self.clone(),
            identity: identity.to_owned(),
            slot: None,
        })
    }
}

/// A session's place in the quota, given back on drop.
#[derive(Debug)]
pub struct WsPermit {
    quota: Arc<WsQuota>,
    identity: String,
    /// The session's place among the node's sessions, counted by the
    /// cores' quota ledger like a WHIP, WHEP or RTP session.
    slot: Option<ridge_sfu::SessionSlot>,
}

impl WsPermit {
    /// Holds `slot` for as long as the permit lives.
    pub fn with_slot(mut self, slot: ridge_sfu::SessionSlot) -> Self {
        self.slot = Some(slot);
        self
    }
}

impl Drop for WsPermit {
    fn drop(&mut self) {
        let mut q = self.quota.lock();
        q.total = q.total.saturating_sub(1);
        if let Some(n) = q.per_identity.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_identity.remove(&self.identity);
            }
        }
    }
}

#[derive(Debug)]
struct QueueShared {
    queued: AtomicUsize,
    kicked: Notify,
}

/// The sending side of one socket's queue: never holds more than its
/// limit in bytes; a message that would pass it marks the socket as a
/// slow reader instead (counted), which the socket task then closes.
#[derive(Debug, Clone)]
pub struct SocketTx {
    tx: mpsc::UnboundedSender<Arc<str>>,
    shared: Arc<QueueShared>,
    limit: usize,
    slow: Counter,
}

impl SocketTx {
    /// Queues `text`; `false` when the socket is gone or too slow (then it
    /// has been told to close).
    pub fn send(&self, text: Arc<str>) -> bool {
        let cost = text.len() + ENTRY_OVERHEAD;
        let before = self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.limit {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            self.kick();
            return false;
        }
        if self.tx.send(text).is_err() {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Tells the socket task to close as a slow reader (counted once per
    /// socket: the first kick only).
    fn kick(&self) {
        // `usize::MAX / 2` marks a kicked queue: no later send fits.
        let prev = self
            .shared
            .queued
            .fetch_max(usize::MAX / 2, Ordering::AcqRel);
        if prev < usize::MAX / 2 {
            self.slow.inc();
            self.shared.kicked.notify_one();
        }
    }
}

/// The socket task's side of the queue.
#[derive(Debug)]
pub struct SocketRx {
    rx: mpsc::UnboundedReceiver<Arc<str>>,
    shared: Arc<QueueShared>,
}

impl SocketRx {
    /// The next queued message, `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<Arc<str>> {
        let text = self.rx.recv().await?;
        let cost = text.len() + ENTRY_OVERHEAD;
        // Never below zero, and a kicked queue stays kicked.
        let _ = self
            .shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < usize::MAX / 2).then(|| q.saturating_sub(cost))
            });
        Some(text)
    }

    /// What tells the socket task that its reader is too slow.
    pub fn kick_watch(&self) -> KickWatch {
        KickWatch(self.shared.clone())
    }
}

/// Resolves [`KickWatch::kicked`] when the queue overflowed.
#[derive(Debug, Clone)]
pub struct KickWatch(Arc<QueueShared>);

impl KickWatch {
    /// Resolves when the queue overflowed: the reader is too slow.
    pub async fn kicked(&self) {
        if self.0.queued.load(Ordering::Acquire) >= usize::MAX / 2 {
            return;
        }
        self.0.kicked.notified().await;
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` banked.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(total: usize, per_identity: usize, queue: usize) -> WsLimits {
        let (_, metrics) = crate::metrics::registry();
        WsLimits::new(
            WsConfig {
                max_sessions: total,
                max_sessions_per_identity: per_identity,
                send_queue_bytes: queue,
                ..WsConfig::default()
            },
            metrics,
        )
    }

    #[test]
    fn permits_are_counted_per_identity_and_in_total_and_given_back() {
        let l = limits(3, 2, 1 << 20);
        let a1 = l.admit("a").unwrap();
        let _a2 = l.admit("a").unwrap();
        assert_eq!(l.admit("a").unwrap_err(), WsRefusal::PerIdentity(2));
        let _b = l.admit("b").unwrap();
        assert_eq!(l.admit("c").unwrap_err(), WsRefusal::Total(3));
        drop(a1);
        let _c = l.admit("c").unwrap();
        assert!(l.quota.lock().per_identity.len() <= 3);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_a_slow_reader_is_kicked_once() {
        let l = limits(1, 1, 1000);
        let (tx, mut rx) = l.queue();
        let msg: Arc<str> = Arc::from("x".repeat(400));
        assert!(tx.send(msg.clone()));
        assert!(tx.send(msg.clone()));
        assert!(!tx.send(msg.clone()), "a third 464-byte entry passes 1000");
        assert!(
            !tx.send(Arc::from("y")),
            "a kicked queue takes nothing more"
        );
        assert_eq!(l.metrics.ws_slow_consumers.get(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), rx.kick_watch().kicked())
                .await
                .expect("the socket task is told");
            assert!(rx.recv().await.is_some());
        });
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 5);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 5);
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 5);
    }
}
