//! ridge-agent end to end against a real in-process `ridge-scheduler` (HTTPS,
//! SQLite) and, where the test needs one, a real in-process
//! `ridge-dataplane` node; the binary for exit-status checks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ridge_agent::config::{self, FileConfig, Overrides};
use ridge_agent::control::ControlClient;
use ridge_agent::metrics;
use ridge_agent::probe::{PeerLink, ProbeEngine};
use ridge_scheduler::api::CreateToken;

const LIMIT: Duration = Duration::from_secs(20);

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ridge-agent-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Env {
    dir: TempDir,
    ca: PathBuf,
    sched: ridge_scheduler::server::Running,
    url: String,
}

async fn env(tag: &str) -> Env {
    env_with(tag, Duration::from_millis(200)).await
}

async fn env_with(tag: &str, heartbeat_interval: Duration) -> Env {
    let dir = TempDir::new(tag);
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let ca = dir.0.join("cert.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    std::fs::write(dir.0.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let o = ridge_scheduler::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: Some(ca.clone()),
        tls_key: Some(dir.0.join("key.pem")),
        database: Some(format!("sqlite:{}", dir.0.join("s.db").display())),
        heartbeat_interval: Some(heartbeat_interval),
        ..Default::default()
    };
    let secrets = ridge_scheduler::config::EnvSecrets {
        admin_token: Some("admin-token-0123456789abcdef".into()),
        dispatch_token: None,
    };
    let cfg = ridge_scheduler::config::build(Default::default(), &o, secrets).unwrap();
    let sched = ridge_scheduler::server::start(cfg).await.unwrap();
    let url = format!("https://{}", sched.addr);
    Env {
        dir,
        ca,
        sched,
        url,
    }
}

impl Env {
    async fn mint(&self, ttl: u64, uses: u32) -> String {
        let t = self
            .sched
            .scheduler
            .create_token(CreateToken {
                ttl_secs: Some(ttl),
                max_uses: Some(uses),
                region: "eu".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        t.token.unwrap()
    }

    fn overrides(&self, state: &str) -> Overrides {
        Overrides {
            scheduler_url: Some(self.url.clone()),
            scheduler_ca: Some(self.ca.clone()),
            state_dir: Some(self.dir.0.join(state)),
            cmdline_path: Some(self.dir.0.join("no-cmdline")),
            control_socket: Some(PathBuf::new()),
            probe_listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".into()),
            watch_wait: Some(Duration::from_secs(1)),
            probe_interval: Some(Duration::from_millis(100)),
            drain_timeout: Some(Duration::from_secs(2)),
            media_address: Some("127.0.0.1:5004".parse().unwrap()),
            ..Overrides::default()
        }
    }

    fn state(&self, id: &str) -> String {
        self.sched
            .scheduler
            .list_nodes()
            .into_iter()
            .find(|n| n.id == id)
            .map(|n| n.state)
            .unwrap_or_default()
    }

    async fn until_state(&self, id: &str, want: &str) {
        let t = Instant::now();
        while self.state(id) != want {
            assert!(
                t.elapsed() < LIMIT,
                "node {id} never became {want} (is {})",
                self.state(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn cfg(o: &Overrides) -> config::Config {
    config::build(FileConfig::default(), o).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_from_file_env_and_cmdline_then_restart_reuses_identity() {
    let e = env("enroll").await;
    // Token from a file.
    let tf = e.dir.0.join("token");
    std::fs::write(&tf, format!("{}\n", e.mint(3600, 1).await)).unwrap();
    let o_file = Overrides {
        token_file: Some(tf.clone()),
        ..e.overrides("s-file")
    };
    let a = ridge_agent::start(cfg(&o_file), None).await.unwrap();
    assert!(a.enrolled_now);
    let id_file = a.node_id.clone();
    let path = e.dir.0.join("s-file/identity.json");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&e.dir.0.join("s-file")), 0o700);
    // From the environment.
    let b = ridge_agent::start(cfg(&e.overrides("s-env")), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    assert!(b.enrolled_now);
    // From a fake kernel command line.
    let cmdline = e.dir.0.join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "BOOT_IMAGE=/vmlinuz ro ridge.token={} quiet\n",
            e.mint(3600, 1).await
        ),
    )
    .unwrap();
    let o_cmd = Overrides {
        cmdline_path: Some(cmdline),
        ..e.overrides("s-cmd")
    };
    let c = ridge_agent::start(cfg(&o_cmd), None).await.unwrap();
    assert!(c.enrolled_now);
    let ids = [a.node_id.clone(), b.node_id.clone(), c.node_id.clone()];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    for x in [b, c] {
        x.shutdown().await;
    }
    a.shutdown().await;

    // Restart: the token file is gone and the token was single-use; the
    // stored identity is reused and no second node appears.
    std::fs::remove_file(&tf).unwrap();
    let o_again = Overrides {
        token_file: None,
        ..o_file
    };
    let a2 = ridge_agent::start(cfg(&o_again), None).await.unwrap();
    assert!(!a2.enrolled_now);
    assert_eq!(a2.node_id, id_file);
    e.until_state(&id_file, "up").await;
    // Three enrollments, three nodes: the restart added none. The
    // scheduler's registry view is refreshed from the database every tick,
    // so give it a few ticks to show the last enrollments, then check that
    // it settles at three.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while e.sched.scheduler.list_nodes().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(e.sched.scheduler.list_nodes().len(), 3);
    a2.shutdown().await;
}

fn run_bin(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ridge-agent"))
        .args(args)
        .env_remove("RIDGE_BOOTSTRAP_TOKEN")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expired_reused_and_missing_tokens_fail_with_clear_errors() {
    let e = env("badtok").await;
    let ca = e.ca.display().to_string();
    let base = |state: &str| -> Vec<String> {
        vec![
            "--scheduler".into(),
            e.url.clone(),
            "--scheduler-ca".into(),
            ca.clone(),
            "--state-dir".into(),
            e.dir.0.join(state).display().to_string(),
            "--cmdline-path".into(),
            e.dir.0.join("none").display().to_string(),
            "--control-socket".into(),
            String::new(),
            "--metrics-listen".into(),
            String::new(),
            "--probe-listen".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let used = e.mint(3600, 1).await;
    let a = ridge_agent::start(cfg(&e.overrides("s-used")), Some(used.clone()))
        .await
        .unwrap();
    a.shutdown().await;
    let expired = e.mint(1, 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cases = [
        (
            "rbt_bt-0000000000000000.nope".to_owned(),
            "bootstrap_token_invalid",
        ),
        (expired, "bootstrap_token_expired"),
        (used, "bootstrap_token_exhausted"),
    ];
    for (i, (token, code)) in cases.into_iter().enumerate() {
        let args = base(&format!("s{i}"));
        let (status, err) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_bin(&args, &[("RIDGE_BOOTSTRAP_TOKEN", token.as_str())])
        })
        .await
        .unwrap();
        assert_eq!(status, 77, "{code}: {err}");
        assert!(
            err.contains("enrollment refused") && err.contains(code),
            "{code}: {err}"
        );
        assert!(!e.dir.0.join(format!("s{i}/identity.json")).exists());
    }
    // No token anywhere.
    let args = base("s-none");
    let (status, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_bin(&args, &[])
    })
    .await
    .unwrap();
    assert_eq!(status, 77, "{err}");
    assert!(err.contains("no bootstrap token"), "{err}");
    // Invalid configuration.
    let (status, err) = run_bin(&["--scheduler", "http://plain"], &[]);
    assert_eq!(status, 64, "{err}");
    assert!(err.contains("scheduler_url"), "{err}");
    let (status, out) = {
        let o = Command::new(env!("CARGO_BIN_EXE_ridge-agent"))
            .arg("--help")
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    assert_eq!(status, 0);
    assert!(
        out.contains("--token-file") && out.contains("ridge.token="),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_the_node_up_and_it_goes_down_when_the_agent_stops() {
    let e = env("lease").await;
    let a = ridge_agent::start(cfg(&e.overrides("s")), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    let id = a.node_id.clone();
    e.until_state(&id, "up").await;
    // Stays up over many lease periods (3 × 200 ms).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(e.state(&id), "up");
    }
    assert!(a.metrics.heartbeat_count("ok") >= 5);
    // The report reached the scheduler: real capabilities.
    let detail = e.sched.scheduler.node_detail(&id).await.unwrap();
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    assert_eq!(detail.capabilities.cores, cores);
    assert!(detail.capabilities.nics.iter().any(|n| n.name == "lo"));
    assert_eq!(
        detail.capabilities.io_uring,
        ridge_io::probe_uring().is_ok()
    );
    assert!(detail.capabilities.memory_bytes > 0);
    // Its metrics endpoint serves the registry.
    let m = reqwest::get(format!("http://{}/metrics", a.metrics_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("ridge_agent_heartbeats_total{result=\"ok\"}"),
        "{m}"
    );
    assert!(m.contains("ridge_agent_enrolled 1"), "{m}");
    let stopped = Instant::now();
    a.shutdown().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        stopped.elapsed()
    );
    e.until_state(&id, "down").await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(300),
        "down too early: {:?}",
        stopped.elapsed()
    );
}

/// Two agents probe each other (the scheduler lists each as the other's
/// probe peer). Heartbeats are 4 s apart, but when b stops, a reports the
/// link dead within a second or so: it finds b down 3 probe intervals
/// (300 ms here) after b's last answer and heartbeats at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_is_reported_at_once_not_at_the_next_heartbeat() {
    let e = env_with("linkdown", Duration::from_secs(4)).await;
    let token = e.mint(3600, 2).await;
    let mut agents = Vec::new();
    for state in ["a", "b"] {
        // Peers probe the mesh (here: media) address plus the offset: put
        // the responder right there.
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut o = e.overrides(state);
        o.media_address = Some(addr);
        o.probe_listen = Some(addr);
        o.probe_port_offset = Some(0);
        agents.push(
            ridge_agent::start(cfg(&o), Some(token.clone()))
                .await
                .unwrap(),
        );
    }
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    let b_id = b.node_id.clone();
    let t = Instant::now();
    while !a
        .probe()
        .measures()
        .iter()
        .any(|(p, m)| *p == b_id && m.samples >= 3 && m.loss == 0.0)
    {
        assert!(t.elapsed() < LIMIT, "a never measured b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.metrics.link_state_change_count("down"), 0);
    let early = a.metrics.heartbeats_early.get();

    let stopped = Instant::now();
    b.shutdown().await;
    let dead_at_scheduler = || async {
        let d = e.sched.scheduler.node_detail(&a.node_id).await.unwrap();
        d.links.iter().any(|l| l.peer == b_id && l.loss >= 1.0)
    };
    while !dead_at_scheduler().await {
        assert!(stopped.elapsed() < LIMIT, "b's link never reported dead");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = stopped.elapsed();
    eprintln!("a's report of b dead reached the scheduler {took:?} after b stopped");
    // Down once the last answer is `down_after` (300 ms) old; that answer
    // may have come up to one probe interval (100 ms) before b stopped.
    assert!(
        took >= Duration::from_millis(200),
        "reported dead too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "reported after {took:?}"
    );
    // By a heartbeat sent early, not the next regular one.
    assert_eq!(a.metrics.link_state_change_count("down"), 1);
    assert!(a.metrics.heartbeats_early.get() > early);
    // b's lease (12 s) has not expired: the link report did it.
    assert_eq!(e.state(&b_id), "up");
    a.shutdown().await;
}

#[test]
fn capability_discovery_returns_real_values() {
    let c = ridge_agent::discover::discover();
    assert_eq!(
        c.cores as usize,
        std::thread::available_parallelism().unwrap().get()
    );
    assert!(c.memory_bytes > 64 << 20, "{}", c.memory_bytes);
    let lo = c.nics.iter().find(|n| n.name == "lo").expect("lo");
    assert!(lo.mtu > 0);
    assert!(
        lo.addresses.iter().any(|a| a == "127.0.0.1/8"),
        "{:?}",
        lo.addresses
    );
    assert_eq!(c.io_uring, ridge_io::probe_uring().is_ok());
    assert!(["none", "generic", "native"].contains(&c.xdp.mode()));
    // Absent libraries are a plain false, never an error.
    let nvenc = ridge_agent::discover::library_loads("libnvidia-encode.so.1");
    assert_eq!(c.gpus.iter().any(|g| g.nvenc), nvenc && !c.gpus.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_probes_measure_rtt_and_loss_and_reject_wrong_keys() {
    let (_, ma) = metrics::registry();
    let (_, mb) = metrics::registry();
    let (_, mc) = metrics::registry();
    let t = Duration::from_millis(300);
    let lo = "127.0.0.1:0".parse().unwrap();
    let a = ProbeEngine::bind(lo, "n-000000000000000a", ma.clone(), t, t)
        .await
        .unwrap();
    let b = ProbeEngine::bind(lo, "n-000000000000000b", mb.clone(), t, t)
        .await
        .unwrap();
    let c = ProbeEngine::bind(lo, "n-000000000000000c", mc.clone(), t, t)
        .await
        .unwrap();
    let key = vec![0x42u8; 32];
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    a.set_links(vec![
        PeerLink {
            peer: "n-000000000000000b".into(),
            key: key.clone(),
            target: Some(b.local_addr().unwrap()),
        },
        PeerLink {
            peer: "n-000000000000000d".into(),
            key: key.clone(),
            target: Some(dead_addr),
        },
    ]);
    b.set_links(vec![
        PeerLink {
            peer: "n-000000000000000a".into(),
            key: key.clone(),
            target: None,
        },
        PeerLink {
            peer: "n-000000000000000c".into(),
            key: key.clone(),
            target: None,
        },
    ]);
    // c believes it has a link to b, with the wrong key.
    c.set_links(vec![PeerLink {
        peer: "n-000000000000000b".into(),
        key: vec![0x43; 32],
        target: Some(b.local_addr().unwrap()),
    }]);
    let mut tasks = Vec::new();
    for e in [&a, &b, &c] {
        tasks.push(tokio::spawn(e.clone().run_receiver()));
        tasks.push(tokio::spawn(
            e.clone().run_prober(Duration::from_millis(50)),
        ));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ms = a.measures();
    let ab = ms
        .iter()
        .find(|(p, _)| p == "n-000000000000000b")
        .expect("a→b measured")
        .1;
    assert!(ab.samples >= 10, "{ab:?}");
    assert_eq!(ab.loss, 0.0, "{ab:?}");
    assert!(ab.rtt_ms > 0.0 && ab.rtt_ms < 50.0, "{ab:?}");
    let ad = ms
        .iter()
        .find(|(p, _)| p == "n-000000000000000d")
        .expect("a→d measured")
        .1;
    assert_eq!(ad.loss, 1.0, "{ad:?}");
    let cb = c
        .measures()
        .into_iter()
        .find(|(p, _)| p == "n-000000000000000b")
        .expect("c→b")
        .1;
    assert_eq!(cb.loss, 1.0, "{cb:?}");
    assert!(
        mb.probe_rejected_count("bad_mac") >= 5,
        "b rejected {}",
        mb.probe_rejected_count("bad_mac")
    );
    assert_eq!(ma.probe_rejected_count("bad_mac"), 0);
    // The dead peer (and only it) went down once, within `down_after`.
    assert_eq!(ma.link_state_change_count("down"), 1);
    assert_eq!(ma.link_state_change_count("up"), 0);
    assert_eq!(
        a.dead_links().into_iter().collect::<Vec<_>>(),
        ["n-000000000000000d"]
    );
    assert_eq!(mc.link_state_change_count("down"), 1);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_the_dataplane_and_drain_refuses_new_sessions() {
    let e = env("desired").await;
    let sock = e.dir.0.join("run/dataplane.sock");
    let dp_o = ridge_dataplane::config::Overrides {
        http: Some("127.0.0.1:0".parse().unwrap()),
        udp: Some("127.0.0.1:0".parse().unwrap()),
        shards: Some(1),
        jwt_secret: Some(ridge_dataplane::config::Secret::new(
            "local-secret-0123456789",
        )),
        drain_timeout: Some(Duration::from_secs(1)),
        control_socket: Some(sock.clone()),
        ..Default::default()
    };
    let dp_cfg = ridge_dataplane::config::build(Default::default(), &dp_o, None).unwrap();
    let node = ridge_dataplane::Node::start(dp_cfg).await.unwrap();
    assert_eq!(mode(&sock), 0o600);
    let http = node.base_url();
    let o = Overrides {
        control_socket: Some(sock.clone()),
        media_address: None,
        ..e.overrides("s")
    };
    let a = ridge_agent::start(cfg(&o), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    let id = a.node_id.clone();
    e.until_state(&id, "up").await;
    let cc = ControlClient::new(&sock);
    let sched_version = || e.sched.scheduler.desired_json(&id).map_or(0, |(v, _)| v);
    let held =
        |cc: ControlClient| async move { cc.held().await.unwrap().map(|h| (h.version, h.drain)) };
    let t = Instant::now();
    while held(cc.clone()).await.map(|h| h.0) != Some(sched_version()) || sched_version() == 0 {
        assert!(
            t.elapsed() < LIMIT,
            "desired state never reached the dataplane"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v1 = sched_version();
    // The agent reported the dataplane's media address.
    let detail = e.sched.scheduler.node_detail(&id).await.unwrap();
    assert_eq!(
        detail.summary.addresses.media,
        Some(node.udp_addr().to_string())
    );
    // The dataplane now verifies tokens with the scheduler's key: a token
    // from dispatch is accepted (a malformed offer gets 400, not 401).
    let d = e
        .sched
        .scheduler
        .dispatch("r", None, true, true, None, None)
        .unwrap();
    let whip = |tok: String| {
        let url = format!("{http}/whip/r");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(tok)
                .header("content-type", "application/sdp")
                .body("v=0\r\n")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(whip(d.token.clone()).await, 400);
    let local = ridge_dataplane::auth::mint(
        &ridge_dataplane::config::Secret::new("local-secret-0123456789"),
        "r",
        "x",
        true,
        true,
        false,
        Duration::from_secs(60),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert_eq!(
        whip(local).await,
        401,
        "the old key must be refused after rotation"
    );

    // Drain through the scheduler: a new version reaches the node, which
    // refuses new sessions.
    e.sched.scheduler.drain(&id, true).await.unwrap();
    let t = Instant::now();
    loop {
        if let Some((v, true)) = held(cc.clone()).await {
            assert!(v > v1);
            break;
        }
        assert!(t.elapsed() < LIMIT, "drain never reached the dataplane");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cc.status().await.unwrap().draining);
    assert_eq!(whip(d.token).await, 503);
    a.shutdown().await;
    node.shutdown();
    node.wait().await.unwrap();
    assert!(!sock.exists(), "the control socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_identity_fails_clearly() {
    let e = env("tamper").await;
    let a = ridge_agent::start(cfg(&e.overrides("s")), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    a.shutdown().await;
    let path = e.dir.0.join("s/identity.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();

    // A forged credential (signature changed): the scheduler refuses it.
    let tok = v["node_token"].as_str().unwrap().to_owned();
    let (head, sig) = tok.rsplit_once('.').unwrap();
    let flipped: String = sig.chars().rev().collect();
    v["node_token"] = format!("{head}.{flipped}").into();
    std::fs::write(&path, v.to_string()).unwrap();
    let mut a = ridge_agent::start(cfg(&e.overrides("s")), None)
        .await
        .unwrap();
    let msg = tokio::time::timeout(LIMIT, a.failed())
        .await
        .expect("agent must fail");
    assert!(
        msg.contains("invalid_credential") && msg.contains("identity.json"),
        "{msg}"
    );
    a.shutdown().await;

    // A swapped public key: caught locally before any call.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["public_key"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = ridge_agent::start(cfg(&e.overrides("s")), None)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 77);
    assert!(err.to_string().contains("tampered"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_on_the_metrics_listener_and_the_state_dir_is_private() {
    let e = env("probes").await;
    // A state directory someone left open is closed before the key lands.
    let state = e.dir.0.join("s-probes");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = ridge_agent::start(cfg(&e.overrides("s-probes")), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("identity.json")), 0o600);
    let http = reqwest::Client::new();
    let get = |base: String, path: &'static str| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let base = format!("http://{}", a.metrics_addr.unwrap());
    // No control socket: enrolled is ready.
    assert_eq!(get(base.clone(), "/livez").await, (200, String::new()));
    assert_eq!(get(base.clone(), "/readyz").await, (200, String::new()));
    a.shutdown().await;
    // A control socket with no dataplane behind it: alive, not ready.
    let o = Overrides {
        control_socket: Some(e.dir.0.join("no-dataplane.sock")),
        ..e.overrides("s-probes2")
    };
    let b = ridge_agent::start(cfg(&o), Some(e.mint(3600, 1).await))
        .await
        .unwrap();
    let base = format!("http://{}", b.metrics_addr.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(base.clone(), "/livez").await, (200, String::new()));
    assert_eq!(get(base.clone(), "/readyz").await, (503, String::new()));
    b.shutdown().await;
}
