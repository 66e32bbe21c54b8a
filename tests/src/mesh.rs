//! `MeshLab`: a whole Ridge mesh on one machine, in network namespaces.
//!
//! One **hub** namespace runs `ridge-scheduler` and the test's clients; every
//! **node** namespace (`a`, `b`, …) runs a `ridge-dataplane` and the
//! `ridge-agent` that enrolled it with a real bootstrap token. All of it is
//! the real binaries (built by cargo on first use), torn down on drop, also
//! when a test panics.
//!
//! Addresses (the same in every lab: they live inside the lab's namespaces,
//! so labs run in parallel without clashing):
//!
//! - hub: [`HUB_IP`] on its `lo`; the scheduler listens on
//!   `HUB_IP:`[`SCHEDULER_PORT`] (HTTPS, a certificate the lab makes).
//! - node `i`: a **control veth** to the hub, `10.250.0.(4i+2)/30` (the hub
//!   end is `.(4i+1)`, interface `n-<name>` in the hub, `hub` in the node).
//!   This is the node's public address: HTTP on `:8080`, media UDP on
//!   `:5004` (the dataplane binds `0.0.0.0:5004`). The hub forwards between
//!   control veths, so nodes and hub clients reach each other's control IPs.
//! - node `i`: a **mesh IP** `10.251.0.(i+1)/32` on its `lo`, announced as
//!   `addresses.mesh` (`:5004`); the agent's probe responder listens on
//!   `:6004`. Mesh IPs are reachable only over the **mesh veths**: one
//!   point-to-point veth per topology link, its own `/30` (`10.252.k.0/30`),
//!   named `m-<peer>` in each namespace, with a static `/32` route to the
//!   neighbour's mesh IP (source: the node's own mesh IP). A non-neighbour's
//!   mesh IP has no route at all (sending to it fails with
//!   `ENETUNREACH`): in [`LabConfig::square`], A reaches B's and D's mesh IPs
//!   but not C's.
//!
//! The test thread talks to the lab through blocking helpers: scheduler
//! calls run on a tokio runtime whose threads live in the hub namespace
//! ([`MeshLab::block_on`]), node HTTP calls and UDP clients are made from the
//! hub ([`MeshLab::in_hub`], [`MeshLab::in_ns`]); a socket keeps the
//! namespace it was created in, so [`RtpSender`]/[`RtpReceiver`] are bound
//! in the hub and then used from any thread. Control sockets are Unix
//! sockets in the lab's directory, reachable from anywhere.
//!
//! Requires root (namespaces, veths) and iproute2; see
//! [`MeshLab::prerequisites`]. `RIDGE_MESH_KEEP=1` keeps the lab's directory
//! (logs, databases) after the test; `RIDGE_MESH_BIN_DIR` uses prebuilt
//! binaries instead of building them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ridge_dataplane::config::Secret;
use ridge_scheduler::api::{DesiredState, DispatchResponse, NodeSummary, RouteList};
use ridge_scheduler::client::{Client, Reply};
use serde_json::{Value, json};

/// The hub's address (on its `lo`): the scheduler and the test clients.
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 255, 1);
/// The scheduler's HTTPS port on [`HUB_IP`].
pub const SCHEDULER_PORT: u16 = 8443;
/// Every node's HTTP port (on its control IP).
pub const HTTP_PORT: u16 = 8080;
/// Every node's media port (the dataplane binds `0.0.0.0:MEDIA_PORT`).
pub const MEDIA_PORT: u16 = 5004;
/// Every agent's probe responder port (on the node's mesh IP):
/// the mesh port + the agent's default `probe_port_offset` of 1000.
pub const PROBE_PORT: u16 = MEDIA_PORT + 1000;
/// The payload type [`MeshLab::plain_rtp_pair`] uses (VP8 video).
pub const RTP_PT: u8 = 96;

/// How long start-up steps may take before the lab gives up.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longest scheduler call.
const CALL_LIMIT: Duration = Duration::from_secs(30);

// ----- configuration ---------------------------------------------------------

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Node names: 1 to 8 characters of `[a-z0-9]`, at most 60 nodes.
    pub nodes: Vec<String>,
    /// Undirected mesh links between named nodes.
    pub links: Vec<(String, String)>,
    /// The scheduler's `--heartbeat-interval` (the lease is 3 of them).
    pub heartbeat_interval: Duration,
    /// Every agent's `--probe-interval`.
    pub probe_interval: Duration,
    /// Every agent's `--watch-wait`.
    pub watch_wait: Duration,
    /// Every dataplane's `--shards`.
    pub shards: usize,
    /// Extra dataplane flags (default `--xdp off`: nothing attaches to the
    /// lab's veths, so an impairment can own their TC hooks).
    pub dataplane_args: Vec<String>,
    /// Per node, flags used instead of `dataplane_args` (a `--udp` among
    /// them replaces the lab's `0.0.0.0:5004`).
    pub node_args: BTreeMap<String, Vec<String>>,
    /// `trust_domain` label on every node's bootstrap token (`None`: no
    /// label, so links are untrusted).
    pub trust_domain: Option<String>,
    /// `--log` of the dataplanes and agents.
    pub log: String,
}

impl LabConfig {
    /// Nodes and links by name, with the lab's defaults.
    pub fn new(nodes: &[&str], links: &[(&str, &str)]) -> LabConfig {
        LabConfig {
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            links: links
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            heartbeat_interval: Duration::from_millis(500),
            probe_interval: Duration::from_millis(200),
            watch_wait: Duration::from_secs(5),
            shards: 1,
            dataplane_args: vec!["--xdp".into(), "off".into()],
            node_args: BTreeMap::new(),
            trust_domain: Some("lab".into()),
            // Debug lines of the agents (a link change sent a heartbeat
            // early) and of the dataplanes' mesh (subscriptions refused or
            // taken, hand-overs): the failover timeline. They are few; the
            // probe module's are not (a failed send to every unreachable
            // peer, every probe interval), so it stays at info.
            log: "info,ridge_agent=debug,ridge_agent::probe=info,ridge_sfu=debug".into(),
        }
    }

    /// A square: A–B, B–C, A–D, D–C, and no A–C or B–D link.
    pub fn square() -> LabConfig {
        LabConfig::new(
            &["a", "b", "c", "d"],
            &[("a", "b"), ("b", "c"), ("a", "d"), ("d", "c")],
        )
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            !self.nodes.is_empty() && self.nodes.len() <= 60,
            "1 to 60 nodes"
        );
        for (i, n) in self.nodes.iter().enumerate() {
            ensure!(
                (1..=8).contains(&n.len())
                    && n.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "node name {n:?}: 1 to 8 characters of [a-z0-9]"
            );
            ensure!(n != "hub", "`hub` is the hub's name");
            ensure!(!self.nodes[..i].contains(n), "node {n} twice");
        }
        ensure!(self.links.len() <= 250, "at most 250 links");
        for (k, (a, b)) in self.links.iter().enumerate() {
            ensure!(a != b, "link {a}-{b} to itself");
            for n in [a, b] {
                ensure!(self.nodes.contains(n), "link {a}-{b}: no node {n}");
            }
            ensure!(
                !self.links[..k]
                    .iter()
                    .any(|(x, y)| (x == a && y == b) || (x == b && y == a)),
                "link {a}-{b} twice"
            );
        }
        Ok(())
    }
}

/// One mesh link (a veth pair between two node namespaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshLink {
    pub a: String,
    pub b: String,
    /// The veth's name in `a`'s namespace (`m-<b>`).
    pub a_iface: String,
    /// The veth's name in `b`'s namespace (`m-<a>`).
    pub b_iface: String,
    /// `a`'s end of the link's /30.
    pub a_addr: Ipv4Addr,
    /// `b`'s end of the link's /30.
    pub b_addr: Ipv4Addr,
}

impl MeshLink {
    /// The interface on `node`'s side of this link.
    pub fn iface_of(&self, node: &str) -> Option<&str> {
        if node == self.a {
            Some(&self.a_iface)
        } else if node == self.b {
            Some(&self.b_iface)
        } else {
            None
        }
    }
}

/// How a run of `ridge-agent` with a bootstrap token ended
/// ([`MeshLab::enroll_agent_once`]).
#[derive(Debug, Clone)]
pub struct AgentRun {
    /// Exit status; `None` if it was still running at the time limit (it
    /// enrolled) or died from a signal.
    pub code: Option<i32>,
    /// Its stderr (and stdout).
    pub output: String,
}

// ----- binaries ----------------------------------------------------------------

/// The binaries a lab runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub scheduler: PathBuf,
    pub ridgectl: PathBuf,
    pub agent: PathBuf,
    pub dataplane: PathBuf,
}

/// The lab's binaries: from `RIDGE_MESH_BIN_DIR` when set, else built once
/// per process with `cargo build --bins -p ridge-scheduler -p ridge-agent
/// -p ridge-dataplane` (the test's own profile and target directory) and
/// hard-linked into a private directory at once, so that another checkout
/// building into a shared target directory cannot swap them mid-test.
pub fn binaries() -> Result<Binaries> {
    static BINS: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINS.get_or_init(|| find_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_binaries() -> Result<Binaries> {
    let names = [
        "ridge-scheduler",
        "ridgectl",
        "ridge-agent",
        "ridge-dataplane",
    ];
    let pick = |paths: &BTreeMap<String, PathBuf>| -> Result<Binaries> {
        let get = |n: &str| {
            paths
                .get(n)
                .cloned()
                .with_context(|| format!("{n} was not built"))
        };
        Ok(Binaries {
            scheduler: get("ridge-scheduler")?,
            ridgectl: get("ridgectl")?,
            agent: get("ridge-agent")?,
            dataplane: get("ridge-dataplane")?,
        })
    };
    if let Some(dir) = std::env::var_os("RIDGE_MESH_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let mut paths = BTreeMap::new();
        for n in names {
            let p = dir.join(n);
            ensure!(
                p.is_file(),
                "RIDGE_MESH_BIN_DIR={}: no {n} there",
                dir.display()
            );
            paths.insert(n.to_owned(), p);
        }
        return pick(&paths);
    }
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .args([
            "-p",
            "ridge-scheduler",
            "-p",
            "ridge-agent",
            "-p",
            "ridge-dataplane",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cargo:?} build for the lab's binaries"))?;
    ensure!(
        out.status.success(),
        "cargo build of ridge-scheduler, ridge-agent and ridge-dataplane failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut built = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
            && names.contains(&name)
        {
            built.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    // Private links, one directory per test process; those of processes
    // that are gone are removed.
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("ridge-mesh-bins-")
                && !pid_alive(pid)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let private = tmp.join(format!("ridge-mesh-bins-{}", std::process::id()));
    std::fs::create_dir_all(&private)?;
    let mut paths = BTreeMap::new();
    for (name, src) in built {
        let dst = private.join(&name);
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
        paths.insert(name, dst);
    }
    pick(&paths)
}

fn pid_alive(pid: &str) -> bool {
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && Path::new("/proc").join(pid).exists()
}

// ----- namespaces ----------------------------------------------------------------

fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd("ip", args)
}

/// `ip` with a command line of whitespace-separated words.
fn ip_line(line: &str) -> Result<String> {
    ip(&line.split_whitespace().collect::<Vec<_>>())
}

/// Moves the calling thread into network namespace `ns` (a name under
/// `/run/netns`).
pub fn enter_netns(ns: &str) -> std::io::Result<()> {
    let f = File::open(Path::new("/run/netns").join(ns))?;
    setns(&f)
}

fn setns(f: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor we own; it only changes the calling
    // thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `f` on a fresh thread inside network namespace `ns`; sockets it
/// creates stay in that namespace wherever they are used later.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter_netns(ns).with_context(|| format!("entering network namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Kills every process in namespace `ns` and deletes it.
fn remove_netns(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid the kernel listed in the namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Namespaces and directories of labs whose test process is gone.
fn remove_stale_labs() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("rml")
                && let Some((pid, _)) = rest.split_once('-')
                && !pid_alive(pid)
            {
                remove_netns(&name);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("rml-")
                && let Some((pid, _)) = rest.split_once('-')
                && !pid_alive(pid)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// IP forwarding on (hub) or off (nodes: a node never routes another's
/// mesh traffic at the IP level), reverse-path filtering off. A new
/// namespace inherits the host's IPv4 settings.
fn set_sysctls(ns: &str, forward: bool) -> Result<()> {
    let script = format!(
        "echo {} > /proc/sys/net/ipv4/ip_forward && \
         echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && \
         echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter",
        u8::from(forward)
    );
    run_cmd("ip", &["netns", "exec", ns, "sh", "-c", &script]).map(drop)
}

// ----- processes -------------------------------------------------------------------

/// Spawns `bin args` inside `ns` with output appended to `log`. The child
/// dies with the spawning thread (PR_SET_PDEATHSIG), so a killed test
/// leaves nothing running.
fn spawn_in(
    ns: &str,
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RIDGE_BOOTSTRAP_TOKEN")
        .env_remove("RIDGE_JWT_SECRET")
        .env_remove("RIDGE_ADMIN_TOKEN")
        .env_remove("RIDGE_DISPATCH_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: prctl(2) is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} in {ns}", bin.display()))
}

fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn stop_child(child: &mut Option<Child>, graceful: Option<Duration>) -> Option<i32> {
    let mut c = child.take()?;
    if let Some(limit) = graceful {
        signal(&c, libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = c.kill();
    c.wait().ok().and_then(|s| s.code())
}

fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` every 100 ms until it gives `Some`, an error, or `limit`
/// passes (then the error names `what` and the last value `f` reported
/// through its `Err`-free `None`).
pub fn eventually<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let filled = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !filled {
        // Not a secret worth the name without /dev/urandom, but unique.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

// ----- minimal HTTP/1.1 ----------------------------------------------------------

/// Sends one HTTP/1.1 request (`Connection: close`) over `stream`; returns
/// status and body.
fn http_exchange(
    mut stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        crate::node::dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

/// One request to a dataplane's control API over its Unix socket.
pub fn control_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    http_exchange(s, "localhost", method, path, &[], body)
}

// ----- the lab -------------------------------------------------------------------

#[derive(Debug)]
struct NodeProc {
    name: String,
    ns: String,
    dir: PathBuf,
    ctl_ip: Ipv4Addr,
    mesh_ip: Ipv4Addr,
    region: String,
    /// The bootstrap token it enrolled with.
    token: String,
    node_id: Option<String>,
    dataplane: Option<Child>,
    agent: Option<Child>,
}

impl NodeProc {
    fn socket(&self) -> PathBuf {
        self.dir.join("dp.sock")
    }
    fn dataplane_log(&self) -> PathBuf {
        self.dir.join("dataplane.log")
    }
    fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
}

/// A running lab: see the module documentation.
pub struct MeshLab {
    config: LabConfig,
    dir: PathBuf,
    hub: String,
    /// Namespaces created so far (hub first), for teardown.
    namespaces: Vec<String>,
    nodes: Vec<NodeProc>,
    links: Vec<MeshLink>,
    bins: Binaries,
    scheduler: Option<Child>,
    admin_token: String,
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
    keep: bool,
}

impl std::fmt::Debug for MeshLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshLab")
            .field("dir", &self.dir)
            .field("hub", &self.hub)
            .field("nodes", &self.config.nodes)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl MeshLab {
    /// Why a lab cannot run here (`Err(reason)`), for
    /// [`crate::skip::require`]: it needs root and iproute2 with network
    /// namespace support.
    pub fn prerequisites() -> Result<(), String> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "needs root: the mesh lab creates network namespaces and veth pairs".into(),
            );
        }
        if !Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Err("needs `ip` (iproute2): bash tests/install-deps.sh --test".into());
        }
        let probe = format!(
            "rml{}-probe{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        match ip(&["netns", "add", &probe]) {
            Ok(_) => {
                remove_netns(&probe);
                Ok(())
            }
            Err(e) => Err(format!("cannot create a network namespace: {e:#}")),
        }
    }

    /// [`LabConfig::square`].
    pub fn square() -> Result<MeshLab> {
        MeshLab::start(LabConfig::square())
    }

    /// Builds the namespaces, starts the scheduler, mints one single-use
    /// bootstrap token per node with `ridgectl`, starts every dataplane and
    /// agent, and returns once every agent has enrolled. Nodes may not be
    /// `up` yet: see [`MeshLab::wait_until_up`].
    pub fn start(config: LabConfig) -> Result<MeshLab> {
        config.validate()?;
        let bins = binaries()?;
        remove_stale_labs();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("rml{pid}-{n}");
        let dir = std::env::temp_dir().join(format!("rml-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = MeshLab {
            hub: format!("{prefix}-hub"),
            namespaces: Vec::new(),
            nodes: Vec::new(),
            links: Vec::new(),
            bins,
            scheduler: None,
            admin_token: random_hex(24),
            url: format!("https://{HUB_IP}:{SCHEDULER_PORT}"),
            rt: None,
            client: None,
            keep: std::env::var("RIDGE_MESH_KEEP").is_ok_and(|v| v == "1"),
            dir,
            config,
        };
        lab.build_network(&prefix)?;
        lab.start_runtime()?;
        lab.write_certificate()?;
        lab.spawn_scheduler()?;
        lab.wait_scheduler()?;
        for i in 0..lab.nodes.len() {
            let region = lab.nodes[i].region.clone();
            let name = lab.nodes[i].name.clone();
            let token =
                lab.create_bootstrap_token(&region, "1h", 1, &format!("mesh lab node {name}"))?;
            let node = &mut lab.nodes[i];
            node.token = token;
            let path = node.dir.join("bootstrap-token");
            std::fs::write(&path, format!("{}\n", node.token))?;
        }
        let names: Vec<String> = lab.config.nodes.clone();
        for name in &names {
            lab.spawn_dataplane(name)?;
        }
        for name in &names {
            lab.wait_dataplane(name)?;
            lab.spawn_agent(name)?;
        }
        for name in &names {
            lab.wait_agent(name, 0)?;
        }
        Ok(lab)
    }

    fn build_network(&mut self, prefix: &str) -> Result<()> {
        let hub = self.hub.clone();
        ip_line(&format!("netns add {hub}"))?;
        self.namespaces.push(hub.clone());
        set_sysctls(&hub, true)?;
        ip_line(&format!("-n {hub} link set lo up"))?;
        ip_line(&format!("-n {hub} addr add {HUB_IP}/32 dev lo"))?;
        for (i, name) in self.config.nodes.clone().into_iter().enumerate() {
            let i8 = u8::try_from(i).context("too many nodes")?;
            let ns = format!("{prefix}-{name}");
            ip_line(&format!("netns add {ns}"))?;
            self.namespaces.push(ns.clone());
            set_sysctls(&ns, false)?;
            let hub_end = Ipv4Addr::new(10, 250, 0, 4 * i8 + 1);
            let ctl_ip = Ipv4Addr::new(10, 250, 0, 4 * i8 + 2);
            let mesh_ip = Ipv4Addr::new(10, 251, 0, i8 + 1);
            for cmd in [
                format!("-n {ns} link set lo up"),
                format!("-n {hub} link add n-{name} type veth peer name hub netns {ns}"),
                format!("-n {hub} addr add {hub_end}/30 dev n-{name}"),
                format!("-n {hub} link set n-{name} up"),
                format!("-n {ns} addr add {ctl_ip}/30 dev hub"),
                format!("-n {ns} link set hub up"),
                format!("-n {ns} addr add {mesh_ip}/32 dev lo"),
                // The hub and every control IP, through the hub; no default
                // route, so nothing else (no mesh IP) is reachable that way.
                format!("-n {ns} route add 10.250.0.0/16 via {hub_end} dev hub"),
            ] {
                ip_line(&cmd)?;
            }
            let dir = self.dir.join(&name);
            std::fs::create_dir_all(&dir)?;
            self.nodes.push(NodeProc {
                region: format!("lab-{name}"),
                name,
                ns,
                dir,
                ctl_ip,
                mesh_ip,
                token: String::new(),
                node_id: None,
                dataplane: None,
                agent: None,
            });
        }
        for (k, (a, b)) in self.config.links.clone().into_iter().enumerate() {
            let k8 = u8::try_from(k).context("too many links")?;
            let (na, nb) = (self.node(&a)?, self.node(&b)?);
            let (ns_a, ns_b) = (na.ns.clone(), nb.ns.clone());
            let (mesh_a, mesh_b) = (na.mesh_ip, nb.mesh_ip);
            let a_addr = Ipv4Addr::new(10, 252, k8, 1);
            let b_addr = Ipv4Addr::new(10, 252, k8, 2);
            let (a_if, b_if) = (format!("m-{b}"), format!("m-{a}"));
            ip_line(&format!(
                "-n {ns_a} link add {a_if} type veth peer name {b_if} netns {ns_b}"
            ))?;
            for (ns, ifc, addr, peer_addr, own_mesh, peer_mesh) in [
                (&ns_a, &a_if, a_addr, b_addr, mesh_a, mesh_b),
                (&ns_b, &b_if, b_addr, a_addr, mesh_b, mesh_a),
            ] {
                ip_line(&format!("-n {ns} addr add {addr}/30 dev {ifc}"))?;
                ip_line(&format!("-n {ns} link set {ifc} up"))?;
                // Only the neighbour's mesh IP, from our own mesh IP.
                ip_line(&format!(
                    "-n {ns} route add {peer_mesh}/32 via {peer_addr} dev {ifc} src {own_mesh}"
                ))?;
            }
            self.links.push(MeshLink {
                a,
                b,
                a_iface: a_if,
                b_iface: b_if,
                a_addr,
                b_addr,
            });
        }
        Ok(())
    }

    fn start_runtime(&mut self) -> Result<()> {
        let fd = Arc::new(
            File::open(Path::new("/run/netns").join(&self.hub))
                .context("opening the hub namespace")?,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mesh-lab-hub")
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = setns(&fd) {
                    panic!("mesh lab: cannot enter the hub namespace: {e}");
                }
            })
            .build()?;
        self.rt = Some(rt);
        Ok(())
    }

    fn write_certificate(&mut self) -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec![HUB_IP.to_string()])
            .context("generating the scheduler certificate")?;
        let pem = ck.cert.pem();
        std::fs::write(self.ca_path(), &pem)?;
        std::fs::write(self.dir.join("key.pem"), ck.signing_key.serialize_pem())?;
        self.client = Some(Client::new(&self.url, pem.as_bytes(), 4)?);
        Ok(())
    }

    fn spawn_scheduler(&mut self) -> Result<()> {
        let d = &self.dir;
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("{HUB_IP}:{SCHEDULER_PORT}"),
            "--tls-cert".into(),
            d.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            d.join("key.pem").display().to_string(),
            "--database".into(),
            format!("sqlite:{}", d.join("scheduler.db").display()),
            "--heartbeat-interval".into(),
            humantime_ms(self.config.heartbeat_interval),
            "--drain-timeout".into(),
            "2s".into(),
            "--replica-id".into(),
            "lab".into(),
            // Debug: when a link went down and when desired states
            // changed, for failover failures' log tails.
            "--log".into(),
            "info,ridge_scheduler=debug".into(),
        ];
        let dispatch = format!("dispatch-{}", random_hex(16));
        let child = spawn_in(
            &self.hub,
            &self.bins.scheduler,
            &args,
            &[
                ("RIDGE_ADMIN_TOKEN", &self.admin_token),
                ("RIDGE_DISPATCH_TOKEN", &dispatch),
            ],
            &self.scheduler_log_path(),
        )?;
        self.scheduler = Some(child);
        Ok(())
    }

    fn wait_scheduler(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(c) = self.scheduler.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!(
                    "ridge-scheduler exited ({st}):\n{}",
                    tail(&self.scheduler_log(), 40)
                );
            }
            if self
                .api_get("/healthz")
                .is_ok_and(|r| r.status.as_u16() == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ridge-scheduler did not answer /healthz within {START_LIMIT:?}:\n{}",
                    tail(&self.scheduler_log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_dataplane(&mut self, name: &str) -> Result<()> {
        let cfg = self.config.clone();
        let bin = self.bins.dataplane.clone();
        let n = self.node_mut(name)?;
        let _ = std::fs::remove_file(n.socket());
        let extra = cfg.node_args.get(name).unwrap_or(&cfg.dataplane_args);
        // A node's own `--udp` replaces the wildcard.
        let udp = if extra.iter().any(|a| a == "--udp") {
            vec![]
        } else {
            vec!["--udp".into(), format!("0.0.0.0:{MEDIA_PORT}")]
        };
        let mut args: Vec<String> = vec![
            "--http".into(),
            format!("{}:{HTTP_PORT}", n.ctl_ip),
            "--insecure-http".into(),
        ];
        args.extend(udp);
        args.extend([
            "--public-ip".into(),
            n.ctl_ip.to_string(),
            "--shards".into(),
            cfg.shards.to_string(),
            "--no-pin-cores".into(),
            // The lab's plain subscribers receive without a consent packet.
            "--rtp-trusted-network".into(),
            "0.0.0.0/0".into(),
            "--control-socket".into(),
            n.socket().display().to_string(),
            "--drain-timeout".into(),
            "1s".into(),
            "--log".into(),
            cfg.log.clone(),
        ]);
        // tests/run.sh runs the suite once per I/O backend.
        if let Ok(b) = std::env::var("RIDGE_TEST_IO_BACKEND")
            && !b.is_empty()
            && b != "auto"
        {
            args.push("--io-backend".into());
            args.push(b);
        }
        args.extend(extra.iter().cloned());
        // The dataplane starts with a throwaway secret; the desired state's
        // `dataplane_secret` replaces it.
        let secret = random_hex(24);
        let child = spawn_in(
            &n.ns,
            &bin,
            &args,
            &[("RIDGE_JWT_SECRET", &secret)],
            &n.dataplane_log(),
        )?;
        n.dataplane = Some(child);
        Ok(())
    }

    fn wait_dataplane(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        let n = self.node_mut(name)?;
        loop {
            if let Some(c) = n.dataplane.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!(
                    "ridge-dataplane of {name} exited ({st}):\n{}",
                    tail(&read_log(&n.dataplane_log()), 40)
                );
            }
            if control_request(&n.socket(), "GET", "/v1/status", None).is_ok_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ridge-dataplane of {name} did not answer on its control socket:\n{}",
                    tail(&read_log(&n.dataplane_log()), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn_agent(&mut self, name: &str) -> Result<()> {
        let cfg = self.config.clone();
        let bin = self.bins.agent.clone();
        let url = self.url.clone();
        let ca = self.ca_path();
        let n = self.node_mut(name)?;
        let args: Vec<String> = vec![
            "--scheduler".into(),
            url,
            "--scheduler-ca".into(),
            ca.display().to_string(),
            "--state-dir".into(),
            n.dir.join("agent").display().to_string(),
            "--token-file".into(),
            n.dir.join("bootstrap-token").display().to_string(),
            "--cmdline-path".into(),
            n.dir.join("no-cmdline").display().to_string(),
            "--control-socket".into(),
            n.socket().display().to_string(),
            "--media-address".into(),
            format!("{}:{MEDIA_PORT}", n.ctl_ip),
            "--mesh-address".into(),
            format!("{}:{MEDIA_PORT}", n.mesh_ip),
            "--http-url".into(),
            format!("http://{}:{HTTP_PORT}", n.ctl_ip),
            "--probe-listen".into(),
            format!("{}:{PROBE_PORT}", n.mesh_ip),
            "--probe-interval".into(),
            humantime_ms(cfg.probe_interval),
            "--watch-wait".into(),
            humantime_ms(cfg.watch_wait),
            "--metrics-listen".into(),
            "127.0.0.1:9107".into(),
            "--drain-timeout".into(),
            "2s".into(),
            "--log".into(),
            cfg.log.clone(),
        ];
        let child = spawn_in(&n.ns, &bin, &args, &[], &n.agent_log())?;
        n.agent = Some(child);
        Ok(())
    }

    /// Waits for the agent's `ridge-agent running: node …` line number
    /// `seen + 1`; records the node id.
    fn wait_agent(&mut self, name: &str, seen: usize) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        let n = self.node_mut(name)?;
        loop {
            let log = read_log(&n.agent_log());
            let ids: Vec<&str> = log
                .lines()
                .filter_map(|l| l.strip_prefix("ridge-agent running: node "))
                .filter_map(|rest| rest.split_whitespace().next())
                .collect();
            if ids.len() > seen {
                let id = ids[ids.len() - 1].to_owned();
                if let Some(old) = &n.node_id {
                    ensure!(
                        *old == id,
                        "agent of {name} came back as {id}, not {old} (it enrolled again)"
                    );
                }
                n.node_id = Some(id);
                return Ok(());
            }
            if let Some(c) = n.agent.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!("ridge-agent of {name} exited ({st}):\n{}", tail(&log, 40));
            }
            if Instant::now() > deadline {
                bail!(
                    "ridge-agent of {name} did not start within {START_LIMIT:?}:\n{}",
                    tail(&log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // ----- lookups

    /// The pid of `node`'s running dataplane.
    pub fn dataplane_pid(&self, node: &str) -> Result<u32> {
        self.node(node)?
            .dataplane
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("{node}'s dataplane is not running"))
    }

    fn node(&self, name: &str) -> Result<&NodeProc> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name:?} in this lab"))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeProc> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name:?} in this lab"))
    }

    /// The lab's node names, in configuration order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// The lab's directory (logs, the scheduler database, control sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hub's namespace name.
    pub fn hub_ns(&self) -> &str {
        &self.hub
    }

    /// The namespace of `node` (`"hub"` names the hub).
    pub fn ns(&self, node: &str) -> Result<&str> {
        if node == "hub" {
            return Ok(&self.hub);
        }
        Ok(&self.node(node)?.ns)
    }

    /// Runs `f` on a fresh thread inside `node`'s namespace (`"hub"`: the
    /// hub's).
    pub fn in_ns<T: Send>(&self, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.ns(node)?, f)
    }

    /// Runs `f` on a fresh thread inside the hub namespace.
    pub fn in_hub<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.hub, f)
    }

    /// Runs `fut` on the lab's runtime, whose threads are in the hub
    /// namespace (so its sockets are too), and waits for it.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.rt.as_ref().expect("the lab's runtime runs until drop");
        let handle = rt.spawn(fut);
        match rt.block_on(handle) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("mesh lab task failed: {e}"),
        }
    }

    /// `node`'s id once its agent enrolled.
    pub fn node_id(&self, node: &str) -> Result<String> {
        self.node(node)?
            .node_id
            .clone()
            .with_context(|| format!("node {node} has no id yet"))
    }

    /// The lab name of the node with scheduler id `id`.
    pub fn node_name(&self, id: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.node_id.as_deref() == Some(id))
            .map(|n| n.name.as_str())
    }

    /// Replaces every known node id in `text` by its lab name (`n-…` → `a`).
    pub fn names_for_ids(&self, text: &str) -> String {
        let mut s = text.to_owned();
        for n in &self.nodes {
            if let Some(id) = &n.node_id {
                s = s.replace(id.as_str(), &n.name);
            }
        }
        s
    }

    /// The mesh links.
    pub fn links(&self) -> &[MeshLink] {
        &self.links
    }

    /// The link between `a` and `b` (either order).
    pub fn link(&self, a: &str, b: &str) -> Option<&MeshLink> {
        self.links
            .iter()
            .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
    }

    /// The topology neighbours of `node`.
    pub fn neighbours(&self, node: &str) -> Vec<&str> {
        self.links
            .iter()
            .filter_map(|l| {
                if l.a == node {
                    Some(l.b.as_str())
                } else if l.b == node {
                    Some(l.a.as_str())
                } else {
                    None
                }
            })
            .collect()
    }

    /// `http://<control IP>:8080`, reachable from the hub.
    pub fn node_http(&self, node: &str) -> Result<String> {
        Ok(format!("http://{}:{HTTP_PORT}", self.node(node)?.ctl_ip))
    }

    /// The node's media address for clients (`addresses.media`).
    pub fn node_media(&self, node: &str) -> Result<SocketAddr> {
        Ok(SocketAddr::V4(SocketAddrV4::new(
            self.node(node)?.ctl_ip,
            MEDIA_PORT,
        )))
    }

    /// The node's mesh address (`addresses.mesh`).
    pub fn node_mesh(&self, node: &str) -> Result<SocketAddr> {
        Ok(SocketAddr::V4(SocketAddrV4::new(
            self.node(node)?.mesh_ip,
            MEDIA_PORT,
        )))
    }

    /// The node's control IP (its public address, on the `hub` veth).
    pub fn node_control_ip(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.node(node)?.ctl_ip)
    }

    /// The region of the node's bootstrap token (`lab-<name>`).
    pub fn node_region(&self, node: &str) -> Result<&str> {
        Ok(&self.node(node)?.region)
    }

    /// The dataplane's control socket.
    pub fn control_socket(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.socket())
    }

    /// The bootstrap token `node` enrolled with (single use: now exhausted).
    pub fn bootstrap_token(&self, node: &str) -> Result<&str> {
        Ok(&self.node(node)?.token)
    }

    /// The scheduler's base URL (`https://10.250.255.1:8443`, hub only).
    pub fn scheduler_url(&self) -> &str {
        &self.url
    }

    /// The operator token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The scheduler's certificate (PEM), to trust it.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// A scheduler client (use it inside [`MeshLab::block_on`]).
    pub fn client(&self) -> Client {
        self.client
            .clone()
            .expect("the client exists from start on")
    }

    // ----- logs

    fn scheduler_log_path(&self) -> PathBuf {
        self.dir.join("scheduler.log")
    }

    /// Everything the scheduler wrote (across restarts).
    pub fn scheduler_log(&self) -> String {
        read_log(&self.scheduler_log_path())
    }

    /// Everything `node`'s dataplane wrote.
    pub fn dataplane_log(&self, node: &str) -> String {
        self.node(node)
            .map(|n| read_log(&n.dataplane_log()))
            .unwrap_or_default()
    }

    /// Everything `node`'s agent wrote.
    pub fn agent_log(&self, node: &str) -> String {
        self.node(node)
            .map(|n| read_log(&n.agent_log()))
            .unwrap_or_default()
    }

    /// The last `lines` lines of every log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = format!(
            "--- scheduler ({})\n{}\n",
            self.scheduler_log_path().display(),
            tail(&self.scheduler_log(), lines)
        );
        for n in &self.nodes {
            s.push_str(&format!(
                "--- {} dataplane\n{}\n--- {} agent\n{}\n",
                n.name,
                tail(&read_log(&n.dataplane_log()), lines),
                n.name,
                tail(&read_log(&n.agent_log()), lines)
            ));
        }
        self.names_for_ids(&s)
    }

    // ----- scheduler API (admin token)

    /// `GET path` with the admin token.
    pub fn api_get(&self, path: &str) -> Result<Reply> {
        let (c, t, p) = (self.client(), self.admin_token.clone(), path.to_owned());
        self.block_on(async move {
            tokio::time::timeout(CALL_LIMIT, c.get(&p, Some(&t)))
                .await
                .map_err(|_| anyhow!("GET {p}: no answer within {CALL_LIMIT:?}"))?
                .map_err(anyhow::Error::from)
        })
    }

    /// `POST path` with a JSON body and the admin token.
    pub fn api_post(&self, path: &str, body: &Value) -> Result<Reply> {
        let (c, t, p, b) = (
            self.client(),
            self.admin_token.clone(),
            path.to_owned(),
            body.clone(),
        );
        self.block_on(async move {
            tokio::time::timeout(CALL_LIMIT, c.post(&p, Some(&t), &b))
                .await
                .map_err(|_| anyhow!("POST {p}: no answer within {CALL_LIMIT:?}"))?
                .map_err(anyhow::Error::from)
        })
    }

    fn api_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.api_get(path)?;
        ensure!(
            r.status.is_success(),
            "GET {path}: {} {}",
            r.status.as_u16(),
            r.body
        );
        serde_json::from_str(&r.body).with_context(|| format!("GET {path}: {}", r.body))
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeSummary>> {
        Ok(self
            .api_json::<ridge_scheduler::api::NodeList>("/v1/nodes")?
            .nodes)
    }

    /// `GET /v1/nodes/{id}` of a lab node, as JSON.
    pub fn node_detail(&self, node: &str) -> Result<Value> {
        self.api_json(&format!("/v1/nodes/{}", self.node_id(node)?))
    }

    /// `GET /v1/routes`.
    pub fn routes(&self) -> Result<RouteList> {
        self.api_json("/v1/routes")
    }

    /// `GET /v1/rooms`, as JSON.
    pub fn rooms(&self) -> Result<Value> {
        self.api_json("/v1/rooms")
    }

    /// Polls `GET /v1/nodes` until at least `n` nodes are `up` (and every
    /// lab node is among them); returns the list.
    pub fn wait_until_up(&self, n: usize, timeout: Duration) -> Result<Vec<NodeSummary>> {
        let mut last = String::new();
        let r = eventually(&format!("{n} nodes up"), timeout, || {
            let nodes = self.nodes()?;
            let up: Vec<&str> = nodes
                .iter()
                .filter(|s| s.state == "up")
                .map(|s| s.id.as_str())
                .collect();
            last = nodes
                .iter()
                .map(|s| format!("{} {}", s.id, s.state))
                .collect::<Vec<_>>()
                .join(", ");
            let ours = self
                .nodes
                .iter()
                .filter(|p| p.node_id.as_deref().is_some_and(|id| up.contains(&id)))
                .count();
            Ok((up.len() >= n && ours >= n.min(self.nodes.len())).then_some(nodes))
        });
        r.with_context(|| self.names_for_ids(&format!("nodes: [{last}]")))
    }

    /// The path (lab names, source first) of `room`'s tree from
    /// `source` to `subscriber` in the current plan, if any.
    pub fn route_path(
        &self,
        room: &str,
        source: &str,
        subscriber: &str,
    ) -> Result<Option<Vec<String>>> {
        let plan = self.routes()?;
        let (src, dst) = (self.node_id(source)?, self.node_id(subscriber)?);
        let Some(tree) = plan
            .routes
            .iter()
            .find(|r| r.room == room && r.source == src)
        else {
            return Ok(None);
        };
        let mut path = vec![dst.clone()];
        let mut cur = dst;
        while cur != src {
            let Some(up) = tree.upstream_of(&cur) else {
                return Ok(None);
            };
            ensure!(path.len() <= 64, "cycle in the route tree: {tree:?}");
            cur = up.to_owned();
            path.push(cur.clone());
        }
        path.reverse();
        Ok(Some(
            path.iter()
                .map(|id| self.node_name(id).unwrap_or(id).to_owned())
                .collect(),
        ))
    }

    /// Polls the plan until `pred` accepts the path of `room` from `source`
    /// to `subscriber`. On timeout the error shows what every node reports
    /// (links, rooms) and the plan, with lab names for node ids.
    pub fn wait_route(
        &self,
        room: &str,
        source: &str,
        subscriber: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[String]) -> bool,
    ) -> Result<Vec<String>> {
        let mut last = None;
        let r = eventually(
            &format!("a route for room {room} from {source} to {subscriber}"),
            timeout,
            || {
                let p = self.route_path(room, source, subscriber)?;
                last.clone_from(&p);
                Ok(p.filter(|p| pred(p)))
            },
        );
        r.map_err(|e| anyhow!("{e:#}; last path: {last:?}\n{}", self.mesh_report()))
    }

    /// What the scheduler knows, for failure messages: per node its state,
    /// reported links and rooms; the plan.
    pub fn mesh_report(&self) -> String {
        let mut s = String::from("scheduler's view:\n");
        for n in &self.nodes {
            let Ok(d) = self.node_detail(&n.name) else {
                s.push_str(&format!("  {}: (no detail)\n", n.name));
                continue;
            };
            s.push_str(&format!(
                "  {}: state {} links {} rooms {} desired {}\n",
                n.name, d["state"], d["links"], d["rooms"], d["desired"]
            ));
        }
        match self.api_get("/v1/routes") {
            Ok(r) => s.push_str(&format!("  plan: {}\n", r.body)),
            Err(e) => s.push_str(&format!("  plan: {e:#}\n")),
        }
        self.names_for_ids(&s)
    }

    // ----- tokens

    /// Runs `ridgectl` in the hub with the lab's scheduler, CA and admin
    /// token; returns stdout.
    pub fn ridgectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hub])
            .arg(&self.bins.ridgectl)
            .arg("--scheduler")
            .arg(&self.url)
            .arg("--ca-cert")
            .arg(self.ca_path())
            .args(args)
            .env("RIDGE_ADMIN_TOKEN", &self.admin_token)
            .stdin(Stdio::null())
            .output()
            .context("running ridgectl")?;
        ensure!(
            out.status.success(),
            "ridgectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ridgectl tokens create`: returns the token secret. `ttl` is a
    /// duration such as `1h` or `1s`. The lab's `trust_domain` label is set.
    pub fn create_bootstrap_token(
        &self,
        region: &str,
        ttl: &str,
        max_uses: u32,
        description: &str,
    ) -> Result<String> {
        let uses = max_uses.to_string();
        let label = self
            .config
            .trust_domain
            .as_ref()
            .map(|t| format!("trust_domain={t}"));
        let mut args = vec![
            "--json",
            "tokens",
            "create",
            "--region",
            region,
            "--ttl",
            ttl,
            "--max-uses",
            &uses,
            "--description",
            description,
        ];
        if let Some(l) = &label {
            args.extend(["--label", l.as_str()]);
        }
        let out = self.ridgectl(&args)?;
        let v: Value = serde_json::from_str(&out).with_context(|| format!("ridgectl: {out}"))?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no token in {out}"))
    }

    /// Runs a fresh `ridge-agent` in the hub with bootstrap token `token`
    /// (through `RIDGE_BOOTSTRAP_TOKEN`) and a new state directory, with no
    /// dataplane; waits for it to exit, at most `limit` (then it is killed:
    /// the token was accepted).
    pub fn enroll_agent_once(&self, token: &str, limit: Duration) -> Result<AgentRun> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self
            .dir
            .join(format!("enroll-{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("agent.log");
        let args: Vec<String> = vec![
            "--scheduler".into(),
            self.url.clone(),
            "--scheduler-ca".into(),
            self.ca_path().display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--cmdline-path".into(),
            dir.join("no-cmdline").display().to_string(),
            "--control-socket".into(),
            String::new(),
            "--metrics-listen".into(),
            String::new(),
            "--probe-listen".into(),
            "127.0.0.1:0".into(),
            "--media-address".into(),
            format!("{HUB_IP}:{MEDIA_PORT}"),
        ];
        let mut child = spawn_in(
            &self.hub,
            &self.bins.agent,
            &args,
            &[("RIDGE_BOOTSTRAP_TOKEN", token)],
            &log,
        )?;
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Some(st) = child.try_wait()? {
                break st.code();
            }
            if Instant::now() > deadline {
                signal(&child, libc::SIGTERM);
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(AgentRun {
            code,
            output: read_log(&log),
        })
    }

    /// The node's desired state as the scheduler serves it to the node
    /// (with its `dataplane_secret` and link keys), fetched with the node's
    /// own credential from its agent's `identity.json`.
    pub fn scheduler_desired(&self, node: &str) -> Result<DesiredState> {
        let n = self.node(node)?;
        let path = n.dir.join("agent/identity.json");
        let id: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        let (node_id, token) = (
            id["node_id"]
                .as_str()
                .context("identity: node_id")?
                .to_owned(),
            id["node_token"]
                .as_str()
                .context("identity: node_token")?
                .to_owned(),
        );
        let c = self.client();
        let r = self.block_on(async move {
            let path = format!("/v1/nodes/{node_id}/desired?since=0&wait=0");
            tokio::time::timeout(CALL_LIMIT, c.get(&path, Some(&token)))
                .await
                .map_err(|_| anyhow!("GET {path}: no answer within {CALL_LIMIT:?}"))?
                .map_err(anyhow::Error::from)
        })?;
        ensure!(
            r.status.as_u16() == 200,
            "desired state of {node}: {} {}",
            r.status.as_u16(),
            r.body
        );
        serde_json::from_str(&r.body).context("desired state")
    }

    /// An access token valid on `node` for `room`, signed exactly as the
    /// scheduler's dispatch signs it: HS256 with the node's
    /// `dataplane_secret` from its desired state (docs/scheduler-api.md §4).
    /// Dispatch itself picks the node by load, which on one machine is a
    /// coin toss; use [`MeshLab::dispatch`] to exercise it. Waits until the
    /// node's dataplane holds that secret.
    /// The node's dataplane `/metrics` (an operator token minted with its
    /// `dataplane_secret`).
    pub fn node_metrics(&self, node: &str) -> Result<String> {
        let secret = self
            .scheduler_desired(node)?
            .dataplane_secret
            .context("the scheduler's desired state has no dataplane_secret")?;
        let token = ridge_dataplane::auth::mint(
            &Secret::new(secret),
            "*",
            "operator",
            false,
            false,
            true,
            Duration::from_secs(600),
            unix_now(),
        )?;
        let (status, body) = self.node_request(node, "GET", "/metrics", Some(&token), None)?;
        ensure!(status == 200, "GET /metrics on {node}: {status} {body}");
        Ok(body)
    }

    pub fn dispatch_token(
        &self,
        node: &str,
        room: &str,
        identity: &str,
        publish: bool,
        subscribe: bool,
    ) -> Result<String> {
        let secret = eventually(
            &format!("a desired state for {node}"),
            Duration::from_secs(20),
            || {
                Ok(self
                    .scheduler_desired(node)
                    .ok()
                    .and_then(|d| d.dataplane_secret))
            },
        )?;
        eventually(
            &format!("{node}'s dataplane to hold its dataplane_secret"),
            Duration::from_secs(20),
            || {
                Ok(self
                    .held_desired(node)?
                    .filter(|d| d["dataplane_secret_set"] == true)
                    .map(drop))
            },
        )?;
        ridge_dataplane::auth::mint(
            &Secret::new(secret),
            room,
            identity,
            publish,
            subscribe,
            false,
            Duration::from_secs(3600),
            unix_now(),
        )
        .map_err(|e| anyhow!("minting an access token: {e}"))
    }

    /// `GET /v1/dispatch` (admin token); `region` steers it to a region
    /// (each lab node has its own, `lab-<name>`).
    pub fn dispatch(
        &self,
        room: &str,
        identity: &str,
        publish: bool,
        subscribe: bool,
        region: Option<&str>,
    ) -> Result<DispatchResponse> {
        let mut q = format!(
            "/v1/dispatch?room={room}&identity={identity}&publish={publish}&subscribe={subscribe}"
        );
        if let Some(r) = region {
            q.push_str(&format!("&region={r}"));
        }
        self.api_json(&q)
    }

    // ----- nodes' own APIs

    /// `GET /v1/desired` on the node's control socket: what its dataplane
    /// holds (`None`: nothing applied since it started).
    pub fn held_desired(&self, node: &str) -> Result<Option<Value>> {
        let (status, body) =
            control_request(&self.control_socket(node)?, "GET", "/v1/desired", None)?;
        match status {
            200 => Ok(Some(serde_json::from_str(&body)?)),
            404 => Ok(None),
            s => bail!("GET /v1/desired on {node}: {s} {body}"),
        }
    }

    /// `GET /v1/status` on the node's control socket.
    pub fn dataplane_status(&self, node: &str) -> Result<Value> {
        let (status, body) =
            control_request(&self.control_socket(node)?, "GET", "/v1/status", None)?;
        ensure!(status == 200, "GET /v1/status on {node}: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// One HTTP request to the node's HTTP API, made from the hub; `token`
    /// goes in `Authorization: Bearer`.
    pub fn node_request(
        &self,
        node: &str,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, String)> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.node(node)?.ctl_ip, HTTP_PORT));
        let auth = token.map(|t| format!("Bearer {t}"));
        let body = body.map(Value::to_string);
        self.in_hub(|| -> Result<(u16, String)> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut headers = Vec::new();
            if let Some(a) = &auth {
                headers.push(("Authorization", a.as_str()));
            }
            http_exchange(
                s,
                &addr.to_string(),
                method,
                path,
                &headers,
                body.as_deref(),
            )
        })?
    }

    /// `POST /v1/rooms/{room}/rtp` on `node` (docs/api.md): a plain-RTP
    /// endpoint for `remote`. Returns the `201` body.
    #[allow(
        clippy::too_many_arguments,
        reason = "the endpoint's fields, spelled out"
    )]
    pub fn rtp_endpoint(
        &self,
        node: &str,
        room: &str,
        token: &str,
        direction: &str,
        kind: &str,
        remote: SocketAddr,
        payload_type: u8,
        ssrc: Option<u32>,
    ) -> Result<Value> {
        let mut body = json!({
            "direction": direction,
            "kind": kind,
            "remote": remote.to_string(),
            "payload_type": payload_type,
        });
        if let Some(s) = ssrc {
            body["ssrc"] = s.into();
        }
        self.rtp_endpoint_with(node, room, token, &body)
    }

    /// `POST /v1/rooms/{room}/rtp` on `node` with `body` as it is.
    pub fn rtp_endpoint_with(
        &self,
        node: &str,
        room: &str,
        token: &str,
        body: &Value,
    ) -> Result<Value> {
        let (status, text) = self.node_request(
            node,
            "POST",
            &format!("/v1/rooms/{room}/rtp"),
            Some(token),
            Some(body),
        )?;
        ensure!(
            status == 201,
            "POST /v1/rooms/{room}/rtp on {node}: {status} {text}"
        );
        Ok(serde_json::from_str(&text)?)
    }

    /// A plain-RTP publisher on `publisher` and a plain-RTP subscriber on
    /// `subscriber`, both in `room`, with their clients in the hub:
    /// [`PlainRtpPair::send`] numbers packets, the receiver collects them.
    pub fn plain_rtp_pair(
        &self,
        room: &str,
        publisher: &str,
        subscriber: &str,
    ) -> Result<PlainRtpPair> {
        self.plain_rtp_pair_in(room, publisher, subscriber, "vp8")
    }

    /// [`MeshLab::plain_rtp_pair`] with a stream in `codec` ("vp8" or
    /// "h264"), both endpoints naming it.
    pub fn plain_rtp_pair_in(
        &self,
        room: &str,
        publisher: &str,
        subscriber: &str,
        codec: &str,
    ) -> Result<PlainRtpPair> {
        let ssrc = 0x1ab0_0001;
        let mut sender = RtpSender::bind(self, ssrc, RTP_PT)?;
        sender.h264 = codec == "h264";
        let receiver = RtpReceiver::bind(self)?;
        let pub_token = self.dispatch_token(publisher, room, "lab-publisher", true, false)?;
        let sub_token = self.dispatch_token(subscriber, room, "lab-subscriber", false, true)?;
        let endpoint = |direction: &str, remote: SocketAddr| {
            json!({"direction": direction, "kind": "video", "codec": codec,
                "remote": remote.to_string(), "payload_type": RTP_PT})
        };
        let mut publish = endpoint("publish", sender.local_addr());
        publish["ssrc"] = ssrc.into();
        let publisher_endpoint = self.rtp_endpoint_with(publisher, room, &pub_token, &publish)?;
        let subscriber_endpoint = self.rtp_endpoint_with(
            subscriber,
            room,
            &sub_token,
            &endpoint("subscribe", receiver.local_addr()),
        )?;
        Ok(PlainRtpPair {
            target: self.node_media(publisher)?,
            sender,
            receiver,
            publisher: publisher_endpoint,
            subscriber: subscriber_endpoint,
        })
    }

    // ----- faults

    /// SIGKILLs `node`'s dataplane and agent.
    pub fn kill(&mut self, node: &str) -> Result<()> {
        let n = self.node_mut(node)?;
        stop_child(&mut n.agent, None);
        stop_child(&mut n.dataplane, None);
        Ok(())
    }

    /// Starts `node`'s dataplane and agent again (after [`MeshLab::kill`]);
    /// the agent reuses its stored identity.
    pub fn start_node(&mut self, node: &str) -> Result<()> {
        ensure!(
            self.node(node)?.agent.is_none() && self.node(node)?.dataplane.is_none(),
            "{node} is running"
        );
        let seen = read_log(&self.node(node)?.agent_log())
            .lines()
            .filter(|l| l.starts_with("ridge-agent running: node "))
            .count();
        self.spawn_dataplane(node)?;
        self.wait_dataplane(node)?;
        self.spawn_agent(node)?;
        self.wait_agent(node, seen)
    }

    /// Stops the scheduler (SIGTERM, its drain) and starts it again on the
    /// same database and address; returns once it answers `/healthz`.
    pub fn restart_scheduler(&mut self) -> Result<()> {
        let code = stop_child(&mut self.scheduler, Some(Duration::from_secs(10)));
        ensure!(
            code == Some(0),
            "ridge-scheduler did not exit cleanly on SIGTERM ({code:?}):\n{}",
            tail(&self.scheduler_log(), 40)
        );
        self.spawn_scheduler()?;
        self.wait_scheduler()
    }
}

fn humantime_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "mesh lab {} failed; last log lines:\n{}",
                self.dir.display(),
                self.log_tails(25)
            );
        }
        for n in &mut self.nodes {
            stop_child(&mut n.agent, None);
            stop_child(&mut n.dataplane, None);
        }
        stop_child(&mut self.scheduler, None);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        for ns in self.namespaces.iter().rev() {
            remove_netns(ns);
        }
        if self.keep {
            let _ = writeln!(
                std::io::stderr(),
                "RIDGE_MESH_KEEP=1: kept {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ----- plain RTP clients -----------------------------------------------------------

/// A VP8 RTP packet of at least `len` bytes: a 12-byte header, a VP8
/// payload descriptor (a keyframe when `keyframe`), the packet's `index`
/// (u32, big-endian), then a filler that differs per index. The index
/// survives the relay's sequence-number and SSRC rewriting, so a receiver
/// can tell which packets arrived.
pub fn rtp_packet(
    ssrc: u32,
    pt: u8,
    seq: u16,
    index: u32,
    (keyframe, h264): (bool, bool),
    len: usize,
) -> Vec<u8> {
    let mut p = vec![0x80, pt & 0x7f];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&index.wrapping_mul(3000).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    // Five bytes of payload header: VP8's descriptor and frame tag, or an
    // H.264 IDR or non-IDR slice as a single NAL unit.
    let header: [u8; 5] = match (h264, keyframe) {
        (false, key) => [0x10, if key { 0x00 } else { 0x01 }, 0x9d, 0x01, 0x2a],
        (true, true) => [0x65, 0x88, 0x84, 0x21, 0xa0],
        (true, false) => [0x41, 0x9a, 0x02, 0x21, 0xa0],
    };
    p.extend_from_slice(&header);
    p.extend_from_slice(&index.to_be_bytes());
    let fill = (index as u8) ^ 0x5a;
    while p.len() < len {
        p.push(fill.wrapping_add(p.len() as u8));
    }
    p
}

/// One received RTP packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload_type: u8,
    /// The sender's packet index ([`rtp_packet`]) when the payload has one.
    pub index: Option<u32>,
    /// The payload's first byte (VP8 descriptor, H.264 NAL header).
    pub payload_head: Option<u8>,
    pub len: usize,
    pub at: Instant,
}

/// Parses an RTP packet as [`rtp_packet`] builds it (no CSRCs or header
/// extension are expected; RTCP is refused).
pub fn parse_rtp(buf: &[u8], at: Instant) -> Option<Received> {
    if buf.len() < 12 || buf[0] >> 6 != 2 {
        return None;
    }
    let pt = buf[1] & 0x7f;
    if (72..=79).contains(&pt) {
        return None; // RTCP
    }
    let cc = usize::from(buf[0] & 0x0f);
    let mut off = 12 + 4 * cc;
    if buf[0] & 0x10 != 0 && buf.len() >= off + 4 {
        let words = usize::from(u16::from_be_bytes([buf[off + 2], buf[off + 3]]));
        off += 4 + 4 * words;
    }
    let index = buf
        .get(off + 5..off + 9)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    Some(Received {
        seq: u16::from_be_bytes([buf[2], buf[3]]),
        timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        payload_type: pt,
        index,
        payload_head: buf.get(off).copied(),
        len: buf.len(),
        at,
    })
}

/// A plain-RTP publisher's client: a UDP socket in the hub (on
/// [`HUB_IP`]) that sends numbered packets.
#[derive(Debug)]
pub struct RtpSender {
    sock: UdpSocket,
    ssrc: u32,
    pt: u8,
    next_index: u32,
    seq: u16,
    /// H.264 payloads instead of VP8.
    pub h264: bool,
}

impl RtpSender {
    /// Binds `HUB_IP:0` in the lab's hub.
    pub fn bind(lab: &MeshLab, ssrc: u32, pt: u8) -> Result<RtpSender> {
        let sock = lab.in_hub(|| UdpSocket::bind((HUB_IP, 0)))??;
        Ok(RtpSender {
            sock,
            ssrc,
            pt,
            next_index: 0,
            seq: 1000,
            h264: false,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("bound socket")
    }

    /// The next packet's index (how many were sent).
    pub fn sent(&self) -> u32 {
        self.next_index
    }

    /// Sends `count` packets to `to`, `interval` apart, indices continuing
    /// from the last call; every 30th (and the first) is a keyframe.
    pub fn send(&mut self, to: SocketAddr, count: u32, interval: Duration) -> Result<()> {
        self.send_sized(to, count, interval, 200)
    }

    /// [`RtpSender::send`] with `len`-byte packets.
    pub fn send_sized(
        &mut self,
        to: SocketAddr,
        count: u32,
        interval: Duration,
        len: usize,
    ) -> Result<()> {
        for _ in 0..count {
            let i = self.next_index;
            let p = rtp_packet(
                self.ssrc,
                self.pt,
                self.seq,
                i,
                (i.is_multiple_of(30), self.h264),
                len,
            );
            self.sock
                .send_to(&p, to)
                .with_context(|| format!("sending RTP to {to}"))?;
            self.next_index += 1;
            self.seq = self.seq.wrapping_add(1);
            if !interval.is_zero() {
                std::thread::sleep(interval);
            }
        }
        Ok(())
    }
}

/// A plain-RTP subscriber's client: a UDP socket in the hub whose thread
/// records every RTP packet with its arrival time.
#[derive(Debug)]
pub struct RtpReceiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RtpReceiver {
    /// Binds `HUB_IP:0` in the lab's hub and starts receiving.
    pub fn bind(lab: &MeshLab) -> Result<RtpReceiver> {
        let sock = lab.in_hub(|| UdpSocket::bind((HUB_IP, 0)))??;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mesh-lab-rtp-rx".into())
            .spawn(move || {
                let mut buf = vec![0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = sock.recv_from(&mut buf)
                        && let Some(r) = parse_rtp(&buf[..n], Instant::now())
                    {
                        g.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    }
                }
            })?;
        Ok(RtpReceiver {
            addr,
            got,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `n` packets arrived or `limit` passes; returns
    /// what arrived.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for RtpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A plain-RTP publisher endpoint on one node and a subscriber endpoint on
/// another, with their hub clients ([`MeshLab::plain_rtp_pair`]).
#[derive(Debug)]
pub struct PlainRtpPair {
    pub sender: RtpSender,
    pub receiver: RtpReceiver,
    /// Where the sender sends: the publisher node's media address.
    pub target: SocketAddr,
    /// The publisher endpoint's `201` body (`id`, `local`, `ssrc`, `track`).
    pub publisher: Value,
    /// The subscriber endpoint's `201` body.
    pub subscriber: Value,
}

impl PlainRtpPair {
    /// Sends `count` numbered packets to the publisher node.
    pub fn send(&mut self, count: u32, interval: Duration) -> Result<()> {
        self.sender.send(self.target, count, interval)
    }

    /// The distinct packet indices the subscriber received.
    pub fn received_indices(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .receiver
            .received()
            .iter()
            .filter_map(|r| r.index)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
