//! Link probes: a small authenticated UDP echo between agents. [`wire`] is
//! the datagram, [`stats`] the sans-IO measurement, [`ProbeEngine`] the
//! socket glue (one UDP socket both answers peers and sends our probes).

pub mod stats;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::metrics::{Metrics, PeerLabels};
use stats::{LinkMeasure, LinkStats};
use wire::{Kind, Probe};

/// Probes remembered per link.
pub const WINDOW: usize = 20;

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
}

impl ProbeEngine {
    /// Binds the responder socket. A probe unanswered after `timeout` is lost.
    pub async fn bind(
        addr: SocketAddr,
        node_id: &str,
        metrics: Metrics,
        timeout: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let socket = std::net::UdpSocket::bind(addr)?;
        Self::from_socket(socket, node_id, metrics, timeout)
    }

    /// Wraps a socket bound earlier (the agent binds before it enrolls, so
    /// that a port conflict does not use up a bootstrap token).
    pub fn from_socket(
        socket: std::net::UdpSocket,
        node_id: &str,
        metrics: Metrics,
        timeout: Duration,
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
        let timeout = self.timeout;
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
                .or_insert_with(|| LinkStats::new(WINDOW, timeout));
        }
        drop(t);
        for peer in gone {
            let l = PeerLabels { peer };
            self.metrics.probe_rtt.remove(&l);
            self.metrics.probe_loss.remove(&l);
            self.metrics.probe_jitter.remove(&l);
        }
    }

    /// The current measurement of every link with at least one resolved probe.
    pub fn measures(&self) -> Vec<(String, LinkMeasure)> {
        let now = Instant::now();
        let mut t = self.table();
        t.stats
            .iter_mut()
            .filter_map(|(p, s)| {
                s.expire(now);
                s.measure().map(|m| (p.clone(), m))
            })
            .collect()
    }

    /// Sends one probe to every link with a target.
    pub async fn probe_all(&self) {
        let now = Instant::now();
        let sent_us = now.duration_since(self.epoch).as_micros() as u64;
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
                let answered = t
                    .stats
                    .get_mut(&probe.node)
                    .and_then(|s| s.on_reply(probe.seq, now));
                if answered.is_some() {
                    self.metrics.probes_answered.inc();
                } else {
                    self.metrics.probe_rejected("unexpected");
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
