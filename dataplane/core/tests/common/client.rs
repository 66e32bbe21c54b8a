//! A str0m WebRTC client (RTP mode, full ICE) on a simulated network, for
//! the tests that need a real WebRTC peer (simulcast publishers).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use ridge_sfu::{OfferIntent, ParticipantId, PeerId, Sfu};

use super::{LOCAL, Node, Sent};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Simulcast};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// A datagram between a client and a node.
pub struct Datagram {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// A str0m client on the simulated network.
pub struct Client {
    pub name: &'static str,
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub next_timeout: Instant,
    pub events: Vec<(Instant, Event)>,
}

impl Client {
    pub fn new(name: &'static str, addr: SocketAddr, now: Instant) -> Self {
        Self::with_config(name, addr, now, |c| {
            c.enable_vp8(true).enable_opus(true, false)
        })
    }

    /// A client whose codecs `codecs` enables, in its order of preference
    /// (on a configuration with none).
    pub fn with_config(
        name: &'static str,
        addr: SocketAddr,
        now: Instant,
        codecs: impl FnOnce(RtcConfig) -> RtcConfig,
    ) -> Self {
        let mut rtc = codecs(RtcConfig::new().set_rtp_mode(true).clear_codecs()).build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Client {
            name,
            rtc,
            addr,
            next_timeout: now,
            events: Vec::new(),
        }
    }

    /// Drains the client until it asks for a timeout.
    pub fn poll(&mut self, now: Instant, out: &mut VecDeque<Datagram>) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.next_timeout = t;
                    return;
                }
                Ok(Output::Transmit(t)) => out.push_back(Datagram {
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.to_vec(),
                }),
                Ok(Output::Event(e)) => self.events.push((now, e)),
                Err(e) => panic!("{}: {e}", self.name),
            }
        }
    }

    pub fn pt(&self, codec: Codec) -> str0m::media::Pt {
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
            .unwrap()
    }

    /// Offers `media` and hands the offer to the node; applies the answer
    /// when there is one, and returns it (or the node's refusal).
    pub fn try_negotiate(
        &mut self,
        sfu: &mut Sfu,
        now: Instant,
        participant: ParticipantId,
        intent: OfferIntent,
        media: &[(MediaKind, Direction, Option<Simulcast>)],
    ) -> Result<(PeerId, Vec<Mid>, String), ridge_sfu::SfuError> {
        let mut change = self.rtc.sdp_api();
        let mids: Vec<Mid> = media
            .iter()
            .map(|(kind, dir, sim)| change.add_media(*kind, *dir, None, None, sim.clone()))
            .collect();
        let (offer, pending) = change.apply().unwrap();
        let (peer, answer) = sfu.accept_offer(now, participant, &offer.to_sdp_string(), intent)?;
        let parsed = SdpAnswer::from_sdp_string(&answer).unwrap();
        self.rtc.sdp_api().accept_answer(pending, parsed).unwrap();
        Ok((peer, mids, answer))
    }

    /// Offers `media`, lets the node answer with `intent`, applies the answer.
    pub fn negotiate(
        &mut self,
        sfu: &mut Sfu,
        now: Instant,
        participant: ParticipantId,
        intent: OfferIntent,
        media: &[(MediaKind, Direction, Option<Simulcast>)],
    ) -> (PeerId, Vec<Mid>) {
        let (peer, mids, _) = self
            .try_negotiate(sfu, now, participant, intent, media)
            .unwrap();
        (peer, mids)
    }

    /// A datagram from the node reaches the client.
    pub fn receive(&mut self, now: Instant, d: &Datagram, out: &mut VecDeque<Datagram>) {
        let recv = Receive::new(Protocol::Udp, d.source, d.destination, &d.contents)
            .expect("a datagram str0m can parse");
        self.rtc.handle_input(Input::Receive(now, recv)).unwrap();
        self.poll(now, out);
    }

    /// Fires the client's timer if it is due.
    pub fn timeout(&mut self, now: Instant, out: &mut VecDeque<Datagram>) {
        if self.next_timeout <= now {
            self.rtc.handle_input(Input::Timeout(now)).unwrap();
            self.poll(now, out);
        }
    }
}

/// At the node's current instant, fires every timer due (the clients' and
/// the node's) and delivers what that sends until the network is quiet; a
/// datagram to anyone but `clients` fails the test.
pub fn fire_timers_and_deliver(node: &mut Node, clients: &mut [Client]) {
    let now = node.now;
    let mut to_node = VecDeque::new();
    for c in clients.iter_mut() {
        c.timeout(now, &mut to_node);
    }
    if node.sfu.poll_timeout() <= now {
        node.sfu.handle_timeout(now);
    }
    deliver(node, clients, to_node, |s| {
        panic!("sent to a stranger: {}", s.destination)
    });
}

/// Hands datagrams to the node and the node's to `clients`, at the node's
/// current instant, until nobody has anything left to send. What the node
/// sends elsewhere goes to `other`.
pub fn deliver(
    node: &mut Node,
    clients: &mut [Client],
    mut to_node: VecDeque<Datagram>,
    mut other: impl FnMut(Sent),
) {
    let now = node.now;
    loop {
        while let Some(d) = to_node.pop_front() {
            assert_eq!(
                d.destination, LOCAL,
                "clients only know the node's candidate"
            );
            node.sfu
                .handle_datagram(now, d.source, d.destination, &d.contents);
        }
        let (sent, _) = node.drain();
        if sent.is_empty() {
            break;
        }
        for s in sent {
            assert_eq!(s.source, LOCAL);
            let Some(c) = clients.iter_mut().find(|c| c.addr == s.destination) else {
                other(s);
                continue;
            };
            let recv = Receive::new(Protocol::Udp, s.source, s.destination, &s.contents)
                .expect("a datagram str0m can parse");
            c.rtc.handle_input(Input::Receive(now, recv)).unwrap();
            c.poll(now, &mut to_node);
        }
    }
}
