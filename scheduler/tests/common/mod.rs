//! Shared helpers: a real `ridge-scheduler` process over HTTPS, test
//! certificates, and a minimal agent (Ed25519 key, enrollment, heartbeats).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ridge_scheduler::api;
use ridge_scheduler::client::{Client, Reply};
use ridge_scheduler::crypto::enroll_message;

pub const ADMIN: &str = "admin-token-0123456789abcdef";
pub const DISPATCH: &str = "dispatch-token-0123456789abcdef";

/// Skip with a `SKIP` line, or panic under `RIDGE_REQUIRE_ALL=1`.
#[allow(unused_imports, reason = "not every test binary checks prerequisites")]
pub use ridge_tests::skip::require;

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ridge-sched-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a self-signed certificate for 127.0.0.1/localhost; returns the PEM.
pub fn write_cert(dir: &Path) -> Vec<u8> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    cert.into_bytes()
}

/// A scheduler child process.
pub struct Sched {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<String>>,
}

impl Sched {
    /// Starts `ridge-scheduler` with the dir's cert and `extra` flags; waits
    /// for its listening line.
    pub fn start(dir: &Path, database: &str, extra: &[&str]) -> Self {
        Self::start_limited(dir, database, extra, None)
    }

    /// [`Sched::start`] with the descriptor limit (RLIMIT_NOFILE, soft and
    /// hard) lowered to `nofile` by the shell before it execs the binary.
    pub fn start_limited(dir: &Path, database: &str, extra: &[&str], nofile: Option<u32>) -> Self {
        Self::start_after(
            dir,
            database,
            extra,
            nofile.map(|n| format!("ulimit -n {n}")).as_deref(),
        )
    }

    /// [`Sched::start`] after the shell command `prelude` (e.g. `umask
    /// 000`), in the shell that then execs the binary.
    pub fn start_after(dir: &Path, database: &str, extra: &[&str], prelude: Option<&str>) -> Self {
        let bin = env!("CARGO_BIN_EXE_ridge-scheduler");
        let mut cmd = match prelude {
            Some(p) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{p} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--tls-cert")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key")
            .arg(dir.join("key.pem"))
            .arg("--database")
            .arg(database)
            .args(extra)
            .env("RIDGE_ADMIN_TOKEN", ADMIN)
            .env("RIDGE_DISPATCH_TOKEN", DISPATCH)
            .env("RUST_LOG", "")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !extra.contains(&"--log") {
            cmd.arg("--log").arg("info,ridge_scheduler=debug");
        }
        let mut child = cmd.spawn().expect("spawn ridge-scheduler");
        let log = Arc::new(Mutex::new(String::new()));
        {
            let log = log.clone();
            let mut err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("ridge-scheduler listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("scheduler did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Self {
            child,
            url: format!("https://{addr}"),
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client(url: &str, ca: &[u8]) -> Client {
    Client::new(url, ca, 4).unwrap()
}

/// Mints a bootstrap token; returns (id, token).
pub async fn mint(
    c: &Client,
    region: &str,
    ttl: u64,
    max_uses: u32,
    labels: &[(&str, &str)],
) -> (String, String) {
    let req = api::CreateToken {
        ttl_secs: Some(ttl),
        max_uses: Some(max_uses),
        region: region.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        description: "test".into(),
    };
    let r = c.post("/v1/tokens", Some(ADMIN), &req).await.unwrap();
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    let j = r.json();
    (
        j["id"].as_str().unwrap().to_owned(),
        j["token"].as_str().unwrap().to_owned(),
    )
}

/// An enrollment request signed by a fresh Ed25519 key.
pub fn enroll_request(token: &str) -> api::EnrollRequest {
    let kp = Ed25519KeyPair::generate().unwrap();
    let key = STANDARD.encode(kp.public_key().as_ref());
    let proof = STANDARD.encode(kp.sign(&enroll_message(token, &key)).as_ref());
    api::EnrollRequest {
        bootstrap_token: token.into(),
        public_key: api::PublicKey {
            alg: "ed25519".into(),
            key,
        },
        proof,
        hostname: "test-host".into(),
        version: "0.1.0".into(),
    }
}

pub async fn enroll(c: &Client, token: &str) -> Reply {
    c.post("/v1/enroll", None, &enroll_request(token))
        .await
        .unwrap()
}

/// An enrolled node.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: String,
    pub token: String,
}

pub async fn enroll_ok(c: &Client, token: &str) -> Node {
    let r = enroll(c, token).await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    let e: api::EnrollResponse = serde_json::from_str(&r.body).unwrap();
    Node {
        id: e.node_id,
        token: e.node_token,
    }
}

pub fn report(
    media: &str,
    cpu: f64,
    links: &[(&str, f64)],
    rooms: &[(&str, u32, u32)],
) -> api::Heartbeat {
    api::Heartbeat {
        version: "0.1.0".into(),
        addresses: api::Addresses {
            media: Some(media.into()),
            mesh: None,
            http: Some(format!("https://{media}")),
        },
        capabilities: api::Capabilities {
            cores: 4,
            max_sessions: 100,
            xdp_mode: Some("none".into()),
            ..Default::default()
        },
        load: api::Load {
            cpu,
            ..Default::default()
        },
        links: links
            .iter()
            .map(|(p, rtt)| api::LinkReport {
                peer: (*p).into(),
                rtt_ms: *rtt,
                loss: 0.0,
                jitter_ms: 0.0,
            })
            .collect(),
        rooms: rooms
            .iter()
            .map(|(r, p, s)| api::RoomReport {
                room: (*r).into(),
                publishers: *p,
                subscribers: *s,
            })
            .collect(),
    }
}

pub async fn heartbeat(c: &Client, n: &Node, hb: &api::Heartbeat) -> Reply {
    c.post(&format!("/v1/nodes/{}/heartbeat", n.id), Some(&n.token), hb)
        .await
        .unwrap()
}

/// Heartbeats `n` every `every` until the returned handle is aborted.
/// The report can be changed through the mutex.
pub fn heartbeat_loop(
    c: Client,
    n: Node,
    hb: Arc<Mutex<api::Heartbeat>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let body = hb.lock().unwrap().clone();
            let _ = heartbeat(&c, &n, &body).await;
            tokio::time::sleep(every).await;
        }
    })
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn node_state(c: &Client, id: &str) -> String {
    let r = c
        .get(&format!("/v1/nodes/{id}"), Some(ADMIN))
        .await
        .unwrap();
    r.json()["state"].as_str().unwrap_or_default().to_owned()
}

/// Long-polls the desired state once.
pub async fn desired(c: &Client, n: &Node, since: u64, wait: u64) -> Option<api::DesiredState> {
    let r = c
        .get(
            &format!("/v1/nodes/{}/desired?since={since}&wait={wait}", n.id),
            Some(&n.token),
        )
        .await
        .unwrap();
    match r.status.as_u16() {
        200 => Some(serde_json::from_str(&r.body).unwrap()),
        204 => None,
        s => panic!("desired: {s} {}", r.body),
    }
}
