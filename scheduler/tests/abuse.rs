//! What an authenticated but hostile peer (or a careless operator) could do
//! to a real `ridge-scheduler`: hold many long polls, report a script URL,
//! read the database, probe with the wrong token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ridge_scheduler::api;

const EVERY: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_secs(15);

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_per_node_are_capped() {
    let dir = TempDir::new("polls");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(
        dir.path(),
        &db,
        &[
            "--heartbeat-interval",
            "200ms",
            "--max-long-polls-per-node",
            "2",
        ],
    );
    let c = client(&sched.url, &ca);
    let (_, token) = mint(&c, "eu", 3600, 1, &[]).await;
    let n = enroll_ok(&c, &token).await;
    // The first desired state is written by the first tick.
    let version = eventually(LIMIT, || async {
        desired(&c, &n, 0, 0).await.map(|d| d.version)
    })
    .await
    .expect("no desired state");
    let poll = |wait: u64| {
        let c = c.clone();
        let n = n.clone();
        async move {
            c.get(
                &format!("/v1/nodes/{}/desired?since={version}&wait={wait}", n.id),
                Some(&n.token),
            )
            .await
            .unwrap()
        }
    };
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(poll(4))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let r = poll(4).await;
    assert_eq!(r.status.as_u16(), 429, "{}", r.body);
    assert_eq!(r.code(), "too_many_long_polls");
    assert!(r.body.contains("max_long_polls_per_node"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(2));
    // A poll that does not wait is not a long poll.
    assert_ne!(poll(0).await.status.as_u16(), 429);
    for h in held {
        assert_eq!(h.await.unwrap().status.as_u16(), 204);
    }
    // Their places are free again.
    assert_eq!(poll(1).await.status.as_u16(), 204);
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    assert_eq!(
        sample(&m, "ridge_scheduler_long_polls_refused_total"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_files_are_private() {
    let dir = TempDir::new("perms");
    let ca = write_cert(dir.path());
    let data = dir.path().join("data");
    let file = data.join("s.db");
    let db = format!("sqlite:{}", file.display());
    // Whatever the umask.
    let mut sched = Sched::start_after(dir.path(), &db, &[], Some("umask 000"));
    let c = client(&sched.url, &ca);
    mint(&c, "eu", 3600, 1, &[]).await;
    assert_eq!(mode(&data), 0o700, "database directory");
    for suffix in ["", "-wal", "-shm"] {
        let p = data.join(format!("s.db{suffix}"));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    assert_eq!(sched.terminate(), Some(0));
    // A looser mode (a restore, a copy) is tightened at start, with a warning.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sched = Sched::start(dir.path(), &db, &[]);
    assert_eq!(mode(&file), 0o600);
    assert!(
        sched.log().contains("tightening its mode"),
        "{}",
        sched.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_leaves_out_bad_node_urls() {
    let dir = TempDir::new("urls");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(dir.path(), &db, &["--heartbeat-interval", "200ms"]);
    let c = client(&sched.url, &ca);
    let (_, token) = mint(&c, "eu", 3600, 1, &[]).await;
    let n = enroll_ok(&c, &token).await;
    let mut hb = report("127.0.0.1:7001", 0.1, &[], &[]);
    hb.addresses.http = Some("javascript:alert(1)//".into());
    let hb = Arc::new(Mutex::new(hb));
    let l = heartbeat_loop(c.clone(), n.clone(), hb.clone(), EVERY);
    let up = eventually(LIMIT, || async {
        (node_state(&c, &n.id).await == "up").then_some(())
    })
    .await;
    assert!(up.is_some(), "never came up; log:\n{}", sched.log());
    let get_dispatch = || async {
        let r = c
            .get("/v1/dispatch?room=r&identity=a", Some(DISPATCH))
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 200, "{}", r.body);
        serde_json::from_str::<api::DispatchResponse>(&r.body).unwrap()
    };
    let d = get_dispatch().await;
    assert_eq!(d.node_id, n.id);
    assert_eq!(d.url, None, "dispatch handed out {:?}", d.url);
    let shown = c
        .get(&format!("/v1/nodes/{}", n.id), Some(ADMIN))
        .await
        .unwrap();
    assert!(!shown.body.contains("javascript"), "{}", shown.body);
    // A host that is not the node's.
    hb.lock().unwrap().addresses.http = Some("https://evil.example/".into());
    tokio::time::sleep(EVERY * 3).await;
    assert_eq!(get_dispatch().await.url, None);
    // Its own host is fine.
    hb.lock().unwrap().addresses.http = Some("https://127.0.0.1:8443/".into());
    let good = eventually(LIMIT, || async { get_dispatch().await.url }).await;
    assert_eq!(good.as_deref(), Some("https://127.0.0.1:8443/"));
    l.abort();
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    assert!(
        sample(
            &m,
            "ridge_scheduler_node_urls_rejected_total{reason=\"scheme\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "ridge_scheduler_node_urls_rejected_total{reason=\"host\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_with_the_dispatch_token_is_forbidden() {
    let dir = TempDir::new("oa");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(dir.path(), &db, &[]);
    let c = client(&sched.url, &ca);
    let r = c.get("/openapi.json", Some(DISPATCH)).await.unwrap();
    assert_eq!(r.status.as_u16(), 403, "{}", r.body);
    assert_eq!(r.code(), "forbidden");
    let r = c
        .get("/openapi.json", Some("not-a-token-at-all"))
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 401, "{}", r.body);
    assert_eq!(
        c.get("/openapi.json", Some(ADMIN))
            .await
            .unwrap()
            .status
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_without_credentials_and_say_nothing() {
    let dir = TempDir::new("probes");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let mut sched = Sched::start(dir.path(), &db, &["--drain-timeout", "3s"]);
    let c = client(&sched.url, &ca);
    for p in ["/livez", "/readyz"] {
        let r = c.get(p, None).await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{p}: {}", r.body);
        assert!(r.body.is_empty(), "{p} said {:?}", r.body);
    }
    // Detail stays behind the admin token.
    assert_eq!(c.get("/healthz", None).await.unwrap().status.as_u16(), 401);
    // Draining: not ready, still alive. A long poll keeps the drain open.
    let (_, token) = mint(&c, "eu", 3600, 1, &[]).await;
    let n = enroll_ok(&c, &token).await;
    let version = desired(&c, &n, 0, 0).await.map_or(0, |d| d.version);
    let _poll = {
        let c = c.clone();
        tokio::spawn(async move {
            c.get(
                &format!("/v1/nodes/{}/desired?since={version}&wait=30", n.id),
                Some(&n.token),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(sched.child.id().to_string())
        .status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(r) = c.get("/readyz", None).await {
        assert_eq!(r.status.as_u16(), 503);
        assert!(r.body.is_empty());
    }
    sched.kill();
}
