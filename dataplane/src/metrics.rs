//! The node's one metrics registry. Control-plane metrics are live
//! prometheus-client families; media metrics come from a snapshot of the
//! core taken on each scrape, so the packet path only bumps plain integers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use ridge_sfu::{Counters, DropReason, StatsSnapshot};

use crate::offload::kernel::KernelPath;
use crate::shard::handle::MediaHandle;
use crate::shard::stats::{ShardCounters, ShardStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Which configured limit refused something (e.g. `per_identity`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Live control-plane metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub http_requests: Family<HttpLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub bad_requests: Family<ReasonLabels, Counter>,
    pub ws_sessions: Gauge,
    pub ws_messages_in: Counter,
    pub ws_messages_out: Counter,
    pub udp_send_errors: Counter,
    pub udp_recv_errors: Counter,
    pub draining: Gauge,
    /// WebSocket upgrades refused by a session limit, by limit.
    pub ws_sessions_refused: Family<LimitLabels, Counter>,
    /// Sockets closed because their send queue passed its byte bound.
    pub ws_slow_consumers: Counter,
    /// Chat and data messages refused by the token bucket, by kind.
    pub ws_rate_limited: Family<KindLabels, Counter>,
    /// Events dropped from resume buffers by their byte bound.
    pub ws_resume_evicted: Counter,
    /// Sessions closed because their token expired.
    pub ws_token_expired: Counter,
    /// HTTP(S) connections open now.
    pub http_connections: Gauge,
    /// HTTP(S) connections closed at accept by a connection cap, by limit.
    pub http_connections_refused: Family<LimitLabels, Counter>,
    /// Failed accepts, by kind (emfile, enfile, other).
    pub http_accept_errors: Family<KindLabels, Counter>,
    /// Connections closed by a timeout of the node, by kind.
    pub http_timeouts: Family<KindLabels, Counter>,
    snapshot: Arc<Mutex<Option<StatsSnapshot>>>,
}

/// Builds the registry and the handles the rest of the node updates.
pub fn registry() -> (Registry, Metrics) {
    let mut registry = Registry::default();
    let metrics = Metrics {
        http_requests: Family::default(),
        auth_failures: Family::default(),
        bad_requests: Family::default(),
        ws_sessions: Gauge::default(),
        ws_messages_in: Counter::default(),
        ws_messages_out: Counter::default(),
        udp_send_errors: Counter::default(),
        udp_recv_errors: Counter::default(),
        draining: Gauge::default(),
        ws_sessions_refused: Family::default(),
        ws_slow_consumers: Counter::default(),
        ws_rate_limited: Family::default(),
        ws_resume_evicted: Counter::default(),
        ws_token_expired: Counter::default(),
        http_connections: Gauge::default(),
        http_connections_refused: Family::default(),
        http_accept_errors: Family::default(),
        http_timeouts: Family::default(),
        snapshot: Arc::new(Mutex::new(None)),
    };
    let r = registry.sub_registry_with_prefix("ridge");
    r.register(
        "http_requests",
        "HTTP requests by route and status",
        metrics.http_requests.clone(),
    );
    r.register(
        "auth_failures",
        "Requests refused for a missing, expired, forged or insufficient token",
        metrics.auth_failures.clone(),
    );
    r.register(
        "bad_requests",
        "Requests refused as malformed (bad SDP, bad JSON, bad WS message)",
        metrics.bad_requests.clone(),
    );
    r.register(
        "ws_sessions",
        "Open WebSocket room sessions",
        metrics.ws_sessions.clone(),
    );
    r.register(
        "ws_messages_received",
        "WebSocket messages received",
        metrics.ws_messages_in.clone(),
    );
    r.register(
        "ws_messages_sent",
        "WebSocket messages sent",
        metrics.ws_messages_out.clone(),
    );
    r.register(
        "udp_send_errors",
        "Datagrams the media socket failed to send",
        metrics.udp_send_errors.clone(),
    );
    r.register(
        "udp_receive_errors",
        "Errors reading the media socket",
        metrics.udp_recv_errors.clone(),
    );
    r.register(
        "draining",
        "1 while the node drains before exit",
        metrics.draining.clone(),
    );
    r.register(
        "ws_sessions_refused",
        "WebSocket upgrades refused by a session limit (per_identity, total)",
        metrics.ws_sessions_refused.clone(),
    );
    r.register(
        "ws_slow_consumers",
        "WebSocket sockets closed because their send queue passed ws_send_queue_bytes",
        metrics.ws_slow_consumers.clone(),
    );
    r.register(
        "ws_rate_limited",
        "Chat and data messages refused by the per-participant token bucket (chat, data)",
        metrics.ws_rate_limited.clone(),
    );
    r.register(
        "ws_resume_evicted",
        "Events dropped from resume buffers to keep them under ws_resume_buffer_bytes",
        metrics.ws_resume_evicted.clone(),
    );
    r.register(
        "ws_token_expired",
        "WebSocket sessions closed because their token expired without a refresh",
        metrics.ws_token_expired.clone(),
    );
    r.register(
        "http_connections",
        "HTTP(S) connections open now (WebSocket sockets included)",
        metrics.http_connections.clone(),
    );
    r.register(
        "http_connections_refused",
        "HTTP(S) connections closed at accept by a connection cap (per_source, total)",
        metrics.http_connections_refused.clone(),
    );
    r.register(
        "http_accept_errors",
        "Failed accepts on the HTTP(S) listener (emfile, enfile, other)",
        metrics.http_accept_errors.clone(),
    );
    r.register(
        "http_timeouts",
        "HTTP(S) connections closed by the node's I/O timeouts (first_byte: nothing sent within http_header_timeout; idle: nothing read or written within http_idle_timeout)",
        metrics.http_timeouts.clone(),
    );
    registry.register_collector(Box::new(MediaCollector {
        snapshot: metrics.snapshot.clone(),
    }));
    (registry, metrics)
}

/// Registers the running shards, whose own counters every scrape reads.
pub fn register_shards(registry: &mut Registry, media: &MediaHandle) {
    registry.register_collector(Box::new(ShardCollector {
        backend: match media.backend() {
            ridge_io::Backend::Uring => "io_uring".into(),
            ridge_io::Backend::Mmsg => "mmsg".into(),
        },
        stats: media.shard_stats(),
    }));
}

/// Registers the kernel fast path, whose mode and counters every scrape
/// reads.
pub fn register_kernel(registry: &mut Registry, kernel: Arc<KernelPath>) {
    registry.register_collector(Box::new(KernelCollector { kernel }));
}

impl Metrics {
    /// Installs the core snapshot the next encode reads.
    pub fn set_snapshot(&self, s: StatsSnapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Some(s);
        }
    }

    /// The counters the shards bump themselves, handed to them at start.
    pub fn shard_counters(&self) -> ShardCounters {
        ShardCounters {
            udp_send_errors: self.udp_send_errors.clone(),
            udp_recv_errors: self.udp_recv_errors.clone(),
        }
    }
}

/// The kernel fast path: XDP mode, guard drops by reason, forwarding
/// counters, installed flows and their per-flow counters.
#[derive(Debug)]
struct KernelCollector {
    kernel: Arc<KernelPath>,
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.kernel.snapshot();
        gauge(
            &mut enc,
            "ridge_xdp_mode",
            "XDP mode the media interfaces have at least: native, generic or none (value 1)",
            &[(vec![("mode", s.mode.to_owned())], 1.0)],
        )?;
        if !s.interfaces.is_empty() {
            let rows: Vec<(Labels, f64)> = s
                .interfaces
                .iter()
                .map(|(i, m)| {
                    (
                        vec![("interface", i.clone()), ("mode", (*m).to_owned())],
                        1.0,
                    )
                })
                .collect();
            gauge(
                &mut enc,
                "ridge_xdp_interface_mode",
                "XDP mode per media interface (value 1)",
                &rows,
            )?;
        }
        gauge(
            &mut enc,
            "ridge_bpf_flows",
            "Plain-RTP flows installed in the kernel forwarding table",
            &[(vec![], s.flows.len() as f64)],
        )?;
        let rows: Vec<(Labels, f64)> = s
            .not_offloaded
            .iter()
            .map(|(r, n)| (vec![("reason", r.as_str().to_owned())], *n as f64))
            .collect();
        gauge(
            &mut enc,
            "ridge_bpf_flows_not_offloaded",
            "Offload candidates the last reconcile kept in userspace, by reason",
            &rows,
        )?;
        gauge(
            &mut enc,
            "ridge_xdp_rate_exempt_sources",
            "Source addresses the XDP guard does not rate-limit (authenticated mesh peers)",
            &[(vec![], s.rate_exempt_sources as f64)],
        )?;
        counter(
            &mut enc,
            "ridge_bpf_install_errors",
            "Forwarding entries the kernel table refused",
            &[(vec![], s.install_errors)],
        )?;
        if let Some(c) = s.counters {
            let rows: Vec<(Labels, u64)> = c
                .drops_by_reason()
                .iter()
                .map(|(r, n)| (vec![("reason", (*r).to_owned())], *n))
                .collect();
            counter(
                &mut enc,
                "ridge_bpf_dropped",
                "Packets the XDP guard dropped on media ports, by reason",
                &rows,
            )?;
            counter(
                &mut enc,
                "ridge_bpf_guard_packets",
                "Packets the XDP guard let through: media (on a media port) or not_media",
                &[
                    (vec![("class", "media".to_owned())], c.guard_media_ok),
                    (vec![("class", "not_media".to_owned())], c.guard_not_media),
                ],
            )?;
            counter(
                &mut enc,
                "ridge_bpf_guard_rate_exempt_packets",
                "Media packets from rate-exempt sources (mesh peers) that skipped the rate \
                 limit; also counted as media in ridge_bpf_guard_packets",
                &[(vec![], c.guard_rate_exempt)],
            )?;
            counter(
                &mut enc,
                "ridge_bpf_forwarded",
                "Packets sent by the kernel: xdp_tx, xdp_redirect or tc_copy",
                &[
                    (vec![("how", "xdp_tx".to_owned())], c.forward_xdp_tx),
                    (
                        vec![("how", "xdp_redirect".to_owned())],
                        c.forward_xdp_redirect,
                    ),
                    (vec![("how", "tc_copy".to_owned())], c.forward_tc_copies),
                ],
            )?;
            counter(
                &mut enc,
                "ridge_bpf_sampled",
                "Packets of installed flows handed to userspace as samples",
                &[(vec![], c.forward_sampled)],
            )?;
            counter(
                &mut enc,
                "ridge_bpf_forward_errors",
                "Kernel forwarding failures (unusable entries, clone/rewrite errors)",
                &[(vec![], c.forward_errors)],
            )?;
        }
        counter(
            &mut enc,
            "ridge_kernel_forwarded_packets",
            "Packets of plain-RTP flows forwarded in the kernel (installed and removed flows)",
            &[(vec![], s.totals.packets)],
        )?;
        counter(
            &mut enc,
            "ridge_kernel_forwarded_bytes",
            "Their size (Ethernet frames)",
            &[(vec![], s.totals.bytes)],
        )?;
        gauge(
            &mut enc,
            "ridge_bpf_mesh_flows",
            "Mesh transit streams installed in the kernel (tag checked, SSRC swapped, re-signed)",
            &[(vec![], s.mesh_flows as f64)],
        )?;
        let m = &s.mesh_totals;
        counter(
            &mut enc,
            "ridge_kernel_mesh_packets",
            "Packets of mesh transit streams the kernel saw (installed and removed flows), by \
             outcome: forwarded; bad_tag (handed to userspace, which drops and counts it); \
             too_old (dropped); passed (handed to userspace: no state yet, too short or long)",
            &[
                (vec![("outcome", "forwarded".to_owned())], m.packets),
                (vec![("outcome", "bad_tag".to_owned())], m.bad_tag),
                (vec![("outcome", "too_old".to_owned())], m.too_old),
                (vec![("outcome", "passed".to_owned())], m.passed),
            ],
        )?;
        counter(
            &mut enc,
            "ridge_kernel_mesh_bytes",
            "Size of the mesh transit packets the kernel forwarded (Ethernet frames)",
            &[(vec![], m.bytes)],
        )?;
        if !s.flows.is_empty() {
            let label = |k: &ridge_ebpf::FlowKey| -> Labels {
                vec![
                    ("source", k.src.to_string()),
                    ("local", k.dst.to_string()),
                    ("ssrc", format!("{:#010x}", k.ssrc)),
                ]
            };
            type FlowField = (
                &'static str,
                &'static str,
                fn(&ridge_ebpf::FlowCounters) -> u64,
            );
            const FLOW_FIELDS: [FlowField; 4] = [
                (
                    "ridge_bpf_flow_packets",
                    "Packets of one installed flow forwarded in the kernel",
                    |c| c.packets,
                ),
                (
                    "ridge_bpf_flow_bytes",
                    "Their size (Ethernet frames)",
                    |c| c.bytes,
                ),
                (
                    "ridge_bpf_flow_copies",
                    "Copies sent (packets x destinations)",
                    |c| c.copies,
                ),
                (
                    "ridge_bpf_flow_sampled",
                    "Packets of the flow handed to userspace as samples",
                    |c| c.sampled,
                ),
            ];
            for (name, help, get) in FLOW_FIELDS {
                let rows: Vec<(Labels, u64)> =
                    s.flows.iter().map(|(k, _, c)| (label(k), get(c))).collect();
                counter(&mut enc, name, help, &rows)?;
            }
            let rows: Vec<(Labels, f64)> = s
                .flows
                .iter()
                .map(|(k, n, _)| (label(k), *n as f64))
                .collect();
            gauge(
                &mut enc,
                "ridge_bpf_flow_destinations",
                "Destinations of one installed flow",
                &rows,
            )?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct ShardCollector {
    /// The I/O backend the shards run on.
    backend: String,
    /// Each shard's own counters, by shard index.
    stats: Vec<Arc<ShardStats>>,
}

/// (metric, help, counter?, accessor) of one per-shard value.
type ShardField = (&'static str, &'static str, bool, fn(&ShardStats) -> u64);

const SHARD_FIELDS: &[ShardField] = &[
    (
        "ridge_shard_allocations",
        "Heap allocations made on the shard thread outside control commands (packet path and timers)",
        true,
        |s| s.allocations.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_truncated_datagrams",
        "Received datagrams larger than a packet buffer, dropped",
        true,
        |s| s.truncated.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_local_dropped",
        "Outputs for local (in-process) endpoints dropped: their queue was full or gone",
        true,
        |s| s.local_dropped.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_send_dropped",
        "Datagrams dropped because the socket stayed full",
        true,
        |s| s.send_dropped.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_send_blocked",
        "Times a full socket made sends wait",
        true,
        |s| s.send_blocked.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_ring_exhausted",
        "Times the io_uring provided-buffer ring ran dry",
        true,
        |s| s.ring_exhausted.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_socket_errors",
        "Pending socket errors (ICMP) reported to receives",
        true,
        |s| s.socket_errors.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_gso_sends",
        "Sends that carried several datagrams to one destination with UDP GSO",
        true,
        |s| s.gso_sends.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_gso_datagrams",
        "Datagrams carried by GSO sends (divide by ridge_shard_gso_sends for the run length)",
        true,
        |s| s.gso_datagrams.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_pool_grown",
        "Times the packet pool had to allocate a slot",
        true,
        |s| s.pool_grown.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_pool_slots",
        "Packet buffers owned by the shard's pool",
        false,
        |s| s.pool_slots.load(Ordering::Relaxed),
    ),
    (
        "ridge_shard_stopped_calls",
        "Control calls refused because the shard had stopped (its thread gone); its rooms answer 503",
        true,
        |s| s.stopped_calls.load(Ordering::Relaxed),
    ),
];

impl Collector for ShardCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.stats.is_empty() {
            return Ok(());
        }
        gauge(
            &mut enc,
            "ridge_io_backend",
            "The datagram I/O backend the shards use (value 1)",
            &[(vec![("backend", self.backend.clone())], 1.0)],
        )?;
        gauge(
            &mut enc,
            "ridge_shards",
            "Media shards (pinned threads with their own socket)",
            &[(vec![], self.stats.len() as f64)],
        )?;
        for (name, help, is_counter, get) in SHARD_FIELDS {
            if *is_counter {
                let rows: Vec<(Labels, u64)> = self
                    .stats
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (vec![("shard", i.to_string())], get(s)))
                    .collect();
                counter(&mut enc, name, help, &rows)?;
            } else {
                let rows: Vec<(Labels, f64)> = self
                    .stats
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (vec![("shard", i.to_string())], get(s) as f64))
                    .collect();
                gauge(&mut enc, name, help, &rows)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct MediaCollector {
    snapshot: Arc<Mutex<Option<StatsSnapshot>>>,
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// The per-node, per-room and per-peer counter families, one row each.
/// (metric suffix, help, accessor)
type CounterField = (&'static str, &'static str, fn(&Counters) -> u64);

const COUNTER_FIELDS: &[CounterField] = &[
    (
        "packets_received",
        "RTP/RTCP/STUN/DTLS datagrams received",
        |c| c.packets_in,
    ),
    ("bytes_received", "Bytes received", |c| c.bytes_in),
    ("packets_sent", "Datagrams sent", |c| c.packets_out),
    ("bytes_sent", "Bytes sent", |c| c.bytes_out),
    ("nacks_received", "Packets NACKed by receivers", |c| {
        c.nacks_received
    }),
    ("nacks_sent", "Packets NACKed towards senders", |c| {
        c.nacks_sent
    }),
    (
        "retransmits",
        "Packets resent from the retransmission buffer",
        |c| c.retransmits,
    ),
    (
        "retransmit_misses",
        "NACKed packets no longer in the buffer",
        |c| c.retransmit_misses,
    ),
    (
        "plis_received",
        "Keyframe requests (PLI/FIR) from receivers",
        |c| c.keyframe_requests_received,
    ),
    (
        "plis_forwarded",
        "Keyframe requests sent to publishers",
        |c| c.keyframe_requests_forwarded,
    ),
    (
        "plis_throttled",
        "Keyframe requests suppressed by the throttle",
        |c| c.keyframe_requests_throttled,
    ),
    ("layer_switches", "Simulcast layer switches", |c| {
        c.layer_switches
    }),
    (
        "packets_lost",
        "Packets lost on the way in, from sequence gaps",
        |c| c.packets_lost,
    ),
];

impl Collector for MediaCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = match self.snapshot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(s) = guard.as_ref() else {
            return Ok(());
        };
        for (field, help, get) in COUNTER_FIELDS {
            counter(
                &mut enc,
                &format!("ridge_{field}"),
                help,
                &[(vec![], get(&s.counters))],
            )?;
            let rooms: Vec<(Labels, u64)> = s
                .rooms
                .iter()
                .map(|r| (vec![("room", r.room.clone())], get(&r.counters)))
                .collect();
            counter(&mut enc, &format!("ridge_room_{field}"), help, &rooms)?;
            let peers: Vec<(Labels, u64)> = s
                .peers
                .iter()
                .map(|p| {
                    (
                        vec![
                            ("room", p.room.clone()),
                            ("peer", p.peer.to_string()),
                            ("transport", p.transport.to_string()),
                        ],
                        get(&p.counters),
                    )
                })
                .collect();
            counter(&mut enc, &format!("ridge_peer_{field}"), help, &peers)?;
        }
        let drops: Vec<(Labels, u64)> = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.label().to_string())],
                    s.drops[*r as usize],
                )
            })
            .collect();
        counter(
            &mut enc,
            "ridge_packets_dropped",
            "Datagrams dropped, by reason",
            &drops,
        )?;
        counter(
            &mut enc,
            "ridge_sessions_created",
            "WebRTC and RTP sessions created",
            &[(vec![], s.sessions_created)],
        )?;
        counter(
            &mut enc,
            "ridge_sessions_closed",
            "WebRTC and RTP sessions closed",
            &[(vec![], s.sessions_closed)],
        )?;
        let reaped: Vec<(Labels, u64)> = ridge_sfu::ReapReason::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.label().to_string())],
                    s.sessions_reaped[*r as usize],
                )
            })
            .collect();
        counter(
            &mut enc,
            "ridge_sessions_reaped",
            "Sessions the node closed on its own, by reason (handshake: no ICE and DTLS in \
             time; ice_consent: a connected WebRTC remote went silent; rtp_consent: a plain \
             subscriber's remote never sent a packet)",
            &reaped,
        )?;
        let refusals: Vec<(Labels, u64)> = ridge_sfu::QuotaLimit::ALL
            .iter()
            .map(|l| {
                (
                    vec![("limit", l.label().to_string())],
                    s.quota_refusals[*l as usize],
                )
            })
            .collect();
        counter(
            &mut enc,
            "ridge_quota_refusals",
            "Sessions, joins and endpoints refused, by the limit they hit",
            &refusals,
        )?;
        let mut by_transport = [("webrtc", 0f64), ("rtp", 0f64)];
        for p in &s.peers {
            for (t, n) in &mut by_transport {
                if *t == p.transport {
                    *n += 1.0;
                }
            }
        }
        let sessions: Vec<(Labels, f64)> = by_transport
            .iter()
            .map(|(t, n)| (vec![("transport", t.to_string())], *n))
            .collect();
        gauge(&mut enc, "ridge_sessions", "Open sessions", &sessions)?;
        gauge(
            &mut enc,
            "ridge_rooms",
            "Rooms with participants",
            &[(vec![], s.rooms.len() as f64)],
        )?;
        let room_rows = |f: fn(&ridge_sfu::RoomSnapshot) -> f64| -> Vec<(Labels, f64)> {
            s.rooms
                .iter()
                .map(|r| (vec![("room", r.room.clone())], f(r)))
                .collect()
        };
        gauge(
            &mut enc,
            "ridge_room_participants",
            "Participants per room",
            &room_rows(|r| r.participants as f64),
        )?;
        gauge(
            &mut enc,
            "ridge_room_tracks",
            "Published tracks per room",
            &room_rows(|r| r.tracks as f64),
        )?;
        let peer_labels = |p: &ridge_sfu::PeerSnapshot| -> Labels {
            vec![
                ("room", p.room.clone()),
                ("peer", p.peer.to_string()),
                ("transport", p.transport.to_string()),
            ]
        };
        let loss: Vec<(Labels, f64)> = s
            .peers
            .iter()
            .filter_map(|p| Some((peer_labels(p), f64::from(p.loss?))))
            .collect();
        gauge(
            &mut enc,
            "ridge_peer_loss_ratio",
            "Fraction of packets lost on the peer's link",
            &loss,
        )?;
        let rtt: Vec<(Labels, f64)> = s
            .peers
            .iter()
            .filter_map(|p| Some((peer_labels(p), p.rtt?.as_secs_f64())))
            .collect();
        gauge(
            &mut enc,
            "ridge_peer_rtt_seconds",
            "Round-trip time to the peer",
            &rtt,
        )?;
        let bwe: Vec<(Labels, f64)> = s
            .peers
            .iter()
            .filter_map(|p| Some((peer_labels(p), p.bwe_bps? as f64)))
            .collect();
        gauge(
            &mut enc,
            "ridge_peer_bandwidth_estimate_bps",
            "Send-side bandwidth estimate towards the peer",
            &bwe,
        )?;
        let layer_labels = |l: &ridge_sfu::LayerSnapshot| -> Labels {
            vec![
                ("room", l.room.clone()),
                ("track", l.track.to_string()),
                ("rid", l.rid.clone()),
            ]
        };
        let layer_bps: Vec<(Labels, f64)> = s
            .layers
            .iter()
            .map(|l| (layer_labels(l), l.bps as f64))
            .collect();
        gauge(
            &mut enc,
            "ridge_track_layer_bitrate_bps",
            "Received bitrate of each video layer (last measured second)",
            &layer_bps,
        )?;
        let layer_watchers: Vec<(Labels, f64)> = s
            .layers
            .iter()
            .map(|l| (layer_labels(l), f64::from(l.watchers)))
            .collect();
        gauge(
            &mut enc,
            "ridge_track_layer_watchers",
            "Subscribers receiving or switching to each video layer (0: paused)",
            &layer_watchers,
        )?;
        encode_mesh_links(&mut enc, &s.mesh_links)?;
        Ok(())
    }
}

type MeshField = (
    &'static str,
    &'static str,
    fn(&ridge_sfu::MeshLinkSnapshot) -> u64,
);

const MESH_COUNTERS: &[MeshField] = &[
    ("packets_in", "Datagrams received on a mesh link", |l| {
        l.packets_in
    }),
    ("packets_out", "Datagrams sent on a mesh link", |l| {
        l.packets_out
    }),
    ("bytes_in", "Bytes received on a mesh link", |l| l.bytes_in),
    ("bytes_out", "Bytes sent on a mesh link", |l| l.bytes_out),
    (
        "nacks_sent",
        "Sequence numbers NACKed to the link's upstream",
        |l| l.nacks_sent,
    ),
    (
        "nacks_received",
        "Sequence numbers the link's downstream NACKed",
        |l| l.nacks_received,
    ),
    (
        "retransmits",
        "Packets resent on the link from its retransmission buffers",
        |l| l.retransmits,
    ),
    (
        "recovered",
        "Missing packets that arrived after a NACK (or late)",
        |l| l.recovered,
    ),
    ("unrecovered", "Missing packets given up on", |l| {
        l.unrecovered
    }),
    (
        "delay_reports_sent",
        "Delay reports (queueing-delay state) sent to the link's upstream",
        |l| l.delay_reports_sent,
    ),
    (
        "delay_reports_received",
        "Delay reports received from the link's downstream",
        |l| l.delay_reports_received,
    ),
    (
        "auth_failures",
        "Datagrams from the link's peer failing SRTP authentication",
        |l| l.auth_failures,
    ),
    (
        "duplicates",
        "Authentic datagrams that had already arrived (SRTP replay check): retransmissions racing a repaired original",
        |l| l.duplicates,
    ),
    (
        "nack_misses",
        "NACKed packets this hop did not hold (yet), so could not resend",
        |l| l.nack_misses,
    ),
    (
        "fec_sent",
        "FlexFEC repair packets sent on the link (links with fec on)",
        |l| l.fec_sent,
    ),
    (
        "fec_received",
        "FlexFEC repair packets received on the link",
        |l| l.fec_received,
    ),
    (
        "fec_recovered",
        "Missing packets rebuilt from a received FlexFEC repair packet (not NACKed)",
        |l| l.fec_recovered,
    ),
    (
        "red_sent",
        "Audio packets sent as RED with the previous packet as a redundant block",
        |l| l.red_sent,
    ),
    (
        "red_deep_sent",
        "Audio packets sent as RED with the two previous packets as redundant blocks (lossy links)",
        |l| l.red_deep_sent,
    ),
    (
        "red_recovered",
        "Missing audio packets rebuilt from a received RED block (not NACKed)",
        |l| l.red_recovered,
    ),
];

/// `ridge_mesh_*{peer}`: per mesh link, summed over shards.
fn encode_mesh_links(
    enc: &mut DescriptorEncoder,
    links: &[ridge_sfu::MeshLinkSnapshot],
) -> Result<(), std::fmt::Error> {
    let label = |l: &ridge_sfu::MeshLinkSnapshot| -> Labels {
        vec![("peer", l.peer.clone()), ("trusted", l.trusted.to_string())]
    };
    for (field, help, get) in MESH_COUNTERS {
        let rows: Vec<(Labels, u64)> = links.iter().map(|l| (label(l), get(l))).collect();
        counter(enc, &format!("ridge_mesh_{field}"), help, &rows)?;
    }
    let rtt: Vec<(Labels, f64)> = links
        .iter()
        .filter_map(|l| Some((label(l), l.rtt_us? as f64 / 1e6)))
        .collect();
    let budget: Vec<(Labels, f64)> = links
        .iter()
        .filter_map(|l| Some((label(l), l.budget_bps? as f64)))
        .collect();
    gauge(
        enc,
        "ridge_mesh_budget_bps",
        "Send budget of a link (loss- and delay-based), when one binds (layers above it are not sent)",
        &budget,
    )?;
    let delay_state: Vec<(Labels, f64)> = links
        .iter()
        .map(|l| (label(l), f64::from(l.delay_state)))
        .collect();
    gauge(
        enc,
        "ridge_mesh_delay_state",
        "What this node sends on a link, as the downstream's delay detector last reported it: 1 overuse (the link queues), 0 normal, -1 underuse",
        &delay_state,
    )?;
    let trend: Vec<(Labels, f64)> = links.iter().map(|l| (label(l), l.delay_trend)).collect();
    gauge(
        enc,
        "ridge_mesh_delay_trend",
        "What this node receives on a link: the delay detector's modified queueing-delay trend (over-use above its adaptive threshold, 6 to 600)",
        &trend,
    )?;
    let loss: Vec<(Labels, f64)> = links.iter().map(|l| (label(l), l.loss)).collect();
    gauge(
        enc,
        "ridge_mesh_loss_ratio",
        "Fraction of what was sent on a link that the downstream NACKed (last second)",
        &loss,
    )?;
    let fec_loss: Vec<(Labels, f64)> = links.iter().map(|l| (label(l), l.fec_loss)).collect();
    gauge(
        enc,
        "ridge_mesh_fec_loss_ratio",
        "Media loss on a link before FEC, as the sender infers it from the NACKs of what FEC left and the group size (the NACKed ratio where no FEC is sent)",
        &fec_loss,
    )?;
    let fec_group: Vec<(Labels, f64)> = links
        .iter()
        .filter(|l| l.fec_group > 0)
        .map(|l| (label(l), l.fec_group as f64))
        .collect();
    gauge(
        enc,
        "ridge_mesh_fec_group_size",
        "Video packets per FlexFEC repair packet on a link with fec on (2, 4 or 8, from its loss before FEC)",
        &fec_group,
    )?;
    let red_depth: Vec<(Labels, f64)> = links
        .iter()
        .filter(|l| l.red_depth > 0)
        .map(|l| (label(l), l.red_depth as f64))
        .collect();
    gauge(
        enc,
        "ridge_mesh_red_depth",
        "Previous audio packets each RED packet carries on a link with fec on (1, or 2 from 10 % audio loss before RED)",
        &red_depth,
    )?;
    let red_loss: Vec<(Labels, f64)> = links.iter().map(|l| (label(l), l.red_loss)).collect();
    gauge(
        enc,
        "ridge_mesh_red_loss_ratio",
        "Audio loss on a link before RED, as the sender infers it from the NACKs of what RED left and its depth",
        &red_loss,
    )?;
    gauge(
        enc,
        "ridge_mesh_nack_rtt_seconds",
        "Smoothed time from a NACK to its retransmission on the link",
        &rtt,
    )?;
    let rooms: Vec<(Labels, f64)> = links
        .iter()
        .flat_map(|l| {
            let mut out = label(l);
            out.push(("direction", "out".into()));
            let mut inn = label(l);
            inn.push(("direction", "in".into()));
            [(out, l.rooms_out as f64), (inn, l.rooms_in as f64)]
        })
        .collect();
    gauge(
        enc,
        "ridge_mesh_rooms",
        "Rooms carried on a mesh link, by direction",
        &rooms,
    )?;
    gauge(
        enc,
        "ridge_mesh_links",
        "Mesh links configured by the desired state",
        &[(vec![], links.len() as f64)],
    )
}

/// Encodes the registry in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
