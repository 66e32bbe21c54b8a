//! The control-call path end to end: real shards on loopback sockets.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use ridge_io::BackendChoice;
use ridge_sfu::{SfuConfig, shard_of};

use super::handle::{MediaHandle, ShardError};
use super::startup::{ShardOptions, spawn};
use super::stats::ShardCounters;

fn two_shards() -> (MediaHandle, Vec<std::thread::JoinHandle<()>>) {
    let udp: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let opts = ShardOptions {
        udp,
        shards: 2,
        pin_cores: false,
        backend: BackendChoice::Mmsg,
        gso: false,
        shared_port: false,
    };
    spawn(&opts, SfuConfig::new(udp), ShardCounters::default()).expect("shards")
}

fn room_on(media: &MediaHandle, shard: usize) -> String {
    (0..)
        .map(|n| format!("room-{n}"))
        .find(|r| media.shard_of_room(r) == shard)
        .unwrap()
}

#[tokio::test]
async fn a_call_returns_its_closures_result() {
    let (media, _threads) = two_shards();
    let room = room_on(&media, 1);
    let p = media.join(&room, "alice").await.expect("join");
    assert_eq!(usize::from(shard_of(p.0)), 1, "minted on the room's shard");
    let peers = media.on_shard(1, |sfu, _| sfu.peer_count()).await;
    assert_eq!(peers.ok(), Some(0), "a participant is not a session");
    let state = media.room_state(&room).await;
    assert_eq!(state.participants.len(), 1);
    assert!(matches!(
        media.on_shard(2, |_, _| ()).await,
        Err(ShardError::NoSuchShard { shard: 2 })
    ));
}

#[tokio::test]
async fn a_dead_shard_is_reported_and_counted() {
    let (media, mut threads) = two_shards();
    // The call takes the shard's thread down with it.
    let r = media
        .on_shard(1, |_, _| -> () { panic!("shard 1 fails on purpose") })
        .await;
    assert!(matches!(r, Err(ShardError::Stopped { shard: 1 })), "{r:?}");
    assert!(threads.remove(1).join().is_err(), "the thread panicked");
    // Its queue is closed now: every call fails fast, naming the shard.
    let room = room_on(&media, 1);
    let e = media.join(&room, "bob").await.expect_err("dead shard");
    assert!(matches!(e, ShardError::Stopped { shard: 1 }), "{e:?}");
    assert_eq!(e.to_string(), "media shard 1 has stopped");
    assert!(!e.is_client_error());
    assert_eq!(media.room_state(&room).await.participants.len(), 0);
    assert!(
        media.stats().await.is_none(),
        "no merged stats without shard 1"
    );
    let stats = media.shard_stats();
    assert_eq!(stats[1].stopped_calls.load(Ordering::Relaxed), 4);
    assert_eq!(stats[0].stopped_calls.load(Ordering::Relaxed), 0);
    // The other shard serves on.
    let other = room_on(&media, 0);
    media.join(&other, "carol").await.expect("shard 0 lives");
}
