//! The incremental snapshot reload (`Scheduler::reload`): a replica reads
//! full rows only for nodes that are new, whose desired state changed, or
//! whose stored heartbeat is newer than its own; these tests check that it
//! still sees everything another replica writes, and never goes back to an
//! older report.
//!
//! Two schedulers in this process share one SQLite file, as two replicas
//! share one PostgreSQL database.

mod common;

use std::path::Path;

use common::{TempDir, enroll_request, report, write_cert};
use ridge_scheduler::api;
use ridge_scheduler::config::{self, EnvSecrets, FileConfig, Overrides};
use ridge_scheduler::metrics;
use ridge_scheduler::service::Scheduler;
use std::sync::Arc;

async fn open(dir: &Path, replica: &str) -> Arc<Scheduler> {
    open_with(dir, replica, None).await
}

async fn open_with(dir: &Path, replica: &str, interval: Option<&str>) -> Arc<Scheduler> {
    let fc = FileConfig {
        heartbeat_interval: interval.map(str::to_owned),
        tls_cert: Some(dir.join("cert.pem")),
        tls_key: Some(dir.join("key.pem")),
        database: Some(format!("sqlite://{}", dir.join("sched.db").display())),
        admin_token: Some(config::Secret::new(common::ADMIN)),
        replica_id: Some(replica.into()),
        ..FileConfig::default()
    };
    let cfg = config::build(fc, &Overrides::default(), EnvSecrets::default()).unwrap();
    let (_registry, m) = metrics::registry();
    Scheduler::open(cfg, m).await.unwrap()
}

async fn enrolled(s: &Scheduler) -> String {
    let t = s
        .create_token(api::CreateToken {
            ttl_secs: None,
            max_uses: None,
            region: "eu".into(),
            labels: Default::default(),
            description: String::new(),
        })
        .await
        .unwrap();
    s.enroll(enroll_request(&t.token.unwrap()))
        .await
        .unwrap()
        .node_id
}

fn cpu_of(s: &Scheduler, id: &str) -> Option<f64> {
    s.view().nodes.get(id).map(|n| n.report.load.cpu)
}

#[tokio::test]
async fn a_replica_sees_the_other_replicas_heartbeats_and_never_an_older_one() {
    let dir = TempDir::new("snapshot");
    write_cert(dir.path());
    let a = open(dir.path(), "a").await;
    let b = open(dir.path(), "b").await;

    // A node enrolled through A appears in B's snapshot (a new row).
    let id = enrolled(&a).await;
    b.reload().await.unwrap();
    let n = b
        .view()
        .nodes
        .get(&id)
        .cloned()
        .expect("B sees the new node");
    assert_eq!(n.row.last_heartbeat_ms, None);

    // A heartbeat taken by A reaches B once A has flushed it.
    a.heartbeat(&id, report("10.0.0.1:5004", 0.25, &[], &[]))
        .unwrap();
    b.reload().await.unwrap();
    assert_eq!(cpu_of(&b, &id), Some(0.0), "not flushed yet");
    a.flush().await.unwrap();
    b.reload().await.unwrap();
    assert_eq!(cpu_of(&b, &id), Some(0.25));
    let first = b.view().nodes[&id].row.last_heartbeat_ms.unwrap();

    // A reload with nothing new shares the entry with the previous snapshot.
    let before = b.view().nodes[&id].clone();
    b.reload().await.unwrap();
    assert!(Arc::ptr_eq(&before, &b.view().nodes[&id]));

    // B's own newer heartbeat wins over the stored one until A writes a
    // newer one still.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.heartbeat(&id, report("10.0.0.1:5004", 0.5, &[], &[]))
        .unwrap();
    b.reload().await.unwrap();
    assert_eq!(cpu_of(&b, &id), Some(0.5));
    assert!(b.view().nodes[&id].row.last_heartbeat_ms.unwrap() > first);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    a.heartbeat(&id, report("10.0.0.1:5004", 0.75, &[], &[]))
        .unwrap();
    a.flush().await.unwrap();
    b.reload().await.unwrap();
    assert_eq!(cpu_of(&b, &id), Some(0.75));

    // B flushing its older heartbeat does not move the stored one back.
    b.flush().await.unwrap();
    a.reload().await.unwrap();
    b.reload().await.unwrap();
    assert_eq!(cpu_of(&a, &id), Some(0.75));
    assert_eq!(cpu_of(&b, &id), Some(0.75));

    // Drain set through A shows in B without a heartbeat.
    a.drain(&id, true).await.unwrap();
    b.reload().await.unwrap();
    assert!(b.view().nodes[&id].row.drain);
    assert_eq!(cpu_of(&b, &id), Some(0.75));
}

#[tokio::test]
async fn flushing_many_heartbeats_writes_them_all() {
    let dir = TempDir::new("snapshot-batch");
    write_cert(dir.path());
    let a = open(dir.path(), "a").await;
    // More than one statement's worth of rows (500 per statement).
    let t = a
        .create_token(api::CreateToken {
            ttl_secs: None,
            max_uses: Some(1200),
            region: "eu".into(),
            labels: Default::default(),
            description: String::new(),
        })
        .await
        .unwrap()
        .token
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..1200 {
        ids.push(a.enroll(enroll_request(&t)).await.unwrap().node_id);
    }
    for (k, id) in ids.iter().enumerate() {
        let cpu = (k % 100) as f64 / 100.0;
        a.heartbeat(
            id,
            report(&format!("10.0.{}.{}:5004", k / 256, k % 256), cpu, &[], &[]),
        )
        .unwrap();
    }
    a.flush().await.unwrap();
    // A fresh replica reads everything from the database.
    let b = open(dir.path(), "b").await;
    let v = b.view();
    for (k, id) in ids.iter().enumerate() {
        let n = &v.nodes[id];
        assert!(
            n.row.last_heartbeat_ms.is_some(),
            "node {k} has no heartbeat"
        );
        assert_eq!(n.report.load.cpu, (k % 100) as f64 / 100.0, "node {k}");
    }
}

/// The leader recomputes at once when the mesh's structure changes, and
/// only every 2.5 heartbeat intervals when measurements alone change.
#[tokio::test]
async fn measurements_alone_recompute_at_the_refresh_and_structure_at_once() {
    use ridge_scheduler::store::LeaderLock;
    let dir = TempDir::new("snapshot-refresh");
    write_cert(dir.path());
    // 1 s heartbeat interval: 2.5 s refresh, 3 s lease.
    let s = open_with(dir.path(), "a", Some("1s")).await;
    let (a, b) = (enrolled(&s).await, enrolled(&s).await);
    let mut lock = LeaderLock::default();
    let beat = |id: &str, peer: &str, rtt: f64, rooms: &[(&str, u32, u32)]| {
        let mut hb = report("10.0.0.1:5004", 0.1, &[(peer, rtt)], rooms);
        hb.addresses.media = Some(format!("10.0.0.{}:5004", id.len()));
        s.heartbeat(id, hb).unwrap();
    };
    let a_reports_b_dead = || {
        let mut hb = report("10.0.0.1:5004", 0.1, &[], &[("r", 1, 0)]);
        hb.addresses.media = Some(format!("10.0.0.{}:5004", a.len()));
        hb.links = vec![api::LinkReport {
            peer: b.clone(),
            rtt_ms: 0.0,
            loss: 1.0,
            jitter_ms: 0.0,
        }];
        s.heartbeat(&a, hb).unwrap();
    };
    let computed = || s.metrics.route_computations.get();
    let skipped = || s.metrics.route_computations_skipped.get();

    beat(&a, &b, 5.0, &[("r", 1, 0)]);
    beat(&b, &a, 5.0, &[("r", 0, 1)]);
    s.tick(&mut lock).await.unwrap();
    assert_eq!((computed(), skipped()), (1, 0), "first tick computes");

    // RTT changes only: kept.
    beat(&a, &b, 9.0, &[("r", 1, 0)]);
    s.tick(&mut lock).await.unwrap();
    assert_eq!((computed(), skipped()), (1, 1), "a measurement alone waits");

    // The link dies: recomputed at once.
    a_reports_b_dead();
    s.tick(&mut lock).await.unwrap();
    assert_eq!((computed(), skipped()), (2, 1), "a dead link recomputes");

    // A subscriber leaves the room: recomputed at once.
    beat(&b, &a, 5.0, &[]);
    s.tick(&mut lock).await.unwrap();
    assert_eq!(
        (computed(), skipped()),
        (3, 1),
        "room membership recomputes"
    );
    s.tick(&mut lock).await.unwrap();
    assert_eq!((computed(), skipped()), (3, 2));

    // Past the refresh, measurements alone recompute too.
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    beat(&b, &a, 7.0, &[]);
    a_reports_b_dead();
    s.tick(&mut lock).await.unwrap();
    assert_eq!((computed(), skipped()), (4, 2), "the refresh recomputes");
}
