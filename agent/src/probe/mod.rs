//! Link probes: a small authenticated UDP echo between agents. [`wire`] is
//! the datagram, [`stats`] the sans-IO measurement, [`ProbeEngine`] the
//! socket glue (one UDP socket both answers peers and sends our probes).

pub mod stats;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::metrics::{Metrics, PeerLabels};
use stats::{LinkMeasure, LinkState, LinkStats};
use wire::{Kind, Probe};

/// Probes remembered per link.
pub const WINDOW: usize = 20;

/// The shortest [`down_after`]: with very short probe intervals, a few
/// lost datagrams in a row are not yet a dead peer.
pub const MIN_DOWN_AFTER: Duration = Duration::from_millis(300);

/// When an unanswered probe counts as lost in the window: max(1 s,
/// 3 × `interval`).
pub fn loss_timeout(interval: Duration) -> Duration {
    Duration::from_secs(1).max(interval.saturating_mul(3))
}

/// How long a link may go without an answered probe before it is down
/// (reported with loss 1.0, so routes leave it at once): max(300 ms,
/// 3 × `interval`). With the lab's 200 ms probes that is 600 ms, with the
/// default 1 s probes 3 s; either way well inside the scheduler's lease of
/// 3 heartbeats, which is what catches a node nobody probes.
pub fn down_after(interval: Duration) -> Duration {
    MIN_DOWN_AFTER.max(interval.saturating_mul(3))
}

/// One link as the desired state describes it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerLink {
    pub peer: String,
    pub key: Vec<u8>,
    /// The peer's probe responder; `None`: answer its probes, send none.
    pub target: Option<SocketAddr>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("peer", &self.peer)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Table {
    links: BTreeMap<String, PeerLink>,
    stats: BTreeMap<String, LinkStats>,
    seq: u64,
}

/// The probe responder and prober of one agent.
#[derive(Debug)]
pub struct ProbeEngine {
    socket: UdpSocket,
    node_id: String,
    table: Mutex<Table>,
    metrics: Metrics,
    epoch: Instant,
    timeout: Duration,
    down_after: Duration,
    /// Poked when a link goes down or comes back up.
    link_changed: Notify,
}

impl ProbeEngine {
    /// Binds the responder socket. A probe unanswered after `timeout` is
    /// lost; a link whose probes go unanswered for `down_after` is down (see
    /// [`loss_timeout`] and [`down_after`] for the agent's choices).
    pub async fn bind(
        addr: SocketAddr,
        node_id: &str,
        metrics: Metrics,
        timeout: Duration,
        down_after: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let socket = std::net::UdpSocket::bind(addr)?;
        Self::from_socket(socket, node_id, metrics, timeout, down_after)
    }

    /// Wraps a socket bound earlier (the agent binds before it enrolls, so
    /// that a port conflict does not use up a bootstrap token).
    pub fn from_socket(
        socket: std::net::UdpSocket,
        node_id: &str,
        metrics: Metrics,
        timeout: Duration,
        down_after: Duration,
    ) -> std::io::Result<Arc<Self>> {
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Arc::new(Self {
            socket,
            node_id: node_id.to_owned(),
            table: Mutex::new(Table::default()),
            metrics,
            epoch: Instant::now(),
            timeout,
            down_after,
            link_changed: Notify::new(),
        }))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the links (from a new desired state). Statistics of links
    /// that stay are kept.
    pub fn set_links(&self, links: Vec<PeerLink>) {
        let mut t = self.table();
        let (timeout, down_after) = (self.timeout, self.down_after);
        t.links = links.into_iter().map(|l| (l.peer.clone(), l)).collect();
        let gone: Vec<String> = t
            .stats
            .keys()
            .filter(|p| !t.links.contains_key(*p))
            .cloned()
            .collect();
        for p in &gone {
            t.stats.remove(p);
        }
        let peers: Vec<String> = t.links.keys().cloned().collect();
        for p in peers {
            t.stats
                .entry(p)
                .or_insert_with(|| LinkStats::new(WINDOW, timeout, down_after));
        }
        drop(t);
        for peer in gone {
            let l = PeerLabels { peer };
            self.metrics.probe_rtt.remove(&l);
            self.metrics.probe_loss.remove(&l);
            self.metrics.probe_jitter.remove(&l);
        }
    }

    /// The current measurement of every link with at least one resolved
    /// probe, or that is down (loss 1.0).
    pub fn measures(&self) -> Vec<(String, LinkMeasure)> {
        let now = Instant::now();
        let mut t = self.table();
        t.stats
            .iter_mut()
            .filter_map(|(p, s)| {
                s.expire(now);
                s.measure(now).map(|m| (p.clone(), m))
            })
            .collect()
    }

    /// The peers whose link measures as dead now (loss 1.0): what the
    /// scheduler takes out of the routing graph.
    pub fn dead_links(&self) -> BTreeSet<String> {
        self.measures()
            .into_iter()
            .filter(|(_, m)| m.loss >= 1.0)
            .map(|(p, _)| p)
            .collect()
    }

    /// Resolves after a link went down or came back up (one stored wake-up
    /// if nobody was waiting). The heartbeat loop waits on it to report the
    /// change at once.
    pub async fn link_changed(&self) {
        self.link_changed.notified().await;
    }

    /// Counts, logs and announces link state changes.
    fn changed(&self, changes: Vec<(String, LinkState)>) {
        if changes.is_empty() {
            return;
        }
        for (peer, state) in changes {
            self.metrics.link_state_change(state.as_str());
            match state {
                LinkState::Down => tracing::warn!(
                    %peer,
                    down_after = ?self.down_after,
                    "link down: no probe answered"
                ),
                LinkState::Up => tracing::info!(%peer, "link up: probes answered again"),
            }
        }
        self.link_changed.notify_one();
    }

    /// Sends one probe to every link with a target.
    pub async fn probe_all(&self) {
        let now = Instant::now();
        let sent_us = now.duration_since(self.epoch).as_micros() as u64;
        let mut changes = Vec::new();
        let batch: Vec<(SocketAddr, Vec<u8>)> = {
            let mut t = self.table();
            let targets: Vec<(String, SocketAddr, Vec<u8>)> = t
                .links
                .values()
                .filter_map(|l| Some((l.peer.clone(), l.target?, l.key.clone())))
                .collect();
            targets
                .into_iter()
                .map(|(peer, target, key)| {
                    t.seq += 1;
                    let seq = t.seq;
                    if let Some(s) = t.stats.get_mut(&peer) {
                        s.on_sent(seq, now);
                        if let Some(state) = s.update(now) {
                            changes.push((peer, state));
                        }
                    }
                    let p = Probe {
                        kind: Kind::Request,
                        seq,
                        sent_us,
                        node: self.node_id.clone(),
                    };
                    (target, wire::encode(&p, &key))
                })
                .collect()
        };
        self.changed(changes);
        for (target, buf) in batch {
            self.metrics.probes_sent.inc();
            if let Err(e) = self.socket.send_to(&buf, target).await {
                tracing::debug!(%target, error = %e, "probe send failed");
            }
        }
        for (peer, m) in self.measures() {
            let l = PeerLabels { peer };
            self.metrics
                .probe_rtt
                .get_or_create(&l)
                .set(m.rtt_ms / 1000.0);
            self.metrics.probe_loss.get_or_create(&l).set(m.loss);
            self.metrics
                .probe_jitter
                .get_or_create(&l)
                .set(m.jitter_ms / 1000.0);
        }
    }

    /// Handles one received datagram; returns the reply to send, if any.
    fn handle(&self, buf: &[u8]) -> Option<Vec<u8>> {
        let probe = match wire::decode(buf) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.probe_rejected(e.reason());
                return None;
            }
        };
        let mut t = self.table();
        let Some(key) = t.links.get(&probe.node).map(|l| l.key.clone()) else {
            self.metrics.probe_rejected("unknown_peer");
            return None;
        };
        if let Err(e) = wire::verify(buf, &key) {
            self.metrics.probe_rejected(e.reason());
            return None;
        }
        match probe.kind {
            Kind::Request => {
                let reply = Probe {
                    kind: Kind::Reply,
                    seq: probe.seq,
                    sent_us: probe.sent_us,
                    node: self.node_id.clone(),
                };
                Some(wire::encode(&reply, &key))
            }
            Kind::Reply => {
                let now = Instant::now();
                let (answered, change) = match t.stats.get_mut(&probe.node) {
                    Some(s) => {
                        let rtt = s.on_reply(probe.seq, now);
                        (rtt, s.update(now))
                    }
                    None => (None, None),
                };
                drop(t);
                if answered.is_some() {
                    self.metrics.probes_answered.inc();
                } else {
                    self.metrics.probe_rejected("unexpected");
                }
                if let Some(state) = change {
                    self.changed(vec![(probe.node, state)]);
                }
                None
            }
        }
    }

    /// Answers peers and collects replies until the task is dropped.
    pub async fn run_receiver(self: Arc<Self>) {
        let mut buf = vec![0u8; wire::MAX_LEN + 1];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "probe socket receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if let Some(reply) = self.handle(&buf[..n]) {
                let _ = self.socket.send_to(&reply, from).await;
            }
        }
    }

    /// Sends probes every `interval` until the task is dropped.
    pub async fn run_prober(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe_all().await;
        }
    }
}
