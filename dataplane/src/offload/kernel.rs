//! The kernel fast path in a running node (docs/architecture.md): the XDP
//! guard on the media interfaces, and forwarding of learned plain-RTP flows
//! in the kernel. "Learn in userspace, offload to the kernel": the shards'
//! cores say which plain-RTP streams they forward with a constant rewrite
//! (`Sfu::plain_flows`), and a reconcile task installs exactly those in
//! `ridge-ebpf`'s forwarding table, every [`RECONCILE_INTERVAL`] and on
//! every session change. Mesh transit streams (`Sfu::mesh_flows`: a
//! trusted link's stream relayed to exactly one other link) go to the
//! mesh table the same way: the kernel checks their SipHash tag, swaps the
//! link SSRC, re-signs and sends; each pass hands every shard the indices
//! the kernel reached (`Sfu::set_kernel_mesh_forwarded`). The same task
//! keeps the guard's rate-limit exemptions equal to the addresses of the
//! node's authenticated mesh peers (one peer carries many rooms, above any
//! per-client rate).
//!
//! All of it is control plane: [`RidgeBpf`] sits behind a std mutex that
//! only this module's task, `/metrics` and `/healthz` take; the packet path
//! never does. When anything fails (no privilege, no BPF, a driver without
//! XDP, a missing interface) the node logs one line and keeps relaying in
//! userspace; [`KernelPath::mode`] says what it got.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ridge_ebpf::{
    AttachMode, Counters, Destination, FlowCounters, FlowEntry, FlowKey, MAX_DESTINATIONS,
    MAX_RATE_EXEMPT_SOURCES, MeshFlowCounters, MeshFlowEntry, MeshFlowState, RateLimit, RidgeBpf,
    XdpProgram,
};
use ridge_sfu::{MeshFlow, MeshFlowProgress, PeerId, PlainFlow, SfuEvent};
use tokio::sync::broadcast;

use super::netinfo::{self, Tables};
use crate::config::{KernelConfig, XdpSetting};
use crate::shard::handle::MediaHandle;

/// How often the forwarding table is reconciled with the shards' flows
/// even without a session event (layer/source switches raise none).
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);

/// One in this many packets of a kernel-forwarded flow still goes through
/// userspace (keeps its NACK buffer, stats and liveness warm).
pub const SAMPLE_EVERY: u32 = 100;

/// Why a flow the core offered stays in userspace (a gauge per reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotOffloaded {
    /// A destination (or the publisher) is on a loopback address: XDP on
    /// `lo` is not a deployment, and the kernel forwards only real links.
    Loopback,
    /// IPv6: ridge-ebpf forwards IPv4 only.
    Ipv6,
    /// The shard socket is bound to a wildcard address: the address the
    /// publisher sends to is unknown.
    Wildcard,
    /// No route or no complete neighbour entry for a destination yet.
    Unresolved,
    /// Several destinations, but the TC fan-out program is not attached.
    FanoutUnavailable,
    /// The forwarding table refused the entry.
    InstallFailed,
}

impl NotOffloaded {
    pub const ALL: [NotOffloaded; 6] = [
        Self::Loopback,
        Self::Ipv6,
        Self::Wildcard,
        Self::Unresolved,
        Self::FanoutUnavailable,
        Self::InstallFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Ipv6 => "ipv6",
            Self::Wildcard => "wildcard",
            Self::Unresolved => "unresolved",
            Self::FanoutUnavailable => "fanout_unavailable",
            Self::InstallFailed => "install_failed",
        }
    }
}

/// One installed mesh transit entry: what identifies it (the indices the
/// offer carries move on and are not part of it).
#[derive(Clone, PartialEq, Eq)]
struct MeshInstalled {
    shard: usize,
    dest: Destination,
    keys: ([u8; 16], [u8; 16]),
}

impl std::fmt::Debug for MeshInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("MeshInstalled")
            .field("shard", &self.shard)
            .field("dest", &self.dest)
            .finish_non_exhaustive()
    }
}

/// One installed forwarding entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    shard: usize,
    publisher: PeerId,
    entry: FlowEntry,
}

struct Loaded {
    bpf: RidgeBpf,
    installed: HashMap<FlowKey, Installed>,
    /// Counters of entries already removed, so totals never go back.
    retired: FlowCounters,
    /// Per shard: the publishers last reported as kernel-forwarded.
    reported: Vec<Vec<PeerId>>,
    /// The mesh peer addresses last asked for as rate-exempt (what the
    /// guard holds is `bpf.guard().rate_exempt()`), so that a failure is
    /// logged once per change, not once per pass.
    exempt_wanted: Option<BTreeSet<IpAddr>>,
    mesh_installed: HashMap<FlowKey, MeshInstalled>,
    /// Counters of mesh entries already removed.
    mesh_retired: MeshFlowCounters,
    /// Shards told about kernel-forwarded mesh streams last pass.
    mesh_reported: BTreeSet<usize>,
}

/// A snapshot for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct KernelSnapshot {
    pub mode: &'static str,
    pub interfaces: Vec<(String, &'static str)>,
    pub counters: Option<Counters>,
    /// Per installed flow: key, destinations, counters.
    pub flows: Vec<(FlowKey, usize, FlowCounters)>,
    /// Sum over installed and removed flows.
    pub totals: FlowCounters,
    pub not_offloaded: Vec<(NotOffloaded, u64)>,
    pub install_errors: u64,
    /// Sources the guard does not rate-limit (mesh peers).
    pub rate_exempt_sources: usize,
    /// Mesh transit entries installed, and counters over installed and
    /// removed ones.
    pub mesh_flows: usize,
    pub mesh_totals: MeshFlowCounters,
}

/// The node's kernel fast path. Dropping it (or [`KernelPath::close`])
/// detaches the programs and empties the tables.
pub struct KernelPath {
    mode: AttachMode,
    interfaces: Vec<(String, AttachMode)>,
    forwarding: bool,
    fanout: bool,
    /// The guard is attached to some media interface with a rate limit:
    /// mesh peers are exempted from it.
    exempting: bool,
    loaded: Mutex<Option<Loaded>>,
    status: Mutex<Status>,
}

#[derive(Debug, Default)]
struct Status {
    not_offloaded: BTreeMap<NotOffloaded, u64>,
    install_errors: u64,
}

impl std::fmt::Debug for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPath")
            .field("mode", &self.mode)
            .field("interfaces", &self.interfaces)
            .field("forwarding", &self.forwarding)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The weakest of several attach modes (what every media packet can count on).
fn weakest(modes: impl IntoIterator<Item = AttachMode>) -> AttachMode {
    let rank = |m: AttachMode| match m {
        AttachMode::None => 0,
        AttachMode::Generic => 1,
        AttachMode::Native => 2,
    };
    modes
        .into_iter()
        .min_by_key(|m| rank(*m))
        .unwrap_or(AttachMode::None)
}

impl KernelPath {
    /// A kernel path that does nothing (mode none).
    pub fn none() -> Self {
        Self {
            mode: AttachMode::None,
            interfaces: Vec::new(),
            forwarding: false,
            fanout: false,
            exempting: false,
            loaded: Mutex::new(None),
            status: Mutex::new(Status::default()),
        }
    }

    /// Loads and attaches the programs for the bound shards. Never fails:
    /// every problem is one log line and a weaker mode.
    pub fn start(config: &KernelConfig, media: &MediaHandle) -> Self {
        if config.xdp == XdpSetting::Off {
            tracing::info!("kernel fast path off (xdp = \"off\"): media stays in userspace");
            return Self::none();
        }
        let udp = media.local_addr();
        let interfaces = if !config.media_interfaces.is_empty() {
            config.media_interfaces.clone()
        } else if udp.ip().is_unspecified() {
            // Config::warnings said so already.
            return Self::none();
        } else if udp.ip().is_loopback() {
            tracing::info!(
                udp = %udp,
                "kernel fast path off: media listens on loopback (name media_interfaces to \
                 attach anyway)"
            );
            return Self::none();
        } else {
            match netinfo::interface_owning(udp.ip()) {
                Ok(Some(name)) => vec![name],
                Ok(None) => {
                    tracing::warn!(
                        udp = %udp,
                        "kernel fast path off: no interface owns the udp address; set \
                         media_interfaces; media stays in userspace"
                    );
                    return Self::none();
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "kernel fast path off: cannot find the media interface ({e}); set \
                         media_interfaces; media stays in userspace"
                    );
                    return Self::none();
                }
            }
        };
        let mut bpf = match RidgeBpf::load() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "kernel fast path unavailable (cannot load the BPF programs: {e}); xdp \
                     mode none, media stays in userspace"
                );
                return Self::none();
            }
        };
        let ports: Vec<u16> = media.local_addrs().iter().map(SocketAddr::port).collect();
        let limit = (config.guard_rate_pps > 0).then_some(RateLimit {
            packets_per_second: config.guard_rate_pps,
            burst: config.guard_burst,
        });
        if let Err(e) = bpf
            .guard()
            .set_media_ports(&ports)
            .and_then(|()| bpf.guard().set_rate_limit(limit))
        {
            tracing::warn!(error = %e, "kernel fast path unavailable (cannot configure the guard: {e}); xdp mode none");
            return Self::none();
        }
        let program = if config.kernel_forwarding {
            XdpProgram::GuardAndForward
        } else {
            XdpProgram::Guard
        };
        let mut attached = Vec::new();
        for iface in &interfaces {
            // attach_xdp logs its own line when it falls back.
            let mode = bpf.attach_xdp(iface, program);
            attached.push((iface.clone(), mode));
        }
        let mode = weakest(attached.iter().map(|(_, m)| *m));
        let forwarding = config.kernel_forwarding && mode != AttachMode::None;
        let exempting = limit.is_some() && attached.iter().any(|(_, m)| *m != AttachMode::None);
        let mut fanout = forwarding;
        if forwarding {
            for (iface, _) in &attached {
                if let Err(e) = bpf.attach_tc_fanout(iface) {
                    tracing::warn!(
                        iface,
                        error = %e,
                        "cannot attach the TC fan-out program: flows with several \
                         subscribers stay in userspace"
                    );
                    fanout = false;
                }
            }
        }
        tracing::info!(
            mode = mode.as_str(),
            interfaces = ?attached.iter().map(|(i, m)| format!("{i}:{m}")).collect::<Vec<_>>(),
            ports = ?ports,
            rate_pps = config.guard_rate_pps,
            burst = config.guard_burst,
            forwarding,
            "kernel fast path: xdp mode {}",
            mode.as_str()
        );
        Self {
            mode,
            interfaces: attached,
            forwarding,
            fanout,
            exempting,
            loaded: Mutex::new(Some(Loaded {
                bpf,
                installed: HashMap::new(),
                retired: FlowCounters::default(),
                reported: vec![Vec::new(); media.shard_count()],
                exempt_wanted: None,
                mesh_installed: HashMap::new(),
                mesh_retired: MeshFlowCounters::default(),
                mesh_reported: BTreeSet::new(),
            })),
            status: Mutex::new(Status::default()),
        }
    }

    /// The XDP mode every media interface has at least.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Whether learned flows are installed in the kernel.
    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// Installed forwarding entries.
    pub fn flow_count(&self) -> usize {
        lock(&self.loaded).as_ref().map_or(0, |l| l.installed.len())
    }

    /// Detaches everything and empties the tables (as dropping does).
    pub fn close(&self) {
        let loaded = lock(&self.loaded).take();
        drop(loaded);
    }

    /// Counters and per-flow state for `/metrics`.
    pub fn snapshot(&self) -> KernelSnapshot {
        let mut snap = KernelSnapshot {
            mode: self.mode.as_str(),
            interfaces: self
                .interfaces
                .iter()
                .map(|(i, m)| (i.clone(), m.as_str()))
                .collect(),
            ..KernelSnapshot::default()
        };
        {
            let status = lock(&self.status);
            snap.not_offloaded = NotOffloaded::ALL
                .iter()
                .map(|r| (*r, status.not_offloaded.get(r).copied().unwrap_or(0)))
                .collect();
            snap.install_errors = status.install_errors;
        }
        let mut guard = lock(&self.loaded);
        let Some(l) = guard.as_mut() else {
            return snap;
        };
        snap.counters = l.bpf.counters().ok();
        snap.rate_exempt_sources = l.bpf.guard().rate_exempt().len();
        let mut totals = l.retired;
        if let Ok(list) = l.bpf.flows().list() {
            for (key, c) in list {
                add(&mut totals, &c);
                let n = l
                    .installed
                    .get(&key)
                    .map_or(0, |i| i.entry.destinations.len());
                snap.flows.push((key, n, c));
            }
        }
        snap.flows.sort_by_key(|(k, _, _)| (k.src, k.dst, k.ssrc));
        snap.totals = totals;
        let mut mesh = l.mesh_retired;
        let keys: Vec<FlowKey> = l.mesh_installed.keys().copied().collect();
        for key in keys {
            if let Ok(Some(st)) = l.bpf.mesh_flows().state(key) {
                add_mesh(&mut mesh, &st.counters);
            }
        }
        snap.mesh_flows = l.mesh_installed.len();
        snap.mesh_totals = mesh;
        snap
    }

    /// Reconciles the forwarding table with the shards' flows, and the
    /// guard's rate exemptions with the mesh peers, until the node closes
    /// the kernel path or the shards stop.
    pub async fn run(self: Arc<Self>, media: MediaHandle) {
        if !self.forwarding && !self.exempting {
            return;
        }
        let mut events = media.subscribe_events();
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(SfuEvent::PeerConnected { .. }
                        | SfuEvent::PeerClosed { .. }
                        | SfuEvent::TrackPublished { .. }
                        | SfuEvent::TrackUnpublished { .. }) => {}
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
            if self.exempting {
                let Some(peers) = media.mesh_peer_addrs().await else {
                    return;
                };
                if self.set_rate_exempt(&peers).is_none() {
                    return;
                }
            }
            if !self.forwarding {
                continue;
            }
            let Some(flows) = media.plain_flows(MAX_DESTINATIONS).await else {
                return;
            };
            let tables = match tokio::task::spawn_blocking(Tables::read).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the route/neighbour tables");
                    Tables::default()
                }
                Err(_) => return,
            };
            let Some(reports) = self.reconcile(&flows, &tables) else {
                return;
            };
            for (shard, publishers) in reports {
                media.set_kernel_forwarded(shard, publishers).await;
            }
            let Some(mesh) = media.mesh_flows().await else {
                return;
            };
            let Some(progress) = self.reconcile_mesh(&mesh, &tables) else {
                return;
            };
            for (shard, p) in progress {
                media.set_kernel_mesh_forwarded(shard, p).await;
            }
        }
    }

    /// One pass over the mesh transit table: installs what the shards
    /// offer and the kernel can take, removes what they no longer offer,
    /// and returns per shard what the kernel did (the shards that had or
    /// have kernel-forwarded streams), or `None` once the path is closed.
    fn reconcile_mesh(
        &self,
        flows: &[Vec<MeshFlow>],
        tables: &Tables,
    ) -> Option<Vec<(usize, Vec<MeshFlowProgress>)>> {
        let mut not_offloaded: BTreeMap<NotOffloaded, u64> = BTreeMap::new();
        let mut desired: HashMap<FlowKey, (MeshInstalled, MeshFlowEntry)> = HashMap::new();
        for (shard, shard_flows) in flows.iter().enumerate() {
            for flow in shard_flows {
                match mesh_entry_for(flow, tables) {
                    Ok((key, entry)) => {
                        let id = MeshInstalled {
                            shard,
                            dest: entry.dest,
                            keys: (entry.in_key, entry.out_key),
                        };
                        desired.insert(key, (id, entry));
                    }
                    Err(reason) => *not_offloaded.entry(reason).or_default() += 1,
                }
            }
        }
        let mut guard = lock(&self.loaded);
        let l = guard.as_mut()?;
        let mut progress: BTreeMap<usize, Vec<MeshFlowProgress>> = BTreeMap::new();
        let stale: Vec<FlowKey> = l
            .mesh_installed
            .iter()
            .filter(|(k, v)| desired.get(*k).map(|(id, _)| id) != Some(*v))
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            let Some(was) = l.mesh_installed.remove(&key) else {
                continue;
            };
            match l.bpf.mesh_flows().remove(key) {
                Ok(Some(st)) => {
                    add_mesh(&mut l.mesh_retired, &st.counters);
                    progress
                        .entry(was.shard)
                        .or_default()
                        .push(mesh_progress(key, &was, &st, false));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(?key, error = %e, "cannot remove a kernel mesh flow"),
            }
            tracing::debug!(?key, "kernel mesh flow removed");
        }
        let mut install_errors = 0u64;
        for (key, (id, entry)) in desired {
            if !l.mesh_installed.contains_key(&key) {
                match l.bpf.mesh_flows().insert(key, &entry) {
                    Ok(()) => {
                        tracing::debug!(?key, dest = %entry.dest.dst, "kernel mesh flow installed");
                        l.mesh_installed.insert(key, id);
                    }
                    Err(e) => {
                        install_errors += 1;
                        *not_offloaded
                            .entry(NotOffloaded::InstallFailed)
                            .or_default() += 1;
                        tracing::warn!(?key, error = %e, "cannot install a kernel mesh flow; it stays in userspace");
                    }
                }
            }
        }
        let installed: Vec<(FlowKey, MeshInstalled)> = l
            .mesh_installed
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (key, id) in installed {
            if let Ok(Some(st)) = l.bpf.mesh_flows().state(key) {
                progress
                    .entry(id.shard)
                    .or_default()
                    .push(mesh_progress(key, &id, &st, true));
            }
        }
        // Shards that had kernel-forwarded streams hear that they have none.
        let now: BTreeSet<usize> = progress.keys().copied().collect();
        for shard in l.mesh_reported.difference(&now) {
            progress.entry(*shard).or_default();
        }
        l.mesh_reported = now;
        drop(guard);
        let mut status = lock(&self.status);
        for (reason, n) in not_offloaded {
            *status.not_offloaded.entry(reason).or_default() += n;
        }
        status.install_errors += install_errors;
        Some(progress.into_iter().collect())
    }

    /// Makes the guard's rate-exempt sources the IPs of `peers` (the mesh
    /// links' remote sockets) when they changed; logs once per change.
    /// `None` once the kernel path is closed.
    fn set_rate_exempt(&self, peers: &[SocketAddr]) -> Option<()> {
        let (wanted, dropped) = exempt_sources(peers);
        let mut guard = lock(&self.loaded);
        let l = guard.as_mut()?;
        let held: BTreeSet<IpAddr> = l.bpf.guard().rate_exempt().into_iter().collect();
        if held == wanted {
            l.exempt_wanted = Some(wanted);
            return Some(());
        }
        let new_change = l.exempt_wanted.as_ref() != Some(&wanted);
        let addrs: Vec<IpAddr> = wanted.iter().copied().collect();
        match l.bpf.guard().set_rate_exempt(&addrs) {
            Ok(()) => {
                if dropped > 0 && new_change {
                    tracing::warn!(
                        dropped,
                        "more mesh peer addresses than the XDP guard can exempt \
                         ({MAX_RATE_EXEMPT_SOURCES}): {dropped} stay rate-limited"
                    );
                }
                tracing::info!(
                    count = addrs.len(),
                    "xdp guard: {} mesh peer address(es) exempt from the rate limit",
                    addrs.len()
                );
            }
            Err(e) => {
                if new_change {
                    tracing::warn!(
                        count = addrs.len(),
                        error = %e,
                        "cannot exempt mesh peers from the XDP guard's rate limit ({e}); \
                         retrying every pass"
                    );
                }
            }
        }
        l.exempt_wanted = Some(wanted);
        Some(())
    }

    /// One reconcile pass. Returns the per-shard publisher sets that
    /// changed, or `None` once the kernel path is closed.
    fn reconcile(
        &self,
        flows: &[Vec<PlainFlow>],
        tables: &Tables,
    ) -> Option<Vec<(usize, Vec<PeerId>)>> {
        let mut not_offloaded: BTreeMap<NotOffloaded, u64> = BTreeMap::new();
        let mut desired: HashMap<FlowKey, Installed> = HashMap::new();
        for (shard, shard_flows) in flows.iter().enumerate() {
            for flow in shard_flows {
                match entry_for(flow, tables, self.fanout) {
                    Ok((key, entry)) => {
                        desired.insert(
                            key,
                            Installed {
                                shard,
                                publisher: flow.publisher,
                                entry,
                            },
                        );
                    }
                    Err(reason) => *not_offloaded.entry(reason).or_default() += 1,
                }
            }
        }
        let mut guard = lock(&self.loaded);
        let l = guard.as_mut()?;
        let mut install_errors = 0u64;
        // Remove what is gone or changed; a changed entry is replaced below.
        let stale: Vec<FlowKey> = l
            .installed
            .iter()
            .filter(|(k, v)| desired.get(*k) != Some(*v))
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            match l.bpf.flows().remove(key) {
                Ok(Some(c)) => add(&mut l.retired, &c),
                Ok(None) => {}
                Err(e) => tracing::warn!(?key, error = %e, "cannot remove a kernel flow"),
            }
            l.installed.remove(&key);
        }
        for (key, want) in desired {
            if l.installed.contains_key(&key) {
                continue;
            }
            match l.bpf.flows().insert(key, &want.entry) {
                Ok(()) => {
                    tracing::debug!(
                        ?key,
                        destinations = want.entry.destinations.len(),
                        "kernel flow installed"
                    );
                    l.installed.insert(key, want);
                }
                Err(e) => {
                    install_errors += 1;
                    *not_offloaded
                        .entry(NotOffloaded::InstallFailed)
                        .or_default() += 1;
                    tracing::warn!(?key, error = %e, "cannot install a kernel flow; it stays in userspace");
                }
            }
        }
        // Tell each shard which of its publishers the kernel now forwards.
        let mut by_shard: Vec<Vec<PeerId>> = vec![Vec::new(); l.reported.len()];
        for v in l.installed.values() {
            if let Some(s) = by_shard.get_mut(v.shard) {
                s.push(v.publisher);
            }
        }
        let mut changed = Vec::new();
        for (shard, mut now) in by_shard.into_iter().enumerate() {
            now.sort();
            now.dedup();
            if l.reported[shard] != now {
                l.reported[shard] = now.clone();
                changed.push((shard, now));
            }
        }
        drop(guard);
        let mut status = lock(&self.status);
        status.not_offloaded = not_offloaded;
        status.install_errors += install_errors;
        Some(changed)
    }
}

/// What the kernel did with one mesh flow, for its shard.
fn mesh_progress(
    key: FlowKey,
    id: &MeshInstalled,
    st: &MeshFlowState,
    forwarded: bool,
) -> MeshFlowProgress {
    MeshFlowProgress {
        source: SocketAddr::V4(key.src),
        ssrc: key.ssrc,
        out_ssrc: id.dest.ssrc,
        in_highest: st.in_highest,
        out_highest: st.out_highest,
        packets: st.counters.packets,
        forwarded,
    }
}

/// Where a flow's packets go: the destination with its resolved path, or
/// why the kernel cannot send there.
fn resolve(
    remote: SocketAddr,
    tables: &Tables,
) -> Result<(SocketAddrV4, netinfo::L2Path), NotOffloaded> {
    let dst = match remote {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddrV4::new(ip, v6.port()),
            None => return Err(NotOffloaded::Ipv6),
        },
    };
    if dst.ip().is_loopback() || IpAddr::V4(*dst.ip()).is_unspecified() {
        return Err(NotOffloaded::Loopback);
    }
    // No route, no complete neighbour entry, or an unreadable interface:
    // wait; the next pass tries again.
    let path = tables
        .resolve(*dst.ip())
        .map_err(|_| NotOffloaded::Unresolved)?;
    Ok((dst, path))
}

/// The flow key of packets from `source` to `local`, or why the kernel
/// cannot match them.
fn flow_key(source: SocketAddr, local: SocketAddr, ssrc: u32) -> Result<FlowKey, NotOffloaded> {
    let (SocketAddr::V4(src), SocketAddr::V4(local)) = (source, local) else {
        return Err(NotOffloaded::Ipv6);
    };
    if local.ip().is_unspecified() {
        return Err(NotOffloaded::Wildcard);
    }
    if src.ip().is_loopback() || local.ip().is_loopback() {
        return Err(NotOffloaded::Loopback);
    }
    Ok(FlowKey {
        src,
        dst: local,
        ssrc,
    })
}

/// `at` on CLOCK_MONOTONIC, in ns (the clock of `Instant` and of the BPF
/// programs' `bpf_ktime_get_ns`); `None` if the clock cannot be read.
fn monotonic_ns(at: Instant) -> Option<u64> {
    // The `Instant` is read before the clock, so the result lands at or just
    // after `at` (by the time between the two reads), never before it.
    let reference = Instant::now();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_ns = u64::try_from(Duration::from(now).as_nanos()).ok()?;
    let ago = u64::try_from(reference.saturating_duration_since(at).as_nanos()).ok()?;
    now_ns.checked_sub(ago)
}

/// The mesh table entry for one transit flow, or why there is none.
fn mesh_entry_for(
    flow: &MeshFlow,
    tables: &Tables,
) -> Result<(FlowKey, MeshFlowEntry), NotOffloaded> {
    let key = flow_key(flow.source, flow.local, flow.ssrc)?;
    let (dst, path) = resolve(flow.dest, tables)?;
    Ok((
        key,
        MeshFlowEntry {
            in_key: flow.in_key,
            out_key: flow.out_key,
            dest: Destination {
                dst,
                src: key.dst,
                ssrc: flow.out_ssrc,
                seq_offset: 0,
                ts_offset: 0,
                ifindex: path.ifindex,
                dst_mac: path.dst_mac,
                src_mac: path.src_mac,
            },
            in_highest: flow.in_highest,
            out_highest: flow.out_highest,
            send_epoch_ns: monotonic_ns(flow.send_epoch),
        },
    ))
}

/// The forwarding entry for one flow, or why there is none. `fanout`: the
/// TC program is attached (needed for two or more destinations).
fn entry_for(
    flow: &PlainFlow,
    tables: &Tables,
    fanout: bool,
) -> Result<(FlowKey, FlowEntry), NotOffloaded> {
    let key = flow_key(flow.source, flow.local, flow.ssrc)?;
    if flow.destinations.len() > 1 && !fanout {
        return Err(NotOffloaded::FanoutUnavailable);
    }
    let mut destinations = Vec::with_capacity(flow.destinations.len());
    for d in &flow.destinations {
        let (dst, path) = resolve(d.remote, tables)?;
        destinations.push(Destination {
            dst,
            src: key.dst,
            ssrc: d.ssrc,
            seq_offset: d.seq_offset,
            ts_offset: d.ts_offset,
            ifindex: path.ifindex,
            dst_mac: path.dst_mac,
            src_mac: path.src_mac,
        });
    }
    Ok((
        key,
        FlowEntry {
            destinations,
            sample_every: SAMPLE_EVERY,
        },
    ))
}

/// The source addresses to exempt for these mesh peer sockets: their IPs
/// (IPv4-mapped IPv6 as IPv4, each once), at most the guard's bound (the
/// lowest, so the choice is stable); and how many were left out.
fn exempt_sources(peers: &[SocketAddr]) -> (BTreeSet<IpAddr>, usize) {
    let mut all: BTreeSet<IpAddr> = peers.iter().map(|a| a.ip().to_canonical()).collect();
    let dropped = all.len().saturating_sub(MAX_RATE_EXEMPT_SOURCES);
    while all.len() > MAX_RATE_EXEMPT_SOURCES {
        all.pop_last();
    }
    (all, dropped)
}

fn add_mesh(total: &mut MeshFlowCounters, c: &MeshFlowCounters) {
    total.packets += c.packets;
    total.bytes += c.bytes;
    total.bad_tag += c.bad_tag;
    total.too_old += c.too_old;
    total.passed += c.passed;
}

fn add(total: &mut FlowCounters, c: &FlowCounters) {
    total.packets += c.packets;
    total.bytes += c.bytes;
    total.copies += c.copies;
    total.sampled += c.sampled;
    total.errors += c.errors;
}

#[cfg(test)]
mod tests {
    use super::*;

    use ridge_sfu::{PlainFlowDestination, TrackId};

    /// Routes everything via `lo` (present on every host, so its sysfs
    /// index and MAC can be read) and knows one neighbour.
    fn tables() -> Tables {
        Tables {
            routes: netinfo::parse_routes(
                "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                 lo\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\n",
            ),
            neighbours: netinfo::parse_arp(
                "IP address HW type Flags HW address Mask Device\n\
                 10.0.0.7 0x1 0x2 02:00:00:00:00:07 * lo\n",
            ),
        }
    }

    fn flow(dests: &[&str]) -> PlainFlow {
        PlainFlow {
            publisher: PeerId(1),
            track: TrackId(2),
            source: "10.0.0.5:4000".parse().unwrap(),
            local: "10.0.0.1:5004".parse().unwrap(),
            ssrc: 0x1234,
            destinations: dests
                .iter()
                .enumerate()
                .map(|(i, d)| PlainFlowDestination {
                    peer: PeerId(10 + i as u64),
                    remote: d.parse().unwrap(),
                    ssrc: 0xb0 + i as u32,
                    seq_offset: 100 + i as u16,
                    ts_offset: 9000 + i as u32,
                })
                .collect(),
        }
    }

    #[test]
    fn an_entry_carries_the_cores_rewrite_and_the_resolved_path() {
        let (key, entry) = entry_for(&flow(&["10.0.0.7:6000"]), &tables(), false).unwrap();
        assert_eq!(
            key,
            FlowKey {
                src: "10.0.0.5:4000".parse().unwrap(),
                dst: "10.0.0.1:5004".parse().unwrap(),
                ssrc: 0x1234
            }
        );
        assert_eq!(entry.sample_every, SAMPLE_EVERY);
        let (lo_index, lo_mac) = netinfo::link("lo").unwrap();
        assert_eq!(
            entry.destinations,
            vec![Destination {
                dst: "10.0.0.7:6000".parse().unwrap(),
                src: "10.0.0.1:5004".parse().unwrap(),
                ssrc: 0xb0,
                seq_offset: 100,
                ts_offset: 9000,
                ifindex: lo_index,
                dst_mac: [2, 0, 0, 0, 0, 7],
                src_mac: lo_mac,
            }]
        );
    }

    #[test]
    fn flows_the_kernel_cannot_take_say_why() {
        let t = tables();
        let e = |f: &PlainFlow, fanout| entry_for(f, &t, fanout).map(|_| ()).unwrap_err();
        // No neighbour entry for .8 yet.
        assert_eq!(
            e(&flow(&["10.0.0.8:6000"]), false),
            NotOffloaded::Unresolved
        );
        // No route at all.
        assert_eq!(
            e(&flow(&["192.0.2.1:6000"]), false),
            NotOffloaded::Unresolved
        );
        // One unresolved destination keeps the whole flow in userspace.
        assert_eq!(
            e(&flow(&["10.0.0.7:6000", "10.0.0.8:6000"]), true),
            NotOffloaded::Unresolved
        );
        assert_eq!(
            e(&flow(&["10.0.0.7:6000", "10.0.0.7:6002"]), false),
            NotOffloaded::FanoutUnavailable
        );
        assert!(entry_for(&flow(&["10.0.0.7:6000", "10.0.0.7:6002"]), &t, true).is_ok());
        assert_eq!(e(&flow(&["127.0.0.1:6000"]), false), NotOffloaded::Loopback);
        assert_eq!(e(&flow(&["[2001:db8::1]:6000"]), false), NotOffloaded::Ipv6);
        let mut wild = flow(&["10.0.0.7:6000"]);
        wild.local = "0.0.0.0:5004".parse().unwrap();
        assert_eq!(e(&wild, false), NotOffloaded::Wildcard);
        let mut v6 = flow(&["10.0.0.7:6000"]);
        v6.source = "[2001:db8::5]:4000".parse().unwrap();
        assert_eq!(e(&v6, false), NotOffloaded::Ipv6);
    }

    #[test]
    fn mesh_peers_become_one_exempt_source_per_address() {
        let peers: Vec<SocketAddr> = [
            "192.0.2.7:5004",
            "192.0.2.7:5005",
            "[::ffff:192.0.2.7]:5006",
            "192.0.2.9:5004",
            "[2001:db8::1]:5004",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let (set, dropped) = exempt_sources(&peers);
        let want: BTreeSet<IpAddr> = ["192.0.2.7", "192.0.2.9", "2001:db8::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!((set, dropped), (want, 0));
        assert_eq!(exempt_sources(&[]), (BTreeSet::new(), 0));

        let many: Vec<SocketAddr> = (0..MAX_RATE_EXEMPT_SOURCES as u32 + 3)
            .map(|i| SocketAddr::new(IpAddr::V4((0x0a00_0000 + i).into()), 5004))
            .collect();
        let (set, dropped) = exempt_sources(&many);
        assert_eq!((set.len(), dropped), (MAX_RATE_EXEMPT_SOURCES, 3));
        assert_eq!(set.first(), Some(&IpAddr::V4(0x0a00_0000.into())));
    }

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let read = || {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
            Duration::from(t).as_nanos() as u64
        };
        let before = read();
        let now = monotonic_ns(Instant::now()).unwrap();
        let after = read();
        assert!((before..=after).contains(&now), "{before} {now} {after}");
        let earlier = Instant::now() - Duration::from_secs(1);
        let then = monotonic_ns(earlier).unwrap();
        let second = read() - then;
        assert!(
            (1_000_000_000..1_100_000_000).contains(&second),
            "{second} ns since an instant 1 s ago"
        );
    }

    #[test]
    fn the_weakest_mode_is_reported() {
        use AttachMode::*;
        assert_eq!(weakest([Native, Native]), Native);
        assert_eq!(weakest([Native, Generic]), Generic);
        assert_eq!(weakest([Generic, None, Native]), None);
        assert_eq!(weakest([]), None);
    }

    #[test]
    fn a_kernel_path_that_is_off_reports_none_and_no_flows() {
        let k = KernelPath::none();
        assert_eq!(k.mode(), AttachMode::None);
        assert_eq!(k.flow_count(), 0);
        assert!(!k.forwarding());
        let s = k.snapshot();
        assert_eq!(s.mode, "none");
        assert!(s.counters.is_none());
        assert_eq!(s.rate_exempt_sources, 0);
        assert_eq!(
            k.set_rate_exempt(&["192.0.2.7:5004".parse().unwrap()]),
            None
        );
        k.close();
    }
}
