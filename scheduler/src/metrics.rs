//! The scheduler's one metrics registry (prefix `ridge_scheduler_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

/// A histogram family with a constructor.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Live metric handles.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_seconds: Histograms<RouteLabels>,
    pub errors: Family<CodeLabels, Counter>,
    pub enrollments: Family<CodeLabels, Counter>,
    pub heartbeats: Counter,
    pub nodes: Family<StateLabels, Gauge>,
    pub leader: Gauge,
    pub route_computations: Counter,
    pub route_computations_skipped: Counter,
    pub route_computation_seconds: Histogram,
    pub desired_updates: Counter,
    pub watchers: Gauge,
    pub dispatches: Family<CodeLabels, Counter>,
    pub tick_errors: Counter,
    pub draining: Gauge,
    pub link_state_changes: Counter,
    pub early_ticks: Counter,
    pub connections: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub connection_timeouts: Family<PhaseLabels, Counter>,
    pub accept_errors: Family<KindLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub long_polls_refused: Counter,
    pub node_urls_rejected: Family<ReasonLabels, Counter>,
}

/// Builds the registry and the handles.
pub fn registry() -> (Registry, Metrics) {
    let mut registry = Registry::default();
    let m = Metrics {
        http_requests: Family::default(),
        http_request_seconds: Family::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        }),
        errors: Family::default(),
        enrollments: Family::default(),
        heartbeats: Counter::default(),
        nodes: Family::default(),
        leader: Gauge::default(),
        route_computations: Counter::default(),
        route_computations_skipped: Counter::default(),
        route_computation_seconds: Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
        desired_updates: Counter::default(),
        watchers: Gauge::default(),
        dispatches: Family::default(),
        tick_errors: Counter::default(),
        draining: Gauge::default(),
        link_state_changes: Counter::default(),
        early_ticks: Counter::default(),
        connections: Gauge::default(),
        connections_refused: Family::default(),
        connection_timeouts: Family::default(),
        accept_errors: Family::default(),
        tls_handshake_failures: Counter::default(),
        long_polls_refused: Counter::default(),
        node_urls_rejected: Family::default(),
    };
    let r = registry.sub_registry_with_prefix("ridge_scheduler");
    r.register(
        "http_requests",
        "HTTP requests by route and status",
        m.http_requests.clone(),
    );
    r.register(
        "http_request_seconds",
        "Time from routing a request to its response, by route (after TLS and HTTP parsing; long polls included)",
        m.http_request_seconds.clone(),
    );
    r.register(
        "errors",
        "Error responses by code (auth failures, refused enrollments, bad bodies)",
        m.errors.clone(),
    );
    r.register(
        "enrollments",
        "Enrollment attempts by result (ok or the error code)",
        m.enrollments.clone(),
    );
    r.register("heartbeats", "Heartbeats accepted", m.heartbeats.clone());
    r.register("nodes", "Registered nodes by state", m.nodes.clone());
    r.register(
        "leader",
        "1 while this replica runs the scheduling jobs",
        m.leader.clone(),
    );
    r.register(
        "route_computations",
        "Route plan computations",
        m.route_computations.clone(),
    );
    r.register(
        "route_computations_skipped",
        "Leader ticks that kept the route plan: the mesh's structure (nodes up, dead links, rooms, addresses, drain) had not changed and the last plan was younger than the metric refresh",
        m.route_computations_skipped.clone(),
    );
    r.register(
        "route_computation_seconds",
        "Time to compute the route plan and desired states",
        m.route_computation_seconds.clone(),
    );
    r.register(
        "desired_updates",
        "Desired-state versions written",
        m.desired_updates.clone(),
    );
    r.register(
        "watchers",
        "Open desired-state long polls",
        m.watchers.clone(),
    );
    r.register(
        "dispatches",
        "Dispatch answers by result",
        m.dispatches.clone(),
    );
    r.register(
        "tick_errors",
        "Background ticks that failed (storage errors)",
        m.tick_errors.clone(),
    );
    r.register(
        "draining",
        "1 while the scheduler drains before exit",
        m.draining.clone(),
    );
    r.register(
        "link_state_changes",
        "Heartbeats whose set of dead links (loss 1.0) differs from the node's previous report",
        m.link_state_changes.clone(),
    );
    r.register(
        "early_ticks",
        "Ticks run before they were due because a link went down or came back up",
        m.early_ticks.clone(),
    );
    r.register(
        "connections",
        "Open client connections (TLS handshakes included)",
        m.connections.clone(),
    );
    r.register(
        "connections_refused",
        "Connections closed at accept because a cap was reached, by reason (total, per_source)",
        m.connections_refused.clone(),
    );
    r.register(
        "connection_timeouts",
        "Connections closed by a timeout, by phase (tls_handshake, header, idle)",
        m.connection_timeouts.clone(),
    );
    r.register(
        "accept_errors",
        "Failed accept calls by kind (emfile, enfile, nomem, aborted, other)",
        m.accept_errors.clone(),
    );
    r.register(
        "tls_handshake_failures",
        "TLS handshakes that failed (not timed out)",
        m.tls_handshake_failures.clone(),
    );
    r.register(
        "long_polls_refused",
        "Desired-state long polls refused with 429: the node already had max_long_polls_per_node open",
        m.long_polls_refused.clone(),
    );
    r.register(
        "node_urls_rejected",
        "Node-reported HTTP URLs left out of the registry, by reason (unparsable, scheme, credentials, host)",
        m.node_urls_rejected.clone(),
    );
    (registry, m)
}
