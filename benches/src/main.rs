//! `ridge-bench`: per-core throughput of the Ridge node against the
//! machine's loopback ceiling and a naive relay baseline. See `--help` and
//! docs/benchmarks.md.
//!
//! All `unsafe` code lives in [`mmsg`]; everywhere else it is denied.

#![deny(unsafe_code)]

// ridge-ebpf's test helpers (namespaces, veth pairs, crafted frames), for
// kernel-path and mesh-loss.
#[path = "../../ebpf/tests/common/mod.rs"]
mod common;
mod kernel_path;
mod mesh_loss;
mod mmsg;
mod naive;
mod node;
mod packet;
mod placement;
mod report;
mod scenario;
mod stats;
mod traffic;
mod webrtc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use crate::node::NodeOptions;
use crate::placement::{Cpus, Placement};
use crate::report::Report;
use crate::scenario::{Kind, RunResult, Settings, Target, Topology};

const LONG_ABOUT: &str = "\
Per-core throughput benchmark for the Ridge node, on loopback.

Scenarios:
  ceiling  sender thread (sendmmsg, batches of 32) -> receiver thread (recvmmsg);
           no relay: the machine's raw ceiling
  naive    the same generator and receiver through a naive relay: a tokio
           UdpSocket recv_from/send_to loop on a current-thread runtime on its
           own thread, 1:1 (or 1->N with --subscribers)
  relay    1:1 plain RTP through a real ridge-dataplane, started as a child
           process on free loopback ports (POST /v1/rooms/bench/rtp)
  fanout   the same with --subscribers N (default 50)
  webrtc-fanout  a str0m WHIP publisher and --subscribers N (default 10) str0m
           WHEP subscribers, all on one thread of this process; every leg is
           ICE + DTLS-SRTP, so the node decrypts once and encrypts per
           subscriber
  kernel-path  ridge-ebpf's programs: cost per packet of each through
           BPF_PROG_TEST_RUN, then packets per core of a forwarding hop B on a
           veth topology A -> B -> C in private namespaces, XDP rewrite+redirect
           vs a recvmmsg/sendmmsg relay, in the same run (root; --duration s
           per path, --json)
  mesh-loss  loss recovery over mesh links: four nodes A-B-C-D in a chain, each
           ridge-dataplane in its own network namespace with veths between
           neighbours, room `bench` routed A -> B -> C -> D by desired states
           PUT on each node's control socket, random UDP loss (--loss, default
           20%) on every mesh link in both directions (ridge-ebpf's TC
           impairment), a plain-RTP publisher into A and subscriber on D
           (--rate, default 500 pps, for --duration, default 10 s): the share
           of packets delivered and delivered within 200 ms, latency, and
           every node's ridge_mesh_* counters, for a loss-free control run,
           --mesh-recovery hop-by-hop and --mesh-recovery end-to-end, the
           nodes restarted between runs (root; not part of `all`)
  rooms    --rooms M rooms (default 2), each with one publisher and an equal
           share of --subscribers (default 50); rooms are named so that they
           spread evenly over the node's --shards
  all      ceiling, naive 1:1, naive 1->N, relay, fanout in sequence at the same
           settings, then rooms on one shard and on two shards, then
           webrtc-fanout with 20 subscribers, plus the ratio
           table (node / ceiling, node / naive, two shards / one shard); with
           --rate (and no --search) also `ceiling-max`, the ceiling unpaced

Measured per run: packets/s sent and received (total and per subscriber),
loss, one-way latency p50/p99/p99.9 (a send timestamp travels in the payload),
and for naive/relay/fanout the relay's CPU time (/proc stat utime+stime) as
CPU us per packet in and out and packets out per core-second (for ceiling:
per core-second of the sender and receiver threads together, the per-core
ceiling), and for the
node the heap allocations its shards made per packet out (from /metrics).

The node binary defaults to ridge-dataplane next to this executable; build
both with: cargo build --release -p ridge-dataplane -p ridge-bench";

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Sender -> receiver on loopback, no relay: the machine's ceiling
    Ceiling,
    /// Through a naive tokio recv_from/send_to relay thread
    Naive,
    /// 1:1 plain RTP through a real ridge-dataplane node
    Relay,
    /// 1->N plain RTP through a real node (--subscribers, default 50)
    Fanout,
    /// M rooms (--rooms) of one publisher and N/M subscribers each
    Rooms,
    /// A str0m WHIP publisher and N str0m WHEP subscribers (SRTP on every leg)
    WebrtcFanout,
    /// The kernel fast path: BPF programs' cost per packet (BPF_PROG_TEST_RUN)
    /// and kernel vs userspace forwarding per core on veth pairs (root)
    KernelPath,
    /// Loss recovery over 3 mesh hops (A-B-C-D in network namespaces, random
    /// loss on every link): hop-by-hop vs end-to-end NACKs, and a loss-free
    /// control (root)
    MeshLoss,
    /// All of the above but kernel-path and mesh-loss in sequence, with the
    /// ratio table
    All,
}

/// `ridge-bench <scenario> [options]`.
#[derive(Debug, Parser)]
#[command(
    name = "ridge-bench",
    version,
    about = "Per-core throughput benchmark: loopback ceiling, naive relay and the Ridge node",
    long_about = LONG_ABOUT
)]
struct Cli {
    /// Scenario to run
    #[arg(value_enum)]
    scenario: Scenario,
    /// Target packets/s sent by the publisher; omitted: as fast as the sender
    /// can (unpaced), for mesh-loss 500
    #[arg(long, value_name = "PPS")]
    rate: Option<f64>,
    /// Datagram size in bytes, RTP header included (48..=1500)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    size: usize,
    /// Seconds each run sends for (each --search step, each kernel-path
    /// path too) [default: 5; mesh-loss: 10]
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// mesh-loss: random UDP loss on every mesh link, in each direction: a
    /// percentage (20%, 0.5%) or parts per million (2500ppm)
    #[arg(long, value_name = "LOSS", default_value = "20%", value_parser = parse_loss)]
    loss: u32,
    /// Subscribers for naive/relay/fanout/rooms [default: 1; fanout, rooms and all: 50]
    #[arg(long, value_name = "N")]
    subscribers: Option<usize>,
    /// Rooms for the rooms scenario
    #[arg(long, value_name = "M", default_value_t = 2)]
    rooms: usize,
    /// Media shards of the started node (its --shards)
    #[arg(long, value_name = "N", default_value_t = 1)]
    shards: usize,
    /// I/O backend of the started node: auto, uring or mmsg
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    io_backend: String,
    /// Start the node with --no-udp-gso (every datagram its own send); `all`
    /// runs relay and fanout both ways regardless
    #[arg(long)]
    no_udp_gso: bool,
    /// Publisher rate of webrtc-fanout within `all` (WebRTC sessions are
    /// paced by the node's bandwidth estimate, so a plain-RTP rate of
    /// hundreds of thousands of packets/s would only fill pacer queues)
    #[arg(long, value_name = "PPS", default_value_t = 2000.0)]
    webrtc_rate: f64,
    /// Draw the per-core throughput of each run as an SVG bar chart into FILE
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// Use an already running node at this URL (http://HOST:PORT) instead of
    /// starting one; needs --token; its CPU is not measured
    #[arg(long, value_name = "URL", requires = "token")]
    node: Option<String>,
    /// Token (room "*", publish+subscribe, and admin for allocation counts) for --node
    #[arg(
        long,
        value_name = "JWT",
        env = "RIDGE_BENCH_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// ridge-dataplane binary to start [default: ridge-dataplane next to ridge-bench]
    #[arg(long, value_name = "PATH")]
    node_bin: Option<PathBuf>,
    /// Also write every number as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Find the highest rate with loss < 0.1%: from 20k pps, double until a
    /// rate fails, then bisect 5 steps (each step --duration seconds)
    #[arg(long)]
    search: bool,
    /// Turn UDP_GRO on for the subscriber sockets: a GSO run the node sends
    /// then stays one buffer through loopback instead of being cut into
    /// datagrams in the node's send, much as a NIC with UDP segmentation
    /// offload would take it (individually sent datagrams are unaffected)
    #[arg(long)]
    gro_receivers: bool,
    /// What the plain-RTP publisher's payloads are: the node checks each
    /// packet's payload format and finds keyframes by it (the WebRTC
    /// scenario sends VP8 whatever this says)
    #[arg(long, value_enum, default_value = "vp8")]
    codec: packet::Codec,
    /// CPUs the measured relay runs on: the started node (it pins shard i to
    /// the i-th of them) or the naive relay's thread; a list as taskset -c
    /// takes it (0, 0-3, 0,2-3) [default: any]
    #[arg(long, value_name = "LIST", value_parser = Cpus::parse)]
    node_cpus: Option<Cpus>,
    /// CPUs of ridge-bench's own threads (generator, receivers, WebRTC
    /// clients); keep them off --node-cpus so that the load does not compete
    /// with what it measures [default: any]
    #[arg(long, value_name = "LIST", value_parser = Cpus::parse)]
    bench_cpus: Option<Cpus>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ridge-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--loss` as parts per million (ridge-ebpf's parser: `20%`, `2500ppm`).
fn parse_loss(s: &str) -> Result<u32, String> {
    ridge_ebpf::parse_loss(s).map_err(|e| e.to_string())
}

fn run(cli: &Cli) -> Result<()> {
    let duration = cli.duration.unwrap_or(match cli.scenario {
        Scenario::MeshLoss => 10.0,
        _ => 5.0,
    });
    if !(duration > 0.0 && duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    let placed = cli.node_cpus.is_some() || cli.bench_cpus.is_some();
    if placed && matches!(cli.scenario, Scenario::KernelPath | Scenario::MeshLoss) {
        bail!(
            "--node-cpus and --bench-cpus do not apply to kernel-path (which pins its own \
             threads) or mesh-loss"
        );
    }
    if cli.node_cpus.is_some() && cli.node.is_some() {
        bail!("--node-cpus places a node ridge-bench starts; it cannot move one given with --node");
    }
    if cli.scenario == Scenario::KernelPath {
        return kernel_path::run(duration, cli.json.as_deref());
    }
    if cli.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of packets/s");
    }
    if !(packet::MIN_SIZE..=packet::MAX_SIZE).contains(&cli.size) {
        bail!(
            "--size must be {}..={} bytes",
            packet::MIN_SIZE,
            packet::MAX_SIZE
        );
    }
    let node_bin = match &cli.node_bin {
        Some(p) => p.clone(),
        None => node::default_node_bin()?,
    };
    if cli.scenario == Scenario::MeshLoss {
        if cli.node.is_some() || cli.search {
            bail!("mesh-loss starts its own four nodes: --node and --search do not apply");
        }
        let opts = mesh_loss::Options {
            rate: cli.rate.unwrap_or(mesh_loss::DEFAULT_RATE),
            size: cli.size,
            duration: Duration::from_secs_f64(duration),
            loss_ppm: cli.loss,
            node_bin,
            io_backend: cli.io_backend.clone(),
        };
        return mesh_loss::run(&opts, cli.json.as_deref(), command_line());
    }
    let external = match &cli.node {
        Some(url) => Some((
            node::parse_http_url(url)?,
            cli.token.clone().context("--node needs --token")?,
        )),
        None => None,
    };
    if !(1..=64).contains(&cli.shards) {
        bail!("--shards must be 1..=64");
    }
    if cli.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    let placement = Placement::apply(cli.node_cpus.as_ref(), cli.bench_cpus.as_ref())?;
    if placed {
        let show = |c: &Option<Cpus>| c.as_ref().map_or("any".to_string(), Cpus::to_string);
        eprintln!(
            "ridge-bench: relay on CPUs {}, generator and receivers on CPUs {}",
            show(&cli.node_cpus),
            show(&cli.bench_cpus)
        );
    }
    let fanout_n = cli.subscribers.unwrap_or(50);
    let topo_gso = |subscribers: usize, rooms: usize, shards: usize, gso: bool| Topology {
        subscribers,
        rooms,
        node: NodeOptions {
            shards,
            io_backend: cli.io_backend.clone(),
            gso,
            placement: placement.clone(),
        },
        gro_receivers: cli.gro_receivers,
        codec: cli.codec,
    };
    let topo = |subscribers: usize, rooms: usize, shards: usize| {
        topo_gso(subscribers, rooms, shards, !cli.no_udp_gso)
    };
    let one = cli.subscribers.unwrap_or(1);
    let plan: Vec<(String, Kind, Topology)> = match cli.scenario {
        Scenario::Ceiling => vec![("ceiling".into(), Kind::Ceiling, topo(1, 1, 1))],
        Scenario::Naive => vec![("naive".into(), Kind::Naive, topo(one, 1, 1))],
        Scenario::Relay => vec![("relay".into(), Kind::Node, topo(one, 1, cli.shards))],
        Scenario::Fanout => vec![("fanout".into(), Kind::Node, topo(fanout_n, 1, cli.shards))],
        Scenario::WebrtcFanout => vec![(
            "webrtc-fanout".into(),
            Kind::WebRtc,
            topo(cli.subscribers.unwrap_or(10), 1, cli.shards),
        )],
        Scenario::Rooms => vec![(
            format!("rooms-{}shard", cli.shards),
            Kind::Node,
            topo(fanout_n, cli.rooms, cli.shards),
        )],
        // Handled above.
        Scenario::KernelPath | Scenario::MeshLoss => Vec::new(),
        Scenario::All => vec![
            ("ceiling".into(), Kind::Ceiling, topo(1, 1, 1)),
            ("ceiling-max".into(), Kind::Ceiling, topo(1, 1, 1)),
            ("naive".into(), Kind::Naive, topo(1, 1, 1)),
            ("naive-fanout".into(), Kind::Naive, topo(fanout_n, 1, 1)),
            ("relay".into(), Kind::Node, topo(1, 1, 1)),
            ("relay-nogso".into(), Kind::Node, topo_gso(1, 1, 1, false)),
            ("fanout".into(), Kind::Node, topo(fanout_n, 1, 1)),
            (
                "fanout-nogso".into(),
                Kind::Node,
                topo_gso(fanout_n, 1, 1, false),
            ),
            (
                "rooms-1shard".into(),
                Kind::Node,
                topo(fanout_n, cli.rooms, 1),
            ),
            (
                "rooms-2shard".into(),
                Kind::Node,
                topo(fanout_n, cli.rooms, 2),
            ),
            ("webrtc-fanout".into(), Kind::WebRtc, topo(20, 1, 1)),
        ],
    };
    let mut report = Report::new(cli.rate, cli.size, duration, cli.search, command_line());
    let base = Instant::now();
    for (name, kind, topology) in plan {
        let name = name.as_str();
        let subs = topology.subscribers;
        // The unpaced ceiling row only adds information next to a paced
        // ceiling run.
        if name == "ceiling-max" && (cli.search || cli.rate.is_none()) {
            continue;
        }
        eprintln!("ridge-bench: {name} ({subs} subscriber(s)) ...");
        let mut target = Target::setup(name, kind, &topology, &node_bin, base, external.as_ref())
            .with_context(|| format!("setting up {name}"))?;
        let settings = Settings {
            rate: if name == "ceiling-max" {
                None
            } else if kind == Kind::WebRtc && cli.scenario == Scenario::All {
                Some(cli.webrtc_rate)
            } else {
                cli.rate
            },
            size: cli.size,
            duration: Duration::from_secs_f64(duration),
        };
        if cli.search {
            let s = scenario::search(&mut target, &settings, |r: &RunResult, ok| {
                eprintln!(
                    "  {:>10.0} pps: sent {:>10.0} pps, loss {:>7.3}% -> {}",
                    r.target_pps.unwrap_or(0.0),
                    r.sent_pps,
                    r.loss_pct,
                    if ok { "pass" } else { "fail" }
                );
            })
            .with_context(|| format!("searching {name}"))?;
            report.add_search(s);
        } else {
            let r = target
                .run(&settings)
                .with_context(|| format!("running {name}"))?;
            report.add_run(r);
        }
        debug_assert_eq!(target.kind(), kind);
        target.close().with_context(|| format!("stopping {name}"))?;
    }
    report.finish();
    report::print(&report.render());
    if let Some(path) = &cli.chart {
        std::fs::write(path, report.chart_svg())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ridge-bench: wrote {}", path.display());
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ridge-bench: wrote {}", path.display());
    }
    Ok(())
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}
