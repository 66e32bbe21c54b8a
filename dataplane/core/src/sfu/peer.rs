//! Sessions: a peer's transport (WebRTC, plain RTP, or a mesh placeholder)
//! and the indexes that find the session a datagram belongs to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::{ParticipantId, PeerId};
use crate::types::Counters;

use super::mesh::MeshPeer;
use super::plain::RtpEndpoint;
use super::webrtc::WebRtcPeer;

/// One session of a participant, whatever its transport.
pub(super) struct Peer {
    pub(super) participant: ParticipantId,
    pub(super) room: String,
    pub(super) transport: Transport,
    pub(super) counters: Counters,
    pub(super) created: Instant,
    pub(super) loss: Option<f32>,
    pub(super) rtt: Option<Duration>,
}

impl Peer {
    /// A session created at `now`, with nothing counted yet.
    pub(super) fn new(
        participant: ParticipantId,
        room: &str,
        transport: Transport,
        now: Instant,
    ) -> Self {
        Peer {
            participant,
            room: room.to_owned(),
            transport,
            counters: Counters::default(),
            created: now,
            loss: None,
            rtt: None,
        }
    }
}

/// How a session reaches its remote.
pub(super) enum Transport {
    WebRtc(Box<WebRtcPeer>),
    Rtp(Box<RtpEndpoint>),
    /// A placeholder for a participant on another node whose tracks reach
    /// this one over a mesh link.
    Mesh(MeshPeer),
}

/// Which session a datagram belongs to: by remote address (WebRTC peers
/// once ICE has seen the address, plain endpoints), or by the ufrag of a
/// first STUN request.
#[derive(Default)]
pub(super) struct PeerIndex {
    pub(super) by_ufrag: HashMap<String, PeerId>,
    /// WebRTC peers by the remote addresses str0m answered.
    pub(super) by_addr: HashMap<SocketAddr, PeerId>,
    /// Plain RTP endpoints by remote address (a remote may publish and
    /// subscribe on one port).
    pub(super) rtp_by_addr: HashMap<SocketAddr, Vec<PeerId>>,
}

impl PeerIndex {
    /// Forgets a closed session's entries.
    pub(super) fn forget(&mut self, id: PeerId, transport: &Transport) {
        match transport {
            Transport::WebRtc(w) => {
                self.by_ufrag.remove(&w.ufrag);
                for a in &w.addrs {
                    self.by_addr.remove(a);
                }
            }
            Transport::Rtp(e) => {
                if let Some(remote) = e.remote()
                    && let Some(v) = self.rtp_by_addr.get_mut(&remote)
                {
                    v.retain(|x| *x != id);
                    if v.is_empty() {
                        self.rtp_by_addr.remove(&remote);
                    }
                }
            }
            Transport::Mesh(_) => {}
        }
    }
}
