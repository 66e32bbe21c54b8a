//! The media thread: one UDP socket and one [`Sfu`], driven by a
//! current-thread runtime. Socket I/O stays behind this narrow boundary
//! (`recv` → `handle_datagram`, `poll_output` → `send`), so the io_uring
//! shards can replace it without touching the core.
//!
//! HTTP and WebSocket handlers reach the core through [`MediaHandle`],
//! which sends commands over a channel and awaits the reply: the core is
//! only ever touched from this thread, and no lock is taken per packet.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ridge_sfu::{
    OfferIntent, Output, ParticipantId, PeerId, RoomState, RtpEndpointInfo, RtpEndpointSpec, Sfu,
    SfuConfig, SfuError, SfuEvent, StatsSnapshot,
};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::metrics::Metrics;

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
    Drain,
    CloseAll {
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle to the media thread.
#[derive(Clone, Debug)]
pub struct MediaHandle {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<SfuEvent>,
    local_addr: SocketAddr,
}

fn gone() -> SfuError {
    SfuError::Internal("the media thread has stopped".into())
}

impl MediaHandle {
    /// The bound media socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Core events (participants, tracks, speakers, layer demand).
    pub fn subscribe_events(&self) -> broadcast::Receiver<SfuEvent> {
        self.events.subscribe()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SfuError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn join(&self, room: &str, identity: &str) -> Result<ParticipantId, SfuError> {
        self.call(|reply| Command::Join {
            room: room.into(),
            identity: identity.into(),
            reply,
        })
        .await
    }

    pub async fn leave(&self, participant: ParticipantId) -> Result<(), SfuError> {
        self.call(|reply| Command::Leave { participant, reply })
            .await
    }

    pub async fn offer(
        &self,
        participant: ParticipantId,
        sdp: String,
        intent: OfferIntent,
    ) -> Result<(PeerId, String), SfuError> {
        self.call(|reply| Command::Offer {
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
        self.call(|reply| Command::Session {
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
        self.call(|reply| Command::RtpEndpoint {
            room: room.into(),
            identity: identity.into(),
            spec,
            reply,
        })
        .await
    }

    pub async fn remove_peer(&self, peer: PeerId) -> Result<(), SfuError> {
        self.call(|reply| Command::RemovePeer { peer, reply }).await
    }

    pub async fn set_layer(&self, peer: PeerId, rid: Option<String>) -> Result<(), SfuError> {
        self.call(|reply| Command::SetLayer { peer, rid, reply })
            .await
    }

    /// (participant, room, identity) of a peer.
    pub async fn peer_owner(&self, peer: PeerId) -> Option<(ParticipantId, String, String)> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::PeerOwner { peer, reply: tx })
            .await
            .ok()?;
        rx.await.ok()?
    }

    pub async fn room_state(&self, room: &str) -> RoomState {
        let (tx, rx) = oneshot::channel();
        if self
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

    /// A statistics snapshot and the number of open sessions.
    pub async fn stats(&self) -> Option<(StatsSnapshot, usize)> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stats { reply: tx }).await.ok()?;
        rx.await.ok()
    }

    pub async fn drain(&self) {
        let _ = self.tx.send(Command::Drain).await;
    }

    pub async fn close_all(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::CloseAll { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the media thread on an already bound socket.
pub fn spawn(
    socket: std::net::UdpSocket,
    mut config: SfuConfig,
    metrics: Metrics,
) -> std::io::Result<(MediaHandle, std::thread::JoinHandle<()>)> {
    socket.set_nonblocking(true)?;
    let local_addr = socket.local_addr()?;
    config.local_addr = local_addr;
    let (tx, rx) = mpsc::channel(1024);
    let (events, _) = broadcast::channel(4096);
    let handle = MediaHandle {
        tx,
        events: events.clone(),
        local_addr,
    };
    let join = std::thread::Builder::new()
        .name("ridge-media".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the media runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let socket = match UdpSocket::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register the media socket");
                        return;
                    }
                };
                run(socket, config, rx, events, metrics).await;
            });
        })?;
    Ok((handle, join))
}

/// Datagrams read per wake-up before outputs are flushed.
const RECV_BATCH: usize = 64;

async fn run(
    socket: UdpSocket,
    config: SfuConfig,
    mut commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<SfuEvent>,
    metrics: Metrics,
) {
    let local = config.local_addr;
    let mut sfu = Sfu::new(config, Instant::now());
    let mut buf = vec![0u8; 2048];
    loop {
        flush(&mut sfu, &socket, &events, &metrics).await;
        let deadline = sfu.poll_timeout();
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            biased;
            cmd = commands.recv() => {
                let Some(cmd) = cmd else {
                    // Every handle is gone: the node is shutting down.
                    sfu.close_all(Instant::now());
                    flush(&mut sfu, &socket, &events, &metrics).await;
                    return;
                };
                execute(&mut sfu, cmd);
            }
            r = socket.recv_from(&mut buf) => {
                match r {
                    Ok((n, source)) => {
                        let now = Instant::now();
                        sfu.handle_datagram(now, source, local, &buf[..n]);
                        for _ in 1..RECV_BATCH {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, source)) => sfu.handle_datagram(now, source, local, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        // ICMP errors surface here (e.g. ECONNREFUSED from a
                        // gone client); they must not stop the loop.
                        metrics.udp_recv_errors.inc();
                        tracing::debug!(error = %e, "media socket receive error");
                    }
                }
            }
            _ = sleep => sfu.handle_timeout(Instant::now()),
        }
    }
}

async fn flush(
    sfu: &mut Sfu,
    socket: &UdpSocket,
    events: &broadcast::Sender<SfuEvent>,
    metrics: &Metrics,
) {
    while let Some(out) = sfu.poll_output() {
        match out {
            Output::Transmit(t) => {
                let r = match socket.try_send_to(&t.contents, t.destination) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        match tokio::time::timeout(
                            Duration::from_millis(20),
                            socket.send_to(&t.contents, t.destination),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                        }
                    }
                    r => r,
                };
                if r.is_err() {
                    metrics.udp_send_errors.inc();
                }
                sfu.recycle(t.contents);
            }
            Output::Event(e) => {
                tracing::debug!(event = ?e, "core event");
                let _ = events.send(e);
            }
        }
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
        Command::Drain => sfu.start_drain(),
        Command::CloseAll { reply } => {
            sfu.close_all(now);
            let _ = reply.send(());
        }
    }
}
