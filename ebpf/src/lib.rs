//! Ridge's kernel fast path: BPF programs written in C (`bpf/ridge.bpf.c`,
//! compiled by `build.rs` with `clang -O2 -g -target bpf`) and loaded with
//! aya.
//!
//! | program | hook | what it does |
//! |---|---|---|
//! | `ridge_guard` | XDP | drops malformed and over-rate packets on media ports, counts why |
//! | `ridge_xdp` | XDP | the guard, then verifies, rewrites, re-signs and sends installed mesh transit flows (SRTP `NULL_SIPHASH24_80`), and rewrites and sends installed single-destination plain-RTP flows (`XDP_TX`/`XDP_REDIRECT`) |
//! | `ridge_fanout` | TC ingress | sends installed 1→N flows to each destination (`bpf_clone_redirect`) |
//! | `ridge_steer` | `SK_REUSEPORT` | sends each datagram to the shard socket that owns its flow |
//!
//! [`RidgeBpf::load`] loads all four (so a verifier rejection shows at
//! start-up, not at attach time); the maps are reached through
//! [`RidgeBpf::guard`], [`RidgeBpf::steering`], [`RidgeBpf::flows`] and
//! [`RidgeBpf::mesh_flows`], and
//! [`RidgeBpf::counters`] sums the per-CPU counters. Dropping [`RidgeBpf`]
//! detaches everything and empties the tables.
//!
//! Attaching XDP never fails: [`RidgeBpf::attach_xdp`] tries native mode,
//! then generic mode, and reports the [`AttachMode`] it got (possibly
//! [`AttachMode::None`]: then every packet takes the userspace path).
//!
//! Everything here needs `CAP_BPF`/`CAP_NET_ADMIN` (root, in practice).
//!
//! Apart from the relay's programs, [`Impairment`] puts random packet loss
//! on an interface (`ridge_impair`, a TC program in its own object) for
//! tests and benchmarks on kernels without netem.
//!
//! ```no_run
//! use std::net::UdpSocket;
//! use ridge_ebpf::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let shard_sockets: Vec<UdpSocket> = Vec::new();
//! let mut bpf = RidgeBpf::load()?;
//! bpf.guard().set_media_ports(&[5004])?;
//! bpf.guard().set_rate_limit(Some(RateLimit { packets_per_second: 2000, burst: 200 }))?;
//! bpf.guard().set_rate_exempt(&["192.0.2.50".parse()?])?; // a peer node: never rate-limited
//! let mode = bpf.attach_xdp("eth0", XdpProgram::GuardAndForward);
//! println!("xdp mode: {}", mode.as_str());
//! bpf.attach_tc_fanout("eth0")?;
//!
//! bpf.attach_steering(&shard_sockets)?;
//! let flow = SteerFlow { remote: "192.0.2.7:40000".parse()?, local: "198.51.100.1:5004".parse()? };
//! bpf.steering().insert(flow, 1)?;
//!
//! let key = FlowKey { src: "192.0.2.7:40000".parse()?, dst: "198.51.100.1:5004".parse()?, ssrc: 0x1234 };
//! bpf.flows().insert(key, &FlowEntry {
//!     destinations: vec![Destination {
//!         dst: "203.0.113.9:6000".parse()?,
//!         src: "198.51.100.1:5004".parse()?,
//!         ssrc: 0x5678,
//!         seq_offset: 0,
//!         ts_offset: 0,
//!         ifindex: 2,
//!         dst_mac: [0x02, 0, 0, 0, 0, 1],
//!         src_mac: [0x02, 0, 0, 0, 0, 2],
//!     }],
//!     sample_every: 100,
//! })?;
//! if let Some(c) = bpf.flows().counters(key)? {
//!     println!("{} packets forwarded in the kernel", c.packets);
//! }
//!
//! // A mesh transit flow: SRTP (NULL_SIPHASH24_80) from an upstream node,
//! // verified, given the downstream SSRC, re-signed and sent in XDP.
//! let upstream = FlowKey { src: "192.0.2.50:5004".parse()?, dst: "198.51.100.1:5004".parse()?, ssrc: 0x4242 };
//! bpf.mesh_flows().insert(upstream, &MeshFlowEntry {
//!     in_key: [1; 16],
//!     out_key: [2; 16],
//!     dest: Destination {
//!         dst: "203.0.113.60:5004".parse()?,
//!         src: "198.51.100.1:5004".parse()?,
//!         ssrc: 0x4343,
//!         seq_offset: 0,
//!         ts_offset: 0,
//!         ifindex: 2,
//!         dst_mac: [0x02, 0, 0, 0, 0, 3],
//!         src_mac: [0x02, 0, 0, 0, 0, 2],
//!     },
//!     in_highest: Some(70_000),
//!     out_highest: Some(12_000),
//!     // The core's epoch on CLOCK_MONOTONIC: restamps abs-send-time.
//!     send_epoch_ns: Some(5_000_000_000),
//! })?;
//! if let Some(last) = bpf.mesh_flows().remove(upstream)? {
//!     println!("upstream index now {:?}, downstream {:?}", last.in_highest, last.out_highest);
//! }
//! for (reason, n) in bpf.counters()?.drops_by_reason() {
//!     println!("dropped {reason}: {n}");
//! }
//! # Ok(())
//! # }
//! ```

mod attach;
mod error;
mod forward;
mod guard;
mod impair;
mod mesh;
mod steer;
mod sys;
mod test_run;
mod types;

use std::os::fd::AsFd;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, ReusePortSockArray};
use aya::programs::{SchedClassifier, SkReuseport, Xdp};
use aya::{Ebpf, EbpfLoader};

pub use attach::{AttachMode, TcAttachKind, XdpProgram};
pub use error::{Error, MeshEntryError, Result};
pub use forward::{Destination, FlowCounters, FlowEntry, FlowKey, FlowTable, MAX_DESTINATIONS};
pub use guard::{Guard, MAX_RATE_EXEMPT_SOURCES, RateLimit};
pub use impair::{ImpairCounters, Impairment, LOSS_ALL_PPM, TcDirection, parse_loss};
pub use mesh::{MAX_MESH_FLOWS, MeshFlowCounters, MeshFlowEntry, MeshFlowState, MeshFlowTable};
pub use steer::{SteerFlow, Steering};
pub use test_run::{TestProgram, TestRunOutput, tc as tc_verdict, xdp as xdp_verdict};

use types::stat;

/// The compiled BPF object.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ridge.bpf.o"));

pub(crate) const PROG_GUARD: &str = "ridge_guard";
pub(crate) const PROG_XDP: &str = "ridge_xdp";
pub(crate) const PROG_FANOUT: &str = "ridge_fanout";
pub(crate) const PROG_STEER: &str = "ridge_steer";
const STATS_MAP: &str = "ridge_stats";

/// Totals of the programs' counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Guard drops: frame shorter than the IP header's total length.
    pub drop_truncated: u64,
    /// Guard drops: IP total/payload length too small for a UDP header.
    pub drop_bad_ip_length: u64,
    /// Guard drops: UDP length differs from the IP payload length.
    pub drop_bad_udp_length: u64,
    /// Guard drops: fragmented datagram (first fragment) to a media port.
    pub drop_fragment: u64,
    /// Guard drops: source over its rate.
    pub drop_rate_limited: u64,
    /// Packets on media ports that passed the guard.
    pub guard_media_ok: u64,
    /// Packets the guard let through untouched: not for a media port.
    pub guard_not_media: u64,
    /// Media packets whose source is rate-exempt
    /// ([`Guard::set_rate_exempt`]), counted while a rate limit is set:
    /// they skipped the limiter (and are in `guard_media_ok` too).
    pub guard_rate_exempt: u64,
    /// Forwarded with `XDP_TX`.
    pub forward_xdp_tx: u64,
    /// Forwarded with `XDP_REDIRECT`.
    pub forward_xdp_redirect: u64,
    /// Copies sent by the TC fan-out.
    pub forward_tc_copies: u64,
    /// Installed-flow packets handed to userspace as samples.
    pub forward_sampled: u64,
    /// Forwarding failures (unusable entries, clone/rewrite errors).
    pub forward_errors: u64,
    /// Steering: known flows sent to their shard.
    pub steer_flow: u64,
    /// Steering: unknown flows sent to the default shard.
    pub steer_default: u64,
    /// Steering: unknown flows left to the kernel's hash.
    pub steer_hash: u64,
    /// Steering: selections that failed (empty shard slot), STUN binding
    /// requests on unknown flows without a usable shard in their USERNAME,
    /// and learned flows the table had no room for.
    pub steer_errors: u64,
    /// Steering: unknown flows sent to the shard named in the USERNAME of
    /// their STUN binding request, and learned (flow → shard entry added
    /// by the program).
    pub steer_stun_learned: u64,
    /// Mesh transit: packets verified, re-signed and sent (each also
    /// counted in `forward_xdp_tx` or `forward_xdp_redirect`).
    pub mesh_forwarded: u64,
    /// Mesh transit: packets whose tag did not verify, handed to userspace.
    pub mesh_bad_tag: u64,
    /// Mesh transit: packets more than 1024 indices behind their flow's
    /// highest, dropped.
    pub mesh_too_old: u64,
}

impl Counters {
    /// Sum of all guard drop reasons.
    pub fn drops_total(&self) -> u64 {
        self.drop_truncated
            + self.drop_bad_ip_length
            + self.drop_bad_udp_length
            + self.drop_fragment
            + self.drop_rate_limited
    }

    /// `(reason, count)` for each guard drop reason, for a labelled metric.
    pub fn drops_by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("truncated", self.drop_truncated),
            ("bad_ip_length", self.drop_bad_ip_length),
            ("bad_udp_length", self.drop_bad_udp_length),
            ("fragment", self.drop_fragment),
            ("rate_limited", self.drop_rate_limited),
        ]
    }
}

/// The loaded programs and their maps.
pub struct RidgeBpf {
    ebpf: Ebpf,
    guard: Guard,
    steering: Steering,
    flows: FlowTable,
    mesh: MeshFlowTable,
    stats: PerCpuArray<MapData, u64>,
    attachments: attach::Attachments,
}

impl std::fmt::Debug for RidgeBpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RidgeBpf")
            .field("guard", &self.guard)
            .field("steering", &self.steering)
            .field("flows", &self.flows)
            .field("mesh", &self.mesh)
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or(Error::Missing { kind: "map", name })
}

macro_rules! typed_map {
    ($ebpf:expr, $name:expr) => {{
        let name: &'static str = $name;
        take_map($ebpf, name)?
            .try_into()
            .map_err(|e| Error::map(name, e))?
    }};
}

impl RidgeBpf {
    /// Loads the object and every program (each goes through the verifier
    /// here). Nothing is attached yet.
    pub fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        for name in [PROG_GUARD, PROG_XDP] {
            let prog: &mut Xdp = program_mut(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::program(name, e))?;
        }
        let fanout: &mut SchedClassifier = program_mut(&mut ebpf, PROG_FANOUT)?;
        fanout.load().map_err(|e| Error::program(PROG_FANOUT, e))?;
        let steer: &mut SkReuseport = program_mut(&mut ebpf, PROG_STEER)?;
        steer.load().map_err(|e| Error::program(PROG_STEER, e))?;

        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Io {
            context: "reading the possible CPU count",
            source: e,
        })?;
        let ports: Array<MapData, u8> = typed_map!(&mut ebpf, guard::PORTS_MAP);
        let guard_cfg: Array<MapData, types::GuardCfg> = typed_map!(&mut ebpf, guard::CFG_MAP);
        let rate: HashMap<MapData, types::SrcKey, types::RateState> =
            typed_map!(&mut ebpf, guard::RATE_MAP);
        let rate_exempt: HashMap<MapData, types::SrcKey, u8> =
            typed_map!(&mut ebpf, guard::EXEMPT_MAP);
        let steer_flows: HashMap<MapData, types::SteerKey, u32> =
            typed_map!(&mut ebpf, steer::FLOWS_MAP);
        let steer_socks: ReusePortSockArray<MapData> = typed_map!(&mut ebpf, steer::SOCKS_MAP);
        let steer_cfg: Array<MapData, types::SteerCfg> = typed_map!(&mut ebpf, steer::CFG_MAP);
        let fwd: HashMap<MapData, types::FwdKey, types::FwdEntry> =
            typed_map!(&mut ebpf, forward::ENTRIES_MAP);
        let fwd_stats: PerCpuArray<MapData, types::FwdStats> =
            typed_map!(&mut ebpf, forward::STATS_MAP);
        let mesh_fwd: HashMap<MapData, types::FwdKey, types::MeshEntry> =
            typed_map!(&mut ebpf, mesh::ENTRIES_MAP);
        let mesh_state: Array<MapData, types::MeshState> = typed_map!(&mut ebpf, mesh::STATE_MAP);
        let mesh_stats: PerCpuArray<MapData, types::MeshStats> =
            typed_map!(&mut ebpf, mesh::STATS_MAP);
        let mesh_cfg: Array<MapData, types::MeshCfg> = typed_map!(&mut ebpf, mesh::CFG_MAP);
        let stats: PerCpuArray<MapData, u64> = typed_map!(&mut ebpf, STATS_MAP);

        Ok(Self {
            ebpf,
            guard: Guard::new(ports, guard_cfg, rate, rate_exempt),
            steering: Steering::new(steer_flows, steer_socks, steer_cfg),
            flows: FlowTable::new(fwd, fwd_stats, cpus),
            mesh: MeshFlowTable::new(mesh_fwd, mesh_state, mesh_stats, mesh_cfg, cpus),
            stats,
            attachments: attach::Attachments::default(),
        })
    }

    /// The guard's media ports, rate limit and rate-exempt sources.
    pub fn guard(&mut self) -> &mut Guard {
        &mut self.guard
    }

    /// The steering table (flow → shard).
    pub fn steering(&mut self) -> &mut Steering {
        &mut self.steering
    }

    /// The forwarding table.
    pub fn flows(&mut self) -> &mut FlowTable {
        &mut self.flows
    }

    /// The mesh transit table (SRTP flows verified and re-signed in XDP).
    pub fn mesh_flows(&mut self) -> &mut MeshFlowTable {
        &mut self.mesh
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let mut totals = [0u64; stat::COUNT as usize];
        for (index, total) in (0u32..).zip(totals.iter_mut()) {
            let per_cpu = self
                .stats
                .get(&index, 0)
                .map_err(|e| Error::map(STATS_MAP, e))?;
            *total = per_cpu.iter().sum();
        }
        let at = |i: u32| totals[i as usize];
        Ok(Counters {
            drop_truncated: at(stat::DROP_TRUNCATED),
            drop_bad_ip_length: at(stat::DROP_BAD_IP_LENGTH),
            drop_bad_udp_length: at(stat::DROP_BAD_UDP_LENGTH),
            drop_fragment: at(stat::DROP_FRAGMENT),
            drop_rate_limited: at(stat::DROP_RATE_LIMITED),
            guard_media_ok: at(stat::GUARD_MEDIA_OK),
            guard_not_media: at(stat::GUARD_NOT_MEDIA),
            guard_rate_exempt: at(stat::GUARD_RATE_EXEMPT),
            forward_xdp_tx: at(stat::FWD_XDP_TX),
            forward_xdp_redirect: at(stat::FWD_XDP_REDIRECT),
            forward_tc_copies: at(stat::FWD_TC_COPIES),
            forward_sampled: at(stat::FWD_SAMPLED),
            forward_errors: at(stat::FWD_ERRORS),
            steer_flow: at(stat::STEER_FLOW),
            steer_default: at(stat::STEER_DEFAULT),
            steer_hash: at(stat::STEER_HASH),
            steer_errors: at(stat::STEER_ERRORS),
            steer_stun_learned: at(stat::STEER_STUN_LEARNED),
            mesh_forwarded: at(stat::MESH_FORWARDED),
            mesh_bad_tag: at(stat::MESH_BAD_TAG),
            mesh_too_old: at(stat::MESH_TOO_OLD),
        })
    }

    /// Attaches the steering program to the `SO_REUSEPORT` group of
    /// `sockets`; socket `i` becomes shard `i`. The sockets must be UDP,
    /// have `SO_REUSEPORT` set before `bind`, and be bound to the same
    /// address. Calling it again replaces the shard sockets.
    pub fn attach_steering<S: AsFd>(&mut self, sockets: &[S]) -> Result<()> {
        self.steering.set_sockets(sockets)?;
        let Some(first) = sockets.first().map(AsFd::as_fd) else {
            return Err(Error::InvalidArgument("no shard sockets".to_owned()));
        };
        let prog: &SkReuseport = self
            .ebpf
            .program(PROG_STEER)
            .ok_or(Error::Missing {
                kind: "program",
                name: PROG_STEER,
            })?
            .try_into()
            .map_err(|e| Error::program(PROG_STEER, e))?;
        prog.attach(first).map_err(|e| Error::Attach {
            program: PROG_STEER,
            target: format!("SO_REUSEPORT group of fd {first:?}"),
            source: Box::new(e),
        })?;
        let dup = first.try_clone_to_owned().map_err(|e| Error::Io {
            context: "duplicating a shard socket",
            source: e,
        })?;
        self.steering.group = Some(dup);
        Ok(())
    }

    /// Detaches the steering program from its socket group, if attached;
    /// the kernel's hash decides again.
    pub fn detach_steering(&mut self) -> Result<()> {
        if let Some(group) = self.steering.group.take() {
            SkReuseport::detach(&group).map_err(|e| Error::program(PROG_STEER, e))?;
        }
        Ok(())
    }
}

impl Drop for RidgeBpf {
    fn drop(&mut self) {
        // Programs attached through links go with `ebpf`; the steering
        // program stays on its socket group until detached, and a still
        // referenced map keeps its entries, so empty the tables too.
        if let Err(e) = self.detach_steering() {
            tracing::warn!("ridge-ebpf: detaching steering on drop: {e}");
        }
        if let Err(e) = self.flows.clear() {
            tracing::warn!("ridge-ebpf: clearing the flow table on drop: {e}");
        }
        if let Err(e) = self.mesh.clear() {
            tracing::warn!("ridge-ebpf: clearing the mesh flow table on drop: {e}");
        }
        if let Err(e) = self.steering.clear() {
            tracing::warn!("ridge-ebpf: clearing the steering table on drop: {e}");
        }
    }
}

pub(crate) fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e| Error::program(name, e))
}
