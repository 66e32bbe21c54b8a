//! SK_REUSEPORT steering on a real socket group (in a private namespace).

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Netns, ip_tool, load, require};
use ridge_ebpf::SteerFlow;
use socket2::{Domain, Protocol, Socket, Type};

const SHARDS: usize = 4;

fn shard_socket(addr: SocketAddr) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.into()
}

/// Source ports of what each shard socket received.
fn received(shards: &[UdpSocket]) -> Vec<Vec<u16>> {
    shards
        .iter()
        .map(|s| {
            let mut ports = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                ports.push(from.port());
            }
            ports
        })
        .collect()
}

#[test]
fn steering_sends_flows_to_their_shard() {
    if require("steering_sends_flows_to_their_shard", ip_tool()).is_err() {
        return;
    }
    let ns = Netns::new("steer");
    let mut bpf = load();
    let local: SocketAddr = "127.0.0.1:5004".parse().unwrap();
    let (shards, clients) = ns.enter(|| {
        let shards: Vec<UdpSocket> = (0..SHARDS).map(|_| shard_socket(local)).collect();
        let clients: Vec<UdpSocket> = (0..12)
            .map(|i| UdpSocket::bind(("127.0.0.1", 4000 + i)).unwrap())
            .collect();
        (shards, clients)
    });
    bpf.attach_steering(&shards).expect("attach steering");

    // Clients 0..8 are known flows; 8..12 are unknown.
    let mut expected: HashMap<u16, usize> = HashMap::new();
    for (i, client) in clients.iter().enumerate().take(8) {
        let remote = client.local_addr().unwrap();
        let shard = (SHARDS - 1) - i % SHARDS;
        bpf.steering()
            .insert(SteerFlow { remote, local }, shard as u32)
            .unwrap();
        expected.insert(remote.port(), shard);
    }
    assert!(
        bpf.steering()
            .insert(
                SteerFlow {
                    remote: local,
                    local
                },
                SHARDS as u32
            )
            .is_err()
    );
    assert_eq!(bpf.steering().len().unwrap(), 8);

    let send_all = |clients: &[UdpSocket]| {
        for round in 0..20u8 {
            for c in clients {
                c.send_to(&[round], local).unwrap();
            }
        }
    };

    // Unknown flows go to a default shard when one is set.
    bpf.steering().set_default_shard(Some(1)).unwrap();
    send_all(&clients);
    let got = received(&shards);
    for (shard, ports) in got.iter().enumerate() {
        for port in ports {
            let want = expected.get(port).copied().unwrap_or(1);
            assert_eq!(shard, want, "packet from port {port}");
        }
    }
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 12 * 20);
    let c = bpf.counters().unwrap();
    assert_eq!(
        (c.steer_flow, c.steer_default, c.steer_errors),
        (8 * 20, 4 * 20, 0)
    );

    // Without a default, unknown flows are left to the kernel's hash (all
    // still delivered, each flow to one socket); known flows still steer.
    bpf.steering().set_default_shard(None).unwrap();
    bpf.steering()
        .remove(SteerFlow {
            remote: clients[0].local_addr().unwrap(),
            local,
        })
        .unwrap();
    expected.remove(&4000);
    send_all(&clients);
    let got = received(&shards);
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 12 * 20);
    let mut home: HashMap<u16, usize> = HashMap::new();
    for (shard, ports) in got.iter().enumerate() {
        for port in ports {
            if let Some(want) = expected.get(port) {
                assert_eq!(shard, *want, "known flow from port {port}");
            }
            assert_eq!(
                *home.entry(*port).or_insert(shard),
                shard,
                "flow {port} stays on one shard"
            );
        }
    }
    assert_eq!(bpf.counters().unwrap().steer_hash, 5 * 20);

    // Detached: the kernel alone decides; nothing is lost.
    bpf.detach_steering().unwrap();
    send_all(&clients);
    assert_eq!(
        received(&shards).iter().map(Vec::len).sum::<usize>(),
        12 * 20
    );
    assert_eq!(
        bpf.counters().unwrap().steer_flow,
        8 * 20 + 7 * 20,
        "program no longer runs"
    );
}

#[test]
fn steering_handles_ipv6_flows() {
    if require("steering_handles_ipv6_flows", ip_tool()).is_err() {
        return;
    }
    let ns = Netns::new("steer6");
    let mut bpf = load();
    let local: SocketAddr = "[::1]:5004".parse().unwrap();
    let (shards, clients) = ns.enter(|| {
        let shards: Vec<UdpSocket> = (0..SHARDS)
            .map(|_| {
                let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
                s.set_only_v6(true).unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&local.into()).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s.into()
            })
            .collect();
        let clients: Vec<UdpSocket> = (0..6)
            .map(|i| UdpSocket::bind(("::1", 4100 + i)).unwrap())
            .collect();
        (shards, clients)
    });
    bpf.attach_steering(&shards).expect("attach steering");
    // Every client to shard 2, except the last, which is unknown.
    for client in &clients[..5] {
        let remote = client.local_addr().unwrap();
        bpf.steering()
            .insert(SteerFlow { remote, local }, 2)
            .unwrap();
    }
    bpf.steering().set_default_shard(Some(0)).unwrap();
    for round in 0..10u8 {
        for c in &clients {
            c.send_to(&[round], local).unwrap();
        }
    }
    let got = received(&shards);
    assert_eq!(got[2].len(), 50, "{got:?}");
    assert_eq!(got[0], vec![4105; 10], "{got:?}");
    assert!(got[1].is_empty() && got[3].is_empty());
    assert!(got[2].iter().all(|p| (4100..4105).contains(p)));
}

/// A STUN binding request whose USERNAME is `username`, after `before`
/// other attributes (each a 4-byte PRIORITY-like attribute).
fn binding_request(username: &[u8], before: usize) -> Vec<u8> {
    let mut attrs = Vec::new();
    for _ in 0..before {
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
    }
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username);
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    // MESSAGE-INTEGRITY-sized trailer, as real requests carry.
    attrs.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    attrs.extend_from_slice(&[0xaa; 20]);
    stun_message(0x0001, &attrs)
}

fn stun_message(kind: u16, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(attrs);
    m
}

/// What each shard socket received, as (source port, first byte).
fn received_from(shards: &[UdpSocket]) -> Vec<Vec<(u16, u8)>> {
    shards
        .iter()
        .map(|s| {
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                got.push((from.port(), if n > 0 { buf[0] } else { 0 }));
            }
            got
        })
        .collect()
}

#[test]
fn steering_learns_webrtc_flows_from_stun_usernames() {
    if require(
        "steering_learns_webrtc_flows_from_stun_usernames",
        ip_tool(),
    )
    .is_err()
    {
        return;
    }
    let ns = Netns::new("steerstun");
    let mut bpf = load();
    let local: SocketAddr = "127.0.0.1:5004".parse().unwrap();
    let (shards, clients) = ns.enter(|| {
        let shards: Vec<UdpSocket> = (0..SHARDS).map(|_| shard_socket(local)).collect();
        let clients: Vec<UdpSocket> = (0..16)
            .map(|i| UdpSocket::bind(("127.0.0.1", 4200 + i)).unwrap())
            .collect();
        (shards, clients)
    });
    bpf.attach_steering(&shards).expect("attach steering");
    bpf.steering().set_default_shard(Some(0)).unwrap();
    let port = |i: usize| clients[i].local_addr().unwrap().port();

    // Fresh 4-tuples, each first sending a binding request naming shard
    // 1, 2, 3 (USERNAME first, or after other attributes), then DTLS-like
    // (first byte 22) and RTP-like (0x80) datagrams.
    let named = [(0usize, 3u8, 0usize), (1, 2, 3), (2, 1, 15), (3, 3, 1)];
    for &(c, shard, before) in &named {
        let user = format!("{shard:02x}AbCdEfGh12345678:remoteufrag");
        clients[c]
            .send_to(&binding_request(user.as_bytes(), before), local)
            .unwrap();
        clients[c].send_to(&[22, 0xfe, 0xfd], local).unwrap();
        clients[c].send_to(&[0x80, 96, 0, 1], local).unwrap();
    }
    let got = received_from(&shards);
    for &(c, shard, _) in &named {
        let on: Vec<u8> = got[usize::from(shard)]
            .iter()
            .filter(|(p, _)| *p == port(c))
            .map(|(_, b)| *b)
            .collect();
        assert_eq!(
            on,
            vec![0x00, 22, 0x80],
            "client {c} on shard {shard}: {got:?}"
        );
    }
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), named.len() * 3);
    let c = bpf.counters().unwrap();
    assert_eq!(c.steer_stun_learned, 4, "{c:?}");
    assert_eq!(c.steer_flow, 8, "{c:?}");
    assert_eq!(c.steer_errors, 0, "{c:?}");
    assert_eq!(bpf.steering().len().unwrap(), 4);

    // Unusable binding requests: each from a fresh 4-tuple, each must land
    // on the default shard (1 from now on), be counted, and teach nothing.
    bpf.steering().set_default_shard(Some(1)).unwrap();
    let username_then = |len: u16, value: &[u8]| {
        let mut a = Vec::new();
        a.extend_from_slice(&0x0006u16.to_be_bytes());
        a.extend_from_slice(&len.to_be_bytes());
        a.extend_from_slice(value);
        a
    };
    let too_many: Vec<u8> = (0..17)
        .flat_map(|_| [0x00u8, 0x24, 0x00, 0x04, 1, 2, 3, 4])
        .chain(username_then(8, b"02abcdef"))
        .collect();
    let mut truncated = binding_request(b"02abcdefgh:xy", 0);
    truncated.truncate(26); // the header says more attributes follow
    // A USERNAME whose length runs past the message.
    let long_len = stun_message(0x0001, &username_then(0xfff0, b"02abcdef"));
    // A message length far past the datagram, and an attribute whose length
    // sends the walk past the end of the packet.
    let mut lying_header = stun_message(0x0001, &[0, 0x24, 0x01, 0x00, 1, 2, 3, 4]);
    lying_header[2..4].copy_from_slice(&0xfffcu16.to_be_bytes());
    let unusable: Vec<Vec<u8>> = vec![
        binding_request(b"zzabcdef:remote", 0), // not hex
        binding_request(b"02ABCDEF:remote", 2), // fine: lowercase digits, see below
        binding_request(b"3fabcdef:remote", 0), // shard 63: no socket there
        binding_request(b"0", 0),               // too short
        stun_message(0x0001, &too_many),        // USERNAME after 17 attributes
        truncated,
        long_len,
        lying_header,
        stun_message(0x0001, &[0, 6, 0]), // length not a multiple of 4
        stun_message(0x0001, &[]),        // no attributes at all
    ];
    // The second one is in fact usable (shard 2): its first two characters
    // are digits. It checks the rest does not break a good request.
    for (i, msg) in unusable.iter().enumerate() {
        clients[4 + i].send_to(msg, local).unwrap();
    }
    let got = received_from(&shards);
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), unusable.len());
    assert_eq!(got[2], vec![(port(5), 0x00)], "{got:?}");
    let on_default: Vec<u16> = got[1].iter().map(|(p, _)| *p).collect();
    let want: Vec<u16> = (4..4 + unusable.len())
        .filter(|&i| i != 5)
        .map(port)
        .collect();
    let mut sorted = on_default.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "{got:?}");
    let c = bpf.counters().unwrap();
    assert_eq!(c.steer_stun_learned, 5, "{c:?}");
    assert_eq!(c.steer_errors, 9, "each unusable request is counted: {c:?}");
    assert_eq!(c.steer_default, 9, "{c:?}");
    assert_eq!(bpf.steering().len().unwrap(), 5);

    // Not STUN (a response, a non-binding request, plain bytes) from an
    // unknown flow: no error, the default shard; then the kernel's hash.
    let others = [
        stun_message(0x0101, &[]), // binding success response
        stun_message(0x0003, &[]), // allocate request
        vec![0x80, 96, 0, 1],
        vec![],
    ];
    for msg in &others {
        clients[15].send_to(msg, local).unwrap();
    }
    let got = received_from(&shards);
    assert_eq!(got[1].len(), others.len(), "{got:?}");
    let c = bpf.counters().unwrap();
    assert_eq!((c.steer_errors, c.steer_default), (9, 13), "{c:?}");

    bpf.steering().set_default_shard(None).unwrap();
    for msg in &others {
        clients[15].send_to(msg, local).unwrap();
    }
    let got = received_from(&shards);
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), others.len());
    assert_eq!(bpf.counters().unwrap().steer_hash, others.len() as u64);

    // A learned flow stays learned; userspace can forget it.
    clients[0].send_to(&[0x80, 96, 0, 2], local).unwrap();
    assert_eq!(received_from(&shards)[3], vec![(port(0), 0x80)]);
    bpf.steering()
        .remove(SteerFlow {
            remote: clients[0].local_addr().unwrap(),
            local,
        })
        .unwrap();
    assert_eq!(bpf.steering().len().unwrap(), 4);
}

#[test]
fn steering_matches_wildcard_entries_on_any_local_address() {
    if require(
        "steering_matches_wildcard_entries_on_any_local_address",
        ip_tool(),
    )
    .is_err()
    {
        return;
    }
    let ns = Netns::new("steerany");
    let mut bpf = load();
    let bound: SocketAddr = "0.0.0.0:5006".parse().unwrap();
    let (shards, client) = ns.enter(|| {
        let shards: Vec<UdpSocket> = (0..SHARDS).map(|_| shard_socket(bound)).collect();
        (shards, UdpSocket::bind("127.0.0.1:4300").unwrap())
    });
    bpf.attach_steering(&shards).expect("attach steering");
    bpf.steering().set_default_shard(Some(0)).unwrap();
    bpf.steering()
        .insert(
            SteerFlow {
                remote: client.local_addr().unwrap(),
                local: bound,
            },
            2,
        )
        .unwrap();
    for _ in 0..5 {
        client.send_to(&[0x80], "127.0.0.1:5006").unwrap();
        client.send_to(&[0x80], "127.0.0.2:5006").unwrap();
    }
    let got = received(&shards);
    assert_eq!(got[2].len(), 10, "{got:?}");
}
