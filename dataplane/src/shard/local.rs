//! Local (in-process) endpoints on a shard: how a part of the node that is
//! not a socket (an ingest, a recorder, a transcoder) publishes into a room
//! or subscribes to one, without looping through loopback UDP.
//!
//! [`MediaHandle::local_endpoint`] adds the endpoint to the room's core and
//! registers its output queue with the shard in one step, so nothing the
//! core produces for it is lost between the two. From then on:
//!
//! - a publisher feeds RTP with [`LocalEndpoint::send_rtp`] (or
//!   [`LocalEndpoint::try_send_rtp`]): the packet is copied once into a
//!   shared buffer on the caller's thread and routed by the shard like a
//!   received datagram; subscribers get views of it, never copies;
//! - a subscriber's media, and a publisher's keyframe requests, arrive on
//!   [`LocalEndpoint::recv`] as [`LocalOutput`]s: the payload is the
//!   buffer the shard received, shared.
//!
//! Every queue is bounded. An endpoint's output queue holds
//! [`LOCAL_QUEUE`] outputs; when it is full the shard drops what does not
//! fit and counts it (`ridge_shard_local_dropped`), it never waits. Feeding
//! goes through the shard's command queue: `try_send_rtp` says when it is
//! full, `send_rtp` waits for room. A shard holds at most
//! [`MAX_LOCAL_ENDPOINTS`] local endpoints. Dropping a [`LocalEndpoint`]
//! (or [`LocalEndpoint::close`]) removes it from its room; one removed by
//! the room (its participant left, the node drained) closes its queue, so
//! `recv` returns `None`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ridge_sfu::{
    LocalEndpointInfo, LocalEndpointSpec, LocalOutput, PacketBuf, PeerId, Sfu, SfuError,
};
use tokio::sync::{mpsc, oneshot};

use super::command::{Command, LocalCommand};
use super::handle::{MediaHandle, ShardError, stopped};
use super::stats::ShardStats;

/// Outputs an endpoint's queue holds before the shard drops and counts.
pub const LOCAL_QUEUE: usize = 1024;

/// Local endpoints one shard holds at most.
pub const MAX_LOCAL_ENDPOINTS: usize = 256;

/// The shard's side: each local endpoint's output queue.
#[derive(Debug, Default)]
pub(super) struct LocalSinks {
    sinks: HashMap<PeerId, mpsc::Sender<LocalOutput>>,
}

impl LocalSinks {
    /// Carries out one request on the shard's thread.
    pub(super) fn run(
        &mut self,
        cmd: LocalCommand,
        sfu: &mut Sfu,
        now: Instant,
        stats: &ShardStats,
    ) {
        match cmd {
            LocalCommand::Add {
                room,
                identity,
                spec,
                outputs,
                reply,
            } => {
                let r = self.add(sfu, now, &room, &identity, spec, outputs);
                let _ = reply.send(r);
            }
            LocalCommand::Rtp { peer, packet } => {
                if sfu.handle_local_rtp(now, peer, packet).is_err() {
                    // The endpoint went away while the packet was queued.
                    stats.local_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            LocalCommand::Remove { peer } => self.remove(sfu, now, peer),
        }
    }

    fn add(
        &mut self,
        sfu: &mut Sfu,
        now: Instant,
        room: &str,
        identity: &str,
        spec: LocalEndpointSpec,
        outputs: mpsc::Sender<LocalOutput>,
    ) -> Result<LocalEndpointInfo, SfuError> {
        if self.sinks.len() >= MAX_LOCAL_ENDPOINTS {
            return Err(SfuError::Full(MAX_LOCAL_ENDPOINTS));
        }
        let participant = sfu.join(room, identity, true)?;
        let info = sfu
            .add_local_endpoint(now, participant, spec)
            .inspect_err(|_| {
                let _ = sfu.leave(now, participant);
            })?;
        self.sinks.insert(info.peer, outputs);
        Ok(info)
    }

    fn remove(&mut self, sfu: &mut Sfu, now: Instant, peer: PeerId) {
        self.sinks.remove(&peer);
        if let Some((participant, _)) = sfu.peer_owner(peer) {
            // Its own ephemeral participant: leaving closes the endpoint.
            let _ = sfu.leave(now, participant);
        }
    }

    /// Hands one output to its endpoint's queue; a full or closed queue
    /// drops it and counts. A closed queue (the endpoint was dropped while
    /// its removal was on the way) is forgotten at once.
    pub(super) fn deliver(&mut self, out: LocalOutput, stats: &ShardStats) {
        let peer = match &out {
            LocalOutput::Media(m) => m.peer,
            LocalOutput::KeyframeRequest { peer } => *peer,
        };
        let Some(tx) = self.sinks.get(&peer) else {
            stats.local_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.local_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                stats.local_dropped.fetch_add(1, Ordering::Relaxed);
                self.sinks.remove(&peer);
            }
        }
    }

    /// Forgets the queues of endpoints the core no longer has (their
    /// participant left, the room closed), which closes them for their
    /// owners. Runs with the shard's periodic report.
    pub(super) fn prune(&mut self, sfu: &Sfu) {
        self.sinks.retain(|peer, _| sfu.peer_owner(*peer).is_some());
    }
}

/// Why feeding a local endpoint failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalSendError {
    /// The shard's command queue is full: the caller feeds faster than the
    /// shard routes. Retry later, or drop the packet.
    #[error("media shard {shard} is busy; packet not queued")]
    Busy { shard: usize },
    /// The shard has stopped.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// A local endpoint, owned by the part of the node that feeds or consumes
/// it. See the module docs.
#[derive(Debug)]
pub struct LocalEndpoint {
    info: LocalEndpointInfo,
    shard: usize,
    commands: mpsc::Sender<Command>,
    outputs: mpsc::Receiver<LocalOutput>,
    closed: bool,
}

impl LocalEndpoint {
    /// The session, its SSRC and its track.
    pub fn info(&self) -> &LocalEndpointInfo {
        &self.info
    }

    /// Queues one RTP packet of this (publishing) endpoint for its shard,
    /// or says the shard is busy.
    pub fn try_send_rtp(&self, packet: &[u8]) -> Result<(), LocalSendError> {
        let cmd = self.rtp(packet);
        self.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LocalSendError::Busy { shard: self.shard },
            mpsc::error::TrySendError::Closed(_) => {
                ShardError::Stopped { shard: self.shard }.into()
            }
        })
    }

    /// Queues one RTP packet of this (publishing) endpoint, waiting while
    /// the shard's queue is full.
    pub async fn send_rtp(&self, packet: &[u8]) -> Result<(), ShardError> {
        self.commands
            .send(self.rtp(packet))
            .await
            .map_err(|_| ShardError::Stopped { shard: self.shard })
    }

    fn rtp(&self, packet: &[u8]) -> Command {
        Command::Local(LocalCommand::Rtp {
            peer: self.info.peer,
            packet: PacketBuf::copy_from(packet),
        })
    }

    /// The next output for this endpoint: media for a subscriber, keyframe
    /// requests for a publisher. `None` once the endpoint is closed.
    pub async fn recv(&mut self) -> Option<LocalOutput> {
        self.outputs.recv().await
    }

    /// The next output if one is queued.
    pub fn try_recv(&mut self) -> Option<LocalOutput> {
        self.outputs.try_recv().ok()
    }

    /// Asks the publisher of the track this (subscribing) endpoint receives
    /// for a keyframe (throttled by the core).
    pub async fn request_keyframe(&self, media: &MediaHandle) -> Result<(), ShardError> {
        let peer = self.info.peer;
        Ok(media
            .on_shard(self.shard, move |sfu, now| {
                sfu.request_local_keyframe(now, peer)
            })
            .await??)
    }

    /// This (subscribing) endpoint lost the packets `lost`: those the core
    /// still holds are delivered again.
    pub async fn nack(&self, media: &MediaHandle, lost: Vec<u16>) -> Result<(), ShardError> {
        let peer = self.info.peer;
        Ok(media
            .on_shard(self.shard, move |sfu, now| {
                sfu.handle_local_nack(now, peer, &lost)
            })
            .await??)
    }

    /// Removes the endpoint from its room and waits until the shard has
    /// taken the request.
    pub async fn close(mut self) -> Result<(), ShardError> {
        self.closed = true;
        let cmd = Command::Local(LocalCommand::Remove {
            peer: self.info.peer,
        });
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ShardError::Stopped { shard: self.shard })
    }
}

impl Drop for LocalEndpoint {
    fn drop(&mut self) {
        if !self.closed {
            // Best effort: a full queue leaves the removal to the shard,
            // which forgets a closed queue on its next delivery and the
            // endpoint with its room.
            let _ = self.commands.try_send(Command::Local(LocalCommand::Remove {
                peer: self.info.peer,
            }));
        }
    }
}

impl MediaHandle {
    /// Adds a local endpoint to `room` as an ephemeral participant
    /// `identity` (see the module docs).
    pub async fn local_endpoint(
        &self,
        room: &str,
        identity: &str,
        spec: LocalEndpointSpec,
    ) -> Result<LocalEndpoint, ShardError> {
        let shard = self.shard_of_room(room);
        let link = self
            .shards
            .get(shard)
            .ok_or(ShardError::NoSuchShard { shard })?;
        let (outputs_tx, outputs) = mpsc::channel(LOCAL_QUEUE);
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Local(LocalCommand::Add {
            room: room.to_owned(),
            identity: identity.to_owned(),
            spec,
            outputs: outputs_tx,
            reply,
        });
        link.tx.send(cmd).await.map_err(|_| stopped(shard, link))?;
        let info = answer.await.map_err(|_| stopped(shard, link))??;
        Ok(LocalEndpoint {
            info,
            shard,
            commands: link.tx.clone(),
            outputs,
            closed: false,
        })
    }
}
