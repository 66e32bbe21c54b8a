//! `mesh-loss`: how well mesh links repair random loss over three hops.
//!
//! Four `ridge-dataplane` nodes in a chain, each in its own network
//! namespace, and a hub namespace for the benchmark's clients:
//!
//! ```text
//!   hub: publisher 10.81.0.1                         subscriber 10.81.0.5
//!          | hub-a                                          | hub-d
//!          | (no loss)                                      | (no loss)
//!   A 10.81.2.1 ==a-b/b-a== B 10.81.2.2 ==b-c/c-b== C 10.81.2.3 ==c-d/d-c== D 10.81.2.4
//!          10.81.1.0/30            10.81.1.4/30            10.81.1.8/30
//! ```
//!
//! Each node's media socket is bound to its own /32 on `lo` (its "media
//! address"), reached by its neighbours through static routes over the
//! point-to-point veths (/30s) between them. Every mesh veth end drops UDP
//! at random on egress (`ridge_ebpf::Impairment`), so each link loses
//! `--loss` in each direction; the hub's veths are not impaired.
//!
//! Each node gets its desired state (links to its neighbours with a random
//! key per link, trusted; the route of room `bench` from source A) on its
//! control socket. A plain-RTP publisher sends into A and a plain-RTP
//! subscriber receives from D. Per run: the nodes are started, warmed up
//! until the subscriber receives (so the start-up before the first
//! keyframe is left out), then one measured send of `--duration` followed
//! by an uncounted 0.5 s tail (gap-based NACKs cannot repair the last
//! packets of a stream that stops). Packets of the window are counted from
//! the lowest one that arrived; every node's `/metrics` and every
//! impairment's counters are read before and after the measured send.
//!
//! Runs: a control at loss 0, then hop-by-hop and end-to-end recovery
//! (`--mesh-recovery`) at `--loss`, and hop-by-hop with FEC on every link
//! (`"fec": true` in the desired states: FlexFEC for the video stream),
//! with fresh nodes for each.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ridge_ebpf::{ImpairCounters, Impairment, TcDirection};
use serde::Serialize;

use crate::common::{self, Netns};
use crate::node::{self, HttpResponse};
use crate::report::{self, MeshLossReport};
use crate::stats::Latency;
use crate::traffic::{self, Publisher, Receiver};

/// `--rate` when not given.
pub const DEFAULT_RATE: f64 = 500.0;
/// The publisher sends a VP8 keyframe every this many packets; the node
/// starts a plain subscriber only at a keyframe.
pub const KEYFRAME_INTERVAL: u64 = 30;
/// A packet counts as on time when it arrives within this of being sent.
pub const DEADLINE: Duration = Duration::from_millis(200);
/// The chain's nodes, source first.
const NODES: [&str; 4] = ["A", "B", "C", "D"];
/// Mesh links between neighbours (the route's hops).
pub const HOPS: usize = NODES.len() - 1;
const ROOM: &str = "bench";
const MEDIA_PORT: u16 = 5004;
/// Every node's HTTP API, on loopback inside its own namespace.
const HTTP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const PUBLISHER_IP: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 1);
const SUBSCRIBER_IP: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 5);
/// How long the subscriber keeps listening after the publisher stops:
/// longer than the nodes' NACK give-up time (1 s), so late repairs count
/// as late, not lost.
const GRACE: Duration = Duration::from_millis(1500);
/// The publisher keeps sending this long after the measured window (those
/// packets are not counted): a NACKing receiver notices a loss only when a
/// later packet arrives, so the last packets of a stream that stops could
/// never be repaired, which a live stream does not do.
const TAIL: Duration = Duration::from_millis(500);
/// Warm-up sends of 1 s until the subscriber receives something.
const WARMUP_ATTEMPTS: u32 = 15;
/// Missing sequence numbers kept per run in the JSON, for diagnosis.
const MISSING_KEPT: usize = 100;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Packets/s the publisher sends.
    pub rate: f64,
    /// Datagram size, RTP header included.
    pub size: usize,
    /// Length of each measured send.
    pub duration: Duration,
    /// Loss per mesh link and direction, parts per million.
    pub loss_ppm: u32,
    pub node_bin: PathBuf,
    /// The nodes' `--io-backend`.
    pub io_backend: String,
}

/// The nodes' `--mesh-recovery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recovery {
    /// Every hop NACKs its upstream and answers its downstream's NACKs.
    HopByHop,
    /// Only the last node NACKs; its NACKs travel to the source node.
    EndToEnd,
}

impl Recovery {
    pub fn as_str(self) -> &'static str {
        match self {
            Recovery::HopByHop => "hop-by-hop",
            Recovery::EndToEnd => "end-to-end",
        }
    }
}

/// Counters of one mesh link as one node sees it (`ridge_mesh_*{peer}`),
/// over the measured send.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkCounters {
    pub peer: String,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Sequence numbers this node NACKed to the peer.
    pub nacks_sent: u64,
    /// Sequence numbers the peer NACKed to this node.
    pub nacks_received: u64,
    /// Packets this node resent to the peer.
    pub retransmits: u64,
    /// Packets from the peer that arrived after being missed.
    pub recovered: u64,
    /// Packets from the peer this node gave up on.
    pub unrecovered: u64,
    pub auth_failures: u64,
    /// FlexFEC repair packets this node sent to the peer.
    pub fec_sent: u64,
    /// Packets from the peer rebuilt from FEC (never NACKed).
    pub fec_recovered: u64,
    /// `ridge_mesh_nack_rtt_seconds` at the end, in ms.
    pub nack_rtt_ms: Option<f64>,
}

/// One node's counters over the measured send.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeCounters {
    pub node: String,
    pub links: Vec<LinkCounters>,
    /// `ridge_retransmit_misses` plus the links' `ridge_mesh_nack_misses`:
    /// NACKed packets not (or no longer, or not yet) in a retransmission
    /// buffer.
    pub retransmit_misses: u64,
    /// `ridge_packets_lost`: sequence gaps seen on the way in.
    pub packets_lost: u64,
    /// `ridge_packets_dropped{reason}`, non-zero reasons only.
    pub dropped: BTreeMap<String, u64>,
}

impl NodeCounters {
    pub fn link(&self, peer: &str) -> Option<&LinkCounters> {
        self.links.iter().find(|l| l.peer == peer)
    }
}

/// One impaired direction of a mesh link, over the measured send.
#[derive(Debug, Clone, Serialize)]
pub struct LinkLoss {
    pub from: String,
    pub to: String,
    pub passed: u64,
    pub dropped: u64,
    pub loss_pct: f64,
}

/// Sums over every node's links.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MeshTotals {
    pub nacks_sent: u64,
    pub fec_sent: u64,
    pub fec_recovered: u64,
    pub nacks_received: u64,
    pub retransmits: u64,
    pub recovered: u64,
    pub unrecovered: u64,
    pub retransmit_misses: u64,
    pub auth_failures: u64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MeshRun {
    /// "control", "hop-by-hop", "hop-by-hop+fec" or "end-to-end".
    pub name: String,
    pub recovery: Recovery,
    /// The links sent FEC (`fec` in the desired states).
    pub fec: bool,
    /// Whether the nodes were started with `--mesh-recovery` (older
    /// binaries only have hop-by-hop and no flag).
    pub recovery_flag: bool,
    pub loss_ppm: u32,
    pub hops: usize,
    /// Seconds of warm-up sending before the subscriber received.
    pub warmup_s: f64,
    /// Packets sent in the measured window (`--duration`).
    pub sent: u64,
    /// Packets sent after the window ([`TAIL`]), not counted.
    pub tail_sent: u64,
    /// Rate achieved over window and tail.
    pub sent_pps: f64,
    /// The lowest sequence number of the window that arrived (normally 0:
    /// the warm-up has already started the subscriber); packets before it
    /// are not counted.
    pub first_received_seq: Option<u64>,
    /// Packets counted: those of the window from `first_received_seq` on.
    pub counted: u64,
    /// Counted packets that arrived (once or more).
    pub delivered: u64,
    pub delivered_pct: f64,
    /// Counted packets that arrived within [`DEADLINE`] of being sent.
    pub on_time: u64,
    pub on_time_pct: f64,
    /// Second and later copies of a packet.
    pub duplicates: u64,
    /// Latency of each counted packet's first copy.
    pub latency: Latency,
    /// The first missing sequence numbers (at most 100).
    pub missing: Vec<u64>,
    pub totals: MeshTotals,
    pub nodes: Vec<NodeCounters>,
    pub impairment: Vec<LinkLoss>,
    /// Nodes that did not exit within 5 s of SIGTERM after the run and
    /// were killed.
    pub killed_after_sigterm: Vec<String>,
}

/// Runs the scenario and prints (and with `json_path` writes) the report.
pub fn run(opts: &Options, json_path: Option<&Path>, command: String) -> Result<()> {
    if let Err(e) = common::netns_tools() {
        bail!("mesh-loss creates network namespaces, veth pairs and TC BPF programs: {e}");
    }
    if !opts.node_bin.is_file() {
        bail!(
            "node binary {} not found; build it with cargo build --release -p ridge-dataplane \
             (or pass --node-bin PATH)",
            opts.node_bin.display()
        );
    }
    let flag = supports_recovery_flag(&opts.node_bin)?;
    let mut cases = Vec::new();
    if opts.loss_ppm > 0 {
        cases.push(("control", Recovery::HopByHop, 0, false));
    }
    cases.push(("hop-by-hop", Recovery::HopByHop, opts.loss_ppm, false));
    if opts.loss_ppm > 0 {
        cases.push(("hop-by-hop+fec", Recovery::HopByHop, opts.loss_ppm, true));
    }
    let mut skipped = Vec::new();
    if flag {
        cases.push(("end-to-end", Recovery::EndToEnd, opts.loss_ppm, false));
    } else {
        let why = format!(
            "end-to-end: {} has no --mesh-recovery option (a build from before end-to-end \
             recovery); its only mode is hop-by-hop",
            opts.node_bin.display()
        );
        eprintln!("ridge-bench: skipping {why}");
        skipped.push(why);
    }

    let mut report = MeshLossReport::new(opts, command, skipped);
    let mut chain = Chain::build(opts.loss_ppm).context("building the namespaces")?;
    let control_dir = ControlDir::create()?;
    let mut clients = Clients::bind(&chain.hub, opts.rate)?;
    for (name, recovery, loss, fec) in cases {
        eprintln!(
            "ridge-bench: mesh-loss {name}: {} recovery{}, {:.2}% loss per link and direction ...",
            recovery.as_str(),
            if fec { " with FEC" } else { "" },
            f64::from(loss) / 1e4
        );
        let case = Case {
            name,
            recovery,
            flag,
            fec,
            loss_ppm: loss,
        };
        let r = run_case(opts, &mut chain, &control_dir.0, &case, &mut clients)
            .with_context(|| format!("mesh-loss {name}"))?;
        report.runs.push(r);
    }
    drop(chain);
    report::print(&report.render());
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ridge-bench: wrote {}", path.display());
    }
    Ok(())
}

/// Whether the node binary has `--mesh-recovery`.
fn supports_recovery_flag(bin: &Path) -> Result<bool> {
    let out = Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("--mesh-recovery"))
}

/// The media address of node `i` (its /32 on `lo`, port 5004).
fn media_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 81, 2, i as u8 + 1], MEDIA_PORT))
}

/// Address of node `i`'s end of the veth to node `i + 1` (a /30 per link:
/// `.1` on the upstream end, `.2` on the downstream end).
fn link_ip(i: usize, downstream_end: bool) -> Ipv4Addr {
    Ipv4Addr::new(10, 81, 1, (4 * i + 1 + usize::from(downstream_end)) as u8)
}

/// Interface of node `from` towards node `to` (e.g. `b-c`).
fn iface(from: usize, to: usize) -> String {
    format!(
        "{}-{}",
        NODES[from].to_ascii_lowercase(),
        NODES[to].to_ascii_lowercase()
    )
}

// ---- topology ----------------------------------------------------------------

/// One impaired direction: the egress of `from`'s veth towards `to`.
struct LinkImpairment {
    from: usize,
    to: usize,
    imp: Impairment,
}

/// The namespaces, veths, routes and impairments; all removed on drop.
struct Chain {
    /// Declared first so they are detached before the namespaces go.
    impairments: Vec<LinkImpairment>,
    hub: Netns,
    nodes: Vec<Netns>,
}

impl Chain {
    fn build(loss_ppm: u32) -> Result<Chain> {
        let hub = Netns::new("mesh-hub");
        let nodes: Vec<Netns> = NODES
            .iter()
            .map(|n| Netns::new(&format!("mesh-{}", n.to_ascii_lowercase())))
            .collect();
        let last = NODES.len() - 1;
        common::veth(
            &hub,
            "hub-a",
            "10.81.0.1/30",
            &nodes[0],
            "a-hub",
            "10.81.0.2/30",
        );
        common::veth(
            &hub,
            "hub-d",
            "10.81.0.5/30",
            &nodes[last],
            "d-hub",
            "10.81.0.6/30",
        );
        for i in 0..HOPS {
            common::veth(
                &nodes[i],
                &iface(i, i + 1),
                &format!("{}/30", link_ip(i, false)),
                &nodes[i + 1],
                &iface(i + 1, i),
                &format!("{}/30", link_ip(i, true)),
            );
        }
        for (i, ns) in nodes.iter().enumerate() {
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/32", media_addr(i).ip()),
                "dev",
                "lo",
            ]);
            if i > 0 {
                let via = link_ip(i - 1, false).to_string();
                ns.ip(&[
                    "route",
                    "add",
                    &format!("{}/32", media_addr(i - 1).ip()),
                    "via",
                    &via,
                ]);
            }
            if i < last {
                let via = link_ip(i, true).to_string();
                ns.ip(&[
                    "route",
                    "add",
                    &format!("{}/32", media_addr(i + 1).ip()),
                    "via",
                    &via,
                ]);
            }
        }
        hub.ip(&[
            "route",
            "add",
            &format!("{}/32", media_addr(0).ip()),
            "via",
            "10.81.0.2",
        ]);
        hub.ip(&[
            "route",
            "add",
            &format!("{}/32", media_addr(last).ip()),
            "via",
            "10.81.0.6",
        ]);
        let mut impairments = Vec::with_capacity(2 * HOPS);
        for i in 0..HOPS {
            for (from, to) in [(i, i + 1), (i + 1, i)] {
                let name = iface(from, to);
                let imp = nodes[from]
                    .enter(|| Impairment::attach(&name, TcDirection::Egress, loss_ppm))
                    .with_context(|| format!("attaching the impairment to {name}"))?;
                impairments.push(LinkImpairment { from, to, imp });
            }
        }
        Ok(Chain {
            impairments,
            hub,
            nodes,
        })
    }

    fn set_loss(&mut self, ppm: u32) -> Result<()> {
        for l in &mut self.impairments {
            l.imp.set_loss_ppm(ppm)?;
        }
        Ok(())
    }

    fn impairment_counters(&self) -> Result<Vec<ImpairCounters>> {
        self.impairments
            .iter()
            .map(|l| l.imp.counters().map_err(anyhow::Error::from))
            .collect()
    }
}

/// The publisher and the subscriber, on sockets in the hub namespace,
/// kept for every run (the RTP stream continues across runs; each run's
/// nodes are fresh).
struct Clients {
    publisher: Publisher,
    publisher_addr: SocketAddr,
    /// The subscriber socket (a `Vec` for [`Receiver`]).
    subscriber: Vec<UdpSocket>,
    subscriber_addr: SocketAddr,
    /// The send/receive clock.
    base: Instant,
    next_run: u32,
}

impl Clients {
    fn bind(hub: &Netns, rate: f64) -> Result<Clients> {
        let (publisher, subscriber) = hub.enter(|| -> Result<(UdpSocket, UdpSocket)> {
            Ok((
                traffic::bind(SocketAddr::from((PUBLISHER_IP, 0)))
                    .context("binding the publisher socket")?,
                traffic::bind(SocketAddr::from((SUBSCRIBER_IP, 0)))
                    .context("binding the subscriber socket")?,
            ))
        })?;
        let publisher_addr = publisher.local_addr()?;
        let subscriber_addr = subscriber.local_addr()?;
        // One packet per send (its own send time) up to 2000 pps.
        let batch = (rate / 2000.0).ceil() as usize;
        Ok(Clients {
            publisher: Publisher::new(publisher, media_addr(0))?
                .with_keyframe_interval(KEYFRAME_INTERVAL)
                .with_batch(batch),
            publisher_addr,
            subscriber: vec![subscriber],
            subscriber_addr,
            base: Instant::now(),
            next_run: 1,
        })
    }

    /// Sends run `run` for `duration` at `opts`' rate and size, receiving
    /// until [`GRACE`] after the send (`record`: every arrival's sequence
    /// number and latency).
    fn exchange(
        &mut self,
        opts: &Options,
        duration: Duration,
        grace: Duration,
        record: bool,
    ) -> Result<(traffic::SendReport, traffic::RecvReport)> {
        let run = self.next_run;
        self.next_run += 1;
        let socks = std::mem::take(&mut self.subscriber);
        let receiver = if record {
            Receiver::recording(socks, self.base, run)
        } else {
            Receiver::start(socks, self.base, run, 1)
        };
        let sent = self
            .publisher
            .send(self.base, run, Some(opts.rate), opts.size, duration);
        std::thread::sleep(grace);
        let (socks, rep) = receiver.finish().context("receiving")?;
        self.subscriber = socks;
        Ok((sent.context("sending")?, rep))
    }
}

/// A private directory for the control sockets, removed on drop.
struct ControlDir(PathBuf);

impl ControlDir {
    fn create() -> Result<ControlDir> {
        let dir = std::env::temp_dir().join(format!("ridge-mesh-loss-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ControlDir(dir))
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- nodes -------------------------------------------------------------------

/// A `ridge-dataplane` running in a node namespace; stopped on drop.
struct MeshNode {
    index: usize,
    child: Child,
    control: PathBuf,
}

impl MeshNode {
    fn start(
        opts: &Options,
        ns: &Netns,
        index: usize,
        control_dir: &Path,
        recovery: Option<Recovery>,
    ) -> Result<MeshNode> {
        let control = control_dir.join(format!("{}.sock", NODES[index]));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&opts.node_bin)
            .args(["--http", &HTTP.to_string()])
            .args(["--udp", &media_addr(index).to_string()])
            .args(["--shards", "1", "--no-pin-cores", "--xdp", "off"])
            .args(["--io-backend", &opts.io_backend])
            // The lab's plain subscribers receive without a consent packet.
            .args(["--rtp-trusted-network", "10.81.0.0/16"])
            .arg("--dev-no-auth")
            .arg("--control-socket")
            .arg(&control)
            .args(["--log", "warn", "--drain-timeout", "1s"]);
        if let Some(r) = recovery {
            cmd.args(["--mesh-recovery", r.as_str()]);
        }
        // `ip netns exec` execs the node in place: the child's pid is the
        // node's.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting node {} ({})", NODES[index], ns.name))?;
        let mut node = MeshNode {
            index,
            child,
            control,
        };
        node.wait_ready(ns, Duration::from_secs(15))?;
        Ok(node)
    }

    fn wait_ready(&mut self, ns: &Netns, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "node {} exited during start-up: {status}",
                    NODES[self.index]
                );
            }
            let control = node::http_request_unix(&self.control, "GET", "/v1/status", "")
                .is_ok_and(|r| r.status == 200);
            if control
                && ns
                    .enter(|| TcpStream::connect_timeout(&HTTP, Duration::from_millis(200)).is_ok())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not open its control socket and HTTP port within {timeout:?}",
                    NODES[self.index]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PUTs this node's desired state and checks that all of it applies.
    fn put_desired(&self, doc: &serde_json::Value) -> Result<()> {
        let r = node::http_request_unix(&self.control, "PUT", "/v1/desired", &doc.to_string())?;
        ensure!(
            r.status == 200,
            "PUT /v1/desired on {} answered {}: {}",
            NODES[self.index],
            r.status,
            r.body
        );
        let v: serde_json::Value =
            serde_json::from_str(&r.body).context("PUT /v1/desired answer")?;
        let not_applied = v["not_applied"].as_array().cloned().unwrap_or_default();
        ensure!(
            not_applied.is_empty(),
            "node {} did not apply all of its desired state: {not_applied:?}",
            NODES[self.index]
        );
        Ok(())
    }

    fn status(&self) -> String {
        match node::http_request_unix(&self.control, "GET", "/v1/status", "") {
            Ok(r) => r.body,
            Err(e) => format!("({e:#})"),
        }
    }
}

/// How long stopping nodes wait after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// SIGTERMs every node at once and waits up to [`STOP_TIMEOUT`]; nodes
/// still running then are killed. Returns the ids of those killed.
fn stop_all(mut nodes: Vec<MeshNode>) -> Result<Vec<String>> {
    for n in &mut nodes {
        if n.child.try_wait()?.is_none() {
            crate::mmsg::sigterm(n.child.id())
                .with_context(|| format!("sending SIGTERM to node {}", NODES[n.index]))?;
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut killed = Vec::new();
    for n in &mut nodes {
        loop {
            if n.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                n.child.kill()?;
                n.child.wait()?;
                killed.push(NODES[n.index].to_string());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(killed)
}

impl Drop for MeshNode {
    /// On an error path: no drain, just gone.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP request to a node's API, from inside its namespace (dev-no-auth:
/// no token).
fn node_http(ns: &Netns, method: &str, path: &str, body: &str) -> Result<HttpResponse> {
    ns.enter(|| node::http_request(HTTP, method, path, None, body))
}

/// A random 32-byte link key as 64 hex digits.
fn random_key() -> String {
    let key: [u8; 32] = rand::random();
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Node `i`'s desired state: links to its neighbours (`keys[k]` is the key
/// of the link between nodes `k` and `k + 1`), with FEC when `fec`, and the
/// route of the room from source A down the chain.
fn desired_state(i: usize, keys: &[String], fec: bool) -> serde_json::Value {
    let link = |peer: usize, key: &str| {
        let mut l = serde_json::json!({
            "peer": NODES[peer],
            "address": media_addr(peer).to_string(),
            "key": key,
            "trusted": true,
        });
        // Only when on: a node that predates FEC refuses the field.
        if fec {
            l["fec"] = serde_json::Value::Bool(true);
        }
        l
    };
    let mut links = Vec::new();
    if i > 0 {
        links.push(link(i - 1, &keys[i - 1]));
    }
    if i < HOPS {
        links.push(link(i + 1, &keys[i]));
    }
    let upstream = (i > 0).then(|| NODES[i - 1]);
    let downstream: Vec<&str> = (i < HOPS).then(|| NODES[i + 1]).into_iter().collect();
    serde_json::json!({
        "node_id": NODES[i],
        "version": 1,
        "links": links,
        "routes": [{
            "room": ROOM,
            "source": NODES[0],
            "upstream": upstream,
            "downstream": downstream,
        }],
    })
}

/// Creates a plain-RTP video endpoint for `remote`; returns the node's
/// media address for it.
fn create_endpoint(ns: &Netns, direction: &str, remote: SocketAddr) -> Result<SocketAddr> {
    let body = serde_json::json!({
        "direction": direction,
        "kind": "video",
        "remote": remote.to_string(),
        "payload_type": crate::packet::PAYLOAD_TYPE,
        "ssrc": crate::packet::SSRC,
    })
    .to_string();
    let path = format!("/v1/rooms/{ROOM}/rtp");
    let r = node_http(ns, "POST", &path, &body)?;
    node::endpoint_local(&path, direction, &r)
}

// ---- metrics -----------------------------------------------------------------

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the samples of a Prometheus text exposition (comments and
/// malformed lines are skipped).
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let Some(body) = rest.strip_suffix('}') else {
                    continue;
                };
                (name, parse_labels(body))
            }
            None => (series, Vec::new()),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// `k="v",k2="v2"` (with `\"`, `\\` and `\n` escapes in values).
fn parse_labels(body: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = body;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, e)) => value.push(e),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &after[end..];
    }
    labels
}

/// Raw counter values of one node at one moment.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// (peer, field) → value of `ridge_mesh_<field>{peer}`.
    mesh: BTreeMap<(String, String), f64>,
    /// `ridge_<name>` without labels, and `ridge_packets_dropped` by reason
    /// as `packets_dropped/<reason>`.
    node: BTreeMap<String, f64>,
}

impl Snapshot {
    fn from_metrics(text: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for m in parse_metrics(text) {
            let name = m.name.strip_suffix("_total").unwrap_or(&m.name);
            if let Some(field) = name.strip_prefix("ridge_mesh_") {
                if let Some(peer) = m.label("peer") {
                    s.mesh
                        .insert((peer.to_string(), field.to_string()), m.value);
                }
            } else if name == "ridge_packets_dropped" {
                if let Some(reason) = m.label("reason") {
                    s.node.insert(format!("packets_dropped/{reason}"), m.value);
                }
            } else if let Some(field) = name.strip_prefix("ridge_")
                && m.labels.is_empty()
            {
                s.node.insert(field.to_string(), m.value);
            }
        }
        s
    }

    fn mesh(&self, peer: &str, field: &str) -> f64 {
        self.mesh
            .get(&(peer.to_string(), field.to_string()))
            .copied()
            .unwrap_or(0.0)
    }

    fn node(&self, field: &str) -> f64 {
        self.node.get(field).copied().unwrap_or(0.0)
    }

    /// `after − self` for node `index` (the chain's neighbours are its
    /// peers).
    fn delta(&self, after: &Snapshot, index: usize) -> NodeCounters {
        let d = |a: f64, b: f64| (b - a).max(0.0) as u64;
        let mut peers = Vec::new();
        if index > 0 {
            peers.push(NODES[index - 1]);
        }
        if index < HOPS {
            peers.push(NODES[index + 1]);
        }
        let links = peers
            .into_iter()
            .map(|peer| {
                let f = |field: &str| d(self.mesh(peer, field), after.mesh(peer, field));
                LinkCounters {
                    peer: peer.to_string(),
                    packets_in: f("packets_in"),
                    packets_out: f("packets_out"),
                    nacks_sent: f("nacks_sent"),
                    nacks_received: f("nacks_received"),
                    retransmits: f("retransmits"),
                    recovered: f("recovered"),
                    unrecovered: f("unrecovered"),
                    auth_failures: f("auth_failures"),
                    fec_sent: f("fec_sent"),
                    fec_recovered: f("fec_recovered"),
                    nack_rtt_ms: after
                        .mesh
                        .get(&(peer.to_string(), "nack_rtt_seconds".to_string()))
                        .map(|s| s * 1e3),
                }
            })
            .collect();
        let dropped = after
            .node
            .iter()
            .filter_map(|(k, v)| {
                let reason = k.strip_prefix("packets_dropped/")?;
                let n = d(self.node(k), *v);
                (n > 0).then(|| (reason.to_string(), n))
            })
            .collect();
        NodeCounters {
            node: NODES[index].to_string(),
            links,
            // Mesh links count their misses per link (`nack_misses`):
            // NACKed packets this hop did not hold (yet).
            retransmit_misses: d(
                self.node("retransmit_misses"),
                after.node("retransmit_misses"),
            ) + [index.checked_sub(1), (index < HOPS).then_some(index + 1)]
                .into_iter()
                .flatten()
                .map(|i| {
                    let peer = NODES[i];
                    d(
                        self.mesh(peer, "nack_misses"),
                        after.mesh(peer, "nack_misses"),
                    )
                })
                .sum::<u64>(),
            packets_lost: d(self.node("packets_lost"), after.node("packets_lost")),
            dropped,
        }
    }
}

fn snapshot(chain: &Chain) -> Result<Vec<Snapshot>> {
    chain
        .nodes
        .iter()
        .zip(NODES)
        .map(|(ns, id)| {
            let r = node_http(ns, "GET", "/metrics", "")?;
            ensure!(
                r.status == 200,
                "GET /metrics on {id} answered {}: {}",
                r.status,
                r.body
            );
            Ok(Snapshot::from_metrics(&r.body))
        })
        .collect()
}

// ---- one run -----------------------------------------------------------------

struct Case {
    name: &'static str,
    recovery: Recovery,
    /// Pass `--mesh-recovery` to the nodes.
    flag: bool,
    /// Links send FEC.
    fec: bool,
    loss_ppm: u32,
}

/// Which of the sent packets arrived, and when.
#[derive(Debug, Clone, PartialEq)]
struct Delivery {
    first: Option<u64>,
    counted: u64,
    delivered: u64,
    on_time: u64,
    duplicates: u64,
    /// Latency (ns) of each counted packet's first copy.
    latencies_ns: Vec<u64>,
    missing: Vec<u64>,
}

/// Counts `arrivals` ((sequence number, latency ns) in arrival order) of
/// the packets `0..window`, from the lowest that arrived on; later ones
/// (the tail) are ignored.
fn tally(window: u64, arrivals: &[(u64, u64)], deadline: Duration) -> Delivery {
    let first = arrivals
        .iter()
        .map(|a| a.0)
        .filter(|&seq| seq < window)
        .min();
    let start = first.unwrap_or(window);
    let counted = window - start;
    let mut seen: HashMap<u64, u64> = HashMap::with_capacity(arrivals.len());
    let mut duplicates = 0;
    for &(seq, latency) in arrivals.iter().filter(|a| a.0 < window) {
        match seen.entry(seq) {
            Entry::Occupied(_) => duplicates += 1,
            Entry::Vacant(v) => {
                v.insert(latency);
            }
        }
    }
    let deadline_ns = deadline.as_nanos() as u64;
    let mut latencies_ns = Vec::with_capacity(seen.len());
    let mut missing = Vec::new();
    let mut on_time = 0;
    for seq in start..window {
        match seen.get(&seq) {
            Some(&l) => {
                latencies_ns.push(l);
                if l <= deadline_ns {
                    on_time += 1;
                }
            }
            None if missing.len() < MISSING_KEPT => missing.push(seq),
            None => {}
        }
    }
    Delivery {
        first,
        counted,
        delivered: latencies_ns.len() as u64,
        on_time,
        duplicates,
        latencies_ns,
        missing,
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// One run: fresh nodes, desired states, endpoints, warm-up, the measured
/// send, the counters, and the nodes stopped again.
fn run_case(
    opts: &Options,
    chain: &mut Chain,
    control_dir: &Path,
    case: &Case,
    clients: &mut Clients,
) -> Result<MeshRun> {
    // The impairments stay attached for every run; only their loss changes.
    chain.set_loss(case.loss_ppm)?;
    let recovery_arg = case.flag.then_some(case.recovery);
    let mut nodes = Vec::with_capacity(NODES.len());
    for (i, ns) in chain.nodes.iter().enumerate() {
        nodes.push(MeshNode::start(opts, ns, i, control_dir, recovery_arg)?);
    }
    let keys: Vec<String> = (0..HOPS).map(|_| random_key()).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.put_desired(&desired_state(i, &keys, case.fec))
            .with_context(|| {
                if case.fec {
                    "the node binary may predate mesh FEC (links[].fec)"
                } else {
                    "desired state refused"
                }
            })?;
    }
    let last = NODES.len() - 1;
    let media = create_endpoint(&chain.nodes[0], "publish", clients.publisher_addr)?;
    ensure!(
        media == media_addr(0),
        "A's publish endpoint is at {media}, expected {}",
        media_addr(0)
    );
    create_endpoint(&chain.nodes[last], "subscribe", clients.subscriber_addr)?;

    // Warm-up: until the route is up end to end and D has started the
    // subscriber at a keyframe.
    let warm_start = Instant::now();
    let mut warmed = false;
    for _ in 0..WARMUP_ATTEMPTS {
        let (_, rep) = clients.exchange(
            opts,
            Duration::from_secs(1),
            Duration::from_millis(200),
            false,
        )?;
        if rep.per_socket.iter().sum::<u64>() > 0 {
            warmed = true;
            break;
        }
    }
    if !warmed {
        let status: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}: {}", NODES[n.index], n.status()))
            .collect();
        bail!(
            "warm-up: nothing reached the subscriber on D within {WARMUP_ATTEMPTS} s; \
             node status:\n{}",
            status.join("\n")
        );
    }
    let warmup_s = warm_start.elapsed().as_secs_f64();
    // Let the warm-up's repairs settle before counting.
    std::thread::sleep(Duration::from_secs(1));

    let before = snapshot(chain)?;
    let imp_before = chain.impairment_counters()?;
    let (sent, rep) = clients.exchange(opts, opts.duration + TAIL, GRACE, true)?;
    let after = snapshot(chain)?;
    let imp_after = chain.impairment_counters()?;
    let killed = stop_all(nodes)?;
    if !killed.is_empty() {
        eprintln!(
            "ridge-bench: node(s) {} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed",
            killed.join(", ")
        );
    }

    // The packets of the window were sent before `duration` (each batch at
    // its deadline); a sender that fell behind sent fewer.
    let window = ((opts.rate * opts.duration.as_secs_f64()).round() as u64).min(sent.sent);
    let mut d = tally(window, &rep.arrivals, DEADLINE);
    let node_counters: Vec<NodeCounters> = before
        .iter()
        .zip(&after)
        .enumerate()
        .map(|(i, (b, a))| b.delta(a, i))
        .collect();
    let mut totals = MeshTotals::default();
    for n in &node_counters {
        totals.retransmit_misses += n.retransmit_misses;
        for l in &n.links {
            totals.nacks_sent += l.nacks_sent;
            totals.fec_sent += l.fec_sent;
            totals.fec_recovered += l.fec_recovered;
            totals.nacks_received += l.nacks_received;
            totals.retransmits += l.retransmits;
            totals.recovered += l.recovered;
            totals.unrecovered += l.unrecovered;
            totals.auth_failures += l.auth_failures;
        }
    }
    let impairment = chain
        .impairments
        .iter()
        .zip(imp_before.iter().zip(&imp_after))
        .map(|(l, (b, a))| {
            let passed = a.passed.saturating_sub(b.passed);
            let dropped = a.dropped.saturating_sub(b.dropped);
            LinkLoss {
                from: NODES[l.from].to_string(),
                to: NODES[l.to].to_string(),
                passed,
                dropped,
                loss_pct: pct(dropped, passed + dropped),
            }
        })
        .collect();
    let secs = sent.elapsed.as_secs_f64().max(1e-9);
    Ok(MeshRun {
        name: case.name.to_string(),
        recovery: case.recovery,
        fec: case.fec,
        recovery_flag: case.flag,
        loss_ppm: case.loss_ppm,
        hops: HOPS,
        warmup_s,
        sent: window,
        tail_sent: sent.sent - window,
        sent_pps: sent.sent as f64 / secs,
        first_received_seq: d.first,
        counted: d.counted,
        delivered: d.delivered,
        delivered_pct: pct(d.delivered, d.counted),
        on_time: d.on_time,
        on_time_pct: pct(d.on_time, d.counted),
        duplicates: d.duplicates,
        latency: Latency::from_ns(&mut d.latencies_ns),
        missing: d.missing,
        totals,
        nodes: node_counters,
        impairment,
        killed_after_sigterm: killed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_the_window_from_the_lowest_arrival() {
        let ms = |m: u64| m * 1_000_000;
        // A window of 10 and a tail from 10; 0..2 never arrive; 3 arrives
        // late, after 4; 5 is lost, 6 arrives late, 4 twice; 10 and 11 are
        // the tail.
        let arrivals = [
            (4, ms(2)),
            (3, ms(30)),
            (6, ms(250)),
            (4, ms(9)),
            (7, ms(1)),
            (8, ms(1)),
            (10, ms(1)),
            (9, ms(1)),
            (11, ms(1)),
            (11, ms(1)),
        ];
        let d = tally(10, &arrivals, Duration::from_millis(200));
        assert_eq!(d.first, Some(3), "the lowest, not the first to arrive");
        assert_eq!(d.counted, 7, "3..10");
        assert_eq!(d.delivered, 6, "all but 5");
        assert_eq!(d.on_time, 5, "6 was late");
        assert_eq!(d.duplicates, 1, "the tail's duplicate is not counted");
        assert_eq!(d.missing, vec![5]);
        assert_eq!(d.latencies_ns.len(), 6);
        let none = tally(10, &[], Duration::from_millis(200));
        assert_eq!((none.first, none.counted, none.delivered), (None, 0, 0));
    }

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# HELP ridge_mesh_nacks_sent Sequence numbers NACKed\n\
                    # TYPE ridge_mesh_nacks_sent counter\n\
                    ridge_mesh_nacks_sent_total{peer=\"A\",trusted=\"true\"} 12\n\
                    ridge_mesh_nacks_sent_total{peer=\"C\",trusted=\"true\"} 3\n\
                    ridge_mesh_nack_rtt_seconds{peer=\"A\",trusted=\"true\"} 0.0005\n\
                    ridge_retransmit_misses_total 4\n\
                    ridge_packets_dropped_total{reason=\"mesh_auth\"} 2\n\
                    ridge_packets_dropped_total{reason=\"malformed\"} 0\n\
                    ridge_room_nacks_sent_total{room=\"bench\"} 99\n\
                    weird{a=\"x\\\"y\"} 1\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 8);
        assert_eq!(samples[7].label("a"), Some("x\"y"));
        let before = Snapshot::default();
        let after = Snapshot::from_metrics(text);
        let b = before.delta(&after, 1);
        assert_eq!(b.node, "B");
        assert_eq!(b.link("A").map(|l| l.nacks_sent), Some(12));
        assert_eq!(b.link("C").map(|l| l.nacks_sent), Some(3));
        assert_eq!(b.link("A").and_then(|l| l.nack_rtt_ms), Some(0.5));
        assert_eq!(b.retransmit_misses, 4);
        assert_eq!(
            b.dropped.into_iter().collect::<Vec<_>>(),
            vec![("mesh_auth".to_string(), 2)]
        );
        let again = after.delta(&after, 1);
        assert_eq!(again.link("A").map(|l| l.nacks_sent), Some(0));
    }

    #[test]
    fn desired_states_route_the_room_down_the_chain() {
        let keys: Vec<String> = (0..HOPS).map(|_| random_key()).collect();
        assert!(keys.iter().all(|k| k.len() == 64));
        let a = desired_state(0, &keys, false);
        assert!(a["links"][0].get("fec").is_none());
        assert_eq!(desired_state(0, &keys, true)["links"][0]["fec"], true);
        assert_eq!(a["links"].as_array().map(Vec::len), Some(1));
        assert_eq!(a["routes"][0]["upstream"], serde_json::Value::Null);
        assert_eq!(a["routes"][0]["downstream"], serde_json::json!(["B"]));
        let b = desired_state(1, &keys, false);
        assert_eq!(b["links"][0]["peer"], "A");
        assert_eq!(b["links"][0]["key"], keys[0].as_str());
        assert_eq!(b["links"][1]["address"], "10.81.2.3:5004");
        assert_eq!(b["links"][1]["key"], keys[1].as_str());
        assert_eq!(b["routes"][0]["upstream"], "A");
        let d = desired_state(3, &keys, false);
        assert_eq!(d["routes"][0]["downstream"], serde_json::json!([]));
        assert_eq!(d["links"][0]["key"], keys[2].as_str());
    }
}
