//! [`MediaHandle`]: how the rest of the node reaches the shards. Every
//! control call is a closure that runs on the owning shard's thread with
//! its core ([`MediaHandle::on_shard`]) and hands its result back through
//! a oneshot; the methods below are those calls, routed by room name or by
//! the shard byte in a participant or peer id.
//!
//! A new control call is one closure: call [`MediaHandle::on_shard`] (or
//! [`MediaHandle::on_every_shard`]) with it where it is needed, or wrap it
//! in a method here when several callers share it, e.g.
//!
//! ```ignore
//! media.on_shard(shard, move |sfu, now| sfu.set_layer(now, peer, rid.as_deref())).await
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ridge_io::Backend;
use ridge_sfu::{
    MeshConfig, MeshFlow, MeshFlowProgress, OfferIntent, Owner, ParticipantId, PeerId, PlainFlow,
    QuotaConfig, QuotaLedger, RoomState, RtpEndpointInfo, RtpEndpointSpec, Sfu, SfuError, SfuEvent,
    StatsSnapshot, shard_of,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::command::{Call, Command};
use super::stats::ShardStats;
use super::steering::SharedPort;

/// The shard that owns a room (the core routes mesh messages by the same
/// rule).
pub use ridge_sfu::shard_for_room;

/// A cloneable handle to the media shards.
#[derive(Clone, Debug)]
pub struct MediaHandle {
    pub(super) shards: Arc<[ShardLink]>,
    pub(super) events: broadcast::Sender<SfuEvent>,
    /// Shared-port mode: the steering program over the shards' sockets.
    pub(super) shared: Option<Arc<SharedPort>>,
    /// The quota ledger the shards' cores share, and its limits.
    pub(super) ledger: QuotaLedger,
    pub(super) quotas: QuotaConfig,
}

#[derive(Debug)]
pub(super) struct ShardLink {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) local_addr: SocketAddr,
    pub(super) backend: Backend,
    pub(super) stats: Arc<ShardStats>,
}

/// Why a control call into a shard failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The shard's thread is gone (it failed or panicked) and its command
    /// queue is closed: the node's fault, and every session of its rooms is
    /// lost. Counted per shard in `ridge_shard_stopped_calls`.
    #[error("media shard {shard} has stopped")]
    Stopped { shard: usize },
    /// An identifier whose shard byte names no shard of this node.
    #[error("internal error: identifier names no shard ({shard})")]
    NoSuchShard { shard: usize },
    /// The shard's core refused the call.
    #[error(transparent)]
    Sfu(#[from] SfuError),
}

impl ShardError {
    /// Whether the peer (client) caused the error, as opposed to the node.
    pub fn is_client_error(&self) -> bool {
        matches!(self, ShardError::Sfu(e) if e.is_client_error())
    }
}

impl MediaHandle {
    /// Runs `f` on shard `shard`'s thread, with its core and the time the
    /// shard took the call, and returns what `f` returns. The shard runs
    /// calls one at a time between receive batches; `f` must not block.
    pub async fn on_shard<T, F>(&self, shard: usize, f: F) -> Result<T, ShardError>
    where
        F: FnOnce(&mut Sfu, Instant) -> T + Send + 'static,
        T: Send + 'static,
    {
        let link = self
            .shards
            .get(shard)
            .ok_or(ShardError::NoSuchShard { shard })?;
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |sfu, now| {
            let _ = tx.send(f(sfu, now));
        });
        if link.tx.send(Command::Call(call)).await.is_err() {
            return Err(stopped(shard, link));
        }
        // A shard that dies while holding the call drops its sender.
        rx.await.map_err(|_| stopped(shard, link))
    }

    /// Runs `f` on every shard, one after the other, and returns each
    /// shard's result by shard index.
    pub async fn on_every_shard<T, F>(&self, f: F) -> Vec<Result<T, ShardError>>
    where
        F: FnOnce(&mut Sfu, Instant) -> T + Clone + Send + 'static,
        T: Send + 'static,
    {
        let mut out = Vec::with_capacity(self.shards.len());
        for shard in 0..self.shards.len() {
            out.push(self.on_shard(shard, f.clone()).await);
        }
        out
    }

    /// [`Self::on_shard`] for a call the core may refuse.
    async fn try_on_shard<T, F>(&self, shard: usize, f: F) -> Result<T, ShardError>
    where
        F: FnOnce(&mut Sfu, Instant) -> Result<T, SfuError> + Send + 'static,
        T: Send + 'static,
    {
        Ok(self.on_shard(shard, f).await??)
    }

    /// Every shard's result of `f`, or the first shard's failure.
    async fn on_all_shards<T, F>(&self, f: F) -> Result<Vec<T>, ShardError>
    where
        F: FnOnce(&mut Sfu, Instant) -> T + Clone + Send + 'static,
        T: Send + 'static,
    {
        self.on_every_shard(f).await.into_iter().collect()
    }

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

    /// The shard that owns `room`.
    pub fn shard_of_room(&self, room: &str) -> usize {
        shard_for_room(room, self.shards.len())
    }

    pub async fn join(&self, room: &str, identity: &str) -> Result<ParticipantId, ShardError> {
        self.join_as(room, Owner::identity(identity)).await
    }

    /// Joins a room for a WebSocket room session: the participant's
    /// sessions (its offers) count against `owner`'s quotas (identity and
    /// token), and the join against its room quota.
    pub async fn join_as(&self, room: &str, owner: Owner) -> Result<ParticipantId, ShardError> {
        let room = room.to_owned();
        self.try_on_shard(self.shard_of_room(&room), move |sfu, _| {
            sfu.join_as(&room, &owner, false)
        })
        .await
    }

    /// The quota ledger every shard counts in, and its limits: e.g. for a
    /// WebSocket connection to hold a session slot of its own
    /// ([`QuotaLedger::reserve_session`]).
    pub fn quotas(&self) -> (&QuotaLedger, &QuotaConfig) {
        (&self.ledger, &self.quotas)
    }

    pub async fn leave(&self, participant: ParticipantId) -> Result<(), ShardError> {
        self.try_on_shard(shard_of_id(participant.0), move |sfu, now| {
            sfu.leave(now, participant)
        })
        .await
    }

    pub async fn offer(
        &self,
        participant: ParticipantId,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), ShardError> {
        self.try_on_shard(shard_of_id(participant.0), move |sfu, now| {
            sfu.accept_offer(now, participant, &sdp, intent)
        })
        .await
    }

    /// Joins as an ephemeral participant and negotiates at once (WHIP/WHEP).
    pub async fn session(
        &self,
        room: &str,
        identity: &str,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), ShardError> {
        self.session_as(room, Owner::identity(identity), sdp, intent)
            .await
    }

    /// [`Self::session`], charged to `owner` (identity and token).
    pub async fn session_as(
        &self,
        room: &str,
        owner: Owner,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), ShardError> {
        let room = room.to_owned();
        self.try_on_shard(self.shard_of_room(&room), move |sfu, now| {
            sfu.join_as(&room, &owner, true).and_then(|p| {
                sfu.accept_offer(now, p, &sdp, intent).inspect_err(|_| {
                    let _ = sfu.leave(now, p);
                })
            })
        })
        .await
    }

    pub async fn rtp_endpoint(
        &self,
        room: &str,
        identity: &str,
        spec: RtpEndpointSpec,
    ) -> Result<RtpEndpointInfo, ShardError> {
        self.rtp_endpoint_as(room, Owner::identity(identity), spec)
            .await
    }

    /// [`Self::rtp_endpoint`], charged to `owner` (identity and token).
    pub async fn rtp_endpoint_as(
        &self,
        room: &str,
        owner: Owner,
        spec: RtpEndpointSpec,
    ) -> Result<RtpEndpointInfo, ShardError> {
        let shard = self.shard_of_room(room);
        let remote = spec.remote;
        // Shared port: steer the remote to its shard before the endpoint
        // exists, so its first datagram cannot reach another shard.
        if let Some(shared) = &self.shared {
            shared
                .insert(remote, shard)
                .map_err(|e| SfuError::Internal(format!("steering {remote}: {e}")))?;
        }
        let room = room.to_owned();
        let r = self
            .try_on_shard(shard, move |sfu, now| {
                sfu.join_as(&room, &owner, true).and_then(|p| {
                    sfu.add_rtp_endpoint(now, p, spec).inspect_err(|_| {
                        let _ = sfu.leave(now, p);
                    })
                })
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

    pub async fn remove_peer(&self, peer: PeerId) -> Result<(), ShardError> {
        self.try_on_shard(shard_of_id(peer.0), move |sfu, now| {
            sfu.remove_peer(now, peer)
        })
        .await?;
        if let Some(shared) = &self.shared {
            shared.remove_endpoint(peer);
        }
        Ok(())
    }

    pub async fn set_layer(&self, peer: PeerId, rid: Option<String>) -> Result<(), ShardError> {
        self.try_on_shard(shard_of_id(peer.0), move |sfu, now| {
            sfu.set_layer(now, peer, rid.as_deref())
        })
        .await
    }

    /// Sets (or, `None`, clears) the codec list of `room` on the shard that
    /// owns it.
    pub async fn set_room_codecs(
        &self,
        room: &str,
        codecs: Option<Vec<ridge_sfu::CodecSpec>>,
    ) -> Result<(), ShardError> {
        let owned = room.to_owned();
        self.try_on_shard(self.shard_of_room(room), move |sfu, _| {
            sfu.set_room_codecs(&owned, codecs)
        })
        .await
    }

    /// The codec list `room` carries of its own, if any.
    pub async fn room_codecs(
        &self,
        room: &str,
    ) -> Result<Option<Vec<ridge_sfu::CodecSpec>>, ShardError> {
        let owned = room.to_owned();
        self.on_shard(self.shard_of_room(room), move |sfu, _| {
            sfu.room_codecs(&owned).map(<[_]>::to_vec)
        })
        .await
    }

    /// Pins the scalable layers a subscriber receives (`None`: every one).
    pub async fn set_svc_layers(
        &self,
        peer: PeerId,
        spatial: Option<u8>,
        temporal: Option<u8>,
    ) -> Result<(), ShardError> {
        self.try_on_shard(shard_of_id(peer.0), move |sfu, _| {
            sfu.set_svc_layers(peer, spatial, temporal)
        })
        .await
    }

    /// (participant, room, identity) of a peer.
    pub async fn peer_owner(&self, peer: PeerId) -> Option<(ParticipantId, String, String)> {
        self.on_shard(shard_of_id(peer.0), move |sfu, _| {
            sfu.peer_owner(peer).map(|(p, room)| {
                let identity = sfu.participant_identity(p).unwrap_or_default().to_string();
                (p, room.to_string(), identity)
            })
        })
        .await
        .ok()
        .flatten()
    }

    /// Who is in a room and what they publish; empty if its shard stopped.
    pub async fn room_state(&self, room: &str) -> RoomState {
        let room = room.to_owned();
        self.on_shard(self.shard_of_room(&room), move |sfu, _| {
            sfu.room_state(&room)
        })
        .await
        .unwrap_or_default()
    }

    /// A statistics snapshot of every shard, merged, and the number of open
    /// sessions; `None` if any shard has stopped.
    pub async fn stats(&self) -> Option<(StatsSnapshot, usize)> {
        let replies = self
            .on_all_shards(|sfu, _| (sfu.stats(), sfu.peer_count()))
            .await
            .ok()?;
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
        let replies = self.on_all_shards(|sfu, _| sfu.remote_addrs()).await.ok()?;
        Some(replies.into_iter().flatten().collect())
    }

    /// Every remote socket that authenticated as a mesh link, on any shard.
    pub async fn mesh_peer_addrs(&self) -> Option<Vec<SocketAddr>> {
        let replies = self
            .on_all_shards(|sfu, _| sfu.mesh_peer_addrs())
            .await
            .ok()?;
        Some(replies.into_iter().flatten().collect())
    }

    /// Each shard's mesh transit streams that a kernel fast path could
    /// forward (`Sfu::mesh_flows`), by shard index; `None` if a shard has
    /// stopped.
    pub async fn mesh_flows(&self) -> Option<Vec<Vec<MeshFlow>>> {
        self.on_all_shards(|sfu, now| sfu.mesh_flows(now))
            .await
            .ok()
    }

    /// Tells shard `shard` what the kernel did with its mesh transit
    /// streams (`Sfu::set_kernel_mesh_forwarded`).
    pub async fn set_kernel_mesh_forwarded(&self, shard: usize, progress: Vec<MeshFlowProgress>) {
        let _ = self
            .on_shard(shard, move |sfu, now| {
                sfu.set_kernel_mesh_forwarded(now, &progress)
            })
            .await;
    }

    /// Each shard's plain-RTP flows that a kernel fast path could forward
    /// (`Sfu::plain_flows`), by shard index; `None` if a shard has stopped.
    pub async fn plain_flows(&self, max_destinations: usize) -> Option<Vec<Vec<PlainFlow>>> {
        self.on_all_shards(move |sfu, _| sfu.plain_flows(max_destinations))
            .await
            .ok()
    }

    /// Tells shard `shard` which of its plain publishers the kernel
    /// forwards (`Sfu::set_kernel_forwarded`).
    pub async fn set_kernel_forwarded(&self, shard: usize, publishers: Vec<PeerId>) {
        let _ = self
            .on_shard(shard, move |sfu, _| sfu.set_kernel_forwarded(&publishers))
            .await;
    }

    /// Applies the mesh links and routes of a desired state on every shard.
    pub async fn set_mesh(&self, config: MeshConfig) {
        self.on_every_shard(move |sfu, now| sfu.set_mesh(now, config))
            .await;
    }

    /// Makes every shard refuse new sessions.
    pub async fn drain(&self) {
        self.on_every_shard(|sfu, _| sfu.start_drain()).await;
    }

    /// Closes every session on every shard.
    pub async fn close_all(&self) {
        self.on_every_shard(|sfu, now| sfu.close_all(now)).await;
    }
}

/// The shard an identifier was minted on (its shard byte).
fn shard_of_id(id: u64) -> usize {
    usize::from(shard_of(id))
}

/// Counts a call that found `link`'s shard stopped.
pub(super) fn stopped(shard: usize, link: &ShardLink) -> ShardError {
    link.stats.stopped_calls.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(shard, "a control call found its media shard stopped");
    ShardError::Stopped { shard }
}
