//! Shared helpers for the core's integration tests: a simulated clock around
//! an [`Sfu`], packet builders and decoders. Nothing here opens a socket or
//! sleeps; time only moves when a test says so.
#![allow(dead_code)] // each test binary uses a different subset

pub mod client;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ridge_sfu::packet::{self, PacketClass, RtcpPacket, RtpHeader, rtcp};
use ridge_sfu::{
    CodecSpec, DropReason, LocalEndpointInfo, LocalEndpointSpec, LocalOutput, Output,
    ParticipantId, RtpDirection, RtpEndpointInfo, RtpEndpointSpec, Sfu, SfuConfig, SfuEvent,
    StatsSnapshot, TrackKind,
};

/// The node's media socket.
pub const LOCAL: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000));

/// The simulated network whose plain subscribers need not prove consent.
pub const TRUSTED: &str = "192.0.2.0/24";

/// A remote address on the simulated network.
pub fn remote(host: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, host), port))
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A datagram the node sent, with its contents copied out.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// An [`Sfu`] driven by a hand-advanced clock, with every output collected.
pub struct Node {
    pub sfu: Sfu,
    pub start: Instant,
    pub now: Instant,
    /// Every event the node emitted, in order.
    pub events: Vec<SfuEvent>,
    /// What the core handed to local endpoints, in order.
    pub local: Vec<LocalOutput>,
}

impl Node {
    pub fn new(configure: impl FnOnce(&mut SfuConfig)) -> Self {
        let mut config = SfuConfig::new(LOCAL);
        // The simulated remotes (192.0.2.0/24) receive without proving
        // consent first; the tests of consent use other networks.
        config.rtp_trusted_networks = vec![TRUSTED.parse().unwrap()];
        configure(&mut config);
        let start = Instant::now();
        Node {
            sfu: Sfu::new(config, start),
            start,
            now: start,
            events: Vec::new(),
            local: Vec::new(),
        }
    }

    /// Simulated milliseconds since the node was created.
    /// Adds a plain RTP video endpoint for `participant` (at the current
    /// simulated time).
    pub fn plain_video_endpoint(
        &mut self,
        participant: ParticipantId,
        direction: RtpDirection,
        remote: SocketAddr,
        payload_type: u8,
        ssrc: Option<u32>,
    ) -> RtpEndpointInfo {
        self.plain_video_endpoint_in(
            CodecSpec::Vp8,
            participant,
            direction,
            remote,
            payload_type,
            ssrc,
        )
    }

    /// [`Node::plain_video_endpoint`] in `codec`.
    pub fn plain_video_endpoint_in(
        &mut self,
        codec: CodecSpec,
        participant: ParticipantId,
        direction: RtpDirection,
        remote: SocketAddr,
        payload_type: u8,
        ssrc: Option<u32>,
    ) -> RtpEndpointInfo {
        self.sfu
            .add_rtp_endpoint(
                self.now,
                participant,
                RtpEndpointSpec {
                    fmtp: None,
                    codec: Some(codec),
                    audio_level_ext: None,
                    direction,
                    kind: TrackKind::Video,
                    remote,
                    payload_type,
                    ssrc,
                    track: None,
                },
            )
            .expect("plain RTP endpoint")
    }

    /// A local (in-process) endpoint of `codec` in `participant`'s room.
    pub fn local_endpoint(
        &mut self,
        participant: ParticipantId,
        direction: RtpDirection,
        codec: CodecSpec,
        payload_type: u8,
        ssrc: Option<u32>,
    ) -> LocalEndpointInfo {
        self.sfu
            .add_local_endpoint(
                self.now,
                participant,
                LocalEndpointSpec {
                    direction,
                    codec,
                    payload_type,
                    ssrc,
                    track: None,
                },
            )
            .expect("local endpoint")
    }

    pub fn elapsed_ms(&self) -> u128 {
        (self.now - self.start).as_millis()
    }

    /// Pulls every queued output: transmits are returned (and their buffers
    /// recycled), events are appended to [`Node::events`] and also returned.
    pub fn drain(&mut self) -> (Vec<Sent>, Vec<SfuEvent>) {
        let mut sent = Vec::new();
        let mut events = Vec::new();
        while let Some(out) = self.sfu.poll_output() {
            match out {
                Output::Transmit(t) => {
                    sent.push(Sent {
                        at: self.now,
                        source: t.source,
                        destination: t.destination,
                        contents: t.to_vec(),
                    });
                    self.sfu.recycle(t.contents);
                }
                Output::Event(e) => {
                    self.events.push(e.clone());
                    events.push(e);
                }
                Output::MeshControl(m) => panic!("a single core has no other shard: {m:?}"),
                Output::Local(l) => self.local.push(l),
            }
        }
        (sent, events)
    }

    /// Feeds one datagram addressed to the node and returns what it caused.
    pub fn receive(&mut self, from: SocketAddr, data: &[u8]) -> Vec<Sent> {
        self.sfu.handle_datagram(self.now, from, LOCAL, data);
        self.drain().0
    }

    /// Moves the clock forward by `d`, firing every timeout that falls due on
    /// the way at its exact instant. Returns the datagrams sent meanwhile.
    pub fn advance(&mut self, d: Duration) -> Vec<Sent> {
        let until = self.now + d;
        let mut sent = Vec::new();
        loop {
            let due = self.sfu.poll_timeout();
            if due > until {
                break;
            }
            self.now = self.now.max(due);
            self.sfu.handle_timeout(self.now);
            sent.extend(self.drain().0);
        }
        self.now = until;
        sent
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.sfu.stats()
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.sfu.stats().drops[reason as usize]
    }
}

/// The datagrams of `sent` addressed to `to`.
pub fn to(sent: &[Sent], to: SocketAddr) -> Vec<&Sent> {
    sent.iter().filter(|s| s.destination == to).collect()
}

// ----- RTP ---------------------------------------------------------------------

/// A plain RTP packet (12-byte header).
pub fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    packet::rtp::write_packet(&mut out, marker, pt, seq, ts, ssrc, payload);
    out
}

/// A decoded RTP packet, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtp {
    pub marker: bool,
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub payload: Vec<u8>,
}

/// Decodes an RTP datagram; panics (failing the test) if it is not one.
pub fn parse_rtp(data: &[u8]) -> Rtp {
    assert_eq!(
        packet::classify(data),
        PacketClass::Rtp,
        "not RTP: {data:02x?}"
    );
    let h = RtpHeader::parse(data).expect("valid RTP");
    Rtp {
        marker: h.marker,
        pt: h.payload_type,
        seq: h.sequence,
        ts: h.timestamp,
        ssrc: h.ssrc,
        payload: h.payload(data).to_vec(),
    }
}

/// The parts of an RTCP packet the tests look at, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rtcp {
    Nack { media_ssrc: u32, lost: Vec<u16> },
    Pli { media_ssrc: u32 },
    Fir { media_ssrcs: Vec<u32> },
    Other,
}

/// Decodes a (compound) RTCP datagram; panics if it is not valid RTCP.
pub fn parse_rtcp(data: &[u8]) -> Vec<Rtcp> {
    assert_eq!(
        packet::classify(data),
        PacketClass::Rtcp,
        "not RTCP: {data:02x?}"
    );
    rtcp::iter(data)
        .map(|item| match item.expect("valid RTCP") {
            RtcpPacket::Nack {
                media_ssrc, lost, ..
            } => Rtcp::Nack {
                media_ssrc,
                lost: lost.collect(),
            },
            RtcpPacket::Pli { media_ssrc, .. } => Rtcp::Pli { media_ssrc },
            RtcpPacket::Fir { entries, .. } => Rtcp::Fir {
                media_ssrcs: entries.map(|(s, _)| s).collect(),
            },
            _ => Rtcp::Other,
        })
        .collect()
}

pub fn nack(sender_ssrc: u32, media_ssrc: u32, lost: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    rtcp::write_nack(&mut out, sender_ssrc, media_ssrc, lost);
    out
}

pub fn pli(sender_ssrc: u32, media_ssrc: u32) -> Vec<u8> {
    let mut out = Vec::new();
    rtcp::write_pli(&mut out, sender_ssrc, media_ssrc);
    out
}

pub fn fir(sender_ssrc: u32, media_ssrc: u32, seq_nr: u8) -> Vec<u8> {
    let mut out = Vec::new();
    rtcp::write_fir(&mut out, sender_ssrc, media_ssrc, seq_nr);
    out
}

// ----- VP8 ---------------------------------------------------------------------

/// A VP8 RTP payload (RFC 7741): a one-byte payload descriptor (S=1,
/// partition 0), then a VP8 frame header (10 bytes for a keyframe, with the
/// start code and `width`x`height`; 3 bytes for an interframe), then `tag`,
/// then filler up to `len` bytes. The P bit of the first header byte is 0 for
/// keyframes, which is what [`packet::codec::vp8_is_keyframe`] checks.
pub fn vp8_payload(keyframe: bool, width: u16, height: u16, tag: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0x10];
    if keyframe {
        // Frame tag: P=0 (key), version 0, show_frame=1, first partition size.
        p.extend_from_slice(&[0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a]);
        p.extend_from_slice(&width.to_le_bytes());
        p.extend_from_slice(&height.to_le_bytes());
    } else {
        p.extend_from_slice(&[0x51, 0x42, 0x00]);
    }
    p.extend_from_slice(tag);
    assert!(p.len() <= len, "payload length {len} too small");
    let mut filler = 0u8;
    while p.len() < len {
        p.push(filler);
        filler = filler.wrapping_add(1);
    }
    assert_eq!(packet::codec::vp8_is_keyframe(&p), keyframe);
    p
}

/// Wrapping difference `a - b` of RTP timestamps, as a signed number.
pub fn ts_diff(a: u32, b: u32) -> i64 {
    i64::from(a.wrapping_sub(b) as i32)
}
