//! `sched-sim`: load test for ridge-scheduler.
//!
//! `agents` mode starts a real `ridge-scheduler` (release build, SQLite in a
//! temporary directory, HTTPS) as a child process, enrolls N simulated
//! agents and makes each heartbeat every `--interval` (spread evenly), with
//! link measurements to a few peers and room membership, for `--duration`
//! after a warm-up (3 intervals by default). It reports heartbeat latency
//! percentiles, the achieved rate, errors, the seconds of the measured
//! window that had heartbeats over 50 ms, each agent's first heartbeat
//! (which opens its connection) on its own, and the scheduler's CPU use
//! from /proc/<pid>/stat.
//!
//! `routes` mode times route-plan plus desired-state computation for a
//! synthetic mesh (in process, no I/O).

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand};
use rand::Rng as _;
use ridge_scheduler::api;
use ridge_scheduler::client::Client;
use ridge_scheduler::crypto::enroll_message;
use ridge_scheduler::desired::{self, NodeFacts};
use ridge_scheduler::route::{self, CostModel, LinkInput, MeshView, NodeInput, RoomInput};

const ADMIN: &str = "sched-sim-admin-token-0123456789";

/// Load test for ridge-scheduler (see docs/benchmarks.md).
#[derive(Debug, Parser)]
#[command(name = "sched-sim")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Simulated agents heartbeating against a real scheduler process.
    Agents {
        /// Number of simulated agents.
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Heartbeat interval per agent.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Measured period (after the warm-up).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Time before measuring [default: 3 intervals]. Each agent's first
        /// heartbeat opens its connection (a TLS handshake); with one client
        /// per agent, 10,000 handshakes at once take seconds and are
        /// reported on their own ("first heartbeats"), not in the measured
        /// percentiles.
        #[arg(long, value_parser = humantime::parse_duration)]
        warm_up: Option<Duration>,
        /// HTTP clients (each with its own TLS connection pool) the agents share.
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// Peers each agent reports link measurements for.
        #[arg(long, default_value_t = 4)]
        links: usize,
        /// Rooms spread over the agents (one publisher node, 3 subscriber nodes each).
        #[arg(long, default_value_t = 200)]
        rooms: usize,
        /// The ridge-scheduler binary (default: next to this one).
        #[arg(long)]
        scheduler_bin: Option<PathBuf>,
    },
    /// Time route + desired-state computation for a synthetic mesh.
    Routes {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Links measured per node (to random peers).
        #[arg(long, default_value_t = 20)]
        links: usize,
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        /// Subscriber nodes per room.
        #[arg(long, default_value_t = 5)]
        subscribers: usize,
        #[arg(long, default_value_t = 4)]
        max_hops: usize,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Seed of the synthetic mesh and its changes (same seed, same runs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.mode {
        Mode::Agents {
            agents,
            interval,
            duration,
            warm_up,
            clients,
            links,
            rooms,
            scheduler_bin,
        } => rt.block_on(agents_mode(AgentsArgs {
            n: agents,
            interval,
            duration,
            warm_up: warm_up.unwrap_or(interval * 3),
            clients,
            links,
            rooms,
            bin: scheduler_bin,
        })),
        Mode::Routes {
            nodes,
            links,
            rooms,
            subscribers,
            max_hops,
            iterations,
            seed,
        } => {
            routes_mode(RoutesArgs {
                n: nodes,
                links,
                rooms,
                subs: subscribers,
                max_hops,
                iters: iterations,
                seed,
            });
            Ok(())
        }
    }
}

/// Per second of the measured window that had heartbeats slower than
/// `over_ms`: (second, how many, the slowest), in time order. Shows whether
/// a tail is spread evenly or comes in bursts (a stall, a storm).
fn slow_seconds(samples: &[(f64, f64)], over_ms: f64) -> Vec<(u64, usize, f64)> {
    let mut by: std::collections::BTreeMap<u64, (usize, f64)> = Default::default();
    for &(at, ms) in samples.iter().filter(|(_, ms)| *ms > over_ms) {
        let e = by.entry(at.max(0.0) as u64).or_default();
        e.0 += 1;
        e.1 = e.1.max(ms);
    }
    by.into_iter().map(|(s, (n, w))| (s, n, w)).collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct RoutesArgs {
    n: usize,
    links: usize,
    rooms: usize,
    subs: usize,
    max_hops: usize,
    iters: usize,
    seed: u64,
}

#[allow(clippy::print_stdout, reason = "the report is the product")]
fn routes_mode(args: RoutesArgs) {
    let RoutesArgs {
        n,
        links,
        rooms,
        subs,
        max_hops,
        iters,
        seed,
    } = args;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let ids: Vec<String> = (0..n).map(|i| format!("n-{i:016x}")).collect();
    let mut view = MeshView::default();
    for id in &ids {
        view.nodes.push(NodeInput {
            id: id.clone(),
            up: true,
            transit: true,
            load: rng.random_range(0.0..0.9),
        });
    }
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..links {
            let j = rng.random_range(0..n);
            if j != i {
                view.links.push(LinkInput {
                    from: id.clone(),
                    to: ids[j].clone(),
                    rtt_ms: rng.random_range(1.0..80.0),
                    loss: rng.random_range(0.0..0.02),
                    jitter_ms: rng.random_range(0.0..5.0),
                });
            }
        }
    }
    for r in 0..rooms {
        let publishers = BTreeSet::from([ids[rng.random_range(0..n)].clone()]);
        let subscribers = (0..subs)
            .map(|_| ids[rng.random_range(0..n)].clone())
            .collect();
        view.rooms.push(RoomInput {
            room: format!("room-{r}"),
            publishers,
            subscribers,
        });
    }
    let model = CostModel {
        max_hops,
        ..CostModel::default()
    };
    let secrets: Vec<String> = ids.iter().map(|_| "s".repeat(64)).collect();
    let mut route_ms = Vec::new();
    let mut total_ms = Vec::new();
    let mut tick_ms = Vec::new();
    let mut changed = Vec::new();
    // The previous iteration's serialized states: the leader compares each
    // new state's JSON with the stored one and writes only those that differ.
    let mut stored: Vec<String> = vec![String::new(); n];
    // FNV-1a over every iteration's plan and states: equal seeds must give
    // equal digests whatever the implementation (checks a faster route
    // computation chose the same paths).
    let mut digest = 0xcbf2_9ce4_8422_2325u64;
    let mut prev = None;
    let mut edges = 0;
    let mut unreachable = 0;
    for it in 0..iters {
        // Perturb a link each iteration, so each run is a recompute after a change.
        let k = rng.random_range(0..view.links.len());
        view.links[k].rtt_ms = rng.random_range(1.0..80.0);
        if it % 2 == 1 {
            let k = rng.random_range(0..n);
            view.nodes[k].up = !view.nodes[k].up;
        }
        let t0 = Instant::now();
        let plan = route::compute(&view, &model, prev.as_ref());
        let t1 = Instant::now();
        let facts: Vec<NodeFacts<'_>> = ids
            .iter()
            .zip(&secrets)
            .map(|(id, s)| NodeFacts {
                id,
                drain: false,
                dataplane_secret: s,
                mesh_address: Some("10.0.0.1:5006"),
                trust_domain: None,
                up: true,
            })
            .collect();
        let states = desired::derive(&facts, &plan, "mesh-key");
        let t2 = Instant::now();
        assert_eq!(states.len(), n);
        let mut writes = Vec::new();
        for (i, (st, old)) in states.iter().zip(stored.iter_mut()).enumerate() {
            // As the leader (compute_desired): compare, then serialize
            // what changed.
            if !desired::same_json(st, old) {
                *old = serde_json::to_string(st).unwrap_or_default();
                writes.push(i);
            }
        }
        let t3 = Instant::now();
        // The states written, in full (the first iteration writes all).
        for &i in &writes {
            digest = fnv(digest, stored[i].as_bytes());
        }
        changed.push(writes.len());
        digest = fnv(
            digest,
            serde_json::to_string(&plan).unwrap_or_default().as_bytes(),
        );
        edges = plan.routes.iter().map(|r| r.edges.len()).sum();
        unreachable = plan.routes.iter().map(|r| r.unreachable.len()).sum();
        route_ms.push((t1 - t0).as_secs_f64() * 1e3);
        total_ms.push((t2 - t0).as_secs_f64() * 1e3);
        tick_ms.push((t3 - t0).as_secs_f64() * 1e3);
        prev = Some(plan);
    }
    route_ms.sort_by(f64::total_cmp);
    total_ms.sort_by(f64::total_cmp);
    tick_ms.sort_by(f64::total_cmp);
    changed.sort_unstable();
    println!(
        "routes: nodes={n} links/node={links} (reported; {} directed reports) rooms={rooms} subscribers/room={subs} max_hops={max_hops} iterations={iters}",
        view.links.len()
    );
    println!(
        "  tree edges={edges} unreachable subscribers={unreachable} seed={seed} digest={digest:016x}"
    );
    println!(
        "  route plan:           median {:.1} ms  max {:.1} ms",
        pct(&route_ms, 50.0),
        pct(&route_ms, 100.0)
    );
    println!(
        "  plan + desired state: median {:.1} ms  max {:.1} ms",
        pct(&total_ms, 50.0),
        pct(&total_ms, 100.0)
    );
    println!(
        "  + serialize/compare:  median {:.1} ms  max {:.1} ms  (changed states per iteration: median {})",
        pct(&tick_ms, 50.0),
        pct(&tick_ms, 100.0),
        changed.get(changed.len() / 2).copied().unwrap_or(0)
    );
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Clone)]
struct Agent {
    id: String,
    token: String,
}

struct AgentsArgs {
    n: usize,
    interval: Duration,
    duration: Duration,
    warm_up: Duration,
    clients: usize,
    links: usize,
    rooms: usize,
    bin: Option<PathBuf>,
}

#[allow(clippy::print_stdout, reason = "the report is the product")]
async fn agents_mode(args: AgentsArgs) -> Result<()> {
    let AgentsArgs {
        n,
        interval,
        duration,
        warm_up,
        clients,
        links,
        rooms,
        bin,
    } = args;
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("ridge-scheduler"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p ridge-scheduler`",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("sched-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])?;
    std::fs::write(dir.join("cert.pem"), ck.cert.pem())?;
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem())?;
    let ca = ck.cert.pem().into_bytes();
    let mut child = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .arg("--tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("key.pem"))
        .arg("--database")
        .arg(format!("sqlite:{}", dir.join("s.db").display()))
        .arg("--heartbeat-interval")
        .arg(humantime::format_duration(interval).to_string())
        .env("RIDGE_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn ridge-scheduler")?;
    let pid = child.id();
    let out = child.stdout.take().context("stdout")?;
    let proc_guard = Proc { child };
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("ridge-scheduler listening on ")
        .context("no listening line")?
        .to_owned();
    let url = format!("https://{addr}");
    let pool: Vec<Client> = (0..clients.max(1))
        .map(|_| Client::new(&url, &ca, 64))
        .collect::<Result<_, _>>()?;
    let admin = &pool[0];

    // Enroll.
    let t = Instant::now();
    let r = admin
        .post(
            "/v1/tokens",
            Some(ADMIN),
            &api::CreateToken {
                ttl_secs: Some(3600),
                max_uses: Some(u32::try_from(n)?),
                region: "sim".into(),
                ..Default::default()
            },
        )
        .await?;
    let token = r.json()["token"].as_str().context("token")?.to_owned();
    let agents: Arc<Mutex<Vec<Agent>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    let per = n.div_ceil(32);
    for w in 0..32 {
        let (c, token, agents) = (pool[w % pool.len()].clone(), token.clone(), agents.clone());
        let count = per.min(n.saturating_sub(w * per));
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                let kp = Ed25519KeyPair::generate()?;
                let key = STANDARD.encode(kp.public_key().as_ref());
                let proof = STANDARD.encode(kp.sign(&enroll_message(&token, &key)).as_ref());
                let req = api::EnrollRequest {
                    bootstrap_token: token.clone(),
                    public_key: api::PublicKey {
                        alg: "ed25519".into(),
                        key,
                    },
                    proof,
                    hostname: String::new(),
                    version: "sim".into(),
                };
                let r = c.post("/v1/enroll", None, &req).await?;
                if r.status.as_u16() != 201 {
                    bail!("enroll: {} {}", r.status, r.body);
                }
                let e: api::EnrollResponse = serde_json::from_str(&r.body)?;
                agents
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(Agent {
                        id: e.node_id,
                        token: e.node_token,
                    });
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let agents = Arc::new(
        agents
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone(),
    );
    println!(
        "enrolled {} agents in {:.1} s",
        agents.len(),
        t.elapsed().as_secs_f64()
    );

    // Heartbeat.
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let measure_from = start + warm_up;
    let end = measure_from + duration;
    // (seconds into the measured window the heartbeat was sent, its latency
    // in ms).
    let lat: Arc<Mutex<Vec<(f64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0u64));
    // Each agent's first heartbeat (it opens the agent's connection when
    // the agent has a client of its own): (latency ms, done at s after
    // start).
    let firsts: Arc<Mutex<Vec<(f64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let c = pool[i % pool.len()].clone();
        let a = a.clone();
        let all = agents.clone();
        let (lat, errors, firsts) = (lat.clone(), errors.clone(), firsts.clone());
        let mut rng = rand::rng();
        let peers: Vec<String> = (0..links)
            .map(|_| all[rng.random_range(0..all.len())].id.clone())
            .filter(|p| *p != a.id)
            .collect();
        let room = if rooms > 0 && i % (all.len() / rooms.max(1)).max(1) < 4 {
            Some((
                format!("room-{}", i / (all.len() / rooms.max(1)).max(1)),
                i % 4 == 0,
            ))
        } else {
            None
        };
        let offset = interval.mul_f64(i as f64 / all.len() as f64);
        handles.push(tokio::spawn(async move {
            let mut next = start + offset;
            let mut mine = Vec::new();
            let mut first = None;
            let mut errs = 0u64;
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
            while next < end {
                tokio::time::sleep_until(next).await;
                let hb = api::Heartbeat {
                    version: "sim".into(),
                    addresses: api::Addresses {
                        media: Some(format!(
                            "10.{}.{}.{}:5004",
                            i >> 16 & 255,
                            i >> 8 & 255,
                            i & 255
                        )),
                        mesh: None,
                        http: None,
                    },
                    capabilities: api::Capabilities {
                        cores: 8,
                        io_uring: true,
                        max_sessions: 1000,
                        xdp_mode: Some("native".into()),
                        ..Default::default()
                    },
                    load: api::Load {
                        cpu: rng.random_range(0.0..0.8),
                        pps: rng.random_range(0..200_000),
                        sessions: rng.random_range(0..500),
                        bandwidth_bps: 0,
                        memory: rng.random_range(0.1..0.9),
                    },
                    links: peers
                        .iter()
                        .map(|p| api::LinkReport {
                            peer: p.clone(),
                            rtt_ms: rng.random_range(1.0..60.0),
                            loss: 0.0,
                            jitter_ms: 1.0,
                        })
                        .collect(),
                    rooms: room
                        .iter()
                        .map(|(r, publ)| api::RoomReport {
                            room: r.clone(),
                            publishers: u32::from(*publ),
                            subscribers: u32::from(!*publ),
                        })
                        .collect(),
                };
                let t0 = tokio::time::Instant::now();
                let r = c
                    .post(
                        &format!("/v1/nodes/{}/heartbeat", a.id),
                        Some(&a.token),
                        &hb,
                    )
                    .await;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                if first.is_none() {
                    first = Some((ms, (t0 - start).as_secs_f64() + ms / 1e3));
                }
                if t0 >= measure_from {
                    match r {
                        Ok(r) if r.status.as_u16() == 200 => {
                            mine.push(((t0 - measure_from).as_secs_f64(), ms))
                        }
                        _ => errs += 1,
                    }
                }
                next += interval;
            }
            if let Ok(mut l) = lat.lock() {
                l.extend(mine);
            }
            if let Ok(mut e) = errors.lock() {
                *e += errs;
            }
            if let (Some(f), Ok(mut fs)) = (first, firsts.lock()) {
                fs.push(f);
            }
        }));
    }
    tokio::time::sleep_until(measure_from).await;
    let cpu0 = cpu_ticks(pid)?;
    let self0 = cpu_ticks(std::process::id())?;
    let wall0 = Instant::now();
    tokio::time::sleep_until(end).await;
    let cpu1 = cpu_ticks(pid)?;
    let self1 = cpu_ticks(std::process::id())?;
    let wall = wall0.elapsed().as_secs_f64();
    for h in handles {
        h.await?;
    }
    let samples = lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut lat: Vec<f64> = samples.iter().map(|&(_, ms)| ms).collect();
    lat.sort_by(f64::total_cmp);
    let slow = slow_seconds(&samples, 50.0);
    let firsts = firsts
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut first_ms: Vec<f64> = firsts.iter().map(|&(ms, _)| ms).collect();
    first_ms.sort_by(f64::total_cmp);
    let firsts_done = firsts.iter().map(|&(_, at)| at).fold(0.0, f64::max);
    let errors = *errors.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let cpu = (cpu1 - cpu0) as f64 / clk_tck() / wall;
    let metrics = admin.get("/metrics", Some(ADMIN)).await?.body;
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Server-side time of heartbeats (from routing to response), from the
    // scheduler's histogram: how many took over 50 ms there.
    let heartbeat_bucket = |le: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("ridge_scheduler_http_request_seconds_bucket{")
                    && l.contains("route=\"/v1/nodes/{id}/heartbeat\"")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (server_50ms, server_all) = (heartbeat_bucket("0.05"), heartbeat_bucket("+Inf"));
    let rc_sum = metric("ridge_scheduler_route_computation_seconds_sum");
    let rc_count = metric("ridge_scheduler_route_computation_seconds_count");
    let routes = admin.get("/v1/routes", Some(ADMIN)).await?.json();
    let nodes = admin.get("/v1/nodes", Some(ADMIN)).await?.json();
    let up = nodes["nodes"]
        .as_array()
        .map(|a| a.iter().filter(|n| n["state"] == "up").count())
        .unwrap_or(0);
    println!(
        "agents={} interval={} measured={:.1}s clients={} links/agent={} rooms={}",
        agents.len(),
        humantime::format_duration(interval),
        wall,
        pool.len(),
        links,
        rooms
    );
    println!(
        "heartbeats: {} ok ({:.0}/s), {} errors; nodes up at end: {up}",
        lat.len(),
        lat.len() as f64 / wall,
        errors
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        pct(&lat, 50.0),
        pct(&lat, 90.0),
        pct(&lat, 99.0),
        pct(&lat, 99.9),
        pct(&lat, 100.0)
    );
    println!(
        "first heartbeats ({} agents{}): p50 {:.2}  p99 {:.2}  max {:.2} ms; all answered {:.1} s after the first was sent (warm-up {})",
        first_ms.len(),
        if pool.len() >= agents.len() {
            ", each opening its own TLS connection"
        } else {
            ""
        },
        pct(&first_ms, 50.0),
        pct(&first_ms, 99.0),
        pct(&first_ms, 100.0),
        firsts_done,
        humantime::format_duration(warm_up)
    );
    println!(
        "heartbeats over 50 ms by second of the measured window they were sent in (second: count, worst ms): {}",
        if slow.is_empty() {
            "none".to_string()
        } else {
            slow.iter()
                .map(|(s, n, worst)| format!("{s}: {n}, {worst:.0}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    println!(
        "scheduler CPU: {:.1}% of one core (utime+stime from /proc/{pid}/stat); simulator CPU: {:.1}%",
        cpu * 100.0,
        (self1 - self0) as f64 / clk_tck() / wall * 100.0
    );
    println!(
        "server side (routing to response, whole run incl. warm-up): {} of {} heartbeats over 50 ms",
        server_all - server_50ms,
        server_all
    );
    println!(
        "leader route computation (route plan + desired states over {} nodes, {} room trees): mean {:.1} ms over {} computations; {} ticks kept the plan (measurements only); {} desired states written",
        agents.len(),
        routes["routes"].as_array().map_or(0, Vec::len),
        if rc_count > 0.0 {
            rc_sum / rc_count * 1e3
        } else {
            0.0
        },
        rc_count,
        metric("ridge_scheduler_route_computations_skipped_total"),
        metric("ridge_scheduler_desired_updates_total")
    );
    drop(proc_guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
