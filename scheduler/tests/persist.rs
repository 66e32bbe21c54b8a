//! Durability and high availability: a restart on the SQLite file loses
//! nothing; two replicas on one PostgreSQL hand leadership over when one dies.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_nodes_and_tokens() {
    let dir = TempDir::new("restart");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let mut s1 = Sched::start(dir.path(), &db, &["--heartbeat-interval", "200ms"]);
    let c = client(&s1.url, &ca);
    let (tid, token) = mint(&c, "eu", 3600, 3, &[]).await;
    let n = enroll_ok(&c, &token).await;
    let r = heartbeat(
        &c,
        &n,
        &report("127.0.0.1:5004", 0.3, &[], &[("room", 1, 0)]),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200);
    let v1 = eventually(LIMIT, || async { desired(&c, &n, 0, 1).await })
        .await
        .unwrap();
    assert_eq!(s1.terminate(), Some(0), "clean drain exits 0");
    assert!(s1.log().contains("stopped"));

    let s2 = Sched::start(dir.path(), &db, &["--heartbeat-interval", "200ms"]);
    let c = client(&s2.url, &ca);
    let nodes = c.get("/v1/nodes", Some(ADMIN)).await.unwrap().json();
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], n.id.as_str());
    // The heartbeat flushed at shutdown survived.
    assert_eq!(list[0]["addresses"]["media"], "127.0.0.1:5004");
    let tokens = c.get("/v1/tokens", Some(ADMIN)).await.unwrap().json();
    assert_eq!(tokens["tokens"][0]["id"], tid.as_str());
    assert_eq!(tokens["tokens"][0]["uses"], 1);
    // The desired state resumes at the same version: no change, no new
    // version. (Checked before another node enrolls below: a new peer may
    // legitimately change this node's desired state.)
    let v2 = desired(&c, &n, 0, 1).await.unwrap();
    assert_eq!(v2.version, v1.version);
    assert_eq!(v2.dataplane_secret, v1.dataplane_secret);
    // The bootstrap token still works (2 uses left) and the node token is still valid.
    enroll_ok(&c, &token).await;
    let r = heartbeat(&c, &n, &report("127.0.0.1:5004", 0.3, &[], &[])).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway PostgreSQL cluster, run as the `postgres` user when we are root.
struct Postgres {
    dir: TempDir,
    port: u16,
}

fn as_postgres(cmd: &str, args: &[&str]) -> Command {
    let path = format!("{PG_BIN}/{cmd}");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]).args(args);
        c
    } else {
        let mut c = Command::new(path);
        c.args(args);
        c
    }
}

impl Postgres {
    fn available() -> Result<(), String> {
        for b in ["initdb", "pg_ctl", "postgres"] {
            if !Path::new(PG_BIN).join(b).exists() {
                return Err(format!(
                    "{PG_BIN}/{b} missing; install with `bash tests/install-deps.sh --test` (postgresql)"
                ));
            }
        }
        Ok(())
    }

    fn start() -> Self {
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
        let out = as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "ridge",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        let log = dir.path().join("pg.log");
        let out = as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self { dir, port }
    }

    fn url(&self) -> String {
        format!("postgres://ridge@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        )
        .output();
    }
}

async fn health(c: &ridge_scheduler::client::Client) -> Option<serde_json::Value> {
    let r = c.get("/healthz", Some(ADMIN)).await.ok()?;
    (r.status.as_u16() == 200).then(|| r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_fail_over() {
    if require("postgres_two_replicas_fail_over", Postgres::available()).is_err() {
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("ha");
    let ca = write_cert(dir.path());
    let flags = |id: &'static str| ["--heartbeat-interval", "200ms", "--replica-id", id];
    let mut r1 = Sched::start(dir.path(), &pg.url(), &flags("sched-a"));
    let r2 = Sched::start(dir.path(), &pg.url(), &flags("sched-b"));
    let c1 = client(&r1.url, &ca);
    let c2 = client(&r2.url, &ca);

    // Exactly one leader: r1 started first and holds the lock.
    let l1 = eventually(LIMIT, || async {
        health(&c1).await.filter(|h| h["leader"] == true)
    })
    .await;
    assert!(l1.is_some(), "replica a never led");
    assert_eq!(l1.unwrap()["storage"], "postgres");
    assert_eq!(health(&c2).await.unwrap()["leader"], false);

    // State is shared: a token minted on a enrolls on b; heartbeats to b are
    // seen by a's leader job (routes), and the desired state reaches b's watchers.
    let (_, token) = mint(&c1, "eu", 3600, 2, &[]).await;
    let x = enroll_ok(&c2, &token).await;
    let y = enroll_ok(&c1, &token).await;
    let hx = Arc::new(Mutex::new(report(
        "127.0.0.1:8001",
        0.1,
        &[(&y.id, 3.0)],
        &[("r", 1, 0)],
    )));
    let hy = Arc::new(Mutex::new(report(
        "127.0.0.1:8002",
        0.1,
        &[(&x.id, 3.0)],
        &[("r", 0, 1)],
    )));
    let lx = heartbeat_loop(c2.clone(), x.clone(), hx, Duration::from_millis(200));
    let ly = heartbeat_loop(c2.clone(), y.clone(), hy, Duration::from_millis(200));
    let st = eventually(LIMIT, || async {
        let st = desired(&c2, &y, 0, 1).await?;
        (st.routes.first()?.upstream.as_deref() == Some(x.id.as_str())).then_some(st)
    })
    .await
    .expect("route computed by the leader, seen through replica b");
    let routes = c2.get("/v1/routes", Some(ADMIN)).await.unwrap().json();
    assert_eq!(routes["leader"], "sched-a");

    // Kill the leader. b keeps serving and takes over the leader role.
    r1.kill();
    let l2 = eventually(LIMIT, || async {
        health(&c2).await.filter(|h| h["leader"] == true)
    })
    .await;
    assert!(l2.is_some(), "replica b never took over");
    // b now runs the jobs: a topology change is routed by b.
    let z_token = mint(&c2, "eu", 3600, 1, &[]).await.1;
    let z = enroll_ok(&c2, &z_token).await;
    let hz = Arc::new(Mutex::new(report(
        "127.0.0.1:8003",
        0.1,
        &[(&x.id, 1.0)],
        &[("r", 0, 1)],
    )));
    let lz = heartbeat_loop(c2.clone(), z.clone(), hz, Duration::from_millis(200));
    let zst = eventually(LIMIT, || async {
        let st = desired(&c2, &z, 0, 1).await?;
        (st.routes.first()?.upstream.as_deref() == Some(x.id.as_str())).then_some(st)
    })
    .await
    .expect("new route computed by replica b");
    assert!(zst.version > st.version);
    let routes = c2.get("/v1/routes", Some(ADMIN)).await.unwrap().json();
    assert_eq!(routes["leader"], "sched-b");
    let nodes = c2.get("/v1/nodes", Some(ADMIN)).await.unwrap().json();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    for l in [lx, ly, lz] {
        l.abort();
    }
}
