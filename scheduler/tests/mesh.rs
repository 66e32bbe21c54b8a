//! Registry, lease, drain, dispatch and the desired-state watch, end to end
//! against the real binary with a short heartbeat interval.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ridge_scheduler::api;
use ridge_scheduler::client::Client;
use ridge_scheduler::crypto::AccessClaims;

const EVERY: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_secs(15);

async fn start(tag: &str) -> (TempDir, Sched, Client) {
    let dir = TempDir::new(tag);
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(dir.path(), &db, &["--heartbeat-interval", "200ms"]);
    let c = client(&sched.url, &ca);
    (dir, sched, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_after_missed_heartbeats_and_drain() {
    let (_dir, _sched, c) = start("lease").await;
    let (_, token) = mint(&c, "eu", 3600, 2, &[]).await;
    let a = enroll_ok(&c, &token).await;
    let b = enroll_ok(&c, &token).await;
    assert_eq!(node_state(&c, &a.id).await, "pending");
    let hb_a = Arc::new(Mutex::new(report("127.0.0.1:5001", 0.1, &[], &[])));
    let hb_b = Arc::new(Mutex::new(report("127.0.0.1:5002", 0.1, &[], &[])));
    let la = heartbeat_loop(c.clone(), a.clone(), hb_a, EVERY);
    let lb = heartbeat_loop(c.clone(), b.clone(), hb_b, EVERY);
    for n in [&a, &b] {
        let up = eventually(LIMIT, || async {
            (node_state(&c, &n.id).await == "up").then_some(())
        })
        .await;
        assert!(up.is_some(), "{} never came up", n.id);
    }
    // a stops heartbeating: after 3 missed intervals it is down; b stays up.
    la.abort();
    let down = eventually(LIMIT, || async {
        (node_state(&c, &a.id).await == "down").then_some(())
    })
    .await;
    assert!(down.is_some(), "a never went down");
    assert_eq!(node_state(&c, &b.id).await, "up");
    // Dispatch only considers b now.
    let d = dispatch(&c, "r", Some("eu")).await;
    assert_eq!(d.node_id, b.id);

    // Drain b: desired state says so, dispatch has nothing left.
    let r = c
        .post(
            &format!("/v1/nodes/{}/drain", b.id),
            Some(ADMIN),
            &api::DrainRequest { drain: true },
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    assert_eq!(r.json()["state"], "draining");
    let st = eventually(LIMIT, || async {
        desired(&c, &b, 0, 1).await.filter(|d| d.drain)
    })
    .await;
    assert!(st.is_some(), "desired state never carried drain");
    let r = c
        .get("/v1/dispatch?room=r&region=eu", Some(DISPATCH))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (503, "no_node_available")
    );
    // The heartbeat answer carries the flag too.
    let r = heartbeat(&c, &b, &report("127.0.0.1:5002", 0.1, &[], &[])).await;
    assert_eq!(r.json()["drain"], true);
    // Undo.
    let r = c
        .post(
            &format!("/v1/nodes/{}/drain", b.id),
            Some(ADMIN),
            &api::DrainRequest { drain: false },
        )
        .await
        .unwrap();
    assert_eq!(r.json()["state"], "up");
    lb.abort();
}

async fn dispatch(c: &Client, room: &str, region: Option<&str>) -> api::DispatchResponse {
    let q = region.map(|r| format!("&region={r}")).unwrap_or_default();
    let r = c
        .get(
            &format!("/v1/dispatch?room={room}&identity=alice&publish=true{q}"),
            Some(DISPATCH),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_by_region_load_health_and_token_verifies() {
    let (_dir, _sched, c) = start("dispatch").await;
    let (_, eu) = mint(&c, "eu", 3600, 2, &[]).await;
    let (_, us) = mint(&c, "us", 3600, 1, &[]).await;
    let eu1 = enroll_ok(&c, &eu).await;
    let eu2 = enroll_ok(&c, &eu).await;
    let us1 = enroll_ok(&c, &us).await;
    let mk = |addr: &str, cpu: f64| Arc::new(Mutex::new(report(addr, cpu, &[], &[])));
    let (h1, h2, h3) = (
        mk("127.0.0.1:6001", 0.7),
        mk("127.0.0.1:6002", 0.2),
        mk("127.0.0.1:6003", 0.0),
    );
    let loops = [
        heartbeat_loop(c.clone(), eu1.clone(), h1.clone(), EVERY),
        heartbeat_loop(c.clone(), eu2.clone(), h2.clone(), EVERY),
        heartbeat_loop(c.clone(), us1.clone(), h3, EVERY),
    ];
    for n in [&eu1, &eu2, &us1] {
        assert!(
            eventually(LIMIT, || async {
                (node_state(&c, &n.id).await == "up").then_some(())
            })
            .await
            .is_some()
        );
    }
    // Region first, then load.
    let d = dispatch(&c, "room1", Some("eu")).await;
    assert_eq!(d.node_id, eu2.id);
    assert_eq!(d.media_address, "127.0.0.1:6002");
    assert_eq!(dispatch(&c, "room1", Some("us")).await.node_id, us1.id);
    // Load changes the choice within the region.
    *h2.lock().unwrap() = report("127.0.0.1:6002", 0.9, &[], &[]);
    *h1.lock().unwrap() = report("127.0.0.1:6001", 0.1, &[], &[]);
    let moved = eventually(LIMIT, || async {
        let d = dispatch(&c, "room1", Some("eu")).await;
        (d.node_id == eu1.id).then_some(())
    })
    .await;
    assert!(moved.is_some(), "dispatch did not follow load");
    // Region from the client address: 127.0.0.0/8 is not mapped, so every
    // region is equal and the least loaded node (us1) wins.
    assert_eq!(dispatch(&c, "room1", None).await.node_id, us1.id);

    // The token is in the dataplane's exact format and verifies with the
    // dataplane secret the node receives in its desired state.
    let d = dispatch(&c, "room1", Some("eu")).await;
    let st = eventually(LIMIT, || async { desired(&c, &eu1, 0, 1).await })
        .await
        .unwrap();
    let secret = st
        .dataplane_secret
        .expect("the scheduler sends a dataplane_secret");
    assert_eq!(secret.len(), 64);
    let mut v = Validation::new(Algorithm::HS256);
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    let claims = jsonwebtoken::decode::<AccessClaims>(
        &d.token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .expect("token verifies with the node's dataplane secret")
    .claims;
    assert_eq!(claims.room, "room1");
    assert_eq!(claims.sub, "alice");
    assert!(claims.can_publish && claims.can_subscribe && !claims.admin);
    let raw: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            d.token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut keys: Vec<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "admin",
            "can_publish",
            "can_subscribe",
            "exp",
            "iat",
            "room",
            "sub"
        ]
    );
    // Another node's secret does not verify it.
    let other = eventually(LIMIT, || async { desired(&c, &eu2, 0, 1).await })
        .await
        .unwrap();
    assert!(
        jsonwebtoken::decode::<AccessClaims>(
            &d.token,
            &DecodingKey::from_secret(other.dataplane_secret.unwrap_or_default().as_bytes()),
            &v
        )
        .is_err()
    );
    // Node tokens cannot dispatch; bad parameters are refused.
    let r = c
        .get("/v1/dispatch?room=x", Some(&eu1.token))
        .await
        .unwrap();
    assert_eq!(r.code(), "forbidden");
    let r = c
        .get("/v1/dispatch?room=x&publish=maybe", Some(DISPATCH))
        .await
        .unwrap();
    assert_eq!(r.code(), "invalid_request");
    let r = c.get("/v1/dispatch", Some(DISPATCH)).await.unwrap();
    assert_eq!(r.code(), "invalid_request");
    for l in loops {
        l.abort();
    }
}

/// a —5— b —5— d, a —20— c —20— d. Publisher on a, subscriber on d: the
/// route goes through b. When b dies it moves to c, and d's desired state
/// (watched by long poll) changes its upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_moves_when_a_node_dies_and_watch_sees_it() {
    let (_dir, _sched, c) = start("route").await;
    let (_, token) = mint(&c, "eu", 3600, 4, &[("trust_domain", "bb")]).await;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(enroll_ok(&c, &token).await);
    }
    let (a, b, cc, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let hbs = [
        report(
            "127.0.0.1:7001",
            0.0,
            &[(&b.id, 5.0), (&cc.id, 20.0)],
            &[("talk", 1, 0)],
        ),
        report("127.0.0.1:7002", 0.0, &[(&a.id, 5.0), (&d.id, 5.0)], &[]),
        report("127.0.0.1:7003", 0.0, &[(&a.id, 20.0), (&d.id, 20.0)], &[]),
        report(
            "127.0.0.1:7004",
            0.0,
            &[(&b.id, 5.0), (&cc.id, 20.0)],
            &[("talk", 0, 3)],
        ),
    ];
    let loops: Vec<_> = nodes
        .iter()
        .zip(hbs)
        .map(|(n, hb)| heartbeat_loop(c.clone(), n.clone(), Arc::new(Mutex::new(hb)), EVERY))
        .collect();

    // Wait for the route through b.
    let first = eventually(LIMIT, || async {
        let st = desired(&c, d, 0, 1).await?;
        (st.routes.first()?.upstream.as_deref() == Some(b.id.as_str())).then_some(st)
    })
    .await
    .expect("route via b");
    let mut since = first.version;
    assert_eq!(first.routes[0].room, "talk");
    assert_eq!(first.routes[0].source, a.id);
    assert_eq!(first.links.len(), 1);
    assert_eq!(first.links[0].peer, b.id);
    assert_eq!(first.links[0].address.as_deref(), Some("127.0.0.1:7002"));
    assert!(first.links[0].trusted);
    let via_b = desired(&c, b, 0, 1).await.unwrap();
    assert_eq!(via_b.routes[0].upstream.as_deref(), Some(a.id.as_str()));
    assert_eq!(via_b.routes[0].downstream, vec![d.id.clone()]);
    // Both ends of the b–d link hold the same key.
    let bd = via_b.links.iter().find(|l| l.peer == d.id).unwrap();
    assert_eq!(bd.key, first.links[0].key);

    // Nothing changes: the long poll times out with 204.
    assert!(desired(&c, d, since, 1).await.is_none());

    // Kill b's agent. The long poll returns with the new route through c.
    loops[1].abort();
    let mut moved = None;
    for _ in 0..20 {
        // Each answer is a newer version; resume from it.
        let Some(st) = desired(&c, d, since, 5).await else {
            continue;
        };
        assert!(st.version > since);
        since = st.version;
        if st.routes.first().and_then(|r| r.upstream.as_deref()) == Some(cc.id.as_str()) {
            moved = Some(st);
            break;
        }
    }
    let moved = moved.expect("route moved to c");
    assert!(moved.version > first.version);
    assert_eq!(moved.links[0].peer, cc.id);
    let via_c = desired(&c, cc, 0, 1).await.unwrap();
    assert_eq!(via_c.routes[0].downstream, vec![d.id.clone()]);
    // b's desired state no longer has the route.
    let b_now = desired(&c, b, 0, 1).await.unwrap();
    assert!(b_now.routes.is_empty(), "{b_now:?}");

    // Operator views.
    let routes = c.get("/v1/routes", Some(ADMIN)).await.unwrap().json();
    let edges = &routes["routes"][0]["edges"];
    assert_eq!(edges.as_array().unwrap().len(), 2, "{routes}");
    let rooms = c.get("/v1/rooms", Some(ADMIN)).await.unwrap().json();
    assert_eq!(rooms["rooms"][0]["room"], "talk");
    assert_eq!(rooms["rooms"][0]["publishers"][0], a.id.as_str());
    for l in loops {
        l.abort();
    }
}

/// Long-polls `n`'s desired state from `since` until its first route's
/// upstream is `want` or `limit` passes; returns the version and how long
/// it took.
async fn wait_upstream(
    c: &Client,
    n: &Node,
    since: u64,
    want: &str,
    limit: Duration,
) -> Option<(u64, Duration)> {
    let started = std::time::Instant::now();
    let mut since = since;
    while started.elapsed() < limit {
        let Some(st) = desired(c, n, since, 1).await else {
            continue;
        };
        since = st.version;
        if st.routes.first().and_then(|r| r.upstream.as_deref()) == Some(want) {
            return Some((since, started.elapsed()));
        }
    }
    None
}

/// Sets the loss `hb` reports for `peer`.
fn set_loss(hb: &mut api::Heartbeat, peer: &str, loss: f64) {
    for l in hb.links.iter_mut().filter(|l| l.peer == peer) {
        l.loss = loss;
    }
}

/// The same square as above, with a 10 s heartbeat interval: ticks every
/// 5 s, leases of 30 s. A heartbeat that reports a link dead (loss 1.0) moves
/// the route within a second, neither waiting for the next tick nor for any
/// lease; so does one that reports it alive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_reported_dead_moves_the_route_at_once() {
    let dir = TempDir::new("linkdown");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(dir.path(), &db, &["--heartbeat-interval", "10s"]);
    let c = client(&sched.url, &ca);
    let (_, token) = mint(&c, "eu", 3600, 4, &[("trust_domain", "bb")]).await;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(enroll_ok(&c, &token).await);
    }
    let (a, b, cc, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let mut hbs = [
        report(
            "127.0.0.1:7101",
            0.0,
            &[(&b.id, 5.0), (&cc.id, 20.0)],
            &[("talk", 1, 0)],
        ),
        report("127.0.0.1:7102", 0.0, &[(&a.id, 5.0), (&d.id, 5.0)], &[]),
        report("127.0.0.1:7103", 0.0, &[(&a.id, 20.0), (&d.id, 20.0)], &[]),
        report(
            "127.0.0.1:7104",
            0.0,
            &[(&b.id, 5.0), (&cc.id, 20.0)],
            &[("talk", 0, 3)],
        ),
    ];
    // No heartbeat loops: one report each is good for the 30 s lease, and
    // nothing else may post an older report in between.
    for (n, hb) in nodes.iter().zip(&hbs) {
        assert_eq!(heartbeat(&c, n, hb).await.status.as_u16(), 200);
    }
    // The first route waits for a regular tick (up to 5 s).
    let (since, _) = wait_upstream(&c, d, 0, &b.id, LIMIT)
        .await
        .expect("route via b");
    let within = Duration::from_secs(1);

    // d stops hearing b: the route moves to c, although b's lease runs.
    set_loss(&mut hbs[3], &b.id, 1.0);
    heartbeat(&c, d, &hbs[3]).await;
    let (since, took) = wait_upstream(&c, d, since, &cc.id, LIMIT)
        .await
        .expect("route via c");
    eprintln!("the route moved {took:?} after the dead link");
    assert!(
        took < within,
        "the route moved {took:?} after the dead link"
    );
    assert_eq!(node_state(&c, &b.id).await, "up");

    // d hears b again: back through b.
    set_loss(&mut hbs[3], &b.id, 0.0);
    heartbeat(&c, d, &hbs[3]).await;
    let (since, took) = wait_upstream(&c, d, since, &b.id, LIMIT)
        .await
        .expect("route back via b");
    eprintln!("the route came back {took:?} after the link");
    assert!(took < within, "the route came back {took:?} after the link");

    // b dies: both its neighbours report it dead (b itself is silent).
    set_loss(&mut hbs[0], &b.id, 1.0);
    set_loss(&mut hbs[3], &b.id, 1.0);
    heartbeat(&c, a, &hbs[0]).await;
    heartbeat(&c, d, &hbs[3]).await;
    let (_, took) = wait_upstream(&c, d, since, &cc.id, LIMIT)
        .await
        .expect("route via c again");
    eprintln!("the route moved {took:?} after b died");
    assert!(took < within, "the route moved {took:?} after b died");
    assert_eq!(node_state(&c, &b.id).await, "up");
    // The same report again asks for nothing.
    heartbeat(&c, d, &hbs[3]).await;

    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    let count = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    // d twice, a and d once each.
    assert_eq!(count("ridge_scheduler_link_state_changes_total "), 4, "{m}");
    assert!(count("ridge_scheduler_early_ticks_total ") >= 2, "{m}");
}
