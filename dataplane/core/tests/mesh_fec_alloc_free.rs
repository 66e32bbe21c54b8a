//! FEC on a mesh link allocates nothing per packet in steady state: a
//! plain video publisher on node A, a plain subscriber on node B, one mesh
//! link A → B with FEC on that loses every 50th media datagram. After a
//! warm-up, every packet's path (A forwards and protects it, adds it to its
//! FEC group and sends the repair packet; B authenticates, stores it for
//! FEC, rebuilds the lost ones from repair packets and forwards to the
//! subscriber) is counted with a counting global allocator and must not
//! allocate. Timers (subscriptions, announcements, NACK retries) run
//! outside the counted part: the mesh control path allocates by design.
//!
//! One `#[test]` only: the allocator counts on the measuring thread.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{remote, rtp, vp8_payload};
use ridge_sfu::{
    MeshConfig, MeshLinkSpec, MeshRouteSpec, Output, RtpDirection, RtpEndpointSpec, Sfu, SfuConfig,
    TrackKind, Transmit,
};

#[global_allocator]
static GLOBAL: ridge_io::CountingAlloc = ridge_io::CountingAlloc;

/// Runs `f`; returns the allocations this thread made meanwhile.
fn counted<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let a0 = ridge_io::alloc::thread_allocations();
    let r = f();
    (ridge_io::alloc::thread_allocations() - a0, r)
}

/// Copies a datagram `from` sent into `buf` (reusing its capacity) and
/// gives the node its buffer back; returns where it was sent.
fn copy_out(from: &mut Sfu, t: Transmit, buf: &mut Vec<u8>) -> SocketAddr {
    buf.clear();
    buf.extend_from_slice(&t.contents);
    if let Some(p) = &t.payload {
        buf.extend_from_slice(p.as_slice());
    }
    let to = t.destination;
    from.recycle(t.contents);
    to
}

fn node(i: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, i), 5000))
}

const SSRC: u32 = 0xaaaa;
const WARMUP: u32 = 2_000;
const MEASURED: u32 = 6_000;
const INTERVAL: Duration = Duration::from_millis(5);
const LOSS_EVERY: u64 = 50;

struct Pair {
    now: Instant,
    a: Sfu,
    b: Sfu,
    /// Reused datagram buffer.
    buf: Vec<u8>,
    /// Datagrams A sent B (media and repair packets), and how many of them
    /// the link dropped.
    a_to_b: u64,
    dropped: u64,
    to_subscriber: u64,
}

impl Pair {
    /// Moves every output of A to B (dropping every 50th datagram) and of
    /// B to A, until both are quiet; counts what reaches the subscriber.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(out) = self.a.poll_output() {
                moved = true;
                if let Output::Transmit(t) = out {
                    let to = copy_out(&mut self.a, t, &mut self.buf);
                    if to == node(2) {
                        self.a_to_b += 1;
                        if self.a_to_b.is_multiple_of(LOSS_EVERY) {
                            self.dropped += 1;
                            continue;
                        }
                        self.b
                            .handle_datagram(self.now, node(1), node(2), &self.buf);
                    }
                }
            }
            while let Some(out) = self.b.poll_output() {
                moved = true;
                if let Output::Transmit(t) = out {
                    let to = copy_out(&mut self.b, t, &mut self.buf);
                    if to == node(1) {
                        self.a
                            .handle_datagram(self.now, node(2), node(1), &self.buf);
                    } else {
                        self.to_subscriber += 1;
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn timers(&mut self) {
        loop {
            let due = self.a.poll_timeout().min(self.b.poll_timeout());
            if due > self.now {
                break;
            }
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.pump();
        }
    }
}

#[test]
fn mesh_fec_path_allocates_nothing_per_packet_in_steady_state() {
    let (n, ()) = counted(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(8))));
    assert_eq!(n, 1, "the counting allocator is not in use");

    let now = Instant::now();
    let mut pair = Pair {
        now,
        a: Sfu::new(trusting(SfuConfig::new(node(1))), now),
        b: Sfu::new(trusting(SfuConfig::new(node(2))), now),
        buf: Vec::with_capacity(2048),
        a_to_b: 0,
        dropped: 0,
        to_subscriber: 0,
    };
    let publisher = remote(1, 4000);
    let p = pair.a.join("demo", "alice", true).unwrap();
    pair.a
        .add_rtp_endpoint(
            now,
            p,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Publish,
                kind: TrackKind::Video,
                remote: publisher,
                payload_type: 96,
                ssrc: Some(SSRC),
                track: None,
            },
        )
        .unwrap();
    let s = pair.b.join("demo", "bob", true).unwrap();
    pair.b
        .add_rtp_endpoint(
            now,
            s,
            RtpEndpointSpec {
                fmtp: None,
                codec: None,
                audio_level_ext: None,
                direction: RtpDirection::Subscribe,
                kind: TrackKind::Video,
                remote: remote(2, 4002),
                payload_type: 100,
                ssrc: None,
                track: None,
            },
        )
        .unwrap();
    let config =
        |me: &str, peer: &str, addr: SocketAddr, up: Option<&str>, down: &[&str]| MeshConfig {
            node_id: me.into(),
            links: vec![MeshLinkSpec {
                peer: peer.into(),
                address: addr,
                key: [3; 32],
                trusted: false,
                fec: true,
            }],
            routes: vec![MeshRouteSpec {
                room: "demo".into(),
                source: "a".into(),
                upstream: up.map(str::to_owned),
                downstream: down.iter().map(|d| d.to_string()).collect(),
            }],
        };
    pair.a
        .set_mesh(now, config("a", "b", node(2), None, &["b"]));
    pair.b
        .set_mesh(now, config("b", "a", node(1), Some("a"), &[]));
    pair.pump();

    // Payloads made up front: the driver allocates nothing either.
    let payloads: Vec<Vec<u8>> = (0..2)
        .map(|k| vp8_payload(k == 1, 640, 360, b"tag", 1_000))
        .collect();
    let mut datagram = Vec::with_capacity(1_500);
    let mut step = |pair: &mut Pair, i: u32, count: bool| -> u64 {
        pair.now += INTERVAL;
        pair.timers();
        datagram.clear();
        let payload = &payloads[usize::from(i.is_multiple_of(300))];
        datagram.extend_from_slice(&rtp(96, i as u16, i * 3000, SSRC, true, payload)[..]);
        let (n, ()) = if count {
            counted(|| {
                pair.a
                    .handle_datagram(pair.now, publisher, node(1), &datagram);
                pair.pump();
            })
        } else {
            pair.a
                .handle_datagram(pair.now, publisher, node(1), &datagram);
            pair.pump();
            (0, ())
        };
        n
    };
    for i in 0..WARMUP {
        step(&mut pair, i, false);
    }
    let got_before = pair.to_subscriber;
    let rebuilt_before = pair.b.stats().mesh_links[0].fec_recovered;
    let mut allocs = 0;
    for i in WARMUP..WARMUP + MEASURED {
        allocs += step(&mut pair, i, true);
    }
    let b = pair.b.stats().mesh_links[0].clone();
    let a = pair.a.stats().mesh_links[0].clone();
    let got = pair.to_subscriber - got_before;
    eprintln!(
        "{MEASURED} packets: {} repair packets sent, {} datagrams dropped, {} rebuilt, \
         {got} to the subscriber, {allocs} allocations",
        a.fec_sent,
        pair.dropped,
        b.fec_recovered - rebuilt_before
    );
    assert!(b.fec_recovered - rebuilt_before > 50, "{b:?}");
    assert!(
        got >= u64::from(MEASURED) - 5,
        "{got} of {MEASURED} reached the subscriber"
    );
    assert_eq!(allocs, 0, "allocations in the steady-state mesh FEC path");
}

/// A configuration whose plain subscribers on the simulated network
/// receive without proving consent first.
fn trusting(mut c: SfuConfig) -> SfuConfig {
    c.rtp_trusted_networks = vec![common::TRUSTED.parse().unwrap()];
    c
}
