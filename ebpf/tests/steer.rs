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
