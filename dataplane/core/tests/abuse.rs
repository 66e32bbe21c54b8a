//! The core against an attacker with a valid token: sessions that never
//! finish their handshake, sessions that go silent, one owner trying to
//! take every slot, and plain-RTP subscribers aimed at addresses that never
//! asked for media. Simulated time throughout.

mod common;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::client::{Client, Datagram};
use common::*;
use ridge_sfu::{
    OfferIntent, Owner, QuotaConfig, QuotaLimit, QuotaLimits, ReapReason, RtpDirection,
    RtpEndpointSpec, SfuError, SfuEvent, SpecError, TrackKind,
};
use str0m::media::{Direction, MediaKind};

const ROOM: &str = "abuse";

/// A host that never asked for media (TEST-NET-2: not trusted by the
/// tests' configuration, so its endpoints must prove consent).
const VICTIM: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

/// A WHIP-like publish offer (audio and video) from a str0m client. The
/// same text serves every session: the core answers each with its own ICE
/// credentials, and no ICE ever follows.
fn publish_offer() -> String {
    let mut client = Client::new("attacker", remote(66, 5000), std::time::Instant::now());
    let mut change = client.rtc.sdp_api();
    change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, _) = change.apply().unwrap();
    // No candidates: str0m's ICE-lite agent then never gives up on its own
    // (it has no pair to time out), as with the offers of the attack.
    offer
        .to_sdp_string()
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("a=candidate") && !l.starts_with("a=end-of-candidates"))
        .collect()
}

/// One WHIP session as the node's API opens it: an ephemeral participant
/// of `owner` and an offer.
fn whip(node: &mut Node, owner: &Owner, offer: &str) -> Result<ridge_sfu::PeerId, SfuError> {
    let now = node.now;
    let p = node.sfu.join_as(ROOM, owner, true)?;
    node.sfu
        .accept_offer(now, p, offer, OfferIntent::Publish)
        .map(|(peer, _)| peer)
        .inspect_err(|_| {
            let _ = node.sfu.leave(now, p);
        })
}

fn limits(sessions: usize) -> QuotaLimits {
    QuotaLimits {
        sessions,
        ..QuotaLimits::UNLIMITED
    }
}

fn reaped(node: &Node, reason: ReapReason) -> u64 {
    node.stats().sessions_reaped[reason as usize]
}

#[test]
fn one_token_is_held_to_its_quota_and_its_unfinished_sessions_are_reaped() {
    let mut node = Node::new(|c| {
        c.max_peers = 1000;
        c.quotas = QuotaConfig {
            node_sessions: 1000,
            per_identity: limits(250),
            per_token: limits(100),
        };
    });
    let offer = publish_offer();
    let attacker = Owner::identity("mallory").with_token("token-1");
    let mut accepted = 0;
    let mut refusals = Vec::new();
    for _ in 0..1000 {
        match whip(&mut node, &attacker, &offer) {
            Ok(_) => accepted += 1,
            Err(e) => refusals.push(e),
        }
    }
    assert_eq!(accepted, 100, "the token's quota");
    assert_eq!(refusals.len(), 900);
    assert!(
        refusals.iter().all(|e| matches!(
            e,
            SfuError::Quota {
                limit: QuotaLimit::TokenSessions,
                max: 100
            }
        )),
        "{:?}",
        refusals.first()
    );
    assert_eq!(
        refusals[0].to_string(),
        "quota exceeded: token_sessions (at most 100)"
    );
    assert_eq!(
        node.stats().quota_refusals[QuotaLimit::TokenSessions as usize],
        900
    );
    // Everybody else is still served.
    let alice = Owner::identity("alice").with_token("token-2");
    whip(&mut node, &alice, &offer).expect("another user is served");
    assert_eq!(node.sfu.peer_count(), 101);

    // Nobody does ICE: after the handshake timeout every session is gone,
    // each reaped and counted, and the slots are free again.
    node.advance(Duration::from_secs(14));
    assert_eq!(node.sfu.peer_count(), 101, "not before the timeout");
    node.advance(Duration::from_secs(2));
    assert_eq!(node.sfu.peer_count(), 0, "reaped after the timeout");
    assert_eq!(reaped(&node, ReapReason::Handshake), 101);
    let reaped_events = node
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                SfuEvent::SessionReaped {
                    reason: ReapReason::Handshake,
                    ..
                }
            )
        })
        .count();
    assert_eq!(reaped_events, 101);
    assert_eq!(node.sfu.quota_ledger().sessions(), 0);
    assert!(node.sfu.room_state(ROOM).participants.is_empty());
    whip(&mut node, &attacker, &offer).expect("the token's slots are back");
}

#[test]
fn one_identity_never_takes_the_whole_node() {
    // Many tokens of one identity: the identity's limit holds, below the
    // node's, and the node's limit holds for everybody together.
    let mut node = Node::new(|c| {
        c.max_peers = 1000;
        c.quotas = QuotaConfig {
            node_sessions: 40,
            per_identity: limits(30),
            per_token: limits(10),
        };
    });
    let offer = publish_offer();
    let mut ok = 0;
    let mut last = None;
    for t in 0..10 {
        let owner = Owner::identity("mallory").with_token(format!("t{t}"));
        for _ in 0..10 {
            match whip(&mut node, &owner, &offer) {
                Ok(_) => ok += 1,
                Err(e) => last = Some(e),
            }
        }
    }
    assert_eq!(ok, 30);
    assert!(matches!(
        last,
        Some(SfuError::Quota {
            limit: QuotaLimit::IdentitySessions,
            max: 30
        })
    ));
    for i in 0..10 {
        let owner = Owner::identity(&format!("user{i}"));
        let r = whip(&mut node, &owner, &offer);
        if i < 10 {
            assert!(r.is_ok(), "user{i}: {r:?}");
        }
    }
    let r = whip(&mut node, &Owner::identity("late"), &offer);
    assert!(matches!(r, Err(SfuError::Full(40))), "{r:?}");
    assert_eq!(
        node.stats().quota_refusals[QuotaLimit::NodeSessions as usize],
        1
    );
}

#[test]
fn rooms_tracks_and_plain_endpoints_have_quotas_and_claims_tighten_them() {
    let mut node = Node::new(|c| {
        c.quotas.per_identity = QuotaLimits {
            sessions: 100,
            rooms: 2,
            tracks: 3,
            rtp_endpoints: 4,
        };
    });
    let owner = Owner::identity("bob");
    node.sfu.join_as("r1", &owner, false).unwrap();
    node.sfu.join_as("r2", &owner, false).unwrap();
    node.sfu.join_as("r2", &owner, false).unwrap();
    let r = node.sfu.join_as("r3", &owner, false);
    assert!(
        matches!(
            r,
            Err(SfuError::Quota {
                limit: QuotaLimit::IdentityRooms,
                max: 2
            })
        ),
        "{r:?}"
    );

    // An offer publishing two tracks, then one more: the third track fits,
    // the fourth does not.
    let offer = publish_offer();
    let p = node.sfu.join_as("r1", &owner, false).unwrap();
    node.sfu
        .accept_offer(node.now, p, &offer, OfferIntent::Publish)
        .unwrap();
    let spec = |direction, port| RtpEndpointSpec {
        fmtp: None,
        codec: None,
        audio_level_ext: None,
        direction,
        kind: TrackKind::Video,
        remote: remote(9, port),
        payload_type: 96,
        ssrc: Some(u32::from(port)),
        track: None,
    };
    node.sfu
        .add_rtp_endpoint(node.now, p, spec(RtpDirection::Publish, 1))
        .unwrap();
    let r = node
        .sfu
        .add_rtp_endpoint(node.now, p, spec(RtpDirection::Publish, 2));
    assert!(
        matches!(
            r,
            Err(SfuError::Quota {
                limit: QuotaLimit::IdentityTracks,
                max: 3
            })
        ),
        "{r:?}"
    );
    for port in 3..6 {
        node.sfu
            .add_rtp_endpoint(node.now, p, spec(RtpDirection::Subscribe, port))
            .unwrap();
    }
    let r = node
        .sfu
        .add_rtp_endpoint(node.now, p, spec(RtpDirection::Subscribe, 7));
    assert!(
        matches!(
            r,
            Err(SfuError::Quota {
                limit: QuotaLimit::IdentityRtpEndpoints,
                max: 4
            })
        ),
        "{r:?}"
    );

    // A token's claim tightens its limit (never loosens it).
    let tight = Owner::identity("carol")
        .with_token("jti-1")
        .with_token_limits(limits(1));
    whip(&mut node, &tight, &offer).unwrap();
    let r = whip(&mut node, &tight, &offer);
    assert!(
        matches!(
            r,
            Err(SfuError::Quota {
                limit: QuotaLimit::TokenSessions,
                max: 1
            })
        ),
        "{r:?}"
    );
}

#[test]
fn websocket_style_participants_count_their_sessions() {
    // A WebSocket room session joins once (not ephemeral) and opens
    // several sessions; they all count against its owner.
    let mut node = Node::new(|c| c.quotas.per_identity = limits(2));
    let offer = publish_offer();
    let owner = Owner::identity("dave").with_token("ws");
    let p = node.sfu.join_as(ROOM, &owner, false).unwrap();
    let now = node.now;
    node.sfu
        .accept_offer(now, p, &offer, OfferIntent::Publish)
        .unwrap();
    node.sfu
        .accept_offer(now, p, &offer, OfferIntent::Publish)
        .unwrap();
    let r = node.sfu.accept_offer(now, p, &offer, OfferIntent::Publish);
    assert!(matches!(r, Err(SfuError::Quota { .. })), "{r:?}");
    assert_eq!(node.sfu.quota_ledger().sessions_of(&owner), (2, 2));
    node.sfu.leave(now, p).unwrap();
    assert_eq!(node.sfu.quota_ledger().sessions_of(&owner), (0, 0));
    // A slot held outside the core (a WebSocket connection) counts too.
    let config = QuotaConfig {
        per_identity: limits(2),
        ..QuotaConfig::default()
    };
    let slot = node
        .sfu
        .quota_ledger()
        .reserve_session(&config, &owner)
        .unwrap();
    let p = node.sfu.join_as(ROOM, &owner, false).unwrap();
    node.sfu
        .accept_offer(now, p, &offer, OfferIntent::Publish)
        .unwrap();
    assert!(
        node.sfu
            .accept_offer(now, p, &offer, OfferIntent::Publish)
            .is_err()
    );
    drop(slot);
    node.sfu
        .accept_offer(now, p, &offer, OfferIntent::Publish)
        .unwrap();
}

/// Steps a str0m client and the node together, 1 ms at a time, until
/// `done` or `limit`.
fn run(
    node: &mut Node,
    client: &mut Client,
    limit: Duration,
    mut done: impl FnMut(&Node, &Client) -> bool,
) -> bool {
    let until = node.now + limit;
    while node.now < until {
        let sent = node.advance(ms(1));
        let mut to_node = VecDeque::new();
        let addr = client.addr;
        for s in sent.into_iter().filter(|s| s.destination == addr) {
            let d = Datagram {
                source: s.source,
                destination: s.destination,
                contents: s.contents,
            };
            client.receive(node.now, &d, &mut to_node);
        }
        client.timeout(node.now, &mut to_node);
        while let Some(d) = to_node.pop_front() {
            for s in node.receive(d.source, &d.contents) {
                if s.destination == client.addr {
                    let d = Datagram {
                        source: s.source,
                        destination: s.destination,
                        contents: s.contents,
                    };
                    client.receive(node.now, &d, &mut to_node);
                }
            }
        }
        if done(node, client) {
            return true;
        }
    }
    false
}

#[test]
fn a_connected_session_whose_remote_goes_silent_is_closed_in_bounded_time() {
    let mut node = Node::new(|_| {});
    let mut client = Client::new("publisher", remote(20, 5000), node.now);
    let p = node.sfu.join(ROOM, "erin", true).unwrap();
    let now = node.now;
    let (peer, _) = client.negotiate(
        &mut node.sfu,
        now,
        p,
        OfferIntent::Publish,
        &[(MediaKind::Video, Direction::SendOnly, None)],
    );
    let connected = run(&mut node, &mut client, ms(5000), |n, _| {
        n.events
            .iter()
            .any(|e| matches!(e, SfuEvent::PeerConnected { peer: x, .. } if *x == peer))
    });
    assert!(connected, "ICE + DTLS did not complete");
    // Keeps talking for a while: still open well past the handshake time.
    assert!(!run(
        &mut node,
        &mut client,
        Duration::from_secs(20),
        |n, _| { n.sfu.peer_count() == 0 }
    ));
    // Then goes silent (the client is simply no longer stepped).
    let silent_at = node.now;
    let mut closed_at = None;
    for _ in 0..400 {
        node.advance(ms(100));
        if node.sfu.peer_count() == 0 {
            closed_at = Some(node.now);
            break;
        }
    }
    let closed_at = closed_at.expect("the silent session is closed");
    let after = closed_at - silent_at;
    assert!(
        after <= Duration::from_secs(31),
        "closed {after:?} after silence"
    );
    assert_eq!(reaped(&node, ReapReason::IceConsent), 1);
    assert!(node.events.iter().any(|e| matches!(
        e,
        SfuEvent::SessionReaped {
            reason: ReapReason::IceConsent,
            peer: x,
            ..
        } if *x == peer
    )));
}

#[test]
fn the_core_closes_a_silent_session_even_when_str0m_does_not() {
    // The core's own check: a connected session from which no datagram
    // arrives for ice_consent_timeout is reaped (here shorter than
    // str0m's 15 s, so the core's check is the one that fires).
    let mut node = Node::new(|c| c.ice_consent_timeout = Duration::from_secs(5));
    let mut client = Client::new("publisher", remote(21, 5000), node.now);
    let p = node.sfu.join(ROOM, "frank", true).unwrap();
    let now = node.now;
    client.negotiate(
        &mut node.sfu,
        now,
        p,
        OfferIntent::Publish,
        &[(MediaKind::Audio, Direction::SendOnly, None)],
    );
    assert!(run(&mut node, &mut client, ms(5000), |n, _| {
        n.events
            .iter()
            .any(|e| matches!(e, SfuEvent::PeerConnected { .. }))
    }));
    let silent_at = node.now;
    node.advance(Duration::from_secs(4));
    assert_eq!(node.sfu.peer_count(), 1);
    node.advance(Duration::from_millis(1500));
    assert_eq!(node.sfu.peer_count(), 0, "reaped by the core's check");
    assert!(node.now - silent_at < Duration::from_secs(6));
    assert_eq!(reaped(&node, ReapReason::IceConsent), 1);
}

/// A VP8 keyframe packet of the plain publisher.
fn key_packet(seq: u16) -> Vec<u8> {
    let payload = vp8_payload(true, 320, 240, b"pub", 200);
    rtp(96, seq, u32::from(seq) * 3000, 0x1111_2222, true, &payload)
}

/// An RTCP receiver report with no report blocks from `ssrc`.
fn empty_rr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 201, 0x00, 0x01];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p
}

#[test]
fn plain_subscribers_send_nothing_until_their_remote_asks() {
    let mut node = Node::new(|c| c.rtp_consent_timeout = Duration::from_secs(15));
    let publisher_addr = remote(10, 4000);
    let owner = Owner::identity("mallory").with_token("token-1");
    let pubp = node.sfu.join_as(ROOM, &owner, true).unwrap();
    node.plain_video_endpoint(
        pubp,
        RtpDirection::Publish,
        publisher_addr,
        96,
        Some(0x1111_2222),
    );
    // 50 subscribers aimed at ports of a host that never asked for media.
    let mut subs = Vec::new();
    for i in 0..50u16 {
        let p = node.sfu.join_as(ROOM, &owner, true).unwrap();
        let remote = SocketAddr::new(VICTIM, 20_000 + i);
        let info = node.plain_video_endpoint(p, RtpDirection::Subscribe, remote, 96, None);
        subs.push((remote, info));
    }
    let mut to_victim = 0;
    for seq in 0..100u16 {
        let sent = node.receive(publisher_addr, &key_packet(seq));
        to_victim += sent.iter().filter(|s| s.destination.ip() == VICTIM).count();
    }
    assert_eq!(to_victim, 0, "100 packets in, nothing out to the victim");

    // One remote really wants the stream: its first RTCP packet from its
    // address is the consent, and media follows.
    let (wanting, info) = subs[7].clone();
    node.receive(wanting, &empty_rr(0x7777));
    assert!(
        node.events
            .iter()
            .any(|e| matches!(e, SfuEvent::PeerConnected { peer, .. } if *peer == info.peer))
    );
    let mut got = 0;
    let mut others = 0;
    for seq in 100..110u16 {
        for s in node.receive(publisher_addr, &key_packet(seq)) {
            if s.destination == wanting {
                assert_eq!(parse_rtp(&s.contents).ssrc, info.ssrc);
                got += 1;
            } else if s.destination.ip() == VICTIM {
                others += 1;
            }
        }
    }
    assert_eq!(got, 10);
    assert_eq!(others, 0);

    // The others time out: reaped and counted; the consenting one stays.
    node.advance(Duration::from_secs(16));
    assert_eq!(reaped(&node, ReapReason::RtpConsent), 49);
    assert_eq!(node.sfu.peer_count(), 2, "the publisher and one subscriber");
    let sent = node.receive(publisher_addr, &key_packet(111));
    assert_eq!(to(&sent, wanting).len(), 1);
}

#[test]
fn plain_remotes_must_be_unicast_and_allowed() {
    let mut node = Node::new(|_| {});
    let p = node.sfu.join(ROOM, "mallory", false).unwrap();
    let try_remote = |node: &mut Node, remote: &str| {
        node.sfu.add_rtp_endpoint(
            node.now,
            p,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Subscribe,
                kind: TrackKind::Video,
                remote: remote.parse().unwrap(),
                payload_type: 96,
                ssrc: None,
                track: None,
            },
        )
    };
    for bad in ["255.255.255.255:5004", "224.0.0.251:5353", "0.0.0.1:9"] {
        let r = try_remote(&mut node, bad);
        assert!(
            matches!(
                r,
                Err(SfuError::InvalidSpec(SpecError::RemoteNotUnicast(_)))
            ),
            "{bad}: {r:?}"
        );
    }
    for bad in ["127.0.0.1:5004", "169.254.10.10:5004"] {
        let r = try_remote(&mut node, bad);
        assert!(
            matches!(
                r,
                Err(SfuError::InvalidSpec(SpecError::RemoteRestricted(_)))
            ),
            "{bad}: {r:?}"
        );
    }
    // The node's media socket is IPv4: an IPv6 remote is unreachable.
    let r = try_remote(&mut node, "[2001:db8::1]:5004");
    assert!(
        matches!(
            r,
            Err(SfuError::InvalidSpec(SpecError::RemoteFamily { .. }))
        ),
        "{r:?}"
    );
    assert!(try_remote(&mut node, "198.51.100.9:5004").is_ok());

    // The operator's allowlist lets trusted gear on loopback through.
    let mut node = Node::new(|c| c.rtp_allow_networks = vec!["127.0.0.0/8".parse().unwrap()]);
    let p = node.sfu.join(ROOM, "ops", false).unwrap();
    let try_remote = |node: &mut Node, remote: &str| {
        node.sfu.add_rtp_endpoint(
            node.now,
            p,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Subscribe,
                kind: TrackKind::Video,
                remote: remote.parse().unwrap(),
                payload_type: 96,
                ssrc: None,
                track: None,
            },
        )
    };
    assert!(try_remote(&mut node, "127.0.0.1:5004").is_ok());
    assert!(try_remote(&mut node, "169.254.10.10:5004").is_err());
}
