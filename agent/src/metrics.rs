//! The agent's one Prometheus registry (`ridge_agent_*`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Live metrics, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub heartbeats: Family<ResultLabels, Counter>,
    pub heartbeats_early: Counter,
    pub enrolled: Gauge,
    pub enrollments: Family<ResultLabels, Counter>,
    pub watch_version: Gauge,
    pub applied_version: Gauge,
    pub scheduler_errors: Family<OpLabels, Counter>,
    pub control_errors: Family<OpLabels, Counter>,
    pub probes_sent: Counter,
    pub probes_answered: Counter,
    pub probes_rejected: Family<ReasonLabels, Counter>,
    pub probe_rtt: Family<PeerLabels, FloatGauge>,
    pub probe_loss: Family<PeerLabels, FloatGauge>,
    pub probe_jitter: Family<PeerLabels, FloatGauge>,
    pub link_state_changes: Family<StateLabels, Counter>,
}

impl Metrics {
    pub fn heartbeat(&self, result: &'static str) {
        self.heartbeats
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    pub fn scheduler_error(&self, op: &'static str) {
        self.scheduler_errors.get_or_create(&OpLabels { op }).inc();
    }
    pub fn control_error(&self, op: &'static str) {
        self.control_errors.get_or_create(&OpLabels { op }).inc();
    }
    pub fn probe_rejected(&self, reason: &'static str) {
        self.probes_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
    /// Counter value for a rejection reason (tests, logs).
    pub fn probe_rejected_count(&self, reason: &'static str) -> u64 {
        self.probes_rejected
            .get_or_create(&ReasonLabels { reason })
            .get()
    }
    pub fn heartbeat_count(&self, result: &'static str) -> u64 {
        self.heartbeats
            .get_or_create(&ResultLabels { result })
            .get()
    }
    /// A link went `"down"` or came back `"up"`.
    pub fn link_state_change(&self, state: &'static str) {
        self.link_state_changes
            .get_or_create(&StateLabels { state })
            .inc();
    }
    pub fn link_state_change_count(&self, state: &'static str) -> u64 {
        self.link_state_changes
            .get_or_create(&StateLabels { state })
            .get()
    }
}

/// Builds the registry and the handles.
pub fn registry() -> (Registry, Metrics) {
    let mut registry = Registry::default();
    let m = Metrics::default();
    let r = registry.sub_registry_with_prefix("ridge_agent");
    r.register(
        "heartbeats",
        "Heartbeats by result (ok, failed)",
        m.heartbeats.clone(),
    );
    r.register(
        "heartbeats_early",
        "Heartbeats sent before they were due because a link went down or came back up",
        m.heartbeats_early.clone(),
    );
    r.register(
        "enrolled",
        "1 once the node has an identity",
        m.enrolled.clone(),
    );
    r.register(
        "enrollments",
        "Enrollment attempts by result",
        m.enrollments.clone(),
    );
    r.register(
        "watch_version",
        "Latest desired-state version seen from the scheduler",
        m.watch_version.clone(),
    );
    r.register(
        "applied_version",
        "Desired-state version the dataplane accepted",
        m.applied_version.clone(),
    );
    r.register(
        "scheduler_errors",
        "Failed scheduler calls by operation",
        m.scheduler_errors.clone(),
    );
    r.register(
        "control_errors",
        "Failed control API calls to the dataplane by operation",
        m.control_errors.clone(),
    );
    r.register("probes_sent", "Link probes sent", m.probes_sent.clone());
    r.register(
        "probes_answered",
        "Valid probe replies received",
        m.probes_answered.clone(),
    );
    r.register(
        "probes_rejected",
        "Probe datagrams refused by reason (malformed, unknown_peer, bad_mac, unexpected)",
        m.probes_rejected.clone(),
    );
    r.register(
        "probe_rtt_seconds",
        "Mean probe round-trip time per peer",
        m.probe_rtt.clone(),
    );
    r.register(
        "probe_loss_ratio",
        "Probe loss per peer over the window",
        m.probe_loss.clone(),
    );
    r.register(
        "probe_jitter_seconds",
        "Probe RTT jitter per peer",
        m.probe_jitter.clone(),
    );
    r.register(
        "link_state_changes",
        "Links that went down (no probe answered for the down-after time) or came back up, by new state",
        m.link_state_changes.clone(),
    );
    (registry, m)
}

/// OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
