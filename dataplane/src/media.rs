//! The media shards: N threads, each pinned to a core and owning one UDP
//! socket (io_uring or recvmmsg/sendmmsg, see `ridge-io`), one packet pool
//! and one [`Sfu`]. A shard's loop is the only code that touches its core,
//! so the packet path takes no lock.
//!
//! Steering is by port (`shard_ports = "per-shard"`, the default): shard
//! `i` listens on the configured UDP port + `i` and advertises exactly that
//! port in its ICE candidates and plain-RTP endpoint answers, so every
//! packet of a session arrives on the socket of the shard that owns it.
//! With `shard_ports = "shared"` every shard binds the one port and a BPF
//! program steers each datagram to its shard (see [`crate::steering`]). Rooms are placed on shards by a stable hash of
//! their name, so the peers of a room share a shard and a packet never
//! crosses threads. (docs/decisions.md: "Shards".)
//!
//! HTTP and WebSocket handlers reach the cores through [`MediaHandle`],
//! which routes a command to the owning shard (by room name, or by the
//! shard byte in a participant or peer id) and awaits the reply.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ridge_io::{Backend, BackendChoice, DatagramIo, IoError, RecvMeta, SocketOptions};
use ridge_sfu::{
    MAX_BATCH, MeshConfig, MeshControl, MeshFlow, MeshFlowProgress, OfferIntent, Output, PacketBuf,
    ParticipantId, PeerId, PlainFlow, RoomState, RtpEndpointInfo, RtpEndpointSpec, Sfu, SfuConfig,
    SfuError, SfuEvent, StatsSnapshot, Transmit, shard_of,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::metrics::Metrics;
use crate::steering::{SharedPort, SteeringError};

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

enum Command {
    Join {
        room: String,
        identity: String,
        reply: Reply<ParticipantId>,
    },
    Leave {
        participant: ParticipantId,
        reply: Reply<()>,
    },
    Offer {
        participant: ParticipantId,
        sdp: String,
        intent: OfferIntent,
        reply: Reply<(PeerId, String)>,
    },
    /// Join as an ephemeral participant and negotiate at once (WHIP/WHEP).
    Session {
        room: String,
        identity: String,
        sdp: String,
        intent: OfferIntent,
        reply: Reply<(PeerId, String)>,
    },
    RtpEndpoint {
        room: String,
        identity: String,
        spec: RtpEndpointSpec,
        reply: Reply<RtpEndpointInfo>,
    },
    RemovePeer {
        peer: PeerId,
        reply: Reply<()>,
    },
    SetLayer {
        peer: PeerId,
        rid: Option<String>,
        reply: Reply<()>,
    },
    PeerOwner {
        peer: PeerId,
        reply: oneshot::Sender<Option<(ParticipantId, String, String)>>,
    },
    RoomState {
        room: String,
        reply: oneshot::Sender<RoomState>,
    },
    Stats {
        reply: oneshot::Sender<(StatsSnapshot, usize)>,
    },
    RemoteAddrs {
        reply: oneshot::Sender<Vec<SocketAddr>>,
    },
    MeshPeerAddrs {
        reply: oneshot::Sender<Vec<SocketAddr>>,
    },
    PlainFlows {
        max_destinations: usize,
        reply: oneshot::Sender<Vec<PlainFlow>>,
    },
    SetKernelForwarded {
        publishers: Vec<PeerId>,
    },
    MeshFlows {
        reply: oneshot::Sender<Vec<MeshFlow>>,
    },
    SetKernelMeshForwarded {
        progress: Vec<MeshFlowProgress>,
    },
    Drain,
    CloseAll {
        reply: oneshot::Sender<()>,
    },
    SetMesh(Box<MeshConfig>),
    /// A mesh control message another shard received for a room of this one.
    MeshControl(MeshControl),
}

/// A cloneable handle to the media shards.
#[derive(Clone, Debug)]
pub struct MediaHandle {
    shards: Arc<[ShardLink]>,
    events: broadcast::Sender<SfuEvent>,
    /// Shared-port mode: the steering program over the shards' sockets.
    shared: Option<Arc<SharedPort>>,
}

#[derive(Debug)]
struct ShardLink {
    tx: mpsc::Sender<Command>,
    local_addr: SocketAddr,
    backend: Backend,
    stats: Arc<ShardStats>,
}

/// Counters a shard publishes for `/metrics` without being asked.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Heap allocations made on the shard thread outside control commands
    /// (joins, offers, stats snapshots): the packet path and timers. The
    /// counting allocator must be installed, as in the `ridge-dataplane`
    /// binary; otherwise this stays 0.
    pub allocations: AtomicU64,
    /// Received datagrams that did not fit a packet buffer.
    pub truncated: AtomicU64,
    /// Outputs for local (in-process) endpoints that nothing here
    /// consumes yet, dropped.
    pub local_dropped: AtomicU64,
    /// Datagrams given up on because the socket stayed full.
    pub send_dropped: AtomicU64,
    /// Times the socket was full and sends had to wait.
    pub send_blocked: AtomicU64,
    /// Slots in the shard's packet pool.
    pub pool_slots: AtomicU64,
    /// Times the packet pool had to grow.
    pub pool_grown: AtomicU64,
    /// io_uring: times the provided buffer ring ran dry.
    pub ring_exhausted: AtomicU64,
    /// Pending socket errors (ICMP) seen by receives.
    pub socket_errors: AtomicU64,
    /// Sends that carried several datagrams with UDP GSO.
    pub gso_sends: AtomicU64,
    /// Datagrams those sends carried.
    pub gso_datagrams: AtomicU64,
}

/// Errors starting the shards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    #[error("cannot bind the media socket: {0}")]
    Bind(#[from] IoError),
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

fn gone() -> SfuError {
    SfuError::Internal("the media shard has stopped".into())
}

/// The shard that owns a room (the core routes mesh messages by the same
/// rule).
pub use ridge_sfu::shard_for_room;

impl MediaHandle {
    /// The media socket address of shard 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.shards[0].local_addr
    }

    /// Every shard's media socket address, by shard index.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shards.iter().map(|s| s.local_addr).collect()
    }

    /// Shared-port mode's steering, if the shards share one port.
    pub fn shared_port(&self) -> Option<&Arc<SharedPort>> {
        self.shared.as_ref()
    }

    /// `"shared"` or `"per-shard"`.
    pub fn shard_ports(&self) -> &'static str {
        if self.shared.is_some() {
            "shared"
        } else {
            "per-shard"
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The I/O backend the shards run on.
    pub fn backend(&self) -> Backend {
        self.shards[0].backend
    }

    /// Per-shard counters, by shard index.
    pub fn shard_stats(&self) -> Vec<Arc<ShardStats>> {
        self.shards.iter().map(|s| s.stats.clone()).collect()
    }

    /// Core events (participants, tracks, speakers, layer demand).
    pub fn subscribe_events(&self) -> broadcast::Receiver<SfuEvent> {
        self.events.subscribe()
    }

    fn by_room(&self, room: &str) -> &ShardLink {
        &self.shards[shard_for_room(room, self.shards.len())]
    }

    fn by_id(&self, id: u64) -> Result<&ShardLink, SfuError> {
        self.shards
            .get(usize::from(shard_of(id)))
            .ok_or_else(|| SfuError::Internal("identifier names no shard".into()))
    }

    async fn call<T>(
        link: &ShardLink,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, SfuError> {
        let (tx, rx) = oneshot::channel();
        link.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn join(&self, room: &str, identity: &str) -> Result<ParticipantId, SfuError> {
        Self::call(self.by_room(room), |reply| Command::Join {
            room: room.into(),
            identity: identity.into(),
            reply,
        })
        .await
    }

    pub async fn leave(&self, participant: ParticipantId) -> Result<(), SfuError> {
        Self::call(self.by_id(participant.0)?, |reply| Command::Leave {
            participant,
            reply,
        })
        .await
    }

    pub async fn offer(
        &self,
        participant: ParticipantId,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), SfuError> {
        Self::call(self.by_id(participant.0)?, |reply| Command::Offer {
            participant,
            sdp,
            intent,
            reply,
        })
        .await
    }

    pub async fn session(
        &self,
        room: &str,
        identity: &str,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), SfuError> {
        Self::call(self.by_room(room), |reply| Command::Session {
            room: room.into(),
            identity: identity.into(),
            sdp,
            intent,
            reply,
        })
        .await
    }

    pub async fn rtp_endpoint(
        &self,
        room: &str,
        identity: &str,
        spec: RtpEndpointSpec,
    ) -> Result<RtpEndpointInfo, SfuError> {
        let shard = shard_for_room(room, self.shards.len());
        let remote = spec.remote;
        // Shared port: steer the remote to its shard before the endpoint
        // exists, so its first datagram cannot reach another shard.
        if let Some(shared) = &self.shared {
            shared
                .insert(remote, shard)
                .map_err(|e| SfuError::Internal(format!("steering {remote}: {e}")))?;
        }
        let r = Self::call(&self.shards[shard], |reply| Command::RtpEndpoint {
            room: room.into(),
            identity: identity.into(),
            spec,
            reply,
        })
        .await;
        if let Some(shared) = &self.shared {
            match &r {
                Ok(info) => shared.bind_endpoint(info.peer, remote),
                Err(_) => shared.remove(remote),
            }
        }
        r
    }

    pub async fn remove_peer(&self, peer: PeerId) -> Result<(), SfuError> {
        Self::call(self.by_id(peer.0)?, |reply| Command::RemovePeer {
            peer,
            reply,
        })
        .await?;
        if let Some(shared) = &self.shared {
            shared.remove_endpoint(peer);
        }
        Ok(())
    }

    pub async fn set_layer(&self, peer: PeerId, rid: Option<String>) -> Result<(), SfuError> {
        Self::call(self.by_id(peer.0)?, |reply| Command::SetLayer {
            peer,
            rid,
            reply,
        })
        .await
    }

    /// (participant, room, identity) of a peer.
    pub async fn peer_owner(&self, peer: PeerId) -> Option<(ParticipantId, String, String)> {
        let link = self.by_id(peer.0).ok()?;
        let (tx, rx) = oneshot::channel();
        link.tx
            .send(Command::PeerOwner { peer, reply: tx })
            .await
            .ok()?;
        rx.await.ok()?
    }

    pub async fn room_state(&self, room: &str) -> RoomState {
        let (tx, rx) = oneshot::channel();
        if self
            .by_room(room)
            .tx
            .send(Command::RoomState {
                room: room.into(),
                reply: tx,
            })
            .await
            .is_err()
        {
            return RoomState::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Sends the command `make` builds to every shard and collects the
    /// replies, by shard index; `None` if a shard has stopped.
    async fn ask_every_shard<T>(
        &self,
        make: impl Fn(oneshot::Sender<T>) -> Command,
    ) -> Option<Vec<T>> {
        let mut out = Vec::with_capacity(self.shards.len());
        for link in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            link.tx.send(make(tx)).await.ok()?;
            out.push(rx.await.ok()?);
        }
        Some(out)
    }

    /// A statistics snapshot of every shard, merged, and the number of open
    /// sessions; `None` if any shard has stopped.
    pub async fn stats(&self) -> Option<(StatsSnapshot, usize)> {
        let replies = self
            .ask_every_shard(|reply| Command::Stats { reply })
            .await?;
        replies
            .into_iter()
            .reduce(|(mut total, n), (snap, sessions)| {
                total.merge(snap);
                (total, n + sessions)
            })
    }

    /// Remote addresses of every live session on every shard; `None` if a
    /// shard has stopped.
    pub async fn remote_addrs(&self) -> Option<Vec<SocketAddr>> {
        let replies = self
            .ask_every_shard(|reply| Command::RemoteAddrs { reply })
            .await?;
        Some(replies.into_iter().flatten().collect())
    }

    /// Every remote socket that authenticated as a mesh link, on any shard.
    pub async fn mesh_peer_addrs(&self) -> Option<Vec<SocketAddr>> {
        self.ask_every_shard(|reply| Command::MeshPeerAddrs { reply })
            .await
            .map(|v| v.into_iter().flatten().collect())
    }

    /// Each shard's mesh transit streams that a kernel fast path could
    /// forward (`Sfu::mesh_flows`), by shard index; `None` if a shard has
    /// stopped.
    pub async fn mesh_flows(&self) -> Option<Vec<Vec<MeshFlow>>> {
        self.ask_every_shard(|reply| Command::MeshFlows { reply })
            .await
    }

    /// Tells shard `shard` what the kernel did with its mesh transit
    /// streams (`Sfu::set_kernel_mesh_forwarded`).
    pub async fn set_kernel_mesh_forwarded(&self, shard: usize, progress: Vec<MeshFlowProgress>) {
        if let Some(link) = self.shards.get(shard) {
            let _ = link
                .tx
                .send(Command::SetKernelMeshForwarded { progress })
                .await;
        }
    }

    /// Each shard's plain-RTP flows that a kernel fast path could forward
    /// (`Sfu::plain_flows`), by shard index; `None` if a shard has stopped.
    pub async fn plain_flows(&self, max_destinations: usize) -> Option<Vec<Vec<PlainFlow>>> {
        self.ask_every_shard(|reply| Command::PlainFlows {
            max_destinations,
            reply,
        })
        .await
    }

    /// Tells shard `shard` which of its plain publishers the kernel
    /// forwards (`Sfu::set_kernel_forwarded`).
    pub async fn set_kernel_forwarded(&self, shard: usize, publishers: Vec<PeerId>) {
        if let Some(link) = self.shards.get(shard) {
            let _ = link
                .tx
                .send(Command::SetKernelForwarded { publishers })
                .await;
        }
    }

    /// Applies the mesh links and routes of a desired state on every shard.
    pub async fn set_mesh(&self, config: MeshConfig) {
        for link in self.shards.iter() {
            let _ = link
                .tx
                .send(Command::SetMesh(Box::new(config.clone())))
                .await;
        }
    }

    pub async fn drain(&self) {
        for link in self.shards.iter() {
            let _ = link.tx.send(Command::Drain).await;
        }
    }

    pub async fn close_all(&self) {
        for link in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            if link.tx.send(Command::CloseAll { reply: tx }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }
}

/// How to start the shards.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Shard 0's address; shard `i` binds port + `i` (or an ephemeral port
    /// when the port is 0), or this address too when `shared_port`.
    pub udp: SocketAddr,
    pub shards: usize,
    pub pin_cores: bool,
    pub backend: BackendChoice,
    /// UDP GSO: runs of datagrams to one destination leave in one send.
    pub gso: bool,
    /// Every shard on `udp` (with port 0: the port shard 0 got), steered by
    /// BPF. Start-up fails if the steering program cannot be attached.
    pub shared_port: bool,
}

/// Binds every shard's socket and starts the shard threads. `config` is the
/// template for each shard's core; its candidates' ports are replaced by
/// each shard's port.
pub fn spawn(
    opts: &ShardOptions,
    config: SfuConfig,
    metrics: Metrics,
) -> Result<(MediaHandle, Vec<std::thread::JoinHandle<()>>), MediaError> {
    let socket_opts = SocketOptions {
        reuse_port: true,
        recv_buffer_size: Some(4 << 20),
        send_buffer_size: Some(4 << 20),
        gso: opts.gso,
        ..SocketOptions::default()
    };
    let mut ios: Vec<Box<dyn DatagramIo + Send>> = Vec::with_capacity(opts.shards);
    for i in 0..opts.shards {
        let addr = match (opts.shared_port, ios.first(), opts.udp.port()) {
            // Shared: every shard on shard 0's address (its port, if 0 was asked).
            (true, Some(first), _) => first.local_addr(),
            (_, _, 0) => opts.udp,
            (_, _, p) => SocketAddr::new(opts.udp.ip(), p + i as u16),
        };
        ios.push(ridge_io::bind(addr, opts.backend, &socket_opts)?);
    }
    let backend = ios[0].backend();
    tracing::info!(shards = opts.shards, ?backend, first = %ios[0].local_addr(), "media shards bound");
    // Every socket of the group exists before the program attaches.
    let shared = if opts.shared_port {
        let fds = ios
            .iter()
            .map(|io| ridge_io::dup_socket(io.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SteeringError::new(format!("duplicating a shard socket: {e}")))?;
        Some(SharedPort::attach(&fds, ios[0].local_addr())?)
    } else {
        None
    };
    let cores = if opts.pin_cores {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let (events, _) = broadcast::channel(4096);
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..opts.shards).map(|_| mpsc::channel(1024)).unzip();
    // Weak: a shard stops when every handle's sender is gone, so the
    // shards must not keep each other's (or their own) queues open.
    let siblings: Arc<[mpsc::WeakSender<Command>]> =
        senders.iter().map(mpsc::Sender::downgrade).collect();
    let mut links = Vec::with_capacity(opts.shards);
    let mut joins = Vec::with_capacity(opts.shards);
    for (i, io) in ios.into_iter().enumerate() {
        let local_addr = io.local_addr();
        let mut config = config.clone();
        config.local_addr = local_addr;
        config.shard = i as u8;
        config.shards = opts.shards.min(255) as u8;
        // Each shard its own stream: its index mixed into the seed.
        config.seed[0] ^= i as u8;
        config.seed[1] ^= (i >> 8) as u8;
        for c in &mut config.candidates {
            c.set_port(local_addr.port());
        }
        let recv_dest = if local_addr.ip().is_unspecified() {
            config
                .candidates
                .iter()
                .find(|c| c.is_ipv4() == local_addr.is_ipv4())
                .copied()
                .unwrap_or(local_addr)
        } else {
            local_addr
        };
        let tx = senders[i].clone();
        let rx = receivers.remove(0);
        let siblings = siblings.clone();
        let stats = Arc::new(ShardStats::default());
        links.push(ShardLink {
            tx,
            local_addr,
            backend,
            stats: stats.clone(),
        });
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let events = events.clone();
        let metrics = metrics.clone();
        let join = std::thread::Builder::new()
            .stack_size(SHARD_STACK)
            .name(format!("ridge-shard-{i}"))
            .spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    tracing::warn!(shard = i, ?core, "cannot pin the shard thread to its core");
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(shard = i, error = %e, "cannot start the shard runtime");
                        return;
                    }
                };
                // Unconstrained: tokio's cooperative budget would make the
                // socket's readiness return Pending after 128 polls and
                // defer the shard's waker (into a list that allocates as it
                // grows). The shard paces itself: one receive batch per
                // turn, timers and commands first.
                rt.block_on(tokio::task::unconstrained(async move {
                    let fd = match ridge_io::register_readiness(io.as_ref()) {
                        Ok(fd) => fd,
                        Err(e) => {
                            tracing::error!(shard = i, error = %e, "cannot register the media socket");
                            return;
                        }
                    };
                    Shard {
                        recv_dest,
                        io,
                        sfu: Sfu::new(config, Instant::now()),
                        pending: VecDeque::with_capacity(4096),
                        group_keys: Box::new([(0, 0); SEND_WINDOW]),
                        events,
                        metrics,
                        stats,
                        siblings,
                    }
                    .run(&fd, rx)
                    .await;
                }));
            })
            .map_err(MediaError::Thread)?;
        joins.push(join);
    }
    Ok((
        MediaHandle {
            shards: links.into(),
            events,
            shared,
        },
        joins,
    ))
}

/// Transmits handed to the socket per send call: a whole received batch
/// of a 1→32 fan-out (64 × 32), so that after [`group_by_destination`] each
/// subscriber's packets of that batch form one GSO run. Measured with
/// `ridge-bench fanout` (1→50): 512 gave runs of 9.5 datagrams and 0.82 µs
/// of node CPU per packet out, 2048 runs of 31 and 0.69 µs
/// (docs/benchmarks.md). A window this large is batched on the shard
/// thread's stack (about 150 KiB; see [`SHARD_STACK`]); its grouping keys
/// live in a per-shard scratch ([`GroupKeys`]).
const SEND_WINDOW: usize = 2048;

/// Stack of each shard thread: a large flush's [`SEND_WINDOW`] batch takes
/// about 150 KiB of it, the rest is headroom for the core and the runtime.
const SHARD_STACK: usize = 4 << 20;

/// A cheap key equal for equal destinations (collisions only cost a GSO
/// run, never order: runs also end where the address changes).
fn destination_key(a: &SocketAddr) -> u64 {
    match a {
        SocketAddr::V4(v4) => (u64::from(v4.ip().to_bits()) << 16) | u64::from(v4.port()),
        SocketAddr::V6(v6) => {
            let b = v6.ip().to_bits();
            ((b as u64) ^ ((b >> 64) as u64)).rotate_left(16) ^ u64::from(v6.port())
        }
    }
}

/// Scratch for [`group_by_destination`]: one `(key, index)` pair per
/// transmit of a window, allocated once per shard so that a flush does not
/// clear a [`SEND_WINDOW`]-sized array on its stack each time.
type GroupKeys = Box<[(u64, u16); SEND_WINDOW]>;

/// Reorders `window` so that transmits to one destination are adjacent,
/// keeping each destination's own order (and so each stream's). Order
/// across destinations carries no meaning. In place, without allocating:
/// sorts `(key, index)` pairs in `keys` and applies the permutation by
/// following its cycles. Windows that are already grouped (a 1:1 relay)
/// are left alone.
fn group_by_destination(window: &mut [Transmit], keys: &mut [(u64, u16); SEND_WINDOW]) {
    let n = window.len().min(SEND_WINDOW);
    for (i, (k, t)) in keys.iter_mut().zip(window.iter()).enumerate() {
        *k = (destination_key(&t.destination), i as u16);
    }
    let keys = &mut keys[..n];
    if keys.windows(2).all(|w| w[0].0 == w[1].0) {
        return;
    }
    keys.sort_unstable();
    // Position k must receive the transmit now at keys[k].1.
    for i in 0..n {
        let mut k = i;
        loop {
            let src = usize::from(keys[k].1);
            keys[k].1 = k as u16;
            if src == i {
                break;
            }
            window.swap(k, src);
            k = src;
        }
    }
}

/// Transmits of a flush up to which the send batch is a small stack array:
/// a 1:1 relay's received batch, or a fan-out of it to a couple of
/// subscribers. Larger windows use a [`SEND_WINDOW`] array. Each array is
/// built whole on every flush (about 70 bytes per entry), so sizing it to
/// the window keeps a relay's flush from writing ~140 KiB of stack for 32
/// datagrams (it removes work; no gain was measurable above the 2-core
/// VM's noise, see docs/benchmarks.md).
const SMALL_WINDOW: usize = 64;

/// Hands the first `window` pending transmits to the socket as one batch
/// of at most `N`; returns how many it accepted.
fn send_window<const N: usize>(
    io: &mut (dyn DatagramIo + Send),
    pending: &VecDeque<Transmit>,
    window: usize,
) -> Result<usize, ridge_io::IoError> {
    let empty = ridge_io::Transmit::new(io.local_addr(), &[]);
    let mut batch = [empty; N];
    let k = window.min(N);
    for (slot, t) in batch.iter_mut().zip(pending.iter()).take(k) {
        *slot = match &t.payload {
            Some(p) => ridge_io::Transmit {
                destination: t.destination,
                prefix: &t.contents,
                contents: p.as_slice(),
                suffix: t.trailer.as_slice(),
                segment_size: None,
            },
            None => ridge_io::Transmit::new(t.destination, &t.contents),
        };
    }
    io.send(&batch[..k])
}

/// How long a flush waits, in total, for a full socket before it gives up on
/// the rest of its datagrams.
const SEND_PATIENCE: Duration = Duration::from_millis(20);

struct Shard {
    /// The destination the core sees for received datagrams: the socket's
    /// address, or for a wildcard bind (`0.0.0.0`) the first advertised
    /// candidate, since WebRTC's ICE matches checks to a candidate address.
    recv_dest: SocketAddr,
    io: Box<dyn DatagramIo + Send>,
    sfu: Sfu,
    /// Transmits taken from the core, not yet accepted by the socket.
    pending: VecDeque<Transmit>,
    group_keys: GroupKeys,
    events: broadcast::Sender<SfuEvent>,
    metrics: Metrics,
    stats: Arc<ShardStats>,
    /// Every shard's command queue (mesh control messages cross here).
    siblings: Arc<[mpsc::WeakSender<Command>]>,
}

impl Shard {
    async fn run(mut self, fd: &AsyncFd<OwnedFd>, mut commands: mpsc::Receiver<Command>) {
        let mut next_report = Instant::now();
        // Allocations made while executing control commands, which are
        // not part of the packet path.
        let mut control_allocations = 0u64;
        // The first receive arms io_uring's multishot request: until then
        // the ring has nothing to complete and never polls readable.
        self.receive();
        loop {
            self.flush().await;
            self.stats.allocations.store(
                ridge_io::alloc::thread_allocations() - control_allocations,
                Ordering::Relaxed,
            );
            let now = Instant::now();
            if now >= next_report {
                self.report();
                next_report = now + Duration::from_millis(500);
            }
            let deadline = self.sfu.poll_timeout().min(next_report);
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else {
                        // Every handle is gone: the node is shutting down.
                        self.sfu.close_all(Instant::now());
                        self.flush().await;
                        return;
                    };
                    let before = ridge_io::alloc::thread_allocations();
                    execute(&mut self.sfu, cmd);
                    control_allocations += ridge_io::alloc::thread_allocations() - before;
                }
                // Timers before more input, or a busy socket starves them.
                _ = sleep => self.sfu.handle_timeout(Instant::now()),
                guard = fd.readable() => {
                    let Ok(mut guard) = guard else {
                        tracing::error!("media socket readiness failed; shard stops");
                        return;
                    };
                    if self.receive() {
                        guard.clear_ready();
                    }
                }
            }
        }
    }

    /// Receives one batch straight into the core's packet pool and routes
    /// it; the loop flushes the resulting sends before the next batch, so a
    /// fan-out burst stays bounded. Returns true once the socket is empty.
    fn receive(&mut self) -> bool {
        let local = self.recv_dest;
        let mut meta = [RecvMeta::default(); MAX_BATCH];
        let io = &mut self.io;
        let got = self
            .sfu
            .packet_pool()
            .recv_slots(MAX_BATCH, |bufs| io.recv(bufs, &mut meta));
        let n = match got {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) => {
                self.metrics.udp_recv_errors.inc();
                tracing::error!(error = %e, "media socket receive failed");
                return true;
            }
        };
        // Freeze the whole batch before routing: routing may take further
        // slots from the pool.
        let pool = self.sfu.packet_pool();
        let packets: [Option<PacketBuf>; MAX_BATCH] =
            std::array::from_fn(|i| (i < n).then(|| pool.freeze(i, meta[i].len)));
        let now = Instant::now();
        for (packet, m) in packets.into_iter().zip(&meta).take(n) {
            let Some(packet) = packet else { continue };
            if m.truncated {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.sfu.handle_packet(now, m.source, local, packet);
        }
        false
    }

    /// Sends everything the core has queued, in batches; waits (bounded) on
    /// a full socket, then gives up on what is left and counts it.
    async fn flush(&mut self) {
        let mut waited = Duration::ZERO;
        loop {
            while let Some(out) = self.sfu.poll_output() {
                match out {
                    Output::Transmit(t) => self.pending.push_back(t),
                    Output::Event(e) => {
                        tracing::debug!(event = ?e, "core event");
                        let _ = self.events.send(e);
                    }
                    Output::Local(_) => {
                        // No local endpoint is wired to this loop yet.
                        self.stats.local_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Output::MeshControl(m) => {
                        // Control traffic (a few per second per room), not
                        // media: a full queue drops it and the sender retries.
                        if let Some(tx) = self
                            .siblings
                            .get(usize::from(m.shard))
                            .and_then(mpsc::WeakSender::upgrade)
                            && tx.try_send(Command::MeshControl(m)).is_err()
                        {
                            tracing::debug!(
                                "a shard's command queue is full; mesh message dropped"
                            );
                        }
                    }
                }
            }
            if self.pending.is_empty() {
                return;
            }
            let sent = {
                // Datagrams to one destination next to each other, so that
                // the I/O layer sends each run with one GSO send (pointless
                // when GSO is off or the kernel refused it).
                let window = self.pending.len().min(SEND_WINDOW);
                if self.io.max_gso_segments() > 1 {
                    group_by_destination(
                        &mut self.pending.make_contiguous()[..window],
                        &mut self.group_keys,
                    );
                }
                let io = self.io.as_mut();
                let result = if window <= SMALL_WINDOW {
                    send_window::<SMALL_WINDOW>(io, &self.pending, window)
                } else {
                    send_window::<SEND_WINDOW>(io, &self.pending, window)
                };
                match result {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "media socket send failed");
                        self.metrics.udp_send_errors.inc_by(window as u64);
                        window
                    }
                }
            };
            for _ in 0..sent {
                if let Some(t) = self.pending.pop_front() {
                    self.sfu.recycle(t.contents);
                }
            }
            if sent == 0 {
                // The socket is full: give the kernel a moment, bounded.
                self.stats.send_blocked.fetch_add(1, Ordering::Relaxed);
                if waited >= SEND_PATIENCE {
                    let n = self.pending.len() as u64;
                    self.stats.send_dropped.fetch_add(n, Ordering::Relaxed);
                    self.metrics.udp_send_errors.inc_by(n);
                    while let Some(t) = self.pending.pop_front() {
                        self.sfu.recycle(t.contents);
                    }
                    return;
                }
                let pause = Duration::from_micros(200);
                tokio::time::sleep(pause).await;
                waited += pause;
            }
        }
    }

    /// Publishes the shard's counters for `/metrics`.
    fn report(&mut self) {
        let s = &self.stats;
        let pool = self.sfu.packet_pool().stats();
        s.pool_slots.store(pool.slots as u64, Ordering::Relaxed);
        s.pool_grown.store(pool.grown, Ordering::Relaxed);
        let io = self.io.stats();
        s.ring_exhausted.store(io.ring_exhausted, Ordering::Relaxed);
        s.socket_errors.store(io.socket_errors, Ordering::Relaxed);
        s.gso_sends.store(io.gso_sends, Ordering::Relaxed);
        s.gso_datagrams.store(io.gso_datagrams, Ordering::Relaxed);
    }
}

fn execute(sfu: &mut Sfu, cmd: Command) {
    let now = Instant::now();
    match cmd {
        Command::Join {
            room,
            identity,
            reply,
        } => {
            let _ = reply.send(sfu.join(&room, &identity, false));
        }
        Command::Leave { participant, reply } => {
            let _ = reply.send(sfu.leave(now, participant));
        }
        Command::Offer {
            participant,
            sdp,
            intent,
            reply,
        } => {
            let _ = reply.send(sfu.accept_offer(now, participant, &sdp, intent));
        }
        Command::Session {
            room,
            identity,
            sdp,
            intent,
            reply,
        } => {
            let r = sfu.join(&room, &identity, true).and_then(|p| {
                sfu.accept_offer(now, p, &sdp, intent).inspect_err(|_| {
                    let _ = sfu.leave(now, p);
                })
            });
            let _ = reply.send(r);
        }
        Command::RtpEndpoint {
            room,
            identity,
            spec,
            reply,
        } => {
            let r = sfu.join(&room, &identity, true).and_then(|p| {
                sfu.add_rtp_endpoint(now, p, spec).inspect_err(|_| {
                    let _ = sfu.leave(now, p);
                })
            });
            let _ = reply.send(r);
        }
        Command::RemovePeer { peer, reply } => {
            let _ = reply.send(sfu.remove_peer(now, peer));
        }
        Command::SetLayer { peer, rid, reply } => {
            let _ = reply.send(sfu.set_layer(now, peer, rid.as_deref()));
        }
        Command::PeerOwner { peer, reply } => {
            let owner = sfu.peer_owner(peer).map(|(p, room)| {
                let identity = sfu.participant_identity(p).unwrap_or_default().to_string();
                (p, room.to_string(), identity)
            });
            let _ = reply.send(owner);
        }
        Command::RoomState { room, reply } => {
            let _ = reply.send(sfu.room_state(&room));
        }
        Command::Stats { reply } => {
            let _ = reply.send((sfu.stats(), sfu.peer_count()));
        }
        Command::RemoteAddrs { reply } => {
            let _ = reply.send(sfu.remote_addrs());
        }
        Command::MeshPeerAddrs { reply } => {
            let _ = reply.send(sfu.mesh_peer_addrs());
        }
        Command::PlainFlows {
            max_destinations,
            reply,
        } => {
            let _ = reply.send(sfu.plain_flows(max_destinations));
        }
        Command::SetKernelForwarded { publishers } => sfu.set_kernel_forwarded(&publishers),
        Command::MeshFlows { reply } => {
            let _ = reply.send(sfu.mesh_flows(now));
        }
        Command::SetKernelMeshForwarded { progress } => {
            sfu.set_kernel_mesh_forwarded(now, &progress)
        }
        Command::Drain => sfu.start_drain(),
        Command::SetMesh(config) => sfu.set_mesh(now, *config),
        Command::MeshControl(m) => sfu.handle_mesh_control(now, &m.link, m.source, &m.rtcp),
        Command::CloseAll { reply } => {
            sfu.close_all(now);
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16, tag: u16) -> Transmit {
        Transmit {
            source: SocketAddr::from(([127, 0, 0, 1], 1)),
            destination: SocketAddr::from(([127, 0, 0, 1], port)),
            contents: tag.to_be_bytes().to_vec(),
            payload: None,
            trailer: ridge_sfu::Trailer::default(),
        }
    }

    fn tags(w: &[Transmit]) -> Vec<(u16, u16)> {
        w.iter()
            .map(|t| {
                let tag = u16::from_be_bytes([t.contents[0], t.contents[1]]);
                (t.destination.port(), tag)
            })
            .collect()
    }

    #[test]
    fn grouping_keeps_each_destinations_order() {
        // A 1→50 fan-out of 10 packets: packet-major order in, destination
        // runs out, each run in packet order.
        let mut w: Vec<Transmit> = (0..10)
            .flat_map(|p| (0..50).map(move |d| to(1000 + d, p)))
            .collect();
        group_by_destination(&mut w, &mut Box::new([(0, 0); SEND_WINDOW]));
        let got = tags(&w);
        for (run, chunk) in got.chunks(10).enumerate() {
            let port = chunk[0].0;
            assert!(
                chunk.iter().all(|&(d, _)| d == port),
                "run {run}: {chunk:?}"
            );
            let order: Vec<u16> = chunk.iter().map(|&(_, p)| p).collect();
            assert_eq!(order, (0..10).collect::<Vec<_>>(), "run {run}");
        }
        let mut ports: Vec<u16> = got.iter().map(|&(d, _)| d).collect();
        ports.dedup();
        assert_eq!(ports.len(), 50, "each destination in exactly one run");
    }

    #[test]
    fn grouping_is_a_permutation_on_random_windows() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 2, 3, 17, 64, 300, SEND_WINDOW] {
            let mut w: Vec<Transmit> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    to(1000 + (x % 7) as u16, i as u16)
                })
                .collect();
            let before = tags(&w);
            group_by_destination(&mut w, &mut Box::new([(0, 0); SEND_WINDOW]));
            let after = tags(&w);
            let mut a = after.clone();
            let mut b = before.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "len {len}: not a permutation");
            for port in 1000..1007 {
                let seq = |v: &[(u16, u16)]| -> Vec<u16> {
                    v.iter().filter(|e| e.0 == port).map(|e| e.1).collect()
                };
                assert_eq!(seq(&after), seq(&before), "len {len}, port {port}");
            }
            let mut ports: Vec<u16> = after.iter().map(|&(d, _)| d).collect();
            ports.dedup();
            let mut distinct = ports.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(ports.len(), distinct.len(), "len {len}: split runs");
        }
    }

    #[test]
    fn destination_keys_tell_addresses_apart() {
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let c: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let d: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let e: SocketAddr = "[2001:db8::2]:5000".parse().unwrap();
        let keys = [a, b, c, d, e].map(|x| destination_key(&x));
        let mut distinct = keys.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), keys.len());
    }
}
