//! `shard_ports = "shared"`: every shard's socket is bound to the one media
//! address with `SO_REUSEPORT`, and ridge-ebpf's `ridge_steer` program (an
//! `SK_REUSEPORT` program over the group) sends each datagram to the shard
//! that owns its flow:
//!
//! - plain-RTP endpoints: their remote address is known when they are
//!   created, so [`crate::shard::handle::MediaHandle`] inserts (remote, local) →
//!   shard before asking the shard to create the endpoint, and removes it
//!   when the endpoint is removed;
//! - WebRTC sessions: the core writes its shard index into each local ICE
//!   ufrag (`ridge_sfu::shard_ufrag`), and the program reads it from the
//!   USERNAME of the first STUN binding request of an unknown 4-tuple and
//!   learns the flow, so the DTLS and SRTP that follow reach the same shard.
//!
//! This module owns its own [`RidgeBpf`] instance, used for steering only
//! (the XDP guard and forwarding, if any, are someone else's instance), and
//! is touched only from control paths, never per packet.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use ridge_ebpf::{Counters, RidgeBpf, SteerFlow};
use ridge_sfu::PeerId;

/// Why shared-port steering could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "shard_ports = \"shared\" needs the ridge_steer BPF program (root, or CAP_BPF + \
     CAP_NET_ADMIN), and it could not be set up: {0}; run as root or use \
     shard_ports = \"per-shard\" (--shard-ports per-shard)"
)]
pub struct SteeringError(String);

impl SteeringError {
    pub(crate) fn new(why: String) -> Self {
        Self(why)
    }
}

/// The steering program attached to the shards' socket group, and the
/// flow entries the dataplane made.
#[derive(Debug)]
pub struct SharedPort {
    inner: Mutex<Inner>,
    local: SocketAddr,
}

#[derive(Debug)]
struct Inner {
    bpf: RidgeBpf,
    /// Plain-RTP endpoints' entries, to remove with the endpoint.
    endpoints: HashMap<PeerId, SteerFlow>,
    /// Entries whose remote no live session had at the last sweep: removed
    /// if the next sweep finds them dead too (two rounds, so an entry the
    /// program has just learned, whose session the shard has not yet
    /// registered, is never taken away).
    suspects: HashSet<SteerFlow>,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl SharedPort {
    /// Loads the programs and attaches steering to `sockets` (one per shard,
    /// in shard order, all bound to `local` with `SO_REUSEPORT`). Unknown
    /// flows that are not STUN go to the kernel's hash.
    pub fn attach(sockets: &[OwnedFd], local: SocketAddr) -> Result<Arc<Self>, SteeringError> {
        let mut bpf = RidgeBpf::load().map_err(|e| SteeringError(chain(&e)))?;
        bpf.attach_steering(sockets)
            .map_err(|e| SteeringError(chain(&e)))?;
        bpf.steering()
            .set_default_shard(None)
            .map_err(|e| SteeringError(chain(&e)))?;
        tracing::info!(%local, shards = sockets.len(), "shared media port: BPF steering attached");
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                bpf,
                endpoints: HashMap::new(),
                suspects: HashSet::new(),
            }),
            local,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Steers datagrams from `remote` to `shard` (before its endpoint
    /// exists, so that its first datagram cannot go astray).
    pub fn insert(&self, remote: SocketAddr, shard: usize) -> Result<(), String> {
        let flow = SteerFlow {
            remote,
            local: self.local,
        };
        let shard = u32::try_from(shard).map_err(|e| e.to_string())?;
        self.lock()
            .bpf
            .steering()
            .insert(flow, shard)
            .map_err(|e| chain(&e))
    }

    /// Records that `peer` owns the entry for `remote`.
    pub fn bind_endpoint(&self, peer: PeerId, remote: SocketAddr) {
        let flow = SteerFlow {
            remote,
            local: self.local,
        };
        self.lock().endpoints.insert(peer, flow);
    }

    /// Removes the entry for `remote` (an endpoint that was not created).
    pub fn remove(&self, remote: SocketAddr) {
        let flow = SteerFlow {
            remote,
            local: self.local,
        };
        let mut inner = self.lock();
        if let Err(e) = inner.bpf.steering().remove(flow) {
            tracing::warn!(%remote, error = %chain(&e), "cannot remove a steering entry");
        }
    }

    /// Removes `peer`'s entry, if it is a plain-RTP endpoint with one.
    pub fn remove_endpoint(&self, peer: PeerId) {
        let mut inner = self.lock();
        let Some(flow) = inner.endpoints.remove(&peer) else {
            return;
        };
        // Another endpoint may have taken over the same remote since.
        if inner.endpoints.values().any(|f| *f == flow) {
            return;
        }
        if let Err(e) = inner.bpf.steering().remove(flow) {
            tracing::warn!(remote = %flow.remote, error = %chain(&e), "cannot remove a steering entry");
        }
    }

    /// Removes entries that no live session uses any more: WebRTC flows
    /// the program learned from STUN, and plain-RTP endpoints removed other
    /// than one by one (a participant leaving, drain). `live` is every
    /// remote address the shards have a session for. An entry goes once it
    /// has been dead for two sweeps in a row. Returns how many were removed.
    pub fn sweep(&self, live: &HashSet<SocketAddr>) -> usize {
        let mut inner = self.lock();
        let flows = match inner.bpf.steering().flows() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot list steering entries");
                return 0;
            }
        };
        // An endpoint's entry is made just before the shard creates the
        // endpoint; it is live again long before a second sweep.
        let dead: HashSet<SteerFlow> = flows
            .into_iter()
            .map(|(f, _)| f)
            .filter(|f| !live.contains(&f.remote))
            .collect();
        let expired: Vec<SteerFlow> = dead.intersection(&inner.suspects).copied().collect();
        let mut removed = 0;
        for flow in &expired {
            match inner.bpf.steering().remove(*flow) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(remote = %flow.remote, error = %chain(&e), "cannot remove a steering entry")
                }
            }
        }
        inner.endpoints.retain(|_, f| !expired.contains(f));
        inner.suspects = dead
            .difference(&expired.iter().copied().collect())
            .copied()
            .collect();
        removed
    }

    /// The program's counters.
    pub fn counters(&self) -> Option<Counters> {
        self.lock().bpf.counters().ok()
    }

    /// Flow entries in the table (dataplane-made and learned from STUN).
    pub fn flows(&self) -> usize {
        self.lock().bpf.steering().len().unwrap_or(0)
    }
}

/// `/metrics`: the steering program's counters.
#[derive(Debug)]
pub struct SteerCollector(pub Arc<SharedPort>);

/// (metric, help, accessor)
type SteerField = (&'static str, &'static str, fn(&Counters) -> u64);

const STEER_FIELDS: &[SteerField] = &[
    (
        "ridge_steer_flow",
        "Datagrams of known flows steered to their shard (shared media port)",
        |c| c.steer_flow,
    ),
    (
        "ridge_steer_stun_learned",
        "Unknown flows steered by the shard in their STUN USERNAME, and learned",
        |c| c.steer_stun_learned,
    ),
    (
        "ridge_steer_default",
        "Datagrams of unknown flows sent to the default shard",
        |c| c.steer_default,
    ),
    (
        "ridge_steer_hash",
        "Datagrams of unknown flows left to the kernel's reuseport hash",
        |c| c.steer_hash,
    ),
    (
        "ridge_steer_errors",
        "Steering failures: empty shard slot, unusable STUN request, full flow table",
        |c| c.steer_errors,
    ),
];

impl Collector for SteerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.counters() else {
            return Ok(());
        };
        for (name, help, get) in STEER_FIELDS {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(get(&c)).encode(m)?;
        }
        Ok(())
    }
}
